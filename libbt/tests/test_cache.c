/*
 * test_cache.c -- cache pools (bt_cache_*): vLLM 0.32's BlockPool in the
 * segment.
 *
 *   - the queue orders of get_new_blocks / free_blocks / touch / unpin,
 *     written out by hand from vLLM's code;
 *   - the map: oldest block per key, primary + extra keys, remove, reset;
 *   - refusals: the Treiber-stack calls and MANAGED rows on cache-pool ids,
 *     ownership (BT_ENOTOWNER, BT_EBUSY), bad arguments;
 *   - a randomized differential test against a small reference model that
 *     transliterates block_pool.py / FreeKVCacheBlockQueue;
 *   - ownership recovery: a SIGKILLed owner, recovered by
 *     bt_seg_recover_client and by a repairing check; a new owner opens;
 *   - scribbles on the cache regions: calls fail (BT_ECORRUPT or an ordinary
 *     error), never write out of bounds (run under `make asan`) or hang, and
 *     a repairing check resets the pool to a clean state.
 */
#include <pthread.h>
#include <stddef.h>
#include "bt_test.h"
#include "bt_layout.h"

#define BPP 24u

static uint32_t buckets_of(const bt_config *c)  /* white-box: bt_layout's rule */
{
    uint32_t k = c->cache_keys ? c->cache_keys : 2 * c->blocks_per_pool, b = 1;
    while (b < k)
        b <<= 1;
    return b;
}

static bt_config cfg(uint32_t cache_pools, uint32_t keys)
{
    bt_config c = t_config(3, BPP, 8, 8);
    c.cache_pools = cache_pools;
    c.cache_keys = keys;
    return c;
}

/* A new client of seg that owns cache pool `pool` (bt_cache_open), or fail. */
static bt_client *cache_owner(bt_seg *seg, uint32_t pool)
{
    bt_client *cl = t_client(seg);
    T_OK(bt_cache_open(cl, pool));
    return cl;
}

/* The queue of `pool`, as ids. */
static uint32_t queue(bt_seg *seg, uint32_t pool, int32_t *out, uint32_t cap)
{
    uint32_t n = 0;
    T_OK(bt_cache_queue(seg, pool, out, cap, &n));
    T_ASSERT(n <= cap);
    return n;
}

#define QUEUE_IS(seg, pool, ...) do { \
    int32_t want_[] = { __VA_ARGS__ }, got_[BPP]; \
    uint32_t nw_ = sizeof(want_) / sizeof(want_[0]), ng_ = queue(seg, pool, got_, BPP); \
    T_EQ(ng_, nw_); \
    for (uint32_t i_ = 0; i_ < nw_; i_++) \
        T_ASSERTF(got_[i_] == want_[i_], "queue[%u] = %d, want %d", i_, got_[i_], want_[i_]); \
} while (0)

static const uint8_t *key_of(uint32_t k, uint32_t *len)
{
    static _Thread_local uint8_t buf[64];      /* readers run in threads */
    *len = 1 + (k * 7) % 64;
    for (uint32_t i = 0; i < *len; i++)
        buf[i] = (uint8_t)(k * 31 + i);
    return buf;
}

static int insert(bt_client *cl, uint32_t pool, int32_t block, uint32_t k, uint32_t ntok)
{
    uint32_t len;
    const uint8_t *key = key_of(k, &len);
    int ins = -1;
    int rc = bt_cache_insert(cl, pool, block, key, len, ntok, &ins);
    return rc ? rc : ins;
}

static int32_t lookup(bt_seg *seg, uint32_t pool, uint32_t k)
{
    uint32_t len;
    const uint8_t *key = key_of(k, &len);
    int32_t b = -1;
    T_OK(bt_cache_lookup(seg, pool, key, len, &b));
    return b;
}

static bt_check_report check(bt_seg *seg, int flags)
{
    bt_check_report rep;
    int rc = bt_seg_check(seg, flags, 1000, &rep);
    if (rc)
        T_FAIL("bt_seg_check(%d) returned %d (%s)", flags, rc, bt_errname(rc));
    return rep;
}

/* ---- config, layout, initial state ----------------------------------------- */

static void test_config(void)
{
    bt_config c = cfg(1, 0);
    T_OK(bt_config_check(&c));
    bt_config none = cfg(0, 0), big = cfg(1, 1000);
    T_ASSERT(bt_config_size(&c) > bt_config_size(&none));
    T_ASSERT(bt_config_size(&big) > bt_config_size(&c));
    c.cache_pools = 4;                  /* more than num_pools */
    T_RC(bt_config_check(&c), BT_ECONFIG);
    c = cfg(0, 5);                      /* keys without pools */
    T_RC(bt_config_check(&c), BT_ECONFIG);
    c = cfg(1, BT_MAX_CACHE_KEYS + 1);
    T_RC(bt_config_check(&c), BT_ECONFIG);
    c = cfg(2, 0);
    bt_seg *seg = t_seg_embedded(&c);
    bt_seg_info info = t_info(seg);
    T_EQ(info.config.cache_pools, 2);
    T_EQ(info.config.cache_keys, 2 * BPP);     /* 0 resolved */
    T_EQ(info.format, 2);
    /* pool 0 without its null block, pool 1 whole, in id order */
    int32_t q[BPP];
    T_EQ(queue(seg, 0, q, BPP), BPP - 1);
    for (uint32_t i = 0; i < BPP - 1; i++)
        T_EQ(q[i], (int32_t)i + 1);
    T_EQ(queue(seg, 1, q, BPP), BPP);
    T_EQ(q[0], (int32_t)BPP);
    T_EQ(t_free(seg, 0), BPP - 1);
    T_EQ(t_free(seg, 1), BPP);
    T_EQ(t_free(seg, 2), BPP);          /* a Treiber pool */
    bt_cache_stats st;
    T_OK(bt_cache_stats_get(seg, 0, &st));
    T_EQ(st.owner, 0);
    T_EQ(st.num_blocks, BPP);
    T_EQ(st.free, BPP - 1);
    T_EQ(st.in_use, 0);
    T_EQ(st.key_cap, 2 * BPP);
    T_RC(bt_cache_stats_get(seg, 2, &st), BT_EINVAL);    /* not a cache pool */
    T_RC(bt_cache_stats_get(seg, 3, &st), BT_ERANGE);
    T_ASSERT(bt_cache_nfree_ptr(seg, 0) && *bt_cache_nfree_ptr(seg, 0) == BPP - 1);
    T_ASSERT(bt_cache_nfree_ptr(seg, 2) == NULL);
    bt_check_report rep = check(seg, 0);
    T_EQ(rep.cache_bad, 0);
    T_EQ(rep.blocks_free, 3 * BPP - 1);
    bt_seg_close(seg);
}

