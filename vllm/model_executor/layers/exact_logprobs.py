# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Bitwise-equal log-probabilities in the trainer and in vLLM.

One model definition runs in both; for the generator's log-probabilities to
equal the trainer's recompute bit for bit, both processes must run kernels
whose result for a row does not depend on the other rows of the batch:

- vLLM's batch-invariant mode (`VLLM_BATCH_INVARIANT=1`) in the engine's
  processes and in the trainer's (`init_batch_invariance`): GEMMs without
  split-K, fixed-order norms, means and softmaxes, attention in one split;
- the trainer's attention through the kernel the engine runs over its paged
  KV cache (`use_generator_attention_kernel`);
- the LM head through a GEMM whose tiles do not depend on the row count
  (`row_invariant_matmuls`): cuBLAS picks its kernel by shape, and the
  engine computes logits for the few rows it samples while the trainer
  computes them for every packed token; one logit one ulp apart moves a
  log-probability's last bit;
- the log-softmax through the kernel the engine's sampler runs, on logits
  of the engine's dtype (`token_logprobs`): a Triton reduction compiled
  for bf16 inputs sums in another order than the same kernel compiled for
  fp32, which is enough to flip the last bit of 2% of log-probabilities;
- the model's own ops compiled by Inductor on both sides with the same
  options (the default): every op's result rounded to its dtype as eager
  rounds it, reduction configs that do not depend on the row count; or
  eager on both sides (`exact_engine_args(inductor=False)`: no Inductor
  in the engine, CUDA graphs for decode steps replay the same kernels).
  Inductor in the engine alone changes every log-probability (0% equal,
  measured): it fuses and reorders what eager ops compute.

`exact_engine_args` gives the engine's side, `prepare_trainer` the
trainer's; `CallableModelWrapper` runs a generic model's `compute_logits`
under `row_invariant_matmuls` whenever batch-invariant mode is on.
"""

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# Inductor off (vLLM's CompilationMode.NONE); CUDA graphs for decode steps.
# Prefills run eager: a FULL graph replayed for a small prefill step gave
# wrong log-probabilities for its sequences (Megatron-core model, H200).
EXACT_COMPILATION = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}

# Inductor's options for both sides when both compile: keep eager's
# rounding of each op's result (no fp32 chains across fused ops), pick
# reduction configs independently of the row count, no horizontal fusion,
# and none of its graph rewrites: one of them folds an add that follows a
# GEMM into the GEMM (`mm + residual` -> `addmm`, one rounding instead of
# two) or splits a bias off it, depending on where the graph ends and on
# what the backward saves, which differ between the trainer's graphs and
# the engine's. Options this torch does not know are left out
# (`exact_inductor_options`).
EXACT_INDUCTOR = {
    "emulate_precision_casts": True,
    "batch_invariant": True,
    "deterministic": True,
    "combo_kernels": False,
    "benchmark_combo_kernel": False,
    "pattern_matcher": False,
}


class ExactLogprobsError(ValueError):
    """A setting the exact configuration cannot honour."""


def exact_inductor_options() -> dict[str, bool]:
    """`EXACT_INDUCTOR` less the options this torch's Inductor lacks."""
    from torch._inductor import config

    return {key: value for key, value in EXACT_INDUCTOR.items() if hasattr(config, key)}


def exact_engine_args(
    device: str | None = None, inductor: bool | None = None, **engine_args: Any
) -> dict:
    """`engine_args` for `vllm.LLM` (or `AsyncEngineArgs`) with the exact
    configuration's settings added, after checking that none of them is
    contradicted. Turns on batch-invariant mode in this process's
    environment (`VLLM_BATCH_INVARIANT=1`), which the engine's processes
    inherit, so call it before starting the engine. `device` defaults to
    this machine's ("cuda" when available).

    `inductor=True` compiles the engine's model with Inductor
    (`EXACT_INDUCTOR`), and `prepare_trainer` then compiles the trainer's
    module with the same options: vLLM's speed. `inductor=False` runs the
    model's ops eagerly on both sides (no trainer compilation; a model
    that Dynamo cannot trace whole). `None`, the default, is True unless
    `enforce_eager` or a `compilation_config` with mode 0 asks for no
    compilation."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cuda":
        raise ExactLogprobsError(
            "exact log-probabilities need CUDA: vLLM's batch-invariant "
            f"kernels are Triton GPU kernels, and this is device {device!r}. "
            "On the CPU in fp32 the trainer's and vLLM's log-probabilities "
            "agree within about 1e-6 without any setting."
        )
    compilation = dict(engine_args.pop("compilation_config", None) or {})
    attention = engine_args.get("attention_config") or {}
    backend = attention.get("backend") if isinstance(attention, dict) else None
    if backend not in (None, "FLASH_ATTN"):
        raise ExactLogprobsError(
            f"attention backend {backend}: the trainer can run only "
            "FLASH_ATTN's kernel (use_generator_attention_kernel); leave the "
            "backend unset or pass FLASH_ATTN."
        )
    if inductor is None:
        inductor = not engine_args.get("enforce_eager") and compilation.get(
            "mode"
        ) not in (0, "NONE")
    if inductor:
        if engine_args.get("enforce_eager"):
            raise ExactLogprobsError(
                "inductor=True compiles the engine's model: drop enforce_eager"
            )
        from vllm.config import CompilationMode

        options = compilation.get("inductor_compile_config", {})
        settings = {
            **compilation,
            "mode": CompilationMode.VLLM_COMPILE,
            "inductor_compile_config": {**options, **exact_inductor_options()},
        }
    else:
        mode = compilation.get("mode", 0)
        if mode not in (0, "NONE") or compilation.get("backend") == "inductor":
            raise ExactLogprobsError(
                f"compilation_config={compilation} compiles with torch.compile: "
                "Inductor's generated kernels change the engine's log-"
                "probabilities (none equal the trainer's, measured) unless "
                "the trainer compiles with the same options: pass "
                "inductor=True, or leave compilation_config out (mode 0 with "
                "CUDA graphs)."
            )
        settings = {**EXACT_COMPILATION, **compilation}
        if engine_args.get("enforce_eager"):
            settings = {"mode": 0, "cudagraph_mode": "NONE"}
    os.environ["VLLM_BATCH_INVARIANT"] = "1"
    return {**engine_args, "compilation_config": settings}


def prepare_trainer(model: torch.nn.Module, llm) -> int:
    """The trainer's side, in the trainer's process: vLLM's batch-invariant
    ops, and the engine's attention kernel (its KV-cache block size and
    flash-attention version) for every `TrainableFlashAttention` in
    `model`, and, when the engine compiles its model with Inductor
    (the default of `exact_engine_args`), `model.compile` with the same
    Inductor options. Returns how many attention modules were switched.
    The trainer then computes logits inside `row_invariant_matmuls()` and
    the sampled tokens' log-probabilities with `token_logprobs`."""
    if os.environ.get("VLLM_BATCH_INVARIANT") != "1":
        raise ExactLogprobsError(
            "the engine was not started with exact_engine_args(...): "
            "VLLM_BATCH_INVARIANT=1 is not set in this process"
        )
    from vllm.model_executor.layers.trainable_attention import (
        use_generator_attention_kernel,
    )

    _batch_invariant().init_batch_invariance()
    from vllm.config import CompilationMode

    config = llm.llm_engine.vllm_config
    if config.compilation_config.mode == CompilationMode.VLLM_COMPILE:
        # rows vary from call to call: one graph for every length
        model.compile(dynamic=True, options=exact_inductor_options())
    version = config.attention_config.flash_attn_version
    if version is None:
        from vllm.v1.attention.backends.fa_utils import get_flash_attn_version

        version = get_flash_attn_version()
    return use_generator_attention_kernel(
        model, config.cache_config.block_size, version
    )


