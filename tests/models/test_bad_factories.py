# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Bad factories fail with the documented message, and the engine stops
instead of hanging."""

import threading

import pytest
from torch import nn

from tests.conftest import run_llm
from tests.models.tiny_decoder import build_tiny_decoder
from vllm import ModelRegistry


def raising_factory(vllm_config, parallel_context):
    raise ValueError("hidden_size must be even")


def non_module_factory(vllm_config, parallel_context):
    return 42


class NoLogits(nn.Module):
    def forward(self, input_ids, positions):
        return input_ids


def no_logits_factory(vllm_config, parallel_context):
    return NoLogits()


CASES = {
    "raises": (
        raising_factory,
        "The model factory 'tests.models.test_bad_factories."
        "raising_factory' registered for 'BadRaises' raised "
        "ValueError: hidden_size must be even",
    ),
    "non_module": (
        non_module_factory,
        "registered for 'BadNonModule' returned int, not a torch.nn.Module",
    ),
    "no_compute_logits": (
        no_logits_factory,
        "NoLogits, returned by the model factory "
        "'tests.models.test_bad_factories.no_logits_factory'"
        " for 'BadNoComputeLogits', lacks the method(s) vLLM "
        "calls: compute_logits(hidden_states) -> logits",
    ),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(CASES))
def test_bad_factory_fails_engine_start(tiny_checkpoint, engine_output, case):
    factory, message = CASES[case]
    arch = {
        "raises": "BadRaises",
        "non_module": "BadNonModule",
        "no_compute_logits": "BadNoComputeLogits",
    }[case]
    path, _ = tiny_checkpoint
    ModelRegistry.register_model(arch, factory)
    # The first case builds in a spawned worker: its error crosses the
    # process boundary to the user's terminal. The others build in-process.
    spawned = case == "raises"
    with pytest.raises(Exception) as failure:
        run_llm(path, arch, spawn_workers=spawned)
    assert message in engine_output(failure)
    if spawned:
        assert "initialization failed" in str(failure.value)


def test_unpicklable_factory_is_refused_at_registration():
    lock = threading.Lock()

    def factory(vllm_config, parallel_context):
        with lock:
            return build_tiny_decoder(vllm_config, parallel_context)

    with pytest.raises(TypeError) as excinfo:
        ModelRegistry.register_model("BadUnpicklable", factory)
    message = str(excinfo.value)
    assert "must be pickled to reach vLLM's engine and worker processes" in (message)
    assert "register it as 'package.module:factory'" in message
    assert "BadUnpicklable" not in ModelRegistry.get_supported_archs()


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
