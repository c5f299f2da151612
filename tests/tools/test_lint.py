# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""The gates vLLM's pre-commit runs on a pull request, over this
repository's files: ruff lint and format with vLLM's settings (ruff.toml),
typos, mypy on the modules the series adds to vLLM (as
tools/pre_commit/mypy.py runs it), and the SPDX header on every Python
file."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCES = ["vllm", "tests", "examples", "benchmarks", "tools", "setup.py"]
SPDX = (
    "# SPDX-License-Identifier: Apache-2.0\n"
    "# SPDX-FileCopyrightText: Copyright contributors to the vLLM project\n"
)


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True)


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", *SOURCES],
        ["ruff", "format", "--check", *SOURCES],
        ["typos", *SOURCES, "docs", "README.md", "patches"],
    ],
    ids=["ruff-check", "ruff-format", "typos"],
)
def test_clean(command):
    tool = Path(sys.executable).parent / command[0]
    result = run(str(tool), *command[1:])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_mypy_on_the_series_modules(tmp_path):
    """vLLM's settings (pyproject.toml: ignore_missing_imports,
    check_untyped_defs; Python 3.10) with imports skipped, as its
    pre-commit hook runs mypy outside CI (following them, as its CI does
    for some directories, takes minutes here). The modules are checked in
    the installed vLLM, where their package is."""
    import vllm

    sys.path.insert(0, str(REPO / "tools"))
    from patchset import read_series

    added = [name for commit in read_series() for name in commit.added]
    (tmp_path / "vllm").symlink_to(Path(vllm.__file__).parent)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--python-version", "3.10"]
        + ["--follow-imports", "skip", "--ignore-missing-imports"]
        + ["--check-untyped-defs", *added],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_spdx_header_on_every_python_file():
    missing = []
    for name in run("git", "ls-files", "*.py").stdout.split():
        text = (REPO / name).read_text()
        if text.startswith("#!"):  # a shebang line comes first
            text = text.partition("\n")[2]
        if not text.startswith(SPDX):
            missing.append(name)
    assert not missing, missing
