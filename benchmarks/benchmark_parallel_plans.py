# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Output tokens/s of a plain PyTorch Llama sharded from its `_tp_plan`
(examples/offline_inference/parallel_plans/plain_llama.py) against vLLM's
native LlamaForCausalLM of the same shape at the same tensor/pipeline-
parallel sizes, and against itself at TP=1, side by side in one process.

    python benchmarks/benchmark_parallel_plans.py --size 1b \\
        --tensor-parallel-size 2                                  # 2 GPUs
    python benchmarks/benchmark_parallel_plans.py --size small \\
        --tensor-parallel-size 2                                  # CPU

Engines stay resident and are timed in interleaved rounds
(interleaved_rounds.py). Reported: each engine's median tokens/s, and the
per-round ratios (median [95% CI] (min..max)) of the plan-sharded model to
native at the same sizes and to itself at TP=1. Dummy weights, greedy
sampling with ignore_eos, vLLM's defaults (torch.compile, CUDA graphs)
unless --enforce-eager.
"""

import argparse
import functools
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples/offline_inference/parallel_plans"))

from interleaved_rounds import (
    parse_args,
    print_summary,
    ratio_text,
    run_rounds,
    start_engine,
    token_prompts,
)
from plain_llama import ARCH, LlamaConfig, build_plain_llama  # noqa: E402

SIZES = {
    # Llama-3.2-1B's shape (its rope scaling left out, in both models)
    "1b": LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        intermediate_size=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    ),
    # Llama-3.1-8B's shape
    "8b": LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=14336,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
    "small": LlamaConfig(
        vocab_size=8192,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=768,
        tie_word_embeddings=True,
    ),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--tensor-parallel-size", type=int, default=2)
    parser.add_argument("--pipeline-parallel-size", type=int, default=1)
    parser.add_argument(
        "--untied",
        action="store_true",
        help="a separate lm_head (colwise_rep) instead of one tied to the embedding",
    )
    parser.add_argument(
        "--unfused",
        action="store_true",
        help="add the plain Llama with q/k/v and gate/up as separate GEMMs "
        "(factory attribute fuse_projections = False)",
    )
    args = parse_args(parser)
    import torch

    tp, pp = args.tensor_parallel_size, args.pipeline_parallel_size
    if not torch.cuda.is_available() and tp * pp > 1:
        os.environ.setdefault(
            "VLLM_CPU_OMP_THREADS_BIND",
            "|".join(str(rank % (os.cpu_count() or 1)) for rank in range(tp * pp)),
        )
    config = SIZES[args.size]
    if args.untied:
        config = replace(config, tie_word_embeddings=False)

    from vllm import ModelRegistry, SamplingParams

    ModelRegistry.register_model(ARCH, build_plain_llama)
    unfused_factory = functools.partial(build_plain_llama)
    unfused_factory.fuse_projections = False
    ModelRegistry.register_model(ARCH + "Unfused", unfused_factory)
    native = f"native Llama, TP={tp} PP={pp}"
    plan = f"plain Llama from plans, TP={tp} PP={pp}"
    # name: (architecture, tensor-parallel size, pipeline-parallel size)
    engines = {native: ("LlamaForCausalLM", tp, pp), plan: (ARCH, tp, pp)}
    if args.unfused:
        engines[f"plain Llama unfused, TP={tp} PP={pp}"] = (ARCH + "Unfused", tp, pp)
    plan_tp1 = "plain Llama, TP=1"
    if tp * pp > 1:
        engines[plan_tp1] = (ARCH, 1, 1)

    prompts = token_prompts(args.num_prompts, args.input_len)
    params = SamplingParams(
        max_tokens=args.output_len, temperature=0.0, ignore_eos=True, detokenize=False
    )
    llms, startup = {}, {}
    for name, (arch, engine_tp, engine_pp) in engines.items():
        llms[name], startup[name] = start_engine(
            name,
            dict(
                asdict(config),
                architectures=[arch],
                model_type="llama",
                torch_dtype=args.dtype,
            ),
            args,
            tensor_parallel_size=engine_tp,
            pipeline_parallel_size=engine_pp,
        )

    rates = run_rounds(llms, prompts, params, args.rounds, args.warmup_rounds)
    print(
        f"\n{args.size} (tie_word_embeddings={config.tie_word_embeddings})"
        f": {args.num_prompts} prompts x {args.input_len} in / "
        f"{args.output_len} out, {args.dtype}, eager={args.enforce_eager},"
        f" {args.rounds} interleaved rounds after {args.warmup_rounds} "
        "warm-up rounds"
    )
    print_summary(rates, startup, baseline=native, width=40)
    if plan_tp1 in rates:
        print(f"{plan} vs {plan_tp1} per round: {ratio_text(rates, plan, plan_tp1)}")


if __name__ == "__main__":
    main()
