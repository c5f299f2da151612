# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""SplitResidualAddmmPass: a residual add folded into its GEMM by Inductor
(`addmm` with a full-size addend) comes out again as `mm` + `add`."""

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from vllm.compilation.passes.utility.split_residual_addmm import (
    SplitResidualAddmmPass,
)


def residual_block(x, weight, residual):
    return torch.nn.functional.linear(x, weight) + residual


def biased_linear(x, weight, bias):
    return torch.nn.functional.linear(x, weight, bias)


def compile_and_run(fn, *args, split: bool):
    torch._dynamo.reset()
    options = {"post_grad_custom_post_pass": SplitResidualAddmmPass()} if split else {}
    out, code = run_and_get_code(torch.compile(fn, options=options), *args)
    return out, "\n".join(code)


@pytest.fixture(scope="module")
def bf16_inputs():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=generator).bfloat16()
    weight = (torch.randn(128, 256, generator=generator) * 0.05).bfloat16()
    residual = (torch.randn(64, 128, generator=generator) * 8).bfloat16()
    return x, weight, residual


def test_residual_add_leaves_the_gemm_and_keeps_eagers_rounding(bf16_inputs):
    """The sum leaves the graph, as the residual stream leaves each piece of
    vLLM's split graph: Inductor folds it into addmm (one rounding, 805 of
    8,192 elements off eager, torch 2.13 CPU); with the pass the GEMM is a
    plain mm and the compiled block equals eager bit for bit."""
    eager = residual_block(*bf16_inputs)
    folded, folded_code = compile_and_run(residual_block, *bf16_inputs, split=False)
    assert "addmm" in folded_code  # what the pass undoes, still done by Inductor
    assert not torch.equal(folded, eager)

    split, split_code = compile_and_run(residual_block, *bf16_inputs, split=True)
    assert "addmm" not in split_code
    assert torch.equal(split, eager)


def test_a_broadcast_bias_stays_in_the_gemm(bf16_inputs):
    x, weight, _ = bf16_inputs
    bias = torch.randn(128).bfloat16()
    eager = biased_linear(x, weight, bias)
    out, code = compile_and_run(biased_linear, x, weight, bias, split=True)
    assert "addmm" in code
    assert torch.allclose(out.float(), eager.float(), atol=0.05)


def test_the_pass_has_a_stable_cache_key():
    """Inductor's code cache and vLLM's compile cache key on uuid()."""
    assert SplitResidualAddmmPass().uuid() == SplitResidualAddmmPass().uuid()
