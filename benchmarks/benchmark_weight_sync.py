# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Time to push every weight of a generic model (the TorchTitan Qwen3)
from a trainer into a running vLLM engine, against restarting the engine,
and the bandwidth reached against the copy's physical limit.

    python benchmarks/benchmark_weight_sync.py --size 0.6b    # GPU
    python benchmarks/benchmark_weight_sync.py --size small   # CPU

The push is `LLM.apply_model` with the trainer's state dict as CPU tensors
(what `examples/offline_inference/rl_one_definition.py` does): the tensors
are serialised to the engine core and on to each worker, which loads them
through the model's `load_weights` (an all-or-nothing update). The
physical limit is one copy of the same bytes: host memory to host memory
on the CPU, pinned host memory to the GPU on CUDA.
"""

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples/offline_inference/torchtitan_qwen3"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from benchmark_torchtitan_qwen3 import SIZES, write_config  # noqa: E402
from model import ARCH, Qwen3Model, build_qwen3  # noqa: E402


def load_pushed_weights(model, weights):
    """Runs in each worker."""
    return len(model.load_weights(weights.items()))


def copy_limit_seconds(state: dict[str, torch.Tensor], device: str) -> float:
    """One copy of the same bytes: the bound any push path has to pay."""
    if device == "cuda":
        sources = [t.pin_memory() for t in state.values()]
        targets = [torch.empty_like(t, device="cuda") for t in sources]
        torch.cuda.synchronize()
        start = time.perf_counter()
        for source, target in zip(sources, targets):
            target.copy_(source, non_blocking=True)
        torch.cuda.synchronize()
    else:
        targets = [torch.empty_like(t) for t in state.values()]
        start = time.perf_counter()
        for source, target in zip(state.values(), targets):
            target.copy_(source)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gpu-memory-utilization", type=float, default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    memory = args.gpu_memory_utilization or (0.3 if device == "cuda" else 0.1)
    dtype = getattr(torch, args.dtype)

    from vllm import LLM, ModelRegistry
    ModelRegistry.register_model(ARCH, build_qwen3)
    config = SIZES[args.size]
    torch.manual_seed(0)
    trainer = Qwen3Model(config).to(dtype)  # stands in for the trainer's
    state = {name: p.detach().contiguous()
             for name, p in trainer.named_parameters()}
    total_bytes = sum(t.numel() * t.element_size() for t in state.values())

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        write_config(model_dir, ARCH, config, args.dtype)

        def start_engine():
            return LLM(model=str(model_dir), load_format="dummy",
                       skip_tokenizer_init=True, dtype=args.dtype,
                       max_model_len=512, gpu_memory_utilization=memory)

        start = time.perf_counter()
        llm = start_engine()
        first_start = time.perf_counter() - start
        print(f"engine started in {first_start:.1f} s", flush=True)

        pushes = []
        for index in range(args.rounds + 1):  # the first one warms up
            start = time.perf_counter()
            loaded = llm.apply_model(
                functools.partial(load_pushed_weights, weights=state))
            llm.reset_prefix_cache()
            pushes.append(time.perf_counter() - start)
            print(f"push {index}{' (warm-up)' if index == 0 else ''}: "
                  f"{pushes[-1]:.3f} s", flush=True)
        assert loaded == [len(state)], loaded
        pushes = pushes[1:]

        start = time.perf_counter()
        llm.llm_engine.engine_core.shutdown()
        del llm
        llm = start_engine()
        restart = time.perf_counter() - start
        llm.llm_engine.engine_core.shutdown()

    limits = [copy_limit_seconds(state, device) for _ in range(3)]
    push = statistics.median(pushes)
    limit = min(limits)
    gigabytes = total_bytes / 1e9
    print(f"\n{args.size} ({sum(t.numel() for t in state.values()) / 1e6:.0f}M"
          f" parameters, {args.dtype}, {gigabytes:.3f} GB) on {device}, "
          f"{args.rounds} pushes after one warm-up")
    print(f"{'path':52s} {'seconds':>9s} {'GB/s':>8s}")
    print(f"{'push, LLM.apply_model + load_weights (median)':52s} "
          f"{push:9.3f} {gigabytes / push:8.2f}   "
          f"(min {min(pushes):.3f}, max {max(pushes):.3f})")
    print(f"{'engine restart (shutdown + LLM(), dummy weights)':52s} "
          f"{restart:9.3f}          (first start {first_start:.1f} s)")
    copy = "pinned host -> GPU" if device == "cuda" else "host -> host"
    print(f"{'physical limit: one ' + copy + ' copy of the bytes':52s} "
          f"{limit:9.3f} {gigabytes / limit:8.2f}")
    print(f"push vs restart: {restart / push:.1f}x faster; push reaches "
          f"{limit / push:.1%} of the copy limit")


if __name__ == "__main__":
    main()
