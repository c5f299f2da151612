# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Turn the checkpoints training runs leave behind into directories vLLM
loads: one `model.safetensors` (or shards and an index), `config.json`,
and the tokenizer and generation files.

Inputs, detected by `detect_checkpoint_type` or named:

- `deepspeed`: a ZeRO stage 1, 2 or 3 checkpoint (`latest`,
  `global_stepN/*_optim_states.pt`, `*model_states.pt`); the fp32 master
  weights are merged from every rank's partition, or with
  `keep_original_precision` the module's own weights (stages 1 and 2).
- `hf_sharded`: `*.index.json` over `.safetensors` or `.bin` shards (shard
  paths in the index may name sub-folders).
- `dcp`: a `torch.distributed.checkpoint` directory (`.metadata`).
- `single`: one `.safetensors`, `.bin`, `.pt` or `.pth` file.

Tensors stream one at a time from the input into output shards of at most
`max_shard_size` bytes, so peak memory is about the largest tensor plus
one output shard, whatever the model's size. Pickle-based inputs are
memory-mapped (`torch.load(mmap=True)`), never read whole. The output is
written into a temporary directory beside the target and renamed into
place only once complete and validated: an interrupted run leaves nothing
that looks like a checkpoint.
"""

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

CHECKPOINT_TYPES = ("deepspeed", "hf_sharded", "dcp", "single")
# Copied beside the weights when the input (or base model) has them.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
EXTRA_FILES = ("generation_config.json", "preprocessor_config.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class ConsolidateError(ValueError):
    """An input that cannot be consolidated, said with what to do."""


@dataclass
class ConsolidateResult:
    output: Path
    checkpoint_type: str
    num_tensors: int
    num_bytes: int
    shards: list[str]
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------- detection


def detect_checkpoint_type(path: Path) -> str:
    path = Path(path)
    if path.is_file():
        if path.suffix in (".safetensors",) + PICKLE_SUFFIXES:
            return "single"
        raise ConsolidateError(
            f"{path}: not a checkpoint file (expected .safetensors, .bin, .pt or .pth)"
        )
    if not path.is_dir():
        raise ConsolidateError(f"{path} does not exist")
    if (
        (path / "zero_to_fp32.py").exists()
        or (path / "latest").exists()
        or list(path.glob("*model_states.pt"))
        or list(path.glob("global_step*/*model_states.pt"))
    ):
        return "deepspeed"
    if list(path.glob("*.index.json")):
        return "hf_sharded"
    if (path / ".metadata").exists() or (path / "checkpoint" / ".metadata").exists():
        return "dcp"
    weights = [
        p for p in path.iterdir() if p.suffix in (".safetensors",) + PICKLE_SUFFIXES
    ]
    if len(weights) == 1:
        return "single"
    if list(path.glob("checkpoint-*")):
        return "deepspeed"  # a run directory: resolved to its latest step
    raise ConsolidateError(
        f"{path}: no checkpoint recognised (looked for a DeepSpeed `latest`"
        " / `*model_states.pt`, a `*.index.json`, a DCP `.metadata` and a "
        "single weight file); pass --type to say which it is."
    )


def latest_run_checkpoint(path: Path) -> Path:
    """In a run directory of `checkpoint-N` folders, the highest step."""
    steps = []
    for child in path.glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", child.name)
        if match and child.is_dir():
            steps.append((int(match[1]), child))
    if not steps:
        return path
    return max(steps)[1]


# ---------------------------------------------------------------- readers

TensorStream = Iterator[tuple[str, torch.Tensor]]


def read_single(path: Path) -> TensorStream:
    if path.is_dir():
        path = next(
            p for p in path.iterdir() if p.suffix in (".safetensors",) + PICKLE_SUFFIXES
        )
    yield from _read_file(path)


def _read_file(path: Path) -> TensorStream:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as file:
                for name in file.keys():  # noqa: SIM118
                    yield name, file.get_tensor(name)
        except Exception as e:  # truncated or corrupt header / data
            raise ConsolidateError(f"{path}: cannot read ({e})") from e
        return
    state = _load_pickle(path)
    if "module" in state and isinstance(state["module"], dict):
        state = state["module"]
    elif "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # {"model": state_dict, "step": ...}
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor):
            yield name, tensor


def _load_pickle(path: Path, weights_only: bool = True):
    try:
        return torch.load(
            path, map_location="cpu", mmap=True, weights_only=weights_only
        )
    except Exception as e:
        raise ConsolidateError(f"{path}: cannot read ({type(e).__name__}: {e})") from e


def read_hf_sharded(path: Path) -> TensorStream:
    indexes = sorted(path.glob("*.index.json"))
    if len(indexes) != 1:
        raise ConsolidateError(
            f"{path}: expected one *.index.json, found {[p.name for p in indexes]}"
        )
    index = json.loads(indexes[0].read_text())
    weight_map: dict[str, str] = index.get("weight_map") or {}
    if not weight_map:
        raise ConsolidateError(f"{indexes[0]} has no weight_map")
    shards: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        shards.setdefault(shard, set()).add(name)
    missing = [s for s in shards if not (path / s).exists()]
    if missing:
        raise ConsolidateError(
            f"{indexes[0].name} names shard file(s) that do not exist: "
            f"{', '.join(missing)}"
        )
    for shard, names in shards.items():
        seen = set()
        for name, tensor in _read_file(path / shard):
            if name in names:
                seen.add(name)
                yield name, tensor
        if seen != names:
            raise ConsolidateError(
                f"{shard} lacks {len(names - seen)} tensor(s) the index puts"
                f" there, e.g. {sorted(names - seen)[:3]}"
            )


def read_dcp(path: Path) -> TensorStream:
    import torch.distributed.checkpoint as dcp

    if not (path / ".metadata").exists():
        path = path / "checkpoint"
    reader = dcp.FileSystemReader(str(path))
    metadata = reader.read_metadata()
    for name, item in metadata.state_dict_metadata.items():
        if not hasattr(item, "size"):
            continue  # bytes entries (non-tensor state)
        tensor = torch.empty(item.size, dtype=item.properties.dtype)
        dcp.load({name: tensor}, storage_reader=reader, no_dist=True)
        yield name, tensor


def read_deepspeed(
    path: Path, keep_original_precision: bool = False, notes: list[str] | None = None
) -> TensorStream:
    """The fp32 master weights of a ZeRO 1/2/3 checkpoint, merged from every
    rank's partition (or the module's own weights with
    `keep_original_precision`)."""
    notes = notes if notes is not None else []
    step_dir = _deepspeed_step_dir(path)
    model_files = sorted(step_dir.glob("*model_states.pt"))
    optim_files = sorted(step_dir.glob("*optim_states.pt"), key=_rank_of)
    if not model_files:
        raise ConsolidateError(f"{step_dir}: no *model_states.pt")
    # DeepSpeed writes these with pickled Python objects: only what
    # DeepSpeed itself wrote should be consolidated (trust the input).
    model_state = _load_pickle(model_files[0], weights_only=False)
    param_shapes = model_state["param_shapes"]
    buffers = set(model_state.get("buffer_names") or ())
    module = model_state.get("module") or {}
    for name in buffers:  # buffers are whole in model_states
        if name in module:
            yield name, module[name]
    if keep_original_precision or not optim_files:
        if not optim_files:
            notes.append("no optimizer partitions: module weights used")
        if all(t.numel() for n, t in module.items() if n not in buffers):
            for name, tensor in module.items():
                if name not in buffers:
                    yield name, tensor
            return
        if keep_original_precision:
            notes.append(
                "ZeRO-3 keeps no whole module weights: fp32 master weights merged"
            )
    partitions = _Partitions(optim_files)
    stage = int(partitions.get()[0]["zero_stage"])
    world = len(optim_files)
    steps = {f.name: _optimizer_step(p) for f, p in zip(optim_files, partitions.get())}
    if len(set(steps.values()) - {None}) > 1:
        raise ConsolidateError(
            f"{step_dir}: the ranks' optimizer partitions come from different"
            " training steps ("
            + ", ".join(f"{name}: step {step}" for name, step in steps.items())
            + "); copy all ranks' files of one save_checkpoint together."
        )
    for group, shapes in enumerate(param_shapes):
        offsets = [0] * world
        for name, shape in shapes.items():
            numel = math.prod(shape)
            if stage <= 2:
                # one flat buffer split evenly between the ranks, in order
                flats = [
                    p["single_partition_of_fp32_groups"][group]
                    for p in partitions.get()
                ]
                tensor = _flat_slice(flats, offsets[0], numel)
                offsets = [offsets[0] + numel] * world
            else:
                # every parameter split evenly between the ranks (padded)
                flats = [p["fp32_flat_groups"][group] for p in partitions.get()]
                share = -(-numel // world)
                tensor = torch.cat(
                    [flat[o : o + share] for flat, o in zip(flats, offsets)]
                )[:numel]
                offsets = [o + share for o in offsets]
            if tensor.numel() != numel:
                raise ConsolidateError(
                    f"{step_dir}: the optimizer partitions end inside {name} "
                    f"({tensor.numel()} of {numel} values); are all "
                    f"{world} ranks' *optim_states.pt files here?"
                )
            yield name, tensor.view(shape)
            partitions.read(numel * 4)


def _optimizer_step(partition: dict) -> int | None:
    """The torch optimizer's step count a rank's partition was saved at."""
    for key in ("base_optimizer_state", "optimizer_state_dict"):
        state = (partition.get(key) or {}).get("state") or {}
        for values in state.values():
            if isinstance(values, dict) and "step" in values:
                return int(values["step"])
    return None


class _Partitions:
    """Every rank's optimizer state, memory-mapped. Pages read from a
    mapping count as resident memory until it is closed, so the mappings
    are reopened after every `reopen_bytes` read: memory stays bounded by
    what is being copied, not by the model."""

    def __init__(self, files: list[Path], reopen_bytes: int = 256 << 20):
        self.files = files
        self.reopen_bytes = reopen_bytes
        self.states: list[dict] | None = None
        self.since_open = 0

    def get(self) -> list[dict]:
        if self.states is None:
            self.states = [
                _load_pickle(f, weights_only=False)["optimizer_state_dict"]
                for f in self.files
            ]
        return self.states

    def read(self, num_bytes: int) -> None:
        self.since_open += num_bytes
        if self.since_open >= self.reopen_bytes:
            self.states, self.since_open = None, 0


def _flat_slice(flats: list[torch.Tensor], start: int, length: int) -> torch.Tensor:
    """`length` values from `start` of the concatenation of `flats`,
    without concatenating them."""
    pieces, base = [], 0
    for flat in flats:
        lo, hi = max(start, base), min(start + length, base + flat.numel())
        if lo < hi:
            pieces.append(flat[lo - base : hi - base])
        base += flat.numel()
    if not pieces:
        return torch.empty(0)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _deepspeed_step_dir(path: Path) -> Path:
    path = latest_run_checkpoint(path)
    if list(path.glob("*model_states.pt")):
        return path
    latest = path / "latest"
    if latest.exists():
        tag = latest.read_text().strip()
        if not (path / tag).is_dir():
            raise ConsolidateError(
                f"{latest} names {tag!r}, which is not a directory in {path}"
            )
        return path / tag
    steps = sorted(
        path.glob("global_step*"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0)
    )
    if not steps:
        raise ConsolidateError(f"{path}: no `latest` and no global_step*")
    return steps[-1]


def _rank_of(path: Path) -> int:
    match = re.search(r"rank_(\d+)", path.name)
    return int(match[1]) if match else 0


READERS: dict[str, Callable[..., TensorStream]] = {
    "single": read_single,
    "hf_sharded": read_hf_sharded,
    "dcp": read_dcp,
}


# ----------------------------------------------------------------- writer


def parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", size, re.IGNORECASE)
    if not match:
        raise ConsolidateError(
            f"--max-shard-size {size!r}: use e.g. 5GB, 500MB or a number of bytes"
        )
    unit = match[2].upper().rstrip("B").rstrip("I")
    factor = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[unit]
    return int(float(match[1]) * factor)


class ShardWriter:
    """Writes tensors into shards of at most `max_bytes` (one tensor
    larger than that gets a shard of its own)."""

    def __init__(self, directory: Path, max_bytes: int, pytorch_bin: bool):
        self.directory = directory
        self.max_bytes = max_bytes
        self.pytorch_bin = pytorch_bin
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.num_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        # own the data: a view into a memory-mapped partition would keep
        # that whole file resident
        self.pending[name] = tensor.detach().contiguous().clone()
        self.pending_bytes += size
        self.num_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        suffix = ".bin" if self.pytorch_bin else ".safetensors"
        name = f"part-{len(self.files):05d}{suffix}"
        try:
            if self.pytorch_bin:
                torch.save(self.pending, self.directory / name)
            else:
                from safetensors.torch import save_file

                save_file(
                    self.pending, str(self.directory / name), metadata={"format": "pt"}
                )
        except Exception as e:  # safetensors reports I/O errors as its own
            raise OSError(f"writing {name}: {e}") from e
        self.files.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Flush, then name the files as vLLM and Hugging Face expect."""
        self.flush()
        base = "pytorch_model" if self.pytorch_bin else "model"
        suffix = ".bin" if self.pytorch_bin else ".safetensors"
        if len(self.files) == 1:
            final = [f"{base}{suffix}"]
        else:
            final = [
                f"{base}-{i + 1:05d}-of-{len(self.files):05d}{suffix}"
                for i in range(len(self.files))
            ]
        weight_map = {}
        for (temporary, names), name in zip(self.files, final):
            os.replace(self.directory / temporary, self.directory / name)
            weight_map.update(dict.fromkeys(names, name))
        if len(final) > 1:
            index = {
                "metadata": {"total_size": self.num_bytes},
                "weight_map": weight_map,
            }
            (self.directory / f"{base}{suffix}.index.json").write_text(
                json.dumps(index, indent=2)
            )
        return final


