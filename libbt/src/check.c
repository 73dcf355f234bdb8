/*
 * check.c -- fsck for a segment, recovery of dead clients, and the close of
 * a live one (the same release of what a client holds).
 *
 * The truth is who holds what: the rows of live clients and their hands.
 * Reference counts and free lists are derived state, and a repair rebuilds
 * them from the truth (mark and sweep), under the freeze word so that no
 * data-path call runs meanwhile (client.c has the protocol). Clients'
 * magazines hold free blocks: a check counts them as free (listed, like the
 * free lists), and a repair empties every one into the lists it rebuilds.
 *
 * A client that died outside a call left consistent state: its rows and hand
 * are released with ordinary lock-free decrements, no pause. One that died
 * inside a call may have left a block popped but unrecorded, or named in both
 * a row and its hand; that takes a repair. If a live client stays inside a
 * call (SIGSTOP), the repair is deferred rather than wedged: the dead
 * client's consistent rows are released now, the rest at the next repair.
 *
 * A live client's close (bt_client_close) is the same release, done by the
 * client itself. Rows are written only through rows.c's entries.
 */
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "bt_internal.h"

/* A slot whose holdings count: ACTIVE with its process alive. */
static int slot_live(const struct bt_cslot *sl)
{
    return bt_load_acquire(&sl->state) == BT_CLIENT_ACTIVE &&
           bt_pid_alive(bt_load_relaxed(&sl->pid), bt_load_relaxed(&sl->start_time));
}

/* Must the sweeper wait for this slot's in_op? Live clients, and recoverers
 * that are alive. */
static int slot_waits(const struct bt_cslot *sl)
{
    uint32_t st = bt_load_acquire(&sl->state);
    if (st == BT_CLIENT_RECOVERING)
        return bt_pid_alive(bt_load_relaxed(&sl->recoverer), 0);
    return st == BT_CLIENT_ACTIVE && slot_live(sl);
}

/* ---- freeze ---------------------------------------------------------------- */

static int freeze(bt_seg *s)
{
    uint64_t mine = (uint64_t)getpid(), cur = 0;
    if (bt_cas_acqrel(&s->hdr->freeze, &cur, mine))
        goto frozen;
    if (cur == mine || bt_pid_alive((int32_t)cur, 0))
        return BT_EBUSY;                /* another sweep is running */
    if (!bt_cas_acqrel(&s->hdr->freeze, &cur, mine))   /* its sweeper died: take over */
        return BT_EBUSY;
frozen:
    bt_fence_seqcst();                  /* freeze before the in_op loads (bt_atomic.h) */
    return BT_OK;
}

static void thaw(bt_seg *s) { bt_store_seqcst(&s->hdr->freeze, 0ull); }

/* Wait until no client that counts is inside a call. */
static int drain(bt_seg *s, uint32_t wait_ms, uint32_t *stuck)
{
    uint64_t deadline = bt_now_ns() + (uint64_t)wait_ms * 1000000ull;
    for (uint32_t i = 0; i < s->cfg.max_clients; i++) {
        struct bt_cslot *sl = &s->clients[i];
        for (uint32_t spin = 0; bt_load_seqcst(&sl->in_op) && slot_waits(sl); spin++) {
            if (bt_now_ns() > deadline) {
                *stuck = i + 1;
                return BT_EBUSY;
            }
            if (spin < 128) {
                bt_cpu_relax();
            } else {
                struct timespec ts = { 0, 50000 };
                nanosleep(&ts, NULL);
            }
        }
    }
    return BT_OK;
}

/* ---- the scan ---------------------------------------------------------------- */

struct scan {
    bt_seg   *s;
    int       repair;
    uint32_t *count;                    /* holders per block */
    uint8_t  *onlist;                   /* 0, 1, or 2 = seen twice */
    uint8_t  *live;                     /* per client slot */
    uint8_t  *cmark;                    /* per chunk: 1 held by a live row, 2 on the free list */
    bt_check_report *rep;
};