/* ---- the queue orders ------------------------------------------------------ */

static void test_queue_order(void)
{
    bt_seg *seg = t_seg_new(cfg(1, 0));
    bt_client *cl = cache_owner(seg, 0);
    int32_t a[8];
    T_OK(bt_cache_alloc(cl, 0, 4, a, NULL, 0, NULL));
    T_EQ(a[0], 1); T_EQ(a[3], 4);
    T_EQ(t_refcnt(seg, 1), 1);
    T_EQ(t_free(seg, 0), BPP - 5);
    /* free without keys: prepended in list order (vLLM frees a request's
     * blocks reversed; the order given is the eviction order) */
    int32_t f1[] = { 3, 1 };
    T_OK(bt_cache_free(cl, 0, f1, 2, 1));
    int32_t q[BPP];
    T_EQ(queue(seg, 0, q, BPP), BPP - 3);
    T_EQ(q[0], 3); T_EQ(q[1], 1); T_EQ(q[2], 5);
    /* 2 and 4 get keys, then are freed: appended in list order */
    T_EQ(insert(cl, 0, 2, 10, 16), 1);
    T_EQ(insert(cl, 0, 4, 11, 32), 1);
    int32_t f2[] = { 4, 2 };
    T_OK(bt_cache_free(cl, 0, f2, 2, 1));
    T_EQ(queue(seg, 0, q, BPP), BPP - 1);
    T_EQ(q[0], 3); T_EQ(q[1], 1); T_EQ(q[2], 5);
    T_EQ(q[BPP - 3], 4); T_EQ(q[BPP - 2], 2);
    bt_cache_stats st;
    T_OK(bt_cache_stats_get(seg, 0, &st));
    T_EQ(st.cached_free, 2);
    T_EQ(st.keys, 2);
    /* a hit: touch takes the cached block out of the queue */
    T_EQ(lookup(seg, 0, 11), 4);
    int32_t t1[] = { 4, 0, 4 };         /* the null block is accepted, ignored */
    T_OK(bt_cache_touch(cl, 0, t1, 3));
    T_EQ(t_refcnt(seg, 4), 2);
    T_EQ(t_refcnt(seg, 0), 0);
    T_EQ(queue(seg, 0, q, BPP), BPP - 2);
    T_EQ(q[BPP - 3], 2);
    /* free with duplicates: reaches 0 at its second occurrence */
    int32_t f3[] = { 4, 0, 4 };
    T_OK(bt_cache_free(cl, 0, f3, 3, 1));
    T_EQ(queue(seg, 0, q, BPP), BPP - 1);
    T_EQ(q[BPP - 2], 4);                /* keyed: appended */
    /* a count would go below 0: nothing changes */
    int32_t f4[] = { 4 };
    T_RC(bt_cache_free(cl, 0, f4, 1, 1), BT_ENOTHELD);
    T_OK(bt_cache_alloc(cl, 0, 1, a, NULL, 0, NULL));
    T_EQ(a[0], 3);
    int32_t f5[] = { 3, 3 };
    T_RC(bt_cache_free(cl, 0, f5, 2, 1), BT_ENOTHELD);
    T_EQ(t_refcnt(seg, 3), 1);
    /* caching off: keyed blocks are prepended too */
    T_EQ(insert(cl, 0, 3, 12, 16), 1);
    T_OK(bt_cache_free(cl, 0, f4 + 0, 0, 0));
    int32_t f6[] = { 3 };
    T_OK(bt_cache_free(cl, 0, f6, 1, 0));
    T_EQ(queue(seg, 0, q, BPP), BPP - 1);
    T_EQ(q[0], 3);
    /* alloc evicts the keys of what it pops: removed in order */
    bt_cache_key rm[4];
    uint32_t nrm = 99;
    T_RC(bt_cache_alloc(cl, 0, 1, a, rm, 0, &nrm), BT_EINVAL);   /* no room for the key */
    T_EQ(nrm, 1);
    T_EQ(queue(seg, 0, q, BPP), BPP - 1);       /* nothing changed */
    T_OK(bt_cache_alloc(cl, 0, 1, a, rm, 4, &nrm));
    T_EQ(a[0], 3);
    T_EQ(nrm, 1);
    T_EQ(rm[0].block, 3);
    T_EQ(rm[0].ntokens, 16);
    uint32_t len;
    const uint8_t *k12 = key_of(12, &len);
    T_EQ(rm[0].len, len);
    T_ASSERT(memcmp(rm[0].key, k12, len) == 0);
    T_EQ(lookup(seg, 0, 12), 0);
    T_OK(bt_cache_stats_get(seg, 0, &st));
    T_EQ(st.evicted, 1);
    T_EQ(st.blocks_evicted, 1);
    T_EQ(st.stored, 3);
    /* unpin: appended whatever the keys; null block refused */
    int32_t u1[] = { 3 };
    T_OK(bt_cache_unpin(cl, 0, u1, 1));
    T_EQ(queue(seg, 0, q, BPP), BPP - 1);
    T_EQ(q[BPP - 2], 3);
    int32_t u0[] = { 0 };
    T_RC(bt_cache_unpin(cl, 0, u0, 1), BT_EINVAL);
    T_RC(bt_cache_unpin(cl, 0, u1, 1), BT_ENOTHELD);
    /* not enough free blocks */
    int32_t big[BPP];
    T_RC(bt_cache_alloc(cl, 0, BPP, big, NULL, 0, NULL), BT_ENOBLOCKS);
    T_EQ(check(seg, 0).cache_bad, 0);
    T_END(seg, cl);
}

/* ---- the map ----------------------------------------------------------------- */

