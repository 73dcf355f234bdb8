/*
 * fuzz_common.h -- what libbt's libFuzzer harnesses share: reading values
 * out of the input, a small configuration, a populated segment, and an
 * operation runner that decodes the input into libbt calls with arbitrary
 * arguments (every public data-path call, the step, slot mapping, mirrors,
 * checks and recovery).
 *
 * Strict mode (fuzz_ops: a segment nobody scribbles on) also judges results:
 * a call that returns an error changed nothing (bt.h), a success handed out
 * blocks nobody held, and a read-only fsck stays clean, so a wrong count or
 * a block handed out twice is a crash, not just a wrong answer. Lax mode
 * (fuzz_attach: scribbled segments) only asks for memory safety and
 * termination: ASan, UBSan and libFuzzer's -timeout judge.
 *
 * Every loop here is bounded by the input's length or a constant.
 * White-box: includes bt_internal.h to reach hands, seqlocks and the freeze
 * word (as libbt/tests/test_scribble.c does).
 */
#ifndef BT_FUZZ_COMMON_H
#define BT_FUZZ_COMMON_H

#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "bt.h"
#include "bt_internal.h"

#define FZ_CLIENTS 3
#define FZ_BUF     64          /* caller buffers: counts are capped to this */
#define FZ_MAX_OPS 256

typedef struct fz_in {
    const uint8_t *p;
    size_t n;
} fz_in;

static inline uint8_t fz_u8(fz_in *in)
{
    if (!in->n)
        return 0;
    in->n--;
    return *in->p++;
}

static inline uint32_t fz_u32(fz_in *in)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++)
        v |= (uint32_t)fz_u8(in) << (8 * i);
    return v;
}

static inline uint32_t fz_below(fz_in *in, uint32_t n)
{
    if (n <= 1)
        return 0;
    uint32_t v = n > 256 ? fz_u8(in) | (uint32_t)fz_u8(in) << 8 : fz_u8(in);
    return v % n;
}

/* An argument that means something below `lim`: mostly a plausible value,
 * sometimes a boundary (lim - 1, lim, lim + 1, 0, -1, INT32_MIN/MAX),
 * sometimes any 32 bits. */
static inline uint32_t fz_arg(fz_in *in, uint32_t lim)
{
    uint8_t k = fz_u8(in);
    if (k < 192)
        return fz_below(in, lim + 1);
    static const uint32_t edge[] = { 0, 1, 0x7fffffffu, 0x80000000u, 0xffffffffu, 0xfffffffeu };
    if (k < 224) {
        uint32_t e = k & 7;
        return e == 0 ? lim - 1 : e == 1 ? lim : e == 2 ? lim + 1 : edge[e - 2];
    }
    return fz_u32(in);
}

/* A count for a caller buffer of FZ_BUF entries. */
static inline uint32_t fz_count(fz_in *in)
{
    uint8_t k = fz_u8(in);
    return k < 200 ? k % 9 : k % (FZ_BUF + 1);
}

/* A small configuration (a few KiB), every field in its valid range unless
 * the input says otherwise: then bt_config_check / bt_seg_create_at must
 * refuse it (or it is valid, and small enough, and used). */
static inline void fz_config(fz_in *in, bt_config *c)
{
    memset(c, 0, sizeof(*c));
    c->block_size = 1u << fz_below(in, 5);
    c->kernel_block_size = fz_u8(in) & 1 ? c->block_size >> fz_below(in, 3) : 0;
    c->num_pools = 1 + fz_below(in, 3);
    c->blocks_per_pool = 2 + fz_below(in, 40);
    c->num_rows = 1 + fz_below(in, 8);
    c->row_width = 1 + fz_below(in, 8);
    c->max_clients = 1 + fz_below(in, 4);
    c->hand_size = 1 + fz_below(in, 16);
    c->max_mirrors = fz_below(in, 3);
    c->chunk_size = fz_below(in, 5);
    if (c->chunk_size) {
        c->num_chunks = 1 + fz_below(in, 8);
        c->dir_width = 1 + fz_below(in, 5);
    }
    if (fz_u8(in) & 1)                  /* cache pools: vLLM's BlockPool (bt_cache_*) */
        c->cache_pools = fz_below(in, c->num_pools + 1), c->cache_keys = fz_below(in, 24);
    uint8_t k = fz_u8(in);
    if (k == 0xa5 && c->chunk_size) {   /* paged rows of up to 2^30 entries in ~1 MiB */
        c->chunk_size = 4096;
        c->dir_width = 1u << 18;
        c->num_rows = 1 + fz_below(in, 2);
        c->num_chunks = 1 + fz_below(in, 4);
    }
    if (k == 0x5a) {                    /* one field anything at all */
        uint32_t *f = (uint32_t *)c;
        f[fz_below(in, sizeof(*c) / 4)] = fz_u32(in);
    }
}

