"""PredictiveBlockAllocator: reserve blocks ahead so most appends skip the
shared free list.

Each request's growth is learnt as an exponentially weighted moving average
(EWMA) of the blocks it asks for per call after its first (the first is
its size, a prompt, not growth: a 1,000-token prefill must not make the
allocator reserve 4 x 63 blocks for a request that then decodes one block
every 16 steps). When a request must go to the
shared pool anyway (its reservation ran out), the allocator pops, in the
same single operation, enough extra blocks to cover the next
`prediction_horizon` calls at that rate; those calls are then served from
the reservation without touching shared state. A request that needs one
block per call and a horizon of 4 pays one pop per 5 blocks instead of one
per block.

Reservations are loose references in this client's hand (bt_blocks_alloc):
  * invisible to rows, so the table's zero tail holds and no request can
    read a reserved block's KV;
  * recovered with everything else the client held if its process dies
    (bt_seg_recover_client drops the hand);
  * released when the request ends (end_request), and
  * reclaimed under pressure: when the pool cannot serve an allocation, other
    requests' reservations are taken (largest first), so an allocation never
    fails while the pool's free blocks plus this allocator's reserved blocks
    suffice. Moving a reserved block between requests is bookkeeping in this
    process: the block stays in the same hand, no shared operation happens.

Reservations held by *other* processes' allocators are in their hands and
are not reclaimable from here; each process guarantees the property for its
own reservations.

The seed's allocator handed the predicted blocks to the caller as if asked
for, never reclaimed them, and freed ids it had never allocated.

Thread safety: one thread at a time (it drives one client). Errors:
BtError subclasses; a call that raised changed nothing.
"""
import math

import numpy as np

from ._core import Segment
from ._errors import make_error
from . import _lib
from ._types import I32, SegmentConfig
from .sparse import count
from .strategies import BlockSource, UnknownRequest, unknown_request
from .table import BlockAllocationStrategy

__all__ = ["PredictiveBlockAllocator", "UnknownRequest"]