static void test_map(void)
{
    bt_seg *seg = t_seg_new(cfg(2, 6));
    bt_client *cl = cache_owner(seg, 1);
    int32_t a[6];
    T_OK(bt_cache_alloc(cl, 1, 4, a, NULL, 0, NULL));
    T_EQ(a[0], (int32_t)BPP);           /* pool 1: no null block */
    T_EQ(lookup(seg, 1, 5), 0);
    /* the same key on two blocks: the oldest wins */
    T_EQ(insert(cl, 1, a[1], 5, 16), 1);
    T_EQ(insert(cl, 1, a[0], 5, 16), 1);
    T_EQ(lookup(seg, 1, 5), a[1]);
    T_EQ(insert(cl, 1, a[0], 5, 16), 0);        /* already maps: nothing */
    T_EQ(insert(cl, 1, a[1], 5, 99), 0);
    /* extras: a second key on a block */
    T_EQ(insert(cl, 1, a[0], 6, 32), 1);
    T_EQ(insert(cl, 1, a[0], 7, 48), 1);
    bt_cache_key k;
    uint32_t nx = 9, len;
    T_OK(bt_cache_block_key(seg, a[0], &k, &nx));
    T_EQ(nx, 2);
    T_EQ(k.ntokens, 16);
    const uint8_t *k5 = key_of(5, &len);
    T_EQ(k.len, len);
    T_ASSERT(memcmp(k.key, k5, len) == 0);
    T_OK(bt_cache_block_key(seg, a[3], &k, &nx));
    T_EQ(k.len, 0);
    T_EQ(nx, 0);
    /* removing the older mapping exposes the newer */
    bt_cache_key rm[4];
    uint32_t n = 0;
    T_OK(bt_cache_remove(cl, 1, a[1], rm, 4, &n));
    T_EQ(n, 1);
    T_EQ(lookup(seg, 1, 5), a[0]);
    T_OK(bt_cache_remove(cl, 1, a[1], rm, 4, &n));
    T_EQ(n, 0);
    T_RC(bt_cache_remove(cl, 1, a[0], rm, 2, &n), BT_EINVAL);
    T_EQ(n, 3);
    /* entries: 3 in use of 6 */
    T_EQ(insert(cl, 1, a[2], 8, 0), 1);
    T_EQ(insert(cl, 1, a[2], 9, 0), 1);
    T_EQ(insert(cl, 1, a[3], 10, 0), 1);
    T_RC(insert(cl, 1, a[3], 11, 0), BT_ENOKEYS);
    T_OK(bt_cache_remove(cl, 1, a[0], rm, 4, &n));
    T_EQ(n, 3);
    T_EQ(rm[0].ntokens, 16);            /* primary first, then insertion order */
    T_EQ(rm[1].ntokens, 32);
    T_EQ(rm[2].ntokens, 48);
    T_EQ(lookup(seg, 1, 5), 0);
    /* batch insert */
    uint8_t keys[3 * 8];
    for (int i = 0; i < 24; i++)
        keys[i] = (uint8_t)(i / 8 + 100);
    int32_t blocks[3] = { a[0], a[1], a[0] };
    uint32_t ntok[3] = { 1, 2, 3 }, nin = 0;
    T_OK(bt_cache_insert_many(cl, 1, blocks, 3, keys, 8, ntok, &nin));
    T_EQ(nin, 3);
    int32_t hits[3];
    T_OK(bt_cache_lookup_many(seg, 1, keys, 3, 8, hits, &nin));
    T_EQ(nin, 3);
    T_EQ(hits[1], a[1]);
    keys[16] = 7;                       /* a miss stops it */
    T_OK(bt_cache_lookup_many(seg, 1, keys, 3, 8, hits, &nin));
    T_EQ(nin, 2);
    /* bad arguments */
    uint8_t kb[65] = { 0 };
    int ins;
    T_RC(bt_cache_insert(cl, 1, a[0], kb, 0, 0, &ins), BT_EINVAL);
    T_RC(bt_cache_insert(cl, 1, a[0], kb, 65, 0, &ins), BT_EINVAL);
    T_RC(bt_cache_insert(cl, 1, 1, kb, 8, 0, &ins), BT_ERANGE);     /* pool 0's id */
    /* reset_prefix_cache: refused while blocks are in use */
    T_RC(bt_cache_reset(cl, 1), BT_EBUSY);
    T_OK(bt_cache_free(cl, 1, a, 4, 1));
    int32_t qb[BPP];
    uint32_t nq = queue(seg, 1, qb, BPP);
    T_OK(bt_cache_reset(cl, 1));
    int32_t qa[BPP];
    T_EQ(queue(seg, 1, qa, BPP), nq);
    T_ASSERT(memcmp(qa, qb, nq * sizeof(int32_t)) == 0);    /* order kept */
    bt_cache_stats st;
    T_OK(bt_cache_stats_get(seg, 1, &st));
    T_EQ(st.keys, 0);
    T_EQ(st.cached_free, 0);
    T_EQ(st.resets, 1);
    T_ASSERT(st.queries >= 5 && st.hits >= 3);
    T_EQ(lookup(seg, 1, 5), 0);
    /* set_ref: held blocks only */
    T_OK(bt_cache_alloc(cl, 1, 1, a, NULL, 0, NULL));
    T_OK(bt_cache_set_ref(cl, 1, a[0], 3));
    T_EQ(t_refcnt(seg, a[0]), 3);
    T_RC(bt_cache_set_ref(cl, 1, a[0], 0), BT_EINVAL);
    T_RC(bt_cache_set_ref(cl, 1, qa[0] == a[0] ? qa[1] : qa[0], 2), BT_EINVAL);
    T_EQ(check(seg, 0).cache_bad, 0);
    T_END(seg, cl);
}

/* ---- refusals and ownership -------------------------------------------------- */

