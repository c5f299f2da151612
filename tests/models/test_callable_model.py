# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Every registration form runs through the real engine (a spawned
worker) and gives the greedy tokens of an independent PyTorch run of the
same module."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import (
    IN_PROCESS_ENGINE,
    MAX_TOKENS,
    PROMPTS,
    REPO,
    greedy_tokens,
    run_llm,
    training_forward,
)
from tests.models.tiny_decoder import (
    TinyConfig,
    TinyDecoder,
    TinyDecoderForCausalLM,
    build_tiny_decoder,
)
from vllm import ModelRegistry


class CallableFactory:
    """A callable object as a factory."""

    def __call__(self, vllm_config, parallel_context):
        return build_tiny_decoder(vllm_config, parallel_context)


def factory_with_options(vllm_config, parallel_context, *, scale):
    assert scale == 1.0
    return build_tiny_decoder(vllm_config, parallel_context)


def make_closure():
    captured = TinyConfig

    def build(vllm_config, parallel_context):
        config = captured.from_hf(vllm_config.model_config.hf_config)
        return TinyDecoder(config, parallel_context)

    return build


# Each form is pickled differently on its way to vLLM's spawned processes
# (by reference, by value, with captured state). One engine with a spawned
# worker serves the closure; in that worker, every other form, as it
# arrived there, builds the module (`_build_each_form`). A lambda runs in
# the shared TP=2 engine (tests/conftest.py), a function in the shared
# TP=1 one.
REGISTRATIONS = {
    "closure": make_closure(),
    "callable_object": CallableFactory(),
    "partial": functools.partial(factory_with_options, scale=1.0),
}
SCRIPT = Path(__file__).parent / "scripts" / "generate_from_script_dir.py"


def test_function_factory(tiny_engine, tiny_reference_tokens):
    """The shared engine's registration: a module-level function."""
    tokens = greedy_tokens(tiny_engine)
    assert tokens == tiny_reference_tokens
    assert all(len(t) == MAX_TOKENS for t in tokens)
    # a random model still has to say something other than one token
    assert len({tok for seq in tokens for tok in seq}) > 4


@pytest.mark.parametrize(
    "model_cls",
    [TinyDecoderForCausalLM, "tests.models.tiny_decoder:TinyDecoderForCausalLM"],
    ids=["class", "module_string_class"],
)
def test_class_registration(model_cls):
    """Stock vLLM registrations still resolve to the class itself (the
    lazily imported form in a spawned worker too: see below)."""
    ModelRegistry.register_model("TinyAsClass", model_cls)
    assert ModelRegistry.models["TinyAsClass"].load_model_cls() is (
        TinyDecoderForCausalLM
    )


def _build_each_form(model, archs, hf_config, checkpoint, prompt):
    """Runs in the spawned worker: each registration, as it arrived in this
    process, resolves; each factory builds the module from the engine's
    `parallel_context`, whose training forward on the checkpoint's weights
    gives `prompt`'s logits. (The factories read only the Hugging Face
    config from `vllm_config`.)"""
    from types import SimpleNamespace

    from safetensors.torch import load_file

    from vllm.model_executor.layers.trainable_attention import pack_sequences

    vllm_config = SimpleNamespace(
        model_config=SimpleNamespace(hf_config=SimpleNamespace(**hf_config))
    )
    input_ids, positions, cu_seqlens = pack_sequences([prompt], torch.device("cpu"))
    results = {}
    for arch in archs:
        resolved = ModelRegistry.models[arch].load_model_cls()
        factory = getattr(resolved, "model_factory", None)
        if factory is None:  # a model class, registered by name
            results[arch] = resolved.__qualname__
            continue
        built = factory(vllm_config, model.parallel_context)
        built.load_state_dict(load_file(checkpoint))
        with torch.no_grad():
            hidden = built(input_ids, positions, cu_seqlens=cu_seqlens)
            results[arch] = built.compute_logits(hidden).tolist()
    return results


def test_every_registration_form_reaches_spawned_worker(
    tiny_checkpoint, tiny_reference_tokens
):
    path, model = tiny_checkpoint
    for form, factory in REGISTRATIONS.items():
        ModelRegistry.register_model(f"Tiny_{form}", factory)
    ModelRegistry.register_model(
        "TinyByModuleString", "tests.models.tiny_decoder:TinyDecoderForCausalLM"
    )
    archs = [f"Tiny_{form}" for form in REGISTRATIONS] + ["TinyByModuleString"]
    hf_config = json.loads((path / "config.json").read_text())
    prompt = PROMPTS[2]
    tokens, (built,) = run_llm(
        path,
        "Tiny_closure",
        spawn_workers=True,
        inspect=functools.partial(
            _build_each_form,
            archs=archs,
            hf_config=hf_config,
            checkpoint=str(path / "model.safetensors"),
            prompt=prompt,
        ),
    )
    assert tokens == tiny_reference_tokens
    reference = training_forward(model, [prompt])[0]
    for form in REGISTRATIONS:
        logits = torch.tensor(built[f"Tiny_{form}"], dtype=torch.float64)
        assert (logits - reference).abs().max() < 1e-5, form
    assert built["TinyByModuleString"] == TinyDecoderForCausalLM.__qualname__


def test_module_string_from_script_directory(
    tiny_checkpoint, tiny_reference_tokens, tmp_path
):
    """ "script_dir_factories:build" names a module that only the script's
    directory holds; the script runs from another working directory, so
    vLLM's inspection subprocess and spawned processes must get the
    parent's import path to find it."""
    path, _ = tiny_checkpoint
    # not the script's dir; the engine core in the script's process, its
    # worker spawned (IN_PROCESS_ENGINE with the script's "mp" executor)
    env = dict(os.environ, PYTHONPATH=str(REPO), **IN_PROCESS_ENGINE)
    assert generate_in_script(SCRIPT, path, tmp_path, env) == (tiny_reference_tokens)


