# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""`ModelRegistry.register_model` with a model factory, without starting an
engine: every callable form registers as a `CallableModelWrapper`, what
cannot work is refused at registration with the way out, and the
registration reaches a spawn-started process."""

import collections
import functools
import os
import subprocess
import sys
import textwrap
import threading

import pytest
from torch import nn

from vllm import ModelRegistry
from vllm.model_executor.models.callable_model import CallableModelWrapper


def linear_factory(vllm_config, parallel_context, *, width=4):
    return nn.Linear(width, width)


class FactoryObject:
    def __call__(self, vllm_config, parallel_context):
        return nn.Linear(4, 4)


@pytest.mark.parametrize(
    "factory",
    [
        linear_factory,
        lambda vllm_config, parallel_context: nn.Linear(4, 4),
        functools.partial(linear_factory, width=8),
        FactoryObject(),
    ],
    ids=["function", "lambda", "partial", "callable_object"],
)
def test_factory_registers_as_a_wrapped_model(factory):
    ModelRegistry.register_model("FactoryForm", factory)
    assert "FactoryForm" in ModelRegistry.get_supported_archs()
    model_cls = ModelRegistry.models["FactoryForm"].load_model_cls()
    assert issubclass(model_cls, CallableModelWrapper)
    assert model_cls.model_factory is factory


def test_registration_reaches_a_spawned_process():
    """The child imports vLLM afresh, as vLLM's spawned engine and workers
    do, and builds the module with the factory registered here (a local
    function: it travels by value)."""

    def local_factory(vllm_config, parallel_context):
        return nn.Linear(3, 5)

    ModelRegistry.register_model("FactoryInChild", local_factory)
    child = textwrap.dedent(
        """
        from vllm import ModelRegistry
        model_cls = ModelRegistry.models["FactoryInChild"].load_model_cls()
        print(model_cls.model_factory(None, None))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", child],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, VLLM_LOGGING_LEVEL="ERROR"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Linear(in_features=3, out_features=5, bias=True)" in result.stdout


def test_unpicklable_factory_is_refused_at_registration():
    lock = threading.Lock()

    def factory(vllm_config, parallel_context):
        with lock:
            return nn.Linear(4, 4)

    with pytest.raises(TypeError) as excinfo:
        ModelRegistry.register_model("BadUnpicklable", factory)
    message = str(excinfo.value)
    assert "must be pickled to reach vLLM's engine and worker processes" in message
    assert "register it as 'package.module:factory'" in message
    assert "BadUnpicklable" not in ModelRegistry.get_supported_archs()


def test_unimportable_module_string_is_refused_at_registration():
    with pytest.raises(ModuleNotFoundError) as excinfo:
        ModelRegistry.register_model("TinyNowhere", "nowhere_factories:build")
    message = str(excinfo.value)
    assert "no module named 'nowhere_factories' can be imported" in message
    assert "on PYTHONPATH" in message
    assert "TinyNowhere" not in ModelRegistry.get_supported_archs()


@pytest.mark.parametrize(
    "factory",
    [
        lambda vllm_config: None,
        lambda: None,
        lambda a, b, c: None,
    ],
)
def test_factory_with_wrong_signature_is_refused(factory):
    with pytest.raises(
        TypeError,
        match=r"must accept two positional "
        r"arguments \(vllm_config, parallel_context\)",
    ):
        ModelRegistry.register_model("BadSignature", factory)


def test_not_callable_is_refused():
    with pytest.raises(TypeError, match="should be a string or PyTorch model"):
        ModelRegistry.register_model("BadObject", 42)


def test_class_named_by_string_loads_as_the_class():
    """vLLM registers some architectures by name with a class that is not
    an `nn.Module` (0.32's CPU `DeepSeekV4MTP`, which only raises): a class
    loads as itself, never as a factory."""
    ModelRegistry.register_model("PlainClassByName", "collections:OrderedDict")
    model_cls = ModelRegistry.models["PlainClassByName"].load_model_cls()
    assert model_cls is collections.OrderedDict
