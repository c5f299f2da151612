# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""A checkpoint whose config.json names its model factory
(`vllm_model_factory`): registered for its architecture only with
trust_remote_code, imported from the checkpoint directory, and never over
a registration made in code. (`vllm serve DIR` on such a directory:
tests/entrypoints/test_serve.py.)"""

import importlib
import sys
from types import SimpleNamespace

import pytest

from vllm import ModelRegistry
from vllm.model_executor.models.checkpoint_factory import (
    register_factory_from_config,
)

FACTORY = "ckpt_models.decoder:build"


@pytest.fixture
def checkpoint(tmp_path):
    """A directory holding the factory's module, and the registry and
    import path restored after the test."""
    package = tmp_path / "ckpt_models"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "decoder.py").write_text(
        "def build(vllm_config, parallel_context):\n    raise NotImplementedError\n"
    )
    path = list(sys.path)
    yield tmp_path
    sys.path[:] = path
    for name in ("ckpt_models", "ckpt_models.decoder"):
        sys.modules.pop(name, None)
    for arch in ("CheckpointNamedModel", "RegisteredInCode"):
        ModelRegistry.models.pop(arch, None)


def model_config(directory, factory=FACTORY, trust_remote_code=False):
    return SimpleNamespace(
        model=str(directory),
        hf_config=SimpleNamespace(vllm_model_factory=factory),
        trust_remote_code=trust_remote_code,
    )


def test_the_named_factory_is_registered_with_trust_remote_code(checkpoint):
    config = model_config(checkpoint, trust_remote_code=True)
    register_factory_from_config(ModelRegistry, ["CheckpointNamedModel"], config)
    assert "CheckpointNamedModel" in ModelRegistry.get_supported_archs()
    # importable from the checkpoint directory, as remote code is
    assert importlib.import_module("ckpt_models.decoder").build.__name__ == "build"


def test_without_trust_remote_code_nothing_is_imported(checkpoint):
    with pytest.raises(ValueError, match="Pass --trust-remote-code"):
        register_factory_from_config(
            ModelRegistry, ["CheckpointNamedModel"], model_config(checkpoint)
        )
    assert "CheckpointNamedModel" not in ModelRegistry.get_supported_archs()
    assert "ckpt_models" not in sys.modules


def test_a_malformed_name_says_what_form_it_needs(checkpoint):
    config = model_config(checkpoint, "ckpt_models.decoder.build", True)
    with pytest.raises(ValueError, match='must be "package.module:factory"'):
        register_factory_from_config(ModelRegistry, ["CheckpointNamedModel"], config)


def test_a_registration_in_code_wins(checkpoint):
    ModelRegistry.register_model("RegisteredInCode", lambda vllm_config, pc: None)
    registered = ModelRegistry.models["RegisteredInCode"]
    # without trust_remote_code the key is not even read
    register_factory_from_config(
        ModelRegistry, ["RegisteredInCode"], model_config(checkpoint)
    )
    config = model_config(checkpoint, trust_remote_code=True)
    register_factory_from_config(ModelRegistry, ["RegisteredInCode"], config)
    assert ModelRegistry.models["RegisteredInCode"] is registered
