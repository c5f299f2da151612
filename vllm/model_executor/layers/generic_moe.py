# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""A generic model's mixture-of-experts blocks on vLLM's fused MoE layer.

A training module runs its experts as it likes (often a Python loop over
experts, which is slow to serve). A block that declares what it computes
runs, in the engine's copy of the module (never the trainer's), on vLLM's
fused MoE layer (`FusedMoE`: Triton or FlashInfer kernels on CUDA, vLLM's
grouped GEMM on the CPU), sharded over vLLM's tensor-parallel group as
vLLM shards its own MoE models:

    class SparseMoeBlock(nn.Module):
        _fused_moe = {
            "router": "gate",        # linear layer: hidden -> num_experts
            "experts": "experts",    # see the expert forms below
            "top_k": "top_k",        # a value, or the name of an attribute
            "renormalize": True,     # top-k weights rescaled to sum to 1
        }

        def forward(self, x):  # what the trainer runs
            ...

The block's forward must compute: router logits from `x`; routing weights
by `"scoring"` (`"softmax"`, the default, or `"sigmoid"`) over all experts;
the `top_k` largest, renormalised if `"renormalize"`, times
`"routed_scaling_factor"` (default 1.0); the weighted sum of the chosen
experts' gated MLPs `down(silu(gate(x)) * up(x))`; plus, if declared,
`"shared_experts"` (a module applied to every token), optionally scaled
by `sigmoid("shared_expert_gate"(x))`. Every token reaches its top-k
experts: there is no capacity limit or token dropping. Ties in the router
scores are broken as vLLM's top-k kernel breaks them, which may differ
from `torch.topk`.

Expert forms (`"projections"` names the gate, up and down projections,
default `("gate_proj", "up_proj", "down_proj")`):

- an `nn.ModuleList` of experts, each with those three `nn.Linear`
  children (HF Mixtral / Qwen3-MoE style: `experts.3.gate_proj.weight`);
