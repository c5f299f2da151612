# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""`load_weights_by_name`, how CallableModelWrapper loads a checkpoint and
every later weight update into a factory's module: a checkpoint names
every parameter, an update changes only what it names, a bad update
changes nothing and names every problem, floating dtypes are cast.
(Updates into running engines, TP=1 and TP=2: tests/models/test_weight_updates.py.)"""

import pytest
import torch
from torch import nn

from vllm.model_executor.models.callable_model import load_weights_by_name


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 16)
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))
        self.norm = nn.RMSNorm(16)
        self.lm_head = nn.Linear(16, 64, bias=False)


UPDATED = ("layers.1.weight", "lm_head.weight")


def loaded_model() -> Decoder:
    """A model that has had its checkpoint: later loads are updates."""
    torch.manual_seed(0)
    model = Decoder()
    load_weights_by_name(model, Decoder().state_dict().items())
    return model


def moved(model: Decoder) -> dict[str, torch.Tensor]:
    """What one optimiser step on the UPDATED parameters would send."""
    state = model.state_dict()
    return {
        name: state[name] + 0.05 * torch.randn_like(state[name]) for name in UPDATED
    }


def test_update_changes_only_what_it_names():
    model = loaded_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    update = moved(model)
    assert load_weights_by_name(model, update.items()) == set(UPDATED)
    for name, value in model.state_dict().items():
        assert torch.equal(value, update.get(name, before[name])), name


def test_bad_update_changes_nothing_and_names_every_problem():
    model = loaded_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    update = moved(model)  # valid tensors ...
    update["layers.0.scale"] = torch.zeros(3)  # ... and three bad ones
    update["layers.0.weight"] = torch.zeros(5, 5)
    update["norm.weight"] = torch.ones(16, dtype=torch.int64)
    with pytest.raises(ValueError) as excinfo:
        load_weights_by_name(model, update.items())
    message = str(excinfo.value)
    assert "weight update (nothing was changed)" in message
    assert "in the checkpoint but not in the model:\n    layers.0.scale" in message
    assert "layers.0.weight: checkpoint (5, 5), model (16, 16)" in message
    assert "norm.weight: dtype torch.int64 for a torch.float32 parameter" in message
    assert "missing" not in message  # an update need not name everything
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_checkpoint_must_name_every_parameter():
    state = dict(Decoder().state_dict())
    del state["norm.weight"]
    with pytest.raises(
        ValueError, match="missing from the checkpoint:\n    norm.weight"
    ):
        load_weights_by_name(Decoder(), state.items())


def test_update_casts_floating_dtypes():
    model = loaded_model()
    update = {name: value.double() for name, value in moved(model).items()}
    load_weights_by_name(model, update.items())
    assert torch.equal(model.lm_head.weight, update["lm_head.weight"].float())
