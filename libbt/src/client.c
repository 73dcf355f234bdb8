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
 * of the segment, so a recoverer knows exactly what a dead client held. The
 * allocator's client calls (bt_blocks_*) are here, with the hand they fill.
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

int bt_op_begin(bt_client *cl)
{
    if (cl->fork_gen != bt_fork_generation())
        return BT_ECLIENT;
    struct bt_cslot *sl = cl->slot;
    for (;;) {
        bt_xchg_seqcst(&sl->in_op, 1u);
        if (bt_load_seqcst(&cl->seg->hdr->freeze) == 0) {
            if (bt_load_relaxed(&sl->state) == BT_CLIENT_ACTIVE &&
                bt_load_relaxed(&sl->pid) == cl->pid)
                return BT_OK;
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
        .ops = bt_load_relaxed(&sl->ops) };
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
    else if (!(rc = bt_pop_raw(cl->seg, pool, n, cl->id, out)))
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
    int rc = bt_op_begin(cl);
    if (rc)
        return rc;
    /* Hand first, then counts: dying between the two leaves a count too high
     * and no holder, which a repair sees; the other order could free a block
     * the hand still names. */
    if (!(rc = bt_hand_find_all(cl, ids, n))) {
        bt_hand_pop(cl, n);
        if ((rc = bt_decref_many(cl->seg, ids, n)))
            bt_hand_add(cl, ids, n);    /* a count was already 0: scribbled on */
    }
    bt_op_end(cl);
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
