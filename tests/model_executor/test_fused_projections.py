# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Linear layers that read one input, fused into one GEMM in a module's
engine copy: which layers the search groups, that names, values and
results stay, that updates by name land in the group's rows, and what a
declaration that cannot be fused gets. (The engine runs of fused models
are in tests/models/.)"""

import copy

import pytest
import torch
from torch import nn

from vllm.model_executor.layers.fused_projections import (
    ProjectionFusionError,
    ProjectionSearch,
    declared_groups,
    fuse_projections,
    fused_projection_names,
)
from vllm.model_executor.layers.plain_linear import refresh_vllm_linear_method

DIM, HEADS = 64, 4


class Block(nn.Module):
    """A pre-norm decoder block as training code writes it: separate q/k/v
    and gate/up projections."""

    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(DIM)
        self.q, self.k, self.v = (nn.Linear(DIM, DIM, bias=False) for _ in range(3))
        self.o = nn.Linear(DIM, DIM, bias=False)  # same input size, other input
        self.gate = nn.Linear(DIM, 2 * DIM, bias=False)
        self.up = nn.Linear(DIM, 2 * DIM, bias=False)
        self.down = nn.Linear(2 * DIM, DIM, bias=False)

    def forward(self, x):
        h = self.norm(x)
        q, k, v = (
            p(h).unflatten(-1, (HEADS, -1)).transpose(0, 1)
            for p in (self.q, self.k, self.v)
        )
        attention = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(attention.transpose(0, 1).flatten(1))
        h = self.norm(x)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


def model_and_fused_copy():
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block())
    engine_copy = copy.deepcopy(model)
    search = ProjectionSearch(engine_copy)
    with torch.no_grad():
        engine_copy(torch.randn(5, DIM))
    groups = search.groups()
    fuse_projections(engine_copy, declared_groups(engine_copy) + groups)
    return model, engine_copy, groups


def test_search_groups_what_reads_one_input_and_keeps_names_and_results():
    model, fused, groups = model_and_fused_copy()
    expected = [[f"{i}.q", f"{i}.k", f"{i}.v"] for i in range(2)] + [
        [f"{i}.gate", f"{i}.up"] for i in range(2)
    ]
    assert sorted(groups) == sorted(expected)
    assert sorted(fused_projection_names(fused)) == sorted(map(tuple, expected))
    assert fused.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(fused.state_dict()[name], tensor), name
    x = torch.randn(9, DIM)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=0)
    # one GEMM a group: a member's weight is rows of the group's weight
    group_weight = fused[0].k.projection_group.linear.weight
    assert fused[0].k.weight.data_ptr() == group_weight[DIM].data_ptr()


def test_update_by_name_lands_in_the_group_rows():
    model, fused, _ = model_and_fused_copy()
    up = torch.randn(2 * DIM, DIM)
    with torch.no_grad():
        for module in (model, fused):
            module.get_parameter("1.up.weight").copy_(up)
    # the group's GEMM may run on a processed (on the CPU, prepacked) copy
    refresh_vllm_linear_method(fused, [fused.get_parameter("1.up.weight")])

    group_weight = fused[1].up.projection_group.linear.weight
    assert torch.equal(group_weight[2 * DIM :], up)
    x = torch.randn(9, DIM)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=0)


def test_dynamo_traces_a_fused_module_as_one_graph():
    """vLLM compiles with fullgraph=True: the group's state between member
    calls must not break the graph, and nothing stays held after it."""
    model, fused, _ = model_and_fused_copy()
    compiled = torch.compile(fused, backend="eager", fullgraph=True)
    x = torch.randn(7, DIM)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=0)
    assert fused[0].gate.projection_group.current_input is None


class TwoInputs(nn.Module):
    """Declares a group whose members read different inputs."""

    _fused_projections = (("a", "b"),)

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 4)
        self.b = nn.Linear(8, 6)

    def forward(self, x, y):
        return self.a(x).sum(-1) + self.b(y).sum(-1)


def test_a_wrong_declaration_costs_time_not_results():
    torch.manual_seed(0)
    model = TwoInputs()
    fused = copy.deepcopy(model)
    fuse_projections(fused, declared_groups(fused))
    x, y = torch.randn(3, 8), torch.randn(3, 8)

    torch.testing.assert_close(fused(x, y), model(x, y), atol=1e-6, rtol=0)
    assert fused_projection_names(fused) == [("a", "b")]


@pytest.mark.parametrize(
    "names, problem",
    [
        (("a", "missing"), "not all are child modules"),
        (("a", "norm"), "is a LayerNorm, not a torch.nn.Linear"),
        (("a", "wide"), "differ in class, input features"),
    ],
)
def test_a_declaration_that_cannot_be_fused_is_refused(names, problem):
    class Declared(nn.Module):
        _fused_projections = (names,)

        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 4)
            self.norm = nn.LayerNorm(8)
            self.wide = nn.Linear(16, 4)

    with pytest.raises(ProjectionFusionError, match=problem) as error:
        declared_groups(nn.Sequential(Declared()))
    assert f"Declared._fused_projections names {names}" in str(error.value)
