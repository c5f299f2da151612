# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""What exactness costs: output tokens/s of the TorchTitan Qwen3 (a generic
model) in vLLM's default configuration (Inductor, CUDA graphs) and in the
exact configuration (`exact_engine_args`: batch-invariant kernels,
Inductor with the options the trainer compiles with), side by side in one
process.

    python benchmarks/benchmark_exact_logprobs.py --size 0.6b   # GPU
    python benchmarks/benchmark_exact_logprobs.py --size 8b     # GPU

`--graphs` adds the exact configuration without Inductor
(`exact_engine_args(inductor=False)`: CUDA graphs for decode steps).
`--breakdown` adds an engine that is not exact, CUDA graphs without
Inductor and without batch-invariant mode, to split that configuration's
cost between its two parts.

All engines stay resident and are timed in interleaved rounds
(interleaved_rounds.py) on the RL workload: sampling at temperature 1
with the sampled tokens' log-probabilities (`logprobs=0`). Weights are
dummy. `benchmarks/logprob_parity.py --exact` measures the exactness.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples/offline_inference/torchtitan_qwen3"))

from benchmark_torchtitan_qwen3 import SIZES, hf_config, variant  # noqa: E402
from interleaved_rounds import (  # noqa: E402
    parse_args,
    print_summary,
    run_rounds,
    start_engine,
    token_prompts,
)
from model import ARCH  # noqa: E402

DEFAULT = "default (Inductor + CUDA graphs)"
EXACT = "exact (batch-invariant, Inductor as the trainer)"
EXACT_GRAPHS = "exact, no Inductor (batch-invariant, CUDA graphs)"
NO_INDUCTOR = "CUDA graphs, no Inductor (not batch-invariant)"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="0.6b")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also time the two parts of the exact configuration without "
        "Inductor apart",
    )
    parser.add_argument(
        "--graphs",
        action="store_true",
        help="also time the exact configuration without Inductor",
    )
    args = parse_args(parser)

    from vllm import ModelRegistry, SamplingParams
    from vllm.model_executor.layers.exact_logprobs import (
        EXACT_COMPILATION,
        exact_engine_args,
    )

    ModelRegistry.register_model(ARCH, variant())
    config = hf_config(ARCH, SIZES[args.size], args.dtype)
    llms, startup = {}, {}
    # the default engine first: exact_engine_args turns batch-invariant
    # mode on for every engine started after it
    llms[DEFAULT], startup[DEFAULT] = start_engine(DEFAULT, config, args)
    if args.breakdown:
        llms[NO_INDUCTOR], startup[NO_INDUCTOR] = start_engine(
            NO_INDUCTOR,
            config,
            args,
            compilation_config=EXACT_COMPILATION,
        )
    llms[EXACT], startup[EXACT] = start_engine(
        EXACT, config, args, **exact_engine_args()
    )
    if args.graphs or args.breakdown:
        llms[EXACT_GRAPHS], startup[EXACT_GRAPHS] = start_engine(
            EXACT_GRAPHS, config, args, **exact_engine_args(inductor=False)
        )

    prompts = token_prompts(args.num_prompts, args.input_len)
    params = SamplingParams(
        max_tokens=args.output_len,
        temperature=1.0,
        seed=0,
        logprobs=0,
        ignore_eos=True,
        detokenize=False,
    )
    rates = run_rounds(llms, prompts, params, args.rounds, args.warmup_rounds)
    print(
        f"\n{args.size}: {args.num_prompts} prompts x {args.input_len} in / "
        f"{args.output_len} out, {args.dtype}, temperature 1 with logprobs, "
        f"{args.rounds} interleaved rounds after {args.warmup_rounds} warm-up"
    )
    print_summary(rates, startup, baseline=DEFAULT)


if __name__ == "__main__":
    main()
