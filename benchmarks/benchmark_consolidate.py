# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Peak memory and speed of `vllm consolidate` on a DeepSpeed ZeRO
checkpoint, against DeepSpeed's own conversion (`zero_to_fp32`) and a
load-everything baseline, on the same checkpoint.

    python benchmarks/benchmark_consolidate.py --hidden 1024 --layers 8 --stage 3

DeepSpeed writes the checkpoint first (two CPU ranks, one optimiser step
of a Llama of the given size); each method then runs in a fresh process,
whose peak resident memory the kernel reports (`wait4`).
"""

import argparse
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("PYTHONWARNINGS", "ignore")

METHODS = {
    "vllm consolidate (streamed)": """
from vllm.model_executor.model_loader.consolidate import consolidate
consolidate(CKPT, OUT, max_shard_size=SHARD)
""",
    "DeepSpeed convert_zero_checkpoint_to_fp32_state_dict": """
from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict as convert_zero_checkpoint_to_fp32_state_dict  # noqa: E501
convert_zero_checkpoint_to_fp32_state_dict(CKPT, OUT, safe_serialization=True,
                                           max_shard_size=SHARD)
""",
    "load everything, then save": """
import os; from safetensors.torch import save_file; from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: E501
state = get_fp32_state_dict_from_zero_checkpoint(CKPT)
os.makedirs(OUT)
save_file({k: v.contiguous() for k, v in state.items()},
          os.path.join(OUT, "model.safetensors"))
""",
}


def write_checkpoint(out: str, hidden: int, layers: int, stage: int):
    """Runs under the deepspeed launcher."""
    import deepspeed
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        config={
            "train_batch_size": 2,
            "train_micro_batch_size_per_gpu": 1,
            "optimizer": {"type": "Adam", "params": {"lr": 1e-4, "torch_adam": True}},
            "zero_optimization": {"stage": stage},
        },
    )
    ids = torch.randint(0, 32000, (1, 8))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    engine.save_checkpoint(out)
    if engine.global_rank == 0:
        model.config.save_pretrained(out)


def run_method(
    code: str, checkpoint: Path, out: Path, shard: str
) -> tuple[float, float]:
    """(seconds, peak RSS in GB) of `code` in a fresh process."""
    # imports first and untimed: importing vllm costs seconds and memory
    # that do not grow with the checkpoint (measured apart, below)
    first, _, work = code.strip().partition("\n")
    program = (
        f"CKPT, OUT, SHARD = {str(checkpoint)!r}, {str(out)!r}, "
        f"{shard!r}\n"
        f"import time\n{first}\nstart = time.perf_counter()\n"
        f"{work}\nprint(time.perf_counter() - start)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", program], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise RuntimeError(process.stderr.read().decode()[-3000:])
    seconds = float(process.stdout.read().decode().split()[-1])
    return seconds, usage.ru_maxrss / 1e6  # KiB on Linux -> ~GB


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--stage", type=int, default=3, choices=[1, 2, 3])
    parser.add_argument("--max-shard-size", default="256MB")
    parser.add_argument("--write", help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()
    if args.write:
        write_checkpoint(args.write, args.hidden, args.layers, args.stage)
        return

    work = Path(tempfile.mkdtemp(prefix="consolidate-bench-"))
    try:
        checkpoint = work / "ckpt"
        print(
            f"writing a ZeRO-{args.stage} checkpoint (hidden "
            f"{args.hidden}, {args.layers} layers) with DeepSpeed ...",
            flush=True,
        )
        launcher = Path(sys.executable).parent / "deepspeed"
        writer = subprocess.run(
            [
                str(launcher),
                "--num_gpus",
                "2",
                __file__,
                "--hidden",
                str(args.hidden),
                "--layers",
                str(args.layers),
                "--stage",
                str(args.stage),
                "--write",
                str(checkpoint),
            ],
            capture_output=True,
            text=True,
        )
        if writer.returncode != 0:
            sys.exit(
                f"DeepSpeed could not write the checkpoint (exit "
                f"{writer.returncode}; each of its two ranks holds the "
                "whole model and Adam's states while it trains, and "
                "the kernel kills it when memory runs out: try fewer "
                "--layers). Its last output:\n"
                + (writer.stdout + writer.stderr)[-2000:]
            )
        from safetensors import safe_open

        rows = []
        for index, (name, code) in enumerate(METHODS.items()):
            out = work / f"out{index}"
            print(f"  {name} ...", flush=True)
            seconds, peak = run_method(code, checkpoint, out, args.max_shard_size)
            size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
            largest = 0
            for shard in out.glob("*.safetensors"):
                with safe_open(str(shard), "pt") as file:
                    for key in file.keys():  # noqa: SIM118
                        shape = file.get_slice(key).get_shape()
                        largest = max(largest, 4 * math.prod(shape))
            rows.append((name, seconds, size / 1e9 / seconds, peak, size, largest))
            shutil.rmtree(out)
        size, largest = rows[0][4], rows[0][5]
        print(
            f"\nZeRO-{args.stage}, 2 ranks: {size / 1e9:.2f} GB of fp32 "
            f"weights, largest tensor {largest / 1e9:.3f} GB, output "
            f"shards of at most {args.max_shard_size}"
        )
        print(f"{'method':55s} {'s':>7s} {'GB/s':>6s} {'peak RSS GB':>12s}")
        for name, seconds, rate, peak, _, _ in rows:
            print(f"{name:55s} {seconds:7.1f} {rate:6.2f} {peak:12.2f}")
        imports = {}
        for name, code in METHODS.items():
            first = code.strip().partition("\n")[0]
            process = subprocess.Popen(
                [sys.executable, "-c", first],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            imports[name] = os.wait4(process.pid, 0)[2].ru_maxrss / 1e6
        print(
            "(seconds: the conversion alone; peak RSS: the whole process, "
            "of which the imports alone take: "
            + ", ".join(f"{imports[name]:.2f} GB" for name in METHODS)
            + ")"
        )
        ours = rows[0][3] - imports[next(iter(METHODS))]
        print(
            f"vllm consolidate above its imports: {ours:.2f} GB; bound: "
            f"largest tensor {largest / 1e9:.2f} GB + one output shard "
            f"({args.max_shard_size}) + a constant"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
