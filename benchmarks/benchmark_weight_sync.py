# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Time to push every weight of a generic model (the TorchTitan Qwen3)
from a trainer into a running vLLM engine, against restarting the engine,
and the bandwidth reached against the copy's physical limit.

    python benchmarks/benchmark_weight_sync.py --size 0.6b    # GPU
    python benchmarks/benchmark_weight_sync.py --size small   # CPU

The push paths:

- `LLM.apply_model` with the trainer's state dict as CPU tensors, into the
  model's `load_weights` in each worker: the tensors are serialised to the
  engine core and on to each worker. Every platform.
- `SharedWeights` (vllm/model_executor/model_loader/shared_weights.py):
  the trainer packs its weights into one shared-memory buffer laid out
  once; each worker checks the layout once, then copies from the buffer.
  Every platform; timed with the pack included. Then the same with the
  trainer's parameters aliased to the buffer (`SharedWeights.alias`):
  an in-place optimiser step writes the buffer, and the push only copies
  in each worker.
- CUDA only: `SharedWeights(..., device="cuda")`, the buffer in the
  trainer's GPU memory, which each worker opens once by CUDA IPC: a push
  is a device copy on each side.
- CUDA only: `EngineWeights` (vllm/model_executor/model_loader/
  engine_weights.py), the engine's parameters opened in the trainer's
  process once: a push is one batched copy on the trainer's side (also
  from fp32 master weights, cast by the copy), or, after `alias`, no copy
  at all (the trainer's parameters are the engine's memory).
- CUDA only: vLLM's CUDA-IPC weight-transfer engine
  (`weight_transfer_config={"backend": "ipc"}`), for a trainer whose
  weights are on the same GPU: the workers open the trainer's tensors by
  IPC handle, nothing is serialised but the handles.

`--plain-linear` registers the model with `use_vllm_linear_method = False`
(plain `torch.nn.Linear` GEMMs: on the CPU nothing to re-pack after a
push); `--enforce-eager` starts the engine without compiling.

The physical limit is one copy of the same bytes in one flat buffer: host
memory to host memory on the CPU, pinned host memory to the GPU on CUDA (what the first
path pays at least), GPU to GPU on CUDA (the IPC path).
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
# vLLM forks its engine process when CUDA is not initialised yet; this
# process has used torch's CPU thread pool (building the trainer's model)
# by then, and a forked child that uses it again can hang.
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples/offline_inference/torchtitan_qwen3"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from benchmark_torchtitan_qwen3 import SIZES, write_config  # noqa: E402
from model import ARCH, Qwen3Model, build_qwen3  # noqa: E402


def load_pushed_weights(model, weights):
    """Runs in each worker."""
    return len(model.load_weights(weights.items()))


def weight_checksums(model) -> dict[str, float]:
    """Runs in each worker: the sum of each parameter, in float64, named
    as the trainer's module names it."""
    module = getattr(model, "model", model)  # the factory's module in vLLM
    return {name: p.double().sum().item() for name, p in module.named_parameters()}


def engine_holds(llm, trainer) -> bool:
    """Whether every parameter's sum in the engine equals the trainer's."""
    expected = weight_checksums(trainer)
    got = llm.apply_model(functools.partial(weight_checksums))[0]
    return got.keys() == expected.keys() and all(
        abs(got[name] - value) <= 1e-6 * (1 + abs(value))
        for name, value in expected.items()
    )


def timed_pushes(label: str, push, rounds: int) -> list[float]:
    """Seconds of each of `rounds` calls of `push` after one warm-up."""
    seconds = []
    for index in range(rounds + 1):
        start = time.perf_counter()
        push()
        seconds.append(time.perf_counter() - start)
        warm_up = " (warm-up)" if index == 0 else ""
        print(f"{label} {index}{warm_up}: {seconds[-1]:.3f} s", flush=True)
    return seconds[1:]


def push_by_ipc(llm, trainer) -> None:
    """vLLM's CUDA-IPC weight-transfer engine, the trainer on the same GPU."""
    from dataclasses import asdict

    from vllm.distributed.weight_transfer.ipc_engine import (
        IPCTrainerSendWeightsArgs,
        IPCWeightTransferEngine,
    )

    llm.start_weight_update()
    IPCWeightTransferEngine.trainer_send_weights(
        trainer.named_parameters(),
        IPCTrainerSendWeightsArgs(
            send_mode=lambda info: llm.update_weights({"update_info": asdict(info)})
        ),
    )
    llm.finish_weight_update()


