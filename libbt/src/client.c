/*
 * client.c -- client slots and the recovery protocol around data-path calls.
 *
 * Every data-path call brackets its work with bt_op_begin / bt_op_end: an
 * exchange on the slot's in_op word, then a look at the segment's freeze
 * word. A sweeper (bt_seg_check with repair) stores freeze, then waits for
 * every live client's in_op to be 0. Both sides use seq_cst, so either the
 * client sees the freeze and backs off, or the sweeper sees in_op and waits:
 * no call runs while the sweeper rebuilds counts and lists.
 *
 * A client's loose references live in its hand, an array in its slot's part
 * of the segment, so a recoverer knows exactly what a dead client held. So
 * does its magazine of free blocks (below). The allocator's client calls
 * (bt_blocks_*) are here, with the hand and the magazine they use.
 * Closing a client releases its rows, so bt_client_close lives a layer up,
 * in check.c, beside the recovery that releases the same things.
 */
#include <errno.h>
#include <stdint.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "bt_internal.h"

/* Bumped in every forked child: a handle opened before a fork is the
 * parent's, and the child must not use it (bt_op_begin checks; here, so that
 * the check is a load the compiler sees). */
static uint64_t fork_gen;
static void on_fork_child(void) { bt_fetch_add_relaxed(&fork_gen, 1); }
__attribute__((constructor)) static void bt_init_fork(void) { pthread_atfork(NULL, NULL, on_fork_child); }
uint64_t bt_fork_generation(void) { return bt_load_relaxed(&fork_gen); }

#define FREEZE_WAIT_MAX_NS (5ull * 1000000000ull)

/* Wait out a freeze. The sweeper's pid is in the freeze word: if it died
 * mid-sweep the segment may be half rebuilt, so we refuse to run rather than
 * guess (BT_EFROZEN); a new btd adopting the segment sweeps and thaws it. */
static int wait_thaw(bt_seg *s)
{
    uint64_t t0 = bt_now_ns(), last_check = t0;
    for (uint32_t spins = 0;; spins++) {
        uint64_t fz = bt_load_acquire(&s->hdr->freeze);
        if (fz == 0)
            return BT_OK;
        if ((int32_t)fz <= 0 || fz > INT32_MAX)
            return BT_EFROZEN;          /* no process could have written that */
        if (spins < 64) {
            bt_cpu_relax();
            continue;
        }
        struct timespec ts = { 0, 20000 };
        nanosleep(&ts, NULL);
        uint64_t now = bt_now_ns();
        if (now - last_check > 1000000) {
            last_check = now;
            if (kill((pid_t)fz, 0) < 0 && errno == ESRCH)
                return BT_EFROZEN;
        }
        if (now - t0 > FREEZE_WAIT_MAX_NS)
            return BT_EFROZEN;
    }
}

_Thread_local bt_client *bt_op_client;

int bt_op_begin(bt_client *cl)
{
    if (cl->fork_gen != bt_fork_generation())
        return BT_ECLIENT;
    struct bt_cslot *sl = cl->slot;
    for (;;) {
        bt_xchg_seqcst(&sl->in_op, 1u);
        if (bt_load_seqcst(&cl->seg->hdr->freeze) == 0) {
            if (bt_load_relaxed(&sl->state) == BT_CLIENT_ACTIVE &&
                bt_load_relaxed(&sl->pid) == cl->pid) {
                bt_op_client = cl;
                return BT_OK;
            }
            bt_store_release(&sl->in_op, 0u);
            return BT_ECLIENT;          /* declared dead and reaped under us */
        }
        bt_store_release(&sl->in_op, 0u);
        int rc = wait_thaw(cl->seg);
        if (rc)
            return rc;
    }
}

/* ---- the hand: a multiset of loose references ---------------------------- */

int bt_hand_add(bt_client *cl, const int32_t *ids, uint32_t n)
{
    uint32_t cnt = bt_load_relaxed(&cl->slot->hand_count);
    if ((uint64_t)cnt + n > cl->seg->cfg.hand_size)
        return BT_EHANDFULL;
    for (uint32_t i = 0; i < n; i++)
        bt_store_relaxed(&cl->hand[cnt + i], (uint32_t)ids[i]);
    bt_store_release(&cl->slot->hand_count, cnt + n);
    return BT_OK;
}

