# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""The gates vLLM's pre-commit runs on a pull request, over this
repository's files: ruff lint and format with vLLM's settings (ruff.toml),
typos, and the SPDX header on every Python file."""

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


def test_spdx_header_on_every_python_file():
    missing = []
    for name in run("git", "ls-files", "*.py").stdout.split():
        text = (REPO / name).read_text()
        if text.startswith("#!"):  # a shebang line comes first
            text = text.partition("\n")[2]
        if not text.startswith(SPDX):
            missing.append(name)
    assert not missing, missing
