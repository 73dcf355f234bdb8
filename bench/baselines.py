"""Baselines the benchmarks measure against, written the way vLLM v1 writes
them (vllm/v1/core/kv_cache_utils.py, block_pool.py): a doubly linked free
list of block objects, with fake head and tail nodes so that no operation
branches on emptiness, and reference counts kept on the objects. It is the
state of the art for a pure-Python allocator; blocktable replaces it with C
in shared memory. Written fresh for the benchmark, not imported: vLLM is not
a dependency.
"""


class KVCacheBlock:
    __slots__ = ("block_id", "ref_cnt", "prev_free_block", "next_free_block", "block_hash")

    def __init__(self, block_id):
        self.block_id = block_id
        self.ref_cnt = 0
        self.prev_free_block = None
        self.next_free_block = None
        self.block_hash = None


class FreeKVCacheBlockQueue:
    """Doubly linked list of free blocks (O(1) removal from the middle, which
    prefix caching needs), allocating no Python objects per operation."""

    def __init__(self, blocks):
        self.num_free_blocks = len(blocks)
        self.head = KVCacheBlock(-1)
        self.tail = KVCacheBlock(-1)
        prev = self.head
        for b in blocks:
            prev.next_free_block, b.prev_free_block = b, prev
            prev = b
        prev.next_free_block, self.tail.prev_free_block = self.tail, prev

    def popleft_n(self, n):
        if n > self.num_free_blocks:
            raise ValueError("not enough free blocks")
        out = []
        cur = self.head.next_free_block
        for _ in range(n):
            out.append(cur)
            nxt = cur.next_free_block
            cur.prev_free_block = cur.next_free_block = None
            cur = nxt
        self.head.next_free_block, cur.prev_free_block = cur, self.head
        self.num_free_blocks -= n
        return out

    def append_n(self, blocks):
        last = self.tail.prev_free_block
        for b in blocks:
            b.prev_free_block, last.next_free_block = last, b
            last = b
        last.next_free_block, self.tail.prev_free_block = self.tail, last
        self.num_free_blocks += len(blocks)


def python_pool_alloc(queue, n):
    """BlockPool.get_new_blocks: pop n, take a reference on each."""
    blocks = queue.popleft_n(n)
    for b in blocks:
        b.ref_cnt += 1
    return blocks


def python_pool_free(queue, blocks):
    """BlockPool.free_blocks: drop a reference, queue those that reach 0."""
    zero = []
    for b in blocks:
        b.ref_cnt -= 1
        if b.ref_cnt == 0:
            zero.append(b)
    queue.append_n(zero)
