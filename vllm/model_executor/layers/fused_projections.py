# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""One GEMM for the projections of a generic model that read one input.

vLLM's own models run q/k/v as one `QKVParallelLinear` and gate/up as one
`MergedColumnParallelLinear`; a training module keeps them apart
(`wq`, `wk`, `wv`; `w1`, `w3`), which costs a GEMM and a kernel launch
each. In the engine's copy of the module (never the trainer's), a group of
linear layers that read the same input runs as one GEMM over their
concatenated weights, each layer returning its slice of the output:

- **found** in the first forward pass (vLLM's profile run, eager): linear
  layers with the same parent whose calls took the same tensor object form
  a group. Only layers whose forward is `torch.nn.Linear`'s (or a vLLM
  `ColumnParallelLinear` that keeps its output sharded) are considered;
- **declared** by a module class for children the search cannot take (a
  subclass with its own forward that, for these layers, computes only the
  linear map):

      class Attention(nn.Module):
          _fused_projections = (("q_proj", "k_proj", "v_proj"),)

  A class that declares `_fused_projections` (even empty) is not searched.

Each layer keeps its class's name, its parameters and their names: its
weight (and bias) becomes a view of the group's concatenated one, so
checkpoint loads, strict-name errors and weight updates address the
original names (`layers.3.attention.wk.weight`), and a TP-sharded layer
loads its own shard into its rows. Results change only by GEMM rounding:
a layer called with another input than its group's current one computes
the whole group's GEMM for it, so a wrong grouping costs time, not
correctness. Fusion is off in batch-invariant mode (the trainer's
recompute runs the separate GEMMs) and when the factory sets
`fuse_projections = False`.
"""

import functools
import weakref
from collections import defaultdict

import torch
from torch import nn
from torch.nn.utils import parametrize


class ProjectionFusionError(ValueError):
    """A declared projection group that cannot be fused."""


class ProjectionGroup(nn.Module):
    """The fused GEMM of one group, and the output of its current input
    until every member has taken its slice."""

    def __init__(self, members: list[nn.Linear]):
        super().__init__()
        first = members[0]
        self.out_sizes = [member.weight.shape[0] for member in members]
        self.linear = nn.Linear(
            first.weight.shape[1],
            sum(self.out_sizes),
            bias=first.bias is not None,
            device="meta",
        )
        # a normal tensor even in the engine's inference mode: weight
        # updates copy into it later
        with torch.no_grad(), torch.inference_mode(False):
            self.linear.weight = nn.Parameter(
                torch.cat([m.weight for m in members]), requires_grad=False
            )
            for member, rows in zip(members, self.linear.weight.split(self.out_sizes)):
                member.weight.data = rows
            if first.bias is not None:
                self.linear.bias = nn.Parameter(
                    torch.cat([m.bias for m in members]), requires_grad=False
                )
                for member, rows in zip(
                    members, self.linear.bias.split(self.out_sizes)
                ):
                    member.bias.data = rows
        self.current_input: torch.Tensor | None = None
        self.outputs: tuple[torch.Tensor, ...] = ()
        self.taken = 0

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if self.current_input is not x:
            self.current_input = x
            self.outputs = self.linear(x).split(self.out_sizes, dim=-1)
            self.taken = 0
        out = self.outputs[index]
        self.taken += 1
        if self.taken == len(self.out_sizes):  # free the activations
            self.current_input, self.outputs = None, ()
        return out


class FusedProjectionForward(nn.Module):
    """A group member's forward: its slice of the group's output. Put in
    front of the member's class (`_with_fused_forward`), so the member
    keeps its class, attributes and parameters."""

    projection_group: ProjectionGroup
    projection_index: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_group.output(self.projection_index, x)


@functools.cache
def _with_fused_forward(cls: type[nn.Module]) -> type[nn.Module]:
    return type(
        cls.__name__,
        (FusedProjectionForward, cls),
        {"__module__": cls.__module__, "__qualname__": cls.__qualname__},
    )


def _layer_problem(module: nn.Module) -> str | None:
    """Why `module` cannot be a group member, or None."""
    from vllm.model_executor.layers.linear import (
        ColumnParallelLinear,
        UnquantizedLinearMethod,
    )

    if isinstance(module, FusedProjectionForward):
        return "is already fused"
    if type(module) is ColumnParallelLinear:
        if (
            module.gather_output
            or module.return_bias
            or type(module.quant_method).apply is not UnquantizedLinearMethod.apply
        ):
            return "gathers its output, returns its bias or is quantized"
    elif not isinstance(module, nn.Linear):
        return f"is a {type(module).__name__}, not a torch.nn.Linear"
    weight = module.weight
    if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
        return "has no 2-D weight parameter"
    if parametrize.is_parametrized(module):
        return "has a parametrized weight"
    return None


def _linear_forward(module: nn.Module) -> bool:
    """Whether `module(x)` is known to be the linear map of its weight and
    bias alone (what the search may group)."""
    from vllm.model_executor.layers.plain_linear import VllmLinearForward

    return _layer_problem(module) is None and (
        not isinstance(module, nn.Linear)  # a vLLM ColumnParallelLinear
        or type(module).forward in (nn.Linear.forward, VllmLinearForward.forward)
    )


def _can_fuse(members: list[nn.Module]) -> str | None:
    first = members[0]
    for member in members:
        problem = _layer_problem(member)
        if problem:
            return problem
        if (
            type(member) is not type(first)
            or member.weight.shape[1] != first.weight.shape[1]
            or member.weight.dtype != first.weight.dtype
            or member.weight.device != first.weight.device
            or (member.bias is None) != (first.bias is None)
        ):
            return "differ in class, input features, dtype, device or having a bias"
    return None


def declared_groups(model: nn.Module) -> list[list[str]]:
    """The groups module classes declare, as lists of module names; a
    declaration naming what cannot be fused raises."""
    groups = []
    for parent_name, parent in model.named_modules():
        for names in getattr(type(parent), "_fused_projections", ()):
            members = [getattr(parent, name, None) for name in names]
            problem = (
                "not all are child modules"
                if not all(isinstance(m, nn.Module) for m in members)
                else _can_fuse(members)
            )
            if problem:
                raise ProjectionFusionError(
                    f"{type(parent).__name__}._fused_projections names "
                    f"{names}, which cannot be fused: {problem}. List only "
                    "linear layers of one input size, dtype and bias that "
                    "read the same input."
                )
            prefix = f"{parent_name}." if parent_name else ""
            groups.append([prefix + name for name in names])
    return groups


def searchable_layers(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """(parent name, layer name, layer) of each linear layer the search
    watches: those no class declaration covers."""
    layers = []
    for parent_name, parent in model.named_modules():
        if hasattr(type(parent), "_fused_projections"):
            continue
        for child_name, child in parent.named_children():
            if _linear_forward(child):
                name = f"{parent_name}.{child_name}" if parent_name else child_name
                layers.append((parent_name, name, child))
    return layers


class ProjectionSearch:
    """Forward pre-hooks on the searchable layers; while active, they record
    which of a parent's layers take the same input tensor (by identity,
    through weak references: the search keeps no activation alive)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.calls: dict[str, list] = defaultdict(list)  # parent: [(ref, [names])]
        self.handles = [
            layer.register_forward_pre_hook(
                functools.partial(self._record, parent_name, name)
            )
            for parent_name, name, layer in searchable_layers(model)
        ]

    def _record(self, parent_name: str, name: str, module, inputs) -> None:
        if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor):
            self.calls[parent_name].append((None, [name]))  # never grouped
            return
        for ref, names in self.calls[parent_name]:
            if ref is not None and ref() is inputs[0]:
                names.append(name)
                return
        self.calls[parent_name].append((weakref.ref(inputs[0]), [name]))

    def groups(self) -> list[list[str]]:
        """Groups of two or more layers that took the same input at every
        call; a layer seen in different groups is left out."""
        for handle in self.handles:
            handle.remove()
        group_of: dict[str, tuple[str, ...]] = {}
        conflicting = set()
        for calls in self.calls.values():
            for _, names in calls:
                group = tuple(dict.fromkeys(names))  # in call order, once
                for name in group:
                    if group_of.setdefault(name, group) != group:
                        conflicting.add(name)
        found = dict.fromkeys(
            group
            for group in group_of.values()
            if len(group) > 1 and not conflicting.intersection(group)
        )
        return [
            list(group)
            for group in found
            if _can_fuse([self.model.get_submodule(n) for n in group]) is None
        ]