/* Move one hand entry per id (with multiplicity) to the hand's tail, so that
 * bt_hand_pop(n) removes exactly them. BT_ENOTHELD if any id is missing; the
 * hand is then only permuted, which changes nothing it means. Searching from
 * the tail finds freshly allocated blocks first. */
int bt_hand_find_all(bt_client *cl, const int32_t *ids, uint32_t n)
{
    uint32_t cnt = bt_load_relaxed(&cl->slot->hand_count);
    uint32_t *h = cl->hand;
    if (cnt > cl->seg->cfg.hand_size)
        return BT_ECORRUPT;
    if (n > cnt)
        return BT_ENOTHELD;
    for (uint32_t k = 0; k < n; k++) {
        uint32_t want = (uint32_t)ids[k], end = cnt - 1 - k;   /* slot to fill */
        uint32_t j = end + 1;
        while (j-- > 0)
            if (bt_load_relaxed(&h[j]) == want)
                break;
        if (j == UINT32_MAX)
            return BT_ENOTHELD;
        uint32_t tmp = bt_load_relaxed(&h[end]);
        bt_store_relaxed(&h[end], want);
        bt_store_relaxed(&h[j], tmp);
    }
    return BT_OK;
}

void bt_hand_pop(bt_client *cl, uint32_t n)
{
    uint32_t cnt = bt_load_relaxed(&cl->slot->hand_count);
    bt_store_release(&cl->slot->hand_count, cnt - n);
}

/* ---- slots ---------------------------------------------------------------- */

static int slot_claim(bt_seg *s, int32_t pid, uint64_t start, uint32_t *id_out)
{
    for (uint32_t i = 0; i < s->cfg.max_clients; i++) {
        struct bt_cslot *sl = &s->clients[i];
        uint32_t st = BT_CLIENT_FREE;
        if (!bt_cas_acqrel(&sl->state, &st, (uint32_t)BT_CLIENT_RESERVED))
            continue;
        bt_store_relaxed(&sl->pid, pid);
        bt_store_relaxed(&sl->start_time, start);
        bt_store_relaxed(&sl->hand_count, 0u);
        bt_store_relaxed(&sl->nrows, 0u);
        bt_store_relaxed(&sl->mag_count, 0u);   /* a freed slot's is empty already */
        bt_store_relaxed(&sl->mag_pool, 0u);
        bt_store_relaxed(&sl->ops, 0ull);
        bt_store_release(&sl->in_op, 0u);
        *id_out = i + 1;
        return BT_OK;
    }
    return BT_ENOCLIENTS;
}

static int client_new(bt_seg *s, uint32_t id, bt_client **out)
{
    bt_client *cl = calloc(1, sizeof(*cl));
    if (!cl || !(cl->mark = calloc((s->cfg.num_rows + 7) / 8, 1))) {
        free(cl);
        return -ENOMEM;
    }
    cl->seg = s;
    cl->id = id;
    cl->pid = getpid();
    cl->fork_gen = bt_fork_generation();
    cl->slot = &s->clients[id - 1];
    cl->hand = s->hands + (uint64_t)(id - 1) * s->cfg.hand_size;
    *out = cl;
    return BT_OK;
}

/* Free a handle, touching nothing shared (a failed adopt; the end of a
 * close, check.c). */
void bt_client_free(bt_client *cl)
{
    free(cl->mark);
    free(cl);
}

int bt_client_reserve(bt_seg *s, int32_t pid, uint64_t start, uint32_t *slot_out)
{
    if (!s || pid <= 0 || !slot_out)
        return BT_EINVAL;
    return slot_claim(s, pid, start, slot_out);
}

int bt_client_adopt(bt_seg *s, uint32_t id, bt_client **out)
{
    if (!s || !out)
        return BT_EINVAL;
    if (id == 0 || id > s->cfg.max_clients)
        return BT_ERANGE;
    struct bt_cslot *sl = &s->clients[id - 1];
    if (bt_load_acquire(&sl->pid) != getpid())
        return BT_ECLIENT;
    bt_client *cl;
    int rc = client_new(s, id, &cl);
    if (rc)
        return rc;
    uint32_t st = BT_CLIENT_RESERVED;
    if (!bt_cas_acqrel(&sl->state, &st, (uint32_t)BT_CLIENT_ACTIVE)) {
        /* Not ours to take: the slot may be ACTIVE with our pid because it is
         * another live handle of this process (or this very one). Only free
         * the new handle: bt_client_close would take that slot for its own
         * and release the other handle's rows and blocks. */
        bt_client_free(cl);
        return BT_ECLIENT;
    }
    *out = cl;
    return BT_OK;
}

