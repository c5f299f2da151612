# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""A plain PyTorch Llama, sharded by vLLM from its `_tp_plan` / `_pp_plan`,
against the same model unsharded.

1. Training: the model (plain_llama.py) learns "next token = token + 1" for a
   few hundred steps, so its predictions are decisive: a random model's
   near-ties would flip under the rounding differences of a sharded run.
   Its weights are saved as a Hugging Face Llama checkpoint.
2. vLLM runs the checkpoint with the model's factory at TP=1 and at the
   requested tensor/pipeline-parallel sizes (and, with --native, vLLM's
   own LlamaForCausalLM on the same checkpoint at those sizes).
3. Each run's prefill logits and greedy continuations are compared with
   TP=1's and with the trained module's own.

    python examples/offline_inference/parallel_plans/compare_parallel.py \\
        --tensor-parallel-size 2 --pipeline-parallel-size 2 \\
        [--tie-word-embeddings] [--dtype bfloat16] [--native]

Prints PASS or FAIL with the measured differences (exit code 0 or 1).
"""

import argparse
import gc
import os
import sys
import tempfile
from pathlib import Path

# vLLM's start-up lines stay off unless VLLM_LOGGING_LEVEL asks for them;
# set before vLLM is imported (plain_llama imports it), which configures
# its logging; its processes inherit it.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from vllm.model_executor.layers.trainable_attention import (  # noqa: E402
    pack_sequences,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain_llama import (
    ARCH,
    LlamaConfig,
    LlamaForCausalLM,  # noqa: E402
    build_plain_llama,
    save_checkpoint,
)

VOCAB = LlamaConfig.vocab_size


def train(model, device, steps):
    """Next token = token + 1 (mod vocab), 8 packed sequences a step."""
    torch.manual_seed(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(1, steps + 1):
        starts = torch.randint(0, VOCAB, (8,))
        tokens = (starts[:, None] + torch.arange(65)) % VOCAB
        input_ids, positions, cu_seqlens = pack_sequences(
            tokens[:, :-1].tolist(), device
        )
        logits = model.compute_logits(model(input_ids, positions, cu_seqlens))
        loss = nn.functional.cross_entropy(
            logits.float(), tokens[:, 1:].flatten().to(device)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps:
            print(f"  training step {step}/{steps}: loss {loss.item():.4f}", flush=True)


@torch.no_grad()
def reference(model, prompts, max_tokens, device):
    """The module's own logits at every prompt position, and greedy
    continuations recomputed from the whole sequence each step."""
    input_ids, positions, cu_seqlens = pack_sequences(prompts, device)
    logits = model.compute_logits(model(input_ids, positions, cu_seqlens))
    greedy = []
    for prompt in prompts:
        tokens = list(prompt)
        for _ in range(max_tokens):
            ids, pos, cu = pack_sequences([tokens], device)
            tokens.append(int(model.compute_logits(model(ids, pos, cu))[-1].argmax()))
        greedy.append(tokens[len(prompt) :])
    lengths = [len(prompt) for prompt in prompts]
    return [t[:-1].float().cpu() for t in logits.split(lengths)], greedy


def run_vllm(checkpoint, prompts, max_tokens, dtype, arch, tp, pp):
    """Prefill logits (`[len(prompt) - 1, vocab]` per prompt) and greedy
    continuations from an engine started for this run."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(checkpoint),
        hf_overrides={"architectures": [arch]},
        skip_tokenizer_init=True,
        dtype=dtype,
        seed=0,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        max_model_len=512,
        # per worker: on the CPU, of the machine's memory
        gpu_memory_utilization=0.3 if torch.cuda.is_available() else 0.1,
        max_logprobs=VOCAB,
        logprobs_mode="raw_logits",
    )
    inputs = [{"prompt_token_ids": p} for p in prompts]
    prefill = llm.generate(
        inputs,
        SamplingParams(max_tokens=1, detokenize=False, prompt_logprobs=VOCAB),
        use_tqdm=False,
    )
    generated = llm.generate(
        inputs,
        SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False
        ),
        use_tqdm=False,
    )
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    logits = [
        torch.tensor(
            [
                [entry[t].logprob for t in range(VOCAB)]
                for entry in output.prompt_logprobs[1:]
            ]
        ).reshape(-1, VOCAB)
        for output in prefill
    ]
    return logits, [list(o.outputs[0].token_ids) for o in generated]


