# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Tensor and pipeline parallelism from a plain module's `_tp_plan` and
`_pp_plan` (a Forgather-style decoder of plain `nn.Linear` layers, and the
example's plain Llama), and the tools that validate a plan."""

import functools
import subprocess
import sys

import pytest
import torch

from tests.conftest import (
    MAX_TOKENS,
    PROMPTS,
    REPO,
    fused_projections,
    greedy_recompute,
    greedy_tokens,
    logits_and_tokens,
    make_llm,
    push_weights,
    shared_engine,
    shutdown_llm,
    training_forward,
    with_update,
)
from tests.models.forgather_style import (
    ARCH,
    TP_PLAN,
    ForgatherStyleModel,
    build_forgather_style,
    with_plan,
    write_checkpoint,
)
from tests.models.packed_llama import (
    LlamaConfig,
    build_packed_llama,
    packed_llama,
    save_checkpoint,
)
from vllm.model_executor.models.plan_validation import (
    print_model_structure,
    validate_vllm_plans,
)

WRONG_STYLE = dict(
    TP_PLAN, **{"model.layer_stack.layers.*.attention.output_linear": "colwise"}
)
# Every style a plan gives nn.Linear and nn.Embedding layers, old and new
# names: colwise / rowwise attention, a gathered-output MLP input whose
# output the next layer splits again, the LM head gathered.
EVERY_STYLE = dict(
    TP_PLAN,
    **{
        "model.layer_stack.layers.*.feedforward.up_proj": "colwise_rep",
        "model.layer_stack.layers.*.feedforward.down_proj": "rowwise_rep",
        "model.output_decoder": "colwise_gather_output",
    },
)
build_every_style = with_plan(EVERY_STYLE)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("forgather_style")
    return path, write_checkpoint(path)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The PyTorch module's own logits and greedy tokens."""
    _, model = checkpoint
    return (
        training_forward(model, PROMPTS),
        [greedy_recompute(model, p) for p in PROMPTS],
    )


def plan_engine(path, vocab, factory=build_forgather_style, name=None, **kwargs):
    """An engine on the Forgather-style checkpoint, returning raw logits."""
    from vllm import ModelRegistry

    arch = f"{ARCH}_{name or factory.__name__}"
    ModelRegistry.register_model(arch, factory)
    return make_llm(
        path, arch, max_logprobs=vocab, logprobs_mode="raw_logits", **kwargs
    )


def read_engine(llm, vocab):
    """Logits and greedy tokens of PROMPTS, and the module's layout in each
    worker."""
    logits, tokens = logits_and_tokens(llm, PROMPTS, vocab)
    return logits, tokens, llm.apply_model(_layout)


def served(path, vocab, factory=build_forgather_style, **kwargs):
    """`read_engine` of an engine started for this call."""
    llm = plan_engine(path, vocab, factory, **kwargs)
    try:
        return read_engine(llm, vocab)
    finally:
        shutdown_llm(llm)


def _layout(model):
    """Runs in each worker: the local shapes and stage of the module."""
    inner = model.model
    layers = inner.model.layer_stack.layers
    present = [
        i for i, layer in enumerate(layers) if type(layer).__name__ != "PPMissingLayer"
    ]
    attention = next((layers[i].attention for i in present), None)
    return {
        "layers": present,
        "query_shape": (
            tuple(attention.query_linear.weight.shape) if attention else None
        ),
        "local_heads": attention.attn.num_heads if attention else None,
        "params": sum(p.numel() for p in inner.parameters()),
    }


@pytest.fixture(scope="module")
def tp1(checkpoint):
    _, model = checkpoint
    return served(checkpoint[0], model.model.output_decoder.out_features)


@pytest.fixture(scope="module")
def plan_tp2_engine(checkpoint):
    """TP=2 from a plan with every linear and embedding style; shared by
    the parity and weight-push tests (see tests/conftest.py)."""
    vocab = checkpoint[1].model.output_decoder.out_features
    return shared_engine(
        "plan_tp2_engine",
        plan_engine(
            checkpoint[0],
            vocab,
            build_every_style,
            name="every_style",
            tensor_parallel_size=2,
        ),
    )


def _max_diff(a, b):
    return (a - b).abs().max().item() if a.numel() else 0.0


def _assert_same(result, tp1, reference):
    logits, tokens, _ = result
    ref_logits, ref_tokens = reference
    for ours, base, ref in zip(logits, tp1[0], ref_logits):
        assert _max_diff(ours, base) < 1e-4
        assert _max_diff(ours, ref[:-1]) < 1e-4  # ref has the last one too
    assert tokens == tp1[1] == ref_tokens
    assert all(len(t) == MAX_TOKENS for t in tokens)


def test_tp1_matches_the_module(tp1, reference):
    logits, tokens, layout = tp1
    _assert_same(tp1, tp1, reference)
    assert layout[0]["query_shape"] == (256, 128)  # whole at TP=1


def test_tp2_from_plan_matches_tp1(checkpoint, plan_tp2_engine, tp1, reference):
    vocab = checkpoint[1].model.output_decoder.out_features
    result = read_engine(plan_tp2_engine, vocab)
    _assert_same(result, tp1, reference)
    # each rank holds half of the heads, from the plan alone
    for rank in result[2]:
        assert rank["query_shape"] == (128, 128)
        assert rank["local_heads"] == 2
        assert rank["layers"] == [0, 1, 2, 3]


def moved(model, names, seed=1):
    """{name: full tensor} for `names`: the module's values, changed."""
    generator = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    return {
        name: state[name] + 0.05 * torch.randn(state[name].shape, generator=generator)
        for name in names
    }


def assert_push_lands(llm, model, vocab, update, bad_name):
    """Push `update` (full tensors) into the running engine: vLLM's greedy
    tokens and logits are then PyTorch's on the updated module. A push that
    also carries a wrongly shaped `bad_name` raises one error naming it and
    changes nothing. The old values are pushed back at the end."""
    old = {name: model.state_dict()[name].clone() for name in update}
    updated = with_update(model, update)
    loaded = llm.apply_model(functools.partial(push_weights, weights=update))
    try:
        llm.reset_prefix_cache()  # KV computed with the old weights
        logits, tokens = logits_and_tokens(llm, PROMPTS, vocab)
        shape = update[bad_name].shape
        bad = dict(update, **{bad_name: torch.zeros(shape[0] + 1, *shape[1:])})
        with pytest.raises(Exception, match="nothing was changed") as error:
            llm.apply_model(functools.partial(push_weights, weights=bad))
        logits_after_bad, _ = logits_and_tokens(llm, PROMPTS, vocab)
    finally:
        llm.apply_model(functools.partial(push_weights, weights=old))
        llm.reset_prefix_cache()
    restored, restored_tokens = logits_and_tokens(llm, PROMPTS, vocab)

    assert bad_name in str(error.value)
    assert tokens == [greedy_recompute(updated, p) for p in PROMPTS]
    for got, want in zip(logits, training_forward(updated, PROMPTS)):
        assert _max_diff(got, want[:-1]) < 1e-4
    for got, want in zip(logits_after_bad, logits):
        assert _max_diff(got, want) == 0.0
    for got, want in zip(restored, training_forward(model, PROMPTS)):
        assert _max_diff(got, want[:-1]) < 1e-4
    assert restored_tokens == [greedy_recompute(model, p) for p in PROMPTS]
    assert restored_tokens != tokens  # the push changed the model
    return loaded


def test_push_into_every_plan_style_at_tp2(checkpoint, plan_tp2_engine):
    """A trainer's full tensors pushed into layers the plan sharded, one of
    each style, and into the vocabulary-split embedding: each rank cuts
    its shard (issue 19: the update path handed vLLM's weight loaders a
    plain Parameter instead of their parameter class)."""
    _, model = checkpoint
    layer = "model.layer_stack.layers.1"
    update = moved(
        model,
        [
            f"{layer}.attention.query_linear.weight",  # colwise
            f"{layer}.attention.output_linear.weight",  # rowwise
            f"{layer}.feedforward.up_proj.weight",  # colwise_rep
            f"{layer}.feedforward.up_proj.bias",
            f"{layer}.feedforward.down_proj.weight",  # rowwise_rep
            "model.output_decoder.weight",  # colwise_gather_output
            "model.input_encoder.embedding.weight",  # vocabulary-parallel
        ],
    )
    loaded = assert_push_lands(
        plan_tp2_engine,
        model,
        model.model.output_decoder.out_features,
        update,
        bad_name=f"{layer}.feedforward.up_proj.weight",
    )
    assert loaded == [[f"model.{name}" for name in sorted(update)]] * 2
    # each rank fused its shards of the colwise q/k/v (the gathered
    # up_proj is left alone), and query_linear's push landed in its rows
    attention = "model.layer_stack.layers.{}.attention.{}_linear"
    assert (
        fused_projections(plan_tp2_engine)
        == [
            [
                tuple(attention.format(i, p) for p in ("query", "key", "value"))
                for i in range(4)
            ]
        ]
        * 2
    )


def test_pp2_factory_that_builds_its_own_stage(checkpoint, tp1, reference):
    """The opt-in without a plan (SelfStagedModel). (A `_pp_plan` runs in
    the TP=2 x PP=2 Llama below.)"""
    from tests.models.forgather_style import build_self_staged

    vocab = checkpoint[1].model.output_decoder.out_features
    result = served(
        checkpoint[0], vocab, factory=build_self_staged, pipeline_parallel_size=2
    )
    _assert_same(result, tp1, reference)
    first, last = result[2]
    # vLLM's partition rule: 4 layers -> 2 + 2; each stage holds only its
    # own weights (the embedding on the first, the LM head on the last)
    assert (first["layers"], last["layers"]) == ([0, 1], [2, 3])
    whole = sum(p.numel() for p in checkpoint[1].parameters())
    assert first["params"] + last["params"] == whole


def _llama_layout(model):
    """Runs in each worker: what this rank of the plain Llama holds."""
    from vllm.model_executor.models.utils import PPMissingLayer

    inner = model.model
    layers = inner.model.layers
    present = [
        i for i, layer in enumerate(layers) if not isinstance(layer, PPMissingLayer)
    ]
    head = inner.lm_head
    return {
        "layers": present,
        "q_proj": tuple(layers[present[0]].self_attn.q_proj.weight.shape),
        "gate_up_proj": tuple(layers[present[0]].mlp.gate_up_proj.weight.shape),
        "embedding": type(inner.model.embed_tokens).__name__,
        "head": type(head).__name__,
        "head_shape": (tuple(head.weight.shape) if hasattr(head, "weight") else None),
    }


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    """The example's plain Llama (Hugging Face names and transformers 5's
    style names, a `_pp_plan` entry that is the nn.ModuleList itself, gate
    and up packed into one `packed_colwise` projection, lm_head tied to the
    embedding and stored only as the embedding), and an engine serving it
    at TP=2 x PP=2: four workers, compiled."""
    from vllm import ModelRegistry

    torch.manual_seed(0)
    # 511 tokens: vLLM pads the vocabulary to 512, and the padding row is
    # cut from the gathered logits
    model = packed_llama(
        LlamaConfig(
            vocab_size=511,
            hidden_size=128,
            intermediate_size=256,
            tie_word_embeddings=True,
        )
    )
    with torch.no_grad():  # decisive logits
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.08)
    path = tmp_path_factory.mktemp("tied_llama")
    save_checkpoint(model, path)
    ModelRegistry.register_model("PlainLlamaForCausalLM", build_packed_llama)
    return model, shared_engine(
        "tied_llama",
        make_llm(
            path,
            "PlainLlamaForCausalLM",
            tensor_parallel_size=2,
            pipeline_parallel_size=2,
            max_logprobs=511,
            logprobs_mode="raw_logits",
        ),
    )


