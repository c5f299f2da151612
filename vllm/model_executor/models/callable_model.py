# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Run a module built by a user's factory as a vLLM model.

`ModelRegistry.register_model(arch, factory)` stores
`CallableModelWrapper.for_factory(arch, factory)`: a vLLM model class whose
constructor calls `factory(vllm_config, parallel_context)` and whose methods
delegate to the module the factory returns.

The returned module must have

    forward(input_ids, positions) -> hidden_states   # [num_tokens, hidden]
    compute_logits(hidden_states) -> logits           # [num_tokens, vocab]

and may have

    embed_input_ids(input_ids) -> embeddings   # needed for inputs_embeds
    load_weights(weights) -> set[str] | None    # replaces loading by name
    hf_to_vllm_mapper: WeightsMapper            # renames checkpoint names

Its plain `torch.nn.Linear` layers run through vLLM's linear method (see
`plain_linear.py`) unless the factory's attribute `use_vllm_linear_method`
is false, and its projections that read one input run as one GEMM (see
`fused_projections.py`) unless the factory's attribute `fuse_projections`
is false. When compiled, its residual adds stay out of its GEMMs (see
`split_residual_addmm.py`).

Without `load_weights`, checkpoint tensors are loaded by parameter name:
parameters with a vLLM `weight_loader` (e.g. `ColumnParallelLinear`) shard
the full tensor themselves, others must match in shape, and every missing,
unexpected or wrongly shaped name is reported in one error. Later loads
into the running engine (a trainer's weights through `LLM.apply_model` or
`collective_rpc`, vLLM's weight-transfer engines) are updates: they name
only what changes, and a bad one changes nothing.
"""

import inspect
import time
from collections.abc import Callable, Iterable
from typing import ClassVar

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.layers.exact_logprobs import (
    batch_invariant_mode_on,
    row_invariant_matmuls,
)
from vllm.model_executor.layers.trainable_attention import bind_trainable_attention
from vllm.model_executor.parallel_context import ParallelContext

logger = init_logger(__name__)

ModelFactory = Callable[[VllmConfig, ParallelContext], nn.Module]

_REQUIRED_METHODS = {
    "forward": "forward(input_ids, positions) -> hidden_states",
    "compute_logits": "compute_logits(hidden_states) -> logits",
}


class ModelFactoryError(RuntimeError):
    """A registered model factory failed or returned an unusable module."""


class CallableModelWrapper(nn.Module):
    """vLLM model interface around the module a factory returns.

    Subclasses made by `for_factory` set `model_factory`; the factory's
    module is `self.model`, so its parameter `x.weight` is `model.x.weight`
    to vLLM while checkpoints keep the module's own names.
    """

    model_factory: ClassVar[ModelFactory]
    model_arch: ClassVar[str]
    # Checked when the module is built: a `_pp_plan`, or a module that
    # handles pipeline stages itself (see __init__).
    supports_pp: ClassVar[bool] = True

    @classmethod
    def for_factory(
        cls, model_arch: str, factory: ModelFactory
    ) -> type["CallableModelWrapper"]:
        """The wrapper class for `factory`. vLLM compiles the module it
        builds (a Dynamo trace of the whole forward, then, on CUDA,
        piecewise CUDA graphs), as it does its own models. The factory's
        attribute `supports_torch_compile` says how: unset, a module Dynamo
        cannot trace runs uncompiled, with one warning saying why
        (`CompileOrFallBack`); True, that is an error; False, vLLM does not
        try."""
        if not callable(factory):
            raise TypeError(
                f"The model factory for '{model_arch}' must be "
                f"callable, got {type(factory).__name__}"
            )
        check_factory_signature(model_arch, factory)
        attributes = {
            "model_factory": staticmethod(factory),
            "model_arch": model_arch,
            "__module__": cls.__module__,
            "__qualname__": f"{cls.__qualname__}[{model_arch}]",
        }
        wrapper = type(model_arch, (cls,), attributes)
        compile_choice = getattr(factory, "supports_torch_compile", None)
        if compile_choice is False:
            return wrapper
        from vllm.compilation.decorators import support_torch_compile

        wrapper = support_torch_compile(
            dynamic_arg_dims={
                "input_ids": 0,
                "positions": -1,
                "intermediate_tensors": 0,
                "inputs_embeds": 0,
            }
        )(wrapper)
        # the decorator replaces the class's __call__: ours goes above it
        return type(
            model_arch,
            (CompileOrFallBack, wrapper),
            dict(attributes, compile_required=bool(compile_choice)),
        )

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        parallel_context = ParallelContext.from_vllm_config(vllm_config)
        factory_name = _describe(self.model_factory)
        factory = type(self).model_factory  # the class's: not a bound method
        try:
            model = factory(vllm_config, parallel_context)
        except Exception as e:
            raise ModelFactoryError(
                f"The model factory {factory_name} registered for "
                f"'{self.model_arch}' raised {type(e).__name__}: {e}"
            ) from e
        _check_model(self.model_arch, factory_name, model)
        self.tp_plan_applied = False
        self.pipeline_stage: nn.Module | None = None  # a PipelineStage
        self.stage_aliases: dict[str, str] = {}
        # decided once: compute_logits runs every engine step
        self.row_invariant_logits = batch_invariant_mode_on()
        self._apply_parallel_plans(model, parallel_context, vllm_config)
        bind_trainable_attention(
            model,
            vllm_config.cache_config,
            prefix=f"{prefix}.model" if prefix else "model",
        )
        # Engine-side fusion (never in the trainer's module); off in
        # batch-invariant mode, where the trainer's recompute runs the
        # module's own ops
        fuse = not self.row_invariant_logits
        moe_blocks = 0
        if fuse and getattr(self.model_factory, "fuse_moe", True):
            from vllm.model_executor.layers.generic_moe import use_fused_moe

            moe_blocks = use_fused_moe(
                model,
                prefix=f"{prefix}.model" if prefix else "model",
                tp_rank=parallel_context.tp_rank,
                tp_size=parallel_context.tp_size,
                expert_parallel=vllm_config.parallel_config.enable_expert_parallel,
            )
            if moe_blocks:
                logger.info_once(
                    "%s: %d mixture-of-experts block(s) run on vLLM's fused MoE layer.",
                    self.model_arch,
                    moe_blocks,
                )
        if getattr(self.model_factory, "use_vllm_linear_method", True):
            # imported here: vLLM's linear layers import the model registry
            from vllm.model_executor.layers.plain_linear import use_vllm_linear_method

            count = use_vllm_linear_method(model)
            if count:
                logger.info_once(
                    "%s: %d torch.nn.Linear layer(s) run through vLLM's linear method.",
                    self.model_arch,
                    count,
                )
        # fused in the first forward pass, once the weights are loaded and
        # the search has seen the module
        self.search_projections = fuse and getattr(
            self.model_factory, "fuse_projections", True
        )
        declared: list[list[str]] = []
        searchable = False
        if self.search_projections:
            from vllm.model_executor.layers.fused_projections import (
                declared_groups,
                searchable_layers,
            )

            declared = declared_groups(model)
            searchable = bool(searchable_layers(model))
        # nothing to fuse or find: no eager pass first (CompileOrFallBack)
        self.pending_fusion: list[list[str]] | None = (
            declared if moe_blocks or declared or searchable else None
        )
        _split_residual_addmms(vllm_config, self.model_arch)
        if _load_format(vllm_config) == "dummy":
            # No checkpoint load comes: the first load is an update.
            setattr(model, CHECKPOINT_LOADED, True)
        self.model = model
        self.parallel_context = parallel_context
        for module in model.modules():
            if type(module).get_extra_state is not nn.Module.get_extra_state:
                module.register_state_dict_post_hook(_drop_extra_state)

    def _apply_parallel_plans(
        self,
        model: nn.Module,
        parallel_context: ParallelContext,
        vllm_config: VllmConfig,
    ) -> None:
        """Shard the module from its `_tp_plan` and place its pipeline stage
        from its `_pp_plan` (see parallel_plan.py)."""
        from vllm.model_executor.models.parallel_plan import (
            PipelineStage,
            get_plan,
            shard_by_tp_plan,
            stage_aliases,
            tied_parameter_names,
        )

        tp_plan = get_plan(model, "tp")
        if tp_plan and parallel_context.tp_size > 1:
            shard_by_tp_plan(model, tp_plan, parallel_context, self.model_arch)
            self.tp_plan_applied = True
        if parallel_context.pp_size == 1:
            return
        pp_plan = get_plan(model, "pp")
        if pp_plan:
            tied_names = tied_parameter_names(model)
            self.pipeline_stage = PipelineStage(
                model,
                pp_plan,
                parallel_context,
                vllm_config.model_config.get_hidden_size(),
                self.model_arch,
            )
            self.stage_aliases = stage_aliases(model, tied_names)
        elif not hasattr(model, "make_empty_intermediate_tensors"):
            raise ModelFactoryError(
                f"{type(model).__name__} (model '{self.model_arch}') cannot "
                f"run with pipeline_parallel_size="
                f"{parallel_context.pp_size}: give its class a `_pp_plan` "
                "({module name: ([input names], [output names])} in forward "
                "order, one entry holding the nn.ModuleList of layers), or "
                "build only this stage in the factory (from "
                "parallel_context.pp_rank, vLLM's PPMissingLayer for the "
                "rest), take and return IntermediateTensors in forward and "
                "define make_empty_intermediate_tensors(batch_size, dtype, "
                "device)."
            )

    def make_empty_intermediate_tensors(
        self, batch_size: int, dtype: torch.dtype, device: torch.device
    ):
        owner = self.pipeline_stage or self.model
        return owner.make_empty_intermediate_tensors(batch_size, dtype, device)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        embed = getattr(self.model, "embed_input_ids", None)
        if embed is None:
            raise NotImplementedError(
                f"{type(self.model).__name__} (model '{self.model_arch}') has "
                "no embed_input_ids(input_ids) method; add one to use "
                "inputs_embeds or prompt embeddings."
            )
        return embed(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        # Only pass what is set, so a plain forward(input_ids, positions)
        # is enough for the common case.
        if intermediate_tensors is not None:
            kwargs["intermediate_tensors"] = intermediate_tensors
        if inputs_embeds is not None:
            kwargs["inputs_embeds"] = inputs_embeds
        if self.pending_fusion is not None:
            return self._forward_and_fuse(input_ids, positions, **kwargs)
        return self._forward(input_ids, positions, **kwargs)

    def _forward(self, input_ids, positions, **kwargs) -> torch.Tensor:
        if self.pipeline_stage is not None:
            return self.pipeline_stage(input_ids, positions, **kwargs)
        if not self.tp_plan_applied:
            return self.model(input_ids, positions, **kwargs)
        try:
            return self.model(input_ids, positions, **kwargs)
        except RuntimeError as e:
            raise _sharded_forward_error(self.model, self.model_arch, e) from e

    def _forward_and_fuse(self, input_ids, positions, **kwargs) -> torch.Tensor:
        """The first forward pass (vLLM's profile run, eager, after the
        weights are loaded): process the fused MoE blocks' expert weights,
        find the projections that read one input, then fuse them with the
        declared ones."""
        from vllm.model_executor.layers.fused_projections import (
            ProjectionSearch,
            fuse_projections,
        )
        from vllm.model_executor.layers.generic_moe import process_fused_moe

        process_fused_moe(self.model)
        search = ProjectionSearch(self.model) if self.search_projections else None
        try:
            hidden_states = self._forward(input_ids, positions, **kwargs)
        finally:
            found = search.groups() if search else []  # and its hooks removed
        declared = self.pending_fusion or []
        count = fuse_projections(self.model, declared + found)
        self.pending_fusion = None
        if count and self.parallel_context.tp_rank == 0:
            logger.info_once(
                "%s: %d group(s) of projections run as one GEMM each.",
                self.model_arch,
                count,
            )
        return hidden_states

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.row_invariant_logits:
            # the engine's logits rows must not depend on how many it samples
            with row_invariant_matmuls():
                return self.model.compute_logits(hidden_states)
        return self.model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        mapper = getattr(self.model, "hf_to_vllm_mapper", None)
        if mapper is not None:
            weights = mapper.apply(weights)
        custom_loader = getattr(self.model, "load_weights", None)
        if custom_loader is not None:
            loaded = custom_loader(weights)
            if loaded is None:  # the module loaded everything it has
                loaded = {name for name, _ in self.model.named_parameters()}
        else:
            if self.stage_aliases:  # tied weights this stage holds once
                weights = (
                    (self.stage_aliases.get(name, name), tensor)
                    for name, tensor in weights
                )
            loaded = load_weights_by_name(
                self.model,
                weights,
                model_name=self.model_arch,
                parallel_context=self.parallel_context,
            )
        # Weights loaded into a running engine (e.g. from a trainer) must
        # reach the layers' processed (prepacked) copies too.
        from vllm.model_executor.layers.plain_linear import refresh_vllm_linear_method

        params = dict(self.model.named_parameters(remove_duplicate=False))
        from vllm.model_executor.layers.generic_moe import refresh_fused_moe

        loaded_params = [params[name] for name in loaded if name in params]
        refresh_vllm_linear_method(self.model, loaded_params)
        refresh_fused_moe(self.model, loaded_params)
        return {f"model.{name}" for name in loaded}


class CompileOrFallBack:
    """The first call of a compiled `CallableModelWrapper` (vLLM's profile
    run) is where Dynamo traces the module. If it cannot (a graph break,
    an unsupported op, data-dependent control flow), a factory that
    declared `supports_torch_compile = True` gets an error naming the
    reason, and one that declared nothing gets its module run uncompiled
    from then on, with one warning."""

    compile_required: ClassVar[bool]
    # set by CallableModelWrapper and vLLM's compile decorator, which this
    # class is mixed into (`for_factory`)
    model_arch: ClassVar[str]
    parallel_context: ParallelContext
    do_not_compile: bool
    compiled: bool
    pending_fusion: list[list[str]] | None
    forward: Callable[..., torch.Tensor]

    def __call__(self, *args, **kwargs):
        call = super().__call__  # type: ignore[misc]  # the mixed-in class's
        if self.do_not_compile or self.compiled:
            return call(*args, **kwargs)
        if self.pending_fusion is not None:
            # fused in an eager pass first: Dynamo traces the fused module
            self.forward(*args, **kwargs)
        start = time.perf_counter()
        try:
            return call(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as error:
            reason = next(
                (line.strip() for line in str(error).splitlines() if line.strip()),
                type(error).__name__,
            )
            if self.compile_required:
                raise ModelFactoryError(
                    f"Model '{self.model_arch}' declares "
                    "supports_torch_compile = True, but torch.compile cannot "
                    f"trace it: {reason}. Make the module traceable as one "
                    "graph, or set the factory's supports_torch_compile to "
                    "False (never compiled) or leave it unset (compiled "
                    "where it can be)."
                ) from error
            self.do_not_compile = True
            if self.parallel_context.tp_rank == 0:  # once per stage
                logger.warning(
                    "Model '%s' runs uncompiled: torch.compile could not "
                    "trace it (%s; the attempt took %.1f s). Set the "
                    "factory's supports_torch_compile = False to skip the "
                    "attempt and this warning.",
                    self.model_arch,
                    reason,
                    time.perf_counter() - start,
                )
            return self.forward(*args, **kwargs)


def _drop_extra_state(module, state_dict, prefix, local_metadata) -> None:
    """Megatron-core's layers put `<name>._extra_state: None` entries in
    their state dicts (a slot for Transformer Engine); vLLM's loaders read
    every module's state dict as weights (the dummy loader per module)."""
    key = prefix + "_extra_state"  # this module's own entry
    if key in state_dict and not torch.is_tensor(state_dict[key]):
        del state_dict[key]


def _sharded_forward_error(
    model: nn.Module, model_arch: str, error: RuntimeError
) -> RuntimeError:
    from vllm.model_executor.models.parallel_plan import failing_module

    where = failing_module(model, error) or type(model).__name__
    return RuntimeError(
        f"{where} (model '{model_arch}') failed after tensor-parallel "
        f"sharding from its _tp_plan: {error}\nColumn-sharded projections "
        "now return this rank's heads only: reshape with -1 or the local "
        "head count (heads // tp_size), not a hard-coded global one."
    )


def load_weights_by_name(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    model_name: str = "model",
    parallel_context: ParallelContext | None = None,
    *,
    require_all: bool | None = None,
) -> set[str]:
    """Copy each `(name, tensor)` into the parameter or buffer of that name.

    Full (unsharded) tensors are cut to the local shard for parameters
    with a vLLM `weight_loader` and for Megatron-core tensor-parallel
    parameters (`tensor_model_parallel`, `partition_dim`).

    A name the model does not have, a wrong shape or a tensor that is not
    floating point for a floating parameter raises one `ValueError` naming
    all of them; floating dtypes are cast (an fp32 trainer updates a bf16
    engine). With `require_all` (a checkpoint) every parameter must be
    named, and tensors are copied as they stream in. Without it (a weight
    update) only the named parameters change, and only once every tensor
    has passed the checks: a bad update leaves the model as it was. By
    default the first load into `model` is the checkpoint and later loads
    are updates. Returns the names of the parameters loaded.
    """
    if require_all is None:
        require_all = not getattr(model, CHECKPOINT_LOADED, False)
    # Aliases (tied weights) are accepted under each of their names.
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    loaded_ids: set[int] = set()
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # an update's
    unexpected: list[str] = []
    wrong: list[str] = []
    mismatched: set[str] = set()
    # imported here: vLLM's model utilities import the model registry
    from vllm.model_executor.models.utils import is_pp_missing_parameter

    with torch.no_grad():
        for name, tensor in weights:
            target = params.get(name, buffers.get(name))
            if target is None and is_pp_missing_parameter(name, model):
                continue  # another pipeline stage's weight
            if target is None:
                unexpected.append(name)
                continue
            problem = _check_tensor(name, target, tensor)
            in_place = False
            if problem is None and getattr(target, "weight_loader", None):
                # vLLM's parallel layers take the full tensor and shard it
                # themselves; an update shards into a scratch copy first.
                problem = _full_shape_problem(model, name, target, tensor)
                if problem is None:
                    destination = target if require_all else _scratch_copy(target)
                    problem = _run_weight_loader(name, target, destination, tensor)
                    tensor, in_place = destination.data, require_all
            elif problem is None and getattr(target, "tensor_model_parallel", False):
                tensor = _megatron_shard(name, target, tensor, parallel_context)
            if problem is None and target.shape != tensor.shape:
                problem = (
                    f"{name}: checkpoint {tuple(tensor.shape)}, "
                    f"model {tuple(target.shape)}"
                )
            if problem is not None:
                wrong.append(problem)
                mismatched.add(name)
                continue
            loaded_ids.add(id(target))
            if require_all:
                if not in_place:
                    target.copy_(tensor)
            else:
                pending.append((target, tensor))

        loaded = {
            name for name, param in model.named_parameters() if id(param) in loaded_ids
        }
        missing = (
            [
                name
                for name, _ in model.named_parameters()
                if name not in loaded and name not in mismatched
            ]
            if require_all
            else []
        )
        if unexpected or wrong or missing:
            raise ValueError(
                _load_error(model_name, model, missing, unexpected, wrong, require_all)
            )
        for target, tensor in pending:
            target.copy_(tensor)
    setattr(model, CHECKPOINT_LOADED, True)
    return loaded


# Set on a module once its checkpoint is loaded (or, for a model vLLM
# initialises with dummy weights, when it is built): later loads are
# weight updates.
CHECKPOINT_LOADED = "vllm_checkpoint_loaded"


def _check_tensor(name: str, target: torch.Tensor, tensor: torch.Tensor) -> str | None:
    if not isinstance(tensor, torch.Tensor):
        return f"{name}: got {type(tensor).__name__}, not a tensor"
    if target.is_floating_point() and not tensor.is_floating_point():
        return (
            f"{name}: dtype {tensor.dtype} for a {target.dtype} "
            "parameter (floating-point values expected)"
        )
    return None


def _scratch_copy(param: torch.Tensor) -> nn.Parameter:
    """An empty parameter of `param`'s class with its attributes: vLLM's
    weight loaders call methods of their parameter's class
    (`ModelWeightParameter.load_column_parallel_weight`, ...) and read its
    attributes (`output_dim`, `tp_rank`, ...)."""
    scratch = torch.Tensor._make_subclass(
        type(param), torch.empty_like(param.data), False
    )
    scratch.__dict__.update(param.__dict__)
    return scratch


def _full_shape_problem(
    model: nn.Module, name: str, param: torch.Tensor, full: torch.Tensor
) -> str | None:
    """vLLM's linear weight loaders cut this rank's rows or columns out of
    the full tensor without checking the rest of its shape (a tensor with a
    row too many loads): check it against the layer's full size."""
    from vllm.model_executor.layers.linear import (
        LinearBase,
        QKVParallelLinear,
        UnquantizedLinearMethod,
    )

    owner_name, _, param_name = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    # QKVParallelLinear counts KV heads replicated over ranks in its size
    if (
        not isinstance(owner, LinearBase)
        or isinstance(owner, QKVParallelLinear)
        or not isinstance(owner.quant_method, UnquantizedLinearMethod)
    ):
        return None
    expected = {
        "weight": (owner.output_size, owner.input_size),
        "bias": (owner.output_size,),
    }.get(param_name)
    if expected is None or tuple(full.shape) == expected:
        return None
    return (
        f"{name}: checkpoint {tuple(full.shape)}, model shard "
        f"{tuple(param.shape)} of a full {expected}"
    )


def _run_weight_loader(
    name: str, param: torch.Tensor, destination: torch.Tensor, full: torch.Tensor
) -> str | None:
    try:
        param.weight_loader(destination, full)
    except (RuntimeError, ValueError, AssertionError) as e:
        return (
            f"{name}: checkpoint {tuple(full.shape)}, model shard "
            f"{tuple(param.shape)} ({type(e).__name__}: {e})"
        )
    return None


def _load_error(
    model_name: str,
    model: nn.Module,
    missing: list[str],
    unexpected: list[str],
    wrong: list[str],
    require_all: bool,
) -> str:
    problems = []
    if missing:
        problems.append(_listing("missing from the checkpoint", missing))
    if unexpected:
        problems.append(_listing("in the checkpoint but not in the model", unexpected))
    if wrong:
        problems.append(_listing("with the wrong shape or dtype", wrong))
    what = (
        "the checkpoint" if require_all else "the weight update (nothing was changed)"
    )
    return (
        f"Cannot load {what} into {model_name} "
        f"({type(model).__name__}):\n"
        + "\n".join(problems)
        + "\nRename the tensors to the module's parameter names (set "
        "`hf_to_vllm_mapper` on the module) or give the module a "
        "load_weights(weights) method."
    )


def _megatron_shard(
    name: str,
    param: torch.Tensor,
    full: torch.Tensor,
    parallel_context: ParallelContext | None,
) -> torch.Tensor:
    """This rank's slice of a full tensor for a Megatron-core TP param."""
    if parallel_context is None or parallel_context.tp_size == 1:
        return full
    if full.shape == param.shape:
        return full
    tp_size = parallel_context.tp_size
    dim = param.partition_dim
    if getattr(param, "partition_stride", 1) != 1:
        raise ValueError(
            f"{name}: Megatron partition_stride "
            f"{param.partition_stride} is not supported by loading by name; "
            "give the module a load_weights(weights) method."
        )
    if full.shape[dim] % tp_size:
        raise ValueError(
            f"{name}: dimension {dim} of the checkpoint tensor "
            f"{tuple(full.shape)} does not split over tensor_parallel_size "
            f"{tp_size}."
        )
    return full.chunk(tp_size, dim)[parallel_context.tp_rank]


def check_factory_signature(model_arch: str, factory: Callable) -> None:
    """Fail at registration, not in a worker, if the factory cannot take
    `(vllm_config, parallel_context)`."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return  # builtins and some C callables: checked when called
    try:
        signature.bind(None, None)
    except TypeError as e:
        raise TypeError(
            f"The model factory {_describe(factory)} for '{model_arch}' must "
            "accept two positional arguments (vllm_config, parallel_context)"
            f"; its signature is {signature}: {e}"
        ) from None


def _check_model(model_arch: str, factory_name: str, model: object) -> None:
    if not isinstance(model, nn.Module):
        raise ModelFactoryError(
            f"The model factory {factory_name} registered for '{model_arch}' "
            f"returned {type(model).__name__}, not a torch.nn.Module. Return "
            "the model instance (e.g. `return MyModel(config)`)."
        )
    missing = [
        signature
        for name, signature in _REQUIRED_METHODS.items()
        if not callable(getattr(model, name, None))
    ]
    if missing:
        raise ModelFactoryError(
            f"{type(model).__name__}, returned by the model factory "
            f"{factory_name} for '{model_arch}', lacks the method(s) vLLM "
            f"calls: {'; '.join(missing)}. Add them to the module."
        )


def _split_residual_addmms(vllm_config: VllmConfig, model_arch: str) -> None:
    """Make Inductor leave a module's residual adds out of its GEMMs (see
    split_residual_addmm.py): set before this model's compile backend
    copies the engine's Inductor options. A post-grad pass the user set
    stays, alone."""
    from vllm.compilation.passes.utility.split_residual_addmm import (
        SplitResidualAddmmPass,
    )

    inductor_options = vllm_config.compilation_config.inductor_compile_config
    users_pass = inductor_options.setdefault(
        "post_grad_custom_post_pass", SplitResidualAddmmPass()
    )
    if not isinstance(users_pass, SplitResidualAddmmPass):
        logger.info_once(
            "%s: compilation_config sets a post_grad_custom_post_pass; "
            "residual adds may be folded into GEMMs (addmm).",
            model_arch,
        )


def _load_format(vllm_config: VllmConfig) -> str:
    load_format = vllm_config.load_config.load_format
    return getattr(load_format, "value", load_format)


def _listing(what: str, names: list[str], limit: int = 20) -> str:
    shown = "\n".join(f"    {name}" for name in names[:limit])
    more = f"\n    ... and {len(names) - limit} more" if len(names) > limit else ""
    return f"  {len(names)} name(s) {what}:\n{shown}{more}"


def _describe(factory: Callable) -> str:
    name = getattr(factory, "__qualname__", None)
    if name is None:  # functools.partial, callable objects
        name = type(factory).__qualname__
    module = getattr(factory, "__module__", None)
    return f"'{module}.{name}'" if module else f"'{name}'"