- one module holding them stacked as parameters `[num_experts, inter,
  hidden]`, `[num_experts, inter, hidden]` and `[num_experts, hidden,
  inter]` (TorchTitan's `GroupedExperts`: `("w1", "w3", "w2")`);
- two names, gate and up packed in one stacked parameter `[num_experts,
  2 * inter, hidden]` (gate rows first) and down `[num_experts, hidden,
  inter]`: transformers 5's experts, `("gate_up_proj", "down_proj")`.

The router is a linear layer from hidden size to the experts, or a module
holding such a `weight` whose forward returns more than logits (transformers
5's `TopKRouter`): the logits are then `x @ weight.T`. A value such as
`"top_k"` may name an attribute of a submodule (`"gate.top_k"`).

Names stay: each expert parameter becomes a view of this rank's slice of
the fused layer's weights, so checkpoints, strict-name errors and weight
updates address the trainer's names (`layers.0.moe.experts.3.up_proj.
weight`), full tensors are cut to this rank's shard, and an update of one
expert changes that expert only. Where vLLM repacks the weights after
loading (the CPU), an update repacks the block's experts.
"""

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

DECLARATION = "_fused_moe"
_KEYS = {
    "router",
    "experts",
    "top_k",
    "renormalize",
    "projections",
    "scoring",
    "routed_scaling_factor",
    "shared_experts",
    "shared_expert_gate",
}


class FusedMoEError(ValueError):
    """A `_fused_moe` declaration that does not fit its block."""


@dataclass
class MoEDeclaration:
    router: str
    experts: str
    top_k: int | str  # a value, or the name of the block's attribute
    renormalize: bool | str
    projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    scoring: str = "softmax"
    routed_scaling_factor: float = 1.0
    shared_experts: str | None = None
    shared_expert_gate: str | None = None


class ExpertWeights:
    """The trainer's expert tensors of one block: a `[num_experts, ...]`
    view per projection, whichever form the module holds them in."""

    def __init__(self, block_name: str, experts: nn.Module, names: tuple[str, ...]):
        self.stacked = not isinstance(experts, nn.ModuleList)
        # gate and up packed in one parameter, transformers 5's form
        self.packed = len(names) == 2
        # gate, up and down of each expert; one row holding all of them
        # when stacked
        self.params: list[list[nn.Parameter]] = []
        if self.stacked:
            found = [getattr(experts, name, None) for name in names]
            params = [p for p in found if isinstance(p, nn.Parameter) and p.dim() == 3]
            if len(params) != len(names):
                raise FusedMoEError(
                    f"{block_name}: the experts module "
                    f"({type(experts).__name__}) is not an nn.ModuleList, so "
                    f"its parameters {names} must be stacked 3-D "
                    "[num_experts, ...] tensors. Name the gate, up and down "
                    'projections in "projections".'
                )
            if self.packed and params[0].shape[1] % 2:
                raise FusedMoEError(
                    f"{block_name}: packed {names[0]} of shape "
                    f"{tuple(params[0].shape)} must hold gate and up rows "
                    "alike ([num_experts, 2 * inter, hidden])."
                )
            self.params.append(params)
            return
        if self.packed:
            raise FusedMoEError(
                f"{block_name}: packed projections {names} are read from "
                "stacked [num_experts, ...] parameters, and the experts are "
                "an nn.ModuleList: name their gate, up and down projections."
            )
        for index, expert in enumerate(experts):
            found = [getattr(expert, name, None) for name in names]
            layers = [layer for layer in found if isinstance(layer, nn.Linear)]
            if len(layers) != len(names):
                raise FusedMoEError(
                    f"{block_name}: expert {index} lacks nn.Linear "
                    f"children {names}. Name its gate, up and down "
                    'projections in "projections".'
                )
            if any(layer.bias is not None for layer in layers):
                raise FusedMoEError(
                    f"{block_name}: expert {index} has biases; fused "
                    "experts take bias-free projections."
                )
            self.params.append([layer.weight for layer in layers])

    def stacked_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of gate, up and down as `[num_experts, out, in]`."""
        if self.packed:
            gate_up, down = self.params[0]
            experts, rows, hidden = gate_up.shape
            half = (experts, rows // 2, hidden)
            return [half, half, tuple(down.shape)]
        if self.stacked:
            return [tuple(p.shape) for p in self.params[0]]
        return [(len(self.params), *p.shape) for p in self.params[0]]

    def modules(self, experts: nn.Module) -> list[nn.Module]:
        return [] if self.stacked else list(experts.modules())


def declaration_of(block: nn.Module, block_name: str) -> MoEDeclaration | None:
    declared = getattr(type(block), DECLARATION, None)
    if declared is None:
        return None
    if not isinstance(declared, dict) or not {"router", "experts"} <= declared.keys():
        raise FusedMoEError(
            f"{type(block).__name__}.{DECLARATION} must be a dict with at "
            f'least "router", "experts", "top_k" and "renormalize"; got '
            f"{declared!r}."
        )
    unknown = sorted(set(declared) - _KEYS)
    missing = sorted({"top_k", "renormalize"} - declared.keys())
    if unknown or missing:
        raise FusedMoEError(
            f"{type(block).__name__}.{DECLARATION}: unknown keys {unknown}, "
            f"missing keys {missing}; the keys are {sorted(_KEYS)}."
        )
    spec = MoEDeclaration(**declared)
    spec.projections = tuple(spec.projections)  # type: ignore[assignment]
    if spec.scoring not in ("softmax", "sigmoid"):
        raise FusedMoEError(
            f"{block_name}: scoring {spec.scoring!r}; vLLM's fused MoE "
            'routes by "softmax" or "sigmoid".'
        )
    if len(spec.projections) not in (2, 3):
        raise FusedMoEError(
            f"{block_name}: projections {spec.projections} must name the "
            "gate, up and down projections, or the packed gate_up and down."
        )
    return spec


class FusedExperts:
    """One block's experts on vLLM's fused MoE layer (a `MoERunner`); not a
    submodule of the block, so the module's parameter names stay its own."""

    def __init__(
        self,
        block: nn.Module,
        block_name: str,
        spec: MoEDeclaration,
        layer_name: str,
        tp_rank: int,
        tp_size: int,
    ):
        try:
            fused_moe_cls = _fused_moe_factory()
        except ImportError as e:  # pragma: no cover - a vLLM without it
            raise FusedMoEError(f"vLLM's fused MoE layer is unavailable: {e}") from e
        router = _submodule(block, block_name, spec.router, "router")
        experts = _submodule(block, block_name, spec.experts, "experts")
        weights = ExpertWeights(block_name, experts, spec.projections)
        (num_experts, inter, hidden), up, down = weights.stacked_shapes()
        if up != (num_experts, inter, hidden) or down != (num_experts, hidden, inter):
            raise FusedMoEError(
                f"{block_name}: gate, up and down projections of shapes "
                f"{(num_experts, inter, hidden)}, {up} and {down} are not a "
                "gated MLP ([E, inter, hidden], [E, inter, hidden], [E, "
                "hidden, inter])."
            )
        router_weight = getattr(router, "weight", None)
        if router_weight is None or tuple(router_weight.shape) != (num_experts, hidden):
            raise FusedMoEError(
                f"{block_name}: the router {spec.router} must be a linear "
                f"layer from hidden size {hidden} to the {num_experts} "
                "experts (weight [num_experts, hidden])."
            )
        top_k = _value(block, spec.top_k)
        renormalize = _value(block, spec.renormalize)
        if not isinstance(top_k, int) or not 0 < top_k <= num_experts:
            raise FusedMoEError(
                f"{block_name}: top_k {spec.top_k!r} must be an int in "
                f"[1, {num_experts}] or the name of one the block holds."
            )
        if inter % tp_size:
            raise FusedMoEError(
                f"{block_name}: the experts' intermediate size {inter} does "
                f"not split over tensor_parallel_size {tp_size}."
            )
        dtype = weights.params[0][0].dtype
        self.runner = fused_moe_cls(
            num_experts=num_experts,
            top_k=top_k,
            hidden_size=hidden,
            intermediate_size=inter,
            params_dtype=dtype,
            renormalize=bool(renormalize),
            scoring_func=spec.scoring,
            routed_scaling_factor=spec.routed_scaling_factor,
            prefix=layer_name,
        )
        self.router = router
        self.shared_experts = (
            _submodule(block, block_name, spec.shared_experts, "shared_experts")
            if spec.shared_experts
            else None
        )
        self.shared_expert_gate = (
            _submodule(block, block_name, spec.shared_expert_gate, "shared_expert_gate")
            if spec.shared_expert_gate
            else None
        )
        self._bind_expert_weights(
            block_name, weights, hidden, inter // tp_size, tp_rank, tp_size
        )
        for module in weights.modules(experts):
            module.runs_in_fused_moe = True  # not served on their own
        self.processed = False

    def _bind_expert_weights(
        self,
        block_name: str,
        weights: ExpertWeights,
        hidden: int,
        shard: int,
        tp_rank: int,
        tp_size: int,
    ) -> None:
        """Make each trainer expert parameter a view of this rank's slice of
        the layer's unprocessed `w13` ([gate; up]) and `w2` (down), filled
        from the module's current values."""
        experts = self.runner.routed_experts
        w13, w2 = experts.w13_weight.data, experts.w2_weight.data
        padded = w13.shape[1] // 2  # a backend may round the shard size up
        w13.zero_()
        w2.zero_()
        with torch.no_grad():
            if weights.packed:
                gate_up, down = weights.params[0]
                if padded != shard:
                    raise FusedMoEError(
                        f"{block_name}: vLLM's MoE backend pads the experts' "
                        f"intermediate shard from {shard} to {padded}, so the "
                        "packed gate_up parameter cannot be one view of its "
                        "weights; hold gate and up as separate parameters."
                    )
                view = w13[:, : 2 * shard, :hidden]
                view.copy_(_packed_shard(gate_up.data, tp_rank, tp_size))
                gate_up.data = view
                # loaders give this rank's gate rows and up rows of a full
                # tensor (one contiguous cut would take gate rows only)
                gate_up.weight_loader = functools.partial(
                    _load_packed_shard, tp_rank=tp_rank, tp_size=tp_size
                )
                self._bind_view(down, w2[:, :hidden, :shard], 2, tp_rank, shard)
            else:
                for index, (gate, up, down) in enumerate(weights.params):
                    # a stacked parameter holds every expert in its first dim
                    e = slice(None) if weights.stacked else index
                    out_dim = 1 if weights.stacked else 0
                    for param, view, dim in (
                        (gate, w13[e, :shard, :hidden], out_dim),
                        (up, w13[e, padded : padded + shard, :hidden], out_dim),
                        (down, w2[e, :hidden, :shard], out_dim + 1),
                    ):
                        self._bind_view(param, view, dim, tp_rank, shard)
        self.raw_weights = (w13, w2)
        self.member_ids = {id(param) for params in weights.params for param in params}

    @staticmethod
    def _bind_view(
        param: nn.Parameter, view: torch.Tensor, dim: int, tp_rank: int, shard: int
    ) -> None:
        view.copy_(param.data.narrow(dim, tp_rank * shard, shard))
        param.data = view
        # loaders cut this rank's slice out of full tensors
        param.tensor_model_parallel = True
        param.partition_dim = dim

    def process(self) -> None:
        """vLLM's post-load processing of the expert weights (e.g. the CPU's
        prepacking). Where it keeps the weights where they are (CUDA's
        Triton kernels), later updates land in place; where it repacks
        them, `refresh` repacks them again from the raw weights."""
        experts = self.runner.routed_experts
        method = experts.quant_method
        if self.processed:
            w13, w2 = self.raw_weights
            experts.w13_weight = nn.Parameter(w13.clone(), requires_grad=False)
            experts.w2_weight = nn.Parameter(w2.clone(), requires_grad=False)
            method.moe_kernel = None  # rebuilt as after the first load
        with torch.no_grad():
            method.process_weights_after_loading(experts)
        self.processed = True
        self.in_place = (
            experts.w13_weight.data_ptr() == self.raw_weights[0].data_ptr()
            and experts.w2_weight.data_ptr() == self.raw_weights[1].data_ptr()
        )

    def refresh(self) -> None:
        if self.processed and not self.in_place:
            self.process()

    def router_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        if isinstance(self.router, nn.Linear):
            return self.router(tokens)
        # a router module whose forward routes (transformers 5's TopKRouter)
        return nn.functional.linear(tokens, self.router.weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        logits = self.router_logits(tokens)
        out = self.runner(hidden_states=tokens, router_logits=logits)
        if self.shared_experts is not None:
            shared = self.shared_experts(tokens)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(tokens)) * shared
            out = out + shared
        return out.reshape(x.shape)


class FusedMoEForward(nn.Module):
    """A declared block's forward in the engine: the fused layer's. Put in
    front of the block's class, so the block keeps its class name,
    attributes and parameters."""

    fused_experts: FusedExperts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused_experts(x)


@functools.cache
def _with_fused_forward(cls: type[nn.Module]) -> type[nn.Module]:
    return type(
        cls.__name__,
        (FusedMoEForward, cls),
        {"__module__": cls.__module__, "__qualname__": cls.__qualname__},
    )


def use_fused_moe(
    model: nn.Module, prefix: str, tp_rank: int, tp_size: int, expert_parallel: bool
) -> int:
    """Run each block of `model` that declares `_fused_moe` on vLLM's fused
    MoE layer; returns the number of blocks."""
    blocks = [
        (name, module, spec)
        for name, module in model.named_modules()
        if (spec := declaration_of(module, name)) is not None
    ]
    if blocks and expert_parallel:
        raise FusedMoEError(
            f"{len(blocks)} declared MoE block(s): expert parallelism is not "
            "supported for generic models yet; run without "
            "enable_expert_parallel (the experts are then sharded by tensor "
            "parallelism)."
        )
    for name, block, spec in blocks:
        fused = FusedExperts(
            block, name, spec, f"{prefix}.{name}.experts", tp_rank, tp_size
        )
        # (a class is hashable; mypy's functools.cache stub disagrees)
        block.__class__ = _with_fused_forward(type(block))  # type: ignore[arg-type]
        block.__dict__["fused_experts"] = fused  # not a submodule: see above
    return len(blocks)


def fused_moe_blocks(model: nn.Module) -> list[FusedExperts]:
    return [
        module.fused_experts
        for module in model.modules()
        if isinstance(module, FusedMoEForward)
    ]


def process_fused_moe(model: nn.Module) -> None:
    """Process every fused block's weights once loaded (the first forward)."""
    for fused in fused_moe_blocks(model):
        if not fused.processed:
            fused.process()


def refresh_fused_moe(model: nn.Module, loaded: Iterable[torch.Tensor]) -> None:
    """After a weight update: repack the blocks whose experts it changed,
    where vLLM's processing copied them."""
    loaded_ids = {id(tensor) for tensor in loaded}
    for fused in fused_moe_blocks(model):
        if fused.member_ids & loaded_ids:
            fused.refresh()


def _submodule(block: nn.Module, block_name: str, name: str, role: str) -> nn.Module:
    try:
        return block.get_submodule(name)
    except AttributeError:
        raise FusedMoEError(
            f"{block_name} ({type(block).__name__}) has no submodule {name!r}, "
            f'which its {DECLARATION} names as "{role}".'
        ) from None


def _value(block: nn.Module, value):
    """A declared value, or the block's attribute it names (dotted: an
    attribute of a submodule)."""
    if not isinstance(value, str):
        return value
    found = block
    for name in value.split("."):
        found = getattr(found, name, None)
    return found


def _packed_shard(full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's gate rows then up rows of a packed `[E, 2 * inter, H]`."""
    if full.dim() != 3 or full.shape[1] % (2 * tp_size):
        raise ValueError(
            f"packed gate_up of shape {tuple(full.shape)}: dimension 1 must "
            f"hold gate and up rows that split over tensor_parallel_size "
            f"{tp_size}"
        )
    gate, up = full.chunk(2, dim=1)
    return torch.cat(
        (gate.chunk(tp_size, 1)[tp_rank], up.chunk(tp_size, 1)[tp_rank]), dim=1
    )


def _load_packed_shard(
    param: torch.Tensor, full: torch.Tensor, tp_rank: int, tp_size: int
) -> None:
    shard = _packed_shard(full, tp_rank, tp_size)
    if shard.shape != param.shape:
        raise ValueError(
            f"packed gate_up of shape {tuple(full.shape)} gives this rank "
            f"{tuple(shard.shape)}, the parameter holds {tuple(param.shape)}"
        )
    param.copy_(shard)


def _fused_moe_factory():
    from vllm.model_executor.layers import fused_moe

    # vLLM 0.26 exports the factory as FusedMoE, later releases as
    # FusedMoEFactory
    return getattr(fused_moe, "FusedMoEFactory", None) or fused_moe.FusedMoE
