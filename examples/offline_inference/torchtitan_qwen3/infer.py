# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Generate with a TorchTitan Qwen3 checkpoint in vLLM.

    python examples/offline_inference/torchtitan_qwen3/infer.py \
        --model-path CKPT_DIR --prompt "Hello" [--prompts-file FILE] \
        [--max-tokens 100] [--temperature 0.8] [--top-p 0.95] \
        [--tensor-parallel-size 1]

CKPT_DIR holds config.json, tokenizer files and safetensors, a torch.save
state dict or a DCP checkpoint (see checkpoint.py). All prompts run in one
batch; each is printed with its completion.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from checkpoint import prepare_model_dir  # noqa: E402
from model import register  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument(
        "--prompt", action="append", default=[], help="a prompt (repeatable)"
    )
    parser.add_argument("--prompts-file", help="a file with one prompt per line")
    parser.add_argument("--max-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--enforce-eager",
        action="store_true",
        help="no torch.compile or CUDA graphs: faster start, slower steps",
    )
    parser.add_argument(
        "--compilation-config",
        type=json.loads,
        help="vLLM's compilation config as JSON, as `vllm serve -cc` takes it; "
        'e.g. \'{"backend": "eager"}\' traces the model without Inductor',
    )
    args = parser.parse_args(argv)
    if args.prompts_file:
        lines = Path(args.prompts_file).read_text().splitlines()
        args.prompt += [line for line in lines if line.strip()]
    if not args.prompt:
        parser.error("give --prompt or --prompts-file")
    return args


def main(argv=None):
    args = parse_args(argv)
    from vllm import LLM, SamplingParams

    if args.tensor_parallel_size > 1 and not _has_cuda():
        os.environ.setdefault(
            "VLLM_CPU_OMP_THREADS_BIND",
            "|".join(map(str, range(args.tensor_parallel_size))),
        )
    register()
    llm = LLM(
        model=str(prepare_model_dir(args.model_path)),
        tensor_parallel_size=args.tensor_parallel_size,
        gpu_memory_utilization=0.5 if _has_cuda() else 0.3,
        seed=args.seed,
        enforce_eager=args.enforce_eager,
        compilation_config=args.compilation_config,
    )
    outputs = llm.generate(
        args.prompt,
        SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p
        ),
    )
    for output in outputs:
        print(f"Prompt: {output.prompt!r}")
        print(f"Completion: {output.outputs[0].text!r}")
        print()


def _has_cuda():
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
