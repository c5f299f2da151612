# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""`vllm consolidate` on checkpoints written by the real libraries:
DeepSpeed ZeRO 1/2/3 (two CPU ranks), Hugging Face sharded safetensors and
.bin, torch.distributed.checkpoint from two ranks."""

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vllm.entrypoints.cli.consolidate import add_arguments, run_batch, validate_load
from vllm.model_executor.model_loader.consolidate import ConsolidateError, consolidate

HERE = Path(__file__).resolve().parent
# --validate-load starts vllm.LLM in the command's process: no engine
# process to spawn
IN_PROCESS_ENGINE = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
VLLM = str(Path(sys.executable).parent / "vllm")


def output_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def assert_same(ours: dict, reference: dict) -> None:
    assert sorted(ours) == sorted(reference)
    for name, tensor in reference.items():
        assert torch.equal(ours[name], tensor), name


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    """ZeRO stage 1, 2 and 3 checkpoints DeepSpeed itself wrote."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.fail(
            "DeepSpeed writes these tests' ZeRO checkpoints: pip install deepspeed"
        )
    out = tmp_path_factory.mktemp("deepspeed")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "deepspeed"),
            "--num_gpus",
            "2",
            str(HERE / "deepspeed_zero_train.py"),
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=out,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama and its greedy tokens from transformers."""
    from transformers import LlamaForCausalLM

    sys.path.insert(0, str(HERE))
    from deepspeed_zero_train import CONFIG

    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        tokens = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)[
            0, 4:
        ].tolist()
    return model, tokens


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_stages(zero_runs, stage, tmp_path):
    run = zero_runs / f"zero{stage}"
    result = consolidate(run, tmp_path / "out", max_shard_size="100KB")
    assert result.checkpoint_type == "deepspeed"
    assert len(result.shards) > 1  # sharded, with an index
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert (tmp_path / "out" / "config.json").exists()
    assert_same(
        output_tensors(tmp_path / "out"), load_file(run / "reference.safetensors")
    )


def test_hf_sharded_safetensors_and_bin(llama, tmp_path):
    from huggingface_hub import save_torch_state_dict

    model, _ = llama
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "st", max_shard_size="100KB")
    # .bin shards the way transformers < 5 wrote them (transformers 5
    # writes only safetensors), nested one folder down
    (tmp_path / "bin" / "weights").mkdir(parents=True)
    save_torch_state_dict(
        state,
        tmp_path / "bin" / "weights",
        safe_serialization=False,
        max_shard_size="100KB",
    )
    index = tmp_path / "bin" / "weights" / "pytorch_model.bin.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k: f"weights/{v}" for k, v in data["weight_map"].items()}
    (tmp_path / "bin" / index.name).write_text(json.dumps(data))
    index.unlink()
    model.config.save_pretrained(tmp_path / "bin")
    for form in ("st", "bin"):
        result = consolidate(tmp_path / form, tmp_path / f"{form}-out")
        assert result.checkpoint_type == "hf_sharded"
        assert result.shards == ["model.safetensors"]
        assert_same(output_tensors(tmp_path / f"{form}-out"), state)


def _save_dcp(rank, world, path, state):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    sharded = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in state.items()}
    dcp.save(sharded, checkpoint_id=str(path))
    dist.destroy_process_group()


def test_dcp_from_two_ranks(llama, tmp_path):
    import torch.multiprocessing as mp

    model, _ = llama
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mp.spawn(_save_dcp, args=(2, tmp_path / "dcp", state), nprocs=2)
    model.config.save_pretrained(tmp_path / "dcp")
    result = consolidate(tmp_path / "dcp", tmp_path / "out", dtype="bfloat16")
    assert result.checkpoint_type == "dcp"
    assert_same(
        output_tensors(tmp_path / "out"),
        {k: v.to(torch.bfloat16) for k, v in state.items()},
    )


def test_validate_load_serves_the_models_tokens(llama, tmp_path, capsys):
    """ZeRO-free here: the Llama saved sharded, consolidated by the command
    with --validate-load, which loads the result in vllm.LLM: its greedy
    tokens are transformers'. An output vLLM cannot build fails the
    command with the reason."""
    model, reference = llama
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    env = dict(os.environ, VLLM_LOGGING_LEVEL="ERROR", **IN_PROCESS_ENGINE)
    command = [
        VLLM,
        "consolidate",
        "--input",
        str(tmp_path / "sharded"),
        "--validate-load",
    ]
    result = subprocess.run(
        command + ["--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert f"greedy tokens after [1, 2, 3, 4]: {reference}" in result.stdout

    # the command's validation step on an output vLLM cannot build (run
    # here: vLLM refuses the architecture before starting any process)
    config = json.loads((tmp_path / "out/config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (tmp_path / "out/config.json").write_text(json.dumps(config))
    assert validate_load(tmp_path / "out") == 1
    failed = capsys.readouterr().err
    assert "--validate-load: vllm.LLM could not load" in failed
    assert "NoSuchModelForCausalLM" in failed


# ------------------------------------------------------------- bad input


def test_bad_inputs_leave_nothing_that_looks_valid(llama, tmp_path):
    model, _ = llama
    model.save_pretrained(tmp_path / "ok", max_shard_size="100KB")
    (tmp_path / "out").mkdir()
    with pytest.raises(ConsolidateError, match="exists; pass --force"):
        consolidate(tmp_path / "ok", tmp_path / "out")

    missing = tmp_path / "missing"
    shutil.copytree(tmp_path / "ok", missing)
    shard = sorted(missing.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ConsolidateError, match=f"do not exist: {shard.name}"):
        consolidate(missing, tmp_path / "out2")

    truncated = tmp_path / "truncated"
    shutil.copytree(tmp_path / "ok", truncated)
    shard = sorted(truncated.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ConsolidateError, match=f"{shard.name}: cannot read"):
        consolidate(truncated, tmp_path / "out3")
    # nothing half-written beside the outputs
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "missing",
        "ok",
        "out",
        "truncated",
    ]


def test_mixed_steps_are_refused(zero_runs, tmp_path):
    run = tmp_path / "mixed"
    shutil.copytree(zero_runs / "zero2", run)
    name = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shutil.copy(run / "global_step1" / name, run / "global_step2" / name)
    with pytest.raises(
        ConsolidateError,
        match="different training steps "
        r"\(zero_pp_rank_0_mp_rank_00_optim_states.pt: step 2,"
        " zero_pp_rank_1_mp_rank_00_optim_states.pt: step 1",
    ):
        consolidate(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_full_disk_leaves_nothing_behind(llama, tmp_path):
    """A write limit (RLIMIT_FSIZE) stands in for a full disk."""
    model, _ = llama
    model.save_pretrained(tmp_path / "ok")
    program = f"""
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
from vllm.model_executor.model_loader.consolidate import consolidate
consolidate({str(tmp_path / "ok")!r}, {str(tmp_path / "out")!r})
"""
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    assert "ConsolidateError: cannot write" in result.stderr
    assert "File too large" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]


# ------------------------------------------------------------ the command


def test_command_one_checkpoint(zero_runs, tmp_path):
    result = subprocess.run(
        [
            VLLM,
            "consolidate",
            "--input",
            str(zero_runs / "zero2"),
            "--output",
            str(tmp_path / "out"),
            "--dtype",
            "bfloat16",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "deepspeed -> " in result.stdout and "21 tensors" in result.stdout
    assert "note: warning: no tokenizer files" in result.stdout
    tensors = output_tensors(tmp_path / "out")
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())


def test_command_batch(zero_runs, llama, tmp_path, capsys):
    runs = tmp_path / "runs"
    model, _ = llama
    # an HF-Trainer-style run with two checkpoints, a ZeRO run with two
    # steps, a broken run
    for step in (10, 20):
        model.save_pretrained(runs / "trainer" / f"checkpoint-{step}")
    shutil.copytree(zero_runs / "zero1", runs / "zero")
    (runs / "broken").mkdir(parents=True)
    (runs / "broken" / "model.safetensors").write_bytes(b"not a checkpoint")
    command = [
        VLLM,
        "consolidate",
        "--batch",
        "--input-dir",
        str(runs),
        "--output-dir",
        str(tmp_path / "out"),
        "--all-checkpoints",
    ]

    # the dry run through the command's own parser, in this process
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run_batch(parser.parse_args(command[2:] + ["--dry-run"])) == 0
    assert "5 checkpoint(s) would be consolidated" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()

    result = subprocess.run(
        command + ["--continue-on-error"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1  # one failed
    table = result.stdout
    assert "4 succeeded, 1 failed" in table
    for name in ("trainer_step_10", "trainer_step_20", "zero_step_1", "zero_step_2"):
        assert (tmp_path / "out" / name / "config.json").exists(), table
    assert "broken_step_final" in table and "FAILED" in table
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "trainer_step_10",
        "trainer_step_20",
        "zero_step_1",
        "zero_step_2",
    ]
