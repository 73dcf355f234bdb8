/*
 * bt_internal.h -- process-local handles and helpers shared by the sources.
 * The geometry (config, offsets, region pointers) is copied out of the header
 * once at attach and never re-read from shared memory: a process that
 * scribbles on the header cannot move another process's regions.
 *
 * The layers, bottom up. A file calls into its own layer and the layers
 * below it, never above; the sections of this header follow them.
 *
 *   base     proc.c      processes (start times, liveness), the clock,
 *                        bounded waits; bt_atomic.h, bt_layout.h
 *   pool     alloc.c     Treiber stacks, reference counts, the raw pool API
 *   clients  client.c    slots, the op protocol every data-path call runs
 *                        in (and the fork generation it checks), the hand
 *                        of loose references, the magazine of free
 *                        blocks, bt_blocks_*, free counts
 *   rows     paged.c     chunk directories of paged rows, and the paged API
 *            rows.c      every other write to a row, and the row API
 *   users    step.c      the scheduler step: rows.c's batch entries
 *            check.c     fsck, recovery, bt_client_close: rows.c's entries
 *            cache.c     cache pools (uses clients and below)
 *            gather.c, slots.c, mirror.c   readers of rows (seqlock or bounded)
 *            segment.c   config, layout, create / attach: it formats every
 *                        region, the cache pools through cache.c
 *
 * Only the rows layer writes a row (its entries, count, tokens, owner word,
 * seqlock, directory): step.c and check.c call its entries below with what
 * they have (a client id, a list of rows), never a handle made up for it.
 *
 * One verb per meaning, in these names and in bt.h's:
 *   claim     a request takes a free row: take (win the owner word by CAS),
 *             then init (key, flags, generation); untake undoes a take
 *             whose row was never initialised
 *   reserve   make sure chunks back a paged row's entries before a put
 *             (all or nothing)
 *   put       store entries into a row under its seqlock
 *   truncate  a row keeps its first n entries; the others are zeroed under
 *             its seqlock and, in a MANAGED row, their references released
 *   clear     zero a row's entries from n to its capacity (the stale-tail
 *             invariant), releasing the chunks that then hold only holes
 *   punch     make holes (0 entries) inside a paged row
 *   release   give what one holds back to where it came from: references to
 *             their counts (a block freed at 0), a row to the free rows,
 *             chunks to the chunk pool, a client's everything (close,
 *             recovery), a cache pool (reset and unowned)
 *   forget    let go of a directory without touching what it names (a
 *             repair, which rebuilds the chunk list itself)
 *   pop/push  remove from / add to the top of a stack: the pools' Treiber
 *             stacks, the hand's tail
 *   check     count what a structure holds and say what is wrong; with
 *             repair, also
 *   repair    write what a check decided (check.c decides, rows.c writes)
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
    int               faulted;         /* 1: check.c has touched every page of the mapping */
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
    uint32_t          mag_cap;         /* blocks a client's magazine holds (bt_mag_cap_of) */
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
    int              mag_low;          /* its pool's stack was short at the last look */
};

/* ==== base: proc.c ====================================================== */

/* Waiting on a row's seqlock: spin briefly, then yield, and give up after
 * BT_SEQ_WAIT_NS (the writer died or was stopped mid-write). Time-bounded,
 * not spin-bounded: on a loaded machine a writer can be descheduled for
 * longer than any spin count is worth. Returns nonzero when out of time. */
#define BT_SEQ_WAIT_NS (2ull * 1000000000ull)
int bt_seq_backoff(uint32_t spin, uint64_t *t0);

/* bt_proc_start_time is public (bt.h). */
int      bt_pid_alive(int32_t pid, uint64_t start);  /* start 0: any; can't tell: alive */
uint64_t bt_self_start_time(void);         /* ours, cached per process; 0 unknown */
uint64_t bt_now_ns(void);                  /* CLOCK_MONOTONIC */

/* ==== pool: alloc.c ======================================================= */

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

/* The ids of a stack pool: [lo, lo + span); pool 0 starts past the null block. */
static inline void bt_pool_range(const bt_seg *seg, uint32_t pool, uint32_t *lo, uint32_t *span)
{
    *lo = pool * seg->cfg.blocks_per_pool;
    *span = seg->cfg.blocks_per_pool - (*lo == 0);
    *lo += *lo == 0;
}
int  bt_stack_pop(struct bt_pool *p, const uint32_t *next, uint32_t lo, uint32_t span,
                  uint32_t n, int32_t *out);
void bt_stack_push(struct bt_pool *p, uint32_t *next, int32_t first, int32_t last, uint32_t count);
int  bt_pop_raw(bt_seg *seg, uint32_t pool, uint32_t n, uint32_t stamp, int32_t *out);
void bt_push_zeroed(bt_seg *seg, const int32_t *ids, uint32_t n);
int  bt_decref_many(bt_seg *seg, const int32_t *ids, uint32_t n);   /* all or nothing */
/* bt_decref_many without the push: blocks reaching 0 listed in zeroed (room
 * for n), for the caller to place. All or nothing. */