def test_tied_llama_at_tp2_pp2_matches_the_module(tied_llama):
    """Logits equal the module's own, and the last stage's head shares a
    vocabulary shard loaded from the embedding's tensor."""
    model, llm = tied_llama
    logits, tokens = logits_and_tokens(llm, PROMPTS, 511)
    layout = llm.apply_model(_llama_layout)
    reference = training_forward(model, PROMPTS)
    for ours, ref in zip(logits, reference):
        assert _max_diff(ours, ref[:-1]) < 1e-4
    assert tokens == [greedy_recompute(model, p) for p in PROMPTS]
    # ranks: (PP 0, TP 0), (PP 0, TP 1), (PP 1, TP 0), (PP 1, TP 1)
    assert [rank["layers"] for rank in layout] == [[0, 1]] * 2 + [[2, 3]] * 2
    assert all(rank["q_proj"] == (128, 128) for rank in layout)
    # half of the gate and half of the up features on each rank
    assert all(rank["gate_up_proj"] == (256, 128) for rank in layout)
    assert [rank["embedding"] for rank in layout] == (
        ["VocabParallelEmbedding"] * 2 + ["PPMissingLayer"] * 2
    )
    assert [rank["head"] for rank in layout] == (
        ["PPMissingLayer"] * 2 + ["VocabParallelTiedHead"] * 2
    )
    assert layout[-1]["head_shape"] == (256, 128)  # half the padded vocab


