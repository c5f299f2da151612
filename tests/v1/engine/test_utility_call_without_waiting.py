# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""A utility call sent to a multiprocess engine core without waiting for
its reply runs before the requests sent after it: a prefix-cache reset
sent that way leaves the next request nothing to hit."""

import json

import pytest

from vllm import LLM, SamplingParams, envs

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 64,  # the CPU attention backend's smallest
    "num_hidden_layers": 1,
    "vocab_size": 256,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "torch_dtype": "float32",
}


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tiny_llama")
    (model_dir / "config.json").write_text(json.dumps(TINY_LLAMA))
    # an engine core that ran in this process cached vLLM's variables
    envs.disable_envs_cache()
    with pytest.MonkeyPatch.context() as env:  # for this start only
        env.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
        engine = LLM(
            model=str(model_dir),
            load_format="dummy",
            skip_tokenizer_init=True,
            enforce_eager=True,
            enable_prefix_caching=True,
            block_size=32,  # the CPU attention backend takes multiples of 32
            max_model_len=128,
            kv_cache_memory_bytes=32 << 20,
        )
    yield engine
    engine.llm_engine.engine_core.shutdown()


def test_reset_without_waiting_lands_before_the_next_request(llm):
    prompt = {"prompt_token_ids": list(range(1, 97))}  # three blocks
    params = SamplingParams(max_tokens=1)
    llm.generate(prompt, params, use_tqdm=False)
    assert llm.generate(prompt, params, use_tqdm=False)[0].num_cached_tokens > 0

    reply = llm.llm_engine.engine_core.call_utility_nowait("reset_prefix_cache")
    assert llm.generate(prompt, params, use_tqdm=False)[0].num_cached_tokens == 0
    assert reply.result(timeout=60) is True
