# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Training forward+backward of TrainableFlashAttention against PyTorch SDPA
(flash backend) on the same packed workload, side by side in one run.

    python benchmarks/benchmark_trainable_attention.py [--lengths ...]

Prints time and peak memory of each and the ratios. SDPA has no varlen
input, so it runs each sequence on its own ("sdpa per-seq", the same FLOPs)
and, for reference, one padded batch ("sdpa padded", extra FLOPs).
"""

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from vllm.model_executor.layers import trainable_attention
from vllm.model_executor.layers.trainable_attention import TrainableFlashAttention


def make_inputs(lengths, heads, kv_heads, head_dim):
    total = sum(lengths)
    make = lambda h: torch.randn(
        total, h, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True
    )
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).int()
    return make(heads), make(kv_heads), make(kv_heads), cu


def run_trainable(q, k, v, cu, lengths, grad):
    attn = TrainableFlashAttention(
        q.shape[1], q.shape[2], k.shape[1], training_backend="flash"
    )
    out = attn(q, k, v, cu_seqlens=cu, max_seqlen=max(lengths))
    out.backward(grad)


def run_sdpa_per_seq(q, k, v, cu, lengths, grad):
    bounds = cu.tolist()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
            out = F.scaled_dot_product_attention(
                qs, ks, vs, is_causal=True, enable_gqa=True
            )
            out.backward(grad[start:end].transpose(0, 1)[None])


def run_sdpa_padded(q, k, v, cu, lengths, grad):
    batch, seq = len(lengths), max(lengths)
    pad = lambda t: torch.nn.utils.rnn.pad_sequence(
        list(t.split(lengths)), batch_first=True
    ).transpose(1, 2)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(
            pad(q), pad(k), pad(v), is_causal=True, enable_gqa=True
        )
    out.backward(pad(grad))
    del batch, seq


def measure(fn, inputs, lengths, iters):
    q, k, v, cu = inputs
    grad = torch.randn_like(q)
    for _ in range(3):
        fn(q, k, v, cu, lengths, grad)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    start.record()
    for _ in range(iters):
        fn(q, k, v, cu, lengths, grad)
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / iters
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    for t in (q, k, v):
        t.grad = None
    return ms, peak


def flops(lengths, heads, head_dim):
    # causal fwd (2 matmuls) + bwd (5 matmuls) = 7 * 2 * S^2/2 * D per head
    return sum(7 * s * s * head_dim * heads for s in lengths)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=[512, 8192, 1024, 4096, 2048, 3072, 768, 6144],
    )
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    lengths = args.lengths
    inputs = make_inputs(lengths, args.heads, args.kv_heads, args.head_dim)
    work = flops(lengths, args.heads, args.head_dim)
    print(
        f"workload: {len(lengths)} sequences {lengths}, {args.heads} heads "
        f"/ {args.kv_heads} KV heads, head_dim {args.head_dim}, bf16, "
        f"{torch.cuda.get_device_name()}"
    )
    results = {}
    kernels = ["trainable (vllm_flash_attn fwd)", "trainable (aten fwd)"]
    original = trainable_attention._vllm_flash_varlen
    for name in kernels:
        if "aten" in name:
            trainable_attention._vllm_flash_varlen = lambda: None
        elif original() is None:
            continue
        results[name] = measure(run_trainable, inputs, lengths, args.iters)
        trainable_attention._vllm_flash_varlen = original
    results["sdpa per-seq (flash)"] = measure(
        run_sdpa_per_seq, inputs, lengths, args.iters
    )
    results["sdpa padded (flash)"] = measure(
        run_sdpa_padded, inputs, lengths, args.iters
    )
    baseline_ms, baseline_mb = results["sdpa per-seq (flash)"]
    print(
        f"{'path':34s} {'ms':>8s} {'TFLOP/s':>8s} {'peak MiB':>9s} "
        f"{'speed vs sdpa':>14s} {'mem vs sdpa':>12s}"
    )
    for name, (ms, mb) in results.items():
        print(
            f"{name:34s} {ms:8.3f} {work / ms / 1e9:8.1f} {mb:9.1f} "
            f"{baseline_ms / ms:14.3f} {mb / baseline_mb:12.3f}"
        )

    print(
        "\npeak memory of one sequence's fwd+bwd (trainable, aten fwd): "
        "linear in length means no S^2 term"
    )
    trainable_attention._vllm_flash_varlen = lambda: None
    previous = None
    for seq in (2048, 4096, 8192, 16384, 32768):
        one = make_inputs([seq], args.heads, args.kv_heads, args.head_dim)
        _, mb = measure(run_trainable, one, [seq], 2)
        growth = f"x{mb / previous:.2f} for x2 tokens" if previous else ""
        print(f"  S={seq:6d}: {mb:9.1f} MiB {growth}")
        previous = mb
    trainable_attention._vllm_flash_varlen = original


if __name__ == "__main__":
    main()
