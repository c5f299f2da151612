# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""The exact configuration on CUDA: every sampled token's log-probability
from vLLM `torch.equal` to the trainer's recompute through the same module.
(Its settings, on the CPU: tests/model_executor/test_exact_logprobs_settings.py.)"""

import functools
import importlib
import sys

import pytest
import torch

from tests.conftest import REPO, make_llm, shutdown_llm
from tests.model_executor.test_exact_logprobs_settings import environment  # noqa: F401
from vllm.model_executor.layers.exact_logprobs import (
    _batch_invariant,
    exact_engine_args,
    prepare_trainer,
    row_invariant_matmuls,
    token_logprobs,
)


def _push(model, weights):
    return len(model.load_weights(weights.items()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.usefixtures("environment")
@pytest.mark.parametrize("inductor", [False, True], ids=["graphs", "inductor"])
def test_cuda_exact_logprobs_torchtitan_qwen3(tmp_path, inductor):
    """The TorchTitan Qwen3, bf16, weights pushed from the trainer; CUDA
    graphs without Inductor, or Inductor on both sides."""
    from tests.models.test_torchtitan_qwen3 import (
        ARCH,
        SMALL,
        Qwen3Model,
        register,
        write_config,
    )

    engine_args = exact_engine_args(inductor=inductor)
    _batch_invariant().init_batch_invariance()  # before the trainer's ops
    torch.manual_seed(0)
    with torch.device("cuda"):  # as vLLM builds its copy (rotary table)
        trainer = Qwen3Model(SMALL)
    for parameter in trainer.parameters():
        if parameter.dim() == 2:
            torch.nn.init.normal_(parameter, std=0.02)
        parameter.data = parameter.data.to(torch.bfloat16)
    write_config(tmp_path, ARCH)
    register()
    assert_engine_logprobs_equal_trainers(
        trainer, tmp_path, ARCH, SMALL.vocab_size, engine_args
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.usefixtures("environment")
@pytest.mark.parametrize(
    "engine",
    [
        "graphs",
        "eager",
        # 4 of 4,096 differed here (H200, torch 2.11) while the trainer's
        # graph broke at attention and its final norm ran eagerly; with
        # attention one op when compiled, not yet re-run on a GPU
        "inductor",
    ],
)
def test_cuda_exact_logprobs_megatron_core(tmp_path, engine):
    """The Megatron-core ground-truth model (Megatron's tensor-parallel
    layers, a one-rank group in the trainer), bf16; CUDA graphs without
    Inductor, eager, or Inductor on both sides."""
    pytest.importorskip("megatron.core")
    import torch.distributed as dist

    from vllm import ModelRegistry
    from vllm.model_executor.parallel_context import ParallelContext

    megatron = import_example("custom_model_with_megatron")
    engine_args = exact_engine_args(
        enforce_eager=engine == "eager", inductor=engine == "inductor"
    )
    _batch_invariant().init_batch_invariance()
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        world = dist.new_group([0], backend="gloo")  # a group object to hold
        assert world is not None
        torch.manual_seed(0)
        trainer = megatron.MegatronDecoder(
            megatron.DecoderConfig(),
            ParallelContext(
                tp_group=world, tp_cpu_group=world, device=torch.device("cuda")
            ),
            torch.bfloat16,
        ).to("cuda", torch.bfloat16)  # the norms too, as the engine holds them
        # Megatron-core 0.17 keeps tp_group=None when torch.distributed
        # reports no default group at construction: say so here, not in
        # the forward's all-reduce
        assert trainer.embedding.tp_group is world, dist.is_initialized()
        megatron.write_config(tmp_path, megatron.DecoderConfig())
        ModelRegistry.register_model(megatron.ARCH, megatron.build_megatron_decoder)
        assert_engine_logprobs_equal_trainers(
            trainer,
            tmp_path,
            megatron.ARCH,
            megatron.DecoderConfig.vocab_size,
            engine_args,
            in_process_core=False,  # its shutdown would destroy our group
        )
    finally:
        dist.destroy_process_group()


def import_example(name):
    """An example module, importable by name in the engine's spawned
    workers too (they inherit sys.path): the factory pickles by name."""
    sys.path.insert(0, str(REPO / "examples/offline_inference"))
    return importlib.import_module(name)


def assert_engine_logprobs_equal_trainers(
    trainer, model_dir, arch, vocab_size, engine_args, in_process_core=True
):
    """64 sequences x 64 sampled tokens: every log-probability vLLM reports
    equals the trainer's recompute (training mode, all sequences packed
    into one varlen batch, gradients on) bit for bit."""
    from vllm import SamplingParams
    from vllm.model_executor.layers.trainable_attention import pack_sequences

    weights = {name: p.detach().cpu() for name, p in trainer.named_parameters()}
    llm = make_llm(
        model_dir,
        arch,
        spawn_workers=True,  # the engine's GPU state apart from the trainer's
        in_process_core=in_process_core,
        dtype="bfloat16",
        load_format="dummy",
        **engine_args,
    )
    try:
        assert set(llm.apply_model(functools.partial(_push, weights=weights))) == {
            len(weights)
        }
        generator = torch.Generator().manual_seed(1)
        prompts = torch.randint(10, vocab_size, (64, 32), generator=generator)
        outputs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts.tolist()],
            [
                SamplingParams(
                    max_tokens=64,
                    temperature=1.0,
                    seed=index,
                    logprobs=0,
                    ignore_eos=True,
                    detokenize=False,
                )
                for index in range(len(prompts))
            ],
            use_tqdm=False,
        )
        prepare_trainer(trainer, llm)
    finally:
        shutdown_llm(llm)

    sequences = [
        p + list(o.outputs[0].token_ids) for p, o in zip(prompts.tolist(), outputs)
    ]
    engine = torch.cat(
        [
            torch.tensor(
                [
                    e[t].logprob
                    for e, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)
                ]
            )
            for o in outputs
        ]
    )
    trainer.train()
    input_ids, positions, cu_seqlens = pack_sequences(sequences, "cuda")
    hidden = trainer(input_ids, positions, cu_seqlens=cu_seqlens)
    with row_invariant_matmuls():
        logits = trainer.compute_logits(hidden)
    rows, targets, start = [], [], 0
    for sequence in sequences:
        rows.extend(range(start + 31, start + len(sequence) - 1))
        targets.extend(sequence[32:])
        start += len(sequence)
    recomputed = token_logprobs(logits[rows], torch.tensor(targets, device="cuda"))
    recomputed.sum().backward()  # a trainer's loss reaches every weight
    assert all(p.grad is not None for p in trainer.parameters())
    recomputed = recomputed.detach().cpu()
    assert len(recomputed) == 64 * 64
    differs = (recomputed != engine).view(64, 64)  # [sequence, sampled token]
    differing = int(differs.sum())
    assert differing == 0, (
        f"{differing} of {len(engine)} log-probabilities differ, max "
        f"{(recomputed - engine).abs().max():.3e}; sequences with a "
        f"difference: {differs.any(1).nonzero().flatten().tolist()}, "
        f"differing tokens per position: {differs.sum(0).tolist()}"
    )
