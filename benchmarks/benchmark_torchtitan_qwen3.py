# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Output tokens/s of vLLM's native Qwen3ForCausalLM and of the TorchTitan
Qwen3 (a factory-built generic model) on the same config, prompts and
sampling, side by side in one process.

    python benchmarks/benchmark_torchtitan_qwen3.py --size 0.6b   # GPU
    python benchmarks/benchmark_torchtitan_qwen3.py --size small  # CPU
    python benchmarks/benchmark_torchtitan_qwen3.py --size 30b-a3b --ours-moe-loop

Engines stay resident and are timed in interleaved rounds
(interleaved_rounds.py); each engine's throughput is reported as the
median over rounds of its ratio to native's in the same round, with a 95%
bootstrap confidence interval.

`--profile-dir DIR` then profiles one generate() per engine with vLLM's
torch profiler and prints each engine's kernels by GPU time, grouped into
GEMMs, attention and the rest (the full tables land in DIR).

Weights are dummy (random) in every engine, as for any speed run; engines
run with vLLM's defaults (torch.compile, CUDA graphs) unless
--enforce-eager. `--ours-torch-linear` adds the TorchTitan model with its
nn.Linear layers left on PyTorch's GEMM (factory attribute
`use_vllm_linear_method = False`); `--ours-no-compile` runs it without
torch.compile (`supports_torch_compile = False`); `--ours-unfused` runs it
with its q/k/v and gate/up projections as separate GEMMs
(`fuse_projections = False`, see fused_projections.py).
`--ours-moe-loop` runs a MoE size's experts as the module's own Python
loop (`fuse_moe = False`, uncompiled and without CUDA graphs) beside the
fused ones. `--ours undeclared` registers it as a plain lambda with no
attributes instead (what a factory gets by default: compiled where Dynamo
can trace it), `--ours both` runs both registrations.
"""

import argparse
import functools
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples/offline_inference/torchtitan_qwen3"))

from interleaved_rounds import (
    parse_args,
    print_summary,
    run_rounds,
    start_engine,
    token_prompts,
)
from model import ARCH, Qwen3Config, build_qwen3  # noqa: E402

SIZES = {
    # Qwen3-0.6B
    "0.6b": Qwen3Config(),
    # Qwen3-8B
    "8b": Qwen3Config(
        hidden_size=4096,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=12288,
        tie_word_embeddings=False,
    ),
    "small": Qwen3Config(
        vocab_size=8192,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=768,
        max_position_embeddings=2048,
    ),
    # Qwen3-30B-A3B: 128 experts, 8 per token
    "30b-a3b": Qwen3Config(
        hidden_size=2048,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        intermediate_size=6144,
        tie_word_embeddings=False,
        num_experts=128,
        moe_intermediate_size=768,
    ),
    "small-moe": Qwen3Config(
        vocab_size=8192,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=128,
    ),
}


def native_arch(config: Qwen3Config) -> str:
    return "Qwen3MoeForCausalLM" if config.num_experts else "Qwen3ForCausalLM"


def hf_config(arch: str, config: Qwen3Config, dtype: str) -> dict:
    """The config.json of a Qwen3 (or Qwen3-MoE) of this shape, served as
    `arch`."""
    return dict(
        asdict(config),
        architectures=[arch],
        model_type="qwen3_moe" if config.num_experts else "qwen3",
        torch_dtype=dtype,
    )


def write_config(path: Path, arch: str, config: Qwen3Config, dtype: str):
    """A model directory holding only that config.json (for dummy weights);
    the weight-sync and log-prob benchmarks start their engines on it."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(hf_config(arch, config, dtype)))


def variant(**factory_attributes):
    """build_qwen3 with other factory attributes. A partial carries them to
    vLLM's processes (build_qwen3 itself is pickled by reference)."""
    factory = functools.partial(build_qwen3)
    for name, value in factory_attributes.items():
        setattr(factory, name, value)
    return factory


KERNEL_GROUPS = {
    "GEMM": r"gemm|cutlass|xmma|nvjet|cublas|matmul|splitk|aten::mm|addmm|"
    r"onednn_mm|packed_linear",
    "attention": r"flash|attn|attention|fmha",
}


def kernel_summary(table_file: Path, top: int) -> str:
    """Self device time (CUDA; the CPU where no CUDA column exists) by
    kernel group, and the top rows, from the table vLLM's torch profiler
    writes."""
    rows = []
    for line in table_file.read_text().splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        times = [c for c in cells if re.fullmatch(r"[0-9.]+(us|ms|s)", c)]
        # times: self CPU, CPU total, CPU avg[, self CUDA, CUDA total, avg]
        if len(times) >= 3 and cells[-1].isdigit():
            self_time = times[3] if len(times) >= 6 else times[0]
            rows.append((cells[0], _seconds(self_time), int(cells[-1])))
    rows.sort(key=lambda row: -row[1])
    total = sum(t for _, t, _ in rows) or 1.0
    groups = dict.fromkeys([*KERNEL_GROUPS, "other"], 0.0)
    for name, seconds, _ in rows:
        group = next(
            (
                g
                for g, pattern in KERNEL_GROUPS.items()
                if re.search(pattern, name, re.I)
            ),
            "other",
        )
        groups[group] += seconds
    lines = [
        "  "
        + ", ".join(
            f"{g} {t * 1e3:.1f} ms ({t / total:.0%})" for g, t in groups.items()
        )
    ]
    for name, seconds, calls in rows[:top]:
        lines.append(f"    {seconds * 1e3:8.2f} ms {calls:6d} calls  {name[:90]}")
    return "\n".join(lines)


