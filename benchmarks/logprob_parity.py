# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Trainer/generator log-probability parity with one model definition.

vLLM samples sequences from the TorchTitan Qwen3 (random weights pushed
into the running engine) and reports each sampled token's log-probability
(`SamplingParams(logprobs=0)`); the trainer recomputes them with the same
module: all sequences packed into one varlen batch (`cu_seqlens`), through
`TrainableFlashAttention`'s training path. Prints max and mean |diff| and
the fraction of tokens whose log-probabilities are bitwise equal.

    python benchmarks/logprob_parity.py --size 0.6b --dtype bfloat16           # GPU
    VLLM_BATCH_INVARIANT=1 python benchmarks/logprob_parity.py --size 0.6b \\
        --dtype bfloat16 --enforce-eager --flash-attn-version 2                # GPU
    python benchmarks/logprob_parity.py --size small --dtype float32           # CPU

With VLLM_BATCH_INVARIANT=1 the trainer's process turns on vLLM's
batch-invariant mode too, so both sides run the same GEMM, softmax and
reduction settings. `--generator-kernel` makes the trainer's attention run
the kernel vLLM runs over its paged KV cache
(`use_generator_attention_kernel`, with the engine's block size and
flash-attention version):

    VLLM_BATCH_INVARIANT=1 python benchmarks/logprob_parity.py --size 0.6b \\
        --dtype bfloat16 --enforce-eager --generator-kernel                    # GPU

`--exact` runs the exact configuration (vllm.model_executor.layers.
exact_logprobs): the engine from `exact_engine_args` (batch-invariant,
Inductor with the exact options), the trainer prepared by
`prepare_trainer` (compiled with the same options) and its logits
computed inside `row_invariant_matmuls()`; the trainer's recompute runs
with gradients on, as a training step runs it. `--exact graphs`: neither
side compiled (CUDA graphs for decode steps only):

    python benchmarks/logprob_parity.py --size 0.6b --dtype bfloat16 --exact  # GPU

`--trace` also runs one sequence through both with a forward hook on every
submodule and prints the first module whose output
differs, for the prompt (prefill) and for the next token (decode).
"""

import argparse
import contextlib
import functools
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples/offline_inference/torchtitan_qwen3"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from benchmark_torchtitan_qwen3 import SIZES, write_config  # noqa: E402
from model import ARCH, Qwen3Model, build_qwen3  # noqa: E402

from vllm.model_executor.layers.trainable_attention import (  # noqa: E402
    pack_sequences,
)

# ------------------------------------------------- run inside each worker

# `--trace-hidden`: the final norm's output (the LM head's input) and the
# LM head's (the logits), by module name in the TorchTitan Qwen3
TRACED_OUTPUTS = ("norm", "output")


def push_weights(model, weights):
    return len(model.load_weights(weights.items()))


def weight_chunks(weights, max_bytes):
    """`weights` split into dicts of at most `max_bytes` (or one tensor)."""
    chunk, size = {}, 0
    for name, tensor in weights.items():
        nbytes = tensor.numel() * tensor.element_size()
        if chunk and size + nbytes > max_bytes:
            yield chunk
            chunk, size = {}, 0
        chunk[name] = tensor
        size += nbytes
    if chunk:
        yield chunk


def add_hooks(model, only=None):
    """Record every submodule's output (or those named in `only`) on each
    forward call; the records live on the model, as these functions reach
    the worker by value."""
    module = getattr(model, "model", model)  # the factory's module in vLLM
    captured: dict[str, list[torch.Tensor]] = {}

    def record(name, module, args, output):
        if isinstance(output, tuple):
            output = output[0]
        captured.setdefault(name, []).append(output.detach().float().cpu())

    handles = [
        child.register_forward_hook(functools.partial(record, name))
        for name, child in module.named_modules()
        if name and (only is None or name in only)
    ]
    model.parity_trace = (captured, handles)
    return len(handles)


def take_hooks(model):
    captured, handles = model.parity_trace
    for handle in handles:
        handle.remove()
    del model.parity_trace
    return captured


# ------------------------------------------------------------ the trainer


def torch_token_logprobs(logits, token_ids):
    return torch.log_softmax(logits.float(), dim=-1).gather(1, token_ids[:, None])[:, 0]


def vllm_token_logprobs(logits, token_ids):
    """The kernel vLLM's GPU model runner (V2) computes sampled tokens'
    log-probabilities with: its own max and sum of exponentials over
    1024-wide blocks, another summation order than torch's log_softmax."""
    from vllm.v1.worker.gpu.sample.logprob import compute_token_logprobs

    return compute_token_logprobs(logits.float(), token_ids[:, None])[:, 0]


