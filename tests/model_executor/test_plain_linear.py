# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Plain torch.nn.Linear layers run through vLLM's linear method: same
results, same classes and names, a subclass's own forward kept, and new
weights reach the processed (on the CPU, prepacked) copy."""

import copy

import pytest
import torch
from torch import nn

from vllm.model_executor.layers.plain_linear import (
    VllmLinearForward,
    refresh_vllm_linear_method,
    use_vllm_linear_method,
)
from vllm.model_executor.layers.utils import (
    default_unquantized_gemm,
    dispatch_unquantized_gemm,
)

# On CUDA vLLM's unquantized GEMM is F.linear and layers are left alone.
OWN_GEMM = dispatch_unquantized_gemm() is not default_unquantized_gemm
needs_own_gemm = pytest.mark.skipif(
    not OWN_GEMM, reason="vLLM's GEMM here is torch.nn.functional.linear"
)


class ScaledOutput(nn.Linear):
    """A subclass whose forward wraps nn.Linear's, as TP layers do."""

    def forward(self, x):
        return 2 * super().forward(x)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 96)
        self.down = ScaledOutput(96, 64, bias=False)
        self.gate = nn.utils.parametrizations.weight_norm(nn.Linear(64, 96))

    def forward(self, x):
        return self.down(torch.relu(self.up(x)) * self.gate(x))


def process(model):
    """What vLLM's model loader does after loading weights."""
    for module in model.modules():
        if isinstance(module, VllmLinearForward):
            module.quant_method.process_weights_after_loading(module)


@needs_own_gemm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_results_classes_and_names(dtype):
    torch.manual_seed(0)
    reference = Block().to(dtype)
    model = copy.deepcopy(reference)
    assert use_vllm_linear_method(model) == 2  # weight_norm's is skipped
    process(model)
    x = torch.randn(16, 64, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
    assert isinstance(model.down, ScaledOutput)
    assert isinstance(model.down, VllmLinearForward)
    assert type(model.down).__name__ == "ScaledOutput"
    assert not isinstance(model.gate, VllmLinearForward)
    assert list(model.state_dict()) == list(reference.state_dict())
    assert use_vllm_linear_method(model) == 0  # once only


@needs_own_gemm
def test_loaded_weights_reach_the_processed_copy():
    torch.manual_seed(0)
    model = Block()
    use_vllm_linear_method(model)
    process(model)
    new = Block()
    with torch.no_grad():
        model.up.weight.copy_(new.up.weight)
        model.up.bias.copy_(new.up.bias)
        model.gate.load_state_dict(new.gate.state_dict())
        model.down.weight.copy_(new.down.weight)
    refresh_vllm_linear_method(
        model, [model.up.weight, model.up.bias, model.down.weight]
    )
    x = torch.randn(4, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), new(x))


@pytest.mark.skipif(OWN_GEMM, reason="this platform has a GEMM of its own")
def test_left_alone_where_vllm_gemm_is_f_linear():
    model = Block()
    assert use_vllm_linear_method(model) == 0
    assert type(model.up) is nn.Linear