def _seconds(text: str) -> float:
    unit = re.search(r"(us|ms|s)$", text)[1]
    return float(text[: -len(unit)]) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[unit]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--ours-no-compile", action="store_true")
    parser.add_argument("--ours-torch-linear", action="store_true")
    parser.add_argument("--ours-unfused", action="store_true")
    parser.add_argument(
        "--ours-moe-loop",
        action="store_true",
        help="also run the MoE model's experts as its own Python loop "
        "(fuse_moe = False, uncompiled)",
    )
    parser.add_argument(
        "--ours",
        choices=["declared", "undeclared", "both"],
        default="declared",
        help="register the generic model with its factory's attributes, as "
        "a plain lambda, or both",
    )
    parser.add_argument(
        "--profile-dir",
        type=Path,
        default=None,
        help="profile one generate() per engine into DIR",
    )
    parser.add_argument("--profile-prompts", type=int, default=64)
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="this many of the size's layers (each layer keeps its shape), "
        "e.g. so that two 30B-A3B engines fit one GPU side by side",
    )
    args = parse_args(parser)
    if args.layers:
        SIZES[args.size].num_hidden_layers = args.layers

    from vllm import ModelRegistry, SamplingParams

    compile_ours = not args.ours_no_compile
    eager_engines: set[str] = set()
    native = native_arch(SIZES[args.size])
    # name: (architecture, factory to register)
    engines = {f"native {native}": (native, None)}
    if args.ours != "undeclared":
        engines["TorchTitan Qwen3 (generic)"] = (
            ARCH,
            variant(supports_torch_compile=compile_ours),
        )
    if args.ours != "declared":
        engines["TorchTitan Qwen3, lambda, no attributes"] = (
            ARCH + "Lambda",
            lambda vllm_config, parallel_context: build_qwen3(
                vllm_config, parallel_context
            ),
        )
    if args.ours_torch_linear:
        engines["TorchTitan Qwen3, torch nn.Linear"] = (
            ARCH + "TorchLinear",
            variant(supports_torch_compile=compile_ours, use_vllm_linear_method=False),
        )
    if args.ours_moe_loop:
        engines["TorchTitan Qwen3, experts as a Python loop"] = (
            ARCH + "MoELoop",
            variant(supports_torch_compile=False, fuse_moe=False),
        )
        # the loop reads which experts were chosen (`.tolist()`), which a
        # CUDA graph cannot capture
        eager_engines.add("TorchTitan Qwen3, experts as a Python loop")
    if args.ours_unfused:
        engines["TorchTitan Qwen3, unfused"] = (
            ARCH + "Unfused",
            variant(supports_torch_compile=compile_ours, fuse_projections=False),
        )

    prompts = token_prompts(args.num_prompts, args.input_len)
    params = SamplingParams(
        max_tokens=args.output_len, temperature=0.0, ignore_eos=True, detokenize=False
    )
    llms, startup = {}, {}
    for index, (name, (arch, factory)) in enumerate(engines.items()):
        if factory is not None:
            ModelRegistry.register_model(arch, factory)
        profiler_config = None
        if args.profile_dir is not None:
            profiler_config = {
                "profiler": "torch",
                "torch_profiler_dir": str(args.profile_dir / str(index)),
                "torch_profiler_with_stack": False,
            }
        llms[name], startup[name] = start_engine(
            name,
            hf_config(arch, SIZES[args.size], args.dtype),
            args,
            profiler_config=profiler_config,
            enforce_eager=args.enforce_eager or name in eager_engines,
        )

    rates = run_rounds(llms, prompts, params, args.rounds, args.warmup_rounds)
    print(
        f"\n{args.size} ({SIZES[args.size].num_hidden_layers} layers): "
        f"{args.num_prompts} prompts x {args.input_len} in "
        f"/ {args.output_len} out, {args.dtype}, eager="
        f"{args.enforce_eager}, generic model compiled={compile_ours}, "
        f"{args.rounds} interleaved rounds after {args.warmup_rounds} "
        "warm-up rounds"
    )
    print_summary(rates, startup, baseline=f"native {native}")

    if args.profile_dir:
        profile_prompts = prompts[: args.profile_prompts]
        for index, name in enumerate(llms):
            llms[name].start_profile()
            llms[name].generate(profile_prompts, params, use_tqdm=False)
            llms[name].stop_profile()
            # rank 0's table: profiler_out_0.txt (vLLM 0.26), or
            # rank0.profiler_out.txt (0.32)
            tables = [
                args.profile_dir / str(index) / name
                for name in ("profiler_out_0.txt", "rank0.profiler_out.txt")
            ]
            tables = [table for table in tables if table.exists()]
            print(
                f"\nprofile of {name}: {len(profile_prompts)} prompts, "
                "self time by kernel"
            )
            print(
                kernel_summary(tables[0], top=12)
                if tables
                else "  (no profiler table written)"
            )


if __name__ == "__main__":
    main()