/* ---- the context ------------------------------------------------------------ */
typedef struct fz_ctx {
    bt_seg    *seg;
    bt_config  cfg;
    uint64_t   total;
    bt_client *cl[FZ_CLIENTS];
    int        strict;
    uint32_t   wait_ms;                 /* for checks and recovery */
} fz_ctx;

#define FZ_FAIL(...) do { \
    fprintf(stderr, "fuzz oracle: " __VA_ARGS__); \
    fprintf(stderr, "\n"); \
    abort(); \
} while (0)

static inline uint32_t fz_row_cap(const fz_ctx *z)
{
    uint32_t p = z->cfg.chunk_size * z->cfg.dir_width;
    return p > z->cfg.row_width ? p : z->cfg.row_width;
}

/* Hot words a scribbler may set make calls wait out their time bounds
 * (freeze: 5 s, a row's odd seqlock: 2 s): bounded, tested elsewhere
 * (test_client, test_rows), and too slow to fuzz. Cleared in lax mode. */
static inline void fz_unstick(fz_ctx *z)
{
    bt_seg *s = z->seg;
    bt_store_relaxed(&s->hdr->freeze, 0ull);
    for (uint32_t r = 0; r < s->cfg.num_rows; r++)
        bt_store_relaxed(&s->rows[r].seq, bt_load_relaxed(&s->rows[r].seq) & ~1u);
    for (uint32_t m = 0; m < s->cfg.max_mirrors; m++)
        bt_store_relaxed(&s->mirrors[m].lock, 0u);
}

/* ---- snapshots: "a call that returns an error has changed nothing" -------- */
typedef struct fz_snap {
    uint32_t free[4], chunks;
    uint32_t ref[512], own[512];
    uint32_t hand_count[FZ_CLIENTS], nrows[FZ_CLIENTS], hand[FZ_CLIENTS][16];
    bt_row_info ri[8];
    int32_t  ent[8][64];
} fz_snap;

static int fz_cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* Everything a data-path call may change, as values (a hand is a multiset:
 * sorted; the row cursor and op counters are not state). Sizes fit
 * fz_config's ranges; strict mode only runs on such configs. */
static inline void fz_snap_take(const fz_ctx *z, fz_snap *s)
{
    memset(s, 0, sizeof(*s));
    for (uint32_t p = 0; p < z->cfg.num_pools && p < 4; p++)
        bt_pool_free_count(z->seg, p, &s->free[p]);
    bt_chunks_free(z->seg, &s->chunks);
    for (uint64_t b = 0; b < z->total && b < 512; b++)
        bt_block_get(z->seg, (int32_t)b, &s->ref[b], &s->own[b]);
    for (int c = 0; c < FZ_CLIENTS; c++) {
        if (!z->cl[c])
            continue;
        bt_client_slot_info si;
        bt_client_slot_get(z->seg, bt_client_id(z->cl[c]), &si);
        s->hand_count[c] = si.hand_count;
        s->nrows[c] = si.rows;
        const uint32_t *h = z->cl[c]->hand;
        for (uint32_t i = 0; i < si.hand_count && i < 16; i++)
            s->hand[c][i] = h[i];
        qsort(s->hand[c], si.hand_count < 16 ? si.hand_count : 16, 4, fz_cmp_u32);
    }
    for (uint32_t r = 0; r < z->cfg.num_rows && r < 8; r++)
        bt_row_read(z->seg, r, s->ent[r], 64, &s->ri[r]);
}

