# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Projections that read one input run as one GEMM in the engine's copy of
a module: found by a forward pass or declared, names and results kept.
This file: the TorchTitan Qwen3's groups; the search and declarations on
a small block, and their errors: tests/model_executor/test_fused_projections.py.
The engine tests that run fused modules (TP=1 and TP=2) are in
test_torchtitan_qwen3.py and test_weight_updates.py."""

import copy

import torch

from tests.conftest import training_forward
from tests.models.test_torchtitan_qwen3 import PROMPTS, random_model
from vllm.model_executor.layers.fused_projections import (
    ProjectionSearch,
    declared_groups,
    fuse_projections,
    fused_projection_names,
)
from vllm.model_executor.layers.plain_linear import refresh_vllm_linear_method
from vllm.model_executor.models.callable_model import load_weights_by_name

QWEN3_GROUPS = [
    group
    for layer in range(2)
    for group in (
        [f"layers.{layer}.attention.{name}" for name in ("wq", "wk", "wv")],
        [f"layers.{layer}.feed_forward.{name}" for name in ("w1", "w3")],
    )
]


def fused_copy(module, forward=lambda model: training_forward(model, PROMPTS)):
    """`module`'s engine copy: searched in one `forward`, then fused."""
    engine_copy = copy.deepcopy(module)
    search = ProjectionSearch(engine_copy)
    with torch.no_grad():
        forward(engine_copy)
    groups = search.groups()
    fuse_projections(engine_copy, declared_groups(engine_copy) + groups)
    return engine_copy, groups


def test_search_groups_what_reads_one_input_and_keeps_results():
    """q/k/v and gate/up are grouped, not the output projections whose
    input size happens to match; names, values and logits stay."""
    model = random_model()
    fused, groups = fused_copy(model)

    assert sorted(groups) == sorted(QWEN3_GROUPS)
    assert sorted(fused_projection_names(fused)) == sorted(map(tuple, QWEN3_GROUPS))
    assert fused.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(fused.state_dict()[name], tensor), name
    for got, want in zip(
        training_forward(fused, PROMPTS), training_forward(model, PROMPTS)
    ):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # one GEMM a group: the member weights are rows of the group's weight
    wq = fused.layers[0].attention.wq
    group_weight = wq.projection_group.linear.weight
    assert wq.weight.untyped_storage().data_ptr() == (
        group_weight.untyped_storage().data_ptr()
    )


def test_update_by_name_lands_in_the_group_rows():
    model = random_model()
    fused, _ = fused_copy(model)
    wk = torch.randn_like(model.layers[1].attention.wk.weight)
    update = {"layers.1.attention.wk.weight": wk}

    assert load_weights_by_name(fused, update.items(), require_all=False) == set(update)
    # as CallableModelWrapper.load_weights does: the group's GEMM may run on
    # a processed (on the CPU, prepacked) copy of its weight
    refresh_vllm_linear_method(fused, [fused.layers[1].attention.wk.weight])
    load_weights_by_name(model, update.items(), require_all=False)

    attention = fused.layers[1].attention
    q_rows, k_rows = attention.wq.weight.shape[0], wk.shape[0]
    rows = attention.wk.projection_group.linear.weight[q_rows : q_rows + k_rows]
    assert torch.equal(rows, wk)
    for got, want in zip(
        training_forward(fused, PROMPTS), training_forward(model, PROMPTS)
    ):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_dynamo_traces_a_fused_module_as_one_graph():
    """vLLM compiles the fused module with fullgraph=True: the group's
    state between member calls must not break the graph (the feed-forward
    block of the Qwen3: silu(w1(x)) * w3(x), then w2)."""
    model = random_model().layers[0].feed_forward
    fused, groups = fused_copy(model, lambda block: block(torch.randn(5, 128)))
    assert groups == [["w1", "w3"]]
    compiled = torch.compile(fused, backend="eager", fullgraph=True)
    x = torch.randn(7, 128)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=0)
    assert fused.w1.projection_group.current_input is None  # nothing held
