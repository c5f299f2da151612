# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Kernels a model launches per layer and decode step, and which ops
launched its copies: one engine, one generate(), torch profiler.

    python benchmarks/kernel_census.py --size 8b --layers 2 --model native
    python benchmarks/kernel_census.py --size 8b --layers 2 --model generic
    python benchmarks/kernel_census.py --size 8b --layers 2 --model generic \\
        --cudagraph-mode NONE     # copies traced back to their ops

The engine core runs in this process, so the profiler sees the model's
ops. Under CUDA graphs the profiler sees only the replayed kernels; with
`--cudagraph-mode NONE` (Inductor still on) every kernel keeps the op that
launched it, and the census prints the ops (input shapes, and Python
frames outside torch where the op ran from Python rather than from
Inductor's generated code) whose kernels match `--trace` (default:
device copies). Issue 22's `memcpy32_post` was found this way: Inductor's
`addmm` of a residual add (see split_residual_addmm.py).
"""

import argparse
import collections
import os
import re
import sys
from pathlib import Path

# the engine core (and the model) in this process, where the profiler is
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(
    0, str(Path(__file__).parents[1] / "examples/offline_inference/torchtitan_qwen3")
)

from benchmark_torchtitan_qwen3 import SIZES, hf_config, native_arch  # noqa: E402
from interleaved_rounds import parse_args, start_engine, token_prompts  # noqa: E402
from model import ARCH, build_qwen3  # noqa: E402


def census(prof, steps: int, layers: int, top: int) -> None:
    """Kernels by device time, with calls per layer and decode step."""
    from torch.autograd import DeviceType

    # device-side events, less vLLM's and Inductor's annotations
    rows = [
        event
        for event in prof.key_averages()
        if event.device_type == DeviceType.CUDA
        and not event.key.startswith(("execute_", "## "))
    ]
    rows.sort(key=lambda event: -event.self_device_time_total)
    total = sum(event.self_device_time_total for event in rows)
    print(f"all kernels: {total / 1e3:.2f} ms, {total / 1e3 / steps:.3f} ms a step")
    print(f"{'kernel':70s} {'calls':>7s} {'/layer/step':>11s} {'ms':>8s} {'%':>6s}")
    for event in rows[:top]:
        print(
            f"{event.key[:70]:70s} {event.count:7d} "
            f"{event.count / (steps * layers):11.2f} "
            f"{event.self_device_time_total / 1e3:8.2f} "
            f"{100 * event.self_device_time_total / total:6.2f}"
        )


def python_frames(event) -> list[str]:
    """The Python frames above a profiled op, innermost first, leaving out
    torch's own (the python tracer's events are the op's ancestors)."""
    frames = []
    parent = event.cpu_parent
    while parent is not None:
        if re.search(r"\.py\(\d+\)", parent.name) and "torch/" not in parent.name:
            frames.append(parent.name)
        parent = parent.cpu_parent
    return frames


def trace_launches(prof, pattern: str, top: int, on_cpu: bool) -> None:
    """The innermost ops whose kernels (on the CPU: whose names) match
    `pattern`, grouped by op, input shapes and the model's stack frames."""
    regex = re.compile(pattern)
    groups: collections.Counter = collections.Counter()
    for event in prof.events():
        kernels = [k.name for k in event.kernels if regex.search(k.name)]
        innermost = not any(regex.search(child.name) for child in event.cpu_children)
        if on_cpu and event.name.startswith("aten::") and innermost:
            # no kernels on the CPU: the innermost matching ops themselves
            kernels = [event.name] if regex.search(event.name) else []
        if not kernels:
            continue
        frames = python_frames(event)[:6]
        key = (event.name, kernels[0], str(event.input_shapes), tuple(frames))
        groups[key] += 1
    if not groups:
        print(f"no op launched a kernel matching {pattern!r}")
    for (name, kernel, shapes, frames), count in groups.most_common(top):
        print(f"\n{count} x {name} -> {kernel}  shapes {shapes}")
        for frame in frames:
            print(f"    {frame}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument(
        "--model",
        choices=["native", "generic"],
        default="generic",
    )
    parser.add_argument(
        "--cudagraph-mode",
        default=None,
        help="vLLM's cudagraph_mode (default: vLLM's own); NONE keeps "
        "every kernel's launching op",
    )
    parser.add_argument(
        "--trace", default=r"(?i)memcpy", help="kernels to trace to ops"
    )
    parser.add_argument("--top", type=int, default=20)
    args = parse_args(parser)
    config = SIZES[args.size]
    config.num_hidden_layers = args.layers

    import torch
    from torch.profiler import ProfilerActivity, profile

    from vllm import ModelRegistry, SamplingParams

    if args.model == "native":
        arch = native_arch(config)
    else:
        arch = ARCH
        ModelRegistry.register_model(arch, build_qwen3)
    # CUDA graphs captured only up to the batch profiled: a shorter start
    engine_args: dict = {"max_num_seqs": args.num_prompts}
    if args.cudagraph_mode:
        engine_args["compilation_config"] = {"cudagraph_mode": args.cudagraph_mode}
    llm, _ = start_engine(
        args.model, hf_config(arch, config, args.dtype), args, **engine_args
    )
    prompts = token_prompts(args.num_prompts, args.input_len)
    params = SamplingParams(
        max_tokens=args.output_len, temperature=0.0, ignore_eos=True, detokenize=False
    )
    llm.generate(prompts, params, use_tqdm=False)  # warm-up, prefix cache
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, with_stack=True, record_shapes=True) as prof:
        llm.generate(prompts, params, use_tqdm=False)
    print(
        f"\n{args.model}, {args.size} shape, {args.layers} layers, "
        f"{args.num_prompts} prompts x {args.output_len} out, cudagraph_mode="
        f"{args.cudagraph_mode or 'default'}, enforce_eager={args.enforce_eager}"
    )
    census(prof, steps=args.output_len, layers=args.layers, top=args.top)
    print(f"\nops that launched kernels matching {args.trace!r}:")
    trace_launches(prof, args.trace, args.top, on_cpu=not torch.cuda.is_available())


if __name__ == "__main__":
    main()
