# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Tensor and pipeline parallelism for plain PyTorch modules, from the
declarative plans their classes carry (the Hugging Face convention):

    _tp_plan = {"model.layers.*.attn.q_proj": "colwise", ...}
    _pp_plan = {"model.embed": (["input_ids"], ["hidden_states"]),
                "model.layers": (["hidden_states"], ["hidden_states"]),
                "model.head": (["hidden_states"], ["logits"])}
    _no_split_modules = ["DecoderLayer"]

TP plan keys are module names in which `*` stands for one name component
(a layer index). Each matched `nn.Linear` becomes the vLLM parallel linear
layer of its style, through the same `replace_linear_class` that vLLM's
Transformers modeling backend applies `base_model_tp_plan` with; a matched
`nn.Embedding` becomes a `VocabParallelEmbedding`. Unmatched layers stay
whole on every rank, except an LM head tied to a vocabulary-split
embedding: it computes the logits of the embedding's shard of the
vocabulary and gathers them (`VocabParallelTiedHead`), as vLLM's
`ParallelLMHead.tie_weights` does.

PP plan keys are the modules a forward pass runs, in order, with the names
of their inputs and outputs. Exactly one of them holds the layer stack (an
`nn.ModuleList`, or a module with one; a list runs its layers in turn, each
taking the entry's inputs with the previous layer's output as the first):
vLLM's layer-partition rule (`get_pp_indices`, `VLLM_PP_LAYER_PARTITION`)
gives each stage a contiguous run of its layers, the modules before it run
on the first stage and those after it on the last (so do the layer-stack
module's other children, by their registration order: a final norm
registered after the layers runs on the last stage). Layers are never split
inside, so `_no_split_modules` holds whole; a plan that would split one is
refused. Everything a stage does not run becomes a `PPMissingLayer`, so
each stage holds and loads only its own weights; a weight tied across
stages (embedding and LM head) is loaded on each stage under whichever of
its names the checkpoint has (`stage_aliases`).
"""

import functools
import re
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from vllm.model_executor.layers.trainable_attention import TrainableFlashAttention
from vllm.model_executor.parallel_context import ParallelContext

# Hugging Face's plan styles for nn.Linear -> vLLM's (`replace_linear_class`).
# transformers 5 renamed colwise_rep and rowwise_rep; both names are taken.
LINEAR_STYLES = {
    "colwise": "colwise",  # output features split, output stays sharded
    "rowwise": "rowwise",  # input features split, output all-reduced
    "colwise_rep": "colwise_gather_output",  # output gathered on every rank
    "colwise_gather_output": "colwise_gather_output",
    "rowwise_rep": "rowwise_split_input",  # full input, split on each rank
    "rowwise_split_input": "rowwise_split_input",
}
GATHERED_STYLES = ("colwise_rep", "colwise_gather_output")
# A fused [gate; up] projection: each half split by output features, as
# vLLM's MergedColumnParallelLinear does.
PACKED_COLWISE = "packed_colwise"
# Split by vocabulary (the embedding's rows).
EMBEDDING_STYLES = ("rowwise", "embedding_rowwise", "vocab")
# Whole on every rank. Sequence parallelism splits activations, not
# weights: in inference its modules simply run whole.
REPLICATED_STYLES = ("replicate", "replicated_with_grad_allreduce", "sequence_parallel")
# Inputs vLLM provides to a pipeline plan's first module; any other name
# a module asks for that no earlier module produced (an attention mask)
# is passed as None: vLLM tracks the sequences itself.
ENGINE_INPUTS = ("input_ids", "positions", "inputs_embeds")


class ParallelPlanError(ValueError):
    """A parallelism plan that does not fit its module."""


def get_plan(model: nn.Module, kind: str):
    """The module's `_tp_plan` / `_pp_plan` (or Hugging Face's
    `base_model_tp_plan` / `base_model_pp_plan`), or None."""
    for attribute in (f"_{kind}_plan", f"base_model_{kind}_plan"):
        plan = getattr(model, attribute, None)
        if plan:
            return dict(plan)
    return None


def pattern_regex(pattern: str) -> re.Pattern:
    """A plan key as a regex over module names: `*` is one component."""
    return re.compile(
        r"[^.]+".join(re.escape(part) for part in pattern.split("*")) + r"\Z"
    )


def match_tp_plan(
    model: nn.Module, tp_plan: dict[str, str]
) -> dict[str, tuple[str, str]]:
    """{module name: (pattern, style)} for every module a pattern matches;
    the first matching pattern wins. An embedding without an entry whose
    weight an LM head shares, and the plan gathers that head's output (as
    Hugging Face's plans do for `lm_head`), is split by vocabulary: a tie
    cannot be half sharded."""
    compiled = [
        (pattern, pattern_regex(pattern), style) for pattern, style in tp_plan.items()
    ]
    matches = {}
    for name, _ in model.named_modules():
        for pattern, regex, style in compiled:
            if regex.match(name):
                matches[name] = (pattern, style)
                break
    embeddings = {
        id(module.weight): name
        for name, module in model.named_modules()
        if isinstance(module, nn.Embedding) and name not in matches
    }
    for name, (_, style) in list(matches.items()):
        module = model.get_submodule(name)
        tied = embeddings.get(id(getattr(module, "weight", None)))
        if tied is not None and style in GATHERED_STYLES:
            matches[tied] = (f"(tied to {name})", "rowwise")
    return matches


# ------------------------------------------------------------------ TP


def shard_by_tp_plan(
    model: nn.Module,
    tp_plan: dict[str, str],
    parallel_context: ParallelContext,
    model_name: str = "model",
) -> int:
    """Replace the layers `tp_plan` names by vLLM's parallel layers and set
    the local head count of the `TrainableFlashAttention` modules beside
    column-sharded projections. Returns how many layers were replaced."""
    # imported here: vLLM's parallel layers import the model registry
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear
    from vllm.model_executor.layers.plain_linear import PlainLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        VocabParallelEmbedding,
    )
    from vllm.model_executor.models.transformers.utils import replace_linear_class

    tp_size = parallel_context.tp_size
    matches = match_tp_plan(model, tp_plan)
    problems = [
        problem
        for problem in plan_style_problems(model, matches)
        if problem.startswith("error")
    ]
    problems += tp_size_problems(model, matches, [tp_size])
    if problems:
        raise ParallelPlanError(
            f"The tensor-parallel plan of {model_name} does not fit it at "
            f"TP={tp_size}:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\nCheck it with validate_vllm_plans(model) or `python -m "
            "vllm.model_executor.models.plan_validation`."
        )
    tied_heads = tied_vocab_heads(model, matches)
    replaced = 0
    sharded_parents = set()
    for name, (_, style) in matches.items():
        module = model.get_submodule(name)
        if name in tied_heads or style in REPLICATED_STYLES:
            continue  # a tied head is replaced below, once its embedding is
        if isinstance(module, nn.Linear):
            if style == PACKED_COLWISE:
                new = MergedColumnParallelLinear(
                    module.in_features,
                    [module.out_features // 2] * 2,
                    bias=module.bias is not None,
                    return_bias=False,
                    prefix=name,
                )
            else:
                new = replace_linear_class(module, LINEAR_STYLES[style], prefix=name)
            # keeps the weight after prepacking, for trainer weight updates
            new.quant_method = PlainLinearMethod()
            if style == "colwise":
                sharded_parents.add(name.rpartition(".")[0])
        elif isinstance(module, nn.Embedding) and style in EMBEDDING_STYLES:
            new = VocabParallelEmbedding(
                module.num_embeddings,
                module.embedding_dim,
                params_dtype=module.weight.dtype,
                prefix=name,
            )
        else:
            continue
        _set_submodule(model, name, new)
        replaced += 1
    for head_name, embedding_name in tied_heads.items():
        vocab_size = model.get_submodule(head_name).out_features
        _set_submodule(
            model,
            head_name,
            VocabParallelTiedHead(model.get_submodule(embedding_name), vocab_size),
        )
        replaced += 1
    for name, module in model.named_modules():
        if (
            isinstance(module, TrainableFlashAttention)
            and name.rpartition(".")[0] in sharded_parents
        ):
            module.num_heads //= tp_size
            module.num_kv_heads //= tp_size
    return replaced


class VocabParallelTiedHead(nn.Module):
    """An LM head that shares a `VocabParallelEmbedding`'s weight: each rank
    computes the logits of its shard of the vocabulary, and the shards are
    gathered (the vocabulary's padding cut off)."""

    def __init__(self, embedding: nn.Module, vocab_size: int) -> None:
        from vllm.distributed import tensor_model_parallel_all_gather

        super().__init__()
        self.weight = embedding.weight  # the same parameter, loaded once
        self.vocab_size = vocab_size
        self.all_gather = tensor_model_parallel_all_gather

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = nn.functional.linear(hidden_states, self.weight)
        return self.all_gather(logits)[..., : self.vocab_size]


def tied_vocab_heads(model: nn.Module, matches: dict) -> dict[str, str]:
    """{LM head name: embedding name} for bias-free `nn.Linear` heads that
    share the weight of an embedding the plan splits by vocabulary, where
    the plan gathers the head's output (`colwise_rep`) or leaves it out."""
    embeddings = {
        id(module.weight): name
        for name, module in model.named_modules()
        if isinstance(module, nn.Embedding)
        and matches.get(name, (None, None))[1] in EMBEDDING_STYLES
    }
    return {
        name: embeddings[id(module.weight)]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and module.bias is None
        and id(module.weight) in embeddings
        and matches.get(name, (None, "colwise_rep"))[1] in GATHERED_STYLES
    }


def plan_style_problems(model: nn.Module, matches: dict) -> list[str]:
    """ "error: ..." for styles that do not fit their layer, and for a
    colwise layer that closes a colwise pair (it must be rowwise).
    `matches` is `match_tp_plan`'s."""
    problems = []
    for name, (_, style) in matches.items():
        module = model.get_submodule(name)
        if style in REPLICATED_STYLES:
            continue
        if isinstance(module, nn.Linear):
            styles = [*LINEAR_STYLES, PACKED_COLWISE, *REPLICATED_STYLES]
            if style not in styles:
                problems.append(
                    f"error: {generic_name(name)} (nn.Linear): unknown "
                    f"style '{style}'; linear layers take "
                    f"{', '.join(styles)}"
                )
            elif style == PACKED_COLWISE and module.out_features % 2:
                problems.append(
                    f"error: {generic_name(name)} is '{PACKED_COLWISE}' but "
                    f"its {module.out_features} output features do not "
                    "split into two packed halves"
                )
        elif isinstance(module, nn.Embedding):
            if style not in EMBEDDING_STYLES:
                problems.append(
                    f"error: {generic_name(name)} (nn.Embedding): style "
                    f"'{style}' does not fit an embedding; use 'rowwise' "
                    "(split by vocabulary) or 'replicate'"
                )
        else:
            problems.append(
                f"error: {generic_name(name)} ({type(module).__name__}): "
                f"style '{style}' fits nn.Linear and nn.Embedding only; "
                "narrow the pattern to the layers inside it"
            )
    # A colwise layer that reads a colwise sibling's sharded output and
    # writes the residual width closes the pair (attention's output
    # projection, an MLP's down projection): it must be rowwise.
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    hidden = (
        Counter(m.in_features for m in linears).most_common(1)[0][0]
        if linears
        else None
    )
    colwise = {
        name: model.get_submodule(name)
        for name, (_, style) in matches.items()
        if style == "colwise" and isinstance(model.get_submodule(name), nn.Linear)
    }
    for name, layer in colwise.items():
        if layer.in_features == hidden or layer.out_features != hidden:
            continue
        parent = name.rpartition(".")[0]
        opener = next(
            (
                other_name
                for other_name, other in colwise.items()
                if other_name.rpartition(".")[0] == parent
                and other.in_features == hidden
                and other.out_features == layer.in_features
            ),
            None,
        )
        if opener is not None:
            problems.append(
                f"error: {generic_name(name)} is 'colwise' but reads "
                f"{generic_name(opener)}'s column-sharded output and writes "
                "the hidden size: the layer that closes a colwise pair must "
                "be 'rowwise'"
            )
    problems += _tied_weight_problems(model, matches)
    return list(dict.fromkeys(problems))


def _tied_weight_problems(model: nn.Module, matches: dict) -> list[str]:
    """Sharding replaces a layer and its weight, so a weight that several
    layers share would become separate tensors, one of them never loaded;
    except an LM head tied to a vocabulary-split embedding
    (`tied_vocab_heads`), which shares the embedding's shard."""
    tied_heads = tied_vocab_heads(model, matches)
    sharers: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight")
        if weight is not None and name not in tied_heads:
            sharers.setdefault(id(weight), []).append(name)
    problems = []
    for names in sharers.values():
        sharded = [
            name
            for name in names
            if matches.get(name, (None, "replicate"))[1] not in REPLICATED_STYLES
        ]
        if len(names) > 1 and sharded:
            problems.append(
                f"error: {generic_name(sharded[0])} shares its weight with "
                + ", ".join(generic_name(n) for n in names if n != sharded[0])
                + f" (tied), and the plan shards it "
                f"('{matches[sharded[0]][1]}'): the sharded layers would get "
                "weights of their own. Split the embedding by vocabulary "
                "('rowwise') and give the LM head 'colwise_rep' or no entry "
                "(it then shares the embedding's shard), or leave both out "
                "of the plan (they run whole on every rank)"
            )
    return problems


def generic_name(name: str) -> str:
    """A module name with its layer indices as `*`."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def tp_size_problems(model: nn.Module, matches: dict, tp_sizes: list[int]) -> list[str]:
    """Sizes the plan (`match_tp_plan`'s matches) splits that the given TP
    sizes do not divide."""
    problems = []
    tied_heads = tied_vocab_heads(model, matches)
    split_sizes = []  # (what, size)
    sharded_parents = set()
    for name, (_, style) in matches.items():
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear) or name in tied_heads:
            continue  # vocab-parallel embeddings pad the vocabulary
        if style in ("colwise", *GATHERED_STYLES):
            split_sizes.append(
                (f"{generic_name(name)} out_features", module.out_features)
            )
            if style == "colwise":
                sharded_parents.add(name.rpartition(".")[0])
        elif style == PACKED_COLWISE:
            split_sizes.append(
                (f"{generic_name(name)} out_features / 2", module.out_features // 2)
            )
        elif style in ("rowwise", "rowwise_rep", "rowwise_split_input"):
            split_sizes.append(
                (f"{generic_name(name)} in_features", module.in_features)
            )
    for name, module in model.named_modules():
        if (
            isinstance(module, TrainableFlashAttention)
            and name.rpartition(".")[0] in sharded_parents
        ):
            split_sizes.append((f"{generic_name(name)} num_heads", module.num_heads))
            split_sizes.append(
                (f"{generic_name(name)} num_kv_heads", module.num_kv_heads)
            )
    for tp_size in tp_sizes:
        for what, size in dict.fromkeys(split_sizes):
            if size % tp_size:
                problems.append(f"TP={tp_size} does not divide {what} ({size})")
    return problems


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


# ------------------------------------------------------------------ PP


@dataclass
class PlanStep:
    name: str
    inputs: list[str]
    outputs: list[str]


def plan_steps(pp_plan: dict) -> list[PlanStep]:
    return [
        PlanStep(name, list(inputs), list(outputs))
        for name, (inputs, outputs) in pp_plan.items()
    ]


def layer_stack(model: nn.Module, step: PlanStep) -> nn.ModuleList | None:
    """The `nn.ModuleList` a plan step's module is or directly holds."""
    module = model.get_submodule(step.name)
    if isinstance(module, nn.ModuleList):
        return module
    lists = [c for c in module.children() if isinstance(c, nn.ModuleList)]
    return lists[0] if len(lists) == 1 else None


def pp_plan_problems(model: nn.Module, pp_plan: dict) -> list[str]:
    """Modules that do not exist, inputs nothing produces, and a plan
    without exactly one layer stack."""
    problems = []
    names = dict(model.named_modules())
    available = set(ENGINE_INPUTS)
    stacks = []
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    for step in plan_steps(pp_plan):
        if step.name not in names:
            from difflib import get_close_matches

            near = get_close_matches(step.name, names, n=3)
            problems.append(
                f"error: pipeline module '{step.name}' does not exist"
                + (f"; nearest: {', '.join(near)}" if near else "")
            )
            continue
        for position, name in enumerate(step.inputs):
            if name in available:
                continue
            if position == 0:  # what the module runs on must chain
                problems.append(
                    f"error: '{step.name}' takes {name!r}, which no earlier "
                    f"module outputs (available: "
                    f"{', '.join(sorted(available))})"
                )
            else:
                problems.append(
                    f"warning: '{step.name}' takes {name!r}, which no earlier"
                    " module outputs; vLLM passes None for it"
                )
        available.update(step.outputs)
        stack = layer_stack(model, step)
        if stack is not None:
            stacks.append(step.name)
            module = names[step.name]
            if type(module).__name__ in no_split:
                problems.append(
                    f"error: '{step.name}' holds the layer stack but its "
                    f"class {type(module).__name__} is in _no_split_modules"
                )
    if len(stacks) != 1:
        problems.append(
            "error: the pipeline plan needs exactly one module that is or "
            "holds the nn.ModuleList of layers to split between stages; "
            f"found {len(stacks)}" + (f" ({', '.join(stacks)})" if stacks else "")
        )
    return problems


class PipelineStage:
    """Runs this stage's share of a pipeline plan in place of the module's
    own forward, passing hidden states to the next stage as vLLM's
    `IntermediateTensors`."""

    def __init__(
        self,
        model: nn.Module,
        pp_plan: dict,
        parallel_context: ParallelContext,
        hidden_size: int,
        model_name: str = "model",
    ) -> None:
        from vllm.distributed.utils import get_pp_indices
        from vllm.model_executor.models.utils import (
            PPMissingLayer,
            make_empty_intermediate_tensors_factory,
        )

        problems = [
            p for p in pp_plan_problems(model, pp_plan) if p.startswith("error")
        ]
        if problems:
            raise ParallelPlanError(
                f"The pipeline-parallel plan of {model_name} does not fit "
                "it:\n" + "\n".join(f"  - {p}" for p in problems)
            )
        self.parallel_context = parallel_context
        steps = plan_steps(pp_plan)
        stack_index = next(
            i for i, step in enumerate(steps) if layer_stack(model, step) is not None
        )
        layers = layer_stack(model, steps[stack_index])
        assert layers is not None  # found by the search above
        start, end = get_pp_indices(
            len(layers), parallel_context.pp_rank, parallel_context.pp_size
        )
        for index in range(len(layers)):
            if not start <= index < end:
                layers[index] = PPMissingLayer()
        first = parallel_context.is_first_pp_rank
        last = parallel_context.is_last_pp_rank
        # The layer-stack module's other children (a final norm) run once:
        # on the first stage if registered before the layers, on the last
        # if after them (registration order taken as forward order).
        holder = model.get_submodule(steps[stack_index].name)
        if holder is not layers:
            children = list(holder.named_children())
            at = next(i for i, (_, c) in enumerate(children) if c is layers)
            for i, (child_name, child) in enumerate(children):
                if (i < at and not first) or (i > at and not last):
                    setattr(holder, child_name, PPMissingLayer())
        self.steps = []
        for index, step in enumerate(steps):
            if (index < stack_index and not first) or (
                index > stack_index and not last
            ):
                _set_submodule(model, step.name, PPMissingLayer())
            elif holder is layers and index == stack_index:
                self.steps.append(
                    (step, functools.partial(_run_layers, list(layers[start:end])))
                )
            elif not (last and "logits" in step.outputs):
                # logits are vLLM's compute_logits step, not forward's
                self.steps.append((step, model.get_submodule(step.name)))
        # What crosses a stage boundary: the layer stack's outputs.
        self.boundary = steps[stack_index].outputs
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            self.boundary, hidden_size
        )

    def __call__(
        self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None
    ):
        from vllm.sequence import IntermediateTensors

        values = {
            "input_ids": input_ids,
            "positions": positions,
            "inputs_embeds": inputs_embeds,
        }
        if intermediate_tensors is not None:
            values.update(intermediate_tensors.tensors)
        for step, module in self.steps:
            out = module(*(values.get(name) for name in step.inputs))
            outs = out if isinstance(out, tuple) else (out,)
            values.update(zip(step.outputs, outs))
        if not self.parallel_context.is_last_pp_rank:
            return IntermediateTensors({name: values[name] for name in self.boundary})
        return values[self.steps[-1][0].outputs[0]]


def _run_layers(layers: list[nn.Module], hidden_states, *inputs):
    """A plan entry that is the `nn.ModuleList` itself: its layers in turn,
    each on the previous one's output and the entry's other inputs."""
    for layer in layers:
        out = layer(hidden_states, *inputs)
        hidden_states = out[0] if isinstance(out, tuple) else out
    return hidden_states


def tied_parameter_names(model: nn.Module) -> list[list[str]]:
    """The names of each parameter that several modules share."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def stage_aliases(model: nn.Module, tied_names: list[list[str]]) -> dict[str, str]:
    """{name: name on this stage} for tied parameters whose other names the
    pipeline stage dropped: a checkpoint that stores an LM head tied to the
    embedding only as the embedding still fills the last stage's head."""
    here = dict(model.named_parameters(remove_duplicate=False))
    aliases = {}
    for group in tied_names:
        present = [name for name in group if name in here]
        if present:
            aliases.update({name: present[0] for name in group if name not in here})
    return aliases


def failing_module(model: nn.Module, error: BaseException) -> str | None:
    """The name of the innermost submodule of `model` whose code raised
    `error` (from the traceback's frames), or None."""
    names = {id(module): name for name, module in model.named_modules()}
    found = None
    traceback = error.__traceback__
    while traceback is not None:
        owner = traceback.tb_frame.f_locals.get("self")
        if id(owner) in names and isinstance(owner, nn.Module):
            found = names[id(owner)]
        traceback = traceback.tb_next
    return found
