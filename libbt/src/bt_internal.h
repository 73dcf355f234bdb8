/*
 * bt_internal.h -- process-local handles and helpers shared by the sources.
 * The geometry (config, offsets, region pointers) is copied out of the header
 * once at attach and never re-read from shared memory: a process that
 * scribbles on the header cannot move another process's regions.
 */
#ifndef BT_INTERNAL_H
#define BT_INTERNAL_H

#include "bt.h"
#include "bt_atomic.h"
#include "bt_layout.h"

struct bt_seg {
    uint8_t          *base;
    uint64_t          size;
    int               unmap;           /* 1: we mmap'd it and munmap on close */
    bt_config         cfg;
    uint64_t          total;           /* block ids: num_pools * blocks_per_pool */
    uint64_t          off[BT_R_COUNT];
    struct bt_header *hdr;
    struct bt_pool   *pools;
    uint32_t         *next;
    uint32_t         *refcnt;
    uint32_t         *owner;
    struct bt_row    *rows;
    int32_t          *table;
    int32_t          *nblocks;
    int64_t          *ntokens;
    struct bt_cslot  *clients;
    uint32_t         *hands;
    struct bt_mirror *mirrors;
    struct bt_synced *synced;
    struct bt_pool   *cpool;
    uint32_t         *cnext;
    int32_t          *chunks;
    uint32_t         *dir;
    struct bt_cache_hdr *cache;        /* [cache_pools] */
    struct bt_cblock *cblocks;         /* [cache_pools * blocks_per_pool], by global id */
    struct bt_ckey   *ckeys;           /* [cache_pools * cache_keys] */
    uint32_t         *cbuckets;        /* [cache_pools * nbuckets] */
    uint32_t          cache_lo;        /* ids below this are cache-pool ids */
    uint32_t          nbuckets;        /* per cache pool, a power of two */
};

struct bt_client {
    bt_seg          *seg;
    uint32_t         id;               /* 1-based slot id */
    int32_t          pid;
    uint64_t         fork_gen;         /* process generation at open */
    struct bt_cslot *slot;
    uint32_t        *hand;
    uint8_t         *mark;             /* scratch bitmap over rows, for bt_step */
};

/* Waiting on a row's seqlock: spin briefly, then yield, and give up after
 * BT_SEQ_WAIT_NS (the writer died or was stopped mid-write). Time-bounded,
 * not spin-bounded: on a loaded machine a writer can be descheduled for
 * longer than any spin count is worth. Returns nonzero when out of time. */
#define BT_SEQ_WAIT_NS (2ull * 1000000000ull)
int bt_seq_backoff(uint32_t spin, uint64_t *t0);

/* proc.c: processes and time (bt_proc_start_time is public, bt.h) */
int      bt_pid_alive(int32_t pid, uint64_t start);  /* start 0: any; can't tell: alive */
uint64_t bt_self_start_time(void);         /* ours, cached per process; 0 unknown */
uint64_t bt_fork_generation(void);         /* bumped in every forked child */
uint64_t bt_now_ns(void);                  /* CLOCK_MONOTONIC */

/* segment.c: layout and binding */
uint32_t bt_cache_keys_of(const bt_config *cfg);   /* cache_keys, 0 resolved */
uint32_t bt_cache_buckets_of(const bt_config *cfg);
int  bt_layout(const bt_config *cfg, uint64_t off[BT_R_COUNT], uint64_t *size);
void bt_seg_bind(bt_seg *seg);         /* region pointers from base + off */

/* alloc.c: Treiber stacks, and pools without the client protocol */
int  bt_stack_pop(struct bt_pool *p, const uint32_t *next, uint32_t lo, uint32_t span,
                  uint32_t n, int32_t *out);
void bt_stack_push(struct bt_pool *p, uint32_t *next, int32_t first, int32_t last, uint32_t count);
int  bt_pop_raw(bt_seg *seg, uint32_t pool, uint32_t n, uint32_t stamp, int32_t *out);
void bt_push_zeroed(bt_seg *seg, const int32_t *ids, uint32_t n);
int  bt_decref_many(bt_seg *seg, const int32_t *ids, uint32_t n);
int  bt_incref_many(bt_seg *seg, const int32_t *ids, uint32_t n);

/* client.c: the recovery protocol around every data-path call */
int  bt_op_begin(bt_client *cl);
static inline void bt_op_end(bt_client *cl)
{
    bt_store_relaxed(&cl->slot->ops, bt_load_relaxed(&cl->slot->ops) + 1);
    bt_store_release(&cl->slot->in_op, 0);
}
/* The slot's row count has one writer, its client (or the recoverer of a
 * dead one): a load and a store, no locked instruction. */
