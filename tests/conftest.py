# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
import gc
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

# Spawned vLLM processes and the registry's inspection subprocess import
# test modules by name (e.g. "tests.models.tiny_decoder:build_tiny_decoder").
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                   if p])
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [100, 200, 300, 400, 500, 17, 23],
           [42]]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from tests.models.tiny_decoder import write_checkpoint
    path = tmp_path_factory.mktemp("tiny_decoder")
    model = write_checkpoint(path)
    return path, model


# Each engine reserves this fraction of the machine's memory for its KV
# cache on the CPU; small, so engines of consecutive tests fit side by side.
MEMORY_FRACTION = 0.1


def shutdown_llm(llm) -> None:
    """Stop the engine's processes now: `del llm` leaves that to garbage
    collection, and a later test's engine may start before they are gone."""
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def make_llm(model_dir, arch=None, tensor_parallel_size=1, **kwargs):
    """A real vLLM engine on a test checkpoint: token-id prompts, fp32
    unless `dtype` says otherwise, a small KV cache."""
    from vllm import LLM
    if tensor_parallel_size > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    kwargs.setdefault("dtype", "float32")
    return LLM(model=str(model_dir),
               hf_overrides={"architectures": [arch]} if arch else None,
               skip_tokenizer_init=True,
               gpu_memory_utilization=MEMORY_FRACTION, max_model_len=512,
               tensor_parallel_size=tensor_parallel_size, seed=0, **kwargs)


def run_llm(model_dir, arch=None, prompts=PROMPTS, max_tokens=16,
            inspect=None, **kwargs):
    """Greedy token ids of `prompts` from a real vLLM engine, and the
    results of `inspect(model)` in each worker when given."""
    from vllm import SamplingParams
    llm = make_llm(model_dir, arch, **kwargs)
    try:
        outputs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            SamplingParams(max_tokens=max_tokens, temperature=0.0,
                           ignore_eos=True, detokenize=False),
            use_tqdm=False)
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
        inspected = llm.apply_model(inspect) if inspect else None
    finally:
        shutdown_llm(llm)
    return (tokens, inspected) if inspect else tokens


def vllm_logits_and_tokens(model_dir, prompts, vocab_size, max_tokens=32,
                           **kwargs):
    """From one real engine: the raw logits vLLM computes at every prompt
    position (float64 `[len(prompt) - 1, vocab]` per prompt), and greedy
    continuations of `max_tokens` tokens."""
    llm = make_llm(model_dir, max_logprobs=vocab_size,
                   logprobs_mode="raw_logits", **kwargs)
    try:
        return logits_and_tokens(llm, prompts, vocab_size, max_tokens)
    finally:
        shutdown_llm(llm)


def logits_and_tokens(llm, prompts, vocab_size, max_tokens=32):
    """`vllm_logits_and_tokens` from a running engine made by `make_llm(...,
    max_logprobs=vocab_size, logprobs_mode="raw_logits")`."""
    from vllm import SamplingParams
    outputs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(max_tokens=max_tokens, temperature=0.0,
                       ignore_eos=True, prompt_logprobs=vocab_size,
                       detokenize=False), use_tqdm=False)
    logits = []
    for output in outputs:
        # entry i scores prompt[i] given prompt[:i]; entry 0 is None
        rows = []
        for entry in output.prompt_logprobs[1:]:
            row = torch.full((vocab_size, ), float("nan"), dtype=torch.float64)
            for token, logprob in entry.items():
                row[token] = logprob.logprob
            rows.append(row)
        logits.append(torch.stack(rows) if rows else torch.empty(
            0, vocab_size, dtype=torch.float64))
    return logits, [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture
def allow_apply_model(monkeypatch):
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


def cuda_available() -> bool:
    return torch.cuda.is_available()