/* Walk the free lists, bounded by the pool size: a cycle or a stray link is
 * counted, not followed. */
static void scan_lists(struct scan *sc)
{
    bt_seg *s = sc->s;
    for (uint32_t p = s->cfg.cache_pools; p < s->cfg.num_pools; p++) {
        uint32_t lo = p * s->cfg.blocks_per_pool, hi = lo + s->cfg.blocks_per_pool;
        uint32_t idx = (uint32_t)bt_load_acquire(&s->pools[p].head);
        for (uint32_t steps = 0; idx != BT_NIL && steps <= s->cfg.blocks_per_pool; steps++) {
            if (idx < lo || idx >= hi || idx == 0) {
                sc->rep->double_free++;      /* a stray link: the list is broken */
                break;
            }
            if (sc->onlist[idx]) {
                sc->onlist[idx] = 2;
                sc->rep->double_free++;
                break;
            }
            sc->onlist[idx] = 1;
            idx = bt_load_relaxed(&s->next[idx]);
        }
    }
}

static void scan_chunk_list(struct scan *sc)
{
    bt_seg *s = sc->s;
    uint32_t idx = (uint32_t)bt_load_acquire(&s->cpool->head);
    for (uint32_t steps = 0; idx < s->cfg.num_chunks && steps < s->cfg.num_chunks; steps++) {
        if (sc->cmark[idx] & 2)
            break;                      /* a cycle: the rebuild mends it */
        sc->cmark[idx] |= 2;
        idx = bt_load_relaxed(&s->cnext[idx]);
    }
}

/* Magazines (client.c): the free blocks cached in claimed slots are listed
 * like the free lists' (a block in two places is a double free); on repair
 * every magazine is emptied, its blocks going to the rebuilt lists. A dead
 * client's counts too: it held them free, and a death inside a call that
 * left one half-moved is what the rebuild settles. */
static void scan_mags(struct scan *sc)
{
    bt_seg *s = sc->s;
    for (uint32_t i = 0; i < s->cfg.max_clients; i++) {
        struct bt_cslot *sl = &s->clients[i];
        uint32_t n = bt_load_acquire(&sl->mag_count), pool = bt_load_relaxed(&sl->mag_pool);
        if (bt_load_acquire(&sl->state) != BT_CLIENT_FREE && n) {
            if (n > s->mag_cap || bt_stack_pool_err(s, pool)) {
                sc->rep->bad_entries += n;
                n = 0;
            }
            uint32_t lo, span;
            bt_pool_range(s, n ? pool : 0, &lo, &span);
            for (uint32_t k = 0; k < n; k++) {
                uint32_t id = bt_load_relaxed(&sl->mag[k]);
                if (id - lo >= span) {
                    sc->rep->bad_entries++;
                } else if (sc->onlist[id]) {
                    sc->onlist[id] = 2;
                    sc->rep->double_free++;
                } else {
                    sc->onlist[id] = 1;
                }
            }
        }
        if (sc->repair)
            bt_store_relaxed(&sl->mag_count, 0u);
    }
}

