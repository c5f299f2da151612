# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Output tokens/s of vLLM's native Qwen3ForCausalLM and of the TorchTitan
Qwen3 (a factory-built generic model) on the same config, prompts and
sampling, side by side in one process.

    python benchmarks/benchmark_torchtitan_qwen3.py --size 0.6b   # GPU
    python benchmarks/benchmark_torchtitan_qwen3.py --size small  # CPU

All engines are started first and stay up; then each round times one
generate() on each engine in turn, so drift of a shared or noisy machine
hits every engine alike. The ratio reported is the median over rounds of
(engine tok/s) / (native tok/s) in the same round.

Weights are dummy (random) in every engine, as for any speed run; engines
run with vLLM's defaults (torch.compile, CUDA graphs) unless
--enforce-eager. `--ours-torch-linear` adds the TorchTitan model with its
nn.Linear layers left on PyTorch's GEMM (factory attribute
`use_vllm_linear_method = False`); `--ours-no-compile` runs it without
torch.compile (`supports_torch_compile = False`).
"""

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples/offline_inference/torchtitan_qwen3"))

from model import ARCH, Qwen3Config, build_qwen3  # noqa: E402

SIZES = {
    # Qwen3-0.6B
    "0.6b": Qwen3Config(),
    "small": Qwen3Config(vocab_size=8192, hidden_size=256,
                         num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64,
                         intermediate_size=768, max_position_embeddings=2048),
}
NATIVE = "native Qwen3ForCausalLM"


def write_config(path: Path, arch: str, config: Qwen3Config, dtype: str):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(dict(
        asdict(config), architectures=[arch], model_type="qwen3",
        torch_dtype=dtype)))


def variant(supports_torch_compile=True, use_vllm_linear_method=True):
    """build_qwen3 with other factory attributes. A partial carries them to
    vLLM's processes (build_qwen3 itself is pickled by reference)."""
    factory = functools.partial(build_qwen3)
    factory.supports_torch_compile = supports_torch_compile
    factory.use_vllm_linear_method = use_vllm_linear_method
    return factory


def start_engine(model_dir, args):
    from vllm import LLM
    start = time.perf_counter()
    llm = LLM(model=str(model_dir), load_format="dummy",
              skip_tokenizer_init=True, dtype=args.dtype, seed=0,
              max_model_len=args.input_len + args.output_len + 16,
              gpu_memory_utilization=args.gpu_memory_utilization,
              enforce_eager=args.enforce_eager)
    return llm, time.perf_counter() - start


def tokens_per_second(llm, prompts, params) -> float:
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="per engine (default 0.25 on CUDA, else 0.1)")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--ours-no-compile", action="store_true")
    parser.add_argument("--ours-torch-linear", action="store_true")
    args = parser.parse_args()
    if args.gpu_memory_utilization is None:
        import torch
        args.gpu_memory_utilization = (0.25 if torch.cuda.is_available()
                                       else 0.1)

    from vllm import ModelRegistry, SamplingParams
    compile_ours = not args.ours_no_compile
    # name: (architecture, factory to register)
    engines = {
        NATIVE: ("Qwen3ForCausalLM", None),
        "TorchTitan Qwen3 (generic)": (ARCH, variant(compile_ours)),
    }
    if args.ours_torch_linear:
        engines["TorchTitan Qwen3, torch nn.Linear"] = (
            ARCH + "TorchLinear", variant(compile_ours, False))

    prompts = [{"prompt_token_ids": [(31 * i + 7 * j) % 5000 + 10
                                     for j in range(args.input_len)]}
               for i in range(args.num_prompts)]
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0,
                            ignore_eos=True, detokenize=False)
    llms, startup = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, (arch, factory)) in enumerate(engines.items()):
            if factory is not None:
                ModelRegistry.register_model(arch, factory)
            model_dir = Path(tmp) / str(index)
            write_config(model_dir, arch, SIZES[args.size], args.dtype)
            llms[name], startup[name] = start_engine(model_dir, args)
            llms[name].generate(prompts, params, use_tqdm=False)  # warm-up
            print(f"{name}: started in {startup[name]:.1f} s", flush=True)

    rates = {name: [] for name in llms}
    for round_index in range(args.rounds):
        for name, llm in llms.items():
            rates[name].append(tokens_per_second(llm, prompts, params))
        print(f"round {round_index + 1}: " + ", ".join(
            f"{name} {rates[name][-1]:.1f}" for name in llms), flush=True)

    print(f"\n{args.size}: {args.num_prompts} prompts x {args.input_len} in "
          f"/ {args.output_len} out, {args.dtype}, eager="
          f"{args.enforce_eager}, generic model compiled={compile_ours}, "
          f"{args.rounds} interleaved rounds")
    print(f"{'engine':36s} {'start s':>8s} {'median tok/s':>13s} "
          f"{'min':>9s} {'max':>9s} {'vs native (median of rounds)':>29s}")
    for name in llms:
        ratio = statistics.median(
            ours / native for ours, native in zip(rates[name], rates[NATIVE]))
        print(f"{name:36s} {startup[name]:8.1f} "
              f"{statistics.median(rates[name]):13.1f} "
              f"{min(rates[name]):9.1f} {max(rates[name]):9.1f} "
              f"{ratio:29.3f}")


if __name__ == "__main__":
    main()