static void test_refusals(void)
{
    bt_seg *seg = t_seg_new(cfg(1, 0));
    bt_client *a = t_client(seg), *b = t_client(seg);
    int32_t ids[4];
    /* the Treiber paths refuse a cache pool */
    T_RC(bt_blocks_alloc(a, 0, 1, ids), BT_EINVAL);
    T_RC(bt_pool_pop(seg, 0, 1, 0, ids), BT_EINVAL);
    uint32_t row;
    T_OK(bt_row_claim(a, 1, -1, BT_ROW_MANAGED, &row));
    T_RC(bt_row_alloc_append(a, row, 0, 1, ids), BT_EINVAL);
    uint32_t nn = 1;
    T_RC(bt_step(a, 0, NULL, 0, &row, &nn, 1, ids), BT_EINVAL);
    /* cache calls need the owner */
    T_RC(bt_cache_alloc(a, 0, 1, ids, NULL, 0, NULL), BT_ENOTOWNER);
    T_OK(bt_cache_open(a, 0));
    T_OK(bt_cache_open(a, 0));          /* ours already: a no-op */
    T_RC(bt_cache_open(b, 0), BT_EBUSY);
    T_RC(bt_cache_open(b, 1), BT_EINVAL);
    T_RC(bt_cache_open(b, 7), BT_ERANGE);
    T_OK(bt_cache_alloc(a, 0, 2, ids, NULL, 0, NULL));
    T_RC(bt_cache_touch(b, 0, ids, 2), BT_ENOTOWNER);
    T_RC(bt_cache_free(b, 0, ids, 2, 1), BT_ENOTOWNER);
    /* MANAGED rows and hands never hold cache ids; RAW rows may */
    T_RC(bt_row_append(a, row, ids, 1), BT_EINVAL);
    T_RC(bt_row_append_shared(a, row, ids, 1), BT_EINVAL);
    T_RC(bt_blocks_share(a, ids, 1), BT_EINVAL);
    T_RC(bt_blocks_release(a, ids, 1), BT_EINVAL);
    T_RC(bt_pool_push(seg, ids, 1), BT_EINVAL);
    uint32_t raw;
    T_OK(bt_row_claim(a, 2, -1, BT_ROW_RAW, &raw));
    T_OK(bt_row_append(a, raw, ids, 2));
    T_OK(bt_row_release(a, raw));       /* a RAW row counts nothing */
    T_EQ(t_refcnt(seg, ids[0]), 1);
    /* the Treiber pool next door still works */
    int32_t t[2];
    T_OK(bt_blocks_alloc(a, 1, 2, t));
    T_EQ(t[0] / (int32_t)BPP, 1);
    T_OK(bt_blocks_release(a, t, 2));
    bt_check_report rep = check(seg, 0);
    T_EQ(rep.cache_bad, 0);
    T_EQ(rep.refcnt_fixed, 0);
    T_EQ(rep.leaked, 0);
    /* a repair leaves a live owner's pool alone */
    rep = check(seg, BT_CHECK_REPAIR);
    T_EQ(rep.cache_reset, 0);
    T_EQ(t_refcnt(seg, ids[0]), 1);
    /* close resets and gives it up */
    T_RC(bt_cache_close(b, 0), BT_ENOTOWNER);
    T_OK(bt_cache_close(a, 0));
    T_EQ(t_refcnt(seg, ids[0]), 0);
    T_EQ(t_free(seg, 0), BPP - 1);
    T_OK(bt_cache_open(b, 0));
    /* closing the owner's client resets its pools */
    T_OK(bt_cache_alloc(b, 0, 3, ids, NULL, 0, NULL));
    T_EQ(insert(b, 0, ids[0], 1, 1), 1);
    bt_client_close(b);
    bt_cache_stats st;
    T_OK(bt_cache_stats_get(seg, 0, &st));
    T_EQ(st.owner, 0);
    T_EQ(st.free, BPP - 1);
    T_EQ(st.keys, 0);
    T_EQ(lookup(seg, 0, 1), 0);
    T_OK(bt_cache_open(a, 0));
    T_END(seg, a);
}

/* ---- the reference model (block_pool.py, transliterated) ------------------- */

#define MK 48                           /* key entries */
struct model {
    uint32_t first, hi;
    uint32_t ref[BPP];
    int32_t  q[BPP];
    uint32_t nq;
    struct { uint32_t key, block, ntok; } ent[MK];  /* the map, in insertion order */
    uint32_t nent;
};

static int m_qfind(const struct model *m, int32_t id)
{
    for (uint32_t i = 0; i < m->nq; i++)
        if (m->q[i] == id)
            return (int)i;
    return -1;
}
static void m_qdel(struct model *m, uint32_t at)
{
    memmove(&m->q[at], &m->q[at + 1], (m->nq - at - 1) * sizeof(int32_t));
    m->nq--;
}
static int m_haskey(const struct model *m, uint32_t b)
{
    for (uint32_t i = 0; i < m->nent; i++)
        if (m->ent[i].block == b)
            return 1;
    return 0;
}
/* remove the block's keys, appending them (block order = insertion order) */
static uint32_t m_drop(struct model *m, uint32_t b, uint32_t *keys_out, uint32_t *ntok_out)
{
    uint32_t n = 0, k = 0;
    for (uint32_t i = 0; i < m->nent; i++) {
        if (m->ent[i].block == b) {
            if (keys_out)
                keys_out[n] = m->ent[i].key, ntok_out[n] = m->ent[i].ntok;
            n++;
        } else {
            m->ent[k++] = m->ent[i];
        }
    }
    m->nent = k;
    return n;
}
static int32_t m_lookup(const struct model *m, uint32_t key)
{
    for (uint32_t i = 0; i < m->nent; i++)
        if (m->ent[i].key == key)
            return (int32_t)m->ent[i].block;
    return 0;
}

static void m_init(struct model *m, uint32_t lo)
{
    memset(m, 0, sizeof(*m));
    m->first = lo ? lo : 1;
    m->hi = lo + BPP;
    for (uint32_t b = m->first; b < m->hi; b++)
        m->q[m->nq++] = (int32_t)b;
}

/* Compare everything observable. */
static void m_compare(bt_seg *seg, uint32_t pool, const struct model *m, uint32_t lo, uint32_t nkeys_space)
{
    int32_t q[BPP];
    uint32_t n = queue(seg, pool, q, BPP);
    T_EQ(n, m->nq);
    for (uint32_t i = 0; i < n; i++)
        T_ASSERTF(q[i] == m->q[i], "queue[%u] = %d, model %d", i, q[i], m->q[i]);
    for (uint32_t b = m->first; b < m->hi; b++)
        T_ASSERTF(t_refcnt(seg, (int32_t)b) == m->ref[b - lo], "refcnt[%u] = %u, model %u", b,
                  t_refcnt(seg, (int32_t)b), m->ref[b - lo]);
    for (uint32_t k = 0; k < nkeys_space; k++)
        T_ASSERTF(lookup(seg, pool, k) == m_lookup(m, k), "lookup(%u) = %d, model %d", k,
                  lookup(seg, pool, k), m_lookup(m, k));
    bt_cache_stats st;
    T_OK(bt_cache_stats_get(seg, pool, &st));
    T_EQ(st.keys, m->nent);
    T_EQ(st.free, m->nq);
    uint32_t cached = 0;
    for (uint32_t i = 0; i < m->nq; i++)
        cached += m_haskey(m, (uint32_t)m->q[i]);
    T_EQ(st.cached_free, cached);
    for (uint32_t b = m->first; b < m->hi; b++) {
        bt_cache_key k;
        uint32_t nx;
        T_OK(bt_cache_block_key(seg, (int32_t)b, &k, &nx));
        uint32_t first = UINT32_MAX, cnt = 0;
        for (uint32_t i = 0; i < m->nent; i++)
            if (m->ent[i].block == b) {
                if (first == UINT32_MAX)
                    first = i;
                cnt++;
            }
        T_EQ(nx, cnt ? cnt - 1 : 0);
        if (!cnt) {
            T_EQ(k.len, 0);
            continue;
        }
        uint32_t len;
        const uint8_t *kb = key_of(m->ent[first].key, &len);
        T_EQ(k.len, len);
        T_ASSERT(memcmp(k.key, kb, len) == 0);
        T_EQ(k.ntokens, m->ent[first].ntok);
    }
}

