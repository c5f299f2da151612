# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Bad factories fail with the documented message, and the engine stops
instead of hanging."""

import pytest
from torch import nn

from tests.conftest import run_llm
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
