/*
 * cache.c -- cache pools: vLLM 0.32's BlockPool (block_pool.py) and its
 * FreeKVCacheBlockQueue (kv_cache_utils.py) in the segment.
 *
 * One writer per pool, its owner client; every reader (lookups, stats, the
 * queue) is lock-free under the pool's seqlock, so every shared word is read
 * and written through bt_atomic.h even where only the owner writes it.
 *
 * The state:
 *   - reference counts: the segment's refcnt[] (vLLM's ref_cnt);
 *   - the free queue: a doubly linked list over bt_cblock.prev/next, in
 *     vLLM's order (popleft_n from the head, prepend_n / append_n);
 *   - the map: key entries on bucket chains, oldest first, so that the first
 *     match is the block vLLM's dict returns first; and on their block's key
 *     list, primary first (vLLM's block_hash, then its extra hashes).
 *
 * Nothing read from shared memory is trusted: every link is range-checked and
 * every walk is bounded by the size of what it walks, so a scribble makes a
 * call fail with BT_ECORRUPT (and a repairing check reset the pool), never
 * write out of bounds or spin. Mutating calls check what they will follow
 * before changing anything wherever that is cheap (queue ends, the popped
 * run, key lists); a bucket chain found broken half way leaves the pool
 * half-changed, which bt_cache.h documents: the pool must then be reset.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "bt_internal.h"

#define L(p)    bt_load_relaxed(p)
#define S(p, v) bt_store_relaxed((p), (v))

struct cp {
    bt_seg              *s;
    struct bt_cache_hdr *h;
    struct bt_cblock    *b;             /* by global id */
    struct bt_ckey      *k;             /* this pool's entries */
    uint32_t            *bk;            /* this pool's buckets */
    uint32_t             lo, hi;        /* ids [lo, hi) */
    uint32_t             first;         /* lo, or 1 past pool 0's null block */
    uint32_t             cap, mask;     /* entries; buckets - 1 */
};

static int cp_get(const bt_seg *s, uint32_t pool, struct cp *c)
{
    if (!s)
        return BT_EINVAL;
    if (pool >= s->cfg.num_pools)
        return BT_ERANGE;
    if (pool >= s->cfg.cache_pools)
        return BT_EINVAL;
    c->s = (bt_seg *)s;
    c->h = &s->cache[pool];
    c->b = s->cblocks;
    c->cap = s->cfg.cache_keys;
    c->k = s->ckeys + (uint64_t)pool * c->cap;
    c->bk = s->cbuckets + (uint64_t)pool * s->nbuckets;
    c->mask = s->nbuckets - 1;
    c->lo = pool * s->cfg.blocks_per_pool;
    c->hi = c->lo + s->cfg.blocks_per_pool;
    c->first = c->lo ? c->lo : 1;
    return BT_OK;
}

/* A usable block of the pool (not the null block). */
static inline int usable(const struct cp *c, uint32_t id) { return id - c->first < c->hi - c->first; }
/* An id a caller may name: usable, or pool 0's null block. */
static inline int named(const struct cp *c, int32_t id) { return (uint32_t)id - c->lo < c->hi - c->lo; }
static inline int is_null(const struct cp *c, uint32_t id) { return id == 0 && c->lo == 0; }
static inline int link_ok(const struct cp *c, uint32_t x) { return x == BT_NIL || usable(c, x); }
static inline int ent_ok(const struct cp *c, uint32_t e) { return e - 1 < c->cap; }  /* e = entry + 1 */

/* ---- the seqlock ------------------------------------------------------------ */

static void w_begin(struct bt_cache_hdr *h)
{
    S(&h->seq, (L(&h->seq) + 1) | 1u);  /* odd; stays odd over a dead writer's odd */
    bt_fence_release();                 /* the odd seq is seen before any change */
}

static void w_end(struct bt_cache_hdr *h) { bt_store_release(&h->seq, L(&h->seq) + 1); }

/* Wait for an even seq: 0, or BT_EBUSY after BT_SEQ_WAIT_NS (a writer died
 * mid-write; the pool waits for its recovery). */
static int r_begin(const struct bt_cache_hdr *h, uint32_t *seq, uint32_t *spin, uint64_t *t0)
{
    for (;;) {
        uint32_t q = bt_load_acquire(&h->seq);
        if (!(q & 1u)) {
            *seq = q;
            return BT_OK;
        }
        if (bt_seq_backoff((*spin)++, t0))
            return BT_EBUSY;
    }
}

static int r_changed(const struct bt_cache_hdr *h, uint32_t seq)
{
    bt_fence_acquire();                 /* the reads above happen before this load */
    return L(&h->seq) != seq;
}

/* ---- keys --------------------------------------------------------------------- */

/* The key zero-padded into words, and its digest (a multiply-xorshift mix:
 * keys are hashes already, this only spreads short or structured ones). */
static uint64_t key_words(const uint8_t *key, uint32_t len, uint64_t w[8])
{
    memset(w, 0, 64);
    memcpy(w, key, len);
    uint64_t h = 0x9E3779B97F4A7C15ull ^ len;
    for (uint32_t i = 0; i < (len + 7) / 8; i++) {
        h ^= w[i];
        h *= 0xff51afd7ed558ccdull;
        h ^= h >> 32;
    }
    h *= 0xc4ceb9fe1a85ec53ull;
    return h ^ (h >> 29);
}