/* Pick n ids among blocks the model holds (with multiplicity <= count). */
static uint32_t pick_held(uint64_t *rs, const struct model *m, uint32_t lo, int32_t *out, uint32_t max)
{
    uint32_t used[BPP] = { 0 }, n = 0, want = t_below(rs, max + 1);
    for (uint32_t tries = 0; n < want && tries < 200; tries++) {
        uint32_t b = m->first + t_below(rs, m->hi - m->first);
        if (used[b - lo] < m->ref[b - lo]) {
            used[b - lo]++;
            out[n++] = (int32_t)b;
        }
    }
    return n;
}

static void differential(uint32_t pool, uint64_t seed, uint32_t steps)
{
    bt_seg *seg = t_seg_new(cfg(2, MK));
    bt_client *cl = cache_owner(seg, pool);
    uint32_t lo = pool * BPP, KS = 40;
    struct model m;
    m_init(&m, lo);
    uint64_t rs = seed;
    int null_ok = lo == 0;
    for (uint32_t step = 0; step < steps; step++) {
        uint32_t op = t_below(&rs, 100);
        int32_t ids[12];
        if (op < 22) {                  /* get_new_blocks */
            uint32_t n = t_below(&rs, 6);
            bt_cache_key rm[MK];
            uint32_t nrm = 0;
            int rc = bt_cache_alloc(cl, pool, n, ids, rm, MK, &nrm);
            if (n > m.nq) {
                T_RC(rc, BT_ENOBLOCKS);
                continue;
            }
            T_OK(rc);
            uint32_t k = 0;
            for (uint32_t i = 0; i < n; i++) {
                int32_t b = m.q[0];
                m_qdel(&m, 0);
                T_EQ(ids[i], b);
                uint32_t keys[MK], nt[MK];
                uint32_t d = m_drop(&m, (uint32_t)b, keys, nt);
                for (uint32_t j = 0; j < d; j++, k++) {
                    T_ASSERT(k < nrm);
                    uint32_t len;
                    const uint8_t *kb = key_of(keys[j], &len);
                    T_EQ(rm[k].block, b);
                    T_EQ(rm[k].len, len);
                    T_ASSERT(memcmp(rm[k].key, kb, len) == 0);
                    T_EQ(rm[k].ntokens, nt[j]);
                }
                m.ref[b - (int32_t)lo] = 1;
            }
            T_EQ(nrm, k);
        } else if (op < 40) {           /* free_blocks */
            uint32_t n = pick_held(&rs, &m, lo, ids, 6);
            if (null_ok && n < 12 && t_below(&rs, 4) == 0)
                ids[n++] = 0;
            int caching = t_below(&rs, 5) != 0;
            T_OK(bt_cache_free(cl, pool, ids, n, caching));
            int32_t first[12], last[12];
            uint32_t nf = 0, nl = 0;
            for (uint32_t i = 0; i < n; i++) {
                if (ids[i] == 0 && null_ok)
                    continue;
                if (--m.ref[ids[i] - (int32_t)lo] == 0) {
                    if (!caching || !m_haskey(&m, (uint32_t)ids[i]))
                        first[nf++] = ids[i];
                    else
                        last[nl++] = ids[i];
                }
            }
            memmove(&m.q[nf], m.q, m.nq * sizeof(int32_t));
            memcpy(m.q, first, nf * sizeof(int32_t));
            m.nq += nf;
            memcpy(&m.q[m.nq], last, nl * sizeof(int32_t));
            m.nq += nl;
        } else if (op < 48) {           /* a bad free: more than held */
            uint32_t b = m.first + t_below(&rs, m.hi - m.first);
            uint32_t n = m.ref[b - lo] + 1;
            for (uint32_t i = 0; i < n && i < 12; i++)
                ids[i] = (int32_t)b;
            if (n <= 12)
                T_RC(bt_cache_free(cl, pool, ids, n, 1), BT_ENOTHELD);
        } else if (op < 60) {           /* touch: hits (keyed blocks) and held ones */
            uint32_t n = t_below(&rs, 5);
            for (uint32_t i = 0; i < n; i++) {
                int32_t hit = m_lookup(&m, t_below(&rs, KS));
                ids[i] = hit ? hit : (int32_t)(m.first + t_below(&rs, m.hi - m.first));
                if (!hit && m.ref[ids[i] - (int32_t)lo] == 0 && t_below(&rs, 2))
                    ids[i] = null_ok ? 0 : ids[i];
            }
            T_OK(bt_cache_touch(cl, pool, ids, n));
            for (uint32_t i = 0; i < n; i++) {
                if (ids[i] == 0 && null_ok)
                    continue;
                uint32_t *r = &m.ref[ids[i] - (int32_t)lo];
                if (*r == 0)
                    m_qdel(&m, (uint32_t)m_qfind(&m, ids[i]));
                (*r)++;
            }
        } else if (op < 64) {           /* unpin */
            uint32_t n = pick_held(&rs, &m, lo, ids, 4);
            T_OK(bt_cache_unpin(cl, pool, ids, n));
            for (uint32_t i = 0; i < n; i++)
                if (--m.ref[ids[i] - (int32_t)lo] == 0)
                    m.q[m.nq++] = ids[i];
        } else if (op < 84) {           /* _insert_block_hash */
            uint32_t b = m.first + t_below(&rs, m.hi - m.first), k = t_below(&rs, KS);
            uint32_t nt = t_below(&rs, 1000);
            int dup = 0;
            for (uint32_t i = 0; i < m.nent; i++)
                dup |= m.ent[i].key == k && m.ent[i].block == b;
            int rc = insert(cl, pool, (int32_t)b, k, nt);
            if (dup) {
                T_EQ(rc, 0);
            } else if (m.nent == MK) {
                T_RC(rc, BT_ENOKEYS);
            } else {
                T_EQ(rc, 1);
                m.ent[m.nent].key = k, m.ent[m.nent].block = b, m.ent[m.nent].ntok = nt;
                m.nent++;
            }
        } else if (op < 92) {           /* _remove_cached_block_hashes */
            uint32_t b = m.first + t_below(&rs, m.hi - m.first);
            bt_cache_key rm[MK];
            uint32_t nrm = 0, keys[MK], nt[MK];
            T_OK(bt_cache_remove(cl, pool, (int32_t)b, rm, MK, &nrm));
            uint32_t d = m_drop(&m, b, keys, nt);
            T_EQ(nrm, d);
            for (uint32_t j = 0; j < d; j++)
                T_EQ(rm[j].ntokens, nt[j]);
        } else if (op < 95) {           /* reset_prefix_cache */
            int rc = bt_cache_reset(cl, pool);
            if (m.nq == m.hi - m.first) {
                T_OK(rc);
                m.nent = 0;
            } else {
                T_RC(rc, BT_EBUSY);
            }
        } else if (op < 97) {           /* set_ref on a held block */
            uint32_t b = m.first + t_below(&rs, m.hi - m.first);
            uint32_t v = 1 + t_below(&rs, 3);
            if (m.ref[b - lo]) {
                T_OK(bt_cache_set_ref(cl, pool, (int32_t)b, v));
                m.ref[b - lo] = v;
            } else {
                T_RC(bt_cache_set_ref(cl, pool, (int32_t)b, v), BT_EINVAL);
            }
        } else {                        /* free everything held (a quiet point) */
            for (uint32_t b = m.first; b < m.hi; b++)
                while (m.ref[b - lo]) {
                    ids[0] = (int32_t)b;
                    T_OK(bt_cache_free(cl, pool, ids, 1, 1));
                    if (--m.ref[b - lo] == 0) {
                        if (!m_haskey(&m, b)) {
                            memmove(&m.q[1], m.q, m.nq * sizeof(int32_t));
                            m.q[0] = (int32_t)b;
                            m.nq++;
                        } else {
                            m.q[m.nq++] = (int32_t)b;
                        }
                    }
                }
        }
        m_compare(seg, pool, &m, lo, KS);
        if (step % 50 == 0)
            T_EQ(check(seg, 0).cache_bad, 0);
    }
    T_EQ(check(seg, BT_CHECK_FROZEN).cache_bad, 0);
    bt_cache_stats st;
    T_OK(bt_cache_stats_get(seg, pool, &st));
    if (getenv("BT_TEST_VERBOSE_CACHE"))
        printf("pool %u: stored %llu evicted %llu queries %llu hits %llu resets %llu\n", pool,
               (unsigned long long)st.stored, (unsigned long long)st.evicted,
               (unsigned long long)st.queries, (unsigned long long)st.hits,
               (unsigned long long)st.resets);
    T_ASSERT(st.stored > steps / 10 && st.evicted > 0);
    T_END(seg, cl);
}