def test_push_at_tp2_pp2(tied_llama):
    """Pushes into both stages of the plan-sharded Llama: the packed
    gate/up projection, colwise and rowwise layers, and the tied embedding,
    which reaches the first stage's embedding and the last stage's
    vocabulary-split head under its one name."""
    model, llm = tied_llama
    update = moved(
        model,
        [
            "model.layers.0.self_attn.k_proj.weight",  # colwise, stage 0
            "model.layers.1.mlp.down_proj.weight",  # rowwise, stage 0
            "model.layers.2.mlp.gate_up_proj.weight",  # packed_colwise, stage 1
            "model.layers.3.self_attn.o_proj.weight",  # rowwise, stage 1
            "model.embed_tokens.weight",  # vocabulary-parallel, tied head
        ],
    )
    loaded = assert_push_lands(
        llm, model, 511, update, bad_name="model.layers.2.mlp.gate_up_proj.weight"
    )
    first_stage = [
        "model.model.embed_tokens.weight",
        "model.model.layers.0.self_attn.k_proj.weight",
        "model.model.layers.1.mlp.down_proj.weight",
    ]
    last_stage = [
        "model.lm_head.weight",
        "model.model.layers.2.mlp.gate_up_proj.weight",
        "model.model.layers.3.self_attn.o_proj.weight",
    ]
    assert loaded == [first_stage] * 2 + [last_stage] * 2