static int ent_match(const struct bt_ckey *k, uint64_t d, uint32_t len, const uint64_t w[8])
{
    if (L(&k->digest) != d || L(&k->len) != len)
        return 0;
    for (uint32_t i = 0; i < (len + 7) / 8; i++)
        if (L(&k->key[i]) != w[i])
            return 0;
    return 1;
}

/* Walk the key's bucket chain for the first entry with the key (and with
 * block `block` unless it is BT_NIL): *found = entry + 1 or 0; *last = the
 * chain's last entry + 1 (0: empty chain; only meaningful when not found). */
static int chain_find(const struct cp *c, uint64_t d, uint32_t len, const uint64_t w[8],
                      uint32_t block, uint32_t *found, uint32_t *last)
{
    uint32_t e = L(&c->bk[d & c->mask]), prev = 0;
    for (uint32_t steps = 0; e; steps++) {
        if (!ent_ok(c, e) || steps >= c->cap)
            return BT_ECORRUPT;
        const struct bt_ckey *k = &c->k[e - 1];
        if (ent_match(k, d, len, w) && (block == BT_NIL || L(&k->block) == block)) {
            *found = e;
            return BT_OK;
        }
        prev = e;
        e = L(&k->bucket_next);
    }
    *found = 0;
    if (last)
        *last = prev;
    return BT_OK;
}

/* Count a block's keys (checking the list); *last = its last entry + 1. */
static int keys_count(const struct cp *c, uint32_t id, uint32_t *n, uint32_t *last)
{
    uint32_t e = L(&c->b[id].keys), cnt = 0, prev = 0;
    while (e) {
        if (!ent_ok(c, e) || cnt >= c->cap || L(&c->k[e - 1].block) != id)
            return BT_ECORRUPT;
        cnt++;
        prev = e;
        e = L(&c->k[e - 1].block_next);
    }
    *n = cnt;
    if (last)
        *last = prev;
    return BT_OK;
}

static void key_out(const struct bt_ckey *k, bt_cache_key *o)
{
    uint32_t len = L(&k->len);
    len = len > BT_CACHE_KEY_MAX ? BT_CACHE_KEY_MAX : len;
    o->block = (int32_t)L(&k->block);
    o->ntokens = L(&k->ntokens);
    o->len = len;
    o->_pad = 0;
    uint64_t w[8];
    for (int i = 0; i < 8; i++)
        w[i] = L(&k->key[i]);
    memcpy(o->key, w, 64);
    memset(o->key + len, 0, 64 - len);
}

/* Take entry e off its bucket chain. */
static int chain_unlink(struct cp *c, uint32_t e)
{
    struct bt_ckey *k = &c->k[e - 1];
    uint32_t *link = &c->bk[L(&k->digest) & c->mask];
    for (uint32_t steps = 0; L(link) != e; steps++) {
        uint32_t x = L(link);
        if (!ent_ok(c, x) || steps >= c->cap)
            return BT_ECORRUPT;
        link = &c->k[x - 1].bucket_next;
    }
    S(link, L(&k->bucket_next));
    return BT_OK;
}

/* Remove every key of block id from the map (vLLM _remove_cached_block_hashes),
 * copying them to out[*nout...] when out is given. The caller counted them
 * (keys_count) and sized out. */
static int keys_drop(struct cp *c, uint32_t id, bt_cache_key *out, uint32_t *nout, uint32_t cap)
{
    uint32_t e = L(&c->b[id].keys);
    for (uint32_t steps = 0; e; steps++) {
        if (!ent_ok(c, e) || steps >= c->cap || (out && *nout >= cap))
            return BT_ECORRUPT;         /* the lists changed since they were counted */
        struct bt_ckey *k = &c->k[e - 1];
        uint32_t next = L(&k->block_next);
        int rc = chain_unlink(c, e);
        if (rc)
            return rc;
        if (out)
            key_out(k, &out[*nout]);
        (*nout)++;
        S(&k->bucket_next, L(&c->h->free_key));     /* onto the free-entry list */
        S(&c->h->free_key, e);
        S(&c->h->nkeys, L(&c->h->nkeys) - 1);
        S(&c->b[id].keys, next);        /* the list stays well formed as it shrinks */
        e = next;
    }
    return BT_OK;
}

/* ---- the queue ---------------------------------------------------------------- */

/* Would unlinking id be consistent? (no writes) */
static int q_linked(const struct cp *c, uint32_t id)
{
    const struct bt_cblock *b = &c->b[id];
    uint32_t p = L(&b->prev), n = L(&b->next);
    if (!L(&b->inq) || !link_ok(c, p) || !link_ok(c, n))
        return 0;
    return (p == BT_NIL ? L(&c->h->head) : L(&c->b[p].next)) == id &&
           (n == BT_NIL ? L(&c->h->tail) : L(&c->b[n].prev)) == id;
}

static int q_unlink(struct cp *c, uint32_t id)
{
    struct bt_cblock *b = &c->b[id];
    uint32_t p = L(&b->prev), n = L(&b->next);
    if (!link_ok(c, p) || !link_ok(c, n))
        return BT_ECORRUPT;             /* checked before (q_linked); never trusted */
    S(p == BT_NIL ? &c->h->head : &c->b[p].next, n);
    S(n == BT_NIL ? &c->h->tail : &c->b[n].prev, p);
    S(&b->prev, BT_NIL);
    S(&b->next, BT_NIL);
    S(&b->inq, 0u);
    S(&c->h->nfree, L(&c->h->nfree) - 1);
    if (L(&b->keys))
        S(&c->h->ncached, L(&c->h->ncached) - 1);
    return BT_OK;
}

