/*
 * alloc.c -- the lock-free pools and reference counts.
 *
 * A pool is a Treiber stack over next[]. The head packs {index:32, tag:32};
 * a batch of n pops by walking n links from the head and swinging the head
 * past them with one CAS. A node inside the list is never written, so if the
 * head (index and tag) is unchanged the walked chain is unchanged too (ABA is
 * caught by the tag). Links read during the walk may belong to nodes another
 * thread just popped; they are checked against the pool's range, and a CAS
 * that fails discards them.
 *
 * Reference counts change only by CAS from a value checked first, so freeing
 * a free block is refused instead of wrapping the count.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "bt_internal.h"

#define HEAD(idx, tag) ((uint64_t)(tag) << 32 | (uint32_t)(idx))
#define HIDX(h) ((uint32_t)(h))
#define HTAG(h) ((uint32_t)((h) >> 32))

static inline uint32_t pool_of(const bt_seg *s, int32_t id)
{
    return (uint32_t)id / s->cfg.blocks_per_pool;
}

/* Walk n links from `first` over ids [lo, lo + span); 0 and *after = the
 * link past the last one, or BT_ENOBLOCKS (list too short) / BT_ECORRUPT (a
 * link leaves the range). The caller re-checks the head before trusting
 * either error. */
static int walk(const uint32_t *next, uint32_t lo, uint32_t span, uint32_t first,
                uint32_t n, int32_t *out, uint32_t *after)
{
    uint32_t idx = first;
    for (uint32_t i = 0; i < n; i++) {
        if (idx - lo >= span)           /* one unsigned compare */
            return idx == BT_NIL ? BT_ENOBLOCKS : BT_ECORRUPT;
        out[i] = (int32_t)idx;
        idx = bt_load_relaxed(&next[idx]);
    }
    *after = idx;
    return BT_OK;
}

/* Pop n ids off a Treiber stack with one CAS; all or nothing. */
int bt_stack_pop(struct bt_pool *p, const uint32_t *next, uint32_t lo, uint32_t span,
                 uint32_t n, int32_t *out)
{
    uint64_t old = bt_load_acquire(&p->head);
    uint32_t after = 0;
    for (;;) {
        int rc = walk(next, lo, span, HIDX(old), n, out, &after);
        if (rc) {
            uint64_t now = bt_load_acquire(&p->head);
            if (now != old) {           /* raced: the walk saw a moving list */
                old = now;
                continue;
            }
            return rc;
        }
        if (bt_cas_acqrel(&p->head, &old, HEAD(after, HTAG(old) + 1)))
            break;
    }
    bt_fetch_add_relaxed(&p->nfree, -(int64_t)n);
    return BT_OK;
}

/* Push the chain first..last (already linked, count ids) with one CAS. */
void bt_stack_push(struct bt_pool *p, uint32_t *next, int32_t first, int32_t last, uint32_t count)
{
    uint64_t old = bt_load_relaxed(&p->head);
    do {
        bt_store_relaxed(&next[last], HIDX(old));
    } while (!bt_cas_acqrel(&p->head, &old, HEAD(first, HTAG(old) + 1)));
    bt_fetch_add_relaxed(&p->nfree, (int64_t)count);
}

/* Pop n blocks of `pool` into out; refcount 0 -> 1, owner = stamp. */
int bt_pop_raw(bt_seg *s, uint32_t pool, uint32_t n, uint32_t stamp, int32_t *out)
{
    uint32_t lo, span;
    bt_pool_range(s, pool, &lo, &span);
    int rc = bt_stack_pop(&s->pools[pool], s->next, lo, span, n, out);
    if (rc)
        return rc;
    /* The popped blocks are ours alone, and nobody moves a count up from 0
     * (incref refuses free blocks), so a load and a store do what a CAS
     * would, at a third of the cost. */
    int bad = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (bt_load_relaxed(&s->refcnt[out[i]]) != 0) {
            out[i] = -out[i];           /* held by someone: leave it out */
            bad = 1;
            continue;
        }
        bt_store_relaxed(&s->refcnt[out[i]], 1u);
        bt_store_relaxed(&s->owner[out[i]], stamp);
    }
    if (!bad)
        return BT_OK;
    /* A free-listed block had a count: the segment was scribbled on. Give
     * back the good ones; the bad ones stay off every list until a repair. */
    uint32_t k = 0;
    for (uint32_t i = 0; i < n; i++)
        if (out[i] > 0) {
            bt_store_relaxed(&s->refcnt[out[i]], 0u);
            out[k++] = out[i];
        }
    bt_push_zeroed(s, out, k);
    return BT_ECORRUPT;
}

/* Push blocks whose counts are 0: one pass clears owners and links each run
 * of one pool, and each run goes in with one CAS. */
void bt_push_zeroed(bt_seg *s, const int32_t *ids, uint32_t n)
{
    uint32_t bpp = s->cfg.blocks_per_pool, i = 0;
    while (i < n) {
        uint32_t pool = pool_of(s, ids[i]), lo = pool * bpp, start = i;
        bt_store_relaxed(&s->owner[ids[i]], 0u);
        for (; i + 1 < n && (uint32_t)ids[i + 1] - lo < bpp; i++) {
            bt_store_relaxed(&s->next[ids[i]], (uint32_t)ids[i + 1]);
            bt_store_relaxed(&s->owner[ids[i + 1]], 0u);
        }
        bt_stack_push(&s->pools[pool], s->next, ids[start], ids[i], i - start + 1);
        i++;
    }
}

