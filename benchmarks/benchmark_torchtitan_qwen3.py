# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Output tokens/s of vLLM's native Qwen3ForCausalLM and of the TorchTitan
Qwen3 (a factory-built generic model) on the same config, prompts and
sampling, one engine after the other in one process.

    python benchmarks/benchmark_torchtitan_qwen3.py --size 0.6b   # GPU
    python benchmarks/benchmark_torchtitan_qwen3.py --size small  # CPU

Weights are dummy (random) in both, as for any speed run; the two engines
run with vLLM's defaults unless --enforce-eager or --ours-cudagraph-mode.
"""

import argparse
import gc
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples/offline_inference/torchtitan_qwen3"))

import model as torchtitan_qwen3  # noqa: E402
from model import ARCH, Qwen3Config, register  # noqa: E402

SIZES = {
    # Qwen3-0.6B
    "0.6b": Qwen3Config(),
    "small": Qwen3Config(vocab_size=8192, hidden_size=256,
                         num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64,
                         intermediate_size=768, max_position_embeddings=2048),
}


def write_config(path: Path, arch: str, config: Qwen3Config, dtype: str):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(dict(
        asdict(config), architectures=[arch], model_type="qwen3",
        torch_dtype=dtype)))


def run(model_dir, args, compilation_config=None):
    from vllm import LLM, SamplingParams
    kwargs = dict(model=str(model_dir), load_format="dummy",
                  skip_tokenizer_init=True, dtype=args.dtype, seed=0,
                  max_model_len=args.input_len + args.output_len + 16,
                  gpu_memory_utilization=args.gpu_memory_utilization,
                  enforce_eager=args.enforce_eager)
    if compilation_config:
        kwargs["compilation_config"] = compilation_config
    start = time.perf_counter()
    llm = LLM(**kwargs)
    startup = time.perf_counter() - start
    prompts = [{"prompt_token_ids": [(31 * i + 7 * j) % 5000 + 10
                                     for j in range(args.input_len)]}
               for i in range(args.num_prompts)]
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0,
                            ignore_eos=True, detokenize=False)
    llm.generate(prompts[:4], params, use_tqdm=False)  # warm-up
    best = 0.0
    for _ in range(args.repeats):
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        best = max(best, tokens / elapsed)
    del llm
    gc.collect()
    try:
        import torch
        torch.cuda.empty_cache()
    except Exception:
        pass
    return startup, best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.35)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--ours-no-compile", action="store_true",
                        help="run the generic model without torch.compile "
                        "(clears build_qwen3.supports_torch_compile)")
    parser.add_argument("--ours-cudagraph-mode", default=None,
                        help="e.g. FULL_DECODE_ONLY: CUDA graphs for the "
                        "generic model, which vLLM does not torch.compile")
    args = parser.parse_args()
    if args.ours_no_compile:
        torchtitan_qwen3.build_qwen3.supports_torch_compile = False
    register()
    config = SIZES[args.size]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        native = Path(tmp) / "native"
        ours = Path(tmp) / "torchtitan"
        write_config(native, "Qwen3ForCausalLM", config, args.dtype)
        write_config(ours, ARCH, config, args.dtype)
        results["native Qwen3ForCausalLM"] = run(native, args)
        print("native:", results["native Qwen3ForCausalLM"], flush=True)
        results["TorchTitan Qwen3 (generic)"] = run(ours, args)
        print("ours:", results["TorchTitan Qwen3 (generic)"], flush=True)
        if args.ours_cudagraph_mode:
            name = f"TorchTitan Qwen3, cudagraph {args.ours_cudagraph_mode}"
            results[name] = run(ours, args, {
                "cudagraph_mode": args.ours_cudagraph_mode})
            print("ours+graphs:", results[name], flush=True)
    base = results["native Qwen3ForCausalLM"][1]
    print(f"\n{args.size}: {args.num_prompts} prompts x {args.input_len} in "
          f"/ {args.output_len} out, {args.dtype}, eager="
          f"{args.enforce_eager}, generic model compiled="
          f"{not args.ours_no_compile}")
    print(f"{'model':42s} {'start s':>8s} {'out tok/s':>10s} "
          f"{'vs native':>10s}")
    for name, (startup, tput) in results.items():
        print(f"{name:42s} {startup:8.1f} {tput:10.1f} {tput / base:10.3f}")


if __name__ == "__main__":
    main()