int bt_client_unreserve(bt_seg *s, uint32_t id, int32_t pid)
{
    if (!s || pid <= 0)
        return BT_EINVAL;
    if (id == 0 || id > s->cfg.max_clients)
        return BT_ERANGE;
    struct bt_cslot *sl = &s->clients[id - 1];
    if (bt_load_acquire(&sl->pid) != pid)
        return BT_ECLIENT;
    /* The CAS races the process's own adopt (RESERVED -> ACTIVE): exactly
     * one wins, so a slot is never both adopted and handed out again. */
    uint32_t st = BT_CLIENT_RESERVED;
    if (!bt_cas_acqrel(&sl->state, &st, (uint32_t)BT_CLIENT_FREE))
        return BT_ECLIENT;
    return BT_OK;
}

int bt_client_open(bt_seg *s, bt_client **out)
{
    uint32_t id;
    if (!s || !out)
        return BT_EINVAL;
    int32_t pid = getpid();
    int rc = slot_claim(s, pid, bt_self_start_time(), &id);
    if (rc)
        return rc;
    if ((rc = bt_client_adopt(s, id, out)))
        bt_store_release(&s->clients[id - 1].state, (uint32_t)BT_CLIENT_FREE);
    return rc;
}

uint32_t bt_client_id(const bt_client *cl) { return cl ? cl->id : 0; }

int bt_client_slot_get(const bt_seg *s, uint32_t id, bt_client_slot_info *o)
{
    if (!s || !o)
        return BT_EINVAL;
    if (id == 0 || id > s->cfg.max_clients)
        return BT_ERANGE;
    const struct bt_cslot *sl = &s->clients[id - 1];
    *o = (bt_client_slot_info){ .state = bt_load_relaxed(&sl->state), .pid = bt_load_relaxed(&sl->pid),
        .start_time = bt_load_relaxed(&sl->start_time), .in_op = bt_load_relaxed(&sl->in_op),
        .hand_count = bt_load_relaxed(&sl->hand_count), .rows = bt_load_relaxed(&sl->nrows),
        .magazine = bt_load_relaxed(&sl->mag_count), .ops = bt_load_relaxed(&sl->ops) };
    return BT_OK;
}

/* ---- the magazine: a client's own free blocks ------------------------------ */
/*
 * DPDK's per-lcore mempool cache, made crash-safe. Two processes popping one
 * Treiber stack bounce its head line on every call; a magazine takes half its
 * capacity off the stack with one CAS and serves the calls after from lines
 * only its client writes. Blocks in it are free (count 0, owner 0) but on no
 * list, so the magazine lives in the client's slot in shared memory, not in
 * process memory, and what it caches is known to whoever cleans up:
 *   - every write to it is inside an op. A client that dies inside one takes
 *     a repair, which ignores its magazine and rebuilds the free lists from
 *     what live clients hold: a block half-way between stack and magazine
 *     (popped, count not yet stored; count dropped, not yet pushed) comes out
 *     free exactly once. The repair empties live clients' magazines into the
 *     rebuilt lists too (check.c);
 *   - a client that died outside a call left it consistent, and its
 *     recoverer pushes it back lock-free (bt_mag_release), the count dropped
 *     before the push: dying between leaves a leak for a repair, never a
 *     block both listed and cached.
 * Blocks cached by one client are not there for another: when the stack
 * runs short (under an eighth of the pool, what all magazines may hold), a
 * client refills with just what it needs and its releases go straight to the
 * stack, its magazine with them, so that only idle clients keep some.
 */

/* Is the pool's stack short? */
static inline int stack_low(const bt_seg *s, uint32_t pool)
{
    return bt_load_relaxed(&s->pools[pool].nfree) < (int64_t)(s->cfg.blocks_per_pool / 8);
}

static inline uint32_t pool_of_id(const bt_seg *s, uint32_t id)
{
    return id / s->cfg.blocks_per_pool;
}