def test_wrong_style_is_refused(capfd):
    """`colwise` where `rowwise` belongs: the validator reports it, and
    sharding at TP=2 (what each worker runs as it builds the model) refuses
    the plan before changing anything. (That an error raised while the
    model is built fails the engine's start with its message is
    test_bad_factories.py's.)"""
    from vllm.model_executor.models.parallel_plan import (
        ParallelPlanError,
        shard_by_tp_plan,
    )
    from vllm.model_executor.parallel_context import ParallelContext

    model = ForgatherStyleModel()
    assert not validate_vllm_plans(model, tp_plan=WRONG_STYLE)
    report = capfd.readouterr().out
    assert "attention.output_linear is 'colwise'" in report
    assert "must be 'rowwise'" in report

    before = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(ParallelPlanError) as failure:
        shard_by_tp_plan(
            model, WRONG_STYLE, ParallelContext(tp_size=2), "ForgatherWrongStyle"
        )
    assert "tensor-parallel plan of ForgatherWrongStyle does not fit" in str(
        failure.value
    )
    assert "must be 'rowwise'" in str(failure.value)
    assert {name: type(m) for name, m in model.named_modules()} == before


def test_pp_without_plan_says_what_to_add(checkpoint, engine_output):
    from vllm import ModelRegistry

    ModelRegistry.register_model("ForgatherNoPPPlan", with_plan(TP_PLAN, pp_plan={}))
    with pytest.raises(Exception) as failure:  # the engine fails to start
        make_llm(checkpoint[0], "ForgatherNoPPPlan", pipeline_parallel_size=2)
    errors = engine_output(failure)
    assert "cannot run with pipeline_parallel_size=2" in errors
    assert "_pp_plan" in errors and "make_empty_intermediate_tensors" in errors


# ------------------------------------------------------- validation tools


def test_validator_reports_what_matched_and_what_is_wrong(capsys):
    model = ForgatherStyleModel()
    assert validate_vllm_plans(model)
    out = capsys.readouterr().out
    assert (
        "'model.layer_stack.layers.*.attention.query_linear' -> colwise:"
        " 4 module(s) (4 Linear), 4 parameter(s)"
    ) in out
    assert "valid: 0 error(s)" in out
    # TP=8 does not divide 4 heads: a warning, an error when strict
    assert (
        "TP=8 does not divide model.layer_stack.layers.*.attention.attn"
        " num_heads (4)" in out
    )
    assert not validate_vllm_plans(model, strict=True)
    capsys.readouterr()

    plan = dict(TP_PLAN)
    plan["model.layer_stack.layers.*.attention.query_proj"] = plan.pop(
        "model.layer_stack.layers.*.attention.query_linear"
    )
    plan["model.layer_stack"] = "colwise"
    pp_plan = {
        "model.input_encoder": (["input_ids"], ["hidden_states"]),
        "model.layer_stak": (["hidden_states"], ["hidden_states"]),
        "model.output_decoder": (["hidden"], ["logits"]),
    }
    assert not validate_vllm_plans(model, tp_plan=plan, pp_plan=pp_plan)
    out = capsys.readouterr().out
    assert (
        "'model.layer_stack.layers.*.attention.query_proj' (colwise) "
        "matches no module; nearest: "
        "model.layer_stack.layers.*.attention.query_linear"
    ) in out
    assert "model.layer_stack (LayerStack): style 'colwise' fits nn.Linear" in out
    assert (
        "4 linear/embedding layer(s) no pattern covers stay whole on "
        "every rank: model.layer_stack.layers.*.attention.query_linear"
    ) in out
    assert (
        "pipeline module 'model.layer_stak' does not exist; nearest: "
        "model.layer_stack" in out
    )
    assert (
        "'model.output_decoder' takes 'hidden', which no earlier module outputs" in out
    )
    assert "needs exactly one module that is or holds the nn.ModuleList" in out


