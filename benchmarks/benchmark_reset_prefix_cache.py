# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""What `LLM.reset_prefix_cache()` costs in the engine core, which every
weight push pays: vLLM's `BlockPool.reset_prefix_cache` with this patch set
(it resets the blocks that hold a hash) against the pass over every block
of the pool that vLLM made before it, timed side by side on the same pool.

    python benchmarks/benchmark_reset_prefix_cache.py --blocks 1700000 --cached 4096

1.7M blocks is the RL example's cache on an H200 (a 2-layer policy, 64
tokens a sequence, 20% of the GPU's memory); a Qwen3-8B engine at 40% of
an H200 has about 30k. `--cached` is how many blocks hold a hash when the
push comes (a step's prompts and completions).

`--round-trip` times the call instead, from the user's process to an
engine core in its own process (a small Llama, dummy weights): the
round trip `LLM.reset_prefix_cache()` waits for, against sending the call
with `call_utility_nowait` (what `EngineWeights.push` does), in
interleaved rounds.

    python benchmarks/benchmark_reset_prefix_cache.py --round-trip"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import BlockHash, make_block_hash_with_group_id


def cache_blocks(pool: BlockPool, count: int) -> None:
    """Give `count` blocks a hash as a finished request leaves them: in the
    map, back in the free queue."""
    blocks = pool.get_new_blocks(count)
    for index, block in enumerate(blocks):
        key = make_block_hash_with_group_id(BlockHash(index.to_bytes(32, "big")), 0)
        pool._insert_block_hash(key, block, num_tokens=pool.hash_block_size)
    pool.free_blocks(blocks)


SMALL_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "num_hidden_layers": 1,
    "vocab_size": 256,
    "max_position_embeddings": 256,
    "torch_dtype": "float32",
}


def round_trip(rounds: int) -> None:
    """The reset waited for against the reset sent, each call timed alone,
    `rounds` of each interleaved."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as model_dir:
        (Path(model_dir) / "config.json").write_text(json.dumps(SMALL_LLAMA))
        llm = LLM(
            model=model_dir,
            load_format="dummy",
            skip_tokenizer_init=True,
            enforce_eager=True,
            enable_prefix_caching=True,
            max_model_len=128,
            kv_cache_memory_bytes=32 << 20,
        )
    client = llm.llm_engine.engine_core
    if not hasattr(client, "call_utility_nowait"):
        raise SystemExit(
            "the engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING"
            "=0): a reset is a direct call, there is no round trip to time"
        )
    prompt = {"prompt_token_ids": list(range(1, 97))}
    llm.generate(prompt, SamplingParams(max_tokens=1), use_tqdm=False)
    waited, sent = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        llm.reset_prefix_cache()
        waited.append(time.perf_counter() - start)
        start = time.perf_counter()
        reply = client.call_utility_nowait("reset_prefix_cache")
        sent.append(time.perf_counter() - start)
        reply.result()  # the next round starts with nothing in flight
    ours, before = statistics.median(sent), statistics.median(waited)
    print(
        f"reset_prefix_cache to an engine core process, median of {rounds}: "
        f"waited for {before * 1e3:.3f} ms (min {min(waited) * 1e3:.3f}); "
        f"sent without waiting {ours * 1e3:.3f} ms (min {min(sent) * 1e3:.3f})"
    )
    client.shutdown()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=1_700_000)
    parser.add_argument("--cached", type=int, default=4096)
    parser.add_argument(
        "--rounds", type=int, help="default: 5, or 200 with --round-trip"
    )
    parser.add_argument(
        "--round-trip",
        action="store_true",
        help="time the call to an engine core process instead",
    )
    args = parser.parse_args()
    if args.round_trip:
        round_trip(args.rounds or 200)
        return
    args.rounds = args.rounds or 5

    pool = BlockPool(args.blocks, enable_caching=True, hash_block_size=16)
    patched, whole_pool = [], []
    for _ in range(args.rounds):
        cache_blocks(pool, args.cached)
        start = time.perf_counter()
        assert pool.reset_prefix_cache()
        patched.append(time.perf_counter() - start)
        assert not any(block.block_hash for block in pool.blocks)
        cache_blocks(pool, args.cached)
        start = time.perf_counter()
        assert pool.reset_prefix_cache()
        for block in pool.blocks:  # what vLLM did on each reset before
            block.reset_hash()
        whole_pool.append(time.perf_counter() - start)
    ours, before = statistics.median(patched), statistics.median(whole_pool)
    print(
        f"{args.blocks} blocks, {args.cached} holding a hash, median of "
        f"{args.rounds}: reset {ours * 1e3:.2f} ms; with the pass over the "
        f"whole pool vLLM made before {before * 1e3:.2f} ms ({before / ours:.0f}x)"
    )


if __name__ == "__main__":
    main()
