# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""`BlockPool.reset_prefix_cache` resets the blocks that hold a hash (every
such block is in the hash-to-block map) instead of every block of the pool:
after a reset no block holds a hash and no hash hits, as before."""

from vllm.v1.core.block_pool import BlockHashToBlockMap, BlockPool
from vllm.v1.core.kv_cache_utils import BlockHash, make_block_hash_with_group_id


def key(index: int):
    return make_block_hash_with_group_id(BlockHash(index.to_bytes(32, "big")), 0)


def test_reset_clears_every_hash_and_every_hit():
    pool = BlockPool(64, enable_caching=True, hash_block_size=16)
    blocks = pool.get_new_blocks(10)
    for index, block in enumerate(blocks[:6]):
        pool._insert_block_hash(key(index), block, num_tokens=16)
    pool._insert_block_hash(key(0), blocks[6], num_tokens=16)  # a shared key
    pool.free_blocks(blocks)
    assert sum(block.block_hash is not None for block in pool.blocks) == 7

    assert pool.reset_prefix_cache()
    assert all(block.block_hash is None for block in pool.blocks)
    assert len(pool.cached_block_hash_to_block) == 0
    assert pool.get_cached_block(BlockHash(key(0)[:-4]), [0]) is None


def test_map_lists_each_block_it_holds():
    blocks = BlockPool(8, enable_caching=True, hash_block_size=16).blocks
    held = BlockHashToBlockMap()
    held.insert(key(0), blocks[1])
    held.insert(key(0), blocks[2])
    held.insert(key(1), blocks[3])
    assert sorted(block.block_id for block in held.blocks()) == [1, 2, 3]
