# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""`vllm serve CKPT_DIR` for a generic model whose checkpoint directory
names its factory, talked to with the `openai` client, and
`LLM(model=CKPT_DIR)` with no register_model call.

The served model is the TorchTitan Qwen3 example with its modeling file
copied into the checkpoint directory (as Hugging Face remote code ships),
served at TP=2 by a real `vllm serve` process on a loopback port."""

import ast
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from tests.conftest import IN_PROCESS_ENGINE, REPO, greedy_recompute

EXAMPLE = REPO / "examples/offline_inference/torchtitan_qwen3"
sys.path.insert(0, str(EXAMPLE))

from tests.models.test_torchtitan_qwen3 import (  # noqa: E402
    SMALL,
    make_tokenizer,
    random_model,
    write_config,
)

ARCH = "ServedTorchTitanQwen3"
FACTORY = "qwen3_torchtitan:build_qwen3"  # a module in the directory
PROMPT_IDS = [5, 17, 99, 3]
MAX_TOKENS = 16
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}Answer:"
    "{% endif %}"
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A directory vLLM can serve alone: config.json naming the factory,
    the factory's module, weights and a tokenizer with a chat template."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("served") / "qwen3-tt"
    write_config(path, ARCH)
    config = json.loads((path / "config.json").read_text())
    config["vllm_model_factory"] = FACTORY
    (path / "config.json").write_text(json.dumps(config, indent=1))
    shutil.copy(EXAMPLE / "model.py", path / "qwen3_torchtitan.py")
    model = random_model()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(path / "model.safetensors"),
    )
    make_tokenizer(path, SMALL.vocab_size)
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = CHAT_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    reference = greedy_recompute(model, PROMPT_IDS, MAX_TOKENS)
    return path, reference


def _vllm_command() -> str:
    return str(Path(sys.executable).parent / "vllm")


def test_factory_named_by_a_checkpoint_needs_trust_remote_code(checkpoint):
    from vllm import LLM

    with pytest.raises(
        Exception, match=f"names the model factory '{FACTORY}'.*--trust-remote-code"
    ):
        LLM(model=str(checkpoint[0]), skip_tokenizer_init=True)


def test_llm_from_the_directory_alone(checkpoint, tmp_path):
    """A fresh process, no register_model: LLM(model=DIR) generates the
    PyTorch module's greedy tokens."""
    path, reference = checkpoint
    script = tmp_path / "generate.py"
    script.write_text(f"""
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM(model={str(path)!r}, trust_remote_code=True, dtype="float32",
              max_model_len=512, gpu_memory_utilization=0.1,
              enforce_eager=True)
    out = llm.generate([{{"prompt_token_ids": {PROMPT_IDS}}}],
                       SamplingParams(max_tokens={MAX_TOKENS},
                                      temperature=0.0, ignore_eos=True))
    print("TOKENS", list(out[0].outputs[0].token_ids))
""")
    env = dict(os.environ, VLLM_LOGGING_LEVEL="ERROR", **IN_PROCESS_ENGINE)
    env.pop("PYTHONPATH", None)  # the factory comes from the directory
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    line = next(
        line for line in result.stdout.splitlines() if line.startswith("TOKENS")
    )
    assert json.loads(line.split(" ", 1)[1]) == reference


def test_registrations_travel_to_ray_workers():
    """vLLM's Ray executor copies the driver's environment variables it
    knows to each Ray worker; the registrations ride in one of them."""
    from vllm import ModelRegistry
    from vllm.ray.ray_env import get_env_vars_to_copy

    ModelRegistry.register_model(
        "TravelsToRay", "tests.models.tiny_decoder:build_tiny_decoder"
    )
    assert "VLLM_MODEL_REGISTRATIONS" in os.environ
    assert "VLLM_MODEL_REGISTRATIONS" in get_env_vars_to_copy()