def test_tied_lm_head_shares_the_embedding_shard(capsys):
    """An LM head tied to an embedding the plan splits by vocabulary shares
    its shard; a tie the plan would cut into separate weights is an
    error."""
    model = ForgatherStyleModel()
    model.model.output_decoder.weight = model.model.input_encoder.embedding.weight
    assert validate_vllm_plans(model)
    out = capsys.readouterr().out
    assert (
        "model.output_decoder is tied to model.input_encoder.embedding: "
        "it computes the logits of the embedding's vocabulary shard"
    ) in out
    # left out of the plan, the head still follows its embedding
    plan = {
        pattern: style
        for pattern, style in TP_PLAN.items()
        if pattern != "model.output_decoder"
    }
    assert validate_vllm_plans(model, tp_plan=plan)
    assert "no pattern covers" not in capsys.readouterr().out

    # no entry for the embedding (Hugging Face's plans): split with the head
    plan = {
        pattern: style
        for pattern, style in TP_PLAN.items()
        if pattern != "model.input_encoder.embedding"
    }
    assert validate_vllm_plans(model, tp_plan=plan)
    assert (
        "model.output_decoder is tied to model.input_encoder.embedding"
        in capsys.readouterr().out
    )

    # the embedding whole, the head split: the tie would be cut
    plan = dict(TP_PLAN, **{"model.input_encoder.embedding": "replicate"})
    assert not validate_vllm_plans(model, tp_plan=plan)
    out = capsys.readouterr().out
    assert (
        "model.output_decoder shares its weight with "
        "model.input_encoder.embedding (tied), and the plan shards it "
        "('colwise_rep')"
    ) in out
    assert "Split the embedding by vocabulary ('rowwise')" in out


def test_transformers_5_style_names(capsys):
    """transformers 5's names (`colwise_gather_output`, `packed_colwise`,
    styles that keep a module whole) are taken; a packed projection must
    split in two halves; an unknown style lists those that exist."""
    model = packed_llama(LlamaConfig(vocab_size=511))
    plan = dict(
        model._tp_plan,
        **{
            "model.norm": "sequence_parallel",
            "model.layers.*.input_layernorm": "replicated_with_grad_allreduce",
        },
    )
    plan["model.embed_tokens"] = "embedding_rowwise"
    assert validate_vllm_plans(model, tp_plan=plan)
    out = capsys.readouterr().out
    assert "'model.layers.*.mlp.gate_up_proj' -> packed_colwise: 4 module(s)" in out
    assert "lm_head is tied" not in out and "valid: 0 error(s)" in out

    plan.update(
        {
            "lm_head": "packed_colwise",
            "model.layers.*.self_attn.o_proj": "local_rowwise",
        }
    )
    assert not validate_vllm_plans(model, tp_plan=plan)
    out = capsys.readouterr().out
    assert (
        "lm_head is 'packed_colwise' but its 511 output features do not "
        "split into two packed halves"
    ) in out
    assert (
        "model.layers.*.self_attn.o_proj (nn.Linear): unknown style "
        "'local_rowwise'; linear layers take colwise, rowwise, "
        "colwise_rep, colwise_gather_output"
    ) in out


def test_print_model_structure(capsys):
    print_model_structure(ForgatherStyleModel(), max_depth=4, show_params=True)
    out = capsys.readouterr().out
    assert "embedding: Embedding(512 x 128)  [65,536 params]" in out
    assert "0..3: 4 x PreLNLayer, each as 0:" in out
    assert "output_decoder: Linear(128 -> 512)" in out
    assert ".weight (512, 128) torch.float32" in out
    assert "query_linear" not in out  # below max_depth


