# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""A factory's module is compiled by default, as vLLM's own models are:
`supports_torch_compile` unset tries and falls back with one warning,
True makes a failed trace an error, False never tries."""

import pytest
import torch

from tests.conftest import make_llm, run_llm
from tests.models.tiny_decoder import TinyConfig, TinyDecoder
from vllm import ModelRegistry
from vllm.compilation.wrapper import TorchCompileWithNoGuardsWrapper
from vllm.model_executor.models.callable_model import (
    CallableModelWrapper,
    CompileOrFallBack,
)

FALLBACK = "runs uncompiled: torch.compile could not trace it"


class NaNCheckedDecoder(TinyDecoder):
    """Training code with a NaN guard: data-dependent Python control flow,
    which Dynamo cannot trace as one graph. (It must not raise: in vLLM's
    profile run attention returns uninitialised memory.)"""

    def forward(self, input_ids, positions, cu_seqlens=None):
        hidden = super().forward(input_ids, positions, cu_seqlens)
        if torch.isnan(hidden).any():
            hidden = torch.nan_to_num(hidden)
        return hidden


def build_nan_checked(vllm_config, parallel_context):
    config = TinyConfig.from_hf(vllm_config.model_config.hf_config)
    return NaNCheckedDecoder(config, parallel_context)


def build_nan_checked_declared(vllm_config, parallel_context):
    return build_nan_checked(vllm_config, parallel_context)


build_nan_checked_declared.supports_torch_compile = True


def compile_state(model):
    """Runs in each worker: whether vLLM compiled the module."""
    return {
        "compiled": getattr(model, "compiled", None),
        "do_not_compile": getattr(model, "do_not_compile", None),
    }


def post_grad_pass(model):
    """Runs in each worker: the Inductor post-grad pass vLLM compiles with."""
    options = model.vllm_config.compilation_config.inductor_compile_config
    return type(options.get("post_grad_custom_post_pass")).__name__


def test_what_each_declaration_builds():
    def undeclared(vllm_config, parallel_context):
        pass

    def opted_out(vllm_config, parallel_context):
        pass

    opted_out.supports_torch_compile = False
    tried = CallableModelWrapper.for_factory("Undeclared", undeclared)
    assert issubclass(tried, CompileOrFallBack)
    assert issubclass(tried, TorchCompileWithNoGuardsWrapper)
    assert not tried.compile_required
    assert CallableModelWrapper.for_factory(
        "Declared", build_nan_checked_declared
    ).compile_required
    never = CallableModelWrapper.for_factory("OptedOut", opted_out)
    assert not issubclass(never, TorchCompileWithNoGuardsWrapper)


def test_undeclared_traceable_factory_is_compiled(tiny_engine):
    """The shared engine's factory declares nothing and is compiled (the
    other tests on this engine check its tokens and logits against the
    module's own)."""
    assert tiny_engine.apply_model(compile_state) == [
        {"compiled": True, "do_not_compile": False}
    ]


def test_compiled_module_keeps_residual_adds_out_of_gemms(tiny_engine):
    """The engine's Inductor runs SplitResidualAddmmPass after its own
    patterns (what it does: tests/compilation/test_split_residual_addmm.py)."""
    assert tiny_engine.apply_model(post_grad_pass) == ["SplitResidualAddmmPass"]


def test_untraceable_module_falls_back_with_one_warning(
    tiny_checkpoint, tiny_reference_tokens, engine_output
):
    path, _ = tiny_checkpoint
    ModelRegistry.register_model("TinyNaNChecked", build_nan_checked)
    tokens, state = run_llm(
        path, "TinyNaNChecked", inspect=compile_state, compiled=True
    )
    assert tokens == tiny_reference_tokens
    assert state == [{"compiled": False, "do_not_compile": True}]
    out = engine_output()
    assert out.count(FALLBACK) == 1
    assert "Set the factory's supports_torch_compile = False" in out
    assert "the attempt took" in out


def test_declared_compile_that_cannot_trace_is_an_error(tiny_checkpoint, engine_output):
    path, _ = tiny_checkpoint
    ModelRegistry.register_model("TinyNaNCheckedDeclared", build_nan_checked_declared)
    with pytest.raises(Exception) as failure:  # the engine fails to start
        make_llm(path, "TinyNaNCheckedDeclared", compiled=True)
    out = engine_output(failure)
    assert (
        "Model 'TinyNaNCheckedDeclared' declares supports_torch_compile"
        " = True, but torch.compile cannot trace it"
    ) in out
    assert FALLBACK not in out
