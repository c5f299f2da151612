# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""One model definition, two modes: the logits vLLM computes with its paged
KV cache equal the training-mode forward of the same module on the same
tokens, and greedy generation equals step-by-step recomputation."""

import pytest
import torch

from tests.conftest import run_llm
from tests.models.tiny_decoder import ARCH

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [100, 200, 300, 400, 500, 17, 23],
           [42], list(range(300, 340))]


def training_forward(model, prompts):
    """Log-probs at every position of every prompt, all prompts packed into
    one varlen batch, through the training path."""
    lengths = [len(p) for p in prompts]
    input_ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.cat([torch.arange(n) for n in lengths])
    cu_seqlens = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(
        0, dtype=torch.int32)
    with torch.no_grad():
        hidden = model(input_ids, positions, cu_seqlens=cu_seqlens)
        logprobs = torch.log_softmax(model.compute_logits(hidden).double(),
                                     -1)
    return logprobs.split(lengths)


def greedy_recompute(model, prompt, max_tokens):
    """Greedy decoding by re-running the whole sequence each step."""
    tokens = list(prompt)
    for _ in range(max_tokens):
        logprobs = training_forward(model, [tokens])[0]
        tokens.append(int(logprobs[-1].argmax()))
    return tokens[len(prompt):]


def vllm_prompt_logprobs(model_dir, prompts, vocab_size):
    from vllm import LLM, SamplingParams
    llm = LLM(model=str(model_dir), skip_tokenizer_init=True,
              dtype="float32", gpu_memory_utilization=0.3, max_model_len=512,
              max_logprobs=vocab_size, seed=0)
    try:
        outputs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            SamplingParams(max_tokens=1, prompt_logprobs=vocab_size,
                           detokenize=False), use_tqdm=False)
    finally:
        del llm
    result = []
    for prompt, output in zip(prompts, outputs):
        # position i holds log p(prompt[i] | prompt[:i]); position 0 is None
        rows = []
        for entry in output.prompt_logprobs[1:]:
            row = torch.full((vocab_size, ), float("nan"), dtype=torch.float64)
            for token, logprob in entry.items():
                row[token] = logprob.logprob
            rows.append(row)
        result.append(torch.stack(rows) if rows else torch.empty(
            0, vocab_size, dtype=torch.float64))
    return result


def test_prefill_logits_equal_training_forward(tiny_checkpoint):
    from vllm import ModelRegistry
    from tests.models.tiny_decoder import build_tiny_decoder
    path, model = tiny_checkpoint
    ModelRegistry.register_model(ARCH, build_tiny_decoder)
    vocab = model.lm_head.out_features
    served = vllm_prompt_logprobs(path, PROMPTS, vocab)
    trained = training_forward(model, PROMPTS)
    for got, want in zip(served, trained):
        # vLLM's row i is the distribution after prompt[:i+1]
        torch.testing.assert_close(got, want[:-1], atol=1e-4, rtol=0)


def test_greedy_generation_equals_recomputation(tiny_checkpoint):
    from vllm import ModelRegistry
    from tests.models.tiny_decoder import build_tiny_decoder
    path, model = tiny_checkpoint
    ModelRegistry.register_model(ARCH, build_tiny_decoder)
    generated = run_llm(path, ARCH, prompts=PROMPTS, max_tokens=32)
    expected = [greedy_recompute(model, p, 32) for p in PROMPTS]
    assert generated == expected


def test_prefix_caching_and_chunked_prefill_keep_tokens(tiny_checkpoint):
    from vllm import ModelRegistry
    from tests.models.tiny_decoder import build_tiny_decoder
    path, _ = tiny_checkpoint
    ModelRegistry.register_model(ARCH, build_tiny_decoder)
    shared = list(range(1, 200))  # spans several KV blocks
    prompts = [shared + [7], shared + [8, 9], shared, shared + [7]]
    cached = run_llm(path, ARCH, prompts=prompts, max_tokens=16,
                     enable_prefix_caching=True)
    uncached_chunked = run_llm(path, ARCH, prompts=prompts, max_tokens=16,
                               enable_prefix_caching=False,
                               max_num_batched_tokens=64,
                               enable_chunked_prefill=True)
    assert cached == uncached_chunked
    assert cached[0] == cached[3]
