# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Check a module's parallelism plans before vLLM runs it, and show its
structure.

    validate_vllm_plans(model)           # the plans the module carries
    print_model_structure(model, max_depth=3)

    python -m vllm.model_executor.models.plan_validation my_pkg.models:build \\
        --model CKPT_DIR [--tp-plan plan.json] [--strict]

The command builds the module with its factory (on the CPU, with the
checkpoint directory's config), prints both reports and exits 1 when a
plan is invalid.
"""

import argparse
import json
import sys
from collections import Counter
from difflib import get_close_matches
from pathlib import Path

from torch import nn

from vllm.model_executor.models.parallel_plan import (
    generic_name,
    get_plan,
    match_tp_plan,
    plan_style_problems,
    pp_plan_problems,
    tied_vocab_heads,
    tp_size_problems,
)

TP_SIZES = (2, 4, 8)


def validate_vllm_plans(
    model: nn.Module,
    tp_plan: dict | None = None,
    pp_plan: dict | None = None,
    strict: bool = False,
    file=None,
) -> bool:
    """Report how `tp_plan` and `pp_plan` (default: the module's own
    `_tp_plan` / `_pp_plan`) fit `model`. Prints which pattern matched
    which modules and parameters, patterns that match nothing (with the
    nearest names), linear layers no pattern covers, styles that do not fit
    their layer, sizes TP=2/4/8 do not divide, and pipeline modules or
    inputs that do not exist or do not chain. Returns False when a plan has
    an error (with `strict`, a warning too)."""
    file = file or sys.stdout
    tp_plan = tp_plan if tp_plan is not None else get_plan(model, "tp")
    pp_plan = pp_plan if pp_plan is not None else get_plan(model, "pp")
    errors = warnings = 0

    def report(kind: str, message: str) -> None:
        nonlocal errors, warnings
        errors += kind == "error"
        warnings += kind == "warning"
        print(f"  {kind}: {message}", file=file)

    if tp_plan:
        print(f"Tensor-parallel plan ({len(tp_plan)} patterns):", file=file)
        matches = match_tp_plan(model, tp_plan)
        by_pattern: dict[str, list[str]] = {}
        for name, (pattern, _) in matches.items():
            by_pattern.setdefault(pattern, []).append(name)
        module_names = [name for name, _ in model.named_modules() if name]
        for pattern, style in tp_plan.items():
            names = by_pattern.get(pattern, [])
            if not names:
                near = _nearest(pattern, module_names)
                report(
                    "error",
                    f"'{pattern}' ({style}) matches no module"
                    + (f"; nearest: {', '.join(near)}" if near else ""),
                )
                continue
            params = sum(len(list(model.get_submodule(n).parameters())) for n in names)
            kind = Counter(type(model.get_submodule(n)).__name__ for n in names)
            print(
                f"  '{pattern}' -> {style}: {len(names)} module(s) "
                f"({', '.join(f'{c} {t}' for t, c in kind.items())}), "
                f"{params} parameter(s); e.g. {names[0]}",
                file=file,
            )
        tied_heads = tied_vocab_heads(model, matches)
        for head, embedding in tied_heads.items():
            print(
                f"  {head} is tied to {embedding}: it computes the logits "
                "of the embedding's vocabulary shard and gathers them",
                file=file,
            )
        for problem in plan_style_problems(model, matches):
            report(*problem.split(": ", 1))
        for problem in tp_size_problems(model, matches, list(TP_SIZES)):
            report("warning", problem)
        uncovered = [
            name
            for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.Embedding))
            and name not in matches
            and name not in tied_heads
        ]
        if uncovered:
            report(
                "warning",
                f"{len(uncovered)} linear/embedding layer(s) "
                "no pattern covers stay whole on every rank: "
                + ", ".join(_collapse(uncovered)),
            )
    if pp_plan:
        print(f"Pipeline-parallel plan ({len(pp_plan)} modules):", file=file)
        for name, (inputs, outputs) in pp_plan.items():
            print(f"  {name}: {list(inputs)} -> {list(outputs)}", file=file)
        for problem in pp_plan_problems(model, pp_plan):
            report(*problem.split(": ", 1))
    if not tp_plan and not pp_plan:
        report(
            "warning",
            f"{type(model).__name__} has no _tp_plan or "
            "_pp_plan: vLLM runs it whole on every rank",
        )
    ok = errors == 0 and not (strict and warnings)
    print(
        f"{'valid' if ok else 'INVALID'}: {errors} error(s), {warnings} "
        f"warning(s){' (strict)' if strict else ''}",
        file=file,
    )
    return ok


def print_model_structure(
    model: nn.Module, max_depth: int = 4, show_params: bool = False, file=None
) -> None:
    """The module tree to `max_depth`, runs of identical layers in a
    ModuleList folded into one line."""
    file = file or sys.stdout

    def visit(module: nn.Module, name: str, depth: int) -> None:
        own = sum(p.numel() for p in module.parameters())
        line = f"{'  ' * depth}{name or '(root)'}: {type(module).__name__}"
        if isinstance(module, nn.Linear):
            line += f"({module.in_features} -> {module.out_features})"
        elif isinstance(module, nn.Embedding):
            line += f"({module.num_embeddings} x {module.embedding_dim})"
        print(f"{line}  [{own:,} params]", file=file)
        if show_params:
            for pname, param in module.named_parameters(recurse=False):
                print(
                    f"{'  ' * (depth + 1)}.{pname} {tuple(param.shape)} {param.dtype}",
                    file=file,
                )
        if depth + 1 > max_depth:
            return
        children = list(module.named_children())
        if (
            isinstance(module, nn.ModuleList)
            and len(children) > 1
            and len({type(c) for _, c in children}) == 1
        ):
            print(
                f"{'  ' * (depth + 1)}{children[0][0]}..{children[-1][0]}:"
                f" {len(children)} x {type(children[0][1]).__name__}, "
                f"each as {children[0][0]}:",
                file=file,
            )
            children = children[:1]
        for child_name, child in children:
            visit(child, child_name, depth + 1)

    visit(model, "", 0)


def _nearest(pattern: str, names: list[str]) -> list[str]:
    generic = sorted(set(_collapse(names)))
    return get_close_matches(pattern, generic, n=3, cutoff=0.5)


def _collapse(names: list[str]) -> list[str]:
    """Layer indices as `*`, each pattern once, in order."""
    return list(dict.fromkeys(generic_name(name) for name in names))


def _build(factory_path: str, model_dir: str) -> nn.Module:
    import importlib

    from vllm import ModelRegistry
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.parallel_context import ParallelContext

    module_name, _, attr = factory_path.partition(":")
    factory = getattr(importlib.import_module(module_name), attr)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    for arch in config.get("architectures") or []:
        ModelRegistry.register_model(arch, factory)
    vllm_config: VllmConfig = EngineArgs(
        model=model_dir, skip_tokenizer_init=True
    ).create_engine_config()
    with set_current_vllm_config(vllm_config):
        return factory(vllm_config, ParallelContext())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Validate a generic model's tensor/pipeline-parallel "
        "plans and print its structure."
    )
    parser.add_argument("factory", help='"package.module:factory"')
    parser.add_argument(
        "--model",
        required=True,
        help="checkpoint directory whose config.json the factory reads",
    )
    parser.add_argument(
        "--tp-plan",
        help="JSON file: a TP plan to check instead of the module's _tp_plan",
    )
    parser.add_argument(
        "--pp-plan",
        help="JSON file: a PP plan to check instead of the module's _pp_plan",
    )
    parser.add_argument(
        "--strict", action="store_true", help="warnings make the plan invalid too"
    )
    parser.add_argument("--max-depth", type=int, default=4)
    parser.add_argument("--show-params", action="store_true")
    args = parser.parse_args(argv)
    model = _build(args.factory, args.model)
    print_model_structure(model, args.max_depth, args.show_params)
    print()
    tp_plan = json.loads(Path(args.tp_plan).read_text()) if args.tp_plan else None
    pp_plan = json.loads(Path(args.pp_plan).read_text()) if args.pp_plan else None
    ok = validate_vllm_plans(model, tp_plan, pp_plan, strict=args.strict)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