static inline const char *fz_snap_diff(const fz_ctx *z, const fz_snap *a, const fz_snap *b)
{
    if (memcmp(a->free, b->free, sizeof(a->free)))
        return "a pool's free count";
    if (a->chunks != b->chunks)
        return "the free chunk count";
    if (memcmp(a->ref, b->ref, sizeof(a->ref)) || memcmp(a->own, b->own, sizeof(a->own)))
        return "a block's reference count or owner";
    if (memcmp(a->hand_count, b->hand_count, sizeof(a->hand_count)) ||
        memcmp(a->nrows, b->nrows, sizeof(a->nrows)) || memcmp(a->hand, b->hand, sizeof(a->hand)))
        return "a client's hand or row count";
    for (int r = 0; r < 8; r++) {
        const bt_row_info *x = &a->ri[r], *y = &b->ri[r];
        if (x->owner != y->owner || x->num_blocks != y->num_blocks || x->num_tokens != y->num_tokens ||
            (x->owner && (x->flags != y->flags || x->key != y->key || x->generation != y->generation)))
            return "a row's owner, count, tokens, flags, key or generation";
        if (memcmp(a->ent[r], b->ent[r], sizeof(a->ent[r])))
            return "a row's entries";
    }
    return NULL;
}

/* A read-only check of a quiet, unscribbled segment finds nothing wrong. */
static inline void fz_check_clean(fz_ctx *z, const char *when)
{
    bt_check_report rep;
    int rc = bt_seg_check(z->seg, 0, 0, &rep);
    if (rc || rep.leaked || rep.double_free || rep.refcnt_fixed || rep.rows_fixed ||
        rep.bad_entries || rep.chunks_leaked || rep.cache_bad)
        FZ_FAIL("%s: check rc %d leaked %" PRIu64 " double_free %" PRIu64 " refcnt_fixed %"
                PRIu64 " rows_fixed %" PRIu64 " bad_entries %" PRIu64 " chunks_leaked %" PRIu64,
                when, rc, rep.leaked, rep.double_free, rep.refcnt_fixed, rep.rows_fixed,
                rep.bad_entries, rep.chunks_leaked);
    uint64_t fr = 0;
    for (uint32_t p = 0; p < z->cfg.num_pools; p++) {
        uint32_t f;
        bt_pool_free_count(z->seg, p, &f);
        fr += f;
    }
    if (rep.blocks_free != fr || rep.blocks_free + rep.blocks_held != z->total - 1)
        FZ_FAIL("%s: free %" PRIu64 " (pools say %" PRIu64 ") + held %" PRIu64 " != %" PRIu64,
                when, rep.blocks_free, fr, rep.blocks_held, z->total - 1);
}

/* Fresh ids from a successful allocation: distinct, valid, count 1, ours. */
static inline void fz_fresh(fz_ctx *z, const int32_t *ids, uint32_t n, uint32_t stamp,
                            const char *what)
{
    for (uint32_t i = 0; i < n; i++) {
        uint32_t ref, own;
        if (ids[i] <= 0 || (uint64_t)ids[i] >= z->total)
            FZ_FAIL("%s handed out id %d", what, ids[i]);
        bt_block_get(z->seg, ids[i], &ref, &own);
        if (ref != 1 || own != stamp)
            FZ_FAIL("%s handed out block %d with count %u owner %u", what, ids[i], ref, own);
        for (uint32_t j = 0; j < i; j++)
            if (ids[j] == ids[i])
                FZ_FAIL("%s handed out block %d twice", what, ids[i]);
    }
}

/* ---- ids and rows as a caller might pass them -------------------------------- */
static inline int32_t fz_id(fz_ctx *z, fz_in *in, int c)
{
    uint8_t k = fz_u8(in);
    bt_client *cl = z->cl[c];
    if (k < 96 && cl) {                 /* one we hold (strict: sane hands only) */
        uint32_t hc = bt_load_relaxed(&cl->slot->hand_count);
        if (hc && hc <= z->cfg.hand_size)
            return (int32_t)bt_load_relaxed(&cl->hand[fz_below(in, hc)]);
    }
    if (k < 160) {                      /* one some row holds */
        uint32_t r = fz_below(in, z->cfg.num_rows);
        int32_t nb = bt_load_relaxed(&z->seg->nblocks[r]);
        if (nb > 0 && !bt_row_paged(z->seg, r))
            return bt_load_relaxed(&bt_row_ids(z->seg, r)[fz_below(in, (uint32_t)nb > z->cfg.row_width ? z->cfg.row_width : (uint32_t)nb)]);
    }
    return (int32_t)fz_arg(in, (uint32_t)z->total);
}

static inline void fz_ids(fz_ctx *z, fz_in *in, int c, int32_t *ids, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        ids[i] = fz_id(z, in, c);
}

