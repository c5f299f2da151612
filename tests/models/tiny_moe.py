# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""A small Qwen3-MoE-shaped decoder written as training code: the tiny
decoder's attention, and a sparse MoE block whose experts run as a Python
loop, declared for vLLM's fused MoE layer (see generic_moe.py). Its experts
are either an `nn.ModuleList` of gated MLPs (HF style) or stacked
`[num_experts, ...]` parameters (TorchTitan style, with a sigmoid-gated
shared expert); with `packed_experts`, every odd layer holds them as
transformers 5 does (gate and up packed in one parameter, a router module
that routes)."""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tests.models import tiny_decoder
from tests.models.tiny_decoder import Attention, RMSNorm, TinyConfig, TinyDecoder

ARCH = "TinyMoeForCausalLM"


@dataclass
class TinyMoeConfig(TinyConfig):
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 64
    norm_topk_prob: bool = True
    stacked_experts: bool = False
    shared_expert_intermediate_size: int = 0
    packed_experts: bool = False  # odd layers in transformers 5's form


class Expert(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class StackedExperts(nn.Module):
    """All experts' projections as `[num_experts, out, in]` parameters."""

    def __init__(self, num_experts: int, hidden: int, inter: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, inter, hidden))
        self.w3 = nn.Parameter(torch.empty(num_experts, inter, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, inter))
        for w in (self.w1, self.w3, self.w2):
            nn.init.normal_(w, 0, 0.02)

    def expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = x @ self.w1[index].T, x @ self.w3[index].T
        return (F.silu(gate) * up) @ self.w2[index].T


class SparseMoeBlock(nn.Module):
    _fused_moe = {
        "router": "gate",
        "experts": "experts",
        "top_k": "top_k",
        "renormalize": True,
    }

    def __init__(self, config: TinyMoeConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            Expert(config.hidden_size, config.moe_intermediate_size)
            for _ in range(config.num_experts)
        )

    def run_expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.experts[index](x)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        return weights / weights.sum(-1, keepdim=True), chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, chosen = self.route(x)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for index in range(self.num_experts):
            token, slot = (chosen == index).nonzero(as_tuple=True)
            if token.numel():
                expert_out = self.run_expert(index, x[token])
                out.index_add_(0, token, expert_out * weights[token, slot, None])
        return out


class StackedMoeBlock(SparseMoeBlock):
    _fused_moe = {
        "router": "gate",
        "experts": "experts",
        "top_k": "top_k",
        "renormalize": True,
        "projections": ("w1", "w3", "w2"),
        "shared_experts": "shared_expert",
        "shared_expert_gate": "shared_expert_gate",
    }

    def __init__(self, config: TinyMoeConfig):
        nn.Module.__init__(self)
        hidden = config.hidden_size
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.gate = nn.Linear(hidden, config.num_experts, bias=False)
        self.experts = StackedExperts(
            config.num_experts, hidden, config.moe_intermediate_size
        )
        self.shared_expert = Expert(hidden, config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)

    def run_expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.experts.expert(index, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return super().forward(x) + shared


class TopKRouter(nn.Module):
    """transformers 5's router: its forward routes, it holds the logits'
    weight and the routing settings."""

    def __init__(self, config: TinyMoeConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        nn.init.normal_(self.weight, 0, 0.1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.softmax(F.linear(x, self.weight), dim=-1, dtype=torch.float32)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights, chosen


class PackedExperts(nn.Module):
    """transformers 5's experts: gate and up rows in one parameter."""

    def __init__(self, num_experts: int, hidden: int, inter: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter))
        for w in (self.gate_up_proj, self.down_proj):
            nn.init.normal_(w, 0, 0.02)

    def expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up_proj[index]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj[index])


class PackedMoeBlock(SparseMoeBlock):
    _fused_moe = {
        "router": "gate",
        "experts": "experts",
        "top_k": "gate.top_k",
        "renormalize": "gate.norm_topk_prob",
        "projections": ("gate_up_proj", "down_proj"),
    }

    def __init__(self, config: TinyMoeConfig):
        nn.Module.__init__(self)
        self.num_experts = config.num_experts
        self.gate = TopKRouter(config)
        self.experts = PackedExperts(
            config.num_experts, config.hidden_size, config.moe_intermediate_size
        )

    def run_expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.experts.expert(index, x)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate(x)


class MoeBlock(nn.Module):
    def __init__(self, config: TinyMoeConfig, parallel_context):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, parallel_context)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        moe_class = StackedMoeBlock if config.stacked_experts else SparseMoeBlock
        self.moe = moe_class(config)

    def forward(self, x, positions, cu_seqlens=None):
        x = x + self.attn(self.attn_norm(x), positions, cu_seqlens)
        return x + self.moe(self.mlp_norm(x))


class TinyMoe(TinyDecoder):
    block = MoeBlock

    def __init__(self, config: TinyMoeConfig, parallel_context=None):
        super().__init__(config, parallel_context)
        if config.packed_experts:
            for layer in self.layers[1::2]:
                layer.moe = PackedMoeBlock(config)


def build_tiny_moe(vllm_config, parallel_context) -> TinyMoe:
    """The model factory."""
    config = TinyMoeConfig.from_hf(vllm_config.model_config.hf_config)
    return TinyMoe(config, parallel_context)


def write_checkpoint(
    path: Path, config: TinyMoeConfig, seed: int = 0, lm_head_scale: float = 1.0
) -> TinyMoe:
    """Save a randomly initialised TinyMoe as a model directory and return
    the model."""
    return tiny_decoder.write_checkpoint(
        path, config, seed, ARCH, TinyMoe, lm_head_scale
    )


def successor_chains(
    successor: torch.Tensor, count: int, length: int, generator: torch.Generator
) -> list[list[int]]:
    """`count` token sequences in which each token is `successor[previous]`."""
    tokens = [torch.randint(0, len(successor), (count,), generator=generator)]
    for _ in range(length - 1):
        tokens.append(successor[tokens[-1]])
    return torch.stack(tokens, 1).tolist()


def train_to_successors(model: TinyMoe, successor: torch.Tensor, steps: int) -> float:
    """Train `model` (on its device, fp32) to predict each token's fixed
    successor: a decisive model, with the embedding and the LM head frozen
    so that the attention and MoE blocks carry the mapping (without the
    MoE blocks about half the top-1 predictions change). Returns the last
    loss."""
    from vllm.model_executor.layers.trainable_attention import pack_sequences

    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    trained = [
        p
        for name, p in model.named_parameters()
        if name.split(".")[0] not in ("embed", "lm_head")
    ]
    optimizer = torch.optim.AdamW(trained, lr=3e-3)
    for _ in range(steps):
        sequences = successor_chains(successor, 32, 24, generator)
        input_ids, positions, cu_seqlens = pack_sequences(sequences, device)
        logits = model.compute_logits(
            model(input_ids, positions, cu_seqlens=cu_seqlens)
        )
        targets = torch.tensor([s[1:] + [-100] for s in sequences], device=device)
        loss = F.cross_entropy(logits, targets.flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()