/* Count one row's holdings; on repair, heal it or release it. */
static void scan_row(struct scan *sc, uint32_t row)
{
    bt_seg *s = sc->s;
    struct bt_row *r = &s->rows[row];
    uint32_t o = bt_load_acquire(&r->owner), seq = bt_load_relaxed(&r->seq);
    int32_t raw = bt_load_relaxed(&s->nblocks[row]);
    int dead = o != 0 && (o > s->cfg.max_clients || !sc->live[o - 1]);
    uint32_t cap = bt_row_cap(s, row);
    uint32_t nb = raw < 0 ? 0 : (uint32_t)raw > cap ? cap : (uint32_t)raw;
    int fix = (seq & 1u) || (uint32_t)raw != nb || (o == 0 && raw != 0);
    int32_t *e = bt_row_ids(s, row);
    int managed = bt_row_managed(s, row), paged = bt_row_paged(s, row);
    uint32_t good = nb;
    if (paged && o != 0 && !dead)
        fix |= bt_paged_check(s, row, nb, sc->repair, sc->count, sc->cmark, &sc->rep->bad_entries);
    for (uint32_t i = 0; i < nb && o != 0 && !paged; i++) {
        int32_t id = bt_load_relaxed(&e[i]);
        if (managed ? !bt_id_ok(s, id) : id < 0) {
            sc->rep->bad_entries++;
            good = i;                   /* truncate at the first bad entry */
            break;
        }
    }
    for (uint32_t i = nb; !paged && !dead && i < s->cfg.row_width; i++)
        if (bt_load_relaxed(&e[i]) != 0) {      /* a stale tail: readers would see it */
            fix = 1;
            break;
        }
    if (o == 0 || dead)
        good = 0;
    else if (managed && !paged)
        for (uint32_t i = 0; i < good; i++)
            sc->count[bt_load_relaxed(&e[i])]++;
    fix |= good != nb;
    if (fix && !dead)
        sc->rep->rows_fixed++;
    if (sc->repair && (fix || dead))
        bt_row_repair(s, row, good, dead);
}

/* Count a live client's hand; on repair drop entries out of range. */
static void scan_hand(struct scan *sc, uint32_t slot)
{
    bt_seg *s = sc->s;
    struct bt_cslot *sl = &s->clients[slot];
    uint32_t *h = s->hands + (uint64_t)slot * s->cfg.hand_size;
    uint32_t n = bt_load_acquire(&sl->hand_count), k = 0;
    if (n > s->cfg.hand_size) {
        sc->rep->bad_entries += n - s->cfg.hand_size;
        n = s->cfg.hand_size;
    }
    for (uint32_t i = 0; i < n; i++) {
        uint32_t id = bt_load_relaxed(&h[i]);
        if (!bt_id_ok(s, (int32_t)id)) {
            sc->rep->bad_entries++;
            continue;
        }
        sc->count[id]++;
        if (sc->repair)
            bt_store_relaxed(&h[k], id);
        k++;
    }
    if (sc->repair)
        bt_store_release(&sl->hand_count, k);
}

/* Compare counts with the truth; on repair rewrite counts and free lists. */
static void settle_blocks(struct scan *sc)
{
    bt_seg *s = sc->s;
    bt_check_report *rep = sc->rep;
    /* Cache pools' counts are their owner's (rows only list their ids):
     * bt_cache_verify checks them against the queue instead. */
    for (uint64_t b = s->cache_lo ? s->cache_lo : 1; b < s->total; b++) {
        uint32_t want = sc->count[b], have = bt_load_relaxed(&s->refcnt[b]);
        if (want != have && !(want == 0 && have == 0))
            rep->refcnt_fixed++;
        if (want == 0 && !sc->onlist[b])
            rep->leaked++;
        if (want != 0 && sc->onlist[b])
            rep->double_free++;
        if (sc->repair)
            bt_store_relaxed(&s->refcnt[b], want);
    }
    for (uint32_t p = s->cfg.cache_pools; p < s->cfg.num_pools; p++) {
        uint32_t lo = p * s->cfg.blocks_per_pool, hi = lo + s->cfg.blocks_per_pool;
        uint32_t first = BT_NIL, prev = BT_NIL, nfree = 0;
        for (uint32_t b = lo ? lo : 1; b < hi; b++) {
            if (sc->count[b])
                continue;
            nfree++;
            if (!sc->repair)
                continue;
            bt_store_relaxed(&s->owner[b], 0u);
            if (prev == BT_NIL)
                first = b;
            else
                bt_store_relaxed(&s->next[prev], b);
            prev = b;
        }
        /* Read-only: free means on a free list (leaks are reported apart);
         * repairing: free means free once the lists are rebuilt. */
        uint32_t listed = 0;
        for (uint32_t b = lo ? lo : 1; !sc->repair && b < hi; b++)
            listed += sc->onlist[b] != 0;
        uint32_t counted = 0;           /* read-only: blocks with a nonzero count */
        for (uint32_t b = lo ? lo : 1; !sc->repair && b < hi; b++)
            counted += bt_load_relaxed(&s->refcnt[b]) != 0;
        rep->blocks_free += sc->repair ? nfree : listed;
        rep->blocks_held += sc->repair ? (hi - (lo ? lo : 1)) - nfree : counted;
        if (!sc->repair)
            continue;
        if (prev != BT_NIL)
            bt_store_relaxed(&s->next[prev], BT_NIL);
        uint64_t old = bt_load_relaxed(&s->pools[p].head);
        uint64_t tag = (old >> 32) + 1;
        bt_store_release(&s->pools[p].head, tag << 32 | first);
        bt_store_relaxed(&s->pools[p].nfree, (int64_t)nfree);
    }
}

