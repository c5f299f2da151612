# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Weight pushes from a trainer into running engines through one shared
memory buffer, by a plan made once.

`LLM.apply_model` with a state dict pickles every tensor to the engine
core and again to each worker: on the CPU that moves 0.2 GB/s against a
host memory copy's several GB/s. A trainer and a generator that run the
same model definition know every name, shape and dtype in advance, so:

- the trainer lays its parameters out once in a file-backed buffer in
  shared memory (`/dev/shm`) and, at each push, copies their current
  values in (`pack`);
- each worker maps the same file, checks the layout against its model
  once (names, shapes, dtypes; nothing is copied if anything is wrong) and
  keeps the result: which of its parameters each slice of the buffer
  feeds;
- a push then sends only the buffer's name: each worker copies the slices
  into its parameters. Parameters a worker holds a shard of (vLLM's
  parallel layers, Megatron-core tensor-parallel layers) go through the
  model's `load_weights`, reading the slices in place.

A module with its own `load_weights` (a name mapper, fused tensors to
split) decides where each tensor goes, and a parameter's `weight_loader`
what it keeps, so the first push takes them; a whole tensor that they
stored unchanged in the parameter of the same name (a loader that only
renames, a `weight_loader` at TP=1) is copied directly from then on.

    push = SharedWeights(policy)      # once
    push(llm)                         # after every optimiser step
    push(llm, names=["output.weight"])  # a part of the model
    push.close()