static inline uint32_t fz_row(fz_ctx *z, fz_in *in)
{
    return fz_arg(in, z->cfg.num_rows);
}

/* ---- the operations ----------------------------------------------------------------- */
enum {
    OP_OPEN, OP_CLOSE, OP_ALLOC, OP_RELEASE, OP_SHARE, OP_CLAIM, OP_CLAIM_MANY, OP_ROW_RELEASE,
    OP_APPEND, OP_APPEND_SHARED, OP_ALLOC_APPEND, OP_SET, OP_TRUNCATE, OP_SET_BLOCK, OP_PUNCH,
    OP_TOKENS, OP_MOVE, OP_SWAP, OP_STEP, OP_READ, OP_SLOTS_ROW, OP_SLOTS_REQ, OP_SLOTS_QSL,
    OP_POOL_POP, OP_POOL_PUSH, OP_INFO, OP_CHECK, OP_RECOVER, OP_MIRROR, OP_STAGE, OP_CACHE,
    OP_NOPS
};

/* Calls whose error must leave everything as it was (bt.h). */
static inline int fz_atomic_op(int op)
{
    return op >= OP_ALLOC && op <= OP_SWAP;
}

static inline void fz_slot_params(fz_in *in, bt_slot_params *p)
{
    uint8_t k = fz_u8(in);
    p->block_size = k & 1 ? fz_arg(in, 64) : 0;
    p->cp_world = k & 2 ? fz_arg(in, 4) : 0;
    p->cp_rank = k & 2 ? fz_arg(in, 4) : 0;
    p->cp_interleave = k & 4 ? fz_arg(in, 8) : 0;
}

/* One mirror call, arguments from the input. */
static inline int fz_mirror(fz_ctx *z, fz_in *in)
{
    bt_seg *s = z->seg;
    uint32_t idx = fz_arg(in, z->cfg.max_mirrors);
    bt_mirror_desc d;
    bt_mirror_sync rec;
    memset(&d, 0, sizeof(d));
    memset(&rec, 0, sizeof(rec));
    switch (fz_u8(in) % 8) {
    case 0: return bt_mirror_claim(s, &idx);
    case 1:
        d.alloc_size = fz_u32(in);
        d.table_off = fz_u32(in) & 0xfff;
        d.counts_off = fz_u32(in) & 0xfffff;
        return bt_mirror_publish(s, idx, &d);
    case 2: return bt_mirror_retire(s, idx);
    case 3: return bt_mirror_get(s, idx, &d);
    case 4: return bt_mirror_invalidate(s, idx);
    case 5: return bt_mirror_sync_done(s, idx, &rec);
    case 6: return bt_mirror_unlock(s, idx);
    default: return bt_mirror_sync_get(s, idx, &rec);
    }
}

/* One bt_cache_* call with arbitrary arguments; ids mostly of the pool.
 * Strict mode: a successful alloc hands out fresh blocks. */