# ------------------------------------------------------ vllm serve, TP=2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_serve(path: Path, name: str, log: Path, tensor_parallel_size=2):
    """A real `vllm serve` of `path` on a loopback port; yields its URL
    once /health answers."""
    port = _free_port()
    env = dict(
        os.environ,
        VLLM_CPU_OMP_THREADS_BIND="|".join(map(str, range(tensor_parallel_size))),
        VLLM_LOGGING_LEVEL="WARNING",
    )
    env.pop("PYTHONPATH", None)  # the factory comes from the directory
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            [
                _vllm_command(),
                "serve",
                str(path),
                "--trust-remote-code",
                "--tensor-parallel-size",
                str(tensor_parallel_size),
                "--dtype",
                "float32",
                "--max-model-len",
                "512",
                "--gpu-memory-utilization",
                "0.1",
                "--served-model-name",
                name,
                "--enforce-eager",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            cwd=log.parent,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 400
        while True:
            if process.poll() is not None:
                pytest.fail("vllm serve exited:\n" + log.read_text()[-5000:])
            try:
                with urllib.request.urlopen(url + "/health", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(
                        "vllm serve did not become healthy:\n" + log.read_text()[-5000:]
                    )
                time.sleep(2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "serve.log"
    with vllm_serve(checkpoint[0], "qwen3-tt", log) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key="unused")


def test_models_endpoint(client):
    assert [m.id for m in client.models.list().data] == ["qwen3-tt"]


def test_greedy_completion_matches_the_module(client, checkpoint):
    _, reference = checkpoint
    completion = client.completions.create(
        model="qwen3-tt",
        prompt=PROMPT_IDS,
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    assert completion.choices[0].token_ids == reference


def test_streaming_equals_the_whole_answer(client):
    request = dict(
        model="qwen3-tt",
        prompt="TorchTitan trains",
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    whole = client.completions.create(**request).choices[0].text
    pieces = [
        chunk.choices[0].text
        for chunk in client.completions.create(stream=True, **request)
        if chunk.choices
    ]
    assert len(pieces) > 1 and "".join(pieces) == whole


def test_chat_completion_uses_the_tokenizer_template(client, checkpoint):
    from tokenizers import Tokenizer

    chat = client.chat.completions.create(
        model="qwen3-tt",
        max_tokens=8,
        temperature=0.0,
        messages=[{"role": "user", "content": "vLLM serves it"}],
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    choice = chat.choices[0]
    assert choice.message.role == "assistant"
    assert len(choice.token_ids) == 8
    # the prompt is the tokenizer's chat template applied to the message
    tokenizer = Tokenizer.from_file(str(checkpoint[0] / "tokenizer.json"))
    assert tokenizer.decode(chat.prompt_token_ids) == "vLLM serves it\nAnswer:"


def test_logprobs_n_and_stop(client):
    completion = client.completions.create(
        model="qwen3-tt",
        prompt="the same",
        max_tokens=6,
        temperature=1.0,
        n=2,
        logprobs=3,
        seed=7,
        extra_body={"ignore_eos": True},
    )
    assert len(completion.choices) == 2
    for choice in completion.choices:
        top = choice.logprobs.top_logprobs
        assert len(top) == 6 and all(1 <= len(t) <= 4 for t in top)
        assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    greedy = (
        client.completions.create(
            model="qwen3-tt",
            prompt="TorchTitan trains",
            max_tokens=MAX_TOKENS,
            temperature=0.0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .text
    )
    stop = greedy[len(greedy) // 2 : len(greedy) // 2 + 3]
    stopped = client.completions.create(
        model="qwen3-tt",
        prompt="TorchTitan trains",
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == greedy[: greedy.index(stop)]


def test_bad_requests_get_errors_and_the_server_keeps_serving(client, server):
    import openai

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="qwen3-tt", prompt=[5] * 600, max_tokens=2)
    request = urllib.request.Request(
        server + "/v1/completions",
        data=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=30)
    assert error.value.code == 400
    # still serving
    assert (
        client.completions.create(model="qwen3-tt", prompt=PROMPT_IDS, max_tokens=2)
        .choices[0]
        .text
        is not None
    )


def test_online_serving_example(server):
    example = REPO / "examples/online_serving/generic_model_client.py"
    result = subprocess.run(
        [sys.executable, str(example), "--url", server + "/v1", "--model", "qwen3-tt"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "models: ['qwen3-tt']"
    completion = lines[1].split(" -> ", 1)[1]
    # the streamed text is the same greedy completion
    assert lines[2] == "streamed:   " + ast.literal_eval(completion)
    assert lines[3].startswith("chat: ")


# --------------------------------------------- a Megatron-core model


def test_megatron_core_directory_served(tmp_path):
    """A Megatron-core decoder (the ground-truth example's) saved with its
    modeling file: `vllm serve` builds its Megatron layers from
    `parallel_context` and returns the reference's greedy tokens. TP=1:
    the ground-truth test runs Megatron's layers at TP=2, the server above
    serves from a directory at TP=2 (each TP=2 start costs ~20 s more)."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    sys.path.insert(0, str(REPO / "examples/offline_inference"))
    import custom_model_with_megatron as example

    from vllm.model_executor.parallel_context import ParallelContext

    path = tmp_path / "megatron"
    path.mkdir()
    config = example.DecoderConfig()
    dist.init_process_group(
        "gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1
    )
    try:
        world = dist.group.WORLD
        torch.manual_seed(0)
        model = example.MegatronDecoder(
            config,
            ParallelContext(
                tp_group=world, tp_cpu_group=world, device=torch.device("cpu")
            ),
        )
        save_file(
            {
                name: param.detach().contiguous()
                for name, param in model.named_parameters()
            },
            str(path / "model.safetensors"),
        )
        reference = example.reference_greedy(model, PROMPT_IDS, MAX_TOKENS, "cpu")
    finally:
        dist.destroy_process_group()
    example.write_config(
        path,
        config,
        architectures=["ServedMegatronDecoder"],
        vllm_model_factory="megatron_decoder:build_megatron_decoder",
    )
    shutil.copy(
        REPO / "examples/offline_inference/custom_model_with_megatron.py",
        path / "megatron_decoder.py",
    )
    make_tokenizer(path, config.vocab_size)

    with vllm_serve(
        path, "megatron", tmp_path / "serve.log", tensor_parallel_size=1
    ) as url:
        from openai import OpenAI

        client = OpenAI(base_url=url + "/v1", api_key="unused")
        completion = client.completions.create(
            model="megatron",
            prompt=PROMPT_IDS,
            max_tokens=MAX_TOKENS,
            temperature=0.0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
    assert completion.choices[0].token_ids == reference