With `device="cuda"` the buffer is GPU memory of the trainer's, which
each worker opens once by CUDA IPC: a push is then a device-to-device copy
on each side, no host memory in between (a trainer and engine on the same
machine's GPUs). Otherwise workers on the trainer's machine, any device (a
worker on a GPU copies host to device).
"""

import math
import os
import tempfile
import uuid
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

# Start every tensor at a cache line, so that no two share one.
_ALIGN = 64


@dataclass(frozen=True)
class _Slot:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # bytes into the buffer

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class SharedWeights:
    """A trainer module's parameters (or any named tensors), laid out in
    one shared-memory buffer that running engines read from.

    `dtype` is the engine's dtype (the buffer holds the values cast once,
    on the trainer's side); by default each tensor keeps its own. `device`
    ("cuda", "cuda:N") puts the buffer in that GPU's memory instead of a
    shared-memory file in `directory`."""

    def __init__(
        self,
        tensors: nn.Module | Mapping[str, torch.Tensor],
        dtype: torch.dtype | None = None,
        directory: str = "/dev/shm",
        device: str | torch.device | None = None,
    ) -> None:
        named = _named_tensors(tensors)
        slots, offset = [], 0
        for name, tensor in named.items():
            offset = -(-offset // _ALIGN) * _ALIGN
            slot = _Slot(name, tuple(tensor.shape), dtype or tensor.dtype, offset)
            slots.append(slot)
            offset += slot.nbytes
        self.slots = tuple(slots)
        self.nbytes = max(offset, 1)
        self.path: str | None = None
        # what a worker opens the buffer by: the file's path, or the
        # (rebuild function, arguments) of a CUDA IPC handle
        self.source: str | tuple
        if device is not None and torch.device(device).type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(
                    f"SharedWeights(device={str(device)!r}): CUDA is not "
                    "available here; leave device unset for a shared-memory "
                    "buffer"
                )
            self.buffer = torch.empty(self.nbytes, dtype=torch.uint8, device=device)
            from torch.multiprocessing.reductions import reduce_tensor

            self.source = reduce_tensor(self.buffer)
        else:
            descriptor, self.path = tempfile.mkstemp(
                prefix="vllm-weights-",
                dir=directory if os.path.isdir(directory) else None,
            )
            os.close(descriptor)
            self.buffer = torch.from_file(
                self.path, shared=True, size=self.nbytes, dtype=torch.uint8
            )
            self.source = self.path
        self.views = _views(self.buffer, self.slots)
        # a new layout or a new file gets a new plan in the workers
        self.key = uuid.uuid4().hex

    def pack(self, tensors: nn.Module | Mapping[str, torch.Tensor]) -> None:
        """Copy the current values in (casting to the buffer's dtypes).
        Every tensor of the layout must be there, with its shape; tensors
        that are the buffer's own views (`alias`) are already in place."""
        named = _named_tensors(tensors)
        missing = [slot.name for slot in self.slots if slot.name not in named]
        if missing:
            raise ValueError(
                f"pack: {len(missing)} tensor(s) of the layout are missing: "
                f"{', '.join(missing[:10])}"
            )
        slots = [
            slot
            for slot in self.slots
            if named[slot.name].data_ptr() != self.views[slot.name].data_ptr()
        ]
        if slots:  # (foreach takes one tensor at least)
            with torch.no_grad():
                torch._foreach_copy_(
                    [self.views[slot.name] for slot in slots],
                    [named[slot.name] for slot in slots],
                )
        if self.buffer.is_cuda:
            # the workers read it from their own streams
            torch.cuda.current_stream(self.buffer.device).synchronize()

    def alias(self, module: nn.Module) -> dict[str, str]:
        """Make `module`'s parameters views of the buffer, values kept: the
        trainer's in-place updates (an optimiser step) then write the
        buffer, and a push has nothing to pack. Returns the parameters left
        as they were, with why (not in the layout, or another dtype, shape
        or device than their slot: fp32 masters for a bf16 buffer), which
        `pack` keeps copying. The buffer must outlive the module's use."""
        left = {}
        with torch.no_grad():
            for name, param in module.named_parameters():
                view = self.views.get(name)
                if view is None:
                    left[name] = "not in the buffer's layout"
                elif (view.dtype, view.shape, view.device) != (
                    param.dtype,
                    param.shape,
                    param.device,
                ):
                    left[name] = (
                        f"the buffer holds {view.dtype} {tuple(view.shape)} on "
                        f"{view.device}, the parameter {param.dtype} "
                        f"{tuple(param.shape)} on {param.device}"
                    )
                else:
                    view.copy_(param)
                    param.data = view
        return left

    def __call__(
        self,
        llm,
        tensors: nn.Module | Mapping[str, torch.Tensor] | None = None,
        names: Iterable[str] | None = None,
    ) -> int:
        """Push into `llm` (a `vllm.LLM`): pack `tensors` first if given,
        have every worker copy the buffer (or only `names` of it) into its
        model, and reset the prefix cache (cached KV holds the old
        weights). Returns the number of tensors each worker loaded."""
        if tensors is not None:
            self.pack(tensors)
        copies = llm.apply_model(self.request(names))
        llm.reset_prefix_cache()
        return copies[0]

    async def push_async(
        self,
        engine,
        tensors: nn.Module | Mapping[str, torch.Tensor] | None = None,
        names: Iterable[str] | None = None,
    ) -> int:
        """`__call__` for a running `AsyncLLM`: awaitable while it generates.
        The engine core takes the copy between two of its steps; requests
        in flight go on, their later tokens computed by the new weights."""
        if tensors is not None:
            self.pack(tensors)
        copies = await engine.collective_rpc("apply_model", args=(self.request(names),))
        await engine.reset_prefix_cache()
        return copies[0]

    def request(self, names: Iterable[str] | None = None) -> "CopyFromSharedWeights":
        """What `apply_model` sends: the buffer's name and layout, no
        tensors."""
        return CopyFromSharedWeights(
            self.source,
            self.nbytes,
            self.slots,
            self.key,
            None if names is None else tuple(names),
        )

    def close(self) -> None:
        """Remove the file (workers that mapped it keep their mapping until
        their plan goes). A GPU buffer is freed with this object, once no
        worker holds it open."""
        if self.path and os.path.exists(self.path):
            os.unlink(self.path)

    def __enter__(self) -> "SharedWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CopyFromSharedWeights:
    """Runs in each worker, through `apply_model`: copy the buffer's
    tensors into the model (a `CallableModelWrapper`). A plain class, not
    a dataclass: vLLM's msgpack encoder would send a dataclass to the
    engine core as a dict of its fields."""

    def __init__(
        self,
        source: str | tuple,
        nbytes: int,
        slots: tuple[_Slot, ...],
        key: str,
        names: tuple[str, ...] | None = None,
    ) -> None:
        self.source, self.nbytes, self.slots = source, nbytes, slots
        self.key, self.names = key, names

    def open(self) -> torch.Tensor:
        """The buffer, in this worker: mapped, or opened by CUDA IPC."""
        if isinstance(self.source, str):
            return torch.from_file(
                self.source, shared=True, size=self.nbytes, dtype=torch.uint8
            )
        rebuild, arguments = self.source
        return rebuild(*arguments)

    def __call__(self, model: nn.Module) -> int:
        plans = _PLANS.setdefault(model, {})
        plan = plans.get(self.key)
        if plan is None:
            plans.clear()  # one buffer per model: the previous one goes
            plan = plans[self.key] = _WorkerPlan(model, self)
        return plan.copy(self.names)


# Per model, the plan of the buffer it was last pushed from.
_PLANS: "weakref.WeakKeyDictionary[nn.Module, dict[str, _WorkerPlan]]" = (
    weakref.WeakKeyDictionary()
)


class _WorkerPlan:
    """Which parameter each slice of the buffer feeds, checked once."""

    def __init__(self, model: nn.Module, request: CopyFromSharedWeights) -> None:
        # imported here: vLLM's model utilities import the model registry
        from vllm.model_executor.models.callable_model import (
            _check_tensor,
            _full_shape_problem,
        )
        from vllm.model_executor.models.utils import is_pp_missing_parameter

        buffer = request.open()
        self.on_gpu = buffer.is_cuda
        self.model = model
        self.views = _views(buffer, request.slots)
        module = getattr(model, "model", model)  # the factory's module
        aliases = getattr(model, "stage_aliases", {})
        params = dict(module.named_parameters(remove_duplicate=False))
        # A module with its own loader or name mapper decides where each
        # tensor goes, and a parameter's weight_loader what it keeps: such
        # tensors take the model's load_weights (see `_verify`).
        by_loader = hasattr(module, "load_weights") or hasattr(
            module, "hf_to_vllm_mapper"
        )
        self.direct: dict[str, torch.Tensor] = {}
        self.loaded: set[str] = set()  # through the model's load_weights
        # loaded now, copied directly once the loader is seen to store them
        # unchanged in the parameter of their name
        self.to_verify: dict[str, tuple[str, torch.Tensor]] = {}
        problems: list[str] = []
        for slot in request.slots:
            name = aliases.get(slot.name, slot.name)
            target = params.get(name)
            if by_loader:
                self.loaded.add(slot.name)
            elif target is None and is_pp_missing_parameter(name, module):
                continue  # another pipeline stage's: skipped at each push
            elif target is None:
                problems.append(f"{slot.name}: not a parameter of the model")
            elif not _plain(target):
                problem = _check_tensor(name, target, self.views[slot.name])
                if problem is None and getattr(target, "weight_loader", None):
                    problem = _full_shape_problem(
                        module, name, target, self.views[slot.name]
                    )
                if problem:
                    problems.append(problem)
                else:
                    self.loaded.add(slot.name)  # this rank cuts its shard
            else:
                problem = _check_tensor(name, target, self.views[slot.name])
                if problem is None and target.shape != slot.shape:
                    problem = (
                        f"{slot.name}: pushed {slot.shape}, model {tuple(target.shape)}"
                    )
                if problem:
                    problems.append(problem)
                else:
                    self.direct[slot.name] = target
            if (
                slot.name in self.loaded
                and target is not None
                and target.shape == slot.shape
                and target.dtype == slot.dtype
            ):
                # a whole tensor: the loader may only store it (a TP=1
                # weight_loader, a loader that only renames)
                self.to_verify[slot.name] = (name, target)
        if problems:
            raise ValueError(
                f"The pushed layout does not fit the model "
                f"({len(problems)} problem(s); nothing was copied): "
                + "; ".join(problems[:20])
            )

    def copy(self, names: tuple[str, ...] | None) -> int:
        if names is None:
            names = tuple(self.views)
        else:
            unknown = [name for name in names if name not in self.views]
            if unknown:
                raise ValueError(
                    f"Push of names not in the buffer's layout (nothing was "
                    f"copied): {', '.join(unknown[:20])}. Make a SharedWeights "
                    "that holds them."
                )
        loaded = [name for name in names if name in self.loaded]
        direct = [name for name in names if name in self.direct]
        if loaded:  # checked first: it raises before changing anything
            self.model.load_weights((name, self.views[name]) for name in loaded)
            self._verify(loaded)
        if direct:
            with torch.no_grad():
                torch._foreach_copy_(
                    [self.direct[name] for name in direct],
                    [self.views[name] for name in direct],
                )
            # the layers' processed (prepacked) copies follow
            from vllm.model_executor.layers.generic_moe import refresh_fused_moe
            from vllm.model_executor.layers.plain_linear import (
                refresh_vllm_linear_method,
            )

            module = getattr(self.model, "model", self.model)
            copied = [self.direct[name] for name in direct]
            refresh_vllm_linear_method(module, copied)
            refresh_fused_moe(module, copied)
        if self.on_gpu:
            # the trainer may refill the buffer once this returns
            torch.cuda.synchronize()
        return len(loaded) + len(direct)

    def _verify(self, loaded: list[str]) -> None:
        """Tensors the model's loader stored unchanged in the parameter of
        their name are copied directly from the next push on."""
        module = getattr(self.model, "model", self.model)
        for name in loaded:
            if name not in self.to_verify:
                continue
            param_name, target = self.to_verify.pop(name)
            # still the module's parameter (the loader did not replace it),
            # holding exactly what was pushed
            if module.get_parameter(param_name) is target and torch.equal(
                target, self.views[name].to(target.device)
            ):
                self.loaded.discard(name)
                self.direct[name] = target


def _plain(param: torch.Tensor) -> bool:
    """Not a shard that a weight loader cuts from the full tensor."""
    return not (
        getattr(param, "weight_loader", None)
        or getattr(param, "tensor_model_parallel", False)
    )


def _named_tensors(
    tensors: nn.Module | Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    if isinstance(tensors, nn.Module):
        return {name: p.detach() for name, p in tensors.named_parameters()}
    return {name: t.detach() for name, t in tensors.items()}


def _views(buffer: torch.Tensor, slots: Iterable[_Slot]) -> dict[str, torch.Tensor]:
    return {
        slot.name: buffer[slot.offset : slot.offset + slot.nbytes]
        .view(slot.dtype)
        .view(slot.shape)
        for slot in slots
    }