def time_engine_weights(llm, trainer, rounds: int) -> dict:
    """`EngineWeights`: the engine's parameters opened in this process.
    Pushes of the bf16 trainer (one batched copy), of fp32 master weights
    (the copy casts), and after `alias` (no copy: an in-place update
    before each push, untimed, stands in for the optimiser step). Each:
    (seconds per push, whether the engine then holds the trainer's
    values)."""
    from vllm.model_executor.model_loader.engine_weights import EngineWeights

    def negate(tensors):
        with torch.no_grad():
            for tensor in tensors:
                tensor.neg_()

    results = {}
    weights = EngineWeights(llm)
    negate(trainer.parameters())
    seconds = timed_pushes("EngineWeights copy", lambda: weights.push(trainer), rounds)
    results["copy"] = (seconds, engine_holds(llm, trainer))
    master = {name: p.detach().float() for name, p in trainer.named_parameters()}
    negate(master.values())
    seconds = timed_pushes(
        "EngineWeights fp32 -> bf16", lambda: weights.push(master), rounds
    )
    with torch.no_grad():  # what the engine should now hold
        for name, param in trainer.named_parameters():
            param.copy_(master[name])
    results["cast from fp32"] = (seconds, engine_holds(llm, trainer))
    master.clear()
    kept = weights.alias(trainer)
    print(f"EngineWeights.alias: {weights.aliased} aliased, {len(kept)} kept")
    seconds = []
    for index in range(rounds + 1):
        negate(trainer.parameters())
        torch.cuda.synchronize()
        start = time.perf_counter()
        weights.push(trainer)
        seconds.append(time.perf_counter() - start)
        print(f"EngineWeights aliased push {index}: {seconds[-1] * 1e3:.2f} ms")
    results["aliased (zero-copy)"] = (seconds[1:], engine_holds(llm, trainer))
    resets = []
    for _ in range(rounds):  # what an engine without prefix caching skips
        start = time.perf_counter()
        llm.reset_prefix_cache()
        resets.append(time.perf_counter() - start)
    print(
        f"of an aliased push, LLM.reset_prefix_cache() alone: "
        f"{statistics.median(resets) * 1e3:.2f} ms (median)"
    )
    return results


