# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Throughput of several resident vLLM engines, measured side by side.

All engines are started first and stay up; then each round times one
generate() on each engine in turn, the order alternating from round to
round, so drift of a shared or noisy machine hits every engine alike.
Warm-up rounds are run and discarded. A ratio of two engines is the median
over rounds of their ratio in the same round, printed with the per-round
minimum and maximum and a 95% bootstrap confidence interval of that
median: the interval says whether the run resolves a 5% difference.
"""

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

# vLLM's start-up lines stay off unless VLLM_LOGGING_LEVEL asks for them
# (imported before vLLM by every side-by-side benchmark).
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def parse_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Adds the options every side-by-side run takes to `parser` and parses
    the command line."""
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument(
        "--warmup-rounds", type=int, default=2, help="rounds run first and discarded"
    )
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="per engine (default 0.25 on CUDA, else 0.1)",
    )
    parser.add_argument("--enforce-eager", action="store_true")
    args = parser.parse_args()
    if args.gpu_memory_utilization is None:
        import torch

        args.gpu_memory_utilization = 0.25 if torch.cuda.is_available() else 0.1
    return args


def start_engine(name: str, config: dict, args: argparse.Namespace, **engine_args):
    """An engine for the run `args` (from `parse_args`) describes, on a
    model directory holding only `config` as config.json and dummy
    (random) weights, as for any speed run. Returns it and its start-up
    time in seconds. `engine_args` add to or override the run's."""
    from vllm import LLM

    with tempfile.TemporaryDirectory() as model_dir:
        (Path(model_dir) / "config.json").write_text(json.dumps(config))
        start = time.perf_counter()
        run_args = dict(
            model=model_dir,
            load_format="dummy",
            skip_tokenizer_init=True,
            dtype=args.dtype,
            seed=0,
            max_model_len=args.input_len + args.output_len + 16,
            gpu_memory_utilization=args.gpu_memory_utilization,
            enforce_eager=args.enforce_eager,
        )
        llm = LLM(**(run_args | engine_args))
        seconds = time.perf_counter() - start
    print(f"{name}: started in {seconds:.1f} s", flush=True)
    return llm, seconds


def token_prompts(num_prompts: int, input_len: int) -> list[dict]:
    """Distinct token-id prompts (no tokenizer needed)."""
    return [
        {"prompt_token_ids": [(31 * i + 7 * j) % 5000 + 10 for j in range(input_len)]}
        for i in range(num_prompts)
    ]


def tokens_per_second(llm, prompts, params) -> float:
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed


def run_rounds(
    llms: dict, prompts, params, rounds: int, warmup_rounds: int
) -> dict[str, list[float]]:
    """Output tokens/s of each engine in each measured round."""
    rates = {name: [] for name in llms}
    names = list(llms)
    for round_index in range(warmup_rounds + rounds):
        warmup = round_index < warmup_rounds
        order = names if round_index % 2 == 0 else names[::-1]
        measured = {
            name: tokens_per_second(llms[name], prompts, params) for name in order
        }
        if not warmup:
            for name in names:
                rates[name].append(measured[name])
        label = (
            "warm-up" if warmup else f"round {round_index - warmup_rounds + 1}/{rounds}"
        )
        print(
            f"{label}: " + ", ".join(f"{name} {measured[name]:.1f}" for name in names),
            flush=True,
        )
    return rates


def median_interval(values: list[float], level=0.95, samples=10000):
    """Bootstrap confidence interval of the median of `values`."""
    rng = random.Random(0)
    medians = sorted(
        statistics.median(rng.choices(values, k=len(values))) for _ in range(samples)
    )
    tail = (1 - level) / 2
    return medians[int(tail * samples)], medians[int((1 - tail) * samples) - 1]


def print_summary(
    rates: dict[str, list[float]],
    startup: dict[str, float],
    baseline: str,
    width: int = 36,
) -> None:
    """Each engine's tokens/s and its per-round ratio to `baseline`."""
    print(
        f"{'engine':{width}s} {'start s':>8s} {'median tok/s':>13s} "
        f"{'min':>9s} {'max':>9s}   vs {baseline} per round: median "
        "[95% CI] (min..max)"
    )
    for name, values in rates.items():
        print(
            f"{name:{width}s} {startup[name]:8.1f} "
            f"{statistics.median(values):13.1f} {min(values):9.1f} "
            f"{max(values):9.1f}   " + ratio_text(rates, name, baseline)
        )


def ratio_text(rates: dict[str, list[float]], name: str, baseline: str) -> str:
    """'median [low, high] (min..max)' of name / baseline, round by round."""
    ratios = [ours / base for ours, base in zip(rates[name], rates[baseline])]
    low, high = median_interval(ratios)
    return (
        f"{statistics.median(ratios):.3f} [{low:.3f}, {high:.3f}] "
        f"({min(ratios):.3f}..{max(ratios):.3f})"
    )