def fuse_projections(model: nn.Module, groups: list[list[str]]) -> int:
    """Fuse each group of `model`'s linear layers (module names, in the
    order of the fused weight's rows). Returns the number of groups."""
    from vllm.model_executor.layers.plain_linear import use_vllm_linear_method

    for names in groups:
        members = [model.get_submodule(name) for name in names]
        group = ProjectionGroup(members)
        # the GEMM vLLM's linear layers run here (oneDNN on the CPU)
        if use_vllm_linear_method(group):
            group.linear.quant_method.process_weights_after_loading(group.linear)
        for index, member in enumerate(members):
            # (a class is hashable; mypy's functools.cache stub disagrees)
            member.__class__ = _with_fused_forward(type(member))  # type: ignore[arg-type]
            # plain attributes: the group is not a submodule, so names,
            # state dicts and vLLM's loaders see the member's own weights
            member.__dict__["projection_group"] = group
            member.projection_index = index
            # vLLM's CPU GEMM packed the member's weights: the group's
            # packed copy replaces it
            member.__dict__.pop("cpu_linear", None)
            member.vllm_weights_processed = False
    return len(groups)


def fused_projection_names(model: nn.Module) -> list[tuple[str, ...]]:
    """The fused groups of `model`, as tuples of module names."""
    groups: dict[ProjectionGroup, list[str]] = defaultdict(list)
    for name, module in model.named_modules():
        if isinstance(module, FusedProjectionForward):
            groups[module.projection_group].append(name)
    return [tuple(names) for names in groups.values()]