static void test_differential_pool0(void)
{
    for (uint64_t k = 0; k < 6; k++)
        differential(0, t_substream(k), 4000);
}

static void test_differential_pool1(void)
{
    for (uint64_t k = 0; k < 4; k++)
        differential(1, t_substream(100 + k), 4000);
}

/* ---- a SIGKILLed owner -------------------------------------------------------- */

/* The child opens the pool, allocates, caches, then signals and waits to be
 * killed. mid_op: it is killed while "inside" a call (in_op forced to 1, as a
 * process killed in the middle of bt_cache_alloc leaves it), which takes a
 * repair instead of the lock-free release. */
static void owner_dies(int via_check, int mid_op)
{
    bt_seg *seg = t_seg_new_shared(cfg(1, 0));
    int fd[2];
    pid_t pid = t_fork_pipe(fd);
    if (pid == 0) {
        bt_client *cl = t_client(seg);
        int32_t ids[8];
        if (bt_cache_open(cl, 0) || bt_cache_alloc(cl, 0, 8, ids, NULL, 0, NULL) ||
            insert(cl, 0, ids[0], 3, 16) != 1 || bt_cache_free(cl, 0, ids, 2, 1))
            _exit(3);
        uint32_t id = bt_client_id(cl);
        if (mid_op) {                   /* died mid-call: odd seq, in_op set */
            struct bt_cache_hdr *h = (struct bt_cache_hdr *)((uint8_t *)bt_seg_base(seg) +
                ((struct bt_header *)bt_seg_base(seg))->off[BT_R_CACHE]);
            struct bt_cslot *sl = (struct bt_cslot *)((uint8_t *)bt_seg_base(seg) +
                ((struct bt_header *)bt_seg_base(seg))->off[BT_R_CLIENTS]) + (id - 1);
            __atomic_store_n(&sl->in_op, 1u, __ATOMIC_SEQ_CST);
            __atomic_store_n(&h->seq, h->seq | 1u, __ATOMIC_SEQ_CST);
        }
        if (write(fd[1], &id, sizeof(id)) != sizeof(id))
            _exit(4);
        for (;;)
            pause();
    }
    uint32_t id = 0;
    T_EQ(read(fd[0], &id, sizeof(id)), (ssize_t)sizeof(id));
    bt_cache_stats st;
    if (!mid_op) {
        T_OK(bt_cache_stats_get(seg, 0, &st));
        T_EQ(st.owner, id);
        T_EQ(st.in_use, 6);
        T_EQ(st.keys, 1);
    }
    bt_client *nc = t_client(seg);
    T_RC(bt_cache_open(nc, 0), BT_EBUSY);       /* its owner lives */
    kill(pid, SIGKILL);
    int ws;
    T_EQ(waitpid(pid, &ws, 0), pid);
    if (via_check) {
        bt_check_report rep = check(seg, BT_CHECK_REPAIR);
        T_EQ(rep.cache_reset, 1);
        T_EQ(rep.clients_reaped, 1);
    } else {
        bt_check_report rep;
        T_OK(bt_seg_recover_client(seg, id, 1000, &rep));
    }
    T_OK(bt_cache_stats_get(seg, 0, &st));
    T_EQ(st.owner, 0);
    T_EQ(st.free, BPP - 1);
    T_EQ(st.keys, 0);
    T_EQ(st.in_use, 0);
    T_EQ(lookup(seg, 0, 3), 0);
    QUEUE_IS(seg, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23);
    T_OK(bt_cache_open(nc, 0));
    int32_t ids[2];
    T_OK(bt_cache_alloc(nc, 0, 2, ids, NULL, 0, NULL));
    T_EQ(ids[0], 1);
    bt_check_report rep = check(seg, BT_CHECK_FROZEN);
    T_EQ(rep.cache_bad, 0);
    T_END_SHARED(seg, nc);
}

static void test_owner_killed_recover(void) { owner_dies(0, 0); }
static void test_owner_killed_repair(void) { owner_dies(1, 0); }
static void test_owner_killed_mid_op(void) { owner_dies(0, 1); }

