/*
 * paged.c -- rows whose entries live in chunks from a shared chunk pool: the
 * chunk directories, and the paged API (bt_row_set_block, bt_row_punch).
 *
 * A dense table costs rows x max_len whatever the rows hold (1024 requests
 * able to reach 1M tokens at block size 16 is 256 MiB per copy). A paged row
 * has a small directory of chunk indices instead; chunks (chunk_size ids
 * each) are taken from a lock-free pool as the row grows and given back when
 * they hold nothing but holes, so memory follows the blocks in use, and a
 * sliding window's past (holes) costs nothing.
 *
 * Directory entries hold chunk index + 1 (0 = none) and are bounds-checked
 * on every read: a scribbled directory reads as holes, never as memory
 * outside the chunk region. Only the row's owner changes its directory.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "bt_internal.h"

static inline uint32_t *dir_of(const bt_seg *s, uint32_t row)
{
    return s->dir + (uint64_t)row * s->cfg.dir_width;
}

/* Entry slot of `i`, or NULL where no chunk backs it. */
int32_t *bt_entry_ptr(const bt_seg *s, uint32_t row, uint32_t i)
{
    if (!bt_row_paged(s, row))
        return bt_row_ids(s, row) + i;
    uint32_t cs = s->cfg.chunk_size, k = i / cs;
    if (k >= s->cfg.dir_width)
        return NULL;
    uint32_t c = bt_load_acquire(&dir_of(s, row)[k]);
    if (c == 0 || c > s->cfg.num_chunks)
        return NULL;
    return s->chunks + (uint64_t)(c - 1) * cs + i % cs;
}

/* Give chunks back to the chunk pool (one CAS). */
static void chunks_release(bt_seg *s, const int32_t *ids, uint32_t n)
{
    if (!n)
        return;
    for (uint32_t i = 0; i + 1 < n; i++)
        bt_store_relaxed(&s->cnext[ids[i]], (uint32_t)ids[i + 1]);
    bt_stack_push(s->cpool, s->cnext, ids[0], ids[n - 1], n);
}

/* Make sure chunks back entries [from, to); all or nothing (BT_ENOCHUNKS). */
int bt_paged_reserve(bt_seg *s, uint32_t row, uint32_t from, uint32_t to)
{
    if (!bt_row_paged(s, row) || from >= to)
        return BT_OK;
    uint32_t cs = s->cfg.chunk_size, k0 = from / cs, k1 = (to - 1) / cs, need = 0;
    uint32_t *d = dir_of(s, row);
    if (k1 >= s->cfg.dir_width)
        return BT_EROWFULL;
    for (uint32_t k = k0; k <= k1; k++)
        need += bt_load_relaxed(&d[k]) == 0;
    if (!need)
        return BT_OK;
    int32_t small[64], *got = need <= 64 ? small : malloc(need * sizeof(int32_t));
    if (!got)
        return -ENOMEM;
    int rc = bt_stack_pop(s->cpool, s->cnext, 0, s->cfg.num_chunks, need, got);
    if (rc == BT_ENOBLOCKS)
        rc = BT_ENOCHUNKS;
    for (uint32_t k = k0, j = 0; !rc && k <= k1; k++) {
        if (bt_load_relaxed(&d[k]) != 0)
            continue;
        int32_t *data = s->chunks + (uint64_t)got[j] * cs;
        for (uint32_t x = 0; x < cs; x++)
            bt_store_relaxed(&data[x], 0);
        bt_store_release(&d[k], (uint32_t)got[j++] + 1);
    }
    if (got != small)
        free(got);
    return rc;
}

static int chunk_empty(const bt_seg *s, uint32_t c)
{
    const int32_t *data = s->chunks + (uint64_t)c * s->cfg.chunk_size;
    for (uint32_t x = 0; x < s->cfg.chunk_size; x++)
        if (bt_load_relaxed(&data[x]))
            return 0;
    return 1;
}

/* Clear from `from` on: zero the entries, release the chunks wholly past
 * it, and the chunks in [hfrom, from) that hold only holes (hfrom = from:
 * none of those). Under the row's write seqlock. */
void bt_paged_clear(bt_seg *s, uint32_t row, uint32_t from, uint32_t hfrom)
{
    uint32_t cs = s->cfg.chunk_size, *d = dir_of(s, row);
    int32_t small[64], *back = small;
    uint32_t nback = 0, cap = 64;
    for (uint32_t k = hfrom / cs; k < s->cfg.dir_width; k++) {
        uint32_t c = bt_load_relaxed(&d[k]);
        if (c == 0 || c > s->cfg.num_chunks) {
            if (c)
                bt_store_relaxed(&d[k], 0u);    /* scribbled: forget it */
            continue;
        }
        uint32_t lo = k * cs;
        if (lo + cs > from) {           /* part of the chunk is cut: zero it */
            int32_t *data = s->chunks + (uint64_t)(c - 1) * cs;
            for (uint32_t x = lo < from ? from - lo : 0; x < cs; x++)
                bt_store_relaxed(&data[x], 0);
        }
        if (lo < from && !chunk_empty(s, c - 1))
            continue;
        if (nback == cap) {             /* rare: more than 64 chunks at once */
            int32_t *grown = malloc(2 * cap * sizeof(int32_t));
            if (!grown)
                break;                  /* the rest stay attached: harmless */
            memcpy(grown, back, nback * sizeof(int32_t));
            if (back != small)
                free(back);
            back = grown, cap *= 2;
        }
        bt_store_relaxed(&d[k], 0u);
        back[nback++] = (int32_t)(c - 1);
    }
    chunks_release(s, back, nback);
    if (back != small)
        free(back);
}

