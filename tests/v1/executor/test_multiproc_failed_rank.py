# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""A collective RPC that fails on one worker reads every worker's reply
before raising, so the next call gets its own replies. Raising at the
first failed rank left the later ranks' replies in their queues, where
the next call read them as its own."""

import json
import os

import pytest

from vllm import LLM, envs

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


def fail_on_rank_zero(worker):
    if worker.rpc_rank == 0:
        raise ValueError("rank 0 refuses")
    return "a reply to the failed call"


def rank_of(worker):
    return worker.rpc_rank


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tiny_llama")
    (model_dir / "config.json").write_text(json.dumps(TINY_LLAMA))
    # an engine core that ran in this process cached vLLM's variables
    envs.disable_envs_cache()
    with pytest.MonkeyPatch.context() as env:  # for this start only
        env.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        env.setenv(
            "VLLM_CPU_OMP_THREADS_BIND",
            "|".join(str(rank % (os.cpu_count() or 1)) for rank in range(2)),
        )
        engine = LLM(
            model=str(model_dir),
            load_format="dummy",
            skip_tokenizer_init=True,
            tensor_parallel_size=2,
            distributed_executor_backend="mp",
            enforce_eager=True,
            max_model_len=128,
            kv_cache_memory_bytes=32 << 20,
        )
    yield engine
    engine.llm_engine.engine_core.shutdown()


def test_next_call_gets_its_own_replies_after_a_failed_rank(llm):
    with pytest.raises(RuntimeError, match="rank 0 refuses"):
        llm.collective_rpc(fail_on_rank_zero)
    # before the fix: rank 1's reply to the failed call came back here
    assert llm.collective_rpc(rank_of) == [0, 1]
    assert llm.collective_rpc(rank_of) == [0, 1]
