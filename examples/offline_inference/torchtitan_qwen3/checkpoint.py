# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""TorchTitan checkpoints as vLLM model directories.

A model directory holds `config.json` (Hugging Face Qwen3 fields,
`"architectures": ["TorchTitanQwen3ForCausalLM"]`, `"model_type": "qwen3"`),
tokenizer files and the weights in one of three forms:

* `*.safetensors`: read by vLLM as they are;
* a `torch.save` state dict (`*.pt`, `*.pth`, `*.bin`), flat or nested
  (`{"model": {...}}`);
* a `torch.distributed.checkpoint` (DCP) directory: `.metadata` plus
  `*.distcp` shards, in the model directory or its `checkpoint/` folder.

vLLM reads safetensors natively; the other two are converted once into a
safetensors cache next to the checkpoint (`<dir>/.vllm-safetensors/`, reused
while the source files are unchanged). Names are not changed here: the
model's `hf_to_vllm_mapper` maps them when vLLM loads the weights.
"""

import hashlib
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

TORCH_SAVE_SUFFIXES = (".pt", ".pth", ".bin")
CACHE = ".vllm-safetensors"


def prepare_model_dir(path: str | os.PathLike) -> Path:
    """A directory vLLM can load: `path` itself, or its converted cache."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"{path} has no config.json; see the docstring of "
            "examples/offline_inference/torchtitan_qwen3/checkpoint.py "
            "for the fields it needs."
        )
    if list(path.glob("*.safetensors")):
        return path
    dcp_dir = next(
        (d for d in (path, path / "checkpoint") if (d / ".metadata").exists()), None
    )
    torch_files = sorted(p for p in path.iterdir() if p.suffix in TORCH_SAVE_SUFFIXES)
    sources = sorted(dcp_dir.iterdir()) if dcp_dir else torch_files
    if not sources:
        raise FileNotFoundError(
            f"{path} holds no weights: expected *.safetensors, a torch.save "
            f"file ({', '.join(TORCH_SAVE_SUFFIXES)}) or a DCP checkpoint "
            "(.metadata + *.distcp)."
        )
    cache = path / CACHE
    stamp = _fingerprint(sources)
    if (cache / stamp).exists():
        return cache
    state_dict = _read_dcp(dcp_dir) if dcp_dir else _read_torch_files(torch_files)
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir()
    # safetensors refuses tensors that share storage (tied weights)
    save_file(
        {
            name: tensor.detach().clone().contiguous()
            for name, tensor in state_dict.items()
        },
        str(cache / "model.safetensors"),
    )
    for item in path.iterdir():
        if item.is_file() and item.suffix in (".json", ".txt", ".model"):
            shutil.copy(item, cache / item.name)
    (cache / stamp).touch()
    return cache


def flatten(state_dict: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """`{"model": {"a": t}}` -> `{"model.a": t}`; non-tensors dropped only
    under the trainer's bookkeeping keys."""
    flat = {}
    for key, value in state_dict.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            flat[name] = value
        elif isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif key in ("step", "epoch", "train_state", "dataloader"):
            continue
        else:
            raise ValueError(
                f"{name} is a {type(value).__name__}, not a tensor or a dict of tensors"
            )
    return flat


def _read_torch_files(files: list[Path]) -> dict[str, torch.Tensor]:
    state_dict = {}
    for file in files:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
        state_dict.update(flatten(loaded))
    # Only model weights: optimizer state would not match any parameter.
    return {
        k: v
        for k, v in state_dict.items()
        if not k.startswith(("optimizer.", "lr_scheduler."))
    }


def _read_dcp(directory: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import (
        _load_state_dict_from_keys,
    )

    metadata = FileSystemReader(str(directory)).read_metadata()
    keys = {
        key
        for key in metadata.state_dict_metadata
        if not key.startswith(
            ("optimizer", "lr_scheduler", "dataloader", "train_state")
        )
    }
    loaded = _load_state_dict_from_keys(keys=keys, checkpoint_id=str(directory))
    return flatten(loaded)


def _fingerprint(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return "source-" + digest.hexdigest()[:16]
