# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Weights pushed from a trainer into a running engine: an update names
only what changes, full tensors are cut to each TP rank, and a bad update
changes nothing. (The loader on a module alone:
tests/models/test_load_weights_by_name.py.)"""

import copy
import functools

import pytest
import torch

from tests.conftest import (
    PROMPTS,
    fused_projections,
    greedy_recompute,
    logits_and_tokens,
    training_forward,
    with_update,
)
from tests.conftest import push_weights as push
from tests.models.tiny_decoder import ShardedLinear, TinyDecoder

# What one optimiser step of a trainer that fine-tunes the second block and
# the LM head would send.
UPDATED = (
    "layers.1.attn.q_proj.weight",
    "layers.1.attn.o_proj.weight",
    "layers.1.mlp.down_proj.weight",
    "lm_head.weight",
)


def trained(model: TinyDecoder, seed: int = 1) -> dict[str, torch.Tensor]:
    """New values for the UPDATED parameters: the old ones, moved."""
    generator = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    return {
        name: state[name] + 0.05 * torch.randn(state[name].shape, generator=generator)
        for name in UPDATED
    }


# --------------------------------------------- running engines, TP=1 and 2


@pytest.mark.parametrize("engine_fixture", ["tiny_engine", "tiny_engine_tp2"])
def test_update_reaches_running_engine(request, tiny_checkpoint, engine_fixture):
    """Push part of the weights, reset the prefix cache, and vLLM computes
    the updated model's logits; a bad update after it raises and leaves the
    engine serving the same weights; pushing the old values restores them."""
    llm = request.getfixturevalue(engine_fixture)
    _, model = tiny_checkpoint
    vocab = model.lm_head.out_features
    update = trained(model)
    old = {name: model.state_dict()[name].clone() for name in UPDATED}
    updated_model = with_update(model, update)

    loaded = llm.apply_model(functools.partial(push, weights=update))
    try:
        llm.reset_prefix_cache()  # KV computed with the old weights
        after, _ = logits_and_tokens(llm, PROMPTS, vocab)
        bad = dict(update, **{"lm_head.weight": torch.zeros(3, 3)})
        with pytest.raises(Exception, match="nothing was changed"):
            llm.apply_model(functools.partial(push, weights=bad))
        after_bad, _ = logits_and_tokens(llm, PROMPTS, vocab)
    finally:
        llm.apply_model(functools.partial(push, weights=old))
        llm.reset_prefix_cache()
    restored, _ = logits_and_tokens(llm, PROMPTS, vocab)

    # each worker loaded exactly the names sent (its shard of each), into
    # q_proj's rows of the declared q/k/v group's GEMM
    assert loaded == [[f"model.{name}" for name in sorted(UPDATED)]] * len(loaded)
    assert fused_projections(llm) == [
        [tuple(f"layers.{i}.attn.{p}_proj" for p in "qkv") for i in range(2)]
    ] * len(loaded)
    for got, want in zip(after, training_forward(updated_model, PROMPTS)):
        torch.testing.assert_close(got, want[:-1], atol=1e-4, rtol=0)
    for got, want in zip(after_bad, after):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    for got, want in zip(restored, training_forward(model, PROMPTS)):
        torch.testing.assert_close(got, want[:-1], atol=1e-4, rtol=0)
    assert (torch.cat(after) - torch.cat(restored)).abs().max() > 1e-2


def test_update_while_a_request_is_running(
    tiny_engine, tiny_checkpoint, tiny_reference_tokens
):
    """An update that arrives while a request is running: the request goes
    on, and each of its tokens is the old model's up to the engine step the
    update lands at and the new model's after it (the update changes only
    the LM head, so the KV the old weights wrote is the new model's too, and
    each token can be checked exactly)."""
    from tests.conftest import MAX_TOKENS, greedy_tokens
    from vllm import SamplingParams

    _, model = tiny_checkpoint
    prompt = PROMPTS[4]
    old_head = model.lm_head.weight.detach().clone()
    update = {"lm_head.weight": old_head.roll(1, dims=0)}  # token t -> t+1
    updated_model = with_update(model, update)

    engine = tiny_engine.llm_engine
    engine.add_request(
        "in-flight",
        {"prompt_token_ids": prompt},
        SamplingParams(
            max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, detokenize=False
        ),
    )
    before = []
    while len(before) < 8:
        for output in engine.step():
            before = list(output.outputs[0].token_ids)
    tiny_engine.apply_model(functools.partial(push, weights=update))
    try:
        final = None
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    final = list(output.outputs[0].token_ids)
        tiny_engine.reset_prefix_cache()
        fresh = greedy_tokens(tiny_engine, [prompt])[0]
    finally:
        tiny_engine.apply_model(
            functools.partial(push, weights={"lm_head.weight": old_head})
        )
        tiny_engine.reset_prefix_cache()

    # The engine core runs its steps on its own and takes the update
    # between two of them, possibly a step or two after `apply_model` was
    # called: the old model's tokens up to some switch point, the new
    # model's from there on.
    old = tiny_reference_tokens[4]
    assert before == old[: len(before)]
    switch = next(i for i, (a, b) in enumerate(zip(final, old)) if a != b)
    assert len(before) <= switch < MAX_TOKENS
    expected = final[:switch]
    while len(expected) < MAX_TOKENS:
        logits = training_forward(updated_model, [prompt + expected])[0]
        expected.append(int(logits[-1].argmax()))
    assert final == expected
    assert fresh == greedy_recompute(updated_model, prompt)


def test_push_into_async_engine_while_it_generates(tiny_checkpoint):
    """`AsyncLLM`: a `SharedWeights` push awaited while a request streams
    lands between two engine steps; the request's tokens are the old
    model's up to that step and the updated model's after it (the update
    changes only the LM head, so each token is checked exactly)."""
    import asyncio

    from tests.conftest import KV_CACHE_BYTES, engine_environment
    from tests.models.tiny_decoder import ARCH, build_tiny_decoder
    from vllm import ModelRegistry, SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.model_executor.model_loader.shared_weights import SharedWeights
    from vllm.v1.engine.async_llm import AsyncLLM

    path, model = tiny_checkpoint
    ModelRegistry.register_model(ARCH, build_tiny_decoder)
    prompt, max_tokens = PROMPTS[4], 160  # long enough to outlast the push
    update = {"lm_head.weight": model.lm_head.weight.detach().roll(1, dims=0)}
    params = SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False
    )

    async def generate_and_push():
        args = AsyncEngineArgs(
            model=str(path),
            skip_tokenizer_init=True,
            kv_cache_memory_bytes=KV_CACHE_BYTES,
            max_model_len=512,
            dtype="float32",
            enforce_eager=True,
            seed=0,
        )
        with engine_environment({"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}):
            engine = AsyncLLM.from_engine_args(args)
        try:
            with SharedWeights(update) as shared:
                tokens, seen_before_push, loaded = [], None, None
                stream = engine.generate({"prompt_token_ids": prompt}, params, "r")
                async for output in stream:
                    tokens = list(output.outputs[0].token_ids)
                    if seen_before_push is None and len(tokens) >= 8:
                        seen_before_push = len(tokens)
                        loaded = await shared.push_async(engine, update)
                return tokens, seen_before_push, loaded
        finally:
            engine.shutdown()

    tokens, seen_before_push, loaded = asyncio.run(generate_and_push())
    assert loaded == 1 and len(tokens) == max_tokens
    old = greedy_recompute(model, prompt, max_tokens)
    switch = next(i for i, (a, b) in enumerate(zip(tokens, old)) if a != b)
    assert seen_before_push <= switch < max_tokens
    updated_model = with_update(model, update)
    expected = tokens[:switch]
    while len(expected) < max_tokens:
        logits = training_forward(updated_model, [prompt + expected])[0]
        expected.append(int(logits[-1].argmax()))
    assert tokens == expected


# ------------------------------------- pushes through shared memory (plan)


@pytest.mark.parametrize("engine_fixture", ["tiny_engine", "tiny_engine_tp2"])
def test_planned_push_reaches_running_engine(request, tiny_checkpoint, engine_fixture):
    """SharedWeights into a running engine (TP=1: plain copies; TP=2: each
    rank cuts its shards through load_weights): the whole model, then a part
    of it, then the old weights back; vLLM computes each pushed model's
    logits."""
    from vllm.model_executor.model_loader.shared_weights import SharedWeights

    llm = request.getfixturevalue(engine_fixture)
    _, model = tiny_checkpoint
    vocab = model.lm_head.out_features
    updated_model = with_update(model, trained(model))
    old_head = {"lm_head.weight": model.lm_head.weight.detach().clone()}
    with SharedWeights(model) as shared:
        try:
            loaded = shared(llm, updated_model)
            after, _ = logits_and_tokens(llm, PROMPTS, vocab)
            shared.pack(model)
            partially = shared(llm, names=["lm_head.weight"])
            after_part, _ = logits_and_tokens(llm, PROMPTS, vocab)
        finally:
            shared(llm, model)
        restored, _ = logits_and_tokens(llm, PROMPTS, vocab)
        direct = llm.apply_model(_copied_directly)

    assert loaded == len(list(model.parameters())) and partially == 1
    # after the first push, tensors that a weight_loader stored whole (TP=1)
    # are copied directly; a TP=2 rank keeps cutting its shards
    names = {name for name, _ in model.named_parameters()}
    sharded = {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, ShardedLinear)
    }
    assert sharded
    if engine_fixture == "tiny_engine":
        assert direct == [names]
    else:
        assert all(copied & sharded == set() for copied in direct)
    expected = (
        (after, updated_model),
        (after_part, with_update(updated_model, old_head)),
        (restored, model),
    )
    for got_all, reference in expected:
        for got, want in zip(got_all, training_forward(reference, PROMPTS)):
            torch.testing.assert_close(got, want[:-1], atol=1e-4, rtol=0)
    assert (torch.cat(after) - torch.cat(restored)).abs().max() > 1e-2


def test_aliased_trainer_pushes_without_packing(tiny_engine, tiny_checkpoint):
    """`SharedWeights.alias`: the trainer's parameters become the buffer's
    views, so an in-place optimiser step writes the buffer and the push has
    nothing to pack; the engine computes the updated module."""
    from vllm.model_executor.model_loader.shared_weights import SharedWeights

    _, model = tiny_checkpoint
    trainer = copy.deepcopy(model)
    vocab = model.lm_head.out_features
    with SharedWeights(trainer) as shared:
        assert shared.alias(trainer) == {}
        assert all(
            param.data_ptr() == shared.views[name].data_ptr()
            for name, param in trainer.named_parameters()
        )
        generator = torch.Generator().manual_seed(3)
        for param in trainer.parameters():
            param.grad = torch.randn(param.shape, generator=generator)
        torch.optim.SGD(trainer.parameters(), lr=0.05).step()  # into the buffer
        want = training_forward(trainer, PROMPTS)
        try:
            shared(tiny_engine, trainer)  # every slot aliased: nothing packed
            after, _ = logits_and_tokens(tiny_engine, PROMPTS, vocab)
        finally:
            shared(tiny_engine, model)
        wider = SharedWeights(trainer, dtype=torch.bfloat16)
        left = wider.alias(trainer)
        wider.close()
    for got, reference in zip(after, want):
        torch.testing.assert_close(got, reference[:-1], atol=1e-4, rtol=0)
    before = [logits[:-1] for logits in training_forward(model, PROMPTS)]
    assert (torch.cat(after) - torch.cat(before)).abs().max() > 1e-2
    # a bf16 buffer cannot hold fp32 parameters: each is left, with why
    assert left.keys() == {name for name, _ in trainer.named_parameters()}
    assert "torch.bfloat16" in left["lm_head.weight"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_planned_push_through_device_buffer(tiny_checkpoint):
    """The buffer in the trainer's GPU memory, opened by each worker by
    CUDA IPC once: pushes of the whole model and of a part reach the
    engine's parameters exactly (bf16), and the old weights go back."""
    from tests.conftest import make_llm, shutdown_llm
    from tests.models.tiny_decoder import ARCH, build_tiny_decoder
    from vllm import ModelRegistry
    from vllm.model_executor.model_loader.shared_weights import SharedWeights

    path, model = tiny_checkpoint
    ModelRegistry.register_model(ARCH, build_tiny_decoder)
    trainer = copy.deepcopy(model).to("cuda", torch.bfloat16)
    updated = with_update(model, trained(model)).to("cuda", torch.bfloat16)
    llm = make_llm(path, ARCH, spawn_workers=True, dtype="bfloat16")
    try:
        with SharedWeights(trainer, device="cuda") as shared:
            assert shared(llm, updated) == len(list(model.parameters()))
            after = llm.apply_model(_checksums)[0]
            shared.pack(trainer)
            assert shared(llm, names=["lm_head.weight"]) == 1
            after_part = llm.apply_model(_checksums)[0]
    finally:
        shutdown_llm(llm)
    assert after == _checksums(updated)
    assert after_part == dict(
        _checksums(updated), **{"lm_head.weight": _checksums(trainer)["lm_head.weight"]}
    )