/* Chunks no live row holds are free; on repair the list is rebuilt. */
static void settle_chunks(struct scan *sc)
{
    bt_seg *s = sc->s;
    uint32_t first = BT_NIL, prev = BT_NIL, nfree = 0;
    if (sc->repair) {
        /* Repairs trimmed directories after they were marked: mark again
         * from what the claimed rows hold now. */
        for (uint32_t c = 0; c < s->cfg.num_chunks; c++)
            sc->cmark[c] &= (uint8_t)~1u;
        for (uint32_t row = 0; row < s->cfg.num_rows && s->cfg.num_chunks; row++) {
            if (!bt_load_relaxed(&s->rows[row].owner) || !bt_row_paged(s, row))
                continue;
            const uint32_t *d = s->dir + (uint64_t)row * s->cfg.dir_width;
            for (uint32_t k = 0; k < s->cfg.dir_width; k++) {
                uint32_t c = bt_load_relaxed(&d[k]);
                if (c && c <= s->cfg.num_chunks)
                    sc->cmark[c - 1] |= 1;
            }
        }
    }
    for (uint32_t c = 0; c < s->cfg.num_chunks; c++) {
        if (sc->cmark[c] & 1)
            continue;
        nfree++;
        sc->rep->chunks_leaked += !(sc->cmark[c] & 2);
        if (!sc->repair)
            continue;
        if (prev == BT_NIL)
            first = c;
        else
            bt_store_relaxed(&s->cnext[prev], c);
        prev = c;
    }
    sc->rep->chunks_free = nfree;
    if (!sc->repair || !s->cfg.num_chunks)
        return;
    if (prev != BT_NIL)
        bt_store_relaxed(&s->cnext[prev], BT_NIL);
    uint64_t tag = (bt_load_relaxed(&s->cpool->head) >> 32) + 1;
    bt_store_release(&s->cpool->head, tag << 32 | first);
    bt_store_relaxed(&s->cpool->nfree, (int64_t)nfree);
}

/* Cache pools: verify each; on repair reset those whose owner is gone (a
 * dead client, a recoverer that died resetting, a scribbled id) or whose
 * structure is broken. A broken pool with a live owner is reset too: its
 * engine must then not go on (its next call finds its blocks free: BT_ENOTHELD
 * or a cache miss; bt_cache_stats_get shows owner still set, resets bumped). */