/* Link id after `after` (BT_NIL: at the front). The caller checked the ends
 * (q_ends_ok); links it follows are ones it set itself. */
static int q_insert_after(struct cp *c, uint32_t after, uint32_t id)
{
    uint32_t n = after == BT_NIL ? L(&c->h->head) : L(&c->b[after].next);
    if (!link_ok(c, n))
        return BT_ECORRUPT;
    S(&c->b[id].prev, after);
    S(&c->b[id].next, n);
    S(after == BT_NIL ? &c->h->head : &c->b[after].next, id);
    S(n == BT_NIL ? &c->h->tail : &c->b[n].prev, id);
    S(&c->b[id].inq, 1u);
    S(&c->h->nfree, L(&c->h->nfree) + 1);
    if (L(&c->b[id].keys))
        S(&c->h->ncached, L(&c->h->ncached) + 1);
    return BT_OK;
}

/* The ends of the queue are what inserting follows. */
static int q_ends_ok(const struct cp *c)
{
    uint32_t hd = L(&c->h->head), tl = L(&c->h->tail);
    if (!link_ok(c, hd) || !link_ok(c, tl) || (hd == BT_NIL) != (tl == BT_NIL))
        return 0;
    return hd == BT_NIL || (L(&c->b[hd].prev) == BT_NIL && L(&c->b[tl].next) == BT_NIL);
}

/* ---- reset --------------------------------------------------------------------- */

/* Every key gone (buckets and key lists cleared, entries all free). */
static void keys_clear(struct cp *c)
{
    for (uint32_t id = c->lo; id < c->hi; id++)
        S(&c->b[id].keys, 0u);
    for (uint32_t j = 0; j <= c->mask; j++)
        S(&c->bk[j], 0u);
    S(&c->h->nkeys, 0u);
    S(&c->h->ncached, 0u);
    S(&c->h->free_key, 0u);
    S(&c->h->key_top, 0u);
}

/* The initial state: all blocks free, count 0, queued in id order, no keys.
 * The caller is the only writer (the owner, a recoverer holding the owner
 * word, a repair under the freeze, or creation). */
void bt_cache_pool_reset(bt_seg *s, uint32_t pool)
{
    struct cp c;
    if (cp_get(s, pool, &c))
        return;
    w_begin(c.h);
    for (uint32_t id = c.lo; id < c.hi; id++) {
        S(&s->refcnt[id], 0u);
        S(&s->owner[id], 0u);
        int q = id >= c.first;
        S(&c.b[id].prev, q && id > c.first ? id - 1 : BT_NIL);
        S(&c.b[id].next, q && id + 1 < c.hi ? id + 1 : BT_NIL);
        S(&c.b[id].inq, (uint32_t)q);
    }
    keys_clear(&c);
    S(&c.h->head, c.first);
    S(&c.h->tail, c.hi - 1);
    S(&c.h->nfree, c.hi - c.first);
    w_end(c.h);
}

void bt_cache_format(bt_seg *s)
{
    for (uint32_t p = 0; p < s->cfg.cache_pools; p++)
        bt_cache_pool_reset(s, p);
}

/* Reset and unown the pools client id owns. The owner word goes to
 * BT_CACHE_RESETTING first (with our pid in locker), so that bt_cache_open
 * cannot take the pool while it is being reset. */
void bt_cache_release_owner(bt_seg *s, uint32_t id)
{
    for (uint32_t p = 0; p < s->cfg.cache_pools; p++) {
        struct bt_cache_hdr *h = &s->cache[p];
        uint32_t o = bt_load_acquire(&h->owner);
        if (o != id)
            continue;
        S(&h->locker, (int32_t)getpid());
        if (!bt_cas_acqrel(&h->owner, &o, BT_CACHE_RESETTING))
            continue;                   /* taken over meanwhile: not ours to reset */
        bt_cache_pool_reset(s, p);
        S(&h->owner_pid, 0);
        S(&h->owner_start, 0ull);
        bt_store_release(&h->owner, 0u);
    }
}

/* ---- ownership ------------------------------------------------------------------ */

static int owner_live(const bt_seg *s, const struct bt_cache_hdr *h, uint32_t o)
{
    if (o == 0)
        return 0;
    if (o == BT_CACHE_RESETTING)
        return bt_pid_alive(L(&h->locker), 0);
    if (o > s->cfg.max_clients)
        return 0;                       /* no client has that id: scribbled */
    const struct bt_cslot *sl = &s->clients[o - 1];
    return bt_load_acquire(&sl->state) == BT_CLIENT_ACTIVE &&
           bt_pid_alive(L(&sl->pid), L(&sl->start_time));
}

int bt_cache_open(bt_client *cl, uint32_t pool)
{
    struct cp c;
    if (!cl)
        return BT_EINVAL;
    int rc = cp_get(cl->seg, pool, &c);
    if (rc || (rc = bt_op_begin(cl)))
        return rc;
    uint32_t o = bt_load_acquire(&c.h->owner);
    if (o == cl->id)
        goto out;                       /* ours already */
    if (owner_live(cl->seg, c.h, o) || !bt_cas_acqrel(&c.h->owner, &o, cl->id)) {
        rc = BT_EBUSY;
        goto out;
    }
    S(&c.h->owner_pid, cl->pid);
    S(&c.h->owner_start, bt_self_start_time());
    bt_cache_pool_reset(cl->seg, pool);
out:
    bt_op_end(cl);
    return rc;
}