def copy_limit_seconds(
    state: dict[str, torch.Tensor], source: str, target: str
) -> float:
    """One copy of the same bytes as one flat buffer from `source` to
    `target` memory ("cpu" or "cuda"; host memory pinned when copied to the
    GPU): the bound a push path has to pay. (Until 2026-12-03 this copied
    tensor by tensor, which at 0.6B on an H200 took 4 ms against 1.1 ms
    for one batched copy: launches, not bytes.)"""
    total = sum(t.numel() * t.element_size() for t in state.values())
    pinned = source == "cpu" and target == "cuda"
    data = torch.empty(total, dtype=torch.uint8, device=source, pin_memory=pinned)
    data.fill_(1)
    output = torch.zeros(total, dtype=torch.uint8, device=target)  # paged in
    if "cuda" in (source, target):
        torch.cuda.synchronize()
    start = time.perf_counter()
    output.copy_(data, non_blocking=True)
    if "cuda" in (source, target):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gpu-memory-utilization", type=float, default=None)
    parser.add_argument(
        "--no-ipc",
        action="store_true",
        help="CUDA: skip the weight-transfer engine path",
    )
    parser.add_argument(
        "--plain-linear",
        action="store_true",
        help="the factory keeps plain torch.nn.Linear (use_vllm_linear_method "
        "= False): no re-packing of CPU GEMM weights after a push",
    )
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="enable_prefix_caching=False: a push has no prefix cache to reset",
    )
    parser.add_argument(
        "--device-paths-only",
        action="store_true",
        help="CUDA: only the paths from GPU memory (at 8B the host paths and "
        "the restart take minutes)",
    )
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    memory = args.gpu_memory_utilization or (0.3 if device == "cuda" else 0.1)
    dtype = getattr(torch, args.dtype)

    from vllm import LLM, ModelRegistry

    factory = build_qwen3
    if args.plain_linear:
        factory = functools.partial(build_qwen3)  # carries the attribute
        factory.use_vllm_linear_method = False  # type: ignore[attr-defined]
    ModelRegistry.register_model(ARCH, factory)
    config = SIZES[args.size]
    torch.manual_seed(0)
    trainer = Qwen3Model(config).to(dtype)  # stands in for the trainer's
    state = {name: p.detach().contiguous() for name, p in trainer.named_parameters()}
    total_bytes = sum(t.numel() * t.element_size() for t in state.values())

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        write_config(model_dir, ARCH, config, args.dtype)

        use_ipc = device == "cuda" and not args.no_ipc

        def start_engine():
            extra = {"weight_transfer_config": {"backend": "ipc"}} if use_ipc else {}
            return LLM(
                model=str(model_dir),
                load_format="dummy",
                skip_tokenizer_init=True,
                dtype=args.dtype,
                max_model_len=512,
                gpu_memory_utilization=memory,
                enforce_eager=args.enforce_eager,
                enable_prefix_caching=not args.no_prefix_caching,
                **extra,
            )

        start = time.perf_counter()
        llm = start_engine()
        first_start = time.perf_counter() - start
        print(f"engine started in {first_start:.1f} s", flush=True)

        host_paths = not (device == "cuda" and args.device_paths_only)
        pushes, shared_pushes, shared_verified, restart = [], [], None, None
        aliased_pushes: list[float] = []
        aliased_verified = None
        for index in range(args.rounds + 1 if host_paths else 0):  # 1 warm-up
            start = time.perf_counter()
            loaded = llm.apply_model(
                functools.partial(load_pushed_weights, weights=state)
            )
            llm.reset_prefix_cache()
            pushes.append(time.perf_counter() - start)
            print(
                f"push {index}{' (warm-up)' if index == 0 else ''}: {pushes[-1]:.3f} s",
                flush=True,
            )
        pushes = pushes[1:]

        from vllm.model_executor.model_loader.shared_weights import SharedWeights

        if host_paths:
            assert loaded == [len(state)], loaded
            with SharedWeights(state) as shared:
                # each: pack, copy in every worker, reset the prefix cache
                shared_pushes = timed_pushes(
                    "shared-memory push", lambda: shared(llm, state), args.rounds
                )
            shared_verified = engine_holds(llm, trainer)
            with SharedWeights(trainer) as shared:
                assert shared.alias(trainer) == {}
                with torch.no_grad():  # new values: an in-place step's
                    for parameter in trainer.parameters():
                        parameter.neg_()
                aliased_pushes = timed_pushes(
                    "shared-memory push, aliased trainer",
                    lambda: shared(llm, trainer),
                    args.rounds,
                )
                aliased_verified = engine_holds(llm, trainer)
                for parameter in trainer.parameters():  # off the buffer it closes
                    parameter.data = parameter.data.clone()

        ipc_pushes, ipc_error = [], None
        ipc_verified = device_verified = None
        device_pushes: list[float] = []
        engine_weights: dict[str, tuple[list[float], bool]] = {}
        if device == "cuda":
            on_gpu = trainer.cuda()
            with torch.no_grad():  # new values: the engine holds the old ones
                for parameter in on_gpu.parameters():
                    parameter.neg_()
            try:
                if not use_ipc:
                    raise RuntimeError("skipped (--no-ipc)")
                llm.init_weight_transfer_engine({"init_info": {}})

                def ipc_push():
                    torch.cuda.synchronize()
                    push_by_ipc(llm, on_gpu)
                    llm.reset_prefix_cache()

                ipc_pushes = timed_pushes("IPC push", ipc_push, args.rounds)
                ipc_verified = engine_holds(llm, on_gpu)  # what it sent
            except Exception as error:  # reported in the table
                ipc_error = f"{type(error).__name__}: {error}"
                print(f"IPC push failed: {ipc_error}", flush=True)
            with torch.no_grad():  # new values again
                for parameter in on_gpu.parameters():
                    parameter.neg_()
            # the buffer in the trainer's GPU memory, opened once by IPC
            with SharedWeights(on_gpu, device="cuda") as on_device:
                device_pushes = timed_pushes(
                    "GPU-buffer push", lambda: on_device(llm, on_gpu), args.rounds
                )
            device_verified = engine_holds(llm, on_gpu)
            engine_weights = time_engine_weights(llm, on_gpu, args.rounds)
            del on_gpu

        llm.llm_engine.engine_core.shutdown()
        del llm
        if host_paths:
            start = time.perf_counter()
            llm = start_engine()
            restart = time.perf_counter() - start
            llm.llm_engine.engine_core.shutdown()

    gigabytes = total_bytes / 1e9
    print(
        f"\n{args.size} ({sum(t.numel() for t in state.values()) / 1e6:.0f}M"
        f" parameters, {args.dtype}, {gigabytes:.3f} GB) on {device}, "
        f"{args.rounds} pushes after one warm-up"
    )
    print(f"{'path':52s} {'seconds':>9s} {'GB/s':>8s}")
    if host_paths:
        limit = min(copy_limit_seconds(state, "cpu", device) for _ in range(3))
        push = statistics.median(pushes)
        print(
            f"{'push, LLM.apply_model + load_weights (median)':52s} "
            f"{push:9.3f} {gigabytes / push:8.2f}   "
            f"(min {min(pushes):.3f}, max {max(pushes):.3f})"
        )
        shared_push = statistics.median(shared_pushes)
        print(
            f"{'push, SharedWeights: pack + copy (median)':52s} "
            f"{shared_push:9.3f} {gigabytes / shared_push:8.2f}   "
            f"(min {min(shared_pushes):.3f}, max {max(shared_pushes):.3f})"
        )
        print(
            f"  engine's weights after the shared-memory pushes equal the "
            f"trainer's: {shared_verified}"
        )
        aliased_push = statistics.median(aliased_pushes)
        print(
            f"{'push, SharedWeights, trainer aliased: copy (median)':52s} "
            f"{aliased_push:9.3f} {gigabytes / aliased_push:8.2f}   "
            f"(min {min(aliased_pushes):.3f}, max {max(aliased_pushes):.3f})"
        )
        print(
            f"  engine's weights after the aliased pushes equal the "
            f"trainer's: {aliased_verified}"
        )
        print(
            f"{'engine restart (shutdown + LLM(), dummy weights)':52s} "
            f"{restart:9.3f}          (first start {first_start:.1f} s)"
        )
    if use_ipc and ipc_pushes:
        ipc = statistics.median(ipc_pushes)
        print(
            f"{'push, CUDA-IPC weight-transfer engine (median)':52s} "
            f"{ipc:9.3f} {gigabytes / ipc:8.2f}   "
            f"(min {min(ipc_pushes):.3f}, max {max(ipc_pushes):.3f})"
        )
        print(
            f"  engine's weights after the IPC pushes equal the trainer's:"
            f" {ipc_verified}"
        )
    elif use_ipc:
        print(f"{'push, CUDA-IPC weight-transfer engine':52s} failed: {ipc_error}")
    if device_pushes:
        on_device = statistics.median(device_pushes)
        print(
            f"{'push, SharedWeights GPU buffer: pack + copy (median)':52s} "
            f"{on_device:9.3f} {gigabytes / on_device:8.2f}   "
            f"(min {min(device_pushes):.3f}, max {max(device_pushes):.3f})"
        )
        print(
            f"  engine's weights after the GPU-buffer pushes equal the "
            f"trainer's: {device_verified}"
        )
    for label, (seconds, verified) in engine_weights.items():
        median = statistics.median(seconds)
        print(
            f"{'push, EngineWeights ' + label + ' (median)':52s} {median:9.4f} "
            f"{gigabytes / median:8.2f}   (min {min(seconds):.4f}, "
            f"max {max(seconds):.4f}); engine holds the trainer's: {verified}"
        )
    if host_paths:
        copy = "pinned host -> GPU" if device == "cuda" else "host -> host"
        print(
            f"{'physical limit: one ' + copy + ' copy of the bytes':52s} "
            f"{limit:9.3f} {gigabytes / limit:8.2f}"
        )
    if device == "cuda":
        gpu_limit = min(copy_limit_seconds(state, "cuda", "cuda") for _ in range(3))
        print(
            f"{'physical limit: one GPU -> GPU copy of the bytes':52s} "
            f"{gpu_limit:9.3f} {gigabytes / gpu_limit:8.2f}"
        )
        if device_pushes:
            print(
                f"SharedWeights GPU buffer reaches "
                f"{gpu_limit / statistics.median(device_pushes):.1%} of the "
                "GPU -> GPU copy limit"
            )
        for label, (seconds, _) in engine_weights.items():
            print(
                f"EngineWeights {label} reaches "
                f"{gpu_limit / statistics.median(seconds):.1%} of the "
                "GPU -> GPU copy limit"
            )
    if host_paths:
        print(
            f"push vs restart: {restart / push:.1f}x faster; push reaches "
            f"{limit / push:.1%} of the copy limit; SharedWeights "
            f"{limit / shared_push:.1%}, aliased {limit / aliased_push:.1%}"
        )


if __name__ == "__main__":
    main()
