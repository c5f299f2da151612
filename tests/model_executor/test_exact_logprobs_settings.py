# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""The exact configuration's settings: what `exact_engine_args` sets and
refuses, the Inductor options that keep eager's rounding, and the
trainer-side helpers on the CPU. (Bitwise parity itself needs CUDA:
tests/models/test_exact_logprobs.py.)"""

import os

import pytest
import torch

from vllm.model_executor.layers.exact_logprobs import (
    ExactLogprobsError,
    exact_engine_args,
    exact_inductor_options,
    prepare_trainer,
    row_invariant_matmuls,
)


@pytest.fixture
def environment(monkeypatch):
    """exact_engine_args sets VLLM_BATCH_INVARIANT in os.environ: setting it
    through monkeypatch first makes monkeypatch restore it after the test
    (later engines must not inherit batch-invariant mode)."""
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "0")


def test_settings_of_the_exact_configuration(environment):
    # by default Inductor on both sides, with the exact options
    args = exact_engine_args(device="cuda", max_model_len=128)
    assert args == {
        "max_model_len": 128,
        "compilation_config": {
            "mode": 3,
            "inductor_compile_config": exact_inductor_options(),
        },
    }
    assert os.environ["VLLM_BATCH_INVARIANT"] == "1"
    compiled = exact_engine_args(
        device="cuda",
        compilation_config={"inductor_compile_config": {"size_asserts": True}},
    )["compilation_config"]
    options = compiled.pop("inductor_compile_config")
    assert compiled == {"mode": 3}
    # the user's option kept, every exact option this torch knows added
    assert options.pop("size_asserts") is True
    assert options == exact_inductor_options()
    assert {"emulate_precision_casts", "combo_kernels"} <= options.keys()
    # no Inductor: asked for, or implied by eager mode or mode 0
    graphs = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}
    assert exact_engine_args(device="cuda", inductor=False) == {
        "compilation_config": graphs
    }
    assert exact_engine_args(device="cuda", compilation_config={"mode": 0}) == {
        "compilation_config": graphs
    }
    eager = exact_engine_args(device="cuda", enforce_eager=True)
    assert eager["compilation_config"] == {"mode": 0, "cudagraph_mode": "NONE"}


@pytest.mark.parametrize(
    "engine_args, message",
    [
        (
            {"inductor": False, "compilation_config": {"mode": 3}},
            "Inductor's generated kernels",
        ),
        (
            {"inductor": False, "compilation_config": {"backend": "inductor"}},
            "pass inductor=True",
        ),
        ({"attention_config": {"backend": "TRITON_ATTN"}}, "backend TRITON_ATTN"),
        ({"inductor": True, "enforce_eager": True}, "drop enforce_eager"),
        (
            {"inductor": True, "attention_config": {"backend": "FLEX_ATTENTION"}},
            "backend FLEX_ATTENTION",
        ),
    ],
)
def test_what_breaks_exactness_is_refused(environment, engine_args, message):
    with pytest.raises(ExactLogprobsError, match=message):
        exact_engine_args(device="cuda", **engine_args)
    assert os.environ["VLLM_BATCH_INVARIANT"] == "0"


def test_the_cpu_is_refused_with_the_reason(environment):
    with pytest.raises(ExactLogprobsError, match="need CUDA.*agree within"):
        exact_engine_args(device="cpu")


def test_trainer_side_needs_the_engine_side(environment):
    with pytest.raises(ExactLogprobsError, match="exact_engine_args"):
        prepare_trainer(torch.nn.Linear(2, 2), llm=None)


def test_exact_inductor_keeps_eagers_rounding_of_a_residual_add():
    """Inductor folds `F.linear(x, w) + residual` into one addmm (one
    rounding where eager rounds twice: 787 of these 8,192 elements differ,
    torch 2.13 CPU) depending on where its graph ends, which differs
    between the trainer's graphs and the engine's. With the exact options
    the compiled block computes eager's values bit for bit."""

    def block(x, weight, residual):
        return torch.nn.functional.linear(x, weight) + residual

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=generator).bfloat16()
    weight = (torch.randn(128, 256, generator=generator) * 0.05).bfloat16()
    residual = (torch.randn(64, 128, generator=generator) * 8).bfloat16()
    compiled = torch.compile(block, options=exact_inductor_options())
    assert torch.equal(compiled(x, weight, residual), block(x, weight, residual))


def test_row_invariant_matmuls_leave_the_cpu_alone():
    x, weight = torch.randn(5, 8), torch.randn(3, 8)
    with row_invariant_matmuls():
        out = torch.nn.functional.linear(x, weight)
    assert torch.equal(out, torch.nn.functional.linear(x, weight))
