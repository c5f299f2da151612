# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""One attention module for training and for vLLM inference.

`TrainableFlashAttention` takes per-head `q, k, v` and returns per-head
output. Where it runs decides what it does:

* Inside a vLLM forward pass (a vLLM forward context is set), it calls a
  vLLM `Attention` layer: vLLM's paged KV cache, attention metadata and
  per-platform backends (FLASH_ATTN FA2/FA3 and the others on CUDA, the CPU
  backend on the CPU), with prefix caching, chunked prefill and CUDA graphs
  as vLLM configures them. Input: `[num_tokens, heads, head_dim]`, as vLLM
  flattens the batch.
* Anywhere else it is a training op with gradients:
  - packed variable-length input `[total_tokens, heads, head_dim]` with
    `cu_seqlens` (int32 `[num_seqs + 1]`, the sequence boundaries), or
  - padded input `[batch, seq_len, heads, head_dim]`.
  On CUDA it runs FlashAttention-2 varlen (vLLM's `vllm_flash_attn` when
  present, else PyTorch's `aten._flash_attention_forward`) with the flash
  backward kernel (`aten._flash_attention_backward`). On other devices it
  runs a reference path (SDPA per sequence) with the same numbers.
  `use_generator_attention_kernel` switches the CUDA forward to the kernel
  vLLM's FLASH_ATTN backend runs over its paged KV cache, for trainers that
  must reproduce the generator's log-probabilities bit for bit.

The vLLM `Attention` layer is created by `bind_to_vllm`, which
`CallableModelWrapper` calls for every `TrainableFlashAttention` in the
module a factory returns; that layer has no parameters, so a model trains
and serves with one definition and loads one checkpoint. Rotary embeddings are
applied by the model before this module, from explicit positions: vLLM
passes `positions` to the model's forward, and training code passes
`position_ids` (per sequence, restarting at 0 after every `cu_seqlens`
boundary; `pack_sequences` builds both), so both modes see the same
rotated q and k.
"""

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from vllm.logger import init_logger

logger = init_logger(__name__)

TrainingBackend = Literal["auto", "flash", "reference"]
# what the training forward runs: FA2 varlen, vLLM's kernel over paged K/V
# (`use_generator_attention_kernel`), or SDPA per sequence
TrainingKernel = Literal["flash", "paged", "reference"]


@dataclass(frozen=True)
class PagedKernel:
    """The attention kernel as vLLM's FLASH_ATTN backend runs it on CUDA.

    vLLM reads keys and values from its paged KV cache, prefill and decode
    alike, and a block table can select other kernel code than contiguous
    K/V does: another key tile, so another summation order in the online
    softmax, and outputs an ulp apart. (On an H100 with FA3 it does; FA2's
    contiguous kernel gave the paged kernel's results for Qwen3's shapes.)
    A training forward that copies K/V into pages of the same block size
    and calls the same kernel with `num_splits=1` (what vLLM uses in
    batch-invariant mode) reproduces the generator's rows bit for bit:
    each query row's result depends only on its own keys and the key
    tiling, not on which other rows share the call.
    """

    block_size: int = 16
    flash_attn_version: int = 2


class TrainableFlashAttention(nn.Module):
    """Scaled dot-product attention over heads, with GQA/MQA.

    Args:
        num_heads: query heads (on this tensor-parallel rank).
        head_dim: size of each head.
        num_kv_heads: key/value heads (on this rank); defaults to
            `num_heads`. Must divide `num_heads`.
        causal: mask future tokens. vLLM inference requires `True`.
        softmax_scale: defaults to `head_dim ** -0.5`.
        sliding_window: attend to at most this many tokens, the current
            one included (`None`: no window).
        dropout: attention dropout, training path only, when
            `self.training`.
        training_backend: "auto" (flash on CUDA, reference elsewhere),
            "flash" or "reference".
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        num_kv_heads: int | None = None,
        *,
        causal: bool = True,
        softmax_scale: float | None = None,
        sliding_window: int | None = None,
        dropout: float = 0.0,
        training_backend: TrainingBackend = "auto",
    ) -> None:
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                f"({num_kv_heads}) for grouped-query attention."
            )
        if training_backend not in ("auto", "flash", "reference"):
            raise ValueError(
                f"training_backend must be 'auto', 'flash' or "
                f"'reference', not {training_backend!r}"
            )
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, not {sliding_window}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.causal = causal
        self.softmax_scale = softmax_scale or head_dim**-0.5
        self.sliding_window = sliding_window
        self.dropout = dropout
        self.training_backend = training_backend
        # The vLLM layer, set by bind_to_vllm. It has no parameters, so the
        # module loads the same checkpoint in both modes.
        self.vllm_attention: nn.Module | None = None
        # Set by use_generator_attention_kernel.
        self.paged_kernel: PagedKernel | None = None

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_kv_heads="
            f"{self.num_kv_heads}, head_dim={self.head_dim}, causal="
            f"{self.causal}, sliding_window={self.sliding_window}"
        )

    # ---------------------------------------------------------------- vLLM

    def bind_to_vllm(self, layer_name: str, cache_config=None) -> None:
        """Create the vLLM `Attention` layer that serves this module in vLLM
        forward passes. Must run while vLLM builds the model (the current
        vLLM config is set); `layer_name` must be unique in the model and
        hold the layer index, e.g. `model.layers.3.attn`."""
        from vllm.model_executor.layers.attention import Attention

        if not self.causal:
            raise ValueError(
                f"{layer_name}: vLLM serves decoder (causal) attention; "
                "build TrainableFlashAttention with causal=True."
            )
        try:
            attention = Attention(
                num_heads=self.num_heads,
                head_size=self.head_dim,
                scale=self.softmax_scale,
                num_kv_heads=self.num_kv_heads,
                cache_config=cache_config,
                per_layer_sliding_window=self.sliding_window,
                prefix=layer_name,
            )
        except (ValueError, RuntimeError) as e:
            raise ValueError(
                f"{layer_name}: vLLM found no attention backend for "
                f"TrainableFlashAttention({self.extra_repr()}) on this "
                f"platform: {e}"
            ) from e
        backend = attention.get_attn_backend()
        if not backend.supports_head_size(self.head_dim):
            raise ValueError(
                f"{layer_name}: head_dim {self.head_dim} is not supported by "
                f"vLLM's {backend.get_name()} attention backend; supported "
                f"head sizes: {backend.get_supported_head_sizes()}."
            )
        self.vllm_attention = attention

    # -------------------------------------------------------------- forward

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        self._check_heads(q, k, v)
        if self.vllm_attention is not None and _in_vllm_forward():
            if cu_seqlens is not None or q.dim() != 3:
                raise ValueError(
                    "In a vLLM forward pass pass q, k, v as [num_tokens, "
                    "heads, head_dim] without cu_seqlens: vLLM tracks the "
                    "sequences itself."
                )
            num_tokens = q.shape[0]
            out = self.vllm_attention(
                q.reshape(num_tokens, -1),
                k.reshape(num_tokens, -1),
                v.reshape(num_tokens, -1),
            )
            return out.view(num_tokens, self.num_heads, self.head_dim)

        if q.dim() == 4:  # padded [batch, seq, heads, dim]
            if cu_seqlens is not None:
                raise ValueError(
                    "cu_seqlens goes with packed [tokens, heads,"
                    " dim] input, not padded 4-D input."
                )
            batch, seq_len = q.shape[:2]
            cu_seqlens = torch.arange(
                0, (batch + 1) * seq_len, seq_len, dtype=torch.int32, device=q.device
            )
            out = self.forward(
                q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_seqlens, seq_len
            )
            return out.view(batch, seq_len, self.num_heads, self.head_dim)
        if q.dim() != 3:
            raise ValueError(
                f"q must be [tokens, heads, head_dim] or [batch,"
                f" seq, heads, head_dim], got {tuple(q.shape)}"
            )
        if cu_seqlens is None:  # one sequence
            cu_seqlens = torch.tensor(
                [0, q.shape[0]], dtype=torch.int32, device=q.device
            )
        dropout = self.dropout if self.training else 0.0
        kernel = self._training_kernel(q, dropout)
        paged = self.paged_kernel or PagedKernel()
        if torch.compiler.is_compiling() and not dropout:
            # One opaque op: reading the sequence lengths (`.item()`) would
            # break the trainer's graph, and Dynamo then runs whole frames
            # eagerly (the model's final norm, say) where the engine's graph
            # compiles them, so the two sides would round apart.
            return torch.ops.vllm.trainable_attention(
                q,
                k,
                v,
                cu_seqlens,
                -1 if max_seqlen is None else max_seqlen,
                self.softmax_scale,
                self.causal,
                self._window_left(),
                kernel,
                paged.block_size,
                paged.flash_attn_version,
            )
        return training_attention(
            q,
            k,
            v,
            cu_seqlens,
            max_seqlen,
            self.softmax_scale,
            self.causal,
            self._window_left(),
            kernel,
            paged,
            dropout,
        )

    def _training_kernel(self, q: torch.Tensor, dropout: float) -> TrainingKernel:
        if self.paged_kernel is not None:
            self._check_paged_kernel_inputs(q, dropout)
            return "paged"
        return "flash" if self._use_flash(q) else "reference"

    def _use_flash(self, q: torch.Tensor) -> bool:
        if self.training_backend == "reference":
            return False
        usable = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
        if self.training_backend == "flash" and not usable:
            raise ValueError(
                "training_backend='flash' needs fp16/bf16 tensors on a CUDA "
                f"device, got {q.dtype} on {q.device}; use 'reference' or "
                "'auto' for other inputs."
            )
        return usable

    def _check_paged_kernel_inputs(self, q: torch.Tensor, dropout: float) -> None:
        if (
            _vllm_flash_varlen() is None
            or not q.is_cuda
            or q.dtype not in (torch.float16, torch.bfloat16)
        ):
            raise ValueError(
                "use_generator_attention_kernel needs vLLM's flash-attn "
                "kernels (vllm.vllm_flash_attn) and fp16/bf16 tensors on "
                f"CUDA, got {q.dtype} on {q.device}."
            )
        if dropout or not self.causal:
            raise ValueError(
                "use_generator_attention_kernel reproduces vLLM's causal "
                "attention without dropout; this module has causal="
                f"{self.causal}, dropout={self.dropout}."
            )

    def _window_left(self) -> int:
        return -1 if self.sliding_window is None else self.sliding_window - 1

    def _check_heads(self, q, k, v) -> None:
        if not (q.dtype == k.dtype == v.dtype):
            raise ValueError(
                f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
            )
        if not (q.device == k.device == v.device):
            raise ValueError(
                f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}"
            )
        expected = (
            (self.num_heads, self.head_dim),
            (self.num_kv_heads, self.head_dim),
            (self.num_kv_heads, self.head_dim),
        )
        for name, tensor, heads in zip("qkv", (q, k, v), expected):
            if tuple(tensor.shape[-2:]) != heads:
                raise ValueError(
                    f"{name} has shape {tuple(tensor.shape)}; expected "
                    f"[..., {heads[0]} heads, {heads[1]} head_dim] for this "
                    f"module ({self.extra_repr()})."
                )

    @staticmethod
    def _check_cu_seqlens(q: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
            raise ValueError(
                "cu_seqlens must be a 1-D int32 tensor, got "
                f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
            )
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != q.shape[0]:
            raise ValueError(
                f"cu_seqlens must start at 0 and end at the token count "
                f"({q.shape[0]}), got {cu_seqlens.tolist()}"
            )
        if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError(f"cu_seqlens must not decrease, got {cu_seqlens.tolist()}")


def bind_trainable_attention(
    model: nn.Module, cache_config=None, prefix: str = ""
) -> int:
    """Bind every unbound `TrainableFlashAttention` in `model` to vLLM,
    named by its module path under `prefix`. Returns how many were bound."""
    bound = 0
    for name, module in model.named_modules():
        if (
            isinstance(module, TrainableFlashAttention)
            and module.vllm_attention is None
        ):
            path = f"{prefix}.{name}" if prefix else name
            module.bind_to_vllm(f"{path}.vllm_attention", cache_config)
            bound += 1
    return bound


def use_generator_attention_kernel(
    model: nn.Module, block_size: int = 16, flash_attn_version: int = 2
) -> int:
    """Run the training forward of every `TrainableFlashAttention` in
    `model` through the kernel vLLM's FLASH_ATTN backend runs: keys and
    values copied into pages of `block_size` tokens, vLLM's
    `flash_attn_varlen_func` with a block table and `num_splits=1`. Pass the
    engine's KV-cache block size and flash-attention version. With vLLM's
    batch-invariant mode on in both processes (`VLLM_BATCH_INVARIANT=1`,
    which also makes the engine use one split), the trainer's attention
    rows then equal the generator's bit for bit. Gradients still come from
    the flash backward kernel. Returns how many modules were switched."""
    if block_size < 1 or block_size % 16:
        raise ValueError(
            f"block_size must be a positive multiple of 16 "
            f"(vLLM's flash KV cache pages), got {block_size}"
        )
    if flash_attn_version not in (2, 3):
        raise ValueError(f"flash_attn_version must be 2 or 3, got {flash_attn_version}")
    kernel = PagedKernel(block_size, flash_attn_version)
    switched = 0
    for module in model.modules():
        if isinstance(module, TrainableFlashAttention):
            module.paged_kernel = kernel
            switched += 1
    return switched


def pack_sequences(
    sequences: list[list[int]],
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(input_ids, positions, cu_seqlens)` of token sequences packed into
    one varlen batch, the training input `TrainableFlashAttention` takes:
    positions restart at 0 for each sequence, `cu_seqlens` (int32) holds
    the boundaries."""
    lengths = [len(sequence) for sequence in sequences]
    input_ids = torch.tensor(
        [t for sequence in sequences for t in sequence], device=device
    )
    positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
    cu_seqlens = torch.tensor([0] + lengths, device=device).cumsum(0, dtype=torch.int32)
    return input_ids, positions, cu_seqlens


def training_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None,
    scale: float,
    causal: bool,
    window_left: int,
    kernel: TrainingKernel,
    paged: PagedKernel,
    dropout: float = 0.0,
) -> torch.Tensor:
    """The training forward of `TrainableFlashAttention` (packed input,
    gradients through autograd)."""
    TrainableFlashAttention._check_cu_seqlens(q, cu_seqlens)
    if max_seqlen is None:
        max_seqlen = _max_seqlen(cu_seqlens)
    if kernel == "paged":
        return PagedFlashAttentionVarlen.apply(
            q,
            k,
            v,
            cu_seqlens,
            max_seqlen,
            scale,
            window_left,
            paged.block_size,
            paged.flash_attn_version,
        )
    if kernel == "flash":
        return FlashAttentionVarlen.apply(
            q, k, v, cu_seqlens, max_seqlen, scale, causal, window_left, dropout
        )
    _log_backend_once("reference (SDPA per sequence)")
    sliding_window = None if window_left < 0 else window_left + 1
    return reference_attention(
        q, k, v, cu_seqlens, scale, causal, sliding_window, dropout
    )


# ------------------------------------------------------- compiled trainers
#
# `torch.compile` sees the training forward as one op, so a compiled
# trainer's graph is cut only where vLLM's is (at attention). The backward
# op recomputes the forward (deterministic without dropout, which compiled
# trainers run eagerly) instead of returning its log-sum-exp, whose shape
# differs between kernels.


@torch.library.custom_op("vllm::trainable_attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
    causal: bool,
    window_left: int,
    kernel: str,
    block_size: int,
    flash_attn_version: int,
) -> torch.Tensor:
    with torch.no_grad():
        out = training_attention(
            q,
            k,
            v,
            cu_seqlens,
            None if max_seqlen < 0 else max_seqlen,
            scale,
            causal,
            window_left,
            kernel,  # type: ignore[arg-type]
            PagedKernel(block_size, flash_attn_version),
        )
    return out.contiguous()


@_attention_op.register_fake
def _(q, k, v, *args):
    return q.new_empty(q.shape)


@torch.library.custom_op("vllm::trainable_attention_backward", mutates_args=())
def _attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
    causal: bool,
    window_left: int,
    kernel: str,
    block_size: int,
    flash_attn_version: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if max_seqlen < 0:
        max_seqlen = _max_seqlen(cu_seqlens)
    if kernel == "reference":
        # the autograd key is off inside an op; functorch's vjp still works
        sliding_window = None if window_left < 0 else window_left + 1
        _, vjp = torch.func.vjp(
            lambda q, k, v: reference_attention(
                q, k, v, cu_seqlens, scale, causal, sliding_window
            ),
            q,
            k,
            v,
        )
        grads = vjp(grad_out)
    else:
        if kernel == "paged":
            out, lse = _paged_flash_forward(
                q,
                k,
                v,
                cu_seqlens,
                max_seqlen,
                scale,
                window_left,
                block_size,
                flash_attn_version,
            )
            causal = True
        else:
            out, lse = _flash_forward(
                q, k, v, cu_seqlens, max_seqlen, scale, causal, window_left
            )[:2]
        empty = torch.empty(0, dtype=torch.int64, device=q.device)
        grads = _flash_backward(
            grad_out,
            q,
            k,
            v,
            out,
            lse,
            cu_seqlens,
            empty,
            empty,
            (max_seqlen, scale, causal, window_left, 0.0),
        )
    return tuple(grad.contiguous() for grad in grads)  # type: ignore[return-value]


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, *args):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_op_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.settings = inputs[4:]


def _attention_op_backward(ctx, grad_out):
    q, k, v, cu_seqlens = ctx.saved_tensors
    grads = torch.ops.vllm.trainable_attention_backward(
        grad_out, q, k, v, cu_seqlens, *ctx.settings
    )
    return (*grads, *[None] * 8)


_attention_op.register_autograd(
    _attention_op_backward, setup_context=_attention_op_setup
)


def _in_vllm_forward() -> bool:
    # Imported here: vllm.forward_context imports vllm.config, which must
    # not be a dependency of importing this layer.
    from vllm.forward_context import is_forward_context_available

    return is_forward_context_available()


_logged_backends: set[str] = set()


def _log_backend_once(name: str) -> None:
    if name not in _logged_backends:
        _logged_backends.add(name)
        logger.info("TrainableFlashAttention training path: %s", name)


# ---------------------------------------------------------------- reference


def reference_attention(
    q, k, v, cu_seqlens, scale, causal, sliding_window, dropout=0.0
) -> torch.Tensor:
    """Attention of each packed sequence on its own, through SDPA."""
    group = q.shape[1] // k.shape[1]
    outputs = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        # [heads, seq, dim]
        qs = q[start:end].transpose(0, 1)
        ks = k[start:end].transpose(0, 1).repeat_interleave(group, dim=0)
        vs = v[start:end].transpose(0, 1).repeat_interleave(group, dim=0)
        mask = _mask(end - start, causal, sliding_window, q.device)
        out = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, dropout_p=dropout, scale=scale
        )
        outputs.append(out.transpose(0, 1))
    if not outputs:
        return q.new_empty(q.shape)
    return torch.cat(outputs)


def _mask(seq_len, causal, sliding_window, device) -> torch.Tensor | None:
    if not causal and sliding_window is None:
        return None
    query = torch.arange(seq_len, device=device)[:, None]
    key = torch.arange(seq_len, device=device)[None, :]
    allowed = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
    if causal:
        allowed &= key <= query
    if sliding_window is not None:
        allowed &= (query - key).abs() < sliding_window
    return allowed


# -------------------------------------------------------------------- flash


def _vllm_flash_varlen():
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _flash_forward(
    q, k, v, cu_seqlens, max_seqlen, scale, causal, window_left, dropout=0.0
):
    """FA2 varlen forward: `(out, lse, seed, offset)`."""
    vllm_varlen = _vllm_flash_varlen()
    window_right = 0 if causal else window_left
    if vllm_varlen is not None and dropout == 0.0:
        _log_backend_once(
            "FA2 varlen (vllm_flash_attn) + aten._flash_attention_backward"
        )
        out, lse = vllm_varlen(
            q,
            k,
            v,
            max_seqlen_q=max_seqlen,
            cu_seqlens_q=cu_seqlens,
            max_seqlen_k=max_seqlen,
            cu_seqlens_k=cu_seqlens,
            softmax_scale=scale,
            causal=causal,
            window_size=(window_left, window_right),
            fa_version=2,
            return_softmax_lse=True,
        )
        seed = offset = torch.empty(0, dtype=torch.int64, device=q.device)
        return out, lse, seed, offset
    _log_backend_once(
        "FA2 varlen (aten._flash_attention_forward) + aten._flash_attention_backward"
    )
    out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
        q,
        k,
        v,
        cu_seqlens,
        cu_seqlens,
        max_seqlen,
        max_seqlen,
        dropout,
        causal,
        False,
        scale=scale,
        window_size_left=_or_none(window_left),
        window_size_right=_or_none(window_right),
    )
    return out, lse, seed, offset


def _paged_flash_forward(
    q, k, v, cu_seqlens, max_seqlen, scale, window_left, block_size, flash_attn_version
):
    """vLLM's flash kernel over a paged copy of K/V, causal, one split:
    `(out, lse)`."""
    _log_backend_once(
        f"FA{flash_attn_version} varlen over paged K/V "
        "(vllm_flash_attn, as vLLM's FLASH_ATTN backend) "
        "+ aten._flash_attention_backward"
    )
    key_cache, value_cache, block_table = paged_kv(k, v, cu_seqlens, block_size)
    return _vllm_flash_varlen()(
        q,
        key_cache,
        value_cache,
        max_seqlen_q=max_seqlen,
        cu_seqlens_q=cu_seqlens,
        max_seqlen_k=max_seqlen,
        seqused_k=(cu_seqlens[1:] - cu_seqlens[:-1]).int(),
        block_table=block_table,
        softmax_scale=scale,
        causal=True,
        window_size=(window_left, 0),
        num_splits=1,
        fa_version=flash_attn_version,
        return_softmax_lse=True,
    )


def _flash_backward(grad_out, q, k, v, out, lse, cu_seqlens, seed, offset, args):
    """The flash backward kernel from a forward's output and log-sum-exp;
    `args`: (max_seqlen, scale, causal, window_left, dropout)."""
    max_seqlen, scale, causal, window_left, dropout = args
    window_right = 0 if causal else window_left
    return torch.ops.aten._flash_attention_backward(
        grad_out.contiguous(),
        q,
        k,
        v,
        out,
        lse,
        cu_seqlens,
        cu_seqlens,
        max_seqlen,
        max_seqlen,
        dropout,
        causal,
        seed,
        offset,
        scale=scale,
        window_size_left=_or_none(window_left),
        window_size_right=_or_none(window_right),
    )


class FlashAttentionVarlen(torch.autograd.Function):
    """FA2 varlen forward and the flash backward kernel."""

    @staticmethod
    def forward(
        ctx, q, k, v, cu_seqlens, max_seqlen, scale, causal, window_left, dropout
    ):
        out, lse, seed, offset = _flash_forward(
            q, k, v, cu_seqlens, max_seqlen, scale, causal, window_left, dropout
        )
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, seed, offset)
        ctx.args = (max_seqlen, scale, causal, window_left, dropout)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seqlens, seed, offset = ctx.saved_tensors
        grads = _flash_backward(
            grad_out, q, k, v, out, lse, cu_seqlens, seed, offset, ctx.args
        )
        return (*grads, None, None, None, None, None, None)


class PagedFlashAttentionVarlen(FlashAttentionVarlen):
    """vLLM's flash kernel over a paged copy of K/V (see `PagedKernel`),
    causal, one split; the backward is FA2's on the contiguous K/V, with
    this forward's output and log-sum-exp."""

    @staticmethod
    def forward(
        ctx,
        q,
        k,
        v,
        cu_seqlens,
        max_seqlen,
        scale,
        window_left,
        block_size,
        flash_attn_version,
    ):
        out, lse = _paged_flash_forward(
            q,
            k,
            v,
            cu_seqlens,
            max_seqlen,
            scale,
            window_left,
            block_size,
            flash_attn_version,
        )
        seed = offset = torch.empty(0, dtype=torch.int64, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, seed, offset)
        # what FlashAttentionVarlen.backward reads: causal, no dropout
        ctx.args = (max_seqlen, scale, True, window_left, 0.0)
        return out


def paged_kv(
    k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, block_size: int
):
    """Packed K/V `[tokens, kv_heads, head_dim]` copied into pages laid out
    as vLLM's flash KV cache is (`[blocks, block_size, kv_heads,
    2 * head_dim]`, each head's key then value), each sequence in pages of
    its own. Returns the key and value views and the int32 block table."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    blocks_per_sequence = (lengths + block_size - 1) // block_size
    first_block = blocks_per_sequence.cumsum(0) - blocks_per_sequence
    num_blocks = max(int(blocks_per_sequence.sum()), 1)
    width = max(int(blocks_per_sequence.max()), 1)
    block_table = first_block[:, None] + torch.arange(width, device=k.device)
    # vLLM pads block tables with block 0; those entries are never read
    block_table = torch.where(
        block_table < (first_block + blocks_per_sequence)[:, None], block_table, 0
    ).int()
    sequence = torch.repeat_interleave(
        torch.arange(len(lengths), device=k.device), lengths
    )
    position = torch.arange(k.shape[0], device=k.device) - cu_seqlens[sequence].long()
    slot = first_block[sequence] * block_size + position
    head_dim = k.shape[-1]
    pages = k.new_zeros(num_blocks * block_size, k.shape[1], 2 * head_dim)
    pages[slot, :, :head_dim] = k
    pages[slot, :, head_dim:] = v
    pages = pages.view(num_blocks, block_size, k.shape[1], 2 * head_dim)
    key_cache, value_cache = pages.split(head_dim, dim=-1)
    return key_cache, value_cache, block_table


def _max_seqlen(cu_seqlens: torch.Tensor) -> int:
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def _or_none(window: int) -> int | None:
    return None if window < 0 else window
