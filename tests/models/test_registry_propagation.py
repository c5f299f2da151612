# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Registrations carried to spawned processes through the environment
(`VLLM_MODEL_REGISTRATIONS`): what travels, what is read back, and the
errors for what cannot travel. (Registrations reaching a real spawned
process: tests/models/test_registry_factories.py.)"""

import threading

import pytest
from torch import nn

from vllm.model_executor.models.registry_propagation import (
    ENV_VAR,
    adopt_late_registrations,
    check_module_importable,
    inherited_registrations,
    propagate_registration,
)


class TinyNet(nn.Module):
    pass


class HoldsALock:
    def __init__(self):
        self.lock = threading.Lock()


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def test_registrations_read_back_as_the_parent_made_them():
    propagate_registration("TinyNetForCausalLM", TinyNet)
    propagate_registration("ByName", "torch.nn:Linear")
    inherited = inherited_registrations()
    assert set(inherited) == {"TinyNetForCausalLM", "ByName"}
    assert inherited["TinyNetForCausalLM"].load_model_cls() is TinyNet
    assert inherited["ByName"].load_model_cls() is nn.Linear


def test_what_cannot_be_pickled_is_refused_with_the_way_out():
    with pytest.raises(TypeError, match="Define the factory at module level"):
        propagate_registration("Locked", HoldsALock())
    assert not inherited_registrations()


def test_what_is_too_large_for_the_environment_is_refused():
    with pytest.raises(ValueError, match="Load large objects .* inside the factory"):
        propagate_registration("Huge", bytes(200 * 1024))


def test_a_module_name_that_cannot_be_imported_says_how_to_fix_it():
    with pytest.raises(ModuleNotFoundError, match="on PYTHONPATH"):
        check_module_importable("Missing", "no_such_package_here.models")
    check_module_importable("Present", "torch.nn")  # no error


def test_late_registrations_fill_only_what_is_missing():
    propagate_registration("TinyNetForCausalLM", TinyNet)
    propagate_registration("Known", TinyNet)
    models = {"Known": "registered in this process"}
    adopt_late_registrations(models, ["TinyNetForCausalLM", "Known", "Absent"])
    assert set(models) == {"TinyNetForCausalLM", "Known"}
    assert models["Known"] == "registered in this process"
