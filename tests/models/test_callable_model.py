# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Every registration form runs through the real engine (spawned engine
core and workers) and gives the same greedy tokens as the model class."""

import functools

import pytest

from tests.conftest import run_llm
from tests.models.tiny_decoder import (TinyConfig, TinyDecoder,
                                       build_tiny_decoder)
from vllm import ModelRegistry


class CallableFactory:
    """A callable object as a factory."""

    def __call__(self, vllm_config, parallel_context):
        return build_tiny_decoder(vllm_config, parallel_context)


def factory_with_options(vllm_config, parallel_context, *, scale):
    assert scale == 1.0
    return build_tiny_decoder(vllm_config, parallel_context)


def make_closure():
    captured = TinyConfig

    def build(vllm_config, parallel_context):
        config = captured.from_hf(vllm_config.model_config.hf_config)
        return TinyDecoder(config, parallel_context)

    return build


REGISTRATIONS = {
    "module_string_factory": "tests.models.tiny_decoder:build_tiny_decoder",
    "function": build_tiny_decoder,
    "lambda": lambda vllm_config, parallel_context: build_tiny_decoder(
        vllm_config, parallel_context),
    "closure": make_closure(),
    "callable_object": CallableFactory(),
    "partial": functools.partial(factory_with_options, scale=1.0),
}


@pytest.fixture(scope="module")
def class_tokens(tiny_checkpoint):
    """The reference: the model written as a vLLM class, registered as a
    "module:Class" string (stock vLLM behaviour)."""
    path, _ = tiny_checkpoint
    ModelRegistry.register_model(
        "TinyAsClassString",
        "tests.models.tiny_decoder:TinyDecoderForCausalLM")
    return run_llm(path, "TinyAsClassString")


def test_class_registration(tiny_checkpoint, class_tokens):
    from tests.models.tiny_decoder import TinyDecoderForCausalLM
    path, _ = tiny_checkpoint
    ModelRegistry.register_model("TinyAsClass", TinyDecoderForCausalLM)
    tokens = run_llm(path, "TinyAsClass")
    assert tokens == class_tokens
    assert all(len(t) == 16 for t in tokens)
    # a random model still has to say something other than one token
    assert len({tok for seq in tokens for tok in seq}) > 4


@pytest.mark.parametrize("form", list(REGISTRATIONS))
def test_factory_registration_matches_class(tiny_checkpoint, class_tokens,
                                            form):
    path, _ = tiny_checkpoint
    arch = f"Tiny_{form}"
    ModelRegistry.register_model(arch, REGISTRATIONS[form])
    assert run_llm(path, arch) == class_tokens


def _shard_info(model):
    """Runs in each worker: what the factory built there."""
    layer = model.model.layers[0]
    return (model.parallel_context.tp_rank, model.parallel_context.tp_size,
            list(layer.attn.q_proj.weight.shape),
            list(layer.mlp.down_proj.weight.shape))


def test_lambda_tensor_parallel_matches_tp1(tiny_checkpoint, class_tokens,
                                            allow_apply_model):
    path, _ = tiny_checkpoint
    config = TinyConfig()
    ModelRegistry.register_model(
        "TinyLambdaTP",
        lambda vllm_config, parallel_context: build_tiny_decoder(
            vllm_config, parallel_context))
    tokens, shards = run_llm(path, "TinyLambdaTP", tensor_parallel_size=2,
                             inspect=_shard_info)
    assert tokens == class_tokens
    q_rows = config.num_attention_heads * config.head_dim // 2
    assert sorted(list(s) for s in shards) == [
        [rank, 2, [q_rows, config.hidden_size],
         [config.hidden_size, config.intermediate_size // 2]]
        for rank in (0, 1)
    ]
