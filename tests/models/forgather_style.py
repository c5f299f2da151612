# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""A decoder laid out as Forgather generates them: plain `nn.Linear`
layers, the global head count in the attention module, and declarative
parallelism plans on the class. No vLLM parallel layer and no
`ParallelContext` in sight: vLLM shards it from `_tp_plan` and splits it
into stages from `_pp_plan`.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from tests.models.tiny_decoder import RMSNorm, rotate
from vllm.model_executor.layers.trainable_attention import TrainableFlashAttention

ARCH = "ForgatherStyleForCausalLM"
CONFIG = dict(
    vocab_size=512,
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    head_dim=64,
    intermediate_size=256,
    max_position_embeddings=512,
)

TP_PLAN = {
    "model.input_encoder.embedding": "rowwise",
    "model.layer_stack.layers.*.attention.query_linear": "colwise",
    "model.layer_stack.layers.*.attention.key_linear": "colwise",
    "model.layer_stack.layers.*.attention.value_linear": "colwise",
    "model.layer_stack.layers.*.attention.output_linear": "rowwise",
    "model.layer_stack.layers.*.feedforward.up_proj": "colwise",
    "model.layer_stack.layers.*.feedforward.down_proj": "rowwise",
    "model.output_decoder": "colwise_rep",
}
PP_PLAN = {
    "model.input_encoder": (["input_ids"], ["hidden_states"]),
    "model.layer_stack": (
        ["hidden_states", "positions", "attention_mask"],
        ["hidden_states"],
    ),
    "model.output_decoder": (["hidden_states"], ["logits"]),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model, num_heads, head_dim):
        super().__init__()
        self.head_dim = head_dim
        self.query_linear = nn.Linear(d_model, num_heads * head_dim, bias=False)
        self.key_linear = nn.Linear(d_model, num_heads * head_dim, bias=False)
        self.value_linear = nn.Linear(d_model, num_heads * head_dim, bias=False)
        self.output_linear = nn.Linear(num_heads * head_dim, d_model, bias=False)
        self.attn = TrainableFlashAttention(num_heads, head_dim)

    def forward(self, x, positions, cu_seqlens=None):
        tokens = x.shape[0]
        # -1: the head count is whatever this rank's projections return
        q = self.query_linear(x).view(tokens, -1, self.head_dim)
        k = self.key_linear(x).view(tokens, -1, self.head_dim)
        v = self.value_linear(x).view(tokens, -1, self.head_dim)
        q, k = rotate(q, positions, 10000.0), rotate(k, positions, 10000.0)
        out = self.attn(q, k, v, cu_seqlens=cu_seqlens)
        return self.output_linear(out.reshape(tokens, -1))


class FeedForward(nn.Module):
    def __init__(self, d_model, d_feedforward):
        super().__init__()
        self.up_proj = nn.Linear(d_model, d_feedforward)
        self.down_proj = nn.Linear(d_feedforward, d_model)

    def forward(self, x):
        return self.down_proj(nn.functional.gelu(self.up_proj(x)))


class PreLNLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        d_model = config["hidden_size"]
        self.norm1 = RMSNorm(d_model, 1e-6)
        self.attention = CausalSelfAttention(
            d_model, config["num_attention_heads"], config["head_dim"]
        )
        self.norm2 = RMSNorm(d_model, 1e-6)
        self.feedforward = FeedForward(d_model, config["intermediate_size"])

    def forward(self, x, positions, cu_seqlens=None):
        x = x + self.attention(self.norm1(x), positions, cu_seqlens)
        return x + self.feedforward(self.norm2(x))


