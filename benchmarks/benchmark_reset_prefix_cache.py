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
push comes (a step's prompts and completions)."""

import argparse
import statistics
import time

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=1_700_000)
    parser.add_argument("--cached", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

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