/* Validate, enter the client protocol, require ownership. */
static int cp_begin(bt_client *cl, uint32_t pool, struct cp *c)
{
    if (!cl)
        return BT_EINVAL;
    int rc = cp_get(cl->seg, pool, c);
    if (rc || (rc = bt_op_begin(cl)))
        return rc;
    if (L(&c->h->owner) != cl->id) {
        bt_op_end(cl);
        return BT_ENOTOWNER;
    }
    return BT_OK;
}

/* cp_begin for the calls that take a list of ids: BT_EINVAL if n ids are
 * promised and none given, before anything else. */
static int cp_begin_ids(bt_client *cl, uint32_t pool, const int32_t *ids, uint32_t n,
                        struct cp *c)
{
    return !ids && n ? BT_EINVAL : cp_begin(cl, pool, c);
}

int bt_cache_close(bt_client *cl, uint32_t pool)
{
    struct cp c;
    int rc = cp_begin(cl, pool, &c);
    if (rc)
        return rc;
    bt_cache_pool_reset(cl->seg, pool);
    S(&c.h->owner_pid, 0);
    S(&c.h->owner_start, 0ull);
    bt_store_release(&c.h->owner, 0u);
    bt_op_end(cl);
    return BT_OK;
}

/* ---- allocation (get_new_blocks) ------------------------------------------------ */

/* Check the first n queued blocks and count their keys (no writes). */
static int alloc_scan(const struct cp *c, uint32_t n, uint32_t *nkeys)
{
    uint32_t x = L(&c->h->head), prev = BT_NIL;
    uint64_t total = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t k;
        if (!usable(c, x) || L(&c->b[x].prev) != prev || !L(&c->b[x].inq) ||
            L(&c->s->refcnt[x]) != 0 || keys_count(c, x, &k, NULL))
            return BT_ECORRUPT;
        total += k;
        prev = x;
        x = L(&c->b[x].next);
    }
    if (!link_ok(c, x) || total > c->cap)
        return BT_ECORRUPT;             /* more keys than entries: lists overlap */
    *nkeys = (uint32_t)total;
    return BT_OK;
}

int bt_cache_alloc(bt_client *cl, uint32_t pool, uint32_t n, int32_t *ids_out,
                   bt_cache_key *removed_out, uint32_t removed_cap, uint32_t *n_removed)
{
    struct cp c;
    uint32_t need = 0, got = 0;
    if ((!ids_out && n) || (!removed_out && removed_cap))
        return BT_EINVAL;
    int rc = cp_begin(cl, pool, &c);
    if (rc)
        return rc;
    if (n > L(&c.h->nfree))
        rc = BT_ENOBLOCKS;
    else if (!(rc = alloc_scan(&c, n, &need)) && need > removed_cap)
        rc = BT_EINVAL;                 /* *n_removed says how many */
    if (rc || n == 0)
        goto out;
    w_begin(c.h);
    uint32_t x = L(&c.h->head), evicted = 0, i = 0;
    for (; i < n && !rc; i++) {
        uint32_t nx = L(&c.b[x].next);
        ids_out[i] = (int32_t)x;
        if (L(&c.b[x].keys)) {          /* vLLM _maybe_evict_cached_block */
            evicted++;
            S(&c.h->ncached, L(&c.h->ncached) - 1);
            rc = keys_drop(&c, x, removed_out, &got, removed_cap);
        }
        S(&c.b[x].prev, BT_NIL);
        S(&c.b[x].next, BT_NIL);
        S(&c.b[x].inq, 0u);
        S(&cl->seg->refcnt[x], 1u);
        S(&cl->seg->owner[x], cl->id);
        x = nx;
    }
    S(&c.h->head, x);
    S(x == BT_NIL ? &c.h->tail : &c.b[x].prev, BT_NIL);
    S(&c.h->nfree, L(&c.h->nfree) - i);   /* i < n only on BT_ECORRUPT */
    S(&c.h->evicted, L(&c.h->evicted) + got);
    S(&c.h->blocks_evicted, L(&c.h->blocks_evicted) + evicted);
    w_end(c.h);
out:
    if (n_removed)
        *n_removed = rc == BT_OK ? got : need;
    bt_op_end(cl);
    return rc;
}

/* ---- references: touch, free, unpin, set_ref ---------------------------------- */

int bt_cache_touch(bt_client *cl, uint32_t pool, const int32_t *ids, uint32_t n)
{
    struct cp c;
    int rc = cp_begin_ids(cl, pool, ids, n, &c);
    if (rc)
        return rc;
    for (uint32_t i = 0; i < n && !rc; i++) {
        uint32_t id = (uint32_t)ids[i];
        if (!named(&c, ids[i]))
            rc = BT_ERANGE;
        else if (is_null(&c, id))
            continue;
        else if (L(&cl->seg->refcnt[id]) >= UINT32_MAX - n)
            rc = BT_EINVAL;             /* the count would wrap */
        else if (L(&cl->seg->refcnt[id]) == 0 && !q_linked(&c, id))
            rc = BT_ECORRUPT;
    }
    if (rc || n == 0)
        goto out;
    w_begin(c.h);
    for (uint32_t i = 0; i < n; i++) {
        uint32_t id = (uint32_t)ids[i], r;
        if (is_null(&c, id))
            continue;                   /* vLLM counts it and never reads it */
        if ((r = L(&cl->seg->refcnt[id])) == 0 && (rc = q_unlink(&c, id)))
            break;                      /* an eviction candidate hit again */
        S(&cl->seg->refcnt[id], r + 1);
        S(&cl->seg->owner[id], cl->id);
    }
    w_end(c.h);
out:
    bt_op_end(cl);
    return rc;
}

