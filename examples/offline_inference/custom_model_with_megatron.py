# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""A Megatron-core tensor-parallel model, run by vLLM, against ground truth.

The decoder below is defined once: Megatron-core's `VocabParallelEmbedding`,
`ColumnParallelLinear` and `RowParallelLinear`, with `TrainableFlashAttention`.
Megatron's layers take the process group to shard over as `tp_group`, and
the factory hands them vLLM's own tensor-parallel group from
`ParallelContext`: Megatron creates no groups of its own and its
`parallel_state` is never initialised.

1. Reference: the model outside vLLM (plain PyTorch + Megatron-core, a
   one-process gloo group, fixed seed) saves its weights, its logits for
   every prompt position and greedy continuations (recomputed from scratch
   each step).
2. vLLM: the same model registered with a factory, loaded from the saved
   weights (full tensors, sharded by Megatron's partition attributes).
3. Comparison: every prefill logit, and the continuations token for token.
4. Training: one optimizer step through the same module lowers the loss.

    python examples/offline_inference/custom_model_with_megatron.py \
        [--tensor-parallel-size 2] [--dtype bfloat16]

Prints PASS or FAIL with the measured differences (exit code 0 or 1).
"""

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from safetensors.torch import save_file
from torch import nn

from vllm import LLM, ModelRegistry, SamplingParams
from vllm.model_executor.layers.trainable_attention import (
    TrainableFlashAttention,
    pack_sequences,
)
from vllm.model_executor.parallel_context import ParallelContext

ARCH = "MegatronDecoderForCausalLM"


@dataclass
class DecoderConfig:
    vocab_size: int = 512
    hidden_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    ffn_size: int = 512
    rope_theta: float = 10000.0


def megatron_config(parallel_context, dtype) -> ModelParallelConfig:
    return ModelParallelConfig(
        tensor_model_parallel_size=parallel_context.tp_size,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        params_dtype=dtype,
    )


def init_normal(weight):
    return nn.init.normal_(weight, mean=0.0, std=0.08)


def rotary(x, positions, theta):
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions[:, None].float() * freqs
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, config, parallel_context, mcfg):
        super().__init__()
        tp_group = parallel_context.tp_group
        self.heads = parallel_context.shard_size(config.num_heads, "num_heads")
        self.kv_heads = parallel_context.shard_size(config.num_kv_heads, "num_kv_heads")
        self.head_dim, self.theta = config.head_dim, config.rope_theta
        column = lambda out: ColumnParallelLinear(
            config.hidden_size,
            out,
            config=mcfg,
            init_method=init_normal,
            bias=False,
            gather_output=False,
            tp_group=tp_group,
        )
        self.q_proj = column(config.num_heads * config.head_dim)
        self.k_proj = column(config.num_kv_heads * config.head_dim)
        self.v_proj = column(config.num_kv_heads * config.head_dim)
        self.o_proj = RowParallelLinear(
            config.num_heads * config.head_dim,
            config.hidden_size,
            config=mcfg,
            init_method=init_normal,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=tp_group,
        )
        self.attn = TrainableFlashAttention(self.heads, self.head_dim, self.kv_heads)

    def forward(self, x, positions, cu_seqlens=None):
        tokens = x.shape[0]
        q = self.q_proj(x)[0].view(tokens, self.heads, self.head_dim)
        k = self.k_proj(x)[0].view(tokens, self.kv_heads, self.head_dim)
        v = self.v_proj(x)[0].view(tokens, self.kv_heads, self.head_dim)
        q, k = rotary(q, positions, self.theta), rotary(k, positions, self.theta)
        out = self.attn(q, k, v, cu_seqlens=cu_seqlens)
        return self.o_proj(out.reshape(tokens, -1))[0]


class MLP(nn.Module):
    def __init__(self, config, parallel_context, mcfg):
        super().__init__()
        tp_group = parallel_context.tp_group
        self.fc1 = ColumnParallelLinear(
            config.hidden_size,
            config.ffn_size,
            config=mcfg,
            init_method=init_normal,
            bias=False,
            gather_output=False,
            tp_group=tp_group,
        )
        self.fc2 = RowParallelLinear(
            config.ffn_size,
            config.hidden_size,
            config=mcfg,
            init_method=init_normal,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=tp_group,
        )

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)[0]))[0]


class Layer(nn.Module):
    def __init__(self, config, parallel_context, mcfg):
        super().__init__()
        self.input_norm = nn.RMSNorm(config.hidden_size, eps=1e-6)
        self.attention = SelfAttention(config, parallel_context, mcfg)
        self.post_attention_norm = nn.RMSNorm(config.hidden_size, eps=1e-6)
        self.mlp = MLP(config, parallel_context, mcfg)

    def forward(self, x, positions, cu_seqlens=None):
        x = x + self.attention(self.input_norm(x), positions, cu_seqlens)
        return x + self.mlp(self.post_attention_norm(x))


class MegatronDecoder(nn.Module):
    """Packed tokens in, hidden states out; logits from `compute_logits`."""

    def __init__(
        self,
        config: DecoderConfig,
        parallel_context: ParallelContext,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        mcfg = megatron_config(parallel_context, dtype)
        self.embedding = VocabParallelEmbedding(
            config.vocab_size,
            config.hidden_size,
            init_method=init_normal,
            config=mcfg,
            tp_group=parallel_context.tp_group,
        )
        self.layers = nn.ModuleList(
            Layer(config, parallel_context, mcfg) for _ in range(config.num_layers)
        )
        self.final_norm = nn.RMSNorm(config.hidden_size, eps=1e-6)
        # Vocab-sharded LM head. Its logits are gathered in compute_logits:
        # Megatron's own gather (gather_output=True) allocates on CUDA only.
        self.output_layer = ColumnParallelLinear(
            config.hidden_size,
            config.vocab_size,
            config=mcfg,
            init_method=init_normal,
            bias=False,
            gather_output=False,
            tp_group=parallel_context.tp_group,
        )
        self.parallel_context = parallel_context

    def forward(self, input_ids, positions, cu_seqlens=None):
        x = self.embedding(input_ids)
        for layer in self.layers:
            x = layer(x, positions, cu_seqlens)
        return self.final_norm(x)

    def compute_logits(self, hidden_states):
        logits = self.output_layer(hidden_states)[0]
        if self.parallel_context.tp_size == 1:
            return logits
        shards = [
            torch.empty_like(logits) for _ in range(self.parallel_context.tp_size)
        ]
        dist.all_gather(
            shards, logits.contiguous(), group=self.parallel_context.tp_group
        )
        return torch.cat(shards, dim=-1)


def build_megatron_decoder(vllm_config, parallel_context):
    """The factory vLLM calls in each worker."""
    hf_config = vllm_config.model_config.hf_config
    values = {
        name: getattr(hf_config, name)
        for name in DecoderConfig.__dataclass_fields__
        if hasattr(hf_config, name)
    }
    # transformers >= 5 keeps rope_theta in rope_parameters
    rope = getattr(hf_config, "rope_parameters", None) or {}
    values.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    config = DecoderConfig(**values)
    return MegatronDecoder(config, parallel_context, vllm_config.model_config.dtype)


def write_config(directory: Path, config: DecoderConfig, **overrides) -> None:
    """The config.json vLLM reads beside the weights (`overrides` replace
    or add entries, e.g. another architecture name)."""
    entries = dict(
        vars(config),
        architectures=[ARCH],
        model_type="llama",
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        num_hidden_layers=config.num_layers,
        intermediate_size=config.ffn_size,
        torch_dtype="float32",
        max_position_embeddings=512,
    )
    (directory / "config.json").write_text(json.dumps(dict(entries, **overrides)))


# ------------------------------------------------------------ reference run


@torch.no_grad()
def reference_logits(model, prompts, device):
    input_ids, positions, cu_seqlens = pack_sequences(prompts, device)
    logits = model.compute_logits(model(input_ids, positions, cu_seqlens))
    return [t.float().cpu() for t in logits.split([len(p) for p in prompts])]


def reference_greedy(model, prompt, max_tokens, device):
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(int(reference_logits(model, [tokens], device)[0][-1].argmax()))
    return tokens[len(prompt) :]


def pretrain(model, device, steps):
    """Teach the model "next token = this token + 1 (mod vocab)", so its
    predictions are decisive. A random model's next-token distributions are
    nearly flat, and bf16 rounding, which differs between TP=1 and a TP=2
    all-reduce, would flip its near-ties: no test of anything."""
    torch.manual_seed(2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    lengths = [64] * 8
    for _ in range(steps):
        starts = torch.randint(0, DecoderConfig.vocab_size, (len(lengths),))
        tokens = (starts[:, None] + torch.arange(65)) % DecoderConfig.vocab_size
        input_ids, targets = tokens[:, :-1].flatten(), tokens[:, 1:].flatten()
        positions = torch.arange(64).repeat(len(lengths))
        cu_seqlens = torch.arange(0, 64 * 8 + 1, 64, dtype=torch.int32)
        logits = model.compute_logits(
            model(input_ids.to(device), positions.to(device), cu_seqlens.to(device))
        )
        loss = nn.functional.cross_entropy(logits.float(), targets.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


def training_step(model, device):
    """One AdamW step on a packed batch; returns the loss before/after."""
    torch.manual_seed(1)
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (17, 9, 30)]
    input_ids, positions, cu_seqlens = pack_sequences(prompts, device)
    targets = torch.roll(input_ids, -1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def loss_fn():
        logits = model.compute_logits(model(input_ids, positions, cu_seqlens))
        return nn.functional.cross_entropy(logits.float(), targets)

    before = loss_fn()
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss_fn()
    return before.item(), after.item()


def run_reference(config, prompts, max_tokens, dtype, device, workdir):
    """Ground truth outside vLLM, in a one-process gloo group."""
    store = dist.FileStore(str(workdir / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        world = dist.group.WORLD
        parallel_context = ParallelContext(
            tp_group=world, tp_cpu_group=world, device=torch.device(device)
        )
        torch.manual_seed(0)
        model = MegatronDecoder(config, parallel_context).to(device)
        pretrain(model, device, steps=150)
        checkpoint = workdir / "checkpoint"
        checkpoint.mkdir()
        save_file(
            {
                name: param.detach().contiguous().cpu()
                for name, param in model.named_parameters()
            },
            str(checkpoint / "model.safetensors"),
        )
        write_config(checkpoint, config)
        model = model.to(dtype)
        logits = reference_logits(model, prompts, device)
        greedy = [reference_greedy(model, p, max_tokens, device) for p in prompts]
        # Training goes last: it changes the weights.
        losses = training_step(model.float(), device)
    finally:
        dist.destroy_process_group()
    return checkpoint, logits, greedy, losses


# --------------------------------------------------------------- vLLM run


def run_vllm(
    checkpoint, prompts, max_tokens, dtype, tensor_parallel_size, enforce_eager
):
    llm = LLM(
        model=str(checkpoint),
        skip_tokenizer_init=True,
        dtype=dtype,
        tensor_parallel_size=tensor_parallel_size,
        enforce_eager=enforce_eager,
        max_model_len=512,
        gpu_memory_utilization=0.3,
        # on the CPU a fraction of host memory per rank would be gigabytes
        kv_cache_memory_bytes=None if torch.cuda.is_available() else 256 << 20,
        max_logprobs=DecoderConfig.vocab_size,
        logprobs_mode="raw_logits",
        seed=0,
    )
    inputs = [{"prompt_token_ids": p} for p in prompts]
    prefill = llm.generate(
        inputs,
        SamplingParams(
            max_tokens=1, detokenize=False, prompt_logprobs=DecoderConfig.vocab_size
        ),
        use_tqdm=False,
    )
    generated = llm.generate(
        inputs,
        SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False
        ),
        use_tqdm=False,
    )
    logits = []
    for output in prefill:
        rows = [
            torch.tensor([entry[t].logprob for t in range(DecoderConfig.vocab_size)])
            for entry in output.prompt_logprobs[1:]
        ]
        logits.append(
            torch.stack(rows) if rows else torch.empty(0, DecoderConfig.vocab_size)
        )
    del llm
    return logits, [list(o.outputs[0].token_ids) for o in generated]


def compare(ref_logits, ref_greedy, logits, greedy, dtype):
    max_diff = max(
        (got - want[:-1]).abs().max().item()
        for got, want in zip(logits, ref_logits)
        if len(got)
    )
    agree = [
        (got.argmax(-1) == want[:-1].argmax(-1)).float()
        for got, want in zip(logits, ref_logits)
        if len(got)
    ]
    top1 = torch.cat(agree).mean().item()
    same = sum(g == r for g, r in zip(greedy, ref_greedy)) / len(greedy)
    if dtype == torch.float32:
        ok = max_diff <= 1e-4 and same == 1.0
        rule = "max |logit diff| <= 1e-4 and every continuation identical"
    else:
        ok = top1 >= 0.99 and same >= 0.9
        rule = (
            "top-1 agreement >= 99% of positions and >= 90% of continuations identical"
        )
    print(
        f"prefill logits: max |diff| {max_diff:.3e}, top-1 agreement "
        f"{top1:.2%} of positions"
    )
    print(f"greedy continuations identical: {same:.0%} of {len(greedy)}")
    return ok, rule


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument(
        "--enforce-eager",
        action="store_true",
        help="no torch.compile or CUDA graphs: faster start, slower steps",
    )
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(
        torch, args.dtype or ("bfloat16" if device == "cuda" else "float32")
    )
    if device == "cpu" and args.tensor_parallel_size > 1:
        os.environ.setdefault(
            "VLLM_CPU_OMP_THREADS_BIND",
            "|".join(str(i) for i in range(args.tensor_parallel_size)),
        )

    gen = torch.Generator().manual_seed(123)
    prompts = [
        torch.randint(0, DecoderConfig.vocab_size, (int(n),), generator=gen).tolist()
        for n in torch.randint(1, 60, (args.num_prompts,), generator=gen)
    ]
    ModelRegistry.register_model(ARCH, build_megatron_decoder)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, ref_logits, ref_greedy, losses = run_reference(
            DecoderConfig(), prompts, args.max_tokens, dtype, device, Path(tmp)
        )
        print(
            f"reference ({device}, {dtype}): {len(prompts)} prompts of "
            f"{[len(p) for p in prompts]} tokens"
        )
        print(f"training step: loss {losses[0]:.4f} -> {losses[1]:.4f}")
        logits, greedy = run_vllm(
            checkpoint,
            prompts,
            args.max_tokens,
            str(dtype).split(".")[1],
            args.tensor_parallel_size,
            args.enforce_eager,
        )
    print(f"vLLM, tensor_parallel_size={args.tensor_parallel_size}:")
    ok, rule = compare(ref_logits, ref_greedy, logits, greedy, dtype)
    ok = ok and losses[1] < losses[0]
    print(f"{'PASS' if ok else 'FAIL'} ({rule}; training lowers the loss)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
