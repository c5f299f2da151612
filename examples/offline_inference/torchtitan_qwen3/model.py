# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Qwen3 with TorchTitan's module structure and parameter names.

    tok_embeddings
    layers.N.attention_norm
    layers.N.attention.{wq, wk, wv, wo, q_norm, k_norm}
    layers.N.ffn_norm
    layers.N.feed_forward.{w1, w2, w3}
    layers.N.moe.{router.gate, experts.{w1, w2, w3}}   (Qwen3-MoE, instead)
    norm
    output                      (absent when tie_word_embeddings)

Attention is `TrainableFlashAttention`, so this module trains (packed
sequences, `cu_seqlens`) and runs in vLLM unchanged. Tensor parallelism is
plain PyTorch over `ParallelContext`: `wq/wk/wv/w1/w3` keep a slice of their
output features, `wo/w2` a slice of their input features and all-reduce;
embeddings, norms and `output` are replicated.

`hf_to_vllm_mapper` (beside the model, as in vLLM's own models) maps the
names TorchTitan checkpoints use onto this module: wrapper prefixes added by
`torch.compile`, activation checkpointing or a `{"model": ...}` state dict,
and TorchTitan 0.3's `attention.qkv_linear.*` and `lm_head`.

With `num_experts` in the config (Qwen3-MoE) each block's feed-forward is
a TorchTitan-style `MoE`: a router and stacked experts that training runs
one expert at a time; it declares `_fused_moe`, so vLLM runs it on its
fused MoE layer (docs: "Mixture-of-experts blocks").
"""

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed
from torch import nn
from torch.nn import functional as F

from vllm.model_executor.layers.trainable_attention import TrainableFlashAttention
from vllm.model_executor.models.callable_model import load_weights_by_name
from vllm.model_executor.models.utils import WeightsMapper
from vllm.model_executor.parallel_context import ParallelContext

ARCH = "TorchTitanQwen3ForCausalLM"


@dataclass
class Qwen3Config:
    """The fields of config.json this model reads (Hugging Face Qwen3
    names, so `transformers` parses the file with model_type "qwen3")."""

    vocab_size: int = 151936
    hidden_size: int = 1024
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 3072
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 40960
    # Qwen3-MoE: experts in every block when num_experts > 0
    num_experts: int = 0
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = True

    @classmethod
    def from_hf(cls, hf_config) -> "Qwen3Config":
        values = {
            name: getattr(hf_config, name)
            for name in cls.__dataclass_fields__
            if getattr(hf_config, name, None) is not None
        }
        # transformers >= 5 keeps rope_theta in rope_parameters
        rope = getattr(hf_config, "rope_parameters", None) or {}
        if "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        return cls(**values)


class ColumnShard(nn.Linear):
    """A slice of the output features; loads it from the full weight."""

    def __init__(self, in_features, out_features, pc: ParallelContext):
        super().__init__(
            in_features, pc.shard_size(out_features, "out_features"), bias=False
        )
        self.weight.weight_loader = lambda param, full: param.copy_(
            full.chunk(pc.tp_size, 0)[pc.tp_rank]
        )


class RowShard(nn.Linear):
    """A slice of the input features; all-reduces the partial outputs."""

    def __init__(self, in_features, out_features, pc: ParallelContext):
        super().__init__(
            pc.shard_size(in_features, "in_features"), out_features, bias=False
        )
        self.pc = pc
        self.weight.weight_loader = lambda param, full: param.copy_(
            full.chunk(pc.tp_size, 1)[pc.tp_rank]
        )

    def forward(self, x):
        out = super().forward(x)
        if self.pc.tp_size > 1:
            torch.distributed.all_reduce(out, group=self.pc.tp_group)
        return out


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cache(max_positions, head_dim, theta):
    """cos and sin of the rotary angles `[max_positions, head_dim]` (cos in
    the first half), precomputed once as TorchTitan does (`freqs_cis`)."""
    half = head_dim // 2
    inv_freq = 1.0 / theta ** (torch.arange(0, half, dtype=torch.float32) / half)
    angles = (
        torch.arange(max_positions, dtype=torch.float32)[:, None] * (inv_freq[None, :])
    )
    return torch.cat((angles.cos(), angles.sin()), -1)


def apply_rope(x, cos, sin):
    """Rotary embedding, rotate-half layout (as Qwen3 checkpoints expect)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: Qwen3Config, pc: ParallelContext):
        super().__init__()
        self.n_heads = pc.shard_size(config.num_attention_heads, "num_attention_heads")
        self.n_kv_heads = pc.shard_size(
            config.num_key_value_heads, "num_key_value_heads"
        )
        self.head_dim = config.head_dim
        dim, hd = config.hidden_size, config.head_dim
        self.wq = ColumnShard(dim, config.num_attention_heads * hd, pc)
        self.wk = ColumnShard(dim, config.num_key_value_heads * hd, pc)
        self.wv = ColumnShard(dim, config.num_key_value_heads * hd, pc)
        self.wo = RowShard(config.num_attention_heads * hd, dim, pc)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps)
        self.k_norm = RMSNorm(hd, config.rms_norm_eps)
        self.inner_attention = TrainableFlashAttention(
            self.n_heads, hd, self.n_kv_heads
        )

    def forward(self, x, rope, cu_seqlens=None):
        tokens = x.shape[0]
        q = self.q_norm(self.wq(x).view(tokens, self.n_heads, self.head_dim))
        k = self.k_norm(self.wk(x).view(tokens, self.n_kv_heads, self.head_dim))
        v = self.wv(x).view(tokens, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = self.inner_attention(q, k, v, cu_seqlens=cu_seqlens)
        return self.wo(out.reshape(tokens, -1))


class FeedForward(nn.Module):
    def __init__(self, config: Qwen3Config, pc: ParallelContext):
        super().__init__()
        self.w1 = ColumnShard(config.hidden_size, config.intermediate_size, pc)
        self.w3 = ColumnShard(config.hidden_size, config.intermediate_size, pc)
        self.w2 = RowShard(config.intermediate_size, config.hidden_size, pc)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Router(nn.Module):
    """Token-choice top-k routing over softmax scores."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.top_k = config.num_experts_per_tok
        self.renormalize = config.norm_topk_prob

    def forward(self, x):
        scores = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, experts = scores.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights.to(x.dtype), experts


class GroupedExperts(nn.Module):
    """All experts' gated MLPs, stacked: w1/w3 `[experts, inter, dim]`, w2
    `[experts, dim, inter]`."""

    def __init__(self, config: Qwen3Config):
        super().__init__()
        experts, dim = config.num_experts, config.hidden_size
        inter = config.moe_intermediate_size
        self.w1 = nn.Parameter(torch.empty(experts, inter, dim))
        self.w3 = nn.Parameter(torch.empty(experts, inter, dim))
        self.w2 = nn.Parameter(torch.empty(experts, dim, inter))
        for weight in (self.w1, self.w3, self.w2):
            nn.init.trunc_normal_(weight, std=0.02)

    def forward(self, x, expert):
        return (F.silu(x @ self.w1[expert].T) * (x @ self.w3[expert].T)) @ self.w2[
            expert
        ].T


class MoE(nn.Module):
    """Each token through its top-k experts, weighted (no capacity limit).
    vLLM serves it on its fused MoE layer, sharded over TP ranks."""

    _fused_moe = {
        "router": "router.gate",
        "experts": "experts",
        "projections": ("w1", "w3", "w2"),
        "top_k": "top_k",
        "renormalize": "renormalize",
    }

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.router = Router(config)
        self.experts = GroupedExperts(config)
        self.top_k = config.num_experts_per_tok
        self.renormalize = config.norm_topk_prob

    def forward(self, x):
        weights, chosen = self.router(x)
        out = torch.zeros_like(x)
        for expert in chosen.unique().tolist():
            token, slot = (chosen == expert).nonzero(as_tuple=True)
            out.index_add_(
                0, token, self.experts(x[token], expert) * weights[token, slot, None]
            )
        return out


class TransformerBlock(nn.Module):
    def __init__(self, config: Qwen3Config, pc: ParallelContext):
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config, pc)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.num_experts:
            self.moe = MoE(config)
        else:
            self.feed_forward = FeedForward(config, pc)

    def forward(self, x, rope, cu_seqlens=None):
        x = x + self.attention(self.attention_norm(x), rope, cu_seqlens)
        ffn = self.moe if hasattr(self, "moe") else self.feed_forward
        return x + ffn(self.ffn_norm(x))


class Qwen3Model(nn.Module):
    """Packed tokens `[T]` and positions `[T]` in, hidden states out."""

    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_substr={
            "._orig_mod.": ".",  # torch.compile
            "._checkpoint_wrapped_module.": ".",  # activation checkpointing
            ".attention.qkv_linear.": ".attention.",  # TorchTitan 0.3
        },
        orig_to_new_prefix={
            "model.": "",  # {"model": state_dict} flattened
            "_orig_mod.": "",
            "lm_head.": "output.",  # TorchTitan 0.3
        },
    )

    def __init__(
        self, config: Qwen3Config, parallel_context: ParallelContext | None = None
    ):
        super().__init__()
        pc = parallel_context or ParallelContext()
        self.config = config
        self.parallel_context = pc
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        # ModuleList, not TorchTitan's ModuleDict: same "layers.N" names.
        self.layers = nn.ModuleList(
            TransformerBlock(config, pc) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # not in checkpoints: rebuilt from the config
        self.register_buffer(
            "rope_cache",
            rope_cache(
                config.max_position_embeddings, config.head_dim, config.rope_theta
            ),
            persistent=False,
        )
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def embed_input_ids(self, input_ids):
        return self.tok_embeddings(input_ids)

    def forward(self, input_ids, positions, cu_seqlens=None, inputs_embeds=None):
        h = (
            inputs_embeds
            if inputs_embeds is not None
            else self.tok_embeddings(input_ids)
        )
        # [tokens, 1, head_dim // 2] each, shared by all layers
        rope = self.rope_cache[positions].unsqueeze(1).chunk(2, -1)
        for layer in self.layers:
            h = layer(h, rope, cu_seqlens)
        return self.norm(h)

    def compute_logits(self, hidden_states):
        return self.output(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]):
        """Loading by name after splitting a fused `attention.wqkv`. With
        tied embeddings `output.weight` names the embedding tensor."""
        return load_weights_by_name(
            self,
            self._unfuse(weights),
            model_name=ARCH,
            parallel_context=self.parallel_context,
        )

    def _unfuse(self, weights):
        config = self.config
        q = config.num_attention_heads * config.head_dim
        kv = config.num_key_value_heads * config.head_dim
        for name, tensor in weights:
            if name.endswith(".attention.wqkv.weight"):
                prefix = name[: -len("wqkv.weight")]
                wq, wk, wv = tensor.split([q, kv, kv], dim=0)
                yield from (
                    (prefix + "wq.weight", wq),
                    (prefix + "wk.weight", wk),
                    (prefix + "wv.weight", wv),
                )
            else:
                yield name, tensor


# TorchTitan names -> Hugging Face Qwen3 names, e.g. to load the same weights
# into vLLM's native Qwen3ForCausalLM.
TORCHTITAN_TO_HF = WeightsMapper(
    orig_to_new_substr={
        ".attention_norm.": ".input_layernorm.",
        ".ffn_norm.": ".post_attention_layernorm.",
        ".attention.wq.": ".self_attn.q_proj.",
        ".attention.wk.": ".self_attn.k_proj.",
        ".attention.wv.": ".self_attn.v_proj.",
        ".attention.wo.": ".self_attn.o_proj.",
        ".attention.q_norm.": ".self_attn.q_norm.",
        ".attention.k_norm.": ".self_attn.k_norm.",
        ".feed_forward.w1.": ".mlp.gate_proj.",
        ".feed_forward.w3.": ".mlp.up_proj.",
        ".feed_forward.w2.": ".mlp.down_proj.",
    },
    orig_to_new_prefix={
        "tok_embeddings.": "model.embed_tokens.",
        "layers.": "model.layers.",
        "norm.": "model.norm.",
        "output.": "lm_head.",
    },
)


def build_qwen3(vllm_config, parallel_context) -> Qwen3Model:
    """The factory registered with vLLM."""
    config = Qwen3Config.from_hf(vllm_config.model_config.hf_config)
    return Qwen3Model(config, parallel_context)


# Qwen3Model traces whole under Dynamo: let vLLM compile it (and capture
# CUDA graphs) like its own models.
build_qwen3.supports_torch_compile = True


def register() -> None:
    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCH, build_qwen3)