static inline int fz_cache(fz_ctx *z, fz_in *in, bt_client *cl, uint32_t pool, uint32_t n)
{
    bt_seg *s = z->seg;
    int32_t ids[FZ_BUF];
    uint8_t keys[FZ_BUF * 8];
    uint32_t nt[FZ_BUF], u = 0, bpp = z->cfg.blocks_per_pool;
    bt_cache_key rm[FZ_BUF];
    bt_cache_stats st;
    int ins, rc;
    for (uint32_t i = 0; i < FZ_BUF; i++) {
        ids[i] = fz_u8(in) < 224 ? (int32_t)(pool * bpp + fz_below(in, bpp)) : (int32_t)fz_arg(in, (uint32_t)z->total);
        nt[i] = fz_u8(in);
    }
    for (uint32_t i = 0; i < sizeof(keys); i++)
        keys[i] = (uint8_t)(fz_below(in, 4));   /* few distinct keys: collisions */
    uint32_t len = 1 + fz_below(in, 8), cap = fz_below(in, FZ_BUF + 1);
    if (!cl)
        return 0;
    uint32_t op = fz_below(in, 16);
    if (z->cfg.cache_pools && fz_u8(in) < 200) {    /* mostly a cache pool we own */
        pool = fz_below(in, z->cfg.cache_pools);
        for (uint32_t i = 0; i < FZ_BUF; i++)
            ids[i] = (int32_t)(pool * bpp + (uint32_t)ids[i] % bpp);
        if (op >= 2 && op != 9 && op != 10 && op != 11 && op != 14 && op != 15)
            bt_cache_open(cl, pool);
        if ((op == 4 || op == 5 || op == 13) && fz_u8(in) < 200) {   /* blocks it holds */
            int32_t held[FZ_BUF];
            uint32_t nh = 0;
            for (uint32_t b = pool * bpp; b < (pool + 1) * bpp && nh < FZ_BUF; b++)
                if (b && bt_load_relaxed(&s->refcnt[b]))
                    held[nh++] = (int32_t)b;
            for (uint32_t i = 0; i < FZ_BUF && nh; i++)
                ids[i] = held[fz_below(in, nh)];
        }
    }
    switch (op) {
    case 0: return bt_cache_open(cl, pool);
    case 1: return bt_cache_close(cl, pool);
    case 2:
        rc = bt_cache_alloc(cl, pool, n, ids, rm, cap, &u);
        if (rc == 0 && z->strict)
            fz_fresh(z, ids, n, bt_client_id(cl), "bt_cache_alloc");
        return rc;
    case 3: return bt_cache_touch(cl, pool, ids, n);
    case 4: return bt_cache_free(cl, pool, ids, n, fz_u8(in) & 1);
    case 5: return bt_cache_unpin(cl, pool, ids, n);
    case 6: return bt_cache_insert(cl, pool, ids[0], keys, len, nt[0], &ins);
    case 7: return bt_cache_insert_many(cl, pool, ids, n, keys, len, fz_u8(in) & 1 ? nt : NULL, &u);
    case 8: return bt_cache_remove(cl, pool, ids[0], rm, cap, &u);
    case 9: return bt_cache_lookup(s, pool, keys, len, ids);
    case 10: return bt_cache_lookup_many(s, pool, keys, n, len, ids, &u);
    case 11: return bt_cache_block_key(s, ids[0], rm, &u);
    case 12: return bt_cache_reset(cl, pool);
    case 13: return bt_cache_set_ref(cl, pool, ids[0], fz_below(in, 4));
    case 14: return bt_cache_stats_get(s, pool, &st);
    default: return bt_cache_queue(s, pool, ids, cap, &u);
    }
}

static inline int fz_stage(fz_ctx *z, fz_in *in)
{
    static int64_t idx_out[8 * 80];
    static int32_t val_out[8 * 80];
    uint64_t n = 0, need = (uint64_t)z->cfg.num_rows * (z->cfg.row_width + 1);
    uint32_t dirty = 0;
    uint64_t cap = fz_u8(in) & 1 ? need : fz_below(in, (uint32_t)need + 2);
    if (cap > sizeof(val_out) / sizeof(val_out[0]))
        cap = sizeof(val_out) / sizeof(val_out[0]);
    bt_mirror_sync last;
    int flags = fz_u8(in) & 1 ? BT_STAGE_KEEP_LOCK : 0;
    int rc = bt_mirror_stage_ex(z->seg, fz_arg(in, z->cfg.max_mirrors), fz_arg(in, z->cfg.num_rows),
                                flags, idx_out, val_out, cap, &n, &dirty, &last);
    if (rc == 0 && n > cap)
        FZ_FAIL("bt_mirror_stage wrote %" PRIu64 " pairs into %" PRIu64, n, cap);
    return rc;
}

