# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""SharedWeights on a module, without an engine: a push is atomic among
hundreds of tensors, a partial push copies only what it names, and a
model with its own loader keeps it for the tensors it renames or
transforms. (Pushes into running engines: tests/models/test_weight_updates.py.)"""

import pytest
import torch

from vllm.model_executor.model_loader.shared_weights import SharedWeights


def test_planned_push_is_atomic_among_hundreds_of_tensors():
    """A layout with one wrong shape and one unknown name among 400 good
    tensors: one error names both, and nothing is copied; a push of names
    outside the layout is refused the same way."""
    model = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(200))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pushed = {name: torch.randn(p.shape) for name, p in model.named_parameters()}
    pushed["57.weight"] = torch.randn(8, 9)
    pushed["200.weight"] = torch.randn(8, 8)
    with SharedWeights(pushed) as shared:
        shared.pack(pushed)
        with pytest.raises(ValueError) as excinfo:
            shared.request()(model)
    message = str(excinfo.value)
    assert "2 problem(s); nothing was copied" in message
    assert "57.weight: pushed (8, 9), model (8, 8)" in message
    assert "200.weight: not a parameter of the model" in message
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])

    good = {name: torch.randn(p.shape) for name, p in model.named_parameters()}
    with SharedWeights(good) as shared:
        shared.pack(good)
        with pytest.raises(ValueError, match="not in the buffer's layout.*9.bias"):
            shared.request(["0.weight", "9.bias.typo"])(model)
        assert torch.equal(model[0].weight, before["0.weight"])
        assert shared.request(["3.bias"])(model) == 1  # a part of it
        assert torch.equal(model[3].bias, good["3.bias"])
        assert torch.equal(model[3].weight, before["3.weight"])
        assert shared.request()(model) == 400
    for name, value in model.state_dict().items():
        assert torch.equal(value, good[name])


class RenamingModule(torch.nn.Module):
    """A module with its own loader: it renames one tensor, scales one,
    and stores one unchanged under its own name; it records what it gets."""

    def __init__(self):
        super().__init__()
        self.renamed = torch.nn.Linear(4, 4, bias=False)
        self.scaled = torch.nn.Linear(4, 4, bias=False)
        self.kept = torch.nn.Linear(4, 4, bias=False)
        self.received: list[list[str]] = []

    def load_weights(self, weights):
        names = []
        with torch.no_grad():
            for name, tensor in weights:
                names.append(name)
                if name == "old_name.weight":
                    self.renamed.weight.copy_(tensor)
                elif name == "scaled.weight":
                    self.scaled.weight.copy_(2 * tensor)
                else:
                    self.get_parameter(name).copy_(tensor)
        self.received.append(names)
        return set(names)


def test_planned_push_through_the_models_own_loader():
    """The first push takes the model's load_weights for every tensor;
    from the second on, the tensor it stored unchanged under its own name
    is copied directly, the renamed and the transformed ones still take
    the loader."""
    model = RenamingModule()
    layout = {
        "old_name.weight": torch.zeros(4, 4),
        "scaled.weight": torch.zeros(4, 4),
        "kept.weight": torch.zeros(4, 4),
    }
    with SharedWeights(layout) as shared:
        for push in range(3):
            pushed = {name: torch.randn(4, 4) for name in layout}
            shared.pack(pushed)
            assert shared.request()(model) == 3
            assert torch.equal(model.renamed.weight, pushed["old_name.weight"])
            assert torch.equal(model.scaled.weight, 2 * pushed["scaled.weight"])
            assert torch.equal(model.kept.weight, pushed["kept.weight"])
    assert model.received == [
        ["old_name.weight", "scaled.weight", "kept.weight"],
        ["old_name.weight", "scaled.weight"],
        ["old_name.weight", "scaled.weight"],
    ]


def test_device_buffer_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("checks the message on a machine without CUDA")
    with pytest.raises(ValueError, match="CUDA is not available here"):
        SharedWeights({"w": torch.zeros(2)}, device="cuda")