static int scan_cache(struct scan *sc)
{
    bt_seg *s = sc->s;
    if (!s->cfg.cache_pools)
        return BT_OK;
    uint8_t *bseen = malloc(s->cfg.blocks_per_pool), *kseen = malloc(s->cfg.cache_keys);
    if (!bseen || !kseen) {
        free(bseen), free(kseen);
        return -ENOMEM;
    }
    for (uint32_t p = 0; p < s->cfg.cache_pools; p++) {
        struct bt_cache_hdr *h = &s->cache[p];
        uint64_t bad = bt_cache_verify(s, p, bseen, kseen);
        uint32_t o = bt_load_acquire(&h->owner);
        int gone = o == BT_CACHE_RESETTING || (o != 0 && (o > s->cfg.max_clients || !sc->live[o - 1]));
        sc->rep->cache_bad += bad;
        uint32_t nf = bt_load_relaxed(&h->nfree), usable = s->cfg.blocks_per_pool - (p == 0);
        if (sc->repair && (bad || gone)) {
            bt_cache_pool_reset(s, p);
            if (gone) {
                bt_store_relaxed(&h->owner_pid, 0);
                bt_store_release(&h->owner, 0u);
            }
            sc->rep->cache_reset++;
            nf = usable;
        }
        nf = nf > usable ? usable : nf;
        sc->rep->blocks_free += nf;
        sc->rep->blocks_held += usable - nf;
    }
    free(bseen), free(kseen);
    return BT_OK;
}

/* Free the slots of clients that are gone (their holdings were not counted). */
static void reap_slots(struct scan *sc)
{
    bt_seg *s = sc->s;
    for (uint32_t i = 0; i < s->cfg.max_clients; i++) {
        struct bt_cslot *sl = &s->clients[i];
        uint32_t st = bt_load_acquire(&sl->state);
        if (sc->live[i] || st == BT_CLIENT_FREE)
            continue;
        if (st == BT_CLIENT_ACTIVE && slot_live(sl))
            continue;                   /* adopted during the sweep: alive, holds nothing yet */
        if (st == BT_CLIENT_RESERVED && bt_pid_alive(bt_load_relaxed(&sl->pid), 0))
            continue;                   /* awaiting adoption: holds nothing */
        bt_store_relaxed(&sl->hand_count, 0u);
        bt_store_relaxed(&sl->nrows, 0u);
        bt_store_relaxed(&sl->mag_count, 0u);
        bt_store_relaxed(&sl->pid, 0);
        bt_store_relaxed(&sl->in_op, 0u);
        bt_store_release(&sl->state, (uint32_t)BT_CLIENT_FREE);
        sc->rep->clients_reaped++;
    }
}

/* The scan's scratch, allocated and written once before any freeze, so that
 * its page faults are not part of the pause. */
static int scan_alloc(bt_seg *s, struct scan *sc)
{
    sc->count = malloc(s->total * sizeof(uint32_t));
    sc->onlist = malloc(s->total);
    sc->live = malloc(s->cfg.max_clients);
    sc->cmark = malloc(s->cfg.num_chunks + 1);
    if (!sc->count || !sc->onlist || !sc->live || !sc->cmark) {
        free(sc->count), free(sc->onlist), free(sc->live), free(sc->cmark);
        return -ENOMEM;
    }
    memset(sc->count, 0, s->total * sizeof(uint32_t));
    memset(sc->onlist, 0, s->total);
    memset(sc->live, 0, s->cfg.max_clients);
    memset(sc->cmark, 0, s->cfg.num_chunks + 1);
    return BT_OK;
}

static void scan_free(struct scan *sc)
{
    free(sc->count), free(sc->onlist), free(sc->live), free(sc->cmark);
}

/* Touch every page of the mapping once per process, before its first freeze:
 * btd adopts segments it has never read, and at 1M blocks the page faults of
 * a first scan were most of its pause. A relaxed read changes nothing. */
static void prefault(bt_seg *s)
{
    if (s->faulted)
        return;
    for (uint64_t o = 0; o + sizeof(uint32_t) <= s->size; o += 4096)
        (void)bt_load_relaxed((const uint32_t *)(s->base + o));
    s->faulted = 1;
}

