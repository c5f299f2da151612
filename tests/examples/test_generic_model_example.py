# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""The README's demo: a model registered with a lambda under
`if __name__ == "__main__":` reaches vLLM's spawned engine core (which
runs the worker at TP=1); it trains, then generates the text it learnt,
the same tokens as the trainer's own greedy decoding. A lambda reaching
spawned workers at TP=2 is `tiny_engine_tp2`'s (tests/conftest.py); the
README's demo command runs with vLLM's default compilation."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = (
    Path(__file__).resolve().parents[2] / "examples/offline_inference/generic_model.py"
)


@pytest.mark.timeout(600)
def test_demo_registers_under_main_and_generates():
    """Eager, which starts faster: compilation is not what this checks."""
    tp = 1
    # Own session, so that a hung run's engine processes go with it.
    process = subprocess.Popen(
        [
            sys.executable,
            str(EXAMPLE),
            "--tensor-parallel-size",
            str(tp),
            "--enforce-eager",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=580)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(
            f"the demo at TP={tp} did not finish in 580 s; its last "
            f"output:\n{(stdout + stderr)[-4000:]}"
        )
    assert process.returncode == 0, (stdout + stderr)[-4000:]
    loss_before, loss_after = map(
        float, re.search(r"loss ([0-9.]+) -> ([0-9.]+)", stdout).groups()
    )
    assert loss_after < loss_before / 2
    completions = dict(
        line.strip().split(" -> ", 1)
        for line in stdout.splitlines()
        if " -> " in line and "loss" not in line
    )
    assert set(completions) == {
        "'vLLM runs the'",
        "'One definition serves'",
        "'the weights'",
    }
    # trained on one sentence: greedy decoding continues it
    assert "model you trained" in completions["'vLLM runs the'"]
    assert "Same tokens as the trainer's own greedy decoding: 3/3" in stdout
    # vLLM's INFO logs stay out of the demo's output by default
    assert " INFO " not in stdout + stderr