class LayerStack(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(
            PreLNLayer(config) for _ in range(config["num_hidden_layers"])
        )
        self.layer_norm = RMSNorm(config["hidden_size"], 1e-6)

    def forward(self, hidden_states, positions, attention_mask=None, cu_seqlens=None):
        for layer in self.layers:
            hidden_states = layer(hidden_states, positions, cu_seqlens)
        return self.layer_norm(hidden_states)


class InputEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embedding = nn.Embedding(config["vocab_size"], config["hidden_size"])

    def forward(self, input_ids):
        return self.embedding(input_ids)


class CausalLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_encoder = InputEncoder(config)
        self.layer_stack = LayerStack(config)
        self.output_decoder = nn.Linear(
            config["hidden_size"], config["vocab_size"], bias=False
        )


class ForgatherStyleModel(nn.Module):
    _tp_plan = TP_PLAN
    _pp_plan = PP_PLAN
    _no_split_modules = ["PreLNLayer"]

    def __init__(self, config=None):
        super().__init__()
        self.model = CausalLM(dict(CONFIG, **(config or {})))

    def forward(self, input_ids, positions, cu_seqlens=None):
        hidden = self.model.input_encoder(input_ids)
        return self.model.layer_stack(hidden, positions, cu_seqlens=cu_seqlens)

    def compute_logits(self, hidden_states):
        return self.model.output_decoder(hidden_states)


def build_forgather_style(vllm_config, parallel_context):
    """The factory: the model knows nothing of vLLM's parallelism."""
    hf_config = vllm_config.model_config.hf_config
    return ForgatherStyleModel({name: getattr(hf_config, name) for name in CONFIG})


def with_plan(tp_plan, pp_plan=PP_PLAN):
    """A factory whose model carries other plans."""

    def build(vllm_config, parallel_context):
        model = build_forgather_style(vllm_config, parallel_context)
        model._tp_plan, model._pp_plan = tp_plan, pp_plan
        return model

    return build


def write_checkpoint(path: Path, seed: int = 0) -> ForgatherStyleModel:
    torch.manual_seed(seed)
    model = ForgatherStyleModel()
    with torch.no_grad():  # decisive logits
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.08)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(
        json.dumps(
            dict(
                CONFIG,
                architectures=[ARCH],
                model_type="llama",
                num_key_value_heads=CONFIG["num_attention_heads"],
                torch_dtype="float32",
                tie_word_embeddings=False,
            ),
            indent=1,
        )
    )
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(path / "model.safetensors"),
    )
    return model


class GlobalHeadsAttention(CausalSelfAttention):
    """Reshapes with the model's global head count: breaks under TP."""

    def forward(self, x, positions, cu_seqlens=None):
        tokens = x.shape[0]
        q = self.query_linear(x).view(
            tokens, CONFIG["num_attention_heads"], self.head_dim
        )
        return super().forward(x, positions, cu_seqlens) + q.sum()


def build_with_global_heads(vllm_config, parallel_context):
    model = build_forgather_style(vllm_config, parallel_context)
    for layer in model.model.layer_stack.layers:
        layer.attention.__class__ = GlobalHeadsAttention
    return model


class SelfStagedModel(ForgatherStyleModel):
    """The pipeline opt-in without a plan: the factory builds only its
    stage (vLLM's `PPMissingLayer` for the rest), forward takes and returns
    `IntermediateTensors`, and `make_empty_intermediate_tensors` says what
    crosses a stage boundary."""

    _pp_plan = None

    def __init__(self, config, parallel_context):
        from vllm.distributed.utils import get_pp_indices
        from vllm.model_executor.models.utils import PPMissingLayer

        super().__init__(config)
        self.parallel_context = pc = parallel_context
        layers = self.model.layer_stack.layers
        start, end = get_pp_indices(len(layers), pc.pp_rank, pc.pp_size)
        for index in range(len(layers)):
            if not start <= index < end:
                layers[index] = PPMissingLayer()
        if not pc.is_first_pp_rank:
            self.model.input_encoder = PPMissingLayer()
        if not pc.is_last_pp_rank:
            self.model.layer_stack.layer_norm = PPMissingLayer()
            self.model.output_decoder = PPMissingLayer()

    def forward(self, input_ids, positions, intermediate_tensors=None, cu_seqlens=None):
        from vllm.sequence import IntermediateTensors

        if self.parallel_context.is_first_pp_rank:
            hidden = self.model.input_encoder(input_ids)
        else:
            hidden = intermediate_tensors["hidden_states"]
        hidden = self.model.layer_stack(hidden, positions, cu_seqlens=cu_seqlens)
        if not self.parallel_context.is_last_pp_rank:
            return IntermediateTensors({"hidden_states": hidden})
        return hidden

    def make_empty_intermediate_tensors(self, batch_size, dtype, device):
        from vllm.sequence import IntermediateTensors

        return IntermediateTensors(
            {
                "hidden_states": torch.zeros(
                    batch_size, CONFIG["hidden_size"], dtype=dtype, device=device
                )
            }
        )


def build_self_staged(vllm_config, parallel_context):
    hf_config = vllm_config.model_config.hf_config
    return SelfStagedModel(
        {name: getattr(hf_config, name) for name in CONFIG}, parallel_context
    )