static inline int in_pool(const bt_seg *s, uint32_t pool, uint32_t id)
{
    uint32_t lo, span;
    bt_pool_range(s, pool, &lo, &span);
    return id - lo < span;
}

/* The magazine's pool and count, checked: BT_ECORRUPT if scribbled on. */
static int mag_state(const bt_seg *s, const struct bt_cslot *sl, uint32_t *pool, uint32_t *count)
{
    uint32_t c = bt_load_relaxed(&sl->mag_count), p = bt_load_relaxed(&sl->mag_pool);
    if (c > s->mag_cap || (c && bt_stack_pool_err(s, p)))
        return BT_ECORRUPT;
    *pool = p, *count = c;
    return BT_OK;
}

/* Push mag[keep, count) onto the pool's stack, the count dropped first.
 * Entries that are not free blocks of the pool (a scribble) stay off every
 * list for a repair to find; `careful` also drops repeats (the slow paths:
 * a recovery, a corrupt magazine), which the hot path leaves to the pops'
 * count check and the checker, as it does for a scribbled free list. */
static void mag_flush(bt_seg *s, struct bt_cslot *sl, uint32_t pool, uint32_t count,
                      uint32_t keep, int careful)
{
    int32_t ids[BT_MAG_MAX];
    uint32_t k = 0;
    for (uint32_t i = keep; i < count; i++) {
        uint32_t id = bt_load_relaxed(&sl->mag[i]), dup = 0;
        for (uint32_t j = 0; careful && j < k; j++)
            dup |= (uint32_t)ids[j] == id;
        if (!dup && in_pool(s, pool, id) && bt_load_relaxed(&s->refcnt[id]) == 0)
            ids[k++] = (int32_t)id;
    }
    bt_store_release(&sl->mag_count, keep);
    if (k)
        bt_push_zeroed(s, ids, k);
}

/* Take k blocks off the pool's stack on top of the magazine's c. */
static int mag_refill(bt_seg *s, struct bt_cslot *sl, uint32_t pool, uint32_t *c, uint32_t k)
{
    int32_t ids[BT_MAG_MAX];
    uint32_t lo, span;
    bt_pool_range(s, pool, &lo, &span);
    int rc = bt_stack_pop(&s->pools[pool], s->next, lo, span, k, ids);
    if (rc)
        return rc;
    for (uint32_t i = 0; i < k; i++)
        bt_store_relaxed(&sl->mag[*c + i], (uint32_t)ids[i]);
    *c += k;
    bt_store_relaxed(&sl->mag_pool, pool);
    bt_store_release(&sl->mag_count, *c);
    return BT_OK;
}

int bt_mag_pop(bt_client *cl, uint32_t pool, uint32_t n, int32_t *out)
{
    bt_seg *s = cl->seg;
    struct bt_cslot *sl = cl->slot;
    uint32_t cap = s->mag_cap, mp, c;
    if (n > cap / 2) {                  /* no magazine, or a batch worth a CAS of its own */
        int rc = bt_pop_raw(s, pool, n, cl->id, out);
        if (rc == BT_ENOBLOCKS && cap && !mag_state(s, sl, &mp, &c) && c && mp == pool) {
            mag_flush(s, sl, mp, c, 0, 0);      /* its own cached blocks serve it too */
            rc = bt_pop_raw(s, pool, n, cl->id, out);
        }
        return rc;
    }
    if (mag_state(s, sl, &mp, &c)) {
        bt_store_release(&sl->mag_count, 0u);   /* what it held: leaked until a repair */
        return BT_ECORRUPT;
    }
    if (c && mp != pool) {              /* another pool's blocks: back to their stack */
        mag_flush(s, sl, mp, c, 0, 0);
        c = 0;
    }
    if (c < n) {
        /* Fill to n and half a magazine; to n alone when the stack is short
         * or that short (a client that can be served, is). */
        int rc = BT_ENOBLOCKS;
        cl->mag_low = stack_low(s, pool);
        if (!cl->mag_low)
            rc = mag_refill(s, sl, pool, &c, n + cap / 2 - c);
        if (rc == BT_ENOBLOCKS)
            rc = mag_refill(s, sl, pool, &c, n - c);
        if (rc)
            return rc;
    }
    for (uint32_t i = 0; i < n; i++) {
        uint32_t id = bt_load_relaxed(&sl->mag[c - 1 - i]);
        if (!in_pool(s, pool, id) || bt_load_relaxed(&s->refcnt[id]) != 0) {
            /* Scribbled on (not the pool's, held, or in it twice): the good
             * ones go back, the bad stay off every list until a repair. */
            for (uint32_t j = 0; j < i; j++)
                bt_store_relaxed(&s->refcnt[out[j]], 0u);
            mag_flush(s, sl, pool, c, 0, 1);
            return BT_ECORRUPT;
        }
        /* Ours alone, and nobody moves a count up from 0: a store will do. */
        bt_store_relaxed(&s->refcnt[id], 1u);
        out[i] = (int32_t)id;
    }
    for (uint32_t i = 0; i < n; i++)
        bt_store_relaxed(&s->owner[out[i]], cl->id);
    bt_store_release(&sl->mag_count, c - n);
    return BT_OK;
}