class PredictiveBlockAllocator(BlockSource):
    """Block allocator with per-request prediction (the seed's names).

    PredictiveBlockAllocator(total_blocks, block_size=16, prediction_horizon=4)
    makes its own embedded segment with one pool of total_blocks usable
    blocks. To share a segment with a table or other processes, pass
    ``client=`` (and ``pool=``); total_blocks is then the pool's (or must
    equal it). ``alpha`` weighs the newest observation of the EWMA;
    ``max_reserve`` caps one request's reservation (default: horizon x rate).

    The rate is blocks per allocate() call: call it once per scheduler step
    (num_blocks 0 when the request needs nothing) and the horizon counts
    steps; call it only when a block is needed and it counts allocations.
    block_size converts tokens (``blocks_for_tokens``) and nothing else.

    Blocks returned by allocate() are loose references held by this
    allocator's client until you free() them, end_request() with them, or
    append them to a row of the same client and call detach().
    """

    strategy = BlockAllocationStrategy.PREDICTIVE

    def __init__(self, total_blocks=None, block_size=16, prediction_horizon=4, *,
                 client=None, pool=0, alpha=0.5, max_reserve=None):
        self.block_size = count(block_size, "block_size")
        self.prediction_horizon = count(prediction_horizon, "prediction_horizon")
        if self.block_size == 0:
            raise make_error(_lib.BT_ECONFIG, "block_size must be positive")
        if not 0.0 < alpha <= 1.0:
            raise make_error(_lib.BT_ECONFIG, f"alpha {alpha} not in (0, 1]")
        self.alpha = float(alpha)
        self.max_reserve = None if max_reserve is None else count(max_reserve, "max_reserve")
        self._own_segment = None
        if client is None:
            total = count(total_blocks, "total_blocks")
            if total == 0:
                raise make_error(_lib.BT_ECONFIG, "total_blocks must be positive")
            self._own_segment = Segment.create(None, SegmentConfig(
                block_size=self.block_size, num_pools=1, blocks_per_pool=total + 1,
                num_rows=1, row_width=1, max_clients=1, hand_size=min(total, 1 << 20),
                max_mirrors=0))
            client, pool = self._own_segment.client(), 0
        super().__init__(client, pool)
        usable = client.segment.config.blocks_per_pool - (1 if pool == 0 else 0)
        if total_blocks is not None and total_blocks != usable:
            raise make_error(_lib.BT_ECONFIG, f"total_blocks {total_blocks} but pool {pool} "
                                             f"has {usable} blocks")
        self.total_blocks = usable
        self._reserve = {}      # request id -> reserved ids (loose, in the hand)
        self._rate = {}         # request id -> EWMA of blocks per call
        self._s.update(dict.fromkeys(("hits", "call_hits", "reclaims", "reclaimed_blocks",
                                      "reserved_released"), 0))

    # ---- allocation -----------------------------------------------------------
    def allocate(self, request_id, num_blocks, predict_future=True):
        """num_blocks blocks for request_id (int32 array): from its
        reservation first, then from the pool, topping the reservation up to
        ceil(rate x horizon) in the same pop (predict_future=False: no top
        up). Under pressure, other requests' reservations are reclaimed.
        Errors: OutOfBlocks (or HandFull) only when the pool's free blocks
        plus every reservation of this allocator cannot cover num_blocks;
        InvalidArgument / OutOfRange for a bad request id or count."""
        if request_id is None:
            raise make_error(_lib.BT_EINVAL, "request_id must not be None")
        n = count(num_blocks, "num_blocks")
        own = self._reserve.get(request_id, [])
        take = min(n, len(own))
        need = n - take
        if request_id not in self._rate:    # its size (the prompt), not its growth
            rate = None
        else:
            old = self._rate[request_id]
            rate = float(n) if old is None else self.alpha * n + (1.0 - self.alpha) * old
        extra = 0
        if predict_future and need and rate is not None:   # top up on a trip to the pool
            target = math.ceil(rate * self.prediction_horizon)
            if self.max_reserve is not None:
                target = min(target, self.max_reserve)
            extra = max(0, target - (len(own) - take))
        fresh, plan = self._obtain(request_id, need, extra)     # raises: nothing changed
        # Commit: nothing below can fail.
        for victim, k in plan:
            vr = self._reserve[victim]
            del vr[len(vr) - k:]
        ids = own[:take] + fresh[:need]
        del own[:take]
        own.extend(fresh[need:])
        self._reserve[request_id] = own
        self._rate[request_id] = rate
        self._record(request_id, ids)
        self._s["hits"] += take
        self._s["call_hits"] += need == 0
        return np.array(ids, I32)

    def _obtain(self, rid, need, extra):
        """(need ids + whatever of extra the pool gave, [(victim, k)]): the
        reclaim plan takes each victim's last k reserved ids; the caller
        applies it. Raises OutOfBlocks with nothing changed."""
        if need + extra == 0:
            return [], []
        got = self._pop(need + extra)
        if got is None and extra:
            got = self._pop(need)
        if got is not None:
            return got, []
        # Pressure: the pool cannot serve `need`. Take the shortfall from
        # other requests' reservations, largest first; if the pool moved
        # under us, a second try takes all of `need` from them.
        victims = sorted(((len(r), v) for v, r in self._reserve.items() if v != rid and r),
                         key=lambda t: -t[0])
        reclaimable = sum(k for k, _ in victims)
        free = self.get_num_free()
        for short in dict.fromkeys((max(1, need - free), need)):
            if short > reclaimable:
                break
            plan, ids = [], []
            for k, v in victims:
                t = min(k, short - len(ids))
                if not t:
                    break
                plan.append((v, t))
                ids.extend(self._reserve[v][k - t:])
            rest = self._pop(need - short) if need > short else []
            if rest is not None:
                self._s["reclaims"] += 1
                self._s["reclaimed_blocks"] += short
                return ids + rest, plan
        raise self._fail(f"request {rid!r} needs {need} more blocks: the pool has {free} free "
                         f"and other requests reserve {reclaimable}")

    def blocks_for_tokens(self, num_tokens):
        """Blocks that num_tokens tokens fill (ceil(num_tokens / block_size))."""
        return -(-count(num_tokens, "num_tokens") // self.block_size)

    # ---- giving back ------------------------------------------------------------
    def end_request(self, request_id, block_ids=()):
        """The request is done: its reservation and block_ids (blocks it was
        handed and still holds loose) go back to the pool in one shared
        operation, and its rate is forgotten. Errors: UnknownRequest,
        NotHeld (block_ids as in free()); nothing changes then."""
        if not self.knows(request_id):
            raise unknown_request(request_id)
        ids = self.check_out(block_ids, "end_request")
        res = self._reserve.pop(request_id, [])
        self._give_back(ids + res)
        self._out.difference_update(ids)
        self._s["reserved_released"] += len(res)
        self._s["requests_ended"] += 1
        del self._last[request_id]
        self._rate.pop(request_id, None)

    def release_reservations(self):
        """Give every reservation back (one shared operation); the requests
        stay known."""
        res = [b for r in self._reserve.values() for b in r]
        self._give_back(res)
        self._s["reserved_released"] += len(res)
        for r in self._reserve.values():
            r.clear()

    def close(self):
        """Release the reservations; close the segment if this allocator
        made it (blocks still handed out go with it)."""
        if self._own_segment is not None:
            self._own_segment.close()
            self._reserve.clear()
        elif not self.client.closed:
            self.release_reservations()

    # ---- questions ----------------------------------------------------------------
    def get_num_reserved(self):
        return sum(len(r) for r in self._reserve.values())

    def reserved_for(self, request_id):
        """Blocks reserved for a request (0 for a known one without)."""
        if not self.knows(request_id):
            raise unknown_request(request_id)
        return len(self._reserve.get(request_id, ()))

    def predicted_rate(self, request_id):
        """The request's EWMA of blocks per call (None until its second call)."""
        if not self.knows(request_id):
            raise unknown_request(request_id)
        return self._rate[request_id]

    def get_stats(self):
        """BlockSource's counters plus: hits (blocks served from a
        reservation), hit_rate (hits / blocks_allocated), call_hit_rate
        (calls that needed no shared operation), reserved, reclaims
        (allocations that took other requests' reservations),
        reclaimed_blocks, active_requests."""
        s = super().get_stats()
        n = s["blocks_allocated"]
        s["hit_rate"] = s["hits"] / n if n else 0.0
        s["call_hit_rate"] = s["call_hits"] / s["allocations"] if s["allocations"] else 0.0
        s["reserved"] = self.get_num_reserved()
        s["active_requests"] = len(self._last)
        return s
