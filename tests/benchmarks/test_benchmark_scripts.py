# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""The benchmark scripts run on GPUs, not in CI; here each one must at
least import what it uses and parse its options (`--help`), so a helper
renamed in one script cannot leave another broken until the next GPU
session."""

import subprocess
import sys

from tests.conftest import REPO

# The scripts (a helper module such as interleaved_rounds.py has no main).
SCRIPTS = sorted(
    path.name
    for path in (REPO / "benchmarks").glob("*.py")
    if 'if __name__ == "__main__":' in path.read_text()
)

# One interpreter for all of them (vLLM is imported once): each script runs
# as __main__ with --help, from its own directory as `python script.py`
# would, and must exit 0 after printing its usage.
CHECK = """
import os, runpy, sys
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    sys.path.insert(0, os.path.dirname(path))
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as exit:
        if exit.code not in (0, None):
            raise
    print("ok", path, flush=True)
"""


def test_every_benchmark_imports_and_parses_its_options():
    assert "benchmark_torchtitan_qwen3.py" in SCRIPTS
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            CHECK,
            *(str(REPO / "benchmarks" / name) for name in SCRIPTS),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checked = [
        line.split()[-1]
        for line in result.stdout.splitlines()
        if line.startswith("ok ")
    ]
    assert [p.rsplit("/", 1)[-1] for p in checked] == SCRIPTS
    assert result.stdout.count("usage:") == len(SCRIPTS)