def agreement(run, base):
    """(max |logit diff|, top-1 agreement, identical continuations)."""
    (logits, greedy), (base_logits, base_greedy) = run, base
    pairs = [(a, b) for a, b in zip(logits, base_logits) if len(a)]
    max_diff = max((a - b).abs().max().item() for a, b in pairs)
    top1 = (
        torch.cat([(a.argmax(-1) == b.argmax(-1)).float() for a, b in pairs])
        .mean()
        .item()
    )
    same = sum(g == b for g, b in zip(greedy, base_greedy)) / len(greedy)
    return max_diff, top1, same


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensor-parallel-size", type=int, default=2)
    parser.add_argument("--pipeline-parallel-size", type=int, default=1)
    parser.add_argument("--tie-word-embeddings", action="store_true")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--native", action="store_true", help="also run vLLM's LlamaForCausalLM"
    )
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=300)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    tp, pp = args.tensor_parallel_size, args.pipeline_parallel_size
    if device == "cpu" and tp * pp > 1:
        os.environ.setdefault(
            "VLLM_CPU_OMP_THREADS_BIND",
            "|".join(str(rank % (os.cpu_count() or 1)) for rank in range(tp * pp)),
        )

    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCH, build_plain_llama)
    gen = torch.Generator().manual_seed(123)
    prompts = [
        torch.randint(0, VOCAB, (int(n),), generator=gen).tolist()
        for n in torch.randint(2, 60, (args.num_prompts,), generator=gen)
    ]
    config = LlamaConfig(tie_word_embeddings=args.tie_word_embeddings)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device)
    print(
        f"training the reference on {device} "
        f"(tie_word_embeddings={config.tie_word_embeddings})"
    )
    train(model, device, args.train_steps)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "checkpoint"
        save_checkpoint(model, checkpoint)
        runs["module"] = reference(
            model.to(getattr(torch, dtype)), prompts, args.max_tokens, device
        )
        engines = [("plan, TP=1", ARCH, 1, 1)]
        if tp * pp > 1:
            engines.append((f"plan, TP={tp} PP={pp}", ARCH, tp, pp))
        if args.native:
            engines.append((f"native, TP={tp} PP={pp}", "LlamaForCausalLM", tp, pp))
        for name, arch, engine_tp, engine_pp in engines:
            print(f"vLLM {name}: running {len(prompts)} prompts", flush=True)
            runs[name] = run_vllm(
                checkpoint, prompts, args.max_tokens, dtype, arch, engine_tp, engine_pp
            )

    base = runs["plan, TP=1"]
    print(
        f"\n{dtype}, {len(prompts)} prompts, {args.max_tokens} greedy "
        f"tokens; compared with vLLM at TP=1 (and with the module itself)"
    )
    print(
        f"{'run':22s} {'max |logit diff|':>17s} {'top-1':>8s} "
        f"{'same continuation':>18s}"
    )
    for name, run in runs.items():
        if name == "module":
            continue
        if name == "plan, TP=1":
            max_diff, top1, same = agreement(run, runs["module"])
            name += " vs module"
        else:
            max_diff, top1, same = agreement(run, base)
        print(f"{name:22s} {max_diff:17.3e} {top1:8.2%} {same:18.0%}")
    # the pass rule: the first run after TP=1 (or TP=1 itself) against
    # TP=1 (or the module)
    checked, against = (
        (engines[1][0], "plan, TP=1") if len(engines) > 1 else ("plan, TP=1", "module")
    )
    max_diff, top1, same = agreement(runs[checked], runs[against])
    if dtype == "float32":
        ok = max_diff <= 1e-4 and same == 1.0
        rule = "max |logit diff| <= 1e-4, every continuation identical"
    else:
        ok = top1 >= 0.99 and same >= 0.9
        rule = "top-1 agreement >= 99%, >= 90% of continuations identical"
    print(f"{'PASS' if ok else 'FAIL'}: {checked} vs {against} ({rule})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
