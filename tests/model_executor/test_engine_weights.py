# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""EngineWeights on a running engine (a small Llama, dummy weights): on
CUDA a push copies the trainer's tensors into the engine's own parameters,
nothing unless every name and shape fits; elsewhere the refusal names the
alternative. (Copy, alias and fp32 masters on a generic model:
tests/models/test_weight_updates.py.)"""

import json

import pytest
import torch

from vllm import LLM, envs
from vllm.model_executor.model_loader.engine_weights import EngineWeights

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


# On CUDA also an engine core in this process, whose worker's parameters
# EngineWeights takes as they are (CUDA IPC cannot open a handle in the
# process that exported it).
@pytest.fixture(
    scope="module",
    params=["own process", "this process"]
    if torch.cuda.is_available()
    else ["own process"],
)
def llm(request, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tiny_llama")
    (model_dir / "config.json").write_text(json.dumps(TINY_LLAMA))
    # an engine core that ran in this process cached vLLM's variables
    envs.disable_envs_cache()
    with pytest.MonkeyPatch.context() as env:  # while the engine runs
        in_process = request.param == "this process"
        env.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0" if in_process else "1")
        env.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model
        engine = LLM(
            model=str(model_dir),
            load_format="dummy",
            skip_tokenizer_init=True,
            enforce_eager=True,
            max_model_len=128,
            kv_cache_memory_bytes=32 << 20,
        )
        yield engine
        engine.llm_engine.engine_core.shutdown()


def checksums(model):
    """Runs in the worker: each parameter's float64 sum, by the names
    EngineWeights uses (the model's inner module's)."""
    module = getattr(model, "model", model)
    return {n: float(p.detach().double().sum()) for n, p in module.named_parameters()}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU engine's message")
def test_a_cpu_engine_is_refused_with_the_alternative(llm):
    with pytest.raises(Exception) as failure:
        EngineWeights(llm)
    assert "needs the engine's weights on CUDA" in str(failure.value)
    assert "SharedWeights" in str(failure.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_push_copies_into_the_engine_and_is_atomic(llm):
    weights = EngineWeights(llm)
    pushed = {name: torch.randn_like(t) for name, t in weights.tensors.items()}
    assert weights.push(pushed) == len(pushed)
    expected = {name: float(t.double().sum()) for name, t in pushed.items()}
    assert llm.apply_model(checksums)[0] == expected

    bad = {name: torch.zeros_like(t) for name, t in weights.tensors.items()}
    name = next(iter(bad))
    bad[name] = bad[name][:1]
    bad["no.such.weight"] = torch.zeros(1, device="cuda")
    with pytest.raises(ValueError, match="2 problem.*nothing was copied"):
        weights.push(bad)
    assert llm.apply_model(checksums)[0] == expected