int  bt_decref_zeroed(bt_seg *seg, const int32_t *ids, uint32_t n, int32_t *zeroed, uint32_t *nz);
int  bt_incref_many(bt_seg *seg, const int32_t *ids, uint32_t n);   /* all or nothing */

/* ==== slot mapping: slots.c =============================================== */
extern int bt_slots_simd;   /* 1: the AVX2 paths run (set at load); tests may clear it */

/* ==== clients: client.c =================================================== */

/* The recovery protocol around every data-path call (client.c's comment). */
int  bt_op_begin(bt_client *cl);
uint64_t bt_fork_generation(void);     /* bumped in every forked child */
/* The client whose op this thread is in, NULL outside one: what the rows
 * layer frees inside a call goes to its magazine (bt_refs_release). */
extern _Thread_local bt_client *bt_op_client;
static inline void bt_op_end(bt_client *cl)
{
    bt_op_client = NULL;
    bt_store_relaxed(&cl->slot->ops, bt_load_relaxed(&cl->slot->ops) + 1);
    bt_store_release(&cl->slot->in_op, 0);
}
/* Release one reference on each valid id (invalid ones skipped), in a batch
 * when it can; ids is reordered. What rows and hands let go of goes here:
 * inside a client's call, the blocks freed go to its magazine. */
void bt_refs_release(bt_seg *seg, int32_t *ids, uint32_t n);
/* The slot's row count has one writer, its client (or the recoverer of a
 * dead one): a load and a store, no locked instruction. */
static inline void bt_nrows_add(bt_seg *seg, uint32_t id, int32_t d)
{
    struct bt_cslot *sl = &seg->clients[id - 1];
    bt_store_relaxed(&sl->nrows, bt_load_relaxed(&sl->nrows) + (uint32_t)d);
}
int  bt_hand_add(bt_client *cl, const int32_t *ids, uint32_t n);
int  bt_hand_find_all(bt_client *cl, const int32_t *ids, uint32_t n);
void bt_hand_pop(bt_client *cl, uint32_t n);   /* the n found by bt_hand_find_all */
void bt_client_free(bt_client *cl);            /* the handle only, nothing shared */
/* The magazine (bt_layout.h). Its capacity follows from the geometry, the
 * same in every process: at most BT_MAG_MAX, and all magazines together at
 * most an eighth of a pool, 0 (none) for small pools. */
static inline uint32_t bt_mag_cap_of(const bt_config *cfg)
{
    uint32_t c = cfg->blocks_per_pool / (8u * cfg->max_clients);
    return c > BT_MAG_MAX ? BT_MAG_MAX : c < 4 ? 0 : c & ~1u;
}
/* n blocks of a stack pool for cl, count 1 and owner cl->id, off its
 * magazine (refilled from the stack in bulk); inside an op. As bt_pop_raw:
 * BT_ENOBLOCKS (nothing taken), BT_ECORRUPT. */
int  bt_mag_pop(bt_client *cl, uint32_t pool, uint32_t n, int32_t *out);
/* Blocks whose count cl just brought to 0: into its magazine, the overflow
 * and other pools' blocks onto their stacks; inside an op. */
void bt_mag_push(bt_client *cl, const int32_t *ids, uint32_t n);
/* Empty slot `id`'s magazine onto the stacks (a close, or the release of a
 * client that died outside a call): the magazine lets go first. */
void bt_mag_release(bt_seg *seg, uint32_t id);

/* ==== rows: paged.c, rows.c =============================================== */

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
/* num_blocks, clamped to the row's capacity (a scribble reads as full). */
static inline uint32_t bt_row_nblocks(const bt_seg *seg, uint32_t row)
{
    int32_t n = bt_load_relaxed(&seg->nblocks[row]);
    uint32_t cap = bt_row_cap(seg, row);
    return n < 0 ? 0 : (uint32_t)n > cap ? cap : (uint32_t)n;
}
/* The row, if cl owns it: BT_ERANGE, BT_EROWSTATE (free), BT_ENOTOWNER. */
static inline int bt_row_owned(bt_client *cl, uint32_t row, struct bt_row **out)
{
    if (row >= cl->seg->cfg.num_rows)
        return BT_ERANGE;
    struct bt_row *r = &cl->seg->rows[row];
    uint32_t o = bt_load_acquire(&r->owner);
    if (o == 0)
        return BT_EROWSTATE;
    if (o != cl->id)
        return BT_ENOTOWNER;
    *out = r;
    return BT_OK;
}
/* The row's write seqlock: odd while its owner writes. */
static inline void bt_row_write_begin(struct bt_row *r)
{
    uint32_t seq = bt_load_relaxed(&r->seq);
    bt_store_relaxed(&r->seq, (seq + 1) | 1u);
    bt_fence_release();                 /* the odd seq is seen before any entry */
}
/* A write that may change entries below num_blocks: mirrors must look at the
 * whole row, not just past what they saw. */
