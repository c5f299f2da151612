# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""examples/offline_inference/custom_model_with_megatron.py: a Megatron-core
model run by vLLM matches an independent PyTorch + Megatron-core run."""

import gc
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import IN_PROCESS_ENGINE

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples/offline_inference/custom_model_with_megatron.py"


def run_example(*args, timeout=600):
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, PYTHONUNBUFFERED="1", **IN_PROCESS_ENGINE),
    )
    output = result.stdout + result.stderr
    summary = "\n".join(
        line
        for line in result.stdout.splitlines()
        if not line.startswith("(") and "WARNING" not in line
    )
    print(summary)
    return result.returncode, output


@pytest.mark.timeout(900)
def test_megatron_model_matches_reference_cpu():
    """At TP=2: Megatron's layers sharded over vLLM's group. (TP=1 runs in
    the GPU suite; each CPU run costs about a minute here.)"""
    if torch.cuda.is_available():
        pytest.skip("CPU comparison; the CUDA case runs on GPUs")
    tp = 2
    rc, output = run_example("--tensor-parallel-size", str(tp), "--enforce-eager")
    assert rc == 0, output[-4000:]
    assert f"vLLM, tensor_parallel_size={tp}:" in output
    max_diff = float(re.search(r"max \|diff\| ([0-9.e+-]+)", output)[1])
    assert max_diff <= 1e-4
    assert "greedy continuations identical: 100% of 8" in output
    loss_before, loss_after = map(
        float, re.search(r"loss ([0-9.]+) -> ([0-9.]+)", output).groups()
    )
    assert loss_after < loss_before
    assert "PASS" in output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.timeout(900)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_megatron_model_matches_reference_cuda_bf16(tp):
    if torch.cuda.device_count() < tp:
        pytest.skip(f"needs {tp} GPUs")
    rc, output = run_example(
        "--tensor-parallel-size", str(tp), "--dtype", "bfloat16", "--num-prompts", "32"
    )
    assert rc == 0 and "PASS" in output, output[-4000:]


def test_megatron_trainer_compiles_as_one_graph(tmp_path):
    """A trainer's torch.compile of the Megatron-core model (training mode,
    gradients) traces one graph, final norm included, as vLLM's compile of
    the engine's copy does: the exact configuration needs both sides to run
    the same generated code (docs: "Inductor on both sides"). Values and
    gradients are eager's within fp32 rounding."""
    pytest.importorskip("megatron.core")
    import torch.distributed as dist

    sys.path.insert(0, str(EXAMPLE.parent))
    import custom_model_with_megatron as megatron

    from vllm.model_executor.layers.trainable_attention import pack_sequences
    from vllm.model_executor.parallel_context import ParallelContext

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        world = dist.new_group([0], backend="gloo")
        torch.manual_seed(0)
        model = megatron.MegatronDecoder(
            megatron.DecoderConfig(),
            ParallelContext(tp_group=world, tp_cpu_group=world),
        ).train()
        inputs = pack_sequences([[5, 6, 7, 8, 9], [10], list(range(20, 32))])

        def outputs_and_grads(forward):
            model.zero_grad()
            hidden = forward(*inputs[:2], cu_seqlens=inputs[2])
            model.compute_logits(hidden).logsumexp(-1).mean().backward()
            return [hidden.detach()] + [p.grad.clone() for p in model.parameters()]

        eager = outputs_and_grads(model)
        torch._dynamo.reset()
        # free earlier engines' objects now: vLLM's CPU GEMM handles free
        # themselves with `.item()`, which fails if collected while the
        # compiler traces with fake tensors (the handle would leak)
        gc.collect()
        # one graph is the point; Inductor's code generation is not
        compiled = torch.compile(
            model, backend="aot_eager", fullgraph=True, dynamic=True
        )
        for got, want in zip(outputs_and_grads(compiled), eager):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    finally:
        dist.destroy_process_group()
