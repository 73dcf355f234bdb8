"""blocktable.compat.vllm against a plain numpy model of vLLM 0.32's
BlockTable (its formulas; move_row zeroes the source as vLLM 0.32 does, and
ours keeps no stale tails). Runs without vLLM; tests/engine/ drives vLLM's own
classes side by side where vLLM is installed."""
import numpy as np
import pytest

import blocktable as bt
from blocktable.compat.vllm import (BlockTable, CpuGpuBuffer, MultiGroupBlockTable,
                                    SlotMappingMode, get_block_table_width)

torch = pytest.importorskip("torch")


class Reference:
    """vLLM v1's BlockTable in numpy (block_table.py), dense and private."""

    def __init__(self, block_size, max_num_reqs, max_blocks, kernel_block_size,
                 interleave=1, world=1, rank=0):
        self.ratio = block_size // kernel_block_size
        self.block_size = kernel_block_size
        self.width = max_blocks * self.ratio
        self.table = np.zeros((max_num_reqs, self.width), np.int32)
        self.n = np.zeros(max_num_reqs, np.int32)
        self.interleave, self.world, self.rank = interleave, world, rank

    def _kernel(self, ids):
        ids = np.asarray(ids, np.int64)
        return (ids.reshape(-1, 1) * self.ratio + np.arange(self.ratio)).reshape(-1)

    def append_row(self, ids, row):
        ids = self._kernel(ids)
        self.table[row, self.n[row]:self.n[row] + len(ids)] = ids
        self.n[row] += len(ids)

    def add_row(self, ids, row):
        self.table[row] = 0
        self.n[row] = 0
        self.append_row(ids, row)

    def clear_row(self, row):
        self.table[row] = 0
        self.n[row] = 0

    def move_row(self, src, tgt):
        self.table[tgt] = self.table[src]
        self.n[tgt] = self.n[src]
        self.clear_row(src)          # vLLM 0.32: even when src == tgt

    def swap_row(self, a, b):
        self.table[[a, b]] = self.table[[b, a]]
        self.n[[a, b]] = self.n[[b, a]]

    def slots(self, req, pos):
        """vLLM's expression, then -1 where the row has no block."""
        bs, w, il, r = self.block_size, self.world, self.interleave, self.rank
        vbs = bs * w
        idx = req * self.width + pos // vbs
        have = pos // vbs < self.n[req]
        nums = self.table.ravel()[np.where(have, idx, 0)].astype(np.int64)
        v = pos % vbs
        mask = (v // il % w == r) if w > 1 else np.ones(len(pos), bool)
        off = v // (w * il) * il + v % il
        return np.where(have & mask, nums * bs + off, -1)


CASES = [  # block_size, kernel_block_size, interleave, world, rank
    (16, 16, 1, 1, 0), (32, 16, 1, 1, 0), (64, 16, 1, 1, 0),
    (16, 16, 1, 2, 1), (16, 16, 4, 4, 2), (32, 16, 2, 2, 0), (16, 16, 16, 2, 1),
]


@pytest.mark.parametrize("B,K,il,world,rank", CASES)
def test_matches_reference_over_random_operations(B, K, il, world, rank):
    R, M = 6, 5
    ours = BlockTable(B, R, M, 512, False, "cpu", il, kernel_block_size=K,
                      dcp_world_size=world, dcp_rank=rank)
    ref = Reference(B, R, M, K, il, world, rank)
    rng = np.random.default_rng(B * 100 + world * 10 + rank)
    for step in range(200):
        op, row, other = rng.integers(5), int(rng.integers(R)), int(rng.integers(R))
        n = int(rng.integers(0, 3))
        ids = rng.integers(0, 1000, n).tolist()
        if op == 0 and ref.n[row] + n * ref.ratio <= ref.width:
            ours.append_row(ids, row), ref.append_row(ids, row)
        elif op == 1:
            ours.add_row(ids, row), ref.add_row(ids, row)
        elif op == 2 and rng.random() < 0.3:
            ours.clear_row(row), ref.clear_row(row)
        elif op == 3:
            ours.move_row(row, other), ref.move_row(row, other)
        elif op == 4:
            ours.swap_row(row, other), ref.swap_row(row, other)
        np.testing.assert_array_equal(ours.get_numpy_array(), ref.table, err_msg=f"step {step}")
        np.testing.assert_array_equal(ours.num_blocks_per_row, ref.n)
        if step % 10 == 0:
            req = rng.integers(0, R, 300).astype(np.int32)
            pos = rng.integers(0, M * B * world + 8, 300).astype(np.int64)
            ours.compute_slot_mapping_tokens(req, pos)
            np.testing.assert_array_equal(ours.slot_mapping.np[:300], ref.slots(req, pos))
            # vLLM's form: requests 0..nr-1 in rows 0..nr-1, -1 padding to the end.
            nr = int(rng.integers(0, R + 1))
            lens = rng.integers(0, 40, nr)
            qsl = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
            req = np.repeat(np.arange(nr), lens).astype(np.int32)
            pos = rng.integers(0, M * B * world + 8, int(qsl[-1])).astype(np.int64)
            ours.slot_mapping.np[:] = 12345
            ours.compute_slot_mapping(nr, torch.from_numpy(qsl), torch.from_numpy(pos))
            want = np.full(512, -1, np.int64)
            want[:len(pos)] = ref.slots(req, pos)
            np.testing.assert_array_equal(ours.slot_mapping.np, want)


def test_attributes_like_vllm():
    t = BlockTable(32, 4, 8, 128, False, "cpu", 1, kernel_block_size=16)
    assert t.block_size == 16 and t.blocks_per_kv_block == 2 and t.use_hybrid_blocks
    assert t.max_num_blocks_per_req == 16 and t.get_numpy_array().shape == (4, 16)
    assert t.num_blocks_per_row.dtype == np.int32 and t.slot_mapping.np.shape == (128,)
    np.testing.assert_array_equal(
        BlockTable.map_to_kernel_blocks(np.array([0, 1, 2]), 2, np.arange(2).reshape(1, -1)),
        [0, 1, 2, 3, 4, 5])
    with pytest.raises(ValueError):
        BlockTable(32, 4, 8, 128, False, "cpu", 1, kernel_block_size=12)


def test_torch_views_are_zero_copy():
    t = BlockTable(16, 4, 4, 64, False, "cuda")  # no GPU here: the CPU tensor
    cpu = t.get_cpu_tensor()
    assert cpu.data_ptr() == t.get_numpy_array().ctypes.data
    t.append_row([5, 6], 2)
    assert cpu[2, :2].tolist() == [5, 6]
    if not torch.cuda.is_available():
        assert t.get_device_tensor(3).data_ptr() == cpu.data_ptr()
        assert t.get_device_tensor(3).shape == (3, 4)
    t.compute_slot_mapping_tokens(np.array([2, 2], np.int32), np.array([0, 17]))
    assert t.slot_mapping.cpu[:2].tolist() == [80, 97]
    assert t.slot_mapping.cpu.data_ptr() == t.slot_mapping.np.ctypes.data
    t.commit_block_table(2)
    t.commit_slot_mapping(2)
    t.clear()                                    # vLLM's: the table, not the counts
    assert not cpu.any() and t.num_blocks_per_row.tolist() == [0, 0, 2, 0]


def test_errors_change_nothing():
    t = BlockTable(16, 4, 4, 8, False, "cpu")
    t.append_row([1, 2, 3], 0)
    before = t.get_numpy_array().copy(), t.num_blocks_per_row.copy()
    with pytest.raises(bt.RowFull):
        t.append_row([4, 5], 0)
    with pytest.raises(bt.OutOfRange):
        t.append_row([1], 4)
    with pytest.raises(bt.InvalidArgument):
        t.compute_slot_mapping_tokens(np.zeros(9, np.int32), np.zeros(9, np.int64))
    with pytest.raises(bt.OutOfRange):
        t.compute_slot_mapping_tokens(np.array([7], np.int32), np.zeros(1, np.int64))
    with pytest.raises(bt.InvalidArgument):
        t.compute_slot_mapping(1, np.array([0, 9], np.int32), np.zeros(9, np.int64))
    with pytest.raises(bt.InvalidArgument):      # qsl ends past the positions
        t.compute_slot_mapping(1, np.array([0, 3], np.int32), np.zeros(2, np.int64))
    with pytest.raises(bt.OutOfRange):
        t.compute_slot_mapping(5, np.arange(6, dtype=np.int32), np.zeros(5, np.int64))
    np.testing.assert_array_equal(t.get_numpy_array(), before[0])
    np.testing.assert_array_equal(t.num_blocks_per_row, before[1])


def test_bad_context_parallel_params_fail_at_construction():
    with pytest.raises(bt.InvalidArgument):
        BlockTable(16, 4, 4, 8, False, "cpu", dcp_world_size=2, dcp_rank=2)
    with pytest.raises(bt.InvalidArgument):
        BlockTable(16, 4, 4, 8, False, "cpu", 3, dcp_world_size=2)


# ---- on a GPU: the device table is a mirror -----------------------------------------------
def _gpu_ok():
    from blocktable import gpu
    ok, why = gpu.gpu_available()
    if ok and not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    return ok, why


GPU_OK, GPU_WHY = _gpu_ok()
needs_gpu = pytest.mark.skipif(not GPU_OK, reason=f"needs a CUDA GPU and cupy: {GPU_WHY}")


def test_no_gpu_means_no_mirror():
    t = BlockTable(16, 4, 4, 64, False, "cuda")
    if not GPU_OK:
        assert t.mirror is None
    assert BlockTable(16, 4, 4, 64, False, "cpu").mirror is None


@needs_gpu
@pytest.mark.parametrize("B,K", [(16, 16), (32, 16)])
def test_commit_block_table_syncs_the_mirror(B, K):
    R, M = 32, 24
    t = BlockTable(B, R, M, 512, True, "cuda", kernel_block_size=K)
    ref = Reference(B, R, M, K)
    assert t.mirror is not None
    dev = t.get_device_tensor(R)
    assert dev.is_cuda and dev.dtype == torch.int32 and tuple(dev.shape) == (R, t.max_num_blocks_per_req)
    assert dev.data_ptr() == t.mirror.table.data.ptr              # zero copy: the mirror itself
    assert t.block_table.gpu.data_ptr() == dev.data_ptr()
    rng = np.random.default_rng(B)
    for r in range(R):
        ids = rng.integers(1, 1000, int(rng.integers(0, M // 2))).tolist()
        t.add_row(ids, r), ref.add_row(ids, r)
    t.commit_block_table(R)
    torch.cuda.synchronize()
    np.testing.assert_array_equal(t.get_device_tensor(R).cpu().numpy(), ref.table)
    np.testing.assert_array_equal(t.mirror.counts_tensor().cpu().numpy(), ref.n)
    for step in range(30):
        # A decode step: each of the first n rows gains at most one block.
        n = int(rng.integers(1, R + 1))
        for r in range(n):
            if rng.random() < 0.7 and ref.n[r] + ref.ratio <= ref.width:
                ids = [int(rng.integers(1, 1000))]
                t.append_row(ids, r), ref.append_row(ids, r)
        if step % 7 == 3:
            a, b = (int(x) for x in rng.integers(0, n, 2))
            t.swap_row(a, b), ref.swap_row(a, b)
        if step % 11 == 5:
            a, b = (int(x) for x in rng.integers(0, n, 2))
            t.move_row(a, b), ref.move_row(a, b)
        if step % 13 == 6:
            r = int(rng.integers(0, n))
            t.clear_row(r), ref.clear_row(r)
        t.commit_block_table(n)
        assert tuple(t.get_device_tensor(n).shape) == (n, t.max_num_blocks_per_req)
        entries = t.mirror.last_sync[0]
        assert entries <= n * (ref.ratio + 1) or step % 7 == 3 or step % 11 == 5 \
            or step % 13 == 6, f"step {step}: {entries} entries for a decode step"
        torch.cuda.synchronize()
        np.testing.assert_array_equal(t.get_device_tensor(n).cpu().numpy(), ref.table[:n],
                                      err_msg=f"step {step}")
    t.commit_block_table(R)
    torch.cuda.synchronize()
    np.testing.assert_array_equal(t.get_device_tensor().cpu().numpy(), ref.table)
    t.clear()                   # vLLM 0.32's clear(): the tables zeroed, the counts kept
    torch.cuda.synchronize()
    assert not t.get_device_tensor().any()
    np.testing.assert_array_equal(t.mirror.counts_tensor().cpu().numpy(),
                                  np.asarray(t.num_blocks_per_row))
    t.close()
    assert t.mirror is None
    t.close()


@needs_gpu
def test_commit_on_torch_stream_and_rows_past_n_wait():
    """The sync goes on torch's current stream, and rows past num_reqs
    stay as they were on the device until a commit covers them."""
    t = BlockTable(16, 8, 8, 64, False, "cuda:0")
    for r in range(8):
        t.add_row([r + 1], r)
    t.commit_block_table(8)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        t.append_row([50], 2)
        t.append_row([70], 6)
        t.commit_block_table(4)
        got = t.get_device_tensor(8).clone()
    s.synchronize()
    assert got[2, :2].tolist() == [3, 50]
    assert got[6, :2].tolist() == [7, 0]                          # not committed yet
    with torch.cuda.stream(s):
        t.commit_block_table(8)
        got = t.get_device_tensor(8).clone()
    s.synchronize()
    assert got[6, :2].tolist() == [7, 70]
    t.close()


@needs_gpu
def test_mirror_slot_mapping_matches_compute_slot_mapping():
    """The mirror's slot-mapping kernel, from the same table, gives what
    compute_slot_mapping gives on the CPU."""
    import cupy as cp
    t = BlockTable(32, 6, 5, 512, False, "cuda", kernel_block_size=16)
    rng = np.random.default_rng(1)
    for r in range(6):
        t.add_row(rng.integers(1, 500, int(rng.integers(0, 6))).tolist(), r)
    t.commit_block_table(6)
    req = rng.integers(0, 6, 300).astype(np.int32)
    pos = rng.integers(0, 5 * 32 + 8, 300).astype(np.int64)
    t.compute_slot_mapping_tokens(req, pos)
    got = t.mirror.slot_mapping_tokens(req, pos, params=t._params)
    np.testing.assert_array_equal(cp.asnumpy(got), t.slot_mapping.np[:300])
    t.close()


# ---- vLLM 0.32's call sites (no vLLM needed) ------------------------------------------
def test_constructor_order_is_vllms():
    """The 7th positional is cp_kv_cache_interleave_size, the 8th the slot
    mapping mode; the table's unit is the block size given."""
    t = BlockTable(16, 4, 8, 64, False, "cpu", 4, SlotMappingMode.NONE)
    assert t.cp_kv_cache_interleave_size == 4 and t.block_size == 16
    assert t.slot_mapping_mode is SlotMappingMode.NONE and not t.use_hybrid_blocks
    assert t.dcp_world_size == 1 and t.dcp_rank == 0
    assert t.pcp_world_size == 1 and t.pcp_rank == 0


def test_slot_mapping_mode_none_writes_nothing():
    t = BlockTable(16, 4, 8, 64, False, "cpu", 1, slot_mapping_mode=SlotMappingMode.NONE)
    t.add_row([3], 0)
    t.slot_mapping.np[:] = 7
    t.compute_slot_mapping(1, np.array([0, 2], np.int32), np.array([0, 1]))
    assert (t.slot_mapping.np == 7).all()


def test_direct_writes_are_the_segments_row():
    """vLLM writes block_table.np and num_blocks_per_row itself: they are the
    segment's table and counts, so slot mapping and the row methods see them."""
    t = BlockTable(16, 4, 8, 32, False, "cpu", 1)
    t.block_table.np[1, :2] = [5, 9]
    t.num_blocks_per_row[1] = 2
    assert t.segment.read_row(1)[0].tolist() == [5, 9]
    t.append_row([11], 1)
    assert t.get_numpy_array()[1, :4].tolist() == [5, 9, 11, 0]
    t.compute_slot_mapping(2, torch.tensor([0, 0, 3], dtype=torch.int32),
                           torch.tensor([0, 17, 33]))
    assert t.slot_mapping.np[:4].tolist() == [5 * 16, 9 * 16 + 1, 11 * 16 + 1, -1]
    t.get_cpu_tensor()[0, 0] = 4          # through torch too
    t.num_blocks_per_row[0] = 1
    t.compute_slot_mapping(1, np.array([0, 1], np.int32), np.array([3]))
    assert t.slot_mapping.np[:2].tolist() == [4 * 16 + 3, -1]


def test_preserve_serving_state_then_append():
    """gpu_model_runner.preserve_serving_state: clone gpu and cpu, clear(),
    run, copy both back; the rows must append where they left off."""
    t = BlockTable(16, 4, 8, 32, False, "cpu", 1)
    t.add_row([1, 2, 3], 0)
    t.add_row([4], 1)
    for buf in (t.block_table,):
        buf.gpu = buf.cpu                         # what the CPU runner does
    saved = (t.block_table.gpu.clone(), t.block_table.cpu.clone())
    t.clear()
    assert not t.get_numpy_array().any() and t.num_blocks_per_row.tolist() == [3, 1, 0, 0]
    t.add_row([9, 9], 2)                          # a dummy run uses the table
    t.block_table.gpu.copy_(saved[0])
    t.block_table.cpu.copy_(saved[1])
    t.append_row([7], 0)
    t.append_row([8], 1)
    assert t.get_numpy_array()[0, :5].tolist() == [1, 2, 3, 7, 0]
    assert t.get_numpy_array()[1, :3].tolist() == [4, 8, 0]
    assert t.segment.read_row(0)[0].tolist() == [1, 2, 3, 7]


def test_cpu_gpu_buffer_like_vllms():
    t = BlockTable(16, 4, 8, 32, False, "cpu", 1)
    for buf in (t.block_table, t.slot_mapping):
        assert isinstance(buf, CpuGpuBuffer)
        assert buf.cpu.data_ptr() == buf.np.ctypes.data and buf.np.flags.writeable
        other = torch.zeros_like(buf.cpu)
        buf.gpu = other                            # assignable, then copies go there
        buf.np.flat[0] = 3
        assert buf.copy_to_gpu(1) is not None and other.view(-1)[0] == 3
        other.view(-1)[0] = 6
        buf.copy_to_cpu()
        assert buf.np.flat[0] == 6
        buf.gpu = buf.cpu
        assert buf.copy_to_gpu().data_ptr() == buf.cpu.data_ptr()
        assert buf.copy_to_cpu(2).data_ptr() == buf.cpu.data_ptr()


def test_dcp_set_after_construction_is_used():
    t = BlockTable(16, 2, 8, 32, False, "cpu", 1)
    t.add_row([2, 3], 0)
    qsl, pos = np.array([0, 4], np.int32), np.array([0, 1, 16, 17])
    t.compute_slot_mapping(1, qsl, pos)
    assert t.slot_mapping.np[:4].tolist() == [32, 33, 48, 49]
    t.dcp_world_size, t.dcp_rank = 2, 1          # as vLLM's tests / runners set them
    t.compute_slot_mapping(1, qsl, pos)
    # world 2: a virtual block spans 32 tokens, rank 1 holds the odd ones.
    assert t.slot_mapping.np[:4].tolist() == [-1, 32, -1, 40]
    t.dcp_world_size, t.dcp_rank = 1, 0
    t.compute_slot_mapping(1, qsl, pos)
    assert t.slot_mapping.np[:4].tolist() == [32, 33, 48, 49]


def test_move_row_zeroes_the_source_and_self_move_empties():
    t = BlockTable(16, 4, 8, 32, False, "cpu", 1)
    t.add_row([1, 2, 3], 0)
    t.add_row([5, 6, 7, 8], 1)
    t.move_row(0, 1)
    assert t.num_blocks_per_row.tolist() == [0, 3, 0, 0]
    assert t.get_numpy_array()[:2, :5].tolist() == [[0] * 5, [1, 2, 3, 0, 0]]
    t.move_row(1, 1)                              # vLLM 0.32: the row ends empty
    assert not t.get_numpy_array().any() and not t.num_blocks_per_row.any()


def test_multigroup_as_input_batch_builds_it():
    mg = MultiGroupBlockTable(max_num_reqs=4, max_num_batched_tokens=64, pin_memory=False,
                              device="cpu", block_sizes=[16, 48, 16], max_num_blocks=[5, 3, 5],
                              cp_kv_cache_interleave_size=1,
                              slot_mapping_modes=[SlotMappingMode.TOKEN_TO_KV_SLOT,
                                                  SlotMappingMode.TOKEN_TO_KV_SLOT,
                                                  SlotMappingMode.NONE])
    # 128 tokens: 8 blocks of 16 (5 -> 8), 8 of 48 (3 -> 8: lcm(128, 48) = 384); NONE unaligned.
    assert [t.max_num_blocks_per_req for t in mg.block_tables] == [8, 8, 5]
    assert get_block_table_width(5, 16) == 8 and get_block_table_width(5, 16, token_alignment=None) == 5
    mg.add_row(([1, 2], [3], [4]), 0)
    mg.append_row(([5], [], [6]), 0)
    assert mg[0].num_blocks_per_row[0] == 3 and mg[2].get_numpy_array()[0, :2].tolist() == [4, 6]
    mg[2].slot_mapping.np[:] = 99
    mg.compute_slot_mapping(1, np.array([0, 2], np.int32), np.array([0, 40]))
    assert mg[0].slot_mapping.np[:3].tolist() == [16, 5 * 16 + 8, -1]
    assert mg[1].slot_mapping.np[:2].tolist() == [3 * 48, 3 * 48 + 40]
    assert (mg[2].slot_mapping.np == 99).all()
    mg.swap_row(0, 1), mg.move_row(1, 2), mg.clear_row(2), mg.commit_block_table(4), mg.clear()
    with pytest.raises(ValueError):
        MultiGroupBlockTable(4, 64, False, "cpu", [16, 16], [4])
    with pytest.raises(ValueError):
        MultiGroupBlockTable(4, 64, False, "cpu", [16], [4], 1, [SlotMappingMode.NONE] * 2)
    mg.close()


@needs_gpu
def test_vllm_032_calls_on_the_mirror():
    """vLLM 0.32's GPU runner calls on a CUDA table: CUDA query_start_loc and
    positions go to the mirror's slot kernel (into slot_mapping.gpu, padded
    with -1); direct host writes and preserve_serving_state reach the
    device at the next commit."""
    R, M, T = 6, 8, 64
    t = BlockTable(16, R, M, T, False, "cuda", 1)
    host = BlockTable(16, R, M, T, False, "cpu", 1)
    assert t.mirror is not None
    rng = np.random.default_rng(3)
    for r in range(R):
        ids = rng.integers(1, 900, int(rng.integers(1, M))).tolist()
        t.add_row(ids, r), host.add_row(ids, r)

    def check(n):
        # What the attention kernel may read: each row's first num_blocks
        # entries. Past them the device holds zeros, while a host table
        # restored by preserve_serving_state may hold stale ids (vLLM's too).
        t.commit_block_table(n)
        torch.cuda.synchronize()
        dev, want = t.get_device_tensor(n).cpu().numpy(), host.get_numpy_array()[:n]
        for r in range(n):
            k = int(host.num_blocks_per_row[r])
            np.testing.assert_array_equal(dev[r, :k], want[r, :k], err_msg=f"row {r}")
        lens = [int(rng.integers(0, 6)) for _ in range(n)]
        qsl = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        pos = np.concatenate([rng.integers(0, int(host.num_blocks_per_row[r]) * 16, k)
                              for r, k in enumerate(lens)] + [np.zeros(0)]).astype(np.int64)
        t.compute_slot_mapping(n, torch.from_numpy(qsl).cuda(), torch.from_numpy(pos).cuda())
        host.compute_slot_mapping(n, qsl, pos)
        torch.cuda.synchronize()
        np.testing.assert_array_equal(t.slot_mapping.gpu.cpu().numpy(), host.slot_mapping.np)

    check(R)
    t.block_table.np[2, 0] = 777                    # a direct write, as vLLM's warmups do
    host.block_table.np[2, 0] = 777
    check(R)
    # preserve_serving_state
    saved = (t.block_table.gpu.clone(), t.block_table.cpu.clone())
    t.clear(), host.clear()
    t.add_row([5, 6], 0), host.add_row([5, 6], 0)   # a dummy run
    check(2)
    t.block_table.gpu.copy_(saved[0])
    t.block_table.cpu.copy_(saved[1])
    host.block_table.cpu.copy_(saved[1])
    for r in range(1, R):
        if host.num_blocks_per_row[r] < M:
            t.append_row([40 + r], r), host.append_row([40 + r], r)
    check(R)
    t.close()


def test_one_cpu_gpu_buffer_class():
    """compat.vllm hands out blocktable's one CpuGpuBuffer: vLLM's attributes
    and the seed's methods on the same object, over the segment's memory."""
    import blocktable as bt
    from blocktable.gpu.buffer import CpuGpuBuffer as G
    assert CpuGpuBuffer is G is bt.CpuGpuBuffer
    t = BlockTable(16, 4, 8, 32, False, "cpu", 1)
    buf = t.block_table
    buf.set_row(1, [5, 9])                         # the seed's method: the segment's row
    t.num_blocks_per_row[1] = 2
    assert t.segment.read_row(1)[0].tolist() == [5, 9] and buf.get(1, 1) == 9
    assert buf.get_gpu().data_ptr() == buf.cpu.data_ptr()       # no device: gpu is cpu
    assert buf._sync_to_gpu() == 0
    assert buf.get_cpu() is buf.np