/* Forget a directory without touching the chunks it names (a repair of a dead
 * row: its directory may have been scribbled to name a live row's chunk, so
 * nothing is zeroed or pushed; the repair rebuilds the chunk list). */
void bt_paged_forget(bt_seg *s, uint32_t row)
{
    uint32_t *d = dir_of(s, row);
    for (uint32_t k = 0; k < s->cfg.dir_width; k++)
        bt_store_relaxed(&d[k], 0u);
}

/* Truncate a paged row to `keep` entries under its write seqlock, walking
 * its directory (not its index range): every chunk, past num_blocks too, so
 * keep = 0 leaves no chunk behind. Chunks left holding only holes go back to
 * the pool, and the references of the cut entries are released (managed) a
 * bounded batch at a time. */
int bt_paged_truncate(bt_seg *s, uint32_t row, uint32_t keep, int managed)
{
    enum { BATCH = 512 };
    uint32_t cs = s->cfg.chunk_size, *d = dir_of(s, row), nd = 0, nback = 0;
    int32_t drop[BATCH], back[64];
    struct bt_row *r = &s->rows[row];
    bt_row_rewrite_begin(r);
    bt_store_relaxed(&s->nblocks[row], (int32_t)keep);
    for (uint32_t k = s->cfg.dir_width; k-- > keep / cs;) {
        uint32_t c = bt_load_relaxed(&d[k]);
        if (c == 0 || c > s->cfg.num_chunks) {
            if (c)
                bt_store_relaxed(&d[k], 0u);    /* scribbled: forget it */
            continue;
        }
        int32_t *data = s->chunks + (uint64_t)(c - 1) * cs;
        uint32_t lo = k * cs < keep ? keep - k * cs : 0;
        for (uint32_t x = lo; x < cs; x++) {
            int32_t id = bt_load_relaxed(&data[x]);
            if (!id)
                continue;
            bt_store_relaxed(&data[x], 0);
            if (managed)
                drop[nd++] = id;
            if (nd == BATCH) {          /* entry zeroed first, then its reference */
                bt_refs_release(s, drop, nd);
                nd = 0;
            }
        }
        /* A chunk wholly cut goes back, and so does the boundary chunk when
         * what it keeps holds only holes (memory follows the blocks used,
         * as in bt_paged_clear; keeping it leaked it until the release). */
        if (lo == 0 || chunk_empty(s, c - 1)) {
            bt_store_relaxed(&d[k], 0u);
            back[nback++] = (int32_t)(c - 1);
            if (nback == 64) {
                chunks_release(s, back, nback);
                nback = 0;
            }
        }
    }
    bt_row_write_end(r);
    chunks_release(s, back, nback);
    bt_refs_release(s, drop, nd);
    return BT_OK;
}

/* Swap two paged rows' directories. */
void bt_paged_swap(bt_seg *s, uint32_t a, uint32_t b)
{
    uint32_t *da = dir_of(s, a), *db = dir_of(s, b);
    for (uint32_t k = 0; k < s->cfg.dir_width; k++) {
        uint32_t x = bt_load_relaxed(&da[k]);
        bt_store_relaxed(&da[k], bt_load_relaxed(&db[k]));
        bt_store_relaxed(&db[k], x);
    }
}

/* check.c's pass over a live paged row: mark its chunks in cmark (bit 1; a
 * chunk named twice, or out of range, leaves the directory on repair), count
 * the holders of its MANAGED ids in count[]; holes are fine, bad ids become
 * holes and entries past nb are stale (zeroed on repair). *bad counts bad
 * entries. Returns nonzero if the row needs fixing. */
int bt_paged_check(bt_seg *s, uint32_t row, uint32_t nb, int repair, uint32_t *count,
                   uint8_t *cmark, uint64_t *bad)
{
    uint32_t cs = s->cfg.chunk_size, *d = dir_of(s, row);
    int managed = bt_row_managed(s, row), fix = 0;
    for (uint32_t k = 0; k < s->cfg.dir_width; k++) {
        uint32_t c = bt_load_relaxed(&d[k]);
        if (c == 0)
            continue;
        if (c > s->cfg.num_chunks || (cmark[c - 1] & 1)) {
            (*bad)++;
            fix = 1;
            if (repair)
                bt_store_relaxed(&d[k], 0u);
            continue;
        }
        cmark[c - 1] |= 1;
        int32_t *data = s->chunks + (uint64_t)(c - 1) * cs;
        for (uint32_t x = 0; x < cs; x++) {
            int32_t id = bt_load_relaxed(&data[x]);
            int stale = k * cs + x >= nb;
            if (id == 0)
                continue;
            if (stale || (managed ? !bt_id_ok(s, id) : id < 0)) {
                *bad += !stale;
                fix = 1;
                if (repair)
                    bt_store_relaxed(&data[x], 0);
                continue;
            }
            if (managed)
                count[id]++;
        }
    }
    return fix;
}