/* A dead owner never recovered: the next bt_cache_open takes the pool over. */
static void test_open_takes_dead_owner(void)
{
    bt_seg *seg = t_seg_new_shared(cfg(1, 0));
    pid_t pid = fork();
    T_ASSERT(pid >= 0);
    if (pid == 0) {
        bt_client *cl = t_client(seg);
        int32_t ids[4];
        if (bt_cache_open(cl, 0) || bt_cache_alloc(cl, 0, 4, ids, NULL, 0, NULL))
            _exit(3);
        _exit(0);                       /* no close: the slot stays active, the process is gone */
    }
    t_wait_ok(pid, "owner");
    bt_client *nc = t_client(seg);
    T_OK(bt_cache_open(nc, 0));
    T_EQ(t_free(seg, 0), BPP - 1);
    bt_cache_stats st;
    T_OK(bt_cache_stats_get(seg, 0, &st));
    T_EQ(st.owner, bt_client_id(nc));
    /* the dead client's later recovery leaves the new owner's pool alone */
    int32_t ids[3];
    T_OK(bt_cache_alloc(nc, 0, 3, ids, NULL, 0, NULL));
    bt_check_report rep = check(seg, BT_CHECK_REPAIR);
    T_EQ(rep.clients_reaped, 1);
    T_EQ(rep.cache_reset, 0);
    T_EQ(t_free(seg, 0), BPP - 4);
    T_END_SHARED(seg, nc);
}

/* ---- scribbles ----------------------------------------------------------------- */

static void scribble_round(uint64_t *rs, uint32_t nwrites)
{
    bt_config c = cfg(2, 16);
    bt_seg *seg = t_seg_embedded(&c);
    bt_client *cl = cache_owner(seg, 0);
    T_OK(bt_cache_open(cl, 1));
    int32_t ids[8];
    for (uint32_t p = 0; p < 2; p++) {  /* some state: held, cached-free, keys */
        T_OK(bt_cache_alloc(cl, p, 8, ids, NULL, 0, NULL));
        for (uint32_t i = 0; i < 8; i++)
            T_ASSERT(insert(cl, p, ids[i], i % 5, i) >= 0);
        T_OK(bt_cache_free(cl, p, ids, 4, 1));
    }
    uint8_t *base = bt_seg_base(seg);
    const struct bt_header *h = (const struct bt_header *)base;
    uint64_t lo = h->off[BT_R_CACHE], hi = h->off[BT_R_CBUCKETS] +
                  (uint64_t)2 * buckets_of(&c) * 4;
    for (uint32_t w = 0; w < nwrites; w++) {
        uint64_t at = lo + t_below(rs, (uint32_t)(hi - lo) / 4) * 4;
        if (t_below(rs, 5) == 0)        /* the cache pools' reference counts */
            at = h->off[BT_R_REFCNT] + 4 * (uint64_t)t_below(rs, 2 * BPP);
        uint32_t v;
        switch (t_below(rs, 4)) {
        case 0: v = (uint32_t)t_rand(rs); break;
        case 1: v = t_below(rs, 3 * BPP + 2); break;     /* plausible ids */
        case 2: v = t_below(rs, 20); break;               /* plausible entries */
        default: v = BT_NIL; break;
        }
        memcpy(base + at, &v, 4);
    }
    /* every call: an error or success, never a crash, a hang, a stray write */
    for (uint32_t p = 0; p < 2; p++) {
        bt_cache_key rm[32];
        uint32_t n;
        int32_t q[BPP], got[4];
        (void)bt_cache_alloc(cl, p, 3, got, rm, 32, &n);
        (void)bt_cache_queue(seg, p, q, BPP, &n);
        for (uint32_t k = 0; k < 6; k++) {
            uint32_t len;
            const uint8_t *kb = key_of(k, &len);
            int32_t b;
            (void)bt_cache_lookup(seg, p, kb, len, &b);
            (void)insert(cl, p, (int32_t)(p * BPP + 1 + k), k + 7, 1);
        }
        for (uint32_t b = p * BPP; b < (p + 1) * BPP; b++) {
            bt_cache_key k;
            (void)bt_cache_block_key(seg, (int32_t)b, &k, &n);
            (void)bt_cache_remove(cl, p, (int32_t)b, rm, 32, &n);
        }
        int32_t some[] = { (int32_t)(p * BPP + 2), (int32_t)(p * BPP + 5) };
        (void)bt_cache_touch(cl, p, some, 2);
        (void)bt_cache_free(cl, p, some, 2, 1);
        (void)bt_cache_unpin(cl, p, some, 1);
        (void)bt_cache_reset(cl, p);
        bt_cache_stats st;
        (void)bt_cache_stats_get(seg, p, &st);
    }
    bt_check_report rep;
    (void)bt_seg_check(seg, 0, 0, &rep);
    /* a repair makes both pools verify clean (reset if they were broken) */
    rep = check(seg, BT_CHECK_REPAIR);
    rep = check(seg, 0);
    T_EQ(rep.cache_bad, 0);
    for (uint32_t p = 0; p < 2; p++) {
        bt_cache_stats st;
        T_OK(bt_cache_stats_get(seg, p, &st));
        T_ASSERT(st.free + st.in_use == BPP - (p == 0));
    }
    bt_client_close(cl);
    T_EQ(check(seg, 0).cache_bad, 0);
    bt_seg_close(seg);
}

static void test_scribble(void)
{
    uint64_t rs = t_substream(7);
    uint32_t rounds = getenv("BT_CACHE_SCRIBBLES") ? (uint32_t)atoi(getenv("BT_CACHE_SCRIBBLES")) : 400;
    for (uint32_t r = 0; r < rounds; r++)
        scribble_round(&rs, 1 + t_below(&rs, 6));
}