/* Drop one reference per listed id (the null block skipped); all or nothing:
 * BT_ENOTHELD (a count would go below 0) or BT_ECORRUPT (a held block is in
 * the queue) undoes the decrements made. */
static int decref_all(struct cp *c, const int32_t *ids, uint32_t n)
{
    uint32_t *rc = c->s->refcnt;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t id = (uint32_t)ids[i], r;
        if (is_null(c, id))
            continue;
        int err = (r = L(&rc[id])) == 0 ? BT_ENOTHELD : r == 1 && L(&c->b[id].inq) ? BT_ECORRUPT : 0;
        if (err) {
            for (uint32_t j = 0; j < i; j++)
                if (!is_null(c, (uint32_t)ids[j]))
                    S(&rc[ids[j]], L(&rc[ids[j]]) + 1);
            return err;
        }
        S(&rc[id], r - 1);
    }
    return BT_OK;
}

/* Queue the listed blocks that reached 0, each at its last occurrence in the
 * list (where vLLM's loop saw it reach 0), keeping list order: walking the
 * list backwards, each goes right after `after` (BT_NIL: the front). which:
 * 0 every one, 1 those without keys, 2 those with keys. */
static int queue_zeroed(struct cp *c, const int32_t *ids, uint32_t n, uint32_t after, int which)
{
    for (uint32_t i = n; i-- > 0;) {
        uint32_t id = (uint32_t)ids[i];
        if (is_null(c, id) || L(&c->s->refcnt[id]) != 0 || L(&c->b[id].inq))
            continue;
        int keyed = L(&c->b[id].keys) != 0;
        if ((which == 1 && keyed) || (which == 2 && !keyed))
            continue;
        S(&c->s->owner[id], 0u);
        int rc = q_insert_after(c, after, id);
        if (rc)
            return rc;
    }
    return BT_OK;
}

static int check_ids(const struct cp *c, const int32_t *ids, uint32_t n, int null_ok)
{
    for (uint32_t i = 0; i < n; i++) {
        if (!named(c, ids[i]))
            return BT_ERANGE;
        if (!null_ok && is_null(c, (uint32_t)ids[i]))
            return BT_EINVAL;
    }
    return BT_OK;
}

/* bt_cache_free and bt_cache_unpin: the same checks and decrements; only
 * null blocks (unpin refuses them) and where the blocks that reach 0 go differ. */
enum { REL_FREE, REL_FREE_CACHING, REL_UNPIN };

static int cache_release(bt_client *cl, uint32_t pool, const int32_t *ids, uint32_t n, int how)
{
    struct cp c;
    int rc = cp_begin_ids(cl, pool, ids, n, &c);
    if (rc)
        return rc;
    if ((rc = check_ids(&c, ids, n, how != REL_UNPIN)) || n == 0)
        goto out;
    if (!q_ends_ok(&c)) {
        rc = BT_ECORRUPT;
        goto out;
    }
    w_begin(c.h);
    rc = decref_all(&c, ids, n);
    if (!rc && how == REL_UNPIN)
        rc = queue_zeroed(&c, ids, n, L(&c.h->tail), 0);     /* every one to the tail */
    else if (!rc) {
        /* vLLM: prepend_n(no hash, or caching off), then append_n(with hash) */
        rc = queue_zeroed(&c, ids, n, BT_NIL, how == REL_FREE_CACHING ? 1 : 0);
        if (how == REL_FREE_CACHING && !rc)
            rc = queue_zeroed(&c, ids, n, L(&c.h->tail), 2);
    }
    w_end(c.h);
out:
    bt_op_end(cl);
    return rc;
}

int bt_cache_free(bt_client *cl, uint32_t pool, const int32_t *ids, uint32_t n, int caching)
{
    return cache_release(cl, pool, ids, n, caching ? REL_FREE_CACHING : REL_FREE);
}

int bt_cache_unpin(bt_client *cl, uint32_t pool, const int32_t *ids, uint32_t n)
{
    return cache_release(cl, pool, ids, n, REL_UNPIN);
}

int bt_cache_set_ref(bt_client *cl, uint32_t pool, int32_t block, uint32_t refcnt)
{
    struct cp c;
    int rc = cp_begin(cl, pool, &c);
    if (rc)
        return rc;
    if (!named(&c, block))
        rc = BT_ERANGE;
    else if (is_null(&c, (uint32_t)block) || refcnt == 0 || L(&cl->seg->refcnt[block]) == 0)
        rc = BT_EINVAL;
    else
        S(&cl->seg->refcnt[block], refcnt);
    bt_op_end(cl);
    return rc;
}

/* ---- the map: insert, remove, reset ------------------------------------------- */