/* ---- the paged API -------------------------------------------------------- */

/* Length of the row once trailing holes are left out; a chunk that is not
 * there is skipped whole (a sparse row may span 2^30 entries). */
static uint32_t len_to_last_block(const bt_seg *s, uint32_t row, uint32_t nb)
{
    while (nb > 0) {
        const int32_t *p = bt_entry_ptr(s, row, nb - 1);
        if (!p) {
            nb = (nb - 1) / s->cfg.chunk_size * s->cfg.chunk_size;
            continue;
        }
        if (bt_load_relaxed(p))
            break;
        nb--;
    }
    return nb;
}

static int set_block(bt_client *cl, uint32_t row, struct bt_row *r, uint32_t nb, uint32_t index, int32_t id)
{
    bt_seg *s = cl->seg;
    int managed = bt_row_managed(s, row), rc = BT_OK;
    if (index >= bt_row_cap(s, row))
        return BT_EROWFULL;
    if (id < 0)
        return BT_ERANGE;
    if (managed && id != 0 && !bt_id_ok(s, id))
        return bt_id_err(s, id);
    if (id != 0 && managed && (rc = bt_hand_find_all(cl, &id, 1)))   /* the reference to move */
        return rc;
    if (id != 0 && (rc = bt_paged_reserve(s, row, index, index + 1)))
        return rc;
    int32_t old = index < nb ? bt_entry_get(s, row, index) : 0;
    int32_t *p = bt_entry_ptr(s, row, index);
    bt_row_rewrite_begin(r);
    if (p)
        bt_store_relaxed(p, id);
    uint32_t len = index >= nb ? (id ? index + 1 : nb) : index + 1 == nb ? len_to_last_block(s, row, nb) : nb;
    bt_store_relaxed(&s->nblocks[row], (int32_t)len);
    if (id == 0)                        /* give back chunks left holding only holes */
        bt_paged_clear(s, row, len, index < len ? index : len);
    bt_row_write_end(r);
    if (managed && id != 0)
        bt_hand_pop(cl, 1);
    if (managed && old != 0)
        bt_refs_release(s, &old, 1);
    return BT_OK;
}

static int punch(bt_seg *s, uint32_t row, struct bt_row *r, uint32_t nb, uint32_t from, uint32_t to)
{
    if (from > to || to > nb)
        return BT_ERANGE;
    if (from == to)
        return BT_OK;
    int32_t small[256], *cut = to - from <= 256 ? small : malloc((to - from) * sizeof(int32_t));
    if (!cut)
        return -ENOMEM;
    uint32_t n = 0;
    bt_row_rewrite_begin(r);
    for (uint32_t i = from; i < to; i++) {
        int32_t *p = bt_entry_ptr(s, row, i);
        if (!p || !bt_load_relaxed(p))
            continue;
        cut[n++] = bt_load_relaxed(p);
        bt_store_relaxed(p, 0);
    }
    uint32_t len = to == nb ? len_to_last_block(s, row, from) : nb;
    bt_store_relaxed(&s->nblocks[row], (int32_t)len);
    bt_paged_clear(s, row, len, from < len ? from : len);
    bt_row_write_end(r);
    if (bt_row_managed(s, row))         /* entries out first, then their references */
        bt_refs_release(s, cut, n);
    if (cut != small)
        free(cut);
    return BT_OK;
}

static int set_block_owned(bt_client *cl, uint32_t row, struct bt_row *r, uint64_t index, uint64_t id)
{
    if (!bt_row_paged(cl->seg, row))
        return BT_EROWSTATE;
    return set_block(cl, row, r, bt_row_nblocks(cl->seg, row), (uint32_t)index, (int32_t)id);
}

int bt_row_set_block(bt_client *cl, uint32_t row, uint32_t index, int32_t id)
{
    return bt_row_in_op(cl, row, set_block_owned, index, (uint64_t)(uint32_t)id);
}

static int punch_owned(bt_client *cl, uint32_t row, struct bt_row *r, uint64_t from, uint64_t to)
{
    if (!bt_row_paged(cl->seg, row))
        return BT_EROWSTATE;
    return punch(cl->seg, row, r, bt_row_nblocks(cl->seg, row), (uint32_t)from, (uint32_t)to);
}

int bt_row_punch(bt_client *cl, uint32_t row, uint32_t from, uint32_t to)
{
    return bt_row_in_op(cl, row, punch_owned, from, to);
}

int bt_chunks_free(const bt_seg *s, uint32_t *out)
{
    if (!s || !out)
        return BT_EINVAL;
    int64_t v = bt_load_relaxed(&s->cpool->nfree);
    *out = v < 0 ? 0 : (uint32_t)v;
    return BT_OK;
}
