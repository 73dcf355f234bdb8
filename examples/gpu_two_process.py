"""Two processes, one table: a scheduler edits block tables in shared memory,
a GPU worker mirrors them and runs paged attention from the mirror.

  scheduler (CPU only)   claims rows for requests, allocates KV blocks from
                         the segment's pool as their tokens grow, releases
                         finished requests and admits new ones; after each
                         step it tells the worker which tokens are new
  worker (GPU)           exports the segment's mirror on its GPU, syncs it
                         each step (only what changed moves), writes the new
                         tokens' K/V into a paged KV cache at the slots the
                         slot-mapping kernel computes from the mirror, gathers
                         the batch's block table with the gather kernel, and
                         runs attention over the paged cache

Each step the worker checks its result against the same attention computed
from contiguous K/V (no block table at all): they must agree to rounding.
K/V of a token are a fixed function of (request key, position), so both
paths see the same data.

    python examples/gpu_two_process.py [--steps 200] [--requests 24]

Without a GPU (or cupy) it says so and exits 0.
"""
import argparse
import multiprocessing as mp
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bindings"))
import blocktable as bt  # noqa: E402
from blocktable import gpu  # noqa: E402

BS, D = 16, 64                          # tokens per block, head dimension


def scheduler(name, steps, n_req, q, ack, seed):
    """Edits the tables; sends [(row, key, num_tokens, new_tokens)] per step
    and waits for the worker's step to finish before the next edits (as a
    scheduler waits for the forward pass: a released row must not change
    under a step that still reads it)."""
    seg = bt.Segment.attach(name)
    cl = seg.client()
    rng = np.random.default_rng(seed)
    live = {}                                          # row -> [key, num_tokens]
    next_key = 1

    def admit():
        nonlocal next_key
        row = cl.claim_row(key=next_key)
        prompt = int(rng.integers(1, 200))
        cl.alloc_append(row, -(-prompt // BS))
        live[row] = [next_key, prompt]
        next_key += 1
        return row, prompt

    for _ in range(n_req):
        admit()
    q.put([(r, k, n, n) for r, (k, n) in live.items()])
    for step in range(steps):
        ack.get()
        batch = []
        for row in list(live):
            if rng.random() < 0.03:                    # finished: blocks go back
                cl.release_row(row)
                del live[row]
                r, n = admit()
                batch.append((r, live[r][0], n, n))    # prefill
                continue
            key, n = live[row]
            if n % BS == 0:                            # decode needs a new block
                cl.alloc_append(row, 1)
            live[row][1] = n + 1
            batch.append((row, key, n + 1, 1))
        q.put(batch)
    ack.get()                  # the last step is done before the rows go
    q.put(None)
    cl.close()


def kv(torch, keys, pos):
    """K and V of tokens (key, position): deterministic, float32 [n, D]."""
    f = torch.arange(D, device=pos.device, dtype=torch.float32)
    x = keys[:, None].float() * 0.37 + pos[:, None].float() * 0.011 + f * 0.7
    return torch.sin(x), torch.cos(1.3 * x)


def query(torch, keys):
    f = torch.arange(D, device=keys.device, dtype=torch.float32)
    return torch.sin(keys[:, None].float() * 1.1 + f * 0.3)


def attention(torch, q, K, V, lens):
    """q [B, D], K/V [B, L, D], lens [B]: masked softmax attention."""
    L = K.shape[1]
    s = torch.einsum("bd,bld->bl", q, K) / D ** 0.5
    s = s.masked_fill(torch.arange(L, device=q.device)[None, :] >= lens[:, None], float("-inf"))
    return torch.einsum("bl,bld->bd", torch.softmax(s, dim=1), V)


def diagnose(seg, ex, step, batch, qsl, starts, rows, slots):
    """A new token without a slot: say where the GPU and libbt disagree."""
    import cupy as cp
    torch_slots = slots.cpu().numpy()
    pos = np.concatenate([np.arange(a, a + n) for a, n in zip(starts, np.diff(qsl))])
    want = seg.slots_qsl(qsl, pos, rows=rows)
    t, c = cp.asnumpy(ex._table), cp.asnumpy(ex._counts)
    rows_bad = np.flatnonzero((t != seg.table).any(1) | (c != seg.num_blocks))
    i = int(np.flatnonzero(torch_slots < 0)[0])
    raise AssertionError(
        f"step {step}: token {i} (position {pos[i]}) has slot {torch_slots[i]}, libbt says "
        f"{want[i]}; GPU and libbt differ at {int((torch_slots != want).sum())} tokens; "
        f"mirror rows that differ from the table: {rows_bad.tolist()[:10]} "
        f"(last sync {ex.last_sync}); batch head {batch[:3]}")


def worker(name, q, ack, verbose=True):
    import cupy as cp
    import torch
    seg = bt.Segment.attach(name)
    ex = gpu.MirrorExporter(seg)
    cfg = seg.config
    nslots = cfg.num_pools * cfg.blocks_per_pool * BS
    kcache = torch.zeros(nslots, D, device="cuda")
    vcache = torch.zeros(nslots, D, device="cuda")
    stream = torch.cuda.current_stream()
    steps = worst = moved = 0
    t0 = time.perf_counter()
    while (batch := q.get()) is not None:
        rows = np.array([b[0] for b in batch], np.int32)
        keys = torch.tensor([b[1] for b in batch], device="cuda")
        ntok = np.array([b[2] for b in batch], np.int64)
        new = np.array([b[3] for b in batch], np.int32)
        moved += ex.sync(stream)                        # the mirror catches up
        # Slots of the new tokens (form 1: row, first position, count).
        qsl = np.zeros(len(batch) + 1, np.int32)
        qsl[1:] = np.cumsum(new)
        slots = torch.from_dlpack(ex.slot_mapping(qsl, starts=ntok - new, rows=rows,
                                                  stream=stream))
        if not bool((slots >= 0).all()):
            diagnose(seg, ex, steps, batch, qsl, ntok - new, rows, slots)
        tok_keys = torch.repeat_interleave(keys, torch.from_numpy(new).cuda())
        tok_pos = torch.cat([torch.arange(n - k, n, device="cuda")
                             for n, k in zip(ntok.tolist(), new.tolist())])
        k_new, v_new = kv(torch, tok_keys, tok_pos)
        kcache[slots] = k_new                           # reshape_and_cache
        vcache[slots] = v_new
        # Paged attention: the batch's block table from the mirror.
        L = int(ntok.max())
        nblk = -(-L // BS)
        table = torch.from_dlpack(ex.gather(rows, width=nblk, stream=stream)).long()
        p = torch.arange(L, device="cuda")
        lens = torch.from_numpy(ntok).cuda()
        slot = table[:, p // BS] * BS + p % BS          # [B, L]
        slot = torch.where(p[None, :] < lens[:, None], slot, 0)
        qv = query(torch, keys)
        out_paged = attention(torch, qv, kcache[slot], vcache[slot], lens)
        # The same without any table: K/V of positions 0..n-1 made directly.
        pos_all = p.repeat(len(batch))
        kc, vc = kv(torch, keys.repeat_interleave(L), pos_all)
        out_ref = attention(torch, qv, kc.view(len(batch), L, D), vc.view(len(batch), L, D), lens)
        err = (out_paged - out_ref).abs().max().item()
        worst = max(worst, err)
        assert err < 1e-4, f"step {steps}: paged attention differs by {err}"
        steps += 1
        ack.put(steps)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if verbose:
        print(f"worker: {steps} steps on {cp.cuda.runtime.getDeviceProperties(ex.device)['name'].decode()}, "
              f"max |paged - contiguous| = {worst:.2e}, {moved} table entries synced "
              f"({moved / max(steps, 1):.1f} per step), {dt / max(steps, 1) * 1e3:.2f} ms per step")
    ex.close()
    return worst


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    ok, why = gpu.gpu_available()
    if not ok:
        print(f"gpu_two_process: skipped, {why}")
        return 0
    name = f"example-gpu-{os.getpid()}"
    seg = bt.Segment.create(name, bt.SegmentConfig(
        block_size=BS, num_pools=1, blocks_per_pool=4096, num_rows=64, row_width=64,
        max_clients=4, hand_size=64, max_mirrors=2))
    try:
        c = mp.get_context("spawn")
        q, ack = c.Queue(), c.Queue()
        p = c.Process(target=scheduler, args=(name, a.steps, a.requests, q, ack, a.seed))
        p.start()
        worst = worker(name, q, ack)
        p.join(60)
        print(f"gpu_two_process: OK (scheduler exit {p.exitcode}, worst error {worst:.2e})")
        return 0 if p.exitcode == 0 else 1
    finally:
        seg.close()
        bt.Segment.unlink(name)


if __name__ == "__main__":
    sys.exit(main())