static inline void bt_row_rewrite_begin(struct bt_row *r)
{
    bt_row_write_begin(r);
    bt_store_relaxed(&r->rewrite_seq, bt_load_relaxed(&r->seq));
}
static inline void bt_row_write_end(struct bt_row *r)
{
    bt_store_release(&r->seq, bt_load_relaxed(&r->seq) + 1);
}
/* A seqlock read, from any process: begin is 0 while a write is in progress
 * (odd seq: try again, bt_seq_backoff); retry is nonzero if a write began
 * since, so that what was read between may be torn. */
static inline int bt_seq_read_begin(const uint32_t *seq, uint32_t *s1)
{
    *s1 = bt_load_acquire(seq);
    return !(*s1 & 1u);
}
static inline int bt_seq_read_retry(const uint32_t *seq, uint32_t s1)
{
    bt_fence_acquire();                 /* the reads above happen before the re-read */
    return bt_load_relaxed(seq) != s1;
}

/* A row call of the API, written once: fn(cl, row, r, x, y) runs on a row
 * cl owns (bt_row_owned), inside the client protocol. Inlined with its fn. */
typedef int (*bt_row_fn)(bt_client *cl, uint32_t row, struct bt_row *r, uint64_t x, uint64_t y);
static inline int bt_row_in_op(bt_client *cl, uint32_t row, bt_row_fn fn, uint64_t x, uint64_t y)
{
    struct bt_row *r;
    if (!cl)
        return BT_EINVAL;
    int rc = bt_op_begin(cl);
    if (rc)
        return rc;
    if (!(rc = bt_row_owned(cl, row, &r)))
        rc = fn(cl, row, r, x, y);
    bt_op_end(cl);
    return rc;
}

/* paged.c: a paged row's chunk directory. Callers write under the row's
 * seqlock; none of these takes it. */
int32_t *bt_entry_ptr(const bt_seg *seg, uint32_t row, uint32_t i);   /* NULL: no chunk */
static inline int32_t bt_entry_get(const bt_seg *seg, uint32_t row, uint32_t i)
{
    const int32_t *p = bt_entry_ptr(seg, row, i);
    return p ? bt_load_relaxed(p) : 0;
}
int  bt_paged_reserve(bt_seg *seg, uint32_t row, uint32_t from, uint32_t to);
void bt_paged_clear(bt_seg *seg, uint32_t row, uint32_t from, uint32_t hfrom);
void bt_paged_swap(bt_seg *seg, uint32_t a, uint32_t b);
void bt_paged_forget(bt_seg *seg, uint32_t row);
/* These two take the seqlock themselves. */
int  bt_paged_truncate(bt_seg *seg, uint32_t row, uint32_t keep, int managed);
int  bt_paged_check(bt_seg *seg, uint32_t row, uint32_t nb, int repair, uint32_t *count,
                    uint8_t *cmark, uint64_t *bad);

/* rows.c: entries for the scheduler step and the checker. Rows named here
 * belong to client `id` (the caller checked), and a data-path caller is
 * inside an op. */
int  bt_rows_take(bt_seg *seg, uint32_t id, uint32_t n, uint32_t *rows_out);  /* all or none */
void bt_rows_untake(bt_seg *seg, const uint32_t *rows, uint32_t n);
void bt_rows_init(bt_seg *seg, uint32_t id, const uint32_t *rows, const uint64_t *keys,
                  uint32_t n, uint32_t flags);
void bt_row_put(bt_seg *seg, uint32_t row, uint32_t at, const int32_t *ids, uint32_t n);
int  bt_rows_release(bt_seg *seg, uint32_t id, const uint32_t *rows, uint32_t n);
void bt_row_repair(bt_seg *seg, uint32_t row, uint32_t good, int dead);

/* ==== users =============================================================== */

/* cache.c */
void bt_cache_format(bt_seg *seg);                 /* at creation: every pool reset */
void bt_cache_pool_reset(bt_seg *seg, uint32_t pool);
/* Reset and unown the pools client `id` owns (its close, or the recovery of
 * a dead one). */
void bt_cache_release_owner(bt_seg *seg, uint32_t id);
/* check.c's view: problems found in one pool (no writes). */
uint64_t bt_cache_verify(const bt_seg *seg, uint32_t pool, uint8_t *scratch_blocks,
                         uint8_t *scratch_keys);

/* segment.c: the geometry a config implies (its own use) */
uint32_t bt_cache_keys_of(const bt_config *cfg);   /* cache_keys, 0 resolved */
uint32_t bt_cache_buckets_of(const bt_config *cfg);
int  bt_layout(const bt_config *cfg, uint64_t off[BT_R_COUNT], uint64_t *size);
void bt_seg_bind(bt_seg *seg);         /* region pointers from base + off */

#endif /* BT_INTERNAL_H */