/* Run up to max_ops operations decoded from the input. */
static inline void fz_run(fz_ctx *z, fz_in *in, uint32_t max_ops)
{
    bt_seg *s = z->seg;
    static fz_snap before, after;
    int32_t ids[FZ_BUF], got[FZ_BUF * 2];
    int64_t pos[FZ_BUF], slots[FZ_BUF * 2];
    uint64_t keys[FZ_BUF];
    uint32_t rows[FZ_BUF], nn[FZ_BUF], frows[FZ_BUF], arows[FZ_BUF], u;
    bt_row_info ri;
    bt_check_report rep;
    bt_slot_params sp;
    for (uint32_t k = 0; k < max_ops && in->n; k++) {
        int op = fz_u8(in) % OP_NOPS, c = (int)fz_below(in, FZ_CLIENTS);
        bt_client *cl = z->cl[c];
        if (op != OP_OPEN && op > OP_CLOSE && op <= OP_STEP && !cl)
            op = OP_OPEN;
        int snap = z->strict && fz_atomic_op(op);
        if (snap)
            fz_snap_take(z, &before);
        uint32_t n = fz_count(in), row = fz_row(z, in), pool = fz_arg(in, z->cfg.num_pools);
        uint32_t stamp = cl ? bt_client_id(cl) : 0;
        int rc = 0;
        switch (op) {
        case OP_OPEN:
            if (!z->cl[c])
                rc = bt_client_open(s, &z->cl[c]);
            if (rc)
                z->cl[c] = NULL;
            break;
        case OP_CLOSE:
            bt_client_close(cl);
            z->cl[c] = NULL;
            break;
        case OP_ALLOC:
            rc = bt_blocks_alloc(cl, pool, n, ids);
            if (!rc && z->strict)
                fz_fresh(z, ids, n, stamp, "bt_blocks_alloc");
            break;
        case OP_RELEASE: fz_ids(z, in, c, ids, n); rc = bt_blocks_release(cl, ids, n); break;
        case OP_SHARE: fz_ids(z, in, c, ids, n); rc = bt_blocks_share(cl, ids, n); break;
        case OP_CLAIM: {
            int32_t hint = fz_u8(in) & 1 ? -1 : (int32_t)row;
            rc = bt_row_claim(cl, fz_u32(in), hint, fz_arg(in, 3), &u);
            break;
        }
        case OP_CLAIM_MANY:
            for (uint32_t i = 0; i < n; i++)
                keys[i] = fz_u32(in);
            rc = bt_row_claim_many(cl, keys, n, fz_arg(in, 3), rows);
            break;
        case OP_ROW_RELEASE: rc = bt_row_release(cl, row); break;
        case OP_APPEND: fz_ids(z, in, c, ids, n); rc = bt_row_append(cl, row, ids, n); break;
        case OP_APPEND_SHARED: fz_ids(z, in, c, ids, n); rc = bt_row_append_shared(cl, row, ids, n); break;
        case OP_ALLOC_APPEND: {
            /* with no output buffer any count is the library's business */
            uint32_t m = fz_u8(in) & 1 ? fz_arg(in, fz_row_cap(z)) : n;
            int32_t *out = m <= FZ_BUF && (fz_u8(in) & 1) ? ids : NULL;
            rc = bt_row_alloc_append(cl, row, pool, m, out);
            if (!rc && z->strict && out)
                fz_fresh(z, ids, m, stamp, "bt_row_alloc_append");
            break;
        }
        case OP_SET: fz_ids(z, in, c, ids, n); rc = bt_row_set(cl, row, ids, n); break;
        case OP_TRUNCATE: rc = bt_row_truncate(cl, row, fz_arg(in, fz_row_cap(z))); break;
        case OP_SET_BLOCK: rc = bt_row_set_block(cl, row, fz_arg(in, fz_row_cap(z)), fz_u8(in) & 1 ? 0 : fz_id(z, in, c)); break;
        case OP_PUNCH: rc = bt_row_punch(cl, row, fz_arg(in, fz_row_cap(z)), fz_arg(in, fz_row_cap(z))); break;
        case OP_TOKENS: rc = bt_row_set_tokens(cl, row, (int64_t)(int32_t)fz_u32(in)); break;
        case OP_MOVE: rc = bt_row_move(cl, row, fz_row(z, in)); break;
        case OP_SWAP: rc = bt_row_swap(cl, row, fz_row(z, in)); break;
        case OP_STEP: {
            bt_step_args a;
            memset(&a, 0, sizeof(a));
            a.pool = pool;
            a.n_free = fz_below(in, 4);
            a.n_rows = fz_below(in, 5);
            a.n_arrive = fz_below(in, 4);
            for (uint32_t i = 0; i < 4; i++) {
                frows[i] = fz_row(z, in);
                rows[i] = fz_row(z, in);
                nn[i] = fz_u8(in) & 1 ? fz_arg(in, 4) : fz_below(in, 3);
                keys[i] = fz_u32(in);
                arows[i + 8] = fz_u8(in) & 1 ? fz_arg(in, z->cfg.row_width) : fz_below(in, 3);
            }
            a.free_rows = frows;
            a.rows = rows;
            a.n_new = nn;
            a.arrive_keys = keys;
            a.arrive_n = arows + 8;
            a.arrive_rows = arows;
            a.ids_out = got;
            a.ids_cap = fz_below(in, 2 * FZ_BUF + 1);
            snap = z->strict && a.n_free == 0;  /* else the releases stand (bt.h) */
            if (snap)
                fz_snap_take(z, &before);
            rc = bt_step_ex(cl, &a);
            if (!rc && z->strict)
                fz_fresh(z, got, (uint32_t)a.ids_total, stamp, "bt_step_ex");
            break;
        }
        case OP_READ: rc = bt_row_read(s, row, got, fz_below(in, FZ_BUF * 2 + 1), &ri); break;
        case OP_SLOTS_ROW:
            fz_slot_params(in, &sp);
            rc = bt_slots_row(s, &sp, row, (int64_t)(int32_t)fz_u32(in), n, slots);
            break;
        case OP_SLOTS_REQ:
            fz_slot_params(in, &sp);
            for (uint32_t i = 0; i < n; i++) {
                got[i] = (int32_t)fz_row(z, in);
                pos[i] = (int64_t)(int32_t)fz_u32(in) >> fz_below(in, 24);
            }
            rc = bt_slots_req(s, &sp, got, pos, n, slots);
            break;
        case OP_SLOTS_QSL: {
            int32_t qsl[9];
            uint32_t nr = fz_below(in, 8), out_len = fz_below(in, FZ_BUF * 2 + 1);
            qsl[0] = fz_u8(in) == 7 ? 1 : 0;
            for (uint32_t i = 1; i <= nr; i++)   /* ascending, past FZ_BUF now and then */
                qsl[i] = qsl[i - 1] + (int32_t)fz_below(in, fz_u8(in) == 3 ? 200 : 9);
            if (qsl[nr] > FZ_BUF)           /* positions has FZ_BUF entries: C cannot know */
                break;
            for (uint32_t i = 0; i < FZ_BUF; i++)
                pos[i] = (int64_t)fz_below(in, 64) - 4;
            for (uint32_t i = 0; i < nr; i++)
                got[i] = (int32_t)fz_row(z, in);
            fz_slot_params(in, &sp);
            rc = bt_slots_qsl(s, &sp, fz_u8(in) & 1 ? got : NULL, qsl, nr, pos, slots, out_len);
            break;
        }
        case OP_POOL_POP:
            /* strict: popped and pushed back at once (anyone may share a
             * popped block, which a later push would then refuse) */
            rc = bt_pool_pop(s, pool, n, fz_u32(in), ids);
            if (!rc && z->strict) {
                uint32_t o;
                bt_block_get(s, n ? ids[0] : 1, &u, &o);
                fz_fresh(z, ids, n, n ? o : 0, "bt_pool_pop");
                if ((rc = bt_pool_push(s, ids, n)))
                    FZ_FAIL("bt_pool_push of just-popped blocks returned %s", bt_errname(rc));
            }
            break;
        case OP_POOL_PUSH:
            if (!z->strict) {           /* any ids: a scribbler's push */
                fz_ids(z, in, c, ids, n);
                rc = bt_pool_push(s, ids, n);
            }
            break;
        case OP_INFO: {
            bt_client_slot_info si;
            uint32_t r2, o2;
            bt_seg_info info;
            bt_pool_free_count(s, pool, &u);
            bt_chunks_free(s, &u);
            bt_block_get(s, fz_id(z, in, c), &r2, &o2);
            bt_client_slot_get(s, fz_arg(in, z->cfg.max_clients), &si);
            bt_seg_info_get(s, &info);
            break;
        }
        case OP_CHECK: {
            int flags = fz_u8(in) % 4;
            rc = bt_seg_check(s, flags, z->wait_ms, &rep);
            if (z->strict && !rc &&
                (rep.leaked || rep.double_free || rep.refcnt_fixed || rep.rows_fixed || rep.bad_entries))
                FZ_FAIL("bt_seg_check(flags %d) on a sane segment found leaked %" PRIu64
                        " double_free %" PRIu64 " refcnt_fixed %" PRIu64, flags, rep.leaked,
                        rep.double_free, rep.refcnt_fixed);
            break;
        }
        case OP_RECOVER:
            /* a live client's slot: recovery refuses or reaps only the dead */
            rc = bt_seg_recover_client(s, fz_arg(in, z->cfg.max_clients), z->wait_ms, &rep);
            break;
        case OP_MIRROR: rc = fz_mirror(z, in); break;
        case OP_STAGE: rc = fz_stage(z, in); break;
        case OP_CACHE: rc = fz_cache(z, in, cl, pool, n); break;
        }
        if (snap && rc < 0) {
            fz_snap_take(z, &after);
            const char *d = fz_snap_diff(z, &before, &after);
            if (d)
                FZ_FAIL("op %d (client %d, row %u, n %u, pool %u) returned %s and changed %s",
                        op, c, row, n, pool, bt_errname(rc), d);
        }
        if (z->strict && k % 16 == 15)
            fz_check_clean(z, "after 16 operations");
    }
}