# ------------------------------------------------------------- validation


def validate_output(directory: Path) -> list[str]:
    """Problems that make `directory` unloadable ("error: ...") or
    incomplete ("warning: ..."): one weight file or a consistent index, no
    tensor missing or duplicated across shards, config and tokenizer."""
    from safetensors import safe_open

    problems = []
    indexes = list(directory.glob("*.index.json"))
    weights = sorted(
        p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin")
    )
    if not weights:
        problems.append("error: no weight file")
    elif indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        for shard in set(weight_map.values()) - {p.name for p in weights}:
            problems.append(f"error: the index names {shard}, not written")
        seen: dict[str, str] = {}
        for shard in weights:
            names = (
                safe_open(str(shard), "pt").keys()
                if shard.suffix == ".safetensors"
                else torch.load(shard, mmap=True, weights_only=True).keys()
            )
            for name in names:
                if name in seen:
                    problems.append(
                        f"error: {name} is in both {seen[name]} and {shard.name}"
                    )
                seen[name] = shard.name
                if weight_map.get(name) != shard.name:
                    problems.append(
                        f"error: {name} is in {shard.name}, the "
                        f"index says {weight_map.get(name)}"
                    )
        for name in set(weight_map) - set(seen):
            problems.append(f"error: {name} is in the index, in no shard")
    elif len(weights) > 1:
        problems.append("error: several weight files and no index")
    if not (directory / "config.json").exists():
        problems.append(
            "error: no config.json (pass --base-model DIR with the model's config)"
        )
    if not any((directory / name).exists() for name in TOKENIZER_FILES):
        problems.append(
            "warning: no tokenizer files (pass --base-model DIR "
            "to copy them, or serve with --tokenizer)"
        )
    return problems