/* vLLM _insert_block_hash; the caller holds the pool and checked block/len. */
static int insert_one(struct cp *c, uint32_t block, const uint8_t *key, uint32_t len,
                      uint32_t ntokens, int *inserted)
{
    uint64_t w[8];
    uint64_t d = key_words(key, len, w);
    uint32_t found, last, nk, blast;
    int rc = chain_find(c, d, len, w, block, &found, &last);
    if (rc)
        return rc;
    *inserted = 0;
    if (found)
        return BT_OK;                   /* already maps to this block */
    if ((rc = keys_count(c, block, &nk, &blast)))
        return rc;
    uint32_t e = L(&c->h->free_key), top = L(&c->h->key_top);
    if (e) {
        if (!ent_ok(c, e))
            return BT_ECORRUPT;
        uint32_t nx = L(&c->k[e - 1].bucket_next);
        if (nx && !ent_ok(c, nx))
            return BT_ECORRUPT;
        S(&c->h->free_key, nx);
    } else if (top < c->cap) {
        e = top + 1;
        S(&c->h->key_top, e);
    } else {
        return BT_ENOKEYS;
    }
    struct bt_ckey *k = &c->k[e - 1];
    S(&k->digest, d);
    S(&k->block, block);
    S(&k->bucket_next, 0u);
    S(&k->block_next, 0u);
    S(&k->ntokens, ntokens);
    S(&k->len, (uint16_t)len);
    for (int i = 0; i < 8; i++)
        S(&k->key[i], w[i]);
    /* last on its bucket chain (the oldest is found first), last on its
     * block's list (the first is the primary) */
    S(last ? &c->k[last - 1].bucket_next : &c->bk[d & c->mask], e);
    S(blast ? &c->k[blast - 1].block_next : &c->b[block].keys, e);
    if (nk == 0 && L(&c->b[block].inq))
        S(&c->h->ncached, L(&c->h->ncached) + 1);
    S(&c->h->nkeys, L(&c->h->nkeys) + 1);
    S(&c->h->stored, L(&c->h->stored) + 1);
    *inserted = 1;
    return BT_OK;
}

int bt_cache_insert(bt_client *cl, uint32_t pool, int32_t block, const uint8_t *key, uint32_t len,
                    uint32_t ntokens, int *inserted)
{
    struct cp c;
    int ins = 0;
    if (!key || len == 0 || len > BT_CACHE_KEY_MAX)
        return BT_EINVAL;
    int rc = cp_begin(cl, pool, &c);
    if (rc)
        return rc;
    if ((rc = check_ids(&c, &block, 1, 0)) == BT_OK) {
        w_begin(c.h);
        rc = insert_one(&c, (uint32_t)block, key, len, ntokens, &ins);
        w_end(c.h);
    }
    if (inserted)
        *inserted = ins;
    bt_op_end(cl);
    return rc;
}

int bt_cache_insert_many(bt_client *cl, uint32_t pool, const int32_t *blocks, uint32_t n,
                         const uint8_t *keys, uint32_t len, const uint32_t *ntokens,
                         uint32_t *n_inserted)
{
    struct cp c;
    uint32_t done = 0;
    if (n && (!blocks || !keys || len == 0 || len > BT_CACHE_KEY_MAX))
        return BT_EINVAL;
    int rc = cp_begin(cl, pool, &c);
    if (rc)
        return rc;
    if ((rc = check_ids(&c, blocks, n, 0)) == BT_OK && n) {
        w_begin(c.h);
        for (uint32_t i = 0; i < n && !rc; i++) {
            int ins = 0;
            rc = insert_one(&c, (uint32_t)blocks[i], keys + (uint64_t)i * len, len,
                            ntokens ? ntokens[i] : 0, &ins);
            done += (uint32_t)ins;
        }
        w_end(c.h);
    }
    if (n_inserted)
        *n_inserted = done;
    bt_op_end(cl);
    return rc;
}

int bt_cache_remove(bt_client *cl, uint32_t pool, int32_t block,
                    bt_cache_key *removed_out, uint32_t removed_cap, uint32_t *n_removed)
{
    struct cp c;
    uint32_t need = 0, got = 0;
    if (!removed_out && removed_cap)
        return BT_EINVAL;
    int rc = cp_begin(cl, pool, &c);
    if (rc)
        return rc;
    if ((rc = check_ids(&c, &block, 1, 1)) || (rc = keys_count(&c, (uint32_t)block, &need, NULL)))
        goto out;
    if (need > removed_cap) {
        rc = BT_EINVAL;
        goto out;
    }
    if (need) {
        w_begin(c.h);
        if (L(&c.b[block].inq))
            S(&c.h->ncached, L(&c.h->ncached) - 1);
        rc = keys_drop(&c, (uint32_t)block, removed_out, &got, removed_cap);
        w_end(c.h);
    }
out:
    if (n_removed)
        *n_removed = rc == BT_OK ? got : need;
    bt_op_end(cl);
    return rc;
}

int bt_cache_reset(bt_client *cl, uint32_t pool)
{
    struct cp c;
    int rc = cp_begin(cl, pool, &c);
    if (rc)
        return rc;
    if (L(&c.h->nfree) != c.hi - c.first) {
        rc = BT_EBUSY;                  /* vLLM: some blocks are not freed yet */
    } else {
        w_begin(c.h);
        keys_clear(&c);
        S(&c.h->resets, L(&c.h->resets) + 1);
        w_end(c.h);
    }
    bt_op_end(cl);
    return rc;
}

