# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Output tokens/s of the Megatron-core decoder
(examples/offline_inference/custom_model_with_megatron.py: Megatron's
tensor-parallel layers, built by a factory) against vLLM's native
LlamaForCausalLM of the same shape, side by side in one process.

    python benchmarks/benchmark_megatron.py --size 1b     # GPU
    python benchmarks/benchmark_megatron.py --size small  # CPU

The decoder's MLP is GELU(fc1) -> fc2, Llama's SiLU(gate) * up -> down:
its `ffn_size` is 1.5x Llama's `intermediate_size`, so both models have
the same parameters and GEMM FLOPs per token. Engines stay resident and
are timed in interleaved rounds (interleaved_rounds.py); dummy weights,
greedy sampling with ignore_eos, vLLM's defaults (torch.compile, CUDA
graphs) unless --enforce-eager.
"""

import argparse
import os
import sys
from pathlib import Path

# importing Megatron-core initialises CUDA here: the engine cannot fork
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples/offline_inference"))

from interleaved_rounds import (
    parse_args,
    print_summary,
    run_rounds,
    start_engine,
    token_prompts,
)

# the Llama shape: (vocab, hidden, layers, heads, kv heads, head_dim, intermediate)
SIZES = {
    "1b": (128256, 2048, 16, 32, 8, 64, 8192),  # Llama-3.2-1B's
    "small": (8192, 256, 4, 4, 2, 64, 768),
}


def configs(size: str, dtype: str) -> tuple[dict, dict]:
    """config.json of the native Llama and of the Megatron decoder."""
    vocab, hidden, layers, heads, kv_heads, head_dim, intermediate = SIZES[size]
    llama = dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        torch_dtype=dtype,
    )
    from custom_model_with_megatron import ARCH

    megatron = dict(
        llama,
        architectures=[ARCH],
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        ffn_size=intermediate * 3 // 2,
        intermediate_size=intermediate * 3 // 2,
    )
    return llama, megatron


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="small")
    args = parse_args(parser)

    from custom_model_with_megatron import ARCH, build_megatron_decoder

    from vllm import ModelRegistry, SamplingParams

    ModelRegistry.register_model(ARCH, build_megatron_decoder)
    native, megatron = "native Llama", "Megatron-core decoder (generic)"
    llama_config, megatron_config = configs(args.size, args.dtype)
    prompts = token_prompts(args.num_prompts, args.input_len)
    params = SamplingParams(
        max_tokens=args.output_len, temperature=0.0, ignore_eos=True, detokenize=False
    )
    llms, startup = {}, {}
    for name, config in ((native, llama_config), (megatron, megatron_config)):
        llms[name], startup[name] = start_engine(name, config, args)

    rates = run_rounds(llms, prompts, params, args.rounds, args.warmup_rounds)
    print(
        f"\n{args.size}: {args.num_prompts} prompts x {args.input_len} in / "
        f"{args.output_len} out, {args.dtype}, eager={args.enforce_eager}, "
        f"{args.rounds} interleaved rounds after {args.warmup_rounds} "
        "warm-up rounds"
    )
    print_summary(rates, startup, baseline=native)


if __name__ == "__main__":
    main()