/* Take one reference on each id; all-or-nothing. */
int bt_incref_many(bt_seg *s, const int32_t *ids, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++) {
        if (!bt_id_ok(s, ids[i]))
            return bt_id_err(s, ids[i]);
    }
    for (uint32_t i = 0; i < n; i++) {
        uint32_t *rc = &s->refcnt[ids[i]];
        uint32_t v = bt_load_relaxed(rc);
        do {
            if (v == 0 || v == UINT32_MAX) {
                /* Undo as a release: another holder may have dropped its
                 * reference meanwhile, and a count we bring to 0 must put
                 * the block back on its free list, not strand it. */
                for (uint32_t j = 0; j < i; j++)
                    bt_decref_many(s, &ids[j], 1);
                return BT_ENOTHELD;
            }
        } while (!bt_cas_relaxed(rc, &v, v + 1));
    }
    return BT_OK;
}

/* Drop one reference on each id; all-or-nothing: a free (count 0) block
 * anywhere in the batch undoes the earlier decrements. The blocks that
 * reached zero are listed in zeroed (room for n), not pushed: the caller
 * puts them where they go (a free list, a magazine), only after the whole
 * batch succeeded, so that an undo never fishes a block back out of one. */
int bt_decref_zeroed(bt_seg *s, const int32_t *ids, uint32_t n, int32_t *zeroed, uint32_t *nz_out)
{
    for (uint32_t i = 0; i < n; i++)
        if (!bt_id_ok(s, ids[i]))
            return bt_id_err(s, ids[i]);
    uint32_t nz = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t *rc = &s->refcnt[ids[i]];
        uint32_t v = bt_load_relaxed(rc);
        do {
            if (v == 0) {
                /* Undo: take back the references we dropped, but never
                 * revive a block whose count reached 0 since (another holder
                 * freed it: it may be on a free list). Only a caller that
                 * releases what it does not hold gets here. */
                for (uint32_t j = 0; j < i; j++) {
                    uint32_t *rj = &s->refcnt[ids[j]], w = bt_load_relaxed(rj);
                    int zeroed_here = 0;
                    for (uint32_t z = 0; z < nz; z++)
                        zeroed_here |= zeroed[z] == ids[j];
                    do {
                        if (w == 0 && !zeroed_here)
                            break;
                    } while (!bt_cas_relaxed(rj, &w, w + 1));
                }
                return BT_ENOTHELD;
            }
        } while (!bt_cas_acqrel(rc, &v, v - 1));
        if (v == 1)
            zeroed[nz++] = ids[i];
    }
    *nz_out = nz;
    return BT_OK;
}

/* bt_decref_zeroed, the freed blocks pushed on their free lists. */
int bt_decref_many(bt_seg *s, const int32_t *ids, uint32_t n)
{
    int32_t zeroed_small[256], *zeroed = zeroed_small;
    uint32_t nz = 0;
    for (uint32_t i = 0; i < n; i++)
        if (!bt_id_ok(s, ids[i]))
            return bt_id_err(s, ids[i]);
    if (n > 256 && !(zeroed = malloc(n * sizeof(int32_t))))
        return -ENOMEM;
    int rc = bt_decref_zeroed(s, ids, n, zeroed, &nz);
    if (!rc && nz)
        bt_push_zeroed(s, zeroed, nz);
    if (zeroed != zeroed_small)
        free(zeroed);
    return rc;
}

/* ---- the raw pool API (no client protocol) ------------------------------ */

int bt_pool_pop(bt_seg *s, uint32_t pool, uint32_t n, uint32_t stamp, int32_t *out)
{
    if (!s || (!out && n))
        return BT_EINVAL;
    int rc = bt_stack_pool_err(s, pool);
    if (rc)
        return rc;
    if (n == 0)
        return BT_OK;
    return bt_pop_raw(s, pool, n, stamp, out);
}

int bt_pool_push(bt_seg *s, const int32_t *ids, uint32_t n)
{
    if (!s || (!ids && n))
        return BT_EINVAL;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t one = 1;
        int rc = !bt_id_ok(s, ids[i]) ? bt_id_err(s, ids[i]) :
                 !bt_cas_relaxed(&s->refcnt[ids[i]], &one, 0u) ? BT_ENOTHELD : BT_OK;
        if (rc) {
            for (uint32_t j = 0; j < i; j++)
                bt_store_relaxed(&s->refcnt[ids[j]], 1u);
            return rc;
        }
    }
    bt_push_zeroed(s, ids, n);
    return BT_OK;
}

int bt_block_get(const bt_seg *s, int32_t id, uint32_t *refcnt, uint32_t *owner)
{
    if (!s)
        return BT_EINVAL;
    if (id < 0 || (uint64_t)id >= s->total)
        return BT_ERANGE;
    if (refcnt)
        *refcnt = bt_load_relaxed(&s->refcnt[id]);
    if (owner)
        *owner = bt_load_relaxed(&s->owner[id]);
    return BT_OK;
}
