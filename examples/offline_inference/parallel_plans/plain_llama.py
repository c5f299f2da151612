# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Llama as plain training code, with the parallelism plans Hugging Face
models carry: no vLLM layer and no `ParallelContext` in the model. vLLM
shards it from `_tp_plan` and splits it into pipeline stages from
`_pp_plan`.

Parameter names are Hugging Face Llama's, so one checkpoint loads into this
module, into `transformers` and into vLLM's native `LlamaForCausalLM`:

    model.embed_tokens
    model.layers.N.input_layernorm
    model.layers.N.self_attn.{q_proj, k_proj, v_proj, o_proj}
    model.layers.N.post_attention_layernorm
    model.layers.N.mlp.{gate_proj, up_proj, down_proj}
    model.norm
    lm_head                      (the embedding's weight when tied)
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from vllm.model_executor.layers.trainable_attention import TrainableFlashAttention

ARCH = "PlainLlamaForCausalLM"


@dataclass
class LlamaConfig:
    """The config.json fields this model reads (Hugging Face names)."""

    vocab_size: int = 512
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 512
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf(cls, hf_config) -> "LlamaConfig":
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


def rotate(x, cos, sin):
    """Rotary embedding, rotate-half layout (as Llama checkpoints expect)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        dim, head_dim = config.hidden_size, config.head_dim
        heads, kv_heads = (config.num_attention_heads, config.num_key_value_heads)
        self.head_dim = head_dim
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=False)
        self.attn = TrainableFlashAttention(heads, head_dim, kv_heads)
        half = head_dim // 2
        inv_freq = config.rope_theta ** (
            -torch.arange(half, dtype=torch.float32) / half
        )
        angles = torch.outer(
            torch.arange(config.max_position_embeddings, dtype=torch.float32), inv_freq
        )
        # built once, in fp32, on the device the module is built on
        self.register_buffer(
            "rope", torch.cat((angles.cos(), angles.sin()), -1), persistent=False
        )

    def forward(self, x, positions, cu_seqlens=None):
        tokens = x.shape[0]
        # -1 heads: under tensor parallelism a rank has a share of them
        q = self.q_proj(x).view(tokens, -1, self.head_dim)
        k = self.k_proj(x).view(tokens, -1, self.head_dim)
        v = self.v_proj(x).view(tokens, -1, self.head_dim)
        cos, sin = self.rope[positions][:, None].chunk(2, dim=-1)
        out = self.attn(
            rotate(q, cos, sin), rotate(k, cos, sin), v, cu_seqlens=cu_seqlens
        )
        return self.o_proj(out.reshape(tokens, -1))


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        dim, hidden = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x, positions, cu_seqlens=None):
        x = x + self.self_attn(self.input_layernorm(x), positions, cu_seqlens)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers)
        )
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Packed tokens in (`cu_seqlens` marks the sequences when training),
    hidden states out; logits from `compute_logits`."""

    # Module names; `*` is a layer index. vLLM turns the nn.Linear layers
    # into its parallel linear layers and the embedding into a
    # vocabulary-parallel one (a tied lm_head shares its shard).
    _tp_plan = {
        "model.embed_tokens": "rowwise",
        "model.layers.*.self_attn.q_proj": "colwise",
        "model.layers.*.self_attn.k_proj": "colwise",
        "model.layers.*.self_attn.v_proj": "colwise",
        "model.layers.*.self_attn.o_proj": "rowwise",
        "model.layers.*.mlp.gate_proj": "colwise",
        "model.layers.*.mlp.up_proj": "colwise",
        "model.layers.*.mlp.down_proj": "rowwise",
        "lm_head": "colwise_gather_output",  # transformers 5's colwise_rep
    }
    # What forward runs, in order, with the names of inputs and outputs.
    # vLLM gives each stage a run of whole layers; the embedding runs on
    # the first stage, the final norm and lm_head on the last.
    _pp_plan = {
        "model.embed_tokens": (["input_ids"], ["hidden_states"]),
        "model.layers": (["hidden_states", "positions"], ["hidden_states"]),
        "model.norm": (["hidden_states"], ["hidden_states"]),
        "lm_head": (["hidden_states"], ["logits"]),
    }
    _no_split_modules = ["LlamaDecoderLayer"]

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, positions, cu_seqlens=None):
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, positions, cu_seqlens)
        return self.model.norm(x)

    def compute_logits(self, hidden_states):
        return self.lm_head(hidden_states)


def build_plain_llama(vllm_config, parallel_context):
    """The factory vLLM calls in each worker: the model as written for
    training; vLLM applies its plans."""
    return LlamaForCausalLM(LlamaConfig.from_hf(vllm_config.model_config.hf_config))


# The module is one graph without Python-side data dependence, so vLLM
# compiles it (and captures CUDA graphs) as it does its own models.
build_plain_llama.supports_torch_compile = True


def save_checkpoint(model: LlamaForCausalLM, path: Path) -> None:
    """A Hugging Face Llama checkpoint of `model`; a tied lm_head is stored
    once, as the embedding (as `save_pretrained` does)."""
    path.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            name: param.detach().contiguous().cpu()
            for name, param in model.named_parameters()
        },  # one per tie
        str(path / "model.safetensors"),
    )
    (path / "config.json").write_text(
        json.dumps(
            dict(
                asdict(model.config),
                architectures=[ARCH],
                model_type="llama",
                torch_dtype="float32",
            ),
            indent=1,
        )
    )