def trainer_logprobs(
    model,
    sequences,
    prompt_len,
    device,
    token_logprobs=torch_token_logprobs,
    logits_context=contextlib.nullcontext,
    grad=False,
):
    """Log-probabilities of every sequence's generated tokens, recomputed
    with all sequences packed into one varlen batch."""
    input_ids, positions, cu_seqlens = pack_sequences(sequences, device)
    with torch.set_grad_enabled(grad):
        hidden = model(input_ids, positions, cu_seqlens=cu_seqlens)
        with logits_context():
            logits = model.compute_logits(hidden)
    result, start = [], 0
    for sequence in sequences:
        rows = logits[start + prompt_len - 1 : start + len(sequence) - 1]
        targets = torch.tensor(sequence[prompt_len:], device=device)
        result.append(token_logprobs(rows, targets).detach().cpu())
        start += len(sequence)
    return result


def first_difference(vllm_outputs, trainer_outputs, rows):
    """(module, max |diff|) of the first module, in forward order, whose
    output rows differ; None if every module's rows are equal."""
    for name, ours in trainer_outputs.items():
        theirs = vllm_outputs.get(name)
        if theirs is None:
            continue
        a, b = ours[rows], theirs
        # vLLM computes logits for the sampled positions only
        n = min(len(a), len(b))
        a, b = a[len(a) - n :], b[:n] if len(b) > len(a) else b[len(b) - n :]
        if a.shape != b.shape or not torch.equal(a, b):
            diff = (a - b).abs().max().item() if a.shape == b.shape else None
            return name, diff
    return None


def trace(llm, model, prompt, sampling_params_cls, device):
    """The first module whose output differs, in the prompt's prefill and in
    the decode step that follows it."""
    llm.apply_model(functools.partial(add_hooks))
    llm.generate(
        [{"prompt_token_ids": prompt}],
        sampling_params_cls(
            max_tokens=2, temperature=0.0, ignore_eos=True, detokenize=False
        ),
        use_tqdm=False,
    )
    captured = llm.apply_model(functools.partial(take_hooks))[0]
    prefill = {name: calls[0] for name, calls in captured.items()}
    decode = {name: calls[1] for name, calls in captured.items() if len(calls) > 1}

    add_hooks(model)
    # the prompt plus vLLM's first greedy token, as one training sequence
    first_token = int(captured["output"][0][-1].argmax())
    full = prompt + [first_token]
    trainer_logprobs(model, [full], len(full) - 1, device)
    trainer_captured = {name: calls[0] for name, calls in take_hooks(model).items()}
    n = len(prompt)
    return (
        first_difference(prefill, trainer_captured, slice(0, n)),
        first_difference(decode, trainer_captured, slice(n, n + 1)),
    )


def build_trainer(config, device, dtype, init_std, cpu_built=False):
    """The trainer's module, built as vLLM builds its copy: on the device,
    so the rotary table (a buffer computed in `__init__`) comes from the
    same cos/sin kernels, and kept in fp32, with only the parameters in
    `dtype`. `cpu_built`: built on the CPU and moved with
    `.to(device, dtype)` instead, which brings the CPU's cos/sin and rounds
    the table to `dtype`; q and k then differ from vLLM's by an ulp."""
    torch.manual_seed(0)
    with torch.device("cpu" if cpu_built else device):
        trainer = Qwen3Model(config)
    if init_std:
        # PyTorch's default init gives N(0, 1) embeddings that dwarf every
        # block's output, so rounding in the residual add hides differences
        # in attention; a trained model's scale lets them through.
        for parameter in trainer.parameters():
            if parameter.dim() == 2:
                torch.nn.init.normal_(parameter, std=init_std)
    if cpu_built:
        return trainer.to(device=device, dtype=dtype).train()
    for parameter in trainer.parameters():
        parameter.data = parameter.data.to(dtype)
    return trainer.train()