/* Close the clients; in strict mode everything must then be free again. */
static inline void fz_finish(fz_ctx *z)
{
    if (z->strict)
        fz_check_clean(z, "at the end");
    for (int c = 0; c < FZ_CLIENTS; c++) {
        bt_client_close(z->cl[c]);
        z->cl[c] = NULL;
    }
    if (!z->strict)
        return;
    uint64_t fr = 0;
    for (uint32_t p = 0; p < z->cfg.num_pools; p++) {
        uint32_t f;
        bt_pool_free_count(z->seg, p, &f);
        fr += f;
    }
    if (fr != z->total - 1)
        FZ_FAIL("all clients closed: %" PRIu64 " of %" PRIu64 " blocks free", fr, z->total - 1);
    uint32_t ch;
    bt_chunks_free(z->seg, &ch);
    if (ch != z->cfg.num_chunks)
        FZ_FAIL("all clients closed: %u of %u chunks free", ch, z->cfg.num_chunks);
    for (uint32_t r = 0; r < z->cfg.num_rows; r++) {
        bt_row_info ri;
        if (bt_row_read(z->seg, r, NULL, 0, &ri) || ri.owner || ri.num_blocks)
            FZ_FAIL("all clients closed: row %u still owned by %u with %u blocks", r, ri.owner,
                    ri.num_blocks);
    }
}

