# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""TrainableFlashAttention's training path against a float64 reference
written from the definition of attention (not through SDPA)."""

import pytest
import torch

from vllm.model_executor.layers.trainable_attention import (
    TrainableFlashAttention,
    pack_sequences,
)

CUDA = torch.cuda.is_available()
NEEDS_CUDA = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def naive_attention(q, k, v, cu_seqlens, scale, causal, window):
    """softmax(q k^T * scale + mask) v, sequence by sequence, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        n = end - start
        for head in range(q.shape[1]):
            qh = q[start:end, head]
            kh = k[start:end, head // group]
            vh = v[start:end, head // group]
            scores = qh @ kh.T * scale
            i = torch.arange(n)[:, None]
            j = torch.arange(n)[None, :]
            allowed = torch.ones(n, n, dtype=torch.bool)
            if causal:
                allowed &= j <= i
            if window is not None:
                allowed &= (i - j).abs() < window
            scores = scores.masked_fill(~allowed, float("-inf"))
            out[start:end, head] = torch.softmax(scores, -1) @ vh
    return out


def packed_inputs(lengths, heads, kv_heads, head_dim, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    make = lambda h: torch.randn(
        total, h, head_dim, generator=gen, dtype=torch.float64
    ).to(device, dtype)
    q, k, v = make(heads), make(kv_heads), make(kv_heads)
    cu_seqlens = torch.tensor(
        [0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=device
    )
    return q, k, v, cu_seqlens


CASES = [
    # heads, kv_heads, causal, window
    (4, 4, True, None),
    (4, 4, False, None),
    (8, 2, True, None),  # GQA
    (4, 1, True, None),  # MQA
    (4, 2, True, 3),  # sliding window
    (4, 2, False, 4),
]


@pytest.mark.parametrize("heads,kv_heads,causal,window", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_reference_path_matches_float64(heads, kv_heads, causal, window, dtype, tol):
    lengths = [1, 2, 3, 5, 8, 13]  # varlen, a single token included
    head_dim = 16
    q, k, v, cu = packed_inputs(lengths, heads, kv_heads, head_dim, dtype)
    attn = TrainableFlashAttention(
        heads,
        head_dim,
        kv_heads,
        causal=causal,
        sliding_window=window,
        training_backend="reference",
    )
    for t in (q, k, v):
        t.requires_grad_(True)
    out = attn(q, k, v, cu_seqlens=cu)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    ref_inputs = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = naive_attention(*ref_inputs, cu, head_dim**-0.5, causal, window)
    ref.backward(grad_out.double())

    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    for got, want in zip((q, k, v), ref_inputs):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=tol, rtol=tol)


def test_padded_form_equals_packed():
    q, k, v, cu = packed_inputs([6, 6, 6], 4, 2, 16, torch.float64)
    attn = TrainableFlashAttention(4, 16, 2)
    packed = attn(q, k, v, cu_seqlens=cu)
    padded = attn(q.view(3, 6, 4, 16), k.view(3, 6, 2, 16), v.view(3, 6, 2, 16))
    torch.testing.assert_close(padded.reshape(18, 4, 16), packed)


def test_pack_sequences():
    input_ids, positions, cu_seqlens = pack_sequences([[5, 6, 7], [8], [9, 10]])
    assert input_ids.tolist() == [5, 6, 7, 8, 9, 10]
    assert positions.tolist() == [0, 1, 2, 0, 0, 1]  # restart per sequence
    assert cu_seqlens.tolist() == [0, 3, 4, 6]
    assert cu_seqlens.dtype == torch.int32  # what the varlen kernels take


def test_gradcheck():
    q, k, v, cu = packed_inputs([1, 3, 2], 2, 1, 4, torch.float64, seed=1)
    attn = TrainableFlashAttention(2, 4, 1, sliding_window=2)
    inputs = tuple(t.requires_grad_(True) for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: attn(q, k, v, cu_seqlens=cu), inputs
    )


def test_dropout_only_when_training():
    q, k, v, cu = packed_inputs([16], 2, 2, 8, torch.float32)
    attn = TrainableFlashAttention(2, 8, dropout=0.5)
    attn.eval()
    torch.testing.assert_close(attn(q, k, v, cu), attn(q, k, v, cu))
    attn.train()
    torch.manual_seed(0)
    assert not torch.allclose(attn(q, k, v, cu), attn.eval()(q, k, v, cu))


@pytest.mark.parametrize(
    "kwargs,call,message",
    [
        (
            dict(num_heads=6, head_dim=8, num_kv_heads=4),
            None,
            r"num_heads \(6\) must be a multiple of num_kv_heads \(4\)",
        ),
        (
            dict(num_heads=4, head_dim=8),
            lambda a: a(*_qkv(4, 4, 16)),
            r"q has shape \(5, 4, 16\); expected \[..., 4 heads, 8 head_dim\]",
        ),
        (
            dict(num_heads=4, head_dim=8),
            lambda a: a(
                *_qkv(4, 4, 8), cu_seqlens=torch.tensor([0, 3], dtype=torch.int32)
            ),
            r"cu_seqlens must start at 0 and end at the token count \(5\)",
        ),
        (
            dict(num_heads=4, head_dim=8),
            lambda a: a(*_qkv(4, 4, 8), cu_seqlens=torch.tensor([0, 5])),
            r"cu_seqlens must be a 1-D int32 tensor",
        ),
        (
            dict(num_heads=4, head_dim=8),
            lambda a: a(
                *_qkv(4, 4, 8, dtypes=(torch.float32, torch.float64, torch.float32))
            ),
            r"q, k, v must share a dtype",
        ),
        (
            dict(num_heads=4, head_dim=8, training_backend="flash"),
            lambda a: a(*_qkv(4, 4, 8)),
            r"training_backend='flash' needs fp16/bf16 tensors on a CUDA device",
        ),
    ],
)
def test_clear_errors(kwargs, call, message):
    with pytest.raises(ValueError, match=message):
        attn = TrainableFlashAttention(**kwargs)
        call(attn)


def _qkv(heads, kv_heads, head_dim, dtypes=(torch.float32,) * 3):
    return (
        torch.randn(5, heads, head_dim, dtype=dtypes[0]),
        torch.randn(5, kv_heads, head_dim, dtype=dtypes[1]),
        torch.randn(5, kv_heads, head_dim, dtype=dtypes[2]),
    )


# --------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("kernels", ["vllm_flash_attn", "aten"])
@pytest.mark.parametrize("heads,kv_heads,causal,window", CASES)
def test_cuda_flash_path_matches_fp32_reference(
    monkeypatch, kernels, heads, kv_heads, causal, window
):
    from vllm.model_executor.layers import trainable_attention

    if kernels == "aten":
        monkeypatch.setattr(trainable_attention, "_vllm_flash_varlen", lambda: None)
    elif trainable_attention._vllm_flash_varlen() is None:
        pytest.skip("vLLM's flash-attn kernels are not installed")
    lengths = [1, 7, 64, 129, 300]
    head_dim = 128
    q, k, v, cu = packed_inputs(
        lengths, heads, kv_heads, head_dim, torch.bfloat16, "cuda"
    )
    attn = TrainableFlashAttention(
        heads,
        head_dim,
        kv_heads,
        causal=causal,
        sliding_window=window,
        training_backend="flash",
    )
    for t in (q, k, v):
        t.requires_grad_(True)
    out = attn(q, k, v, cu_seqlens=cu)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    # fp32 reference on the same bf16 inputs, and the error bf16 math
    # itself makes against it.
    def reference(dtype):
        inputs = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
        ref = trainable_attention.reference_attention(
            *inputs, cu, head_dim**-0.5, causal, window
        )
        ref.backward(grad_out.to(dtype))
        return ref, [t.grad for t in inputs]

    ref32, grads32 = reference(torch.float32)
    ref16, grads16 = reference(torch.bfloat16)
    pairs = [(out, ref16, ref32)] + [
        (t.grad, g16, g32) for t, g16, g32 in zip((q, k, v), grads16, grads32)
    ]
    for name, (got, bf16_ref, ref) in zip(["out", "dq", "dk", "dv"], pairs):
        flash_err = relative_rms_errors(got, ref, cu)
        bf16_err = relative_rms_errors(bf16_ref, ref, cu)
        print(
            f"{kernels} {name}: relative RMS error per sequence, flash "
            f"{_fmt(flash_err)} bf16-math {_fmt(bf16_err)}; max abs "
            f"error flash {(got.float() - ref).abs().max().item():.2e} "
            f"bf16-math {(bf16_ref.float() - ref).abs().max().item():.2e}"
        )
        # The flash backward rounds P and dS to bf16 for its tensor-core
        # GEMMs, which bf16 math does not: its dq/dk errors measured 1.5 to
        # 2.3 times bf16 math's on the H100 (benchmarks/RESULTS.md). Three
        # times the larger of bf16 math's error and one bf16 rounding
        # bounds that; a wrong mask, window, scale or LSE is off by 1e-1 to
        # 1, against a bound near 6e-3.
        bound = 3 * torch.clamp(bf16_err, min=BF16_ROUNDING)
        assert bool((flash_err <= bound).all()), (
            f"{name}: sequences {(flash_err > bound).nonzero().flatten()}"
            f" exceed three times the bf16-math error"
        )


# Rounding to bf16 (8 significant bits) moves each element by at most 2**-8
# of its value, and by about 2**-9 of the norm over many elements: the
# error of a result that is exact but for its final rounding.
BF16_ROUNDING = 2.0**-9


def relative_rms_errors(
    got: torch.Tensor, ref: torch.Tensor, cu_seqlens: torch.Tensor
) -> torch.Tensor:
    """||got - ref|| / ||ref|| for each packed sequence: stable where a
    max-abs error (one extreme element of each) is not. A sequence whose
    reference is all zero (dq of a one-token sequence) is measured against
    the whole tensor's norm instead."""
    bounds = cu_seqlens.tolist()
    errors = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        diff = (got[start:end].float() - ref[start:end]).norm()
        scale = ref[start:end].norm()
        errors.append((diff / (scale if scale > 0 else ref.norm())).item())
    return torch.tensor(errors)


def _fmt(errors: torch.Tensor) -> str:
    return "[" + ", ".join(f"{e:.1e}" for e in errors.tolist()) + "]"


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("flash_attn_version", [2, 3])
@pytest.mark.parametrize(
    "heads,kv_heads,window", [(8, 2, None), (4, 4, None), (4, 2, 5)]
)
def test_cuda_generator_kernel_rows_equal_vllm_prefill_and_decode(
    flash_attn_version, heads, kv_heads, window
):
    """With use_generator_attention_kernel, the training forward's rows are
    bitwise the rows vLLM's FLASH_ATTN backend computes from its paged
    cache: a prefill of each sequence's first half, then one-token decode
    steps for the rest, batched across sequences (as with
    VLLM_BATCH_INVARIANT=1: one split)."""
    from vllm.model_executor.layers import trainable_attention
    from vllm.model_executor.layers.trainable_attention import (
        paged_kv,
        use_generator_attention_kernel,
    )

    flash_varlen = trainable_attention._vllm_flash_varlen()
    if flash_varlen is None:
        pytest.skip("vLLM's flash-attn kernels are not installed")
    from vllm.vllm_flash_attn.flash_attn_interface import is_fa_version_supported

    if not is_fa_version_supported(flash_attn_version):
        pytest.skip(f"FA{flash_attn_version} is not supported on this GPU")
    lengths = [1, 7, 64, 129, 300]
    head_dim, block_size = 128, 16
    q, k, v, cu = packed_inputs(
        lengths, heads, kv_heads, head_dim, torch.bfloat16, "cuda"
    )
    attn = TrainableFlashAttention(heads, head_dim, kv_heads, sliding_window=window)
    assert use_generator_attention_kernel(attn, block_size, flash_attn_version) == 1
    inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = attn(*inputs, cu_seqlens=cu)

    key_cache, value_cache, block_table = paged_kv(k, v, cu, block_size)
    window_size = (-1 if window is None else window - 1, 0)

    def vllm_step(rows, sequence_of_row, keys_seen, query_lens):
        cu_q = torch.tensor([0] + query_lens, device="cuda").cumsum(
            0, dtype=torch.int32
        )
        return flash_varlen(
            q[rows],
            key_cache,
            value_cache,
            max_seqlen_q=max(query_lens),
            cu_seqlens_q=cu_q,
            max_seqlen_k=max(keys_seen),
            seqused_k=torch.tensor(keys_seen, dtype=torch.int32, device="cuda"),
            block_table=block_table[sequence_of_row],
            softmax_scale=head_dim**-0.5,
            causal=True,
            window_size=window_size,
            num_splits=1,
            fa_version=flash_attn_version,
        )

    starts = cu[:-1].tolist()
    halves = [(n + 1) // 2 for n in lengths]
    prefill_rows = torch.tensor(
        [s + i for s, h in zip(starts, halves) for i in range(h)], device="cuda"
    )
    prefill = vllm_step(prefill_rows, torch.arange(len(lengths)), halves, halves)
    decode = [
        (s + i, seq, i + 1)
        for seq, (s, n, h) in enumerate(zip(starts, lengths, halves))
        for i in range(h, n)
    ]
    decode_rows = torch.tensor([r for r, _, _ in decode], device="cuda")
    decoded = vllm_step(
        decode_rows,
        torch.tensor([s for _, s, _ in decode]),
        [n for _, _, n in decode],
        [1] * len(decode),
    )
    assert torch.equal(out[prefill_rows], prefill)
    assert torch.equal(out[decode_rows], decoded)

    # gradients: the flash backward, as on the contiguous path
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    attn.paged_kernel = None
    reference_inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    attn(*reference_inputs, cu_seqlens=cu).backward(grad_out)
    for name, ours, reference in zip("qkv", inputs, reference_inputs):
        error = (ours.grad.float() - reference.grad.float()).norm() / (
            reference.grad.float().norm()
        )
        assert error < 1e-2, f"d{name}: relative error {error:.2e}"


def test_generator_kernel_clear_errors():
    from vllm.model_executor.layers.trainable_attention import (
        use_generator_attention_kernel,
    )

    attn = TrainableFlashAttention(2, 64)
    with pytest.raises(ValueError, match="multiple of 16"):
        use_generator_attention_kernel(attn, block_size=8)
    with pytest.raises(ValueError, match="2 or 3"):
        use_generator_attention_kernel(attn, flash_attn_version=4)
    use_generator_attention_kernel(attn)
    q, k, v = _qkv(2, 2, 64)
    with pytest.raises(ValueError, match="fp16/bf16 tensors on CUDA"):
        attn(q, k, v)


class TwoLayerAttention(torch.nn.Module):
    """Projections, attention and a norm in a loop over layers: the shape of
    a decoder whose compiled training graph must not break at attention."""

    def __init__(self, heads, kv_heads, head_dim, causal, window):
        super().__init__()
        self.shape = (heads, kv_heads, head_dim)
        hidden = heads * head_dim
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleDict(
                dict(
                    qkv=torch.nn.Linear(hidden, (heads + 2 * kv_heads) * head_dim),
                    attention=TrainableFlashAttention(
                        heads, head_dim, kv_heads, causal=causal, sliding_window=window
                    ),
                    out=torch.nn.Linear(hidden, hidden),
                )
            )
            for _ in range(2)
        )
        self.norm = torch.nn.RMSNorm(hidden)

    def forward(self, x, cu_seqlens):
        heads, kv_heads, head_dim = self.shape
        for layer in self.layers:
            q, k, v = layer["qkv"](x).split(
                [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1
            )
            out = layer["attention"](
                q.reshape(len(x), heads, head_dim),
                k.reshape(len(x), kv_heads, head_dim),
                v.reshape(len(x), kv_heads, head_dim),
                cu_seqlens=cu_seqlens,
            )
            x = x + layer["out"](out.reshape(len(x), -1))
        return self.norm(x)


def _outputs_and_grads(model, x, cu_seqlens):
    model.zero_grad()
    out = model(x, cu_seqlens)
    out.square().sum().backward()
    return [out.detach()] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("heads,kv_heads,causal,window", CASES[2:])
def test_compiled_trainer_is_one_graph_and_matches_eager(
    heads, kv_heads, causal, window
):
    """torch.compile(fullgraph=True) of a training module: the attention is
    one op, so nothing around it runs eagerly (as the engine's compiled
    graph runs it), and values and gradients are eager's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TwoLayerAttention(heads, kv_heads, 16, causal, window)
    x = torch.randn(sum([5, 1, 12]), heads * 16)
    cu_seqlens = torch.tensor([0, 5, 6, 18], dtype=torch.int32)
    eager = _outputs_and_grads(model, x, cu_seqlens)
    # AOTAutograd traces forward and backward as Inductor would be given
    # them; Inductor's code generation is not what this checks
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    for got, want in zip(_outputs_and_grads(compiled, x, cu_seqlens), eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kernel",
    [
        pytest.param("reference", id="cpu-reference"),
        pytest.param("flash", id="cuda-flash", marks=NEEDS_CUDA),
        pytest.param("paged", id="cuda-paged", marks=NEEDS_CUDA),
    ],
)
def test_attention_op_equals_the_eager_path_bit_for_bit(kernel):
    """The op compiled trainers call: its forward rows are the module's,
    and its backward (the forward recomputed, then the same backward
    kernel, or the reference path's vjp) gives autograd's gradients."""
    from vllm.model_executor.layers import trainable_attention

    if kernel == "reference":
        q, k, v, cu = packed_inputs([3, 9, 4], 4, 2, 16, torch.float32, seed=2)
        attn = TrainableFlashAttention(4, 16, 2, sliding_window=5)
    else:
        if trainable_attention._vllm_flash_varlen() is None:
            pytest.skip("vLLM's flash-attn kernels are not installed")
        q, k, v, cu = packed_inputs([1, 7, 64, 129], 8, 2, 128, torch.bfloat16, "cuda")
        attn = TrainableFlashAttention(8, 128, 2, sliding_window=33)
        if kernel == "paged":
            trainable_attention.use_generator_attention_kernel(attn)
    eager_inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    op_inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    eager = attn(*eager_inputs, cu_seqlens=cu)
    op = torch.ops.vllm.trainable_attention(
        *op_inputs, cu, -1, attn.softmax_scale, True, attn._window_left(), kernel, 16, 2
    )
    assert torch.equal(op, eager)
    grad_out = torch.randn_like(eager)
    eager.backward(grad_out)
    op.backward(grad_out)
    for ours, reference in zip(op_inputs, eager_inputs):
        assert torch.equal(ours.grad, reference.grad)
