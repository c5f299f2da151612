# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""A running engine's weights, opened in the trainer's process by CUDA IPC.

A trainer and a generator that run the same model definition hold the
same parameters under the same names. Once the trainer has the engine's
parameter memory open, a push needs no message per tensor:

- `push(module)` copies the trainer's parameters into the engine's in one
  batched device copy on the trainer's stream (casting, e.g. from fp32
  master weights to the engine's bf16), then resets the prefix cache;
- `alias(module)` goes further: the trainer's parameters become views of
  the engine's memory, so the optimiser's in-place updates are the push.
  `push()` is then a stream synchronisation and the prefix-cache reset
  (sent without waiting for the reply; none with
  `enable_prefix_caching=False`), whatever the model's size.

    weights = EngineWeights(llm)   # once, after LLM(...)
    weights.alias(policy)          # optional: zero-copy from now on
    ...                            # optimiser step
    weights.push(policy)           # before the next generate

What the trainer may do with aliased parameters: update them in place
(optimisers, `copy_`, `mul_`) while the engine is not generating. What it
must not do: replace their storage (`param.data = ...`, `.to(...)`,
resizing), keep using them after the engine shut down (the memory is the
engine's), or put the engine to sleep (`LLM.sleep` frees it).

The engine must hold every weight whole in one CUDA worker
(tensor_parallel_size and pipeline_parallel_size 1), on the same machine
as the trainer (in its own process, or in the trainer's with an engine
core in-process); its parameters must be those the model computes with.
Parameters that vLLM repacked after loading (some fused-MoE backends) are
not shared, and names whose engine tensor has another shape or device are
not aliased: `push` copies those. Elsewhere use `SharedWeights`
(shared_weights.py), which any layout and device takes.
"""

import functools
import os
import pickle
from collections.abc import Iterable, Mapping
from concurrent.futures import Future

import torch
from torch import nn


class EngineWeights:
    """The parameters of `llm`'s model, by name, as tensors of this process
    that live in the engine's GPU memory."""

    def __init__(self, llm) -> None:
        replies = llm.apply_model(
            functools.partial(export_engine_parameters, caller_pid=os.getpid())
        )
        if len(replies) != 1:
            raise ValueError(
                f"EngineWeights needs the whole model in one worker; this "
                f"engine has {len(replies)} workers (tensor or pipeline "
                "parallel). Push through SharedWeights(..., device='cuda') "
                "instead: each worker cuts its own shard."
            )
        if isinstance(replies[0], bytes):  # IPC handles, from another process
            exported, self.not_shared = pickle.loads(replies[0])
            tensors = {name: rebuild(*args) for name, (rebuild, args) in exported}
        else:  # the worker runs in this process: its parameters themselves
            tensors, self.not_shared = replies[0]
        self.tensors: dict[str, torch.Tensor] = tensors
        self.llm = llm
        # without prefix caching no KV outlives its request: nothing to reset
        cache_config = llm.llm_engine.vllm_config.cache_config
        self.prefix_caching = cache_config.enable_prefix_caching
        # the reply to the last reset sent without waiting for it
        self._reset_reply: Future | None = None
        self.aliased = 0  # trainer parameters made views of the engine's
        # the last module pushed, the names pushed, and its copy list
        self._plan: tuple[nn.Module, tuple | None, tuple[list, list]] | None = None

    def alias(self, module: nn.Module) -> dict[str, str]:
        """Make `module`'s parameters views of the engine's, where they have
        the same shape, dtype and device; their current values are copied
        in first, so the engine's next step computes what it would after a
        push. Returns the parameters left as they were, with why: `push`
        copies those."""
        params = dict(module.named_parameters(remove_duplicate=False))
        _, problems = self._match(params, names=None)
        kept: dict[str, str] = dict(problems)
        aliased_as: dict[int, str] = {}  # a tied parameter: its first name
        with torch.no_grad():
            for name, param in params.items():
                target = self.tensors[name] if name not in kept else None
                if target is None:
                    continue
                if param.dtype != target.dtype or param.device != target.device:
                    kept[name] = (
                        f"trainer {param.dtype} on {param.device}, engine "
                        f"{target.dtype} on {target.device}"
                    )
                elif param.data_ptr() == target.data_ptr():
                    aliased_as.setdefault(id(param), name)
                elif id(param) in aliased_as:
                    kept[name] = (
                        f"tied to {aliased_as[id(param)]} in the trainer, "
                        "not in the engine"
                    )
                else:
                    target.copy_(param)
                    param.data = target
                    aliased_as[id(param)] = name
        self.aliased = len(aliased_as)
        self._plan = None
        self.push()
        return kept

    def push(
        self,
        tensors: nn.Module | Mapping[str, torch.Tensor] | None = None,
        names: Iterable[str] | None = None,
    ) -> int:
        """Make the engine's next step use the trainer's current values:
        copy `tensors` (all, or only `names`) into the engine's memory,
        except those that already are the engine's (aliased), then
        synchronise and reset the prefix cache (cached KV holds the old
        weights). Nothing is copied unless every name fits. Returns the
        number of tensors copied."""
        copied = 0
        if tensors is not None:
            targets, sources = self._plan_for(tensors, names)
            if targets:
                with torch.no_grad():
                    torch._foreach_copy_(targets, sources)
            copied = len(targets)
        # the engine reads from its own streams: every write done first
        torch.cuda.synchronize()
        if self.prefix_caching:
            self._reset_prefix_cache()
        return copied

    def _reset_prefix_cache(self) -> None:
        """Reset the engine's prefix cache before its next step. An engine
        core in its own process runs the call before any request sent
        after it, so the round trip (most of an aliased push) is not
        waited for; its reply is read at the next push, raising the
        engine's error if it failed."""
        if self._reset_reply is not None:
            self._reset_reply.result()
        client = self.llm.llm_engine.engine_core
        if hasattr(client, "call_utility_nowait"):
            self._reset_reply = client.call_utility_nowait("reset_prefix_cache")
        else:  # an engine core in this process: a direct call
            self.llm.reset_prefix_cache()

    def _plan_for(
        self,
        tensors: nn.Module | Mapping[str, torch.Tensor],
        names: Iterable[str] | None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The (engine tensors, trainer tensors) to copy. A module pushed
        again with the same names reuses its list: its parameters stay the
        same objects."""
        names = None if names is None else tuple(names)
        if isinstance(tensors, nn.Module):
            last = self._plan
            if last is not None and last[0] is tensors and last[1] == names:
                return last[2]
            named = dict(tensors.named_parameters(remove_duplicate=False))
        else:
            named = dict(tensors)
        plan, problems = self._match(named, names)
        if problems:
            raise ValueError(
                f"The push does not fit the engine's model "
                f"({len(problems)} problem(s); nothing was copied): "
                + "; ".join(f"{name}: {why}" for name, why in problems[:20])
            )
        if isinstance(tensors, nn.Module):
            self._plan = (tensors, names, plan)
        return plan

    def _match(
        self, named: Mapping[str, torch.Tensor], names: Iterable[str] | None
    ) -> tuple[tuple[list[torch.Tensor], list[torch.Tensor]], list[tuple[str, str]]]:
        """The (engine tensor, trainer tensor) pairs to copy, and what does
        not fit."""
        if names is not None:
            names = list(names)
            missing = [name for name in names if name not in named]
            if missing:
                raise ValueError(
                    f"Push of names the trainer's tensors do not hold "
                    f"(nothing was copied): {', '.join(missing[:20])}"
                )
            named = {name: named[name] for name in names}
        targets, sources, problems = [], [], []
        for name, tensor in named.items():
            target = self.tensors.get(name)
            if target is None:
                why = self.not_shared.get(name, "not a parameter of the engine's model")
                problems.append((name, why))
            elif tuple(tensor.shape) != tuple(target.shape):
                shapes = f"trainer {tuple(tensor.shape)}, engine {tuple(target.shape)}"
                problems.append((name, shapes))
            elif tensor.data_ptr() != target.data_ptr():  # not aliased
                targets.append(target)
                sources.append(tensor.detach())
        return (targets, sources), problems


def export_engine_parameters(
    model: nn.Module, caller_pid: int
) -> bytes | tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Runs in the worker, through `apply_model`: a CUDA IPC handle for
    every parameter the model computes with, by the factory module's names,
    and the names it cannot share with why. Pickled here, so that the
    engine's message encoders carry only bytes. A worker in the caller's
    own process (an engine core in-process) returns the parameters
    themselves: CUDA IPC cannot open a handle where it was exported."""
    from torch.multiprocessing.reductions import reduce_tensor

    from vllm.model_executor.layers.generic_moe import fused_moe_blocks

    module = getattr(model, "model", model)  # the factory's module
    repacked = {
        param_id
        for fused in fused_moe_blocks(module)
        if not getattr(fused, "in_place", True)
        for param_id in fused.member_ids
    }
    shared: dict[str, torch.Tensor] = {}
    not_shared: dict[str, str] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if not param.is_cuda:
            raise ValueError(
                f"EngineWeights needs the engine's weights on CUDA; {name} is "
                f"on {param.device}. On this platform push through "
                "SharedWeights."
            )
        if id(param) in repacked:
            not_shared[name] = "vLLM's MoE backend computes with a repacked copy"
        else:
            shared[name] = param.detach()
    if os.getpid() == caller_pid:
        return shared, not_shared
    exported = []
    for name, tensor in shared.items():
        try:
            exported.append((name, reduce_tensor(tensor)))
        except RuntimeError as error:  # memory CUDA IPC cannot export
            raise ValueError(
                f"The engine's parameter {name} cannot be shared by CUDA IPC "
                f"({error}). Push through SharedWeights instead."
            ) from error
    return pickle.dumps((exported, not_shared))