/* ---- readers ---------------------------------------------------------------------- */

/* One lookup under the seqlock; *block 0 = none. */
static int lookup_one(const struct cp *c, const uint8_t *key, uint32_t len, int32_t *block)
{
    uint64_t w[8], t0 = 0;
    uint64_t d = key_words(key, len, w);
    uint32_t spin = 0, seq, found;
    for (;;) {
        int rc = r_begin(c->h, &seq, &spin, &t0);
        if (rc)
            return rc;
        rc = chain_find(c, d, len, w, BT_NIL, &found, NULL);
        uint32_t b = !rc && found ? L(&c->k[found - 1].block) : 0;
        if (r_changed(c->h, seq)) {
            if (bt_seq_backoff(spin++, &t0))
                return BT_EBUSY;
            continue;
        }
        if (rc || (found && !usable(c, b)))
            return BT_ECORRUPT;
        *block = (int32_t)b;
        return BT_OK;
    }
}

int bt_cache_lookup(const bt_seg *seg, uint32_t pool, const uint8_t *key, uint32_t len,
                    int32_t *block_out)
{
    struct cp c;
    if (!key || !block_out || len == 0 || len > BT_CACHE_KEY_MAX)
        return BT_EINVAL;
    int rc = cp_get(seg, pool, &c);
    if (rc || (rc = lookup_one(&c, key, len, block_out)))
        return rc;
    bt_fetch_add_relaxed(&c.h->queries, 1ull);
    if (*block_out)
        bt_fetch_add_relaxed(&c.h->hits, 1ull);
    return BT_OK;
}

int bt_cache_lookup_many(const bt_seg *seg, uint32_t pool, const uint8_t *keys, uint32_t n,
                         uint32_t len, int32_t *blocks_out, uint32_t *n_hit)
{
    struct cp c;
    if (!n_hit || (n && (!keys || !blocks_out || len == 0 || len > BT_CACHE_KEY_MAX)))
        return BT_EINVAL;
    int rc = cp_get(seg, pool, &c);
    if (rc)
        return rc;
    uint32_t i = 0, asked = 0;
    for (; i < n; i++) {
        asked++;
        if ((rc = lookup_one(&c, keys + (uint64_t)i * len, len, &blocks_out[i])) || !blocks_out[i])
            break;
    }
    *n_hit = i;
    bt_fetch_add_relaxed(&c.h->queries, (uint64_t)asked);
    bt_fetch_add_relaxed(&c.h->hits, (uint64_t)i);
    return rc;
}

int bt_cache_block_key(const bt_seg *seg, int32_t block, bt_cache_key *out, uint32_t *nkeys_out)
{
    struct cp c;
    if (!seg || !out)
        return BT_EINVAL;
    if (block < 0 || (uint64_t)block >= seg->total)
        return BT_ERANGE;
    int rc = cp_get(seg, (uint32_t)block / seg->cfg.blocks_per_pool, &c);
    if (rc)
        return rc;
    uint32_t spin = 0, seq, n = 0;
    uint64_t t0 = 0;
    for (;;) {
        if ((rc = r_begin(c.h, &seq, &spin, &t0)))
            return rc;
        uint32_t e = L(&c.b[block].keys);
        rc = keys_count(&c, (uint32_t)block, &n, NULL);
        if (!rc && e)
            key_out(&c.k[e - 1], out);
        if (!r_changed(c.h, seq))
            break;
        if (bt_seq_backoff(spin++, &t0))
            return BT_EBUSY;
    }
    if (rc)
        return rc;
    if (n == 0)
        memset(out, 0, sizeof(*out));
    out->block = block;
    if (nkeys_out)
        *nkeys_out = n ? n - 1 : 0;
    return BT_OK;
}

int bt_cache_stats_get(const bt_seg *seg, uint32_t pool, bt_cache_stats *out)
{
    struct cp c;
    if (!out)
        return BT_EINVAL;
    int rc = cp_get(seg, pool, &c);
    if (rc)
        return rc;
    uint32_t spin = 0, seq;
    uint64_t t0 = 0;
    bt_cache_stats st;
    for (;;) {
        if ((rc = r_begin(c.h, &seq, &spin, &t0)))
            return rc;
        uint32_t o = L(&c.h->owner), nf = L(&c.h->nfree), usable_n = c.hi - c.first;
        nf = nf > usable_n ? usable_n : nf;
        st = (bt_cache_stats){ .owner = o == BT_CACHE_RESETTING ? 0 : o,
            .owner_pid = L(&c.h->owner_pid), .num_blocks = c.hi - c.lo, .free = nf,
            .cached_free = L(&c.h->ncached), .in_use = usable_n - nf, .keys = L(&c.h->nkeys),
            .key_cap = c.cap, .queries = L(&c.h->queries), .hits = L(&c.h->hits),
            .stored = L(&c.h->stored), .evicted = L(&c.h->evicted),
            .blocks_evicted = L(&c.h->blocks_evicted), .resets = L(&c.h->resets) };
        if (!r_changed(c.h, seq))
            break;
        if (bt_seq_backoff(spin++, &t0))
            return BT_EBUSY;
    }
    *out = st;
    return BT_OK;
}