# ------------------------------------------------------------- consolidate


def consolidate(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    checkpoint_type: str = "auto",
    checkpoint_dir: str | os.PathLike | None = None,
    base_model: str | os.PathLike | None = None,
    dtype: str | None = None,
    keep_original_precision: bool = False,
    max_shard_size: str | int = "5GB",
    pytorch_bin: bool = False,
    force: bool = False,
    validate: bool = True,
    progress: Callable[[int], None] | None = None,
) -> ConsolidateResult:
    """Consolidate the checkpoint in `input_dir` (weights under
    `checkpoint_dir` if given) into `output_dir`. See the module docstring;
    `progress(num_bytes)` is called after each tensor."""
    source = Path(input_dir)
    output = Path(output_dir)
    weights_at = Path(checkpoint_dir) if checkpoint_dir else source
    if output.exists() and not force:
        raise ConsolidateError(f"{output} exists; pass --force to replace it")
    if dtype is not None and dtype not in DTYPES:
        raise ConsolidateError(f"--dtype {dtype!r}: one of {', '.join(DTYPES)}")
    kind = (
        detect_checkpoint_type(weights_at)
        if checkpoint_type == "auto"
        else checkpoint_type
    )
    if kind not in CHECKPOINT_TYPES:
        raise ConsolidateError(
            f"--type {kind!r}: one of auto, {', '.join(CHECKPOINT_TYPES)}"
        )
    notes: list[str] = []
    if kind == "deepspeed":
        stream = read_deepspeed(weights_at, keep_original_precision, notes)
    else:
        stream = READERS[kind](latest_run_checkpoint(weights_at))
    if kind == "deepspeed" or (
        kind == "single" and weights_at.suffix in PICKLE_SUFFIXES
    ):
        notes.append(
            "read a pickle-based format (no safe format exists for"
            " it): consolidate only checkpoints you trust"
        )
    target_dtype = DTYPES.get(dtype) if dtype else None

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        writer = ShardWriter(staging, parse_size(max_shard_size), pytorch_bin)
        names = set()
        for name, tensor in stream:
            if name in names:
                raise ConsolidateError(f"{name} appears twice in the input")
            names.add(name)
            if target_dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(target_dtype)
            writer.add(name, tensor)
            if progress:
                progress(tensor.numel() * tensor.element_size())
        if not names:
            raise ConsolidateError(f"{weights_at}: no tensors found")
        shards = writer.finish()
        _copy_side_files(
            staging,
            [source, latest_run_checkpoint(source), weights_at]
            + ([Path(base_model)] if base_model else []),
        )
        if validate:
            errors = [p for p in validate_output(staging) if p.startswith("error")]
            if errors:
                raise ConsolidateError(
                    "the output is not loadable:\n" + "\n".join(errors)
                )
            notes += [p for p in validate_output(staging) if p.startswith("warning")]
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    except OSError as e:  # a full disk, a read-only target
        shutil.rmtree(staging, ignore_errors=True)
        raise ConsolidateError(
            f"cannot write {output}: {e}; nothing was left behind"
        ) from e
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ConsolidateResult(output, kind, len(names), writer.num_bytes, shards, notes)


