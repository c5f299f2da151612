# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""One model definition, two modes: the logits vLLM computes with its paged
KV cache equal the training-mode forward of the same module on the same
tokens, and greedy generation equals step-by-step recomputation."""

import copy

import pytest
import torch

from tests.conftest import (
    PROMPTS,
    greedy_recompute,
    greedy_tokens,
    logits_and_tokens,
    run_llm,
    training_forward,
    vllm_logits_and_tokens,
)
from tests.models.tiny_decoder import ARCH


@pytest.fixture(scope="module")
def served(tiny_checkpoint, tiny_engine):
    _, model = tiny_checkpoint
    return logits_and_tokens(tiny_engine, PROMPTS, model.lm_head.out_features)


def test_prefill_logits_equal_training_forward(tiny_checkpoint, served):
    _, model = tiny_checkpoint
    logits, _ = served
    trained = training_forward(model, PROMPTS)
    for got, want in zip(logits, trained):
        # vLLM's row i is the distribution after prompt[:i+1]
        torch.testing.assert_close(got, want[:-1], atol=1e-4, rtol=0)


def test_greedy_generation_equals_recomputation(served, tiny_reference_tokens):
    _, generated = served
    assert generated == tiny_reference_tokens


def test_prefix_caching_and_chunked_prefill_keep_tokens(tiny_checkpoint, tiny_engine):
    """The shared engine caches prefixes (vLLM's default); an engine without
    prefix caching, prefilling in 64-token chunks, gives the same tokens."""
    path, _ = tiny_checkpoint
    shared = list(range(1, 200))  # spans several KV blocks
    prompts = [shared + [7], shared + [8, 9], shared, shared + [7]]
    assert tiny_engine.llm_engine.vllm_config.cache_config.enable_prefix_caching
    cached = greedy_tokens(tiny_engine, prompts, max_tokens=16)
    uncached_chunked = run_llm(
        path,
        ARCH,
        prompts=prompts,
        max_tokens=16,
        enable_prefix_caching=False,
        max_num_batched_tokens=64,
        enable_chunked_prefill=True,
    )
    assert cached == uncached_chunked
    assert cached[0] == cached[3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fa_version", [2, 3])
def test_cuda_bf16_flash_attn_parity(tiny_checkpoint, fa_version):
    """bf16 on the GPU with vLLM's FLASH_ATTN backend (FA2 and FA3) against
    the training path (FA2 varlen) of the same module."""
    from tests.models.tiny_decoder import build_tiny_decoder
    from vllm import ModelRegistry

    path, model = tiny_checkpoint
    ModelRegistry.register_model(ARCH, build_tiny_decoder)
    attention_config = {"backend": "FLASH_ATTN", "flash_attn_version": fa_version}
    logits, generated = vllm_logits_and_tokens(
        path,
        PROMPTS,
        model.lm_head.out_features,
        dtype="bfloat16",
        attention_config=attention_config,
    )
    model = copy.deepcopy(model).to("cuda", torch.bfloat16)
    trained = training_forward(model, PROMPTS)
    worst = max(
        (got - want[:-1]).abs().max().item()
        for got, want in zip(logits, trained)
        if len(got)
    )
    expected = [greedy_recompute(model, p, 32) for p in PROMPTS]
    same = sum(g == e for g, e in zip(generated, expected))
    print(
        f"FA{fa_version}: max |logit diff| {worst:.3e}; greedy "
        f"sequences identical {same}/{len(PROMPTS)}"
    )
    assert worst < 0.1
    assert same >= len(PROMPTS) - 1


@pytest.mark.timeout(300)
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU backend limits")
def test_unsupported_head_dim_is_named(tmp_path, engine_output):
    """The CPU attention backend has no kernel for head_dim 16: the error
    names the layer, the head size and what the backend supports."""
    from tests.models.tiny_decoder import (
        TinyConfig,
        build_tiny_decoder,
        write_checkpoint,
    )
    from vllm import ModelRegistry

    write_checkpoint(tmp_path, TinyConfig(head_dim=16), arch="TinyHeadDim16")
    ModelRegistry.register_model("TinyHeadDim16", build_tiny_decoder)
    with pytest.raises(Exception) as failure:
        run_llm(tmp_path, "TinyHeadDim16")
    output = engine_output(failure)
    assert "model.layers.0.attn.attn.vllm_attention: " in output
    assert (
        "head_dim 16 is not supported by vLLM's" in output
        or "vLLM found no attention backend for TrainableFlashAttention("
        "num_heads=4, num_kv_heads=2, head_dim=16"
        in output
    ), output[-3000:]