void bt_mag_push(bt_client *cl, const int32_t *ids, uint32_t n)
{
    bt_seg *s = cl->seg;
    struct bt_cslot *sl = cl->slot;
    uint32_t cap = s->mag_cap, mp, c, lo, span, k = 0;
    int32_t rest[BT_MAG_MAX];
    if (!n)
        return;
    /* A load of the head's line, which nobody writes while every client is
     * served by its magazine: a hit, not a bounce. */
    if (!cap || (cl->mag_low = stack_low(s, pool_of_id(s, (uint32_t)ids[0]))) ||
        mag_state(s, sl, &mp, &c)) {
        if (cl->mag_low && !mag_state(s, sl, &mp, &c) && c)
            mag_flush(s, sl, mp, c, 0, 0);      /* the stack is short: give it all */
        bt_push_zeroed(s, ids, n);
        return;
    }
    if (!c) {
        mp = pool_of_id(s, (uint32_t)ids[0]);
        bt_store_relaxed(&sl->mag_pool, mp);
    }
    bt_pool_range(s, mp, &lo, &span);
    for (uint32_t i = 0; i < n; i++) {
        uint32_t id = (uint32_t)ids[i];
        if (id - lo >= span) {          /* another pool's: its stack */
            rest[k++] = (int32_t)id;
            if (k == BT_MAG_MAX)
                bt_push_zeroed(s, rest, k), k = 0;
            continue;
        }
        if (c == cap) {                 /* full: half of it back in one CAS */
            mag_flush(s, sl, mp, c, cap / 2, 0);
            c = cap / 2;
        }
        bt_store_relaxed(&s->owner[id], 0u);
        bt_store_relaxed(&sl->mag[c++], id);
    }
    bt_store_release(&sl->mag_count, c);
    if (k)
        bt_push_zeroed(s, rest, k);
}

void bt_mag_release(bt_seg *s, uint32_t id)
{
    struct bt_cslot *sl = &s->clients[id - 1];
    uint32_t mp, c;
    if (mag_state(s, sl, &mp, &c))
        bt_store_release(&sl->mag_count, 0u);  /* scribbled on: a repair frees them */
    else if (c)
        mag_flush(s, sl, mp, c, 0, 1);
}

/* Release one reference on each valid id: a batch when it can, one by one
 * when a count was already 0, so one scribbled-on entry does not keep the
 * others from being freed. Inside a client's call (a row released or cut,
 * a step) the freed blocks go to its magazine; outside one (a recoverer
 * releasing a dead client's rows) to the stacks. */
void bt_refs_release(bt_seg *s, int32_t *ids, uint32_t n)
{
    uint32_t k = 0;
    if (n == 0)
        return;                         /* the common release of an empty row */
    for (uint32_t i = 0; i < n; i++)
        if (bt_id_ok(s, ids[i]))
            ids[k++] = ids[i];
    bt_client *cl = bt_op_client;       /* and inside its op, to be sure: a load of its own line */
    if (cl && cl->seg == s && s->mag_cap && k && bt_load_relaxed(&cl->slot->in_op)) {
        int32_t small[256], *z = k <= 256 ? small : malloc(k * sizeof(int32_t));
        uint32_t nz = 0;
        int rc = z ? bt_decref_zeroed(s, ids, k, z, &nz) : -ENOMEM;
        if (!rc)
            bt_mag_push(cl, z, nz);
        if (z != small)
            free(z);
        if (!rc)
            return;                     /* else nothing changed: the way below */
    }
    if (bt_decref_many(s, ids, k) == BT_OK)
        return;
    for (uint32_t i = 0; i < k; i++)
        bt_decref_many(s, &ids[i], 1);
}