def _copy_side_files(target: Path, sources: list[Path]) -> None:
    """config.json, tokenizer and generation files: the first source that
    has each wins (the input, then --base-model)."""
    for name in ("config.json",) + TOKENIZER_FILES + EXTRA_FILES:
        for source in sources:
            directory = source if source.is_dir() else source.parent
            if (directory / name).is_file():
                shutil.copy2(directory / name, target / name)
                break


# ------------------------------------------------------------------ batch


@dataclass
class BatchJob:
    name: str
    input_dir: Path
    checkpoint_dir: Path | None
    step: str


def plan_batch(
    inputs: list[Path],
    all_checkpoints: bool = False,
    checkpoint_filter: str | None = None,
    naming_template: str = "{input_name}",
) -> list[BatchJob]:
    """One job per input (its latest checkpoint), or with
    `all_checkpoints` one per `checkpoint-N` / `global_stepN` in it."""
    from fnmatch import fnmatch

    jobs = []
    for source in inputs:
        steps = (
            sorted(
                (
                    p
                    for p in source.iterdir()
                    if p.is_dir()
                    and re.fullmatch(r"(checkpoint-|global_step)\d+", p.name)
                ),
                key=lambda p: int(re.sub(r"\D", "", p.name)),
            )
            if source.is_dir()
            else []
        )
        if checkpoint_filter:
            steps = [p for p in steps if fnmatch(p.name, checkpoint_filter)]
        chosen = steps if all_checkpoints else steps[-1:]
        if not chosen:
            jobs.append(
                BatchJob(
                    naming_template.format(
                        input_name=source.name, step="final", checkpoint_name=""
                    ),
                    source,
                    None,
                    "final",
                )
            )
        for step_dir in chosen:
            step = re.sub(r"\D", "", step_dir.name)
            checkpoint = step_dir if step_dir.name.startswith("checkpoint-") else source
            jobs.append(
                BatchJob(
                    naming_template.format(
                        input_name=source.name, step=step, checkpoint_name=step_dir.name
                    ),
                    checkpoint,
                    step_dir if step_dir.name.startswith("global_step") else None,
                    step,
                )
            )
    names = [job.name for job in jobs]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise ConsolidateError(
            f"--naming-template {naming_template!r} gives several jobs the "
            f"same output name ({', '.join(sorted(duplicates))}); add "
            "{step} to it"
        )
    return jobs
