# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""A checkpoint directory that names the factory which builds its model.

    config.json: {"architectures": ["MyModel"],
                  "vllm_model_factory": "my_models.decoder:build", ...}

When no model is registered for the checkpoint's architecture, the
registry registers `"my_models.decoder:build"` for it, so `vllm serve DIR`
and `LLM(model=DIR)` run the model with no `register_model` call. The
module is imported from the installed packages or, as Hugging Face remote
code is, from the checkpoint directory itself (`DIR/my_models/decoder.py`).
Importing it runs code named by a file, so it is gated exactly as remote
code: only with `trust_remote_code` (`--trust-remote-code`).

Installed packages can register factories with vLLM's own plugin entry
point instead (`vllm.general_plugins`), which every vLLM process runs.
"""

import importlib.util
import sys
from pathlib import Path

CONFIG_KEY = "vllm_model_factory"


def register_factory_from_config(
    registry, architectures: list[str], model_config
) -> None:
    """Register the factory `model_config`'s checkpoint names for its
    architecture, when no model is registered for any of them."""
    factory = getattr(model_config.hf_config, CONFIG_KEY, None)
    registered = any(arch in registry.models for arch in architectures)
    if not factory or (registered and not model_config.trust_remote_code):
        return  # registered in code: the key is not needed
    module_name, sep, attr = str(factory).partition(":")
    if not (sep and module_name and attr):
        raise ValueError(
            f"{CONFIG_KEY} in {model_config.model}'s config.json must be "
            f'"package.module:factory", got {factory!r}.'
        )
    if not model_config.trust_remote_code:
        raise ValueError(
            f"{model_config.model}'s config.json names the model factory "
            f"{factory!r} ({CONFIG_KEY}): loading it imports and runs that "
            "code. Pass --trust-remote-code (LLM(..., trust_remote_code="
            "True)) if you trust it."
        )
    # Also where the registration arrived with the process (a Ray worker
    # gets it through VLLM_MODEL_REGISTRATIONS, not this sys.path).
    _make_importable(module_name, model_config.model)
    if not registered:
        registry.register_model(architectures[0], str(factory))


def _make_importable(module_name: str, model_dir: str) -> None:
    """Put the checkpoint directory on the import path when it holds the
    module and nothing installed does. Spawned vLLM processes start with
    this process's `sys.path`; Ray workers run this again themselves."""
    if importlib.util.find_spec(module_name.split(".")[0]) is not None:
        return
    directory = Path(model_dir)
    relative = Path(*module_name.split("."))
    if (directory / relative).with_suffix(".py").is_file() or (
        directory / relative / "__init__.py"
    ).is_file():
        sys.path.insert(0, str(directory.resolve()))