/* Free blocks of a pool: on its stack or in a magazine, as DPDK's
 * rte_mempool_avail_count counts its caches. A client may meet BT_ENOBLOCKS
 * while this says more are free: those sit in other clients' magazines (at
 * most an eighth of the pool, bt_mag_cap_of). */
int bt_pool_free_count(const bt_seg *s, uint32_t pool, uint32_t *out)
{
    if (!s || !out)
        return BT_EINVAL;
    if (pool >= s->cfg.num_pools)
        return BT_ERANGE;
    if (pool < s->cfg.cache_pools) {    /* a cache pool: its queue's length */
        uint32_t f = bt_load_relaxed(&s->cache[pool].nfree);
        *out = f > s->cfg.blocks_per_pool ? s->cfg.blocks_per_pool : f;
        return BT_OK;
    }
    int64_t v = bt_load_relaxed(&s->pools[pool].nfree);
    for (uint32_t i = 0; s->mag_cap && i < s->cfg.max_clients; i++) {
        const struct bt_cslot *sl = &s->clients[i];
        uint32_t c = bt_load_relaxed(&sl->mag_count);
        if (c && bt_load_relaxed(&sl->mag_pool) == pool &&
            bt_load_relaxed(&sl->state) != BT_CLIENT_FREE)
            v += c > s->mag_cap ? s->mag_cap : c;
    }
    *out = v < 0 ? 0 : v > s->cfg.blocks_per_pool ? s->cfg.blocks_per_pool : (uint32_t)v;
    return BT_OK;
}

/* ---- the allocator's client API: loose references kept in the hand ------ */

int bt_blocks_alloc(bt_client *cl, uint32_t pool, uint32_t n, int32_t *out)
{
    if (!cl || (!out && n))
        return BT_EINVAL;
    int rc = bt_stack_pool_err(cl->seg, pool);
    if (rc)
        return rc;
    if (n == 0)
        return BT_OK;
    rc = bt_op_begin(cl);
    if (rc)
        return rc;
    if (bt_load_relaxed(&cl->slot->hand_count) + (uint64_t)n > cl->seg->cfg.hand_size)
        rc = BT_EHANDFULL;
    else if (!(rc = bt_mag_pop(cl, pool, n, out)))
        rc = bt_hand_add(cl, out, n);
    bt_op_end(cl);
    return rc;
}

int bt_blocks_release(bt_client *cl, const int32_t *ids, uint32_t n)
{
    if (!cl || (!ids && n))
        return BT_EINVAL;
    for (uint32_t i = 0; i < n; i++)
        if (!bt_id_ok(cl->seg, ids[i]))
            return bt_id_err(cl->seg, ids[i]);
    int32_t small[256], *zeroed = n <= 256 ? small : malloc(n * sizeof(int32_t));
    if (!zeroed)
        return -ENOMEM;
    int rc = bt_op_begin(cl);
    if (!rc) {
        /* Hand first, then counts: dying between the two leaves a count too
         * high and no holder, which a repair sees; the other order could
         * free a block the hand still names. */
        if (!(rc = bt_hand_find_all(cl, ids, n))) {
            uint32_t nz = 0;
            bt_hand_pop(cl, n);
            if ((rc = bt_decref_zeroed(cl->seg, ids, n, zeroed, &nz)))
                bt_hand_add(cl, ids, n);    /* a count was already 0: scribbled on */
            else
                bt_mag_push(cl, zeroed, nz);
        }
        bt_op_end(cl);
    }
    if (zeroed != small)
        free(zeroed);
    return rc;
}

int bt_blocks_share(bt_client *cl, const int32_t *ids, uint32_t n)
{
    if (!cl || (!ids && n))
        return BT_EINVAL;
    int rc = bt_op_begin(cl);
    if (rc)
        return rc;
    if (bt_load_relaxed(&cl->slot->hand_count) + (uint64_t)n > cl->seg->cfg.hand_size)
        rc = BT_EHANDFULL;
    else if (!(rc = bt_incref_many(cl->seg, ids, n)))
        rc = bt_hand_add(cl, ids, n);
    bt_op_end(cl);
    return rc;
}