/* A corrupted queue link is found before anything changes. */
static void test_corrupt_detected(void)
{
    bt_config c = cfg(1, 0);
    bt_seg *seg = t_seg_embedded(&c);
    bt_client *cl = cache_owner(seg, 0);
    uint8_t *base = bt_seg_base(seg);
    const struct bt_header *h = (const struct bt_header *)base;
    struct bt_cblock *cb = (struct bt_cblock *)(base + h->off[BT_R_CBLOCKS]);
    cb[2].next = 1000000;               /* out of range */
    int32_t ids[4];
    T_RC(bt_cache_alloc(cl, 0, 3, ids, NULL, 0, NULL), BT_ECORRUPT);
    T_EQ(t_free(seg, 0), BPP - 1);      /* nothing taken */
    uint32_t n;
    int32_t q[BPP];
    T_RC(bt_cache_queue(seg, 0, q, BPP, &n), BT_ECORRUPT);
    bt_check_report rep = check(seg, 0);
    T_ASSERT(rep.cache_bad > 0);
    rep = check(seg, BT_CHECK_REPAIR);
    T_EQ(rep.cache_reset, 1);
    T_EQ(check(seg, 0).cache_bad, 0);
    T_OK(bt_cache_alloc(cl, 0, 3, ids, NULL, 0, NULL));    /* still the owner */
    T_EQ(ids[2], 3);
    /* a bucket cycle: lookups end (BT_ECORRUPT), never spin */
    for (uint32_t k = 0; k < 16; k++)
        T_EQ(insert(cl, 0, ids[k % 3], k, 0), 1);
    uint32_t *bk = (uint32_t *)(base + h->off[BT_R_CBUCKETS]);
    struct bt_ckey *ke = (struct bt_ckey *)(base + h->off[BT_R_CKEYS]);
    for (uint32_t j = 0; j < buckets_of(&c); j++)
        if (bk[j])
            ke[bk[j] - 1].bucket_next = bk[j];  /* each chain: its head loops */
    uint32_t corrupt = 0;
    for (uint32_t k = 16; k < 64; k++) {       /* misses: some walk a loop */
        uint32_t len;
        const uint8_t *kb = key_of(k, &len);
        int32_t b = -1;
        int rc = bt_cache_lookup(seg, 0, kb, len, &b);
        T_ASSERT(rc == BT_OK || rc == BT_ECORRUPT);
        corrupt += rc == BT_ECORRUPT;
        T_ASSERT(rc || b == 0);
    }
    T_ASSERT(corrupt > 0);
    T_ASSERT(check(seg, 0).cache_bad > 0);
    T_EQ(check(seg, BT_CHECK_REPAIR).cache_reset, 1);
    T_EQ(lookup(seg, 0, 1), 0);
    T_END(seg, cl);
}

/* ---- lock-free readers against a busy owner ----------------------------------- */

/* The owner only ever maps key k to blocks b with b % 5 == k % 5: a reader
 * that sees any other block read a torn state. Stats must add up. */
struct rd { bt_seg *seg; int *stop; uint64_t reads, hits; int bad; };

static void *reader(void *arg)
{
    struct rd *r = arg;
    while (!__atomic_load_n(r->stop, __ATOMIC_ACQUIRE)) {
        for (uint32_t k = 0; k < 30; k++) {
            uint32_t len;
            const uint8_t *kb = key_of(k, &len);
            int32_t b = -1;
            int rc = bt_cache_lookup(r->seg, 0, kb, len, &b);
            if (rc || b < 0 || (b && (uint32_t)b % 5 != k % 5) || b >= (int32_t)BPP) {
                r->bad++;
                fprintf(stderr, "lookup(%u): rc %d block %d\n", k, rc, b);
            }
            r->reads++;
            r->hits += b > 0;
        }
        bt_cache_stats st;
        int src = bt_cache_stats_get(r->seg, 0, &st);
        if (src || st.free + st.in_use != BPP - 1 || st.cached_free > st.free || st.keys > st.key_cap) {
            r->bad++;
            fprintf(stderr, "stats: rc %d free %u in_use %u cached %u keys %u\n", src, st.free,
                    st.in_use, st.cached_free, st.keys);
        }
        int32_t q[BPP];
        uint32_t n;
        uint8_t seen[BPP] = { 0 };
        int qrc = bt_cache_queue(r->seg, 0, q, BPP, &n);
        if (qrc || n > BPP - 1) {
            r->bad++;
            fprintf(stderr, "queue: rc %d n %u\n", qrc, n);
        }
        for (uint32_t i = 0; i < n && i < BPP; i++)
            if (q[i] <= 0 || q[i] >= (int32_t)BPP || seen[q[i]]++) {
                r->bad++;
                fprintf(stderr, "queue[%u] = %d\n", i, q[i]);
            }
    }
    return NULL;
}

static void test_readers_mt(void)
{
    bt_seg *seg = t_seg_new(cfg(1, 32));
    bt_client *cl = cache_owner(seg, 0);
    int stop = 0;
    struct rd r[2] = { { seg, &stop, 0, 0, 0 }, { seg, &stop, 0, 0, 0 } };
    pthread_t th[2];
    for (int i = 0; i < 2; i++)
        T_ASSERT(pthread_create(&th[i], NULL, reader, &r[i]) == 0);
    uint64_t rs = t_substream(55), t_end = t_now_ns() + 1500000000ull;
    int32_t held[BPP];
    uint32_t nheld = 0;
    while (t_now_ns() < t_end) {
        uint32_t op = t_below(&rs, 10);
        if (op < 4 && nheld < BPP - 6) {
            uint32_t n = 1 + t_below(&rs, 5);
            bt_cache_key rm[32];
            uint32_t nrm;
            if (bt_cache_alloc(cl, 0, n, held + nheld, rm, 32, &nrm) == 0)
                nheld += n;
        } else if (op < 7 && nheld) {
            uint32_t n = 1 + t_below(&rs, nheld);
            T_OK(bt_cache_free(cl, 0, held + nheld - n, n, 1));
            nheld -= n;
        } else if (nheld) {
            int32_t b = held[t_below(&rs, nheld)];
            uint32_t k = (uint32_t)b % 5 + 5 * t_below(&rs, 6);
            uint32_t len;
            const uint8_t *kb = key_of(k, &len);
            int ins;
            int rc = bt_cache_insert(cl, 0, b, kb, len, 0, &ins);
            T_ASSERT(rc == 0 || rc == BT_ENOKEYS);
            if (rc == BT_ENOKEYS) {         /* make room: drop a held block's keys */
                bt_cache_key rm[32];
                uint32_t nrm;
                T_OK(bt_cache_remove(cl, 0, b, rm, 32, &nrm));
            }
        }
    }
    __atomic_store_n(&stop, 1, __ATOMIC_RELEASE);
    for (int i = 0; i < 2; i++) {
        pthread_join(th[i], NULL);
        T_EQ(r[i].bad, 0);
        T_ASSERT(r[i].reads > 100 && r[i].hits > 0);
    }
    T_END(seg, cl);
}

int main(int argc, char **argv)
{
    t_init(argc, argv);
    T_RUN(test_config);
    T_RUN(test_queue_order);
    T_RUN(test_map);
    T_RUN(test_refusals);
    T_RUN(test_differential_pool0);
    T_RUN(test_differential_pool1);
    T_RUN(test_owner_killed_recover);
    T_RUN(test_owner_killed_repair);
    T_RUN(test_owner_killed_mid_op);
    T_RUN(test_open_takes_dead_owner);
    T_RUN(test_corrupt_detected);
    T_RUN(test_scribble);
    T_RUN(test_readers_mt);
    return t_done();
}
