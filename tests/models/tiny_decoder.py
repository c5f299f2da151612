# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""A small decoder written as training code, used by the tests.

Tensor parallelism uses plain PyTorch and `ParallelContext`: column shards
hold `1/tp` of the output features, row shards `1/tp` of the input features
and all-reduce over `parallel_context.tp_group`. Each shard's parameter has
a `weight_loader` that cuts its slice out of the full checkpoint tensor.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed
from safetensors.torch import save_file
from torch import nn

from vllm.model_executor.layers.trainable_attention import (
    TrainableFlashAttention,
    bind_trainable_attention,
)
from vllm.model_executor.models.callable_model import load_weights_by_name
from vllm.model_executor.parallel_context import ParallelContext

ARCH = "TinyDecoderForCausalLM"


@dataclass
class TinyConfig:
    vocab_size: int = 512
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 256
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 512

    @classmethod
    def from_hf(cls, hf_config) -> "TinyConfig":
        values = {}
        for name in cls.__dataclass_fields__:
            if hasattr(hf_config, name):
                values[name] = getattr(hf_config, name)
        rope = getattr(hf_config, "rope_parameters", None) or {}
        if "rope_theta" in rope:  # transformers 5 moved it here
            values["rope_theta"] = rope["rope_theta"]
        return cls(**values)


class ShardedLinear(nn.Linear):
    """`nn.Linear` holding one TP shard; `dim` 0 splits outputs (column
    parallel), `dim` 1 splits inputs (row parallel, all-reduced)."""

    def __init__(self, in_features, out_features, dim, parallel_context):
        self.dim = dim
        self.parallel_context = parallel_context
        sizes = [out_features, in_features]
        sizes[dim] = parallel_context.shard_size(sizes[dim], f"{sizes[dim]}")
        super().__init__(sizes[1], sizes[0], bias=False)
        self.weight.weight_loader = self._load_shard

    def _load_shard(self, param: nn.Parameter, full: torch.Tensor) -> None:
        shard = full.chunk(self.parallel_context.tp_size, self.dim)
        param.copy_(shard[self.parallel_context.tp_rank])

    def forward(self, x):
        out = super().forward(x)
        if self.dim == 1 and self.parallel_context.tp_size > 1:
            torch.distributed.all_reduce(out, group=self.parallel_context.tp_group)
        return out


class RMSNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of `x` [tokens, heads, dim] at `positions`."""
    half = x.shape[-1] // 2
    freqs = theta ** (
        -torch.arange(0, half, device=x.device, dtype=torch.float32) / half
    )
    angles = positions.float()[:, None] * freqs[None, :]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Attention(nn.Module):
    # ShardedLinear's own forward hides from vLLM's search that q/k/v are
    # plain linear maps of one input: declared (see fused_projections.py)
    _fused_projections = (("q_proj", "k_proj", "v_proj"),)

    def __init__(self, config: TinyConfig, parallel_context):
        super().__init__()
        pc = parallel_context
        self.num_heads = pc.shard_size(
            config.num_attention_heads, "num_attention_heads"
        )
        self.num_kv_heads = pc.shard_size(
            config.num_key_value_heads, "num_key_value_heads"
        )
        self.head_dim = config.head_dim
        self.theta = config.rope_theta
        q_size = config.num_attention_heads * config.head_dim
        kv_size = config.num_key_value_heads * config.head_dim
        self.q_proj = ShardedLinear(config.hidden_size, q_size, 0, pc)
        self.k_proj = ShardedLinear(config.hidden_size, kv_size, 0, pc)
        self.v_proj = ShardedLinear(config.hidden_size, kv_size, 0, pc)
        self.o_proj = ShardedLinear(q_size, config.hidden_size, 1, pc)
        self.attn = TrainableFlashAttention(
            self.num_heads, self.head_dim, self.num_kv_heads
        )

    def forward(self, x, positions, cu_seqlens=None):
        tokens = x.shape[0]
        q = self.q_proj(x).view(tokens, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        q, k = rotate(q, positions, self.theta), rotate(k, positions, self.theta)
        out = self.attn(q, k, v, cu_seqlens=cu_seqlens)
        return self.o_proj(out.reshape(tokens, -1))


class MLP(nn.Module):
    def __init__(self, config: TinyConfig, parallel_context):
        super().__init__()
        self.up_proj = ShardedLinear(
            config.hidden_size, config.intermediate_size, 0, parallel_context
        )
        self.down_proj = ShardedLinear(
            config.intermediate_size, config.hidden_size, 1, parallel_context
        )

    def forward(self, x):
        return self.down_proj(nn.functional.gelu(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config: TinyConfig, parallel_context):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, parallel_context)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, parallel_context)

    def forward(self, x, positions, cu_seqlens=None):
        x = x + self.attn(self.attn_norm(x), positions, cu_seqlens)
        return x + self.mlp(self.mlp_norm(x))


class TinyDecoder(nn.Module):
    """Embedding, blocks, final norm and LM head over packed tokens."""

    block = Block

    def __init__(
        self, config: TinyConfig, parallel_context: ParallelContext | None = None
    ):
        super().__init__()
        parallel_context = parallel_context or ParallelContext()
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            self.block(config, parallel_context)
            for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def embed_input_ids(self, input_ids):
        return self.embed(input_ids)

    def forward(self, input_ids, positions, cu_seqlens=None):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, positions, cu_seqlens)
        return self.norm(x)

    def compute_logits(self, hidden_states):
        return self.lm_head(hidden_states)


def build_tiny_decoder(vllm_config, parallel_context) -> TinyDecoder:
    """The model factory: `factory(vllm_config, parallel_context)`."""
    config = TinyConfig.from_hf(vllm_config.model_config.hf_config)
    return TinyDecoder(config, parallel_context)


class TinyDecoderForCausalLM(nn.Module):
    """The same model written as a vLLM model class."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        self.model = build_tiny_decoder(
            vllm_config, ParallelContext.from_vllm_config(vllm_config)
        )
        bind_trainable_attention(self.model, vllm_config.cache_config, prefix="model")

    def embed_input_ids(self, input_ids):
        return self.model.embed_input_ids(input_ids)

    def forward(
        self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None
    ):
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states):
        return self.model.compute_logits(hidden_states)

    def load_weights(self, weights):
        return {f"model.{name}" for name in load_weights_by_name(self.model, weights)}


def write_checkpoint(
    path: Path,
    config: TinyConfig | None = None,
    seed: int = 0,
    arch: str = ARCH,
    model_class: type[TinyDecoder] = TinyDecoder,
    lm_head_scale: float = 1.0,
) -> TinyDecoder:
    """Save a randomly initialised `model_class` (TinyDecoder or a
    subclass) as a vLLM model directory (config.json + model.safetensors)
    and return the model."""
    config = config or TinyConfig()
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():  # larger than default init: decisive logits
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.08)
        model.lm_head.weight.mul_(lm_head_scale)
    path.mkdir(parents=True, exist_ok=True)
    hf_config = dict(
        asdict(config),
        architectures=[arch],
        model_type="llama",
        torch_dtype="float32",
        tie_word_embeddings=False,
    )
    (path / "config.json").write_text(json.dumps(hf_config, indent=1))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(path / "model.safetensors"),
    )
    return model
