# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Carry `ModelRegistry.register_model` calls into spawned processes.

vLLM starts its engine core and workers with the `spawn` method, so a child
re-imports vLLM and sees only the models registered at import time. A model
registered under `if __name__ == "__main__":` would be unknown there.

Each registration is therefore pickled (cloudpickle, so lambdas, closures
and classes defined in `__main__` travel by value) into the environment
variable `VLLM_MODEL_REGISTRATIONS`, which child processes inherit. A child
adds the inherited entries to its registry when the registry is imported,
and unpickles an entry only when that architecture is first inspected or
loaded.

A process whose environment receives the variable after vLLM was imported
(a Ray worker: vLLM's Ray executor sets it through
`update_environment_variables`) adopts the entries when an architecture
it does not know is first looked up.

A `"module:attr"` registration travels as its name and is imported in each
process. Those processes start with this process's import path: spawned
ones through multiprocessing, the registry's inspection subprocess through
`PYTHONPATH`; so the module must be importable here.
"""

import base64
import importlib.util
import os
import pickle
import sys
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import cloudpickle

if TYPE_CHECKING:
    from torch import nn

    from vllm.model_executor.models.registry import _BaseRegisteredModel, _ModelInfo

ENV_VAR = "VLLM_MODEL_REGISTRATIONS"

# execve() rejects a single environment string above 128 KiB on Linux.
_MAX_ENCODED_BYTES = 120 * 1024


def propagate_registration(model_arch: str, model: Any) -> None:
    """Record `register_model(model_arch, model)` for child processes."""
    try:
        payload = cloudpickle.dumps(model)
    except Exception as e:
        raise TypeError(
            f"Cannot register {model!r} for '{model_arch}': it must be "
            "pickled to reach vLLM's engine and worker processes, and "
            f"pickling failed with {type(e).__name__}: {e}. Define the "
            "factory at module level and register it as "
            "'package.module:factory', or keep what it captures (locks, "
            "open files, CUDA tensors) out of its closure."
        ) from e
    registrations = _decode(os.environ.get(ENV_VAR))
    registrations[model_arch] = payload
    encoded = base64.b64encode(pickle.dumps(registrations)).decode("ascii")
    if len(encoded) > _MAX_ENCODED_BYTES:
        raise ValueError(
            f"The model registered for '{model_arch}' pickles to "
            f"{len(payload)} bytes, too large to pass to vLLM's worker "
            "processes in the environment. Load large objects (weights, "
            "tensors) inside the factory instead of capturing them."
        )
    os.environ[ENV_VAR] = encoded


def check_module_importable(model_arch: str, module_name: str) -> None:
    """Fail at registration, not in a worker, if `module_name` cannot be
    imported by the processes vLLM starts."""
    top_level = module_name.partition(".")[0]
    try:
        found = importlib.util.find_spec(top_level) is not None
    except (ImportError, ValueError):
        found = False
    if found:
        return
    searched = [path or os.getcwd() for path in sys.path[:3]]
    raise ModuleNotFoundError(
        f"Cannot register '{model_arch}' from '{module_name}': no module "
        f"named '{top_level}' can be imported in this process (the import "
        f"path starts with {searched}), and vLLM imports it by name in its "
        "engine and worker processes, which get this process's import path."
        f" Put the directory that holds {top_level}.py (or the package "
        f"{top_level}/) on PYTHONPATH, e.g. `PYTHONPATH=/path/to/dir python "
        "script.py`, install it as a package, or register the factory "
        "object itself instead of its name.",
        name=top_level,
    )


def inherited_registrations() -> dict[str, "InheritedRegistration"]:
    """Registrations made by the parent process, still pickled."""
    return {
        model_arch: InheritedRegistration(model_arch, payload)
        for model_arch, payload in _decode(os.environ.get(ENV_VAR)).items()
    }


@dataclass(frozen=True)
class InheritedRegistration:
    """A registry entry made in the parent; unpickled on first use."""

    model_arch: str
    payload: bytes

    @cached_property
    def _registered(self) -> "_BaseRegisteredModel":
        # Replay the parent's register_model() call on a scratch registry,
        # so every kind of registration resolves exactly as it did there.
        from vllm.model_executor.models.registry import _ModelRegistry

        scratch = _ModelRegistry()
        scratch.register_model(self.model_arch, cloudpickle.loads(self.payload))
        return scratch.models[self.model_arch]

    def inspect_model_cls(self) -> "_ModelInfo":
        return self._registered.inspect_model_cls()

    def load_model_cls(self) -> type["nn.Module"]:
        return self._registered.load_model_cls()


def adopt_late_registrations(models: dict[str, Any], architectures: list[str]) -> None:
    """Add to `models` the registrations for `architectures` that reached
    this process's environment after its registry was built. vLLM's Ray
    executor copies the driver's environment variables into each worker
    only after the worker actor has imported vLLM, registry included."""
    missing = [arch for arch in architectures if arch not in models]
    if missing and os.environ.get(ENV_VAR):
        inherited = inherited_registrations()
        models.update((arch, inherited[arch]) for arch in missing if arch in inherited)


def _decode(encoded: str | None) -> dict[str, bytes]:
    if not encoded:
        return {}
    return pickle.loads(base64.b64decode(encoded))
