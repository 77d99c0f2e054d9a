"""KV cache memory in fixed-size blocks, with prefix caching (vLLM's PagedAttention block
manager; nano-vllm's in a hundred lines).

A sequence holds a block table: the ids of the blocks its positions live in, block_size
positions each. Blocks come from one pool; a running sequence takes a new one when it grows past
its last. With prefix caching, a full block is keyed by a hash chained over (parent's hash, its
token ids), so equal prefixes share blocks: a new request whose prompt starts with cached blocks
takes them (reference counted) and skips their prefill. A freed block keeps its key until it is
reused, least recently freed first, so a later request can still hit it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from afd_compile.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full (prefix caching)
    token_ids: tuple[int, ...] = field(default=())  # a full block's tokens: a hash hit is checked against them


def block_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    # Python's hash of a tuple of ints is deterministic (no salt, unlike str); a collision is
    # caught by comparing the tokens on a hit.
    return hash((parent, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size, self.enable_prefix_caching = block_size, enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in the order to reuse them: never-keyed ones and the least recently freed first.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> id of the block holding it
        self.queries = self.hits = 0  # prompt tokens looked up / found in the prefix cache

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        """The fraction of blocks held by running sequences (vLLM's kv_cache_usage_perc)."""
        return 1.0 - self.num_free / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _cache_hits(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """The cached blocks that begin seq, and their hashes. At least one token is left to
        compute (its logits give the next token), so the block holding the last token is never a hit."""
        hits, hashes, parent, tokens = [], [], None, seq.token_ids
        if not self.enable_prefix_caching:
            return hits, hashes
        for start in range(0, len(seq) - self.block_size, self.block_size):
            ids = tuple(tokens[start : start + self.block_size])
            parent = block_hash(parent, ids)
            block_id = self.cached.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != ids:
                break
            hits.append(block_id), hashes.append(parent)
        return hits, hashes

    def allocate(self, seq: Sequence) -> bool:
        """Gives seq the blocks of all its tokens (a preempted sequence recomputes its output too),
        cached ones first, and sets seq.num_computed to the tokens those hold; False, changing
        nothing, when they do not fit now."""
        hits, hashes = self._cache_hits(seq)
        held_free = sum(1 for b in hits if b in self.free)  # cached but free: taking them uses free blocks
        if self.blocks_for(len(seq)) - len(hits) + held_free > self.num_free:
            return False
        for block_id in hits:
            self._take(block_id)
        seq.block_table = hits + [self._take(self._next_free()) for _ in range(self.blocks_for(len(seq)) - len(hits))]
        seq.block_hashes, seq.num_computed = hashes, len(hits) * self.block_size
        if self.enable_prefix_caching:
            self.queries += len(seq)
            self.hits += seq.num_computed
        return True

    def append_slot(self, seq: Sequence) -> bool:
        """Before a decode step: a new block if the token it writes starts one. False when it
        needs one and none is free."""
        if len(seq) <= len(seq.block_table) * self.block_size:
            return True
        if not self.free:
            return False
        seq.block_table.append(self._take(self._next_free()))
        return True

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Keys the blocks seq has filled since the last call (its computed tokens), so later
        requests can share them."""
        hashes, full = seq.block_hashes, seq.num_computed // self.block_size
        if not self.enable_prefix_caching or len(hashes) >= full:  # most decode steps fill no block
            return
        tokens = seq.token_ids
        for i in range(len(hashes), full):
            ids = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
            h = block_hash(hashes[-1] if hashes else None, ids)
            hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and h not in self.cached:  # the same tokens computed twice at once: keep the first
                block.hash, block.token_ids = h, ids
                self.cached[h] = block.block_id

    def free_seq(self, seq: Sequence) -> None:
        """Releases seq's blocks (finish, abort, preemption); cached ones stay findable until reused."""
        for block_id in reversed(seq.block_table):  # the tail last-used: evicted first
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table, seq.block_hashes = [], []

    def reset_prefix_cache(self) -> None:
        """Forgets every cached block (vLLM's reset_prefix_cache): after something other than a
        request wrote the cache (benchmarks' routing replay)."""
        for block in self.blocks:
            if block.ref_count == 0:
                block.hash, block.token_ids = None, ()
        self.cached = {h: b for h, b in self.cached.items() if self.blocks[b].hash == h}

    def _next_free(self) -> int:
        block_id = next(iter(self.free))
        block = self.blocks[block_id]
        if block.hash is not None:  # evict: its contents are about to be overwritten
            del self.cached[block.hash]
            block.hash, block.token_ids = None, ()
        return block_id

    def _take(self, block_id: int) -> int:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1
        return block_id
