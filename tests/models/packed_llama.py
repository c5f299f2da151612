# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""The example's plain Llama (examples/offline_inference/parallel_plans)
with gate and up packed into one projection, as Phi-3 stores them, under
transformers 5's `packed_colwise` style, and no plan entry for the
embedding."""

import sys
from pathlib import Path

from torch import nn
from torch.nn import functional as F

sys.path.insert(
    0,
    str(
        Path(__file__).resolve().parents[2]
        / "examples/offline_inference/parallel_plans"
    ),
)
from plain_llama import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    save_checkpoint,
)

__all__ = ["LlamaConfig", "build_packed_llama", "packed_llama", "save_checkpoint"]


class PackedMLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(
            config.hidden_size, 2 * config.intermediate_size, bias=False
        )
        self.down_proj = nn.Linear(
            config.intermediate_size, config.hidden_size, bias=False
        )

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def packed_llama(config: LlamaConfig) -> LlamaForCausalLM:
    model = LlamaForCausalLM(config)
    for layer in model.model.layers:
        layer.mlp = PackedMLP(config)
    # no entry for the embedding, as in Hugging Face's Llama plan: a tied
    # lm_head that the plan gathers splits it by vocabulary
    model._tp_plan = {
        pattern: style
        for pattern, style in model._tp_plan.items()
        if not pattern.endswith(("gate_proj", "up_proj", "embed_tokens"))
    } | {"model.layers.*.mlp.gate_up_proj": "packed_colwise"}
    return model


def build_packed_llama(vllm_config, parallel_context):
    return packed_llama(LlamaConfig.from_hf(vllm_config.model_config.hf_config))


build_packed_llama.supports_torch_compile = True
