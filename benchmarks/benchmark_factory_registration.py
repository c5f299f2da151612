# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Engine start time and generation throughput of one module registered
as a vLLM model class and through a factory, side by side in one run.

    python benchmarks/benchmark_factory_registration.py [--rounds 2]

Runs alternate (class, factory, factory, class, ...) so drift in the
machine's speed affects both alike; prints the means and the ratios
factory / class. The model is tests/models/tiny_decoder.py at a larger
size, with random weights, on whatever device vLLM picks.
"""

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.models.tiny_decoder import TinyConfig, write_checkpoint  # noqa


def run_once(model_dir, arch, args):
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(
        model=str(model_dir),
        hf_overrides={"architectures": [arch]},
        skip_tokenizer_init=True,
        dtype=args.dtype,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=1024,
        seed=0,
    )
    started = time.perf_counter() - start
    prompts = [
        {"prompt_token_ids": [(7 * i + j) % 1000 + 1 for j in range(args.prompt_len)]}
        for i in range(args.num_prompts)
    ]
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True, detokenize=False
    )
    llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    del llm
    gc.collect()
    return started, tokens / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    args = parser.parse_args()

    from vllm import ModelRegistry

    ModelRegistry.register_model(
        "BenchAsClass", "tests.models.tiny_decoder:TinyDecoderForCausalLM"
    )
    ModelRegistry.register_model(
        "BenchAsFactory",
        lambda vllm_config, parallel_context: __import__(
            "tests.models.tiny_decoder", fromlist=["build_tiny_decoder"]
        ).build_tiny_decoder(vllm_config, parallel_context),
    )

    config = TinyConfig(
        vocab_size=4096,
        hidden_size=512,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        intermediate_size=1536,
        max_position_embeddings=1024,
    )
    results = {"BenchAsClass": [], "BenchAsFactory": []}
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp), config)
        run_once(tmp, "BenchAsClass", args)  # imports, caches
        order = ["BenchAsClass", "BenchAsFactory"]
        for round_ in range(args.rounds):
            for arch in order if round_ % 2 == 0 else order[::-1]:
                results[arch].append(run_once(tmp, arch, args))
                print(
                    f"round {round_} {arch}: start "
                    f"{results[arch][-1][0]:.2f} s, "
                    f"{results[arch][-1][1]:.1f} output tok/s",
                    flush=True,
                )

    mean = lambda values: sum(values) / len(values)
    cls_start = mean([r[0] for r in results["BenchAsClass"]])
    fac_start = mean([r[0] for r in results["BenchAsFactory"]])
    cls_tput = mean([r[1] for r in results["BenchAsClass"]])
    fac_tput = mean([r[1] for r in results["BenchAsFactory"]])
    print(f"\nclass   : start {cls_start:.2f} s, {cls_tput:.1f} output tok/s")
    print(f"factory : start {fac_start:.2f} s, {fac_tput:.1f} output tok/s")
    print(
        f"ratios factory/class: throughput {fac_tput / cls_tput:.3f} "
        f"(target >= 0.99), start time {fac_start / cls_start:.3f} "
        f"(target 0.98..1.02)"
    )


if __name__ == "__main__":
    main()