def generate_in_script(script: Path, model_dir, cwd, env) -> list:
    """The greedy tokens a script prints ("TOKENS [...]") for PROMPTS."""
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            str(model_dir),
            json.dumps(PROMPTS),
            str(MAX_TOKENS),
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    line = next(
        line for line in result.stdout.splitlines() if line.startswith("TOKENS ")
    )
    return json.loads(line.removeprefix("TOKENS "))


def _shard_info(model):
    """Runs in each worker: what the factory built there."""
    layer = model.model.layers[0]
    return (
        model.parallel_context.tp_rank,
        model.parallel_context.tp_size,
        list(layer.attn.q_proj.weight.shape),
        list(layer.mlp.down_proj.weight.shape),
    )


def test_lambda_tensor_parallel_matches_reference(
    tiny_engine_tp2, tiny_reference_tokens
):
    config = TinyConfig()
    assert greedy_tokens(tiny_engine_tp2) == tiny_reference_tokens
    shards = tiny_engine_tp2.apply_model(_shard_info)
    q_rows = config.num_attention_heads * config.head_dim // 2
    assert sorted(list(s) for s in shards) == [
        [
            rank,
            2,
            [q_rows, config.hidden_size],
            [config.hidden_size, config.intermediate_size // 2],
        ]
        for rank in (0, 1)
    ]


def test_registration_arriving_after_import_is_adopted(tmp_path, monkeypatch):
    """A Ray worker imports vLLM before vLLM's Ray executor copies the
    driver's environment into it; the registration that arrives then is
    adopted when its architecture is first looked up. (This process built
    vLLM's registry long before, as such a worker has.)"""
    from tests.models.tiny_decoder import build_tiny_decoder, write_checkpoint
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.models.callable_model import CallableModelWrapper
    from vllm.model_executor.models.registry_propagation import (
        ENV_VAR,
        propagate_registration,
    )

    write_checkpoint(tmp_path / "model", arch="TinyArrivesLate")
    monkeypatch.delenv(ENV_VAR, raising=False)  # restored afterwards
    propagate_registration(
        "TinyArrivesLate",
        lambda vllm_config, parallel_context: build_tiny_decoder(
            vllm_config, parallel_context
        ),
    )
    payload = os.environ[ENV_VAR]
    monkeypatch.delenv(ENV_VAR)
    arguments = EngineArgs(model=str(tmp_path / "model"), skip_tokenizer_init=True)

    with pytest.raises(Exception, match="TinyArrivesLate"):  # not arrived
        arguments.create_model_config()
    monkeypatch.setenv(ENV_VAR, payload)  # what vLLM's Ray executor does
    config = arguments.create_model_config()
    model_cls, arch = ModelRegistry.resolve_model_cls(config.architectures, config)
    assert arch == "TinyArrivesLate"
    assert issubclass(model_cls, CallableModelWrapper)


PLUGIN_MODULE = """
from vllm import ModelRegistry


def register():  # vLLM calls it in every process it starts
    ModelRegistry.register_model("TinyFromPlugin",
                                 "tests.models.tiny_decoder:build_tiny_decoder")
"""

GENERATE_WITHOUT_REGISTERING = """
import json, sys
from vllm import LLM, SamplingParams

if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], skip_tokenizer_init=True, dtype="float32",
              hf_overrides={"architectures": ["TinyFromPlugin"]},
              gpu_memory_utilization=0.1, max_model_len=512, seed=0,
              enforce_eager=True)
    outputs = llm.generate(
        [{"prompt_token_ids": p} for p in json.loads(sys.argv[2])],
        SamplingParams(max_tokens=int(sys.argv[3]), temperature=0.0,
                       ignore_eos=True, detokenize=False), use_tqdm=False)
    print("TOKENS " + json.dumps([list(o.outputs[0].token_ids)
                                  for o in outputs]))
"""


def test_installed_package_registers_through_vllm_plugin(
    tiny_checkpoint, tiny_reference_tokens, tmp_path
):
    """An installed package registers its factory from vLLM's
    `vllm.general_plugins` entry point; a script that never calls
    register_model serves it. The package is "installed" as pip leaves it:
    its module and a .dist-info with entry_points.txt on the import path."""
    path, _ = tiny_checkpoint
    site = tmp_path / "site-packages"
    (site / "tiny_plugin_models").mkdir(parents=True)
    (site / "tiny_plugin_models/__init__.py").write_text(PLUGIN_MODULE)
    dist_info = site / "tiny_plugin_models-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: tiny-plugin-models\nVersion: 0.1\n"
    )
    (dist_info / "entry_points.txt").write_text(
        "[vllm.general_plugins]\ntiny_models = tiny_plugin_models:register\n"
    )
    script = tmp_path / "generate.py"
    script.write_text(GENERATE_WITHOUT_REGISTERING)
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(site), str(REPO)]),
        VLLM_LOGGING_LEVEL="ERROR",
        **IN_PROCESS_ENGINE,  # and its worker: the script-directory test spawns
    )
    env.pop("VLLM_MODEL_REGISTRATIONS", None)
    env.pop("VLLM_PLUGINS", None)  # every installed plugin loads
    assert generate_in_script(script, path, tmp_path, env) == (tiny_reference_tokens)
