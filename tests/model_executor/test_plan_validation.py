# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""`validate_vllm_plans` and `print_model_structure` on a small decoder
written as training code with its `_tp_plan` / `_pp_plan`: what a plan
matched, and the report for each kind of mistake. (Engines sharded by
plans, at TP=2 and PP=2: tests/models/test_parallel_plans.py.)"""

from torch import nn

from vllm.model_executor.layers.trainable_attention import TrainableFlashAttention
from vllm.model_executor.models.plan_validation import (
    print_model_structure,
    validate_vllm_plans,
)

DIM, HEADS, HEAD_DIM, LAYERS, VOCAB = 96, 6, 16, 2, 256


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(DIM)
        self.q_proj = nn.Linear(DIM, DIM, bias=False)
        self.k_proj = nn.Linear(DIM, DIM, bias=False)
        self.v_proj = nn.Linear(DIM, DIM, bias=False)
        self.attn = TrainableFlashAttention(HEADS, HEAD_DIM)
        self.o_proj = nn.Linear(DIM, DIM, bias=False)
        self.up = nn.Linear(DIM, 4 * DIM, bias=False)
        self.down = nn.Linear(4 * DIM, DIM, bias=False)

    def forward(self, x, cu_seqlens=None):
        h = self.norm(x)
        q, k, v = (
            p(h).view(len(x), HEADS, HEAD_DIM)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        x = x + self.o_proj(self.attn(q, k, v, cu_seqlens).flatten(1))
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


class Decoder(nn.Module):
    _tp_plan = {
        "embed": "rowwise",
        "blocks.*.q_proj": "colwise",
        "blocks.*.k_proj": "colwise",
        "blocks.*.v_proj": "colwise",
        "blocks.*.o_proj": "rowwise",
        "blocks.*.up": "colwise",
        "blocks.*.down": "rowwise",
        "lm_head": "colwise_rep",
    }
    _pp_plan = {
        "embed": (["input_ids"], ["hidden_states"]),
        "blocks": (["hidden_states"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.RMSNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)


def test_a_fitting_plan_reports_what_it_matched(capsys):
    assert validate_vllm_plans(Decoder())
    out = capsys.readouterr().out
    assert "'blocks.*.q_proj' -> colwise: 2 module(s) (2 Linear), 2 parameter(s)" in out
    assert "valid: 0 error(s)" in out
    # TP=4 does not divide 6 heads: a warning, an error when strict
    assert "TP=4 does not divide blocks.*.attn num_heads (6)" in out
    assert not validate_vllm_plans(Decoder(), strict=True)


def test_each_mistake_is_named_with_the_way_out(capsys):
    plan = dict(Decoder._tp_plan)
    plan["blocks.*.w_up"] = plan.pop("blocks.*.up")  # misspelled
    plan["blocks"] = "colwise"  # a style for a linear layer, on a ModuleList
    pp_plan = {
        "embed": (["input_ids"], ["hidden_states"]),
        "block": (["hidden_states"], ["hidden_states"]),
        "lm_head": (["hidden"], ["logits"]),
    }
    assert not validate_vllm_plans(Decoder(), tp_plan=plan, pp_plan=pp_plan)
    out = capsys.readouterr().out
    assert "'blocks.*.w_up' (colwise) matches no module; nearest: blocks.*.up" in out
    assert "blocks (ModuleList): style 'colwise' fits nn.Linear" in out
    assert (
        "2 linear/embedding layer(s) no pattern covers stay whole on every "
        "rank: blocks.*.up"
    ) in out
    assert "pipeline module 'block' does not exist; nearest: blocks" in out
    assert "'lm_head' takes 'hidden', which no earlier module outputs" in out


def test_print_model_structure(capsys):
    print_model_structure(Decoder(), max_depth=2, show_params=True)
    out = capsys.readouterr().out
    assert "embed: Embedding(256 x 96)  [24,576 params]" in out
    assert "0..1: 2 x Block, each as 0:" in out
    assert "lm_head: Linear(96 -> 256)" in out
    assert "q_proj" not in out  # below max_depth