def test_engine_weights_need_cuda_and_name_the_alternative(tiny_engine):
    """EngineWeights opens the engine's parameters by CUDA IPC; a CPU
    engine's refusal says what to use instead."""
    from vllm.model_executor.model_loader.engine_weights import EngineWeights

    if torch.cuda.is_available():
        pytest.skip("checks the message of a CPU engine")
    with pytest.raises(Exception) as excinfo:
        EngineWeights(tiny_engine)
    message = str(excinfo.value)
    assert "needs the engine's weights on CUDA" in message
    assert "SharedWeights" in message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_engine_weights_copy_and_alias(tiny_checkpoint):
    """The engine's parameters opened in the trainer's process: a push is
    one batched copy (a bad one changes nothing); after `alias` the
    trainer's in-place updates are the engine's weights; fp32 master
    weights are cast by the copy."""
    from tests.conftest import make_llm, shutdown_llm
    from tests.models.tiny_decoder import ARCH, build_tiny_decoder
    from vllm import ModelRegistry
    from vllm.model_executor.model_loader.engine_weights import EngineWeights

    path, model = tiny_checkpoint
    ModelRegistry.register_model(ARCH, build_tiny_decoder)
    count = len(list(model.parameters()))
    trainer = copy.deepcopy(model).to("cuda", torch.bfloat16)
    updated = with_update(model, trained(model)).to("cuda", torch.bfloat16)
    llm = make_llm(path, ARCH, spawn_workers=True, dtype="bfloat16")
    try:
        weights = EngineWeights(llm)
        assert weights.push(updated) == count
        assert llm.apply_model(_checksums)[0] == _checksums(updated)
        assert weights.push(trainer, names=["lm_head.weight"]) == 1
        head = {"lm_head.weight": _checksums(trainer)["lm_head.weight"]}
        assert llm.apply_model(_checksums)[0] == dict(_checksums(updated), **head)
        bad = dict(trainer.state_dict())
        bad["norm.weight"] = torch.zeros(3, device="cuda", dtype=torch.bfloat16)
        before = llm.apply_model(_checksums)[0]
        with pytest.raises(ValueError, match=r"norm.weight: trainer \(3,\)"):
            weights.push(bad)
        assert llm.apply_model(_checksums)[0] == before

        # zero-copy: the optimiser's in-place step is the push
        assert weights.alias(trainer) == {}
        assert llm.apply_model(_checksums)[0] == _checksums(trainer)
        optimizer = torch.optim.AdamW(trainer.parameters(), lr=0.01)
        for param in trainer.parameters():
            param.grad = torch.randn_like(param)
        optimizer.step()
        assert weights.push(trainer) == 0  # nothing left to copy
        assert llm.apply_model(_checksums)[0] == _checksums(trainer)
        assert _checksums(trainer) != _checksums(updated)

        # fp32 master weights: nothing aliased, every push casts
        master = copy.deepcopy(updated).float()
        kept = EngineWeights(llm).alias(master)
        assert sorted(kept) == sorted(dict(master.named_parameters()))
        assert "trainer torch.float32" in kept["lm_head.weight"]
        assert weights.push(master) == count
        assert llm.apply_model(_checksums)[0] == _checksums(updated)
    finally:
        shutdown_llm(llm)


def _copied_directly(model) -> set[str]:
    """Runs in each worker: the names its SharedWeights plan copies
    without the model's loader."""
    from vllm.model_executor.model_loader.shared_weights import _PLANS

    (plan,) = _PLANS[model].values()
    return set(plan.direct)


def _checksums(model):
    """Runs in each worker too: each parameter's float64 sum, by name."""
    module = getattr(model, "model", model)  # the engine's: the factory's
    return {
        name: float(p.detach().double().sum()) for name, p in module.named_parameters()
    }