int bt_cache_queue(const bt_seg *seg, uint32_t pool, int32_t *ids_out, uint32_t cap, uint32_t *n_out)
{
    struct cp c;
    if (!n_out || (!ids_out && cap))
        return BT_EINVAL;
    int rc = cp_get(seg, pool, &c);
    if (rc)
        return rc;
    uint32_t spin = 0, seq, n;
    uint64_t t0 = 0;
    for (;;) {
        if ((rc = r_begin(c.h, &seq, &spin, &t0)))
            return rc;
        uint32_t x = L(&c.h->head), span = c.hi - c.first;
        n = 0;
        rc = BT_OK;
        while (x != BT_NIL) {
            if (!usable(&c, x) || n >= span) {
                rc = BT_ECORRUPT;
                break;
            }
            if (n < cap)
                ids_out[n] = (int32_t)x;
            n++;
            x = L(&c.b[x].next);
        }
        if (!r_changed(c.h, seq))
            break;
        if (bt_seq_backoff(spin++, &t0))
            return BT_EBUSY;
    }
    *n_out = n;
    return rc;
}

const uint32_t *bt_cache_nfree_ptr(const bt_seg *seg, uint32_t pool)
{
    struct cp c;
    return cp_get(seg, pool, &c) ? NULL : &c.h->nfree;
}

/* ---- check.c's structural verification ------------------------------------------ */

/* Problems in one pool: queue links, counts against the queue, key lists,
 * bucket chains, the free-entry list. Reads only; every walk bounded.
 * bseen has blocks_per_pool bytes, kseen cache_keys bytes (zeroed here). */
uint64_t bt_cache_verify(const bt_seg *s, uint32_t pool, uint8_t *bseen, uint8_t *kseen)
{
    struct cp c;
    uint64_t bad = 0;
    if (cp_get(s, pool, &c))
        return 0;
    memset(bseen, 0, c.hi - c.lo);
    memset(kseen, 0, c.cap);
    /* the queue */
    uint32_t x = L(&c.h->head), prev = BT_NIL, steps = 0, cached = 0;
    while (x != BT_NIL) {
        if (!usable(&c, x) || bseen[x - c.lo]) {
            bad++;                      /* a stray link or a cycle */
            break;
        }
        bseen[x - c.lo] = 1;
        steps++;
        bad += L(&c.b[x].prev) != prev;
        bad += !L(&c.b[x].inq);
        bad += L(&s->refcnt[x]) != 0;
        cached += L(&c.b[x].keys) != 0;
        prev = x;
        x = L(&c.b[x].next);
    }
    bad += x == BT_NIL && L(&c.h->tail) != prev;
    bad += steps != L(&c.h->nfree);
    bad += cached != L(&c.h->ncached);
    for (uint32_t id = c.lo; id < c.hi; id++) {
        if (id < c.first) {             /* the null block: never queued, no keys */
            bad += L(&c.b[id].inq) != 0 || L(&c.b[id].keys) != 0;
            continue;
        }
        int queued = bseen[id - c.lo];
        bad += !queued && L(&s->refcnt[id]) == 0;   /* free but not in the queue */
        bad += !queued && L(&c.b[id].inq) != 0;
    }
    /* key lists: each entry on one list, naming its block, a sane key */
    uint32_t total = 0, inchains = 0, nfreek = 0;
    for (uint32_t id = c.lo; id < c.hi; id++) {
        for (uint32_t e = L(&c.b[id].keys); e; e = L(&c.k[e - 1].block_next)) {
            if (!ent_ok(&c, e) || kseen[e - 1]) {
                bad++;
                break;
            }
            kseen[e - 1] = 1;
            const struct bt_ckey *k = &c.k[e - 1];
            uint32_t len = L(&k->len);
            uint64_t w[8], scratch[8];
            for (int i = 0; i < 8; i++)
                w[i] = L(&k->key[i]);
            bad += L(&k->block) != id || len == 0 || len > BT_CACHE_KEY_MAX;
            if (len && len <= BT_CACHE_KEY_MAX)
                bad += key_words((const uint8_t *)w, len, scratch) != L(&k->digest);
            total++;
        }
    }
    bad += total != L(&c.h->nkeys);
    /* bucket chains: exactly the entries on key lists, each in its bucket */
    for (uint32_t j = 0; j <= c.mask; j++) {
        for (uint32_t e = L(&c.bk[j]); e; e = L(&c.k[e - 1].bucket_next)) {
            if (!ent_ok(&c, e) || kseen[e - 1] != 1) {
                bad++;                  /* stray, on no list, or a cycle */
                break;
            }
            kseen[e - 1] = 2;
            bad += (L(&c.k[e - 1].digest) & c.mask) != j;
            inchains++;
        }
    }
    bad += inchains != total;
    /* free entries: below key_top, on no list */
    uint32_t top = L(&c.h->key_top);
    bad += top > c.cap;
    for (uint32_t e = L(&c.h->free_key); e; e = L(&c.k[e - 1].bucket_next)) {
        if (e > top || !ent_ok(&c, e) || kseen[e - 1]) {
            bad++;
            break;
        }
        kseen[e - 1] = 3;
        nfreek++;
    }
    bad += top <= c.cap && total + nfreek != top;
    uint32_t o = L(&c.h->owner);
    bad += o != 0 && o != BT_CACHE_RESETTING && o > s->cfg.max_clients;
    bad += (L(&c.h->seq) & 1u) != 0;
    return bad;
}
