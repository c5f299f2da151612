# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""vLLM's linear method for the `torch.nn.Linear` layers of a generic model.

vLLM's own linear layers compute through a linear method
(`UnquantizedLinearMethod`) that post-processes weights once loaded and
picks the platform's GEMM: on the CPU, oneDNN on prepacked weights (about
twice as fast as `torch.nn.functional.linear` at decode batch sizes); on
ROCm, skinny-GEMM kernels. `use_vllm_linear_method(model)` gives a generic
model's plain `torch.nn.Linear` layers the same method, so they run the
kernels vLLM's own layers run. Where that GEMM is `F.linear` itself (CUDA)
the layers are left alone.

Each layer keeps its class, parameters and names: `VllmLinearForward` is
put into the layer's class just above `torch.nn.Linear` (as FSDP2's
`fully_shard` re-classes modules), so a subclass's own `forward` (e.g. one
that all-reduces after `super().forward(x)`) still runs and only what
`torch.nn.Linear.forward` computes moves to vLLM's GEMM.

Unlike vLLM's own layers, the weight parameter is kept after prepacking,
so checkpoints and trainer weights can be loaded again; on the CPU this
costs the linear weights' memory once more. Weights must then change
through the model's `load_weights` (vLLM's weight-update path), which calls
`refresh_vllm_linear_method` for the layers it loaded: an in-place edit of
a parameter does not reach the prepacked copy.
"""

import functools
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from vllm.model_executor.layers.linear import UnquantizedLinearMethod
from vllm.platforms import current_platform


class PlainLinearMethod(UnquantizedLinearMethod):
    """`UnquantizedLinearMethod` for a layer that keeps its weight."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if current_platform.is_cpu():
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            with torch.no_grad():  # user layers' weights require grad
                dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
        else:
            super().process_weights_after_loading(layer)
        layer.vllm_weights_processed = True


class VllmLinearForward(nn.Linear):
    """What `torch.nn.Linear.forward` computes, through the layer's vLLM
    linear method."""

    quant_method: PlainLinearMethod

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, input, self.bias)


@functools.cache
def _with_vllm_forward(cls: type[nn.Linear]) -> type[nn.Linear]:
    bases = (VllmLinearForward,) if cls is nn.Linear else (cls, VllmLinearForward)
    # MRO: cls, its bases up to nn.Linear, VllmLinearForward, nn.Linear
    return type(
        cls.__name__,
        bases,
        {"__module__": cls.__module__, "__qualname__": cls.__qualname__},
    )


def _adoptable(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Linear)
        and not isinstance(module, VllmLinearForward)
        # an expert of a block on vLLM's fused MoE layer (generic_moe.py)
        and not getattr(module, "runs_in_fused_moe", False)
        # a parametrized weight is recomputed at every access
        and not parametrize.is_parametrized(module)
        and isinstance(module.weight, nn.Parameter)
        and module.weight.dim() == 2
    )


def use_vllm_linear_method(model: nn.Module) -> int:
    """Run every plain `torch.nn.Linear` of `model` through vLLM's linear
    method; returns how many layers were changed. vLLM's model loader then
    processes their weights after loading, as for its own layers."""
    from vllm.model_executor.layers.utils import (
        default_unquantized_gemm,
        dispatch_unquantized_gemm,
    )

    if dispatch_unquantized_gemm() is default_unquantized_gemm:
        return 0  # the platform's GEMM is F.linear: nothing to gain
    count = 0
    for module in model.modules():
        if _adoptable(module):
            # (a class is hashable; mypy's functools.cache stub disagrees)
            module.__class__ = _with_vllm_forward(type(module))  # type: ignore[arg-type]
            module.quant_method = PlainLinearMethod()
            count += 1
    return count


def refresh_vllm_linear_method(
    model: nn.Module, loaded: Iterable[torch.Tensor]
) -> None:
    """Process again the weights of layers whose weight or bias is among
    the `loaded` tensors, for layers already processed once (weights
    loaded into a running engine). A fused projection's group layer (see
    `fused_projections.py`) is processed once for all its members."""
    loaded_ids = {id(tensor) for tensor in loaded}
    stale: dict[int, nn.Module] = {}
    for module in model.modules():
        tensors = (getattr(module, "weight", None), getattr(module, "bias", None))
        if not any(t is not None and id(t) in loaded_ids for t in tensors):
            continue
        group = getattr(module, "projection_group", None)
        layer = module if group is None else group.linear
        if isinstance(
            getattr(layer, "quant_method", None), PlainLinearMethod
        ) and getattr(layer, "vllm_weights_processed", False):
            stale[id(layer)] = layer
    for layer in stale.values():
        layer.quant_method.process_weights_after_loading(layer)