static int scan_all(bt_seg *s, int repair, struct scan *sc)
{
    sc->s = s;
    sc->repair = repair;
    for (uint32_t i = 0; i < s->cfg.max_clients; i++) {
        uint32_t st = bt_load_acquire(&s->clients[i].state);
        /* Read-only: count every claimed slot as it stands. Repair: only
         * those whose process is alive. */
        sc->live[i] = repair ? slot_live(&s->clients[i]) : st == BT_CLIENT_ACTIVE || st == BT_CLIENT_DEAD;
    }
    scan_lists(sc);
    scan_mags(sc);
    scan_chunk_list(sc);
    for (uint32_t r = 0; r < s->cfg.num_rows; r++)
        scan_row(sc, r);
    for (uint32_t i = 0; i < s->cfg.max_clients; i++)
        if (sc->live[i])
            scan_hand(sc, i);
    settle_blocks(sc);
    settle_chunks(sc);
    int rc = scan_cache(sc);
    if (repair)
        reap_slots(sc);
    return rc;
}

int bt_seg_check(bt_seg *s, int flags, uint32_t wait_ms, bt_check_report *out)
{
    bt_check_report rep = { 0 };
    struct scan sc = { .rep = &rep };
    if (!s)
        return BT_EINVAL;
    int rc = scan_alloc(s, &sc);
    if (rc)
        goto out;
    if (!(flags & (BT_CHECK_REPAIR | BT_CHECK_FROZEN))) {
        rc = scan_all(s, 0, &sc);
    } else {
        int repair = flags & BT_CHECK_REPAIR;
        prefault(s);
        uint64_t t0 = bt_now_ns();
        if ((rc = freeze(s)) == BT_OK) {
            if ((rc = drain(s, wait_ms, &rep.stuck_client)) == BT_OK) {
                rc = scan_all(s, repair, &sc);
                if (repair)
                    bt_fetch_add_release(&s->hdr->generation, 1ull);
            }
            thaw(s);
            rep.pause_ns = bt_now_ns() - t0;
        }
    }
    scan_free(&sc);
out:
    if (out)
        *out = rep;
    return rc;
}

/* ---- releasing a client's holdings: its close, or its recovery ------------ */

/* Release the rows of client `id` that are not mid-write (all of them when
 * the client is live, or died outside a call), the cache pools it owns, and
 * optionally its hand and magazine (consistent only outside a call).
 * Returns the rows skipped. */
static uint32_t release_holdings(bt_seg *s, uint32_t id, int with_hand)
{
    struct bt_cslot *sl = &s->clients[id - 1];
    uint32_t skipped = 0;
    for (uint32_t r = 0; r < s->cfg.num_rows; r++) {
        if (bt_load_acquire(&s->rows[r].owner) != id)
            continue;
        if (bt_load_acquire(&s->rows[r].seq) & 1u) {
            skipped++;                  /* mid-write: left for a repair */
            continue;
        }
        bt_rows_release(s, id, &r, 1);
    }
    bt_cache_release_owner(s, id);      /* its prefix cache dies with it */
    if (with_hand) {
        const uint32_t *hand = s->hands + (uint64_t)(id - 1) * s->cfg.hand_size;
        uint32_t n = bt_load_acquire(&sl->hand_count);
        n = n > s->cfg.hand_size ? s->cfg.hand_size : n;
        int32_t *ids = malloc((n ? n : 1) * sizeof(int32_t));
        if (ids) {
            for (uint32_t i = 0; i < n; i++)
                ids[i] = (int32_t)bt_load_relaxed(&hand[i]);
            bt_store_release(&sl->hand_count, 0u);   /* the hand lets go first */
            bt_refs_release(s, ids, n);
            free(ids);
        }
        bt_mag_release(s, id);          /* its cached free blocks, back on the lists */
    }
    return skipped;
}

/* Closing is the client releasing itself: what a recoverer releases for a
 * dead one, inside one op, then the slot. */
