"""A short simulated inference workload on an embedded blocktable segment.

What `make run` runs until the daemon exists. Requests arrive at random,
are admitted into rows while there are blocks for their prompt, prefill,
then decode one token per step; each scheduler step is ONE libbt call
(Client.step: release finished rows, allocate the blocks every running row
needs) followed by one slot-mapping call for all scheduled tokens. When the
pool runs dry the newest request is preempted (its row released, the request
requeued), as vLLM's scheduler does. At the end every block is back.
"""
import argparse
import collections
import time

import numpy as np

import blocktable as bt


class Request:
    def __init__(self, rid, prompt, output):
        self.rid, self.prompt, self.output = rid, prompt, output
        self.row, self.tokens = None, 0  # tokens with KV computed so far

    def next_tokens(self):
        return self.prompt if self.tokens == 0 else 1

    def done(self):
        return self.tokens >= self.prompt + self.output


def cdiv(a, b):
    return -(-a // b)


class Simulator:
    def __init__(self, args):
        self.args = args
        self.rng = np.random.default_rng(args.seed)
        self.B = args.block_size
        cfg = bt.SegmentConfig(block_size=self.B, num_pools=1, blocks_per_pool=args.blocks,
                               num_rows=args.max_reqs, row_width=args.max_blocks_per_req,
                               max_clients=2, hand_size=64)
        self.seg = bt.Segment.create(None, cfg)
        self.client = self.seg.client()
        self.waiting, self.running, self.finishing = collections.deque(), [], []
        self.stats = collections.Counter()
        self.free_at_start = self.seg.free_blocks()
        self.slots = np.empty(args.max_batched_tokens, np.int64)
        self.t_step = self.t_slots = 0.0

    def arrive(self, step):
        for _ in range(self.rng.poisson(self.args.arrival_rate)):
            max_prompt = self.args.max_blocks_per_req * self.B - self.args.max_output
            prompt = int(self.rng.integers(1, min(400, max_prompt)))
            output = int(self.rng.integers(1, self.args.max_output))
            self.waiting.append(Request(self.stats["arrived"], prompt, output))
            self.stats["arrived"] += 1

    def schedule(self):
        """Admit waiting requests while rows, blocks and the token budget
        allow; preempt the newest running request if decode runs dry."""
        # The blocks of rows that the step releases are not counted: libbt's
        # bt_step pops the new blocks before it releases (reported upstream).
        budget, free = self.args.max_batched_tokens, self.seg.free_blocks()
        need = lambda r: cdiv(r.tokens + r.next_tokens(), self.B) - (  # noqa: E731
            int(self.seg.num_blocks[r.row]) if r.row is not None else 0)
        while self.running and sum(need(r) for r in self.running) > free:
            victim = self.running.pop()  # the newest: vLLM's recompute preemption
            self.stats["blocks_freed"] += int(self.seg.num_blocks[victim.row])
            self.client.release_row(victim.row)
            free = self.seg.free_blocks()
            self.waiting.appendleft(Request(victim.rid, victim.prompt, victim.output))
            self.stats["preempted"] += 1
        budget -= len(self.running)
        demand = sum(need(r) for r in self.running)
        while self.waiting and self.waiting[0].prompt <= budget:
            r = self.waiting[0]
            if demand + need(r) > free or len(self.running) + len(self.finishing) >= self.args.max_reqs:
                break
            self.waiting.popleft()
            r.row = self.client.claim_row(key=r.rid)
            self.running.append(r)
            demand += need(r)
            budget -= r.prompt
        return [need(r) for r in self.running]

    def step(self):
        n_new = self.schedule()
        free_rows = [r.row for r in self.finishing]
        freed = sum(int(self.seg.num_blocks[row]) for row in free_rows)
        rows = [r.row for r in self.running]
        t0 = time.perf_counter()
        ids = self.client.step(rows, n_new, free_rows=free_rows)
        t1 = time.perf_counter()
        self.stats["blocks_allocated"] += len(ids)
        self.stats["blocks_freed"] += freed
        self.finishing = []
        self.map_slots(rows)
        self.t_step += t1 - t0
        for r in self.running:
            r.tokens += r.next_tokens()
            self.client.set_tokens(r.row, r.tokens)
        done = [r for r in self.running if r.done()]
        self.running = [r for r in self.running if not r.done()]
        self.finishing = done
        self.stats["finished"] += len(done)
        used = self.seg.config.blocks_per_pool - 1 - self.seg.free_blocks()
        self.stats["peak_blocks_in_use"] = max(self.stats["peak_blocks_in_use"], used)

    def map_slots(self, rows):
        """Slots of every token scheduled this step, padded with -1 to the
        token budget (a CUDA graph's fixed size)."""
        counts = [r.next_tokens() for r in self.running]
        qsl = np.zeros(len(counts) + 1, np.int32)
        np.cumsum(counts, out=qsl[1:])
        pos = np.concatenate([np.arange(r.tokens, r.tokens + k) for r, k in
                              zip(self.running, counts)] or [np.empty(0, np.int64)])
        t0 = time.perf_counter()
        s = self.seg.slots_qsl(qsl, pos, rows=rows, out=self.slots, out_len=len(self.slots))
        self.t_slots += time.perf_counter() - t0
        n = int(qsl[-1])
        assert (s[:n] >= 0).all() and (s[n:] == -1).all(), "a scheduled token has no slot"
        self.stats["tokens"] += n

    def finish(self):
        for r in self.running + self.finishing:
            self.stats["blocks_freed"] += int(self.seg.num_blocks[r.row])
            self.client.release_row(r.row)
        self.running = self.finishing = []

    def run(self):
        for s in range(self.args.steps):
            self.arrive(s)
            self.step()
        self.finish()
        return self.report()

    def report(self):
        st, a = self.stats, self.args
        free_end = self.seg.free_blocks()
        check = self.seg.check()
        lines = [
            f"steps                 {a.steps}",
            f"requests              {st['arrived']} arrived, {st['finished']} finished, "
            f"{st['preempted']} preempted, {len(self.waiting)} still waiting",
            f"tokens scheduled      {st['tokens']}",
            f"blocks allocated      {st['blocks_allocated']}",
            f"blocks freed          {st['blocks_freed']}",
            f"peak blocks in use    {st['peak_blocks_in_use']} of {a.blocks - 1}",
            f"free blocks           {self.free_at_start} at start, {free_end} at end",
            f"step call             {1e6 * self.t_step / a.steps:.1f} us per step",
            f"slot mapping          {1e6 * self.t_slots / a.steps:.1f} us per step",
            f"segment check         {'clean' if check.clean else check}",
        ]
        print("\n".join(lines))
        ok = (free_end == self.free_at_start and check.clean
              and st["blocks_allocated"] == st["blocks_freed"])
        print("OK: every block is back" if ok else "FAILED: blocks were lost")
        return 0 if ok else 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--blocks", type=int, default=2048, help="blocks in the pool")
    p.add_argument("--max-reqs", type=int, default=64)
    p.add_argument("--max-blocks-per-req", type=int, default=64)
    p.add_argument("--max-batched-tokens", type=int, default=2048)
    p.add_argument("--max-output", type=int, default=200)
    p.add_argument("--arrival-rate", type=float, default=0.6, help="requests per step")
    args = p.parse_args(argv)
    sim = Simulator(args)
    try:
        return sim.run()
    finally:
        sim.seg.close()


if __name__ == "__main__":
    raise SystemExit(main())