@contextlib.contextmanager
def row_invariant_matmuls() -> Iterator[None]:
    """Inside: `F.linear` and matrix products with a 2-D right operand run
    vLLM's persistent Triton GEMM, whose fixed tiles reduce every output in
    one order whatever the number of rows. Gradients flow (the backward
    uses PyTorch's GEMMs: only the forward's rows need to match)."""
    with _RowInvariantMode():
        yield


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """fp32 log-probability of `token_ids[i]` under `logits[i]`, computed as
    vLLM's GPU sampler computes the log-probabilities it returns: its
    kernel, on the logits as the model produced them (no cast). Gradients
    flow to `logits` (the backward uses PyTorch's softmax)."""
    if not logits.is_cuda:
        return torch.log_softmax(logits.float(), -1).gather(1, token_ids[:, None])[:, 0]
    return _TokenLogprobs.apply(logits, token_ids)


def batch_invariant_mode_on() -> bool:
    from vllm import envs

    return bool(envs.VLLM_BATCH_INVARIANT) and torch.cuda.is_available()


def _batch_invariant():
    """vLLM's batch-invariant kernels: layers/ up to 0.26, determinism/
    from 0.32."""
    try:
        from vllm.model_executor.determinism import batch_invariant
    except ImportError:
        from vllm.model_executor.layers import batch_invariant
    return batch_invariant


class _RowInvariantMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        rows = a.reshape(-1, a.shape[-1])
        out = _batch_invariant().matmul_persistent(rows, b)
        return out.view(*a.shape[:-1], b.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        grad_rows = grad.reshape(-1, grad.shape[-1])
        grad_a = (grad_rows @ b.t()).view_as(a)
        grad_b = a.reshape(-1, a.shape[-1]).t() @ grad_rows
        return grad_a, grad_b


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        from vllm.v1.worker.gpu.sample.logprob import compute_token_logprobs

        ctx.save_for_backward(logits, token_ids)
        return compute_token_logprobs(logits, token_ids[:, None])[:, 0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, token_ids = ctx.saved_tensors
        # d log p(t) / d logits = onehot(t) - softmax(logits)
        grad_logits = -torch.softmax(logits.float(), -1) * grad[:, None]
        grad_logits[torch.arange(len(token_ids)), token_ids] += grad
        return grad_logits.to(logits.dtype), None


class _RowInvariantMode(TorchFunctionMode):
    MATMULS = {torch.matmul, torch.mm, torch.Tensor.matmul, torch.Tensor.__matmul__}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.is_cuda and torch.is_autocast_enabled("cuda"):
                # this runs before autocast's casts: make them here
                dtype = torch.get_autocast_dtype("cuda")
                x, weight = x.to(dtype), weight.to(dtype)
                bias = bias.to(dtype) if bias is not None else None
            if self._supported(x, weight):
                out = _RowInvariantMatmul.apply(x, weight.t())
                return out + bias if bias is not None else out
        elif func in self.MATMULS and not kwargs and len(args) == 2:
            if self._supported(*args):
                return _RowInvariantMatmul.apply(*args)
        return func(*args, **kwargs)

    @staticmethod
    def _supported(a, b) -> bool:
        return (
            a.is_cuda
            and a.dim() >= 2
            and b.dim() == 2
            and a.dtype == b.dtype
            and a.dtype in (torch.bfloat16, torch.float16, torch.float32)
        )