void bt_client_close(bt_client *cl)
{
    if (!cl)
        return;
    struct bt_cslot *sl = cl->slot;
    int mine = cl->fork_gen == bt_fork_generation() &&
               bt_load_relaxed(&sl->state) == BT_CLIENT_ACTIVE &&
               bt_load_relaxed(&sl->pid) == cl->pid;
    if (mine && bt_op_begin(cl) == BT_OK) {
        release_holdings(cl->seg, cl->id, 1);
        bt_op_end(cl);
        bt_store_relaxed(&sl->pid, 0);
        bt_store_release(&sl->state, (uint32_t)BT_CLIENT_FREE);
    }
    bt_client_free(cl);
}

int bt_seg_recover_client(bt_seg *s, uint32_t id, uint32_t wait_ms, bt_check_report *out)
{
    bt_check_report rep = { 0 };
    if (!s)
        return BT_EINVAL;
    if (id == 0 || id > s->cfg.max_clients)
        return BT_ERANGE;
    struct bt_cslot *sl = &s->clients[id - 1];
    uint32_t st = bt_load_acquire(&sl->state);
    if (st == BT_CLIENT_FREE)
        goto done;                      /* already recovered */
    if ((st == BT_CLIENT_ACTIVE || st == BT_CLIENT_RESERVED) &&
        bt_pid_alive(bt_load_relaxed(&sl->pid), bt_load_relaxed(&sl->start_time)))
        return BT_EBUSY;                /* it is not dead */
    if (st == BT_CLIENT_ACTIVE || st == BT_CLIENT_RESERVED)
        bt_cas_acqrel(&sl->state, &st, (uint32_t)BT_CLIENT_DEAD);
    if (bt_load_acquire(&sl->in_op) == 0) {
        /* Died outside a call: lock-free release, no pause. The slot's own
         * in_op word makes us visible to a concurrent sweeper. */
        uint32_t dead = BT_CLIENT_DEAD;
        if (!bt_cas_acqrel(&sl->state, &dead, (uint32_t)BT_CLIENT_RECOVERING))
            goto done;                  /* someone else has it */
        bt_store_relaxed(&sl->recoverer, (int32_t)getpid());
        bt_xchg_seqcst(&sl->in_op, 1u);
        if (bt_load_seqcst(&s->hdr->freeze) == 0 && release_holdings(s, id, 1) == 0) {
            bt_store_relaxed(&sl->pid, 0);
            bt_store_release(&sl->in_op, 0u);
            bt_store_release(&sl->state, (uint32_t)BT_CLIENT_FREE);
            rep.clients_reaped = 1;
            goto done;
        }
        /* A sweep is starting (it will reap this slot), or a row was left
         * mid-write (only a scribbler does that outside a call): step aside,
         * marked as needing a repair. */
        uint32_t rec = BT_CLIENT_RECOVERING;
        bt_cas_acqrel(&sl->state, &rec, (uint32_t)BT_CLIENT_DEAD);
        bt_store_release(&sl->in_op, 1u);
    }
    /* Died inside a call (or raced a sweep): a repair undoes half-done work. */
    int rc = bt_seg_check(s, BT_CHECK_REPAIR, wait_ms, &rep);
    if (rc == BT_EBUSY && rep.stuck_client) {
        /* A live client is stuck in a call: release what is consistent now. */
        uint32_t dead = BT_CLIENT_DEAD;
        if (bt_cas_acqrel(&sl->state, &dead, (uint32_t)BT_CLIENT_RECOVERING)) {
            bt_store_relaxed(&sl->recoverer, (int32_t)getpid());
            bt_xchg_seqcst(&sl->in_op, 1u);
            if (bt_load_seqcst(&s->hdr->freeze) == 0)
                release_holdings(s, id, 0);
            /* Still "died inside a call": its hand may name blocks its rows
             * hold too, so only a repair may finish it, never a lock-free
             * release of the hand. */
            bt_store_release(&sl->in_op, 1u);
            uint32_t rec = BT_CLIENT_RECOVERING;
            bt_cas_acqrel(&sl->state, &rec, (uint32_t)BT_CLIENT_DEAD);
        }
    }
    if (out)
        *out = rep;
    return rc;
done:
    if (out)
        *out = rep;
    return BT_OK;
}