static inline void bt_nrows_add(bt_client *cl, int32_t d)
{
    bt_store_relaxed(&cl->slot->nrows, bt_load_relaxed(&cl->slot->nrows) + (uint32_t)d);
}
int  bt_hand_add(bt_client *cl, const int32_t *ids, uint32_t n);
int  bt_hand_find_all(bt_client *cl, const int32_t *ids, uint32_t n);
void bt_hand_drop(bt_client *cl, uint32_t n);  /* after bt_hand_find_all */

/* rows.c */
int  bt_row_owned(bt_client *cl, uint32_t row, struct bt_row **out);
uint32_t bt_row_nblocks(const bt_seg *seg, uint32_t row);  /* clamped to width */
void bt_row_write_begin(struct bt_row *r);
void bt_row_rewrite_begin(struct bt_row *r);   /* a write that is not an append */
void bt_row_write_end(struct bt_row *r);
void bt_row_wipe(bt_seg *seg, uint32_t row, uint32_t from);
uint32_t bt_row_cut(bt_seg *seg, uint32_t row, uint32_t keep, int32_t *out);  /* dense rows */
int  bt_row_drop(bt_client *cl, uint32_t row);
int  bt_claim_take(bt_client *cl, int32_t hint, uint32_t *cursor, uint32_t *row_out);
void bt_claim_init(bt_client *cl, uint32_t row, uint64_t key, uint32_t flags);
void bt_drop_refs(bt_seg *seg, int32_t *ids, uint32_t n);

static inline int32_t *bt_row_ids(const bt_seg *seg, uint32_t row)
{
    return seg->table + (uint64_t)row * seg->cfg.row_width;
}
static inline int bt_row_paged(const bt_seg *seg, uint32_t row)
{
    return seg->cfg.chunk_size && (bt_load_relaxed(&seg->rows[row].flags) & BT_ROW_PAGED);
}
static inline uint32_t bt_row_cap(const bt_seg *seg, uint32_t row)
{
    return bt_row_paged(seg, row) ? seg->cfg.dir_width * seg->cfg.chunk_size : seg->cfg.row_width;
}
static inline int bt_row_managed(const bt_seg *seg, uint32_t row)
{
    return !(bt_load_relaxed(&seg->rows[row].flags) & BT_ROW_RAW);
}

/* paged.c */
int32_t *bt_entry_ptr(const bt_seg *seg, uint32_t row, uint32_t i);
int  bt_paged_reserve(bt_seg *seg, uint32_t row, uint32_t from, uint32_t to);
void bt_paged_trim(bt_seg *seg, uint32_t row, uint32_t from, uint32_t hfrom);
void bt_paged_swap(bt_seg *seg, uint32_t a, uint32_t b);
void bt_paged_forget(bt_seg *seg, uint32_t row);
int  bt_paged_shrink(bt_seg *seg, uint32_t row, uint32_t keep, int managed);
static inline int32_t bt_entry_get(const bt_seg *seg, uint32_t row, uint32_t i)
{
    const int32_t *p = bt_entry_ptr(seg, row, i);
    return p ? bt_load_relaxed(p) : 0;
}

/* An id that may be a reference counted by the allocator (held in a hand or
 * a MANAGED row): in range, not the null block, not a cache pool's. */
static inline int bt_id_ok(const bt_seg *seg, int32_t id)
{
    return id > 0 && (uint64_t)id < seg->total && (uint32_t)id >= seg->cache_lo;
}
/* The error for an id that is not bt_id_ok: a cache pool's id is BT_EINVAL
 * (a valid block the allocator must not touch), anything else BT_ERANGE. */
static inline int bt_id_err(const bt_seg *seg, int32_t id)
{
    return id > 0 && (uint32_t)id < seg->cache_lo ? BT_EINVAL : BT_ERANGE;
}
/* A pool the Treiber-stack calls may use: BT_ERANGE / BT_EINVAL (cache pool). */
static inline int bt_stack_pool_err(const bt_seg *seg, uint32_t pool)
{
    return pool >= seg->cfg.num_pools ? BT_ERANGE : pool < seg->cfg.cache_pools ? BT_EINVAL : BT_OK;
}

/* cache.c */
void bt_cache_format(bt_seg *seg);                 /* at creation: every pool reset */
void bt_cache_pool_reset(bt_seg *seg, uint32_t pool);
/* Reset and unown the pools client `id` owns (its close, or the recovery of
 * a dead one). */
void bt_cache_release_owner(bt_seg *seg, uint32_t id);
/* check.c's view: problems found in one pool (no writes). */
uint64_t bt_cache_verify(const bt_seg *seg, uint32_t pool, uint8_t *scratch_blocks,
                         uint8_t *scratch_keys);

#endif /* BT_INTERNAL_H */
