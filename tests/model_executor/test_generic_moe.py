# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""What a `_fused_moe` declaration may say, and the errors that name what
is wrong in one. (The engine runs of declared MoE models, at TP=1 and
TP=2, are in tests/models/test_generic_moe.py.)"""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from vllm.model_executor.layers.generic_moe import (
    FusedMoEError,
    declaration_of,
    use_fused_moe,
)

HIDDEN, INTERMEDIATE, EXPERTS = 32, 64, 8


class Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
        self.up_proj = nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
        self.down_proj = nn.Linear(INTERMEDIATE, HIDDEN, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoeBlock(nn.Module):
    """Top-2 softmax routing over a ModuleList of gated MLPs."""

    _fused_moe = {
        "router": "gate",
        "experts": "experts",
        "top_k": "top_k",
        "renormalize": True,
    }

    def __init__(self):
        super().__init__()
        self.top_k = 2
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(Expert() for _ in range(EXPERTS))

    def forward(self, x):
        weights, chosen = F.softmax(self.gate(x), -1, dtype=torch.float32).topk(2)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for index, expert in enumerate(self.experts):
            token, slot = (chosen == index).nonzero(as_tuple=True)
            out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        return out


def model_with(declaration=None) -> nn.Module:
    cls = SparseMoeBlock
    if declaration is not None:
        cls = type("Declared", (SparseMoeBlock,), {"_fused_moe": declaration})
    model = nn.Module()
    model.moe = cls()
    return model


BASE = SparseMoeBlock._fused_moe


def test_a_declaration_gets_the_documented_defaults():
    spec = declaration_of(model_with().moe, "moe")
    assert spec is not None
    assert (spec.router, spec.experts, spec.top_k) == ("gate", "experts", "top_k")
    assert spec.projections == ("gate_proj", "up_proj", "down_proj")
    assert (spec.scoring, spec.routed_scaling_factor) == ("softmax", 1.0)
    assert spec.shared_experts is None
    assert declaration_of(nn.Linear(2, 2), "not_moe") is None


@pytest.mark.parametrize(
    "declaration, tp_size, message",
    [
        (dict(BASE, topk=2), 1, "unknown keys ['topk']"),
        (dict(BASE, router="experts.0.up_proj"), 1, "must be a linear layer from"),
        (dict(BASE, router="router"), 1, "has no submodule 'router'"),
        (dict(BASE, projections=("w1", "w3", "w2")), 1, "lacks nn.Linear children"),
        (dict(BASE, projections=("gate_up_proj", "down_proj")), 1, "are read from"),
        (dict(BASE, projections=("gate_proj",)), 1, "or the packed gate_up"),
        (dict(BASE, top_k=9), 1, "must be an int in [1, 8]"),
        (dict(BASE, scoring="softplus"), 1, 'routes by "softmax" or "sigmoid"'),
        (BASE, 3, "intermediate size 64 does not split over tensor_parallel_size 3"),
    ],
)
def test_declaration_errors_name_the_problem(declaration, tp_size, message):
    with pytest.raises(FusedMoEError) as excinfo:
        use_fused_moe(model_with(declaration), "model", 0, tp_size, False)
    assert message in str(excinfo.value)


def test_expert_parallelism_is_refused_with_the_way_out():
    with pytest.raises(FusedMoEError, match="without enable_expert_parallel"):
        use_fused_moe(model_with(), "model", 0, 2, True)
