# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""`vllm consolidate`: training checkpoints (DeepSpeed ZeRO, sharded
Hugging Face, torch DCP) into directories vLLM loads. The work is
`vllm.model_executor.model_loader.consolidate`; this is its command."""

import argparse
import glob
import sys
import time
import typing
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from vllm.entrypoints.cli.types import CLISubcommand

if typing.TYPE_CHECKING:
    from vllm.utils.argparse_utils import FlexibleArgumentParser
else:
    FlexibleArgumentParser = argparse.ArgumentParser


class ConsolidateSubcommand(CLISubcommand):
    """The `consolidate` subcommand for the vLLM CLI."""

    name = "consolidate"

    @staticmethod
    def cmd(args: argparse.Namespace) -> None:
        sys.exit(run_batch(args) if args.batch else run_one(args))

    def subparser_init(
        self, subparsers: argparse._SubParsersAction
    ) -> FlexibleArgumentParser:
        parser = subparsers.add_parser(
            "consolidate",
            help="Turn DeepSpeed ZeRO, sharded Hugging Face or DCP "
            "checkpoints into directories vLLM loads.",
            description=__doc__.split("\n\n")[0],
            usage="vllm consolidate --input DIR --output DIR [options]\n"
            "       vllm consolidate --batch (--input-dir DIR | "
            "--input-pattern GLOB | --input-list FILE) --output-dir DIR",
        )
        add_arguments(parser)
        return parser


def add_arguments(parser) -> None:
    one = parser.add_argument_group("one checkpoint")
    one.add_argument("--input", help="checkpoint directory or file")
    one.add_argument(
        "--output", help="directory to write (must not exist unless --force)"
    )
    parser.add_argument(
        "--type",
        default="auto",
        choices=["auto", "deepspeed", "hf_sharded", "dcp", "single"],
    )
    parser.add_argument(
        "--checkpoint-dir", help="where the weights are, if not in --input"
    )
    parser.add_argument(
        "--base-model",
        help="directory to copy config.json "
        "and tokenizer files from when the input lacks them",
    )
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    parser.add_argument(
        "--keep-original-precision",
        action="store_true",
        help="DeepSpeed: the module's own weights, not the fp32 master weights",
    )
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument(
        "--pytorch-bin",
        action="store_true",
        help="write .bin shards instead of safetensors",
    )
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--no-validate", action="store_true")
    parser.add_argument(
        "--validate-load", action="store_true", help="also load the result in vllm.LLM"
    )
    batch = parser.add_argument_group("batch")
    batch.add_argument("--batch", action="store_true")
    batch.add_argument("--input-dir", help="every sub-directory is a run")
    batch.add_argument("--input-pattern", help="glob of run directories")
    batch.add_argument("--input-list", help="file: one run directory a line")
    batch.add_argument("--output-dir")
    batch.add_argument(
        "--all-checkpoints",
        action="store_true",
        help="every checkpoint-N / global_stepN, not only the latest",
    )
    batch.add_argument(
        "--checkpoint-filter",
        help="glob on checkpoint folder names, e.g. 'checkpoint-*000'",
    )
    batch.add_argument(
        "--naming-template",
        default=None,
        help="output names; {input_name}, {step}, "
        "{checkpoint_name} (default: {input_name}, or "
        "{input_name}_step_{step} with --all-checkpoints)",
    )
    batch.add_argument("--max-workers", type=int, default=1)
    batch.add_argument("--dry-run", action="store_true")
    batch.add_argument("--continue-on-error", action="store_true")


def _options(args) -> dict:
    return dict(
        checkpoint_type=args.type,
        base_model=args.base_model,
        dtype=args.dtype,
        keep_original_precision=args.keep_original_precision,
        max_shard_size=args.max_shard_size,
        pytorch_bin=args.pytorch_bin,
        force=args.force,
        validate=not args.no_validate,
    )


def run_one(args) -> int:
    from tqdm import tqdm

    from vllm.model_executor.model_loader.consolidate import (
        ConsolidateError,
        consolidate,
    )

    if not args.input or not args.output:
        print(
            "vllm consolidate: --input and --output are required (or --batch)",
            file=sys.stderr,
        )
        return 2
    start = time.perf_counter()
    with tqdm(unit="B", unit_scale=True, desc="consolidating") as bar:
        try:
            result = consolidate(
                args.input,
                args.output,
                checkpoint_dir=args.checkpoint_dir,
                progress=bar.update,
                **_options(args),
            )
        except ConsolidateError as e:
            bar.close()
            print(f"vllm consolidate: {e}", file=sys.stderr)
            return 1
    seconds = time.perf_counter() - start
    print(
        f"{result.checkpoint_type} -> {result.output}: "
        f"{result.num_tensors} tensors, {result.num_bytes / 1e9:.3f} GB in "
        f"{len(result.shards)} file(s), {seconds:.1f} s "
        f"({result.num_bytes / 1e9 / max(seconds, 1e-9):.2f} GB/s)"
    )
    for note in result.notes:
        print(f"  note: {note}")
    if args.validate_load:
        return validate_load(result.output)
    return 0


# token ids every vocabulary has
VALIDATION_PROMPT = [1, 2, 3, 4]


def validate_load(directory: Path) -> int:
    """Load the consolidated directory in `vllm.LLM` and generate a few
    greedy tokens; 0 on success, 1 (with the reason) on failure."""
    from vllm import LLM, SamplingParams
    from vllm.config import CompilationMode

    try:
        llm = LLM(
            model=str(directory),
            max_model_len=256,
            gpu_memory_utilization=0.1,
            skip_tokenizer_init=True,
            # a load check: Inductor and CUDA graphs would only add minutes
            # to it. One Dynamo trace without Inductor, not eager mode:
            # vLLM's eager CPU kernels need instructions not every CPU has.
            compilation_config={
                "mode": CompilationMode.DYNAMO_TRACE_ONCE,
                "backend": "eager",
            },
        )
        out = llm.generate(
            [VALIDATION_PROMPT],  # one prompt of token ids
            SamplingParams(
                max_tokens=8, temperature=0.0, ignore_eos=True, detokenize=False
            ),
            use_tqdm=False,
        )
    except Exception as error:  # any reason the engine could not serve it
        print(
            f"--validate-load: vllm.LLM could not load {directory}: "
            f"{type(error).__name__}: {error}\n  The consolidated files "
            "were written; check config.json's architectures and the "
            "tensor names against the model vLLM builds for them.",
            file=sys.stderr,
        )
        return 1
    print(
        f"  loaded in vllm.LLM: greedy tokens after "
        f"{VALIDATION_PROMPT}: {list(out[0].outputs[0].token_ids)}"
    )
    return 0


def run_batch(args) -> int:
    from tqdm import tqdm

    from vllm.model_executor.model_loader.consolidate import (
        ConsolidateError,
        consolidate,
        plan_batch,
    )

    if not args.output_dir or not (
        args.input_dir or args.input_pattern or args.input_list
    ):
        print(
            "vllm consolidate --batch: --output-dir and one of "
            "--input-dir, --input-pattern, --input-list are required",
            file=sys.stderr,
        )
        return 2
    if args.input_dir:
        inputs = sorted(p for p in Path(args.input_dir).iterdir() if p.is_dir())
    elif args.input_pattern:
        inputs = sorted(Path(p) for p in glob.glob(args.input_pattern))
    else:
        inputs = [
            Path(line.strip())
            for line in Path(args.input_list).read_text().splitlines()
            if line.strip()
        ]
    template = args.naming_template or (
        "{input_name}_step_{step}" if args.all_checkpoints else "{input_name}"
    )
    try:
        jobs = plan_batch(
            inputs, args.all_checkpoints, args.checkpoint_filter, template
        )
    except ConsolidateError as e:
        print(f"vllm consolidate: {e}", file=sys.stderr)
        return 1
    output_dir = Path(args.output_dir)
    if args.dry_run:
        for job in jobs:
            print(f"{job.input_dir} -> {output_dir / job.name}")
        print(f"{len(jobs)} checkpoint(s) would be consolidated")
        return 0

    def work(job):
        start = time.perf_counter()
        try:
            result = consolidate(
                job.input_dir,
                output_dir / job.name,
                checkpoint_dir=job.checkpoint_dir,
                **_options(args),
            )
            return job, result, None, time.perf_counter() - start
        except Exception as e:  # reported in the table
            return job, None, f"{type(e).__name__}: {e}", time.perf_counter() - start

    rows = []
    with (
        ThreadPoolExecutor(max(1, args.max_workers)) as pool,
        tqdm(total=len(jobs), desc="checkpoints", unit="ckpt") as bar,
    ):
        futures = [pool.submit(work, job) for job in jobs]
        for future in as_completed(futures):
            if future.cancelled():
                continue
            job, result, error, seconds = future.result()
            rows.append((job, result, error, seconds))
            bar.update()
            if error and not args.continue_on_error:
                for pending in futures:
                    pending.cancel()  # those not started yet
    rows.sort(key=lambda row: jobs.index(row[0]))
    print(f"\n{'output':40s} {'status':7s} {'tensors':>8s} {'GB':>8s} {'s':>6s}  error")
    for job, result, error, seconds in rows:
        if result:
            print(
                f"{job.name:40s} {'ok':7s} {result.num_tensors:8d} "
                f"{result.num_bytes / 1e9:8.3f} {seconds:6.1f}"
            )
        else:
            print(
                f"{job.name:40s} {'FAILED':7s} {'':8s} {'':8s} "
                f"{seconds:6.1f}  {error.splitlines()[0]}"
            )
    failed = sum(1 for _, result, _, _ in rows if result is None)
    skipped = len(jobs) - len(rows)
    print(
        f"{len(rows) - failed} succeeded, {failed} failed"
        + (
            f", {skipped} not started (stopped at the first failure; "
            "--continue-on-error goes on)"
            if skipped
            else ""
        )
    )
    return 1 if failed else 0


def cmd_init() -> list[CLISubcommand]:
    return [ConsolidateSubcommand()]