def test_validation_cli(checkpoint, tmp_path, capsys):
    """`python -m` runs it (one run: each imports vLLM, ~12 s here); a
    wrong plan file fails through the same `main` in this process."""
    from vllm.model_executor.models.plan_validation import main

    arguments = [
        "tests.models.forgather_style:build_forgather_style",
        "--model",
        str(checkpoint[0]),
    ]
    command = [sys.executable, "-m", "vllm.model_executor.models.plan_validation"]
    ok = subprocess.run(command + arguments, capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "layer_stack: LayerStack" in ok.stdout
    assert "valid: 0 error(s)" in ok.stdout
    wrong = tmp_path / "plan.json"
    wrong.write_text(__import__("json").dumps(WRONG_STYLE))
    assert main(arguments + ["--tp-plan", str(wrong)]) == 1
    report = capsys.readouterr().out
    assert "INVALID" in report and "must be 'rowwise'" in report


def test_training_path_is_unchanged_by_the_plans(checkpoint):
    """The module still trains as written: the plans are only read."""
    _, model = checkpoint
    clone = ForgatherStyleModel()
    clone.load_state_dict(model.state_dict())
    ids = torch.tensor(PROMPTS[4])
    logits = clone.compute_logits(clone(ids, torch.arange(len(ids))))
    logits.sum().backward()
    assert (
        clone.model.layer_stack.layers[0].attention.query_linear.weight.grad is not None
    )


def test_global_head_count_reshape_names_the_module(checkpoint, engine_output):
    """Code that reshapes with the global head count fails under TP=2 with
    an error that names the module and the fix."""
    from tests.models.forgather_style import build_with_global_heads
    from vllm import ModelRegistry

    ModelRegistry.register_model("ForgatherGlobalHeads", build_with_global_heads)
    # eager: the first forward is the first request's
    llm = make_llm(checkpoint[0], "ForgatherGlobalHeads", tensor_parallel_size=2)
    try:
        with pytest.raises(Exception) as failure:
            greedy_tokens(llm, PROMPTS[:1], max_tokens=1)
    finally:
        shutdown_llm(llm)
    errors = engine_output(failure)
    assert (
        "model.layer_stack.layers.0.attention (model "
        "'ForgatherGlobalHeads') failed after tensor-parallel sharding"
    ) in errors
    assert "not a hard-coded global one" in errors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_push_into_plan_layers_at_tp1(checkpoint):
    """On one GPU the plan shards nothing and the layers stay plain
    `nn.Linear`: a push into each layer a plan would shard lands exactly
    (the engine's parameters read back equal the pushed values in its
    dtype), changes the greedy tokens, and pushing the old values back
    restores them; a wrongly shaped push changes nothing."""
    path, model = checkpoint
    vocab = model.model.output_decoder.out_features
    layer = "model.layer_stack.layers.1"
    update = moved(
        model,
        [
            f"{layer}.attention.query_linear.weight",
            f"{layer}.attention.output_linear.weight",
            f"{layer}.feedforward.up_proj.weight",
            f"{layer}.feedforward.down_proj.weight",
            "model.output_decoder.weight",
            "model.input_encoder.embedding.weight",
        ],
    )
    old = {name: model.state_dict()[name] for name in update}
    llm = plan_engine(
        path,
        vocab,
        build_every_style,
        name="every_style",
        dtype="bfloat16",
        enforce_eager=True,
    )
    try:
        before = greedy_tokens(llm)
        llm.apply_model(functools.partial(push_weights, weights=update))
        llm.reset_prefix_cache()
        after = greedy_tokens(llm)
        read_back = llm.apply_model(
            functools.partial(_read_parameters, names=sorted(update))
        )[0]
        bad = dict(
            update, **{f"{layer}.feedforward.up_proj.weight": torch.zeros(257, 128)}
        )
        with pytest.raises(Exception, match="nothing was changed"):
            llm.apply_model(functools.partial(push_weights, weights=bad))
        after_bad = llm.apply_model(
            functools.partial(_read_parameters, names=sorted(update))
        )[0]
        llm.apply_model(functools.partial(push_weights, weights=old))
        llm.reset_prefix_cache()
        restored = greedy_tokens(llm)
    finally:
        shutdown_llm(llm)
    for name, value in update.items():
        assert torch.equal(read_back[name], value.to(torch.bfloat16))
        assert torch.equal(after_bad[name], read_back[name])
    assert after != before and restored == before


def _read_parameters(model, names):
    """Runs in the worker: the named parameters, on the CPU."""
    params = dict(model.model.named_parameters())
    return {name: params[name].detach().cpu() for name in names}