def match_generator_kernel(trainer, llm, flash_attn_version):
    """Switch the trainer's attention to the kernel the engine runs: its KV
    cache's block size and its flash-attention version."""
    from vllm.model_executor.layers.trainable_attention import (
        use_generator_attention_kernel,
    )
    from vllm.v1.attention.backends.fa_utils import get_flash_attn_version

    block_size = llm.llm_engine.vllm_config.cache_config.block_size
    # the engine's choice: the configured version, else the platform's
    version = flash_attn_version or get_flash_attn_version()
    use_generator_attention_kernel(trainer, block_size, version)
    return block_size, version


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--flash-attn-version", type=int, default=None)
    parser.add_argument("--trace", action="store_true")
    parser.add_argument(
        "--trace-hidden",
        action="store_true",
        help="compare every final hidden state vLLM "
        "computed, whole batch, with the trainer's",
    )
    parser.add_argument(
        "--vllm-logprobs",
        action="store_true",
        help="CUDA: the trainer takes log-probabilities from "
        "logits with the kernel vLLM's model runner uses, "
        "instead of torch.log_softmax",
    )
    parser.add_argument(
        "--cpu-built-trainer",
        action="store_true",
        help="build the trainer's module on the CPU and "
        "move it with .to(device, dtype) (see build_trainer)",
    )
    parser.add_argument(
        "--generator-kernel",
        action="store_true",
        help="CUDA: the trainer's attention runs vLLM's "
        "paged-KV flash kernel (use_generator_attention_"
        "kernel)",
    )
    parser.add_argument(
        "--init-std",
        type=float,
        default=0.02,
        help="normal init of every weight matrix, at a "
        "trained model's scale (0 keeps PyTorch's defaults)",
    )
    parser.add_argument(
        "--exact",
        nargs="?",
        const="inductor",
        choices=("inductor", "graphs"),
        help="the exact configuration (exact_engine_args, prepare_trainer, "
        "row_invariant_matmuls), Inductor on both sides; `--exact graphs`: "
        "neither side compiled",
    )
    parser.add_argument("--gpu-memory-utilization", type=float, default=None)
    args = parser.parse_args()
    if args.trace_hidden and not args.enforce_eager:
        parser.error(
            "--trace-hidden needs --enforce-eager: forward hooks do "
            "not run inside vLLM's compiled graph"
        )
    if args.exact == "inductor" and args.enforce_eager:
        parser.error(
            "--exact compiles both sides: with --enforce-eager, pass --exact graphs"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    memory = args.gpu_memory_utilization or (0.3 if device == "cuda" else 0.1)
    dtype = getattr(torch, args.dtype)
    from vllm import LLM, ModelRegistry, SamplingParams
    from vllm.model_executor.layers import exact_logprobs

    extra = (
        {"attention_config": {"flash_attn_version": args.flash_attn_version}}
        if args.flash_attn_version
        else {}
    )
    engine_args = {"enforce_eager": args.enforce_eager, **extra}
    compiled = args.exact == "inductor"  # both sides by Inductor
    if args.exact:  # sets VLLM_BATCH_INVARIANT=1 before the trainer's ops
        engine_args = exact_logprobs.exact_engine_args(inductor=compiled, **engine_args)
    batch_invariant = os.environ.get("VLLM_BATCH_INVARIANT", "0") == "1"

    if batch_invariant:  # the trainer's ops under the same settings
        from vllm.model_executor.layers.batch_invariant import init_batch_invariance

        init_batch_invariance()
    ModelRegistry.register_model(ARCH, build_qwen3)
    config = SIZES[args.size]
    trainer = build_trainer(
        config, device, dtype, args.init_std, args.cpu_built_trainer
    )
    weights = {name: p.detach().cpu() for name, p in trainer.named_parameters()}

    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(
        10, config.vocab_size, (args.num_prompts, args.prompt_len), generator=generator
    ).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        write_config(model_dir, ARCH, config, args.dtype)
        llm = LLM(
            model=str(model_dir),
            load_format="dummy",
            skip_tokenizer_init=True,
            dtype=args.dtype,
            seed=0,
            max_model_len=args.prompt_len + args.output_len + 16,
            gpu_memory_utilization=memory,
            enable_prefix_caching=False,
            **engine_args,
        )
        # in pushes of at most 1 GB: one message to the engine holds < 4 GB
        loaded = [0]
        for chunk in weight_chunks(weights, 1 << 30):
            pushed = llm.apply_model(functools.partial(push_weights, weights=chunk))
            loaded = [a + b for a, b in zip(loaded * len(pushed), pushed)]
        kernel = None
        if args.exact:
            exact_logprobs.prepare_trainer(trainer, llm)
        elif args.generator_kernel:
            kernel = match_generator_kernel(trainer, llm, args.flash_attn_version)
        assert set(loaded) == {len(weights)}, loaded
        if args.trace_hidden:
            llm.apply_model(functools.partial(add_hooks, only=TRACED_OUTPUTS))
        outputs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            SamplingParams(
                max_tokens=args.output_len,
                temperature=1.0,
                seed=0,
                logprobs=0,
                ignore_eos=True,
                detokenize=False,
            ),
            use_tqdm=False,
        )
        sequences, generator_logprobs = [], []
        for prompt, output in zip(prompts, outputs):
            sample = output.outputs[0]
            sequences.append(prompt + list(sample.token_ids))
            generator_logprobs.append(
                torch.tensor(
                    [
                        entry[token].logprob
                        for entry, token in zip(sample.logprobs, sample.token_ids)
                    ]
                )
            )
        vllm_outputs = (
            {
                name: torch.cat(rows)
                for name, rows in llm.apply_model(take_hooks)[0].items()
            }
            if args.trace_hidden
            else None
        )
        first_differences = (
            trace(llm, trainer, prompts[0], SamplingParams, device)
            if args.trace
            else None
        )
        llm.llm_engine.engine_core.shutdown()

    if args.trace_hidden:
        add_hooks(trainer, only=TRACED_OUTPUTS)
    trained = trainer_logprobs(
        trainer,
        sequences,
        args.prompt_len,
        device,
        exact_logprobs.token_logprobs
        if args.exact
        else (vllm_token_logprobs if args.vllm_logprobs else torch_token_logprobs),
        exact_logprobs.row_invariant_matmuls if args.exact else contextlib.nullcontext,
        grad=compiled,
    )
    trainer_outputs = (
        {name: rows[0] for name, rows in take_hooks(trainer).items()}
        if args.trace_hidden
        else None
    )
    diff = torch.cat([(a - b).abs() for a, b in zip(trained, generator_logprobs)])
    mode = ", ".join(
        filter(
            None,
            [
                "exact configuration" if args.exact else None,
                "batch-invariant" if batch_invariant else None,
                "eager"
                if args.enforce_eager
                else (
                    "CUDA graphs, no Inductor"
                    if args.exact and not compiled
                    else "compiled"
                ),
                "trainer compiled alike, gradients on" if compiled else None,
                f"FA{args.flash_attn_version}" if args.flash_attn_version else None,
                f"trainer attention: vLLM's FA{kernel[1]} over {kernel[0]}-token pages"
                if kernel
                else None,
                "trainer built on the CPU" if args.cpu_built_trainer else None,
                "log-probabilities by vLLM's kernel" if args.vllm_logprobs else None,
            ],
        )
    )
    print(
        f"\n{args.size}, {args.dtype} on {device} ({mode}, init std "
        f"{args.init_std or 'default'}): "
        f"{args.num_prompts} prompts x {args.output_len} sampled tokens"
    )
    print(
        f"|vLLM logprob - trainer logprob|: max {diff.max():.3e}, "
        f"mean {diff.mean():.3e}; bitwise equal "
        f"{(diff == 0).float().mean():.1%} of {diff.numel()} tokens"
    )
    differing = (diff != 0).view(args.num_prompts, args.output_len)
    if 0 < int(differing.sum()) <= 0.1 * diff.numel():
        # where the few differences are: which generation steps, which rows
        steps = differing.nonzero()[:, 1].tolist()
        print(
            f"differing tokens by generation step (0 = the prefill's "
            f"token): {dict(sorted(Counter(steps).items()))}; in "
            f"{int(differing.any(1).sum())} of {args.num_prompts} "
            "sequences"
        )
    if vllm_outputs is not None:
        # every row vLLM computed (prefill and decode steps, in its own
        # batch order) against the trainer's rows, compared as bytes
        for name, what in (("norm", "final hidden states"), ("output", "logits")):
            ours = {row.numpy().tobytes() for row in trainer_outputs[name]}
            theirs = vllm_outputs[name]
            equal = sum(row.numpy().tobytes() in ours for row in theirs)
            print(
                f"{what} ({name}): {equal} of vLLM's {len(theirs)} rows equal "
                "a trainer row bitwise"
            )
    if first_differences is not None:
        for phase, found in zip(("prefill", "decode"), first_differences):
            print(
                f"first module whose output differs ({phase}): "
                + (
                    f"{found[0]} (max |diff| {found[1]})"
                    if found
                    else "none, every module's output is bitwise equal"
                )
            )


if __name__ == "__main__":
    main()