/* A segment in use (what test_scribble's make_pristine builds, sized to any
 * config): clients with dense, raw and paged rows, shared and loose blocks.
 * Results are not needed: whatever the config allows. */
static inline void fz_populate(fz_ctx *z)
{
    bt_seg *s = z->seg;
    bt_client *a = NULL, *b = NULL;
    uint32_t r;
    int32_t x[4] = { 0 }, y[4] = { 0 };
    if (bt_client_open(s, &a))
        return;
    bt_client_open(s, &b);
    z->cl[0] = a;
    z->cl[1] = b;
    uint32_t tp = z->cfg.cache_pools < z->cfg.num_pools ? z->cfg.cache_pools : 0;   /* a Treiber pool */
    if (!bt_row_claim(a, 1, -1, BT_ROW_MANAGED, &r))
        bt_row_alloc_append(a, r, tp, 2, x);
    if (b && !bt_row_claim(b, 2, -1, BT_ROW_MANAGED, &r)) {
        bt_row_append_shared(b, r, x, 1);
        bt_row_alloc_append(b, r, z->cfg.num_pools - 1, 1, NULL);
    }
    if (b && !bt_row_claim(b, 3, -1, BT_ROW_RAW, &r))
        bt_row_append(b, r, x, 2);
    if (!bt_blocks_alloc(a, tp, 2, y) && b)
        bt_blocks_share(b, y, 1);
    if (z->cfg.cache_pools && !bt_cache_open(b ? b : a, 0)) {   /* held, cached-free, keys */
        int32_t c[3];
        uint8_t key[4] = { 1, 2, 3, 4 };
        if (!bt_cache_alloc(b ? b : a, 0, 3, c, NULL, 0, NULL)) {
            bt_cache_insert(b ? b : a, 0, c[0], key, 4, 16, NULL);
            bt_cache_insert(b ? b : a, 0, c[1], key, 3, 16, NULL);
            bt_cache_free(b ? b : a, 0, c, 2, 1);
        }
    }
    if (z->cfg.chunk_size && !bt_row_claim(a, 4, -1, BT_ROW_PAGED, &r)) {
        bt_row_alloc_append(a, r, tp, 3, NULL);
        bt_row_punch(a, r, 1, 2);
        bt_row_set_block(a, r, z->cfg.chunk_size * z->cfg.dir_width - 1, y[1]);
    }
    if (z->cfg.max_mirrors) {
        uint32_t m;
        bt_mirror_desc d;
        memset(&d, 0, sizeof(d));
        d.alloc_size = 1 << 20;
        if (!bt_mirror_claim(s, &m))
            bt_mirror_publish(s, m, &d);
    }
}

#endif /* BT_FUZZ_COMMON_H */
