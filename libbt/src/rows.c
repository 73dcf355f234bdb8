/*
 * rows.c -- per-request block tables.
 *
 * A row has one writer, the client that claimed it; anyone reads it under
 * its seqlock (seq odd while a write is in progress). Entries at and past
 * num_blocks are 0 after every call: stale tails let a request read another
 * request's KV (vLLM learnt this the hard way).
 *
 * For a MANAGED row every entry holds one reference on its block. Entries
 * enter the row before the hand lets go of them, and leave the row before
 * their references are dropped: a client dying in between leaves a count
 * too high (repaired), never a holder without a count.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "bt_internal.h"

uint32_t bt_row_nblocks(const bt_seg *s, uint32_t row)
{
    int32_t n = bt_load_relaxed(&s->nblocks[row]);
    uint32_t cap = bt_row_cap(s, row);
    return n < 0 ? 0 : (uint32_t)n > cap ? cap : (uint32_t)n;
}

void bt_row_write_begin(struct bt_row *r)
{
    uint32_t seq = bt_load_relaxed(&r->seq);
    bt_store_relaxed(&r->seq, (seq + 1) | 1u);
    bt_fence_release();                 /* the odd seq is seen before any entry */
}

/* A write that may change entries below num_blocks: mirrors must look at the
 * whole row, not just past what they saw. */
void bt_row_rewrite_begin(struct bt_row *r)
{
    bt_row_write_begin(r);
    bt_store_relaxed(&r->rewrite_seq, bt_load_relaxed(&r->seq));
}

void bt_row_write_end(struct bt_row *r)
{
    uint32_t seq = bt_load_relaxed(&r->seq);
    bt_store_release(&r->seq, seq + 1);
}

/* Zero entries [from, capacity): the tail invariant, restored wholesale.
 * A paged row gives back the chunks past `from`. */
void bt_row_wipe(bt_seg *s, uint32_t row, uint32_t from)
{
    if (bt_row_paged(s, row)) {
        bt_paged_trim(s, row, from, from);
        return;
    }
    int32_t *e = bt_row_ids(s, row);
    for (uint32_t i = from; i < s->cfg.row_width; i++)
        bt_store_relaxed(&e[i], 0);
}

int bt_row_owned(bt_client *cl, uint32_t row, struct bt_row **out)
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

static int check_ids(const bt_seg *s, uint32_t row, const int32_t *ids, uint32_t n)
{
    int managed = bt_row_managed(s, row);
    for (uint32_t i = 0; i < n; i++) {
        if (ids[i] < 0)
            return BT_ERANGE;
        if (managed && !bt_id_ok(s, ids[i]))
            return bt_id_err(s, ids[i]);   /* a cache pool's id: BT_EINVAL */
    }
    return BT_OK;
}

/* Store entries [at, at + n) (chunks reserved by the caller) and the count. */
static void put_entries(bt_seg *s, uint32_t row, uint32_t at, const int32_t *ids, uint32_t n)
{
    if (!bt_row_paged(s, row)) {
        int32_t *e = bt_row_ids(s, row);
        for (uint32_t i = 0; i < n; i++)
            bt_store_relaxed(&e[at + i], ids[i]);
    } else {
        for (uint32_t i = 0; i < n; i++) {
            int32_t *p = bt_entry_ptr(s, row, at + i);
            if (p)
                bt_store_relaxed(p, ids[i]);
        }
    }
    bt_store_relaxed(&s->nblocks[row], (int32_t)(at + n));
}

/* Copy the row's first n entries out (owner's view, no seqlock needed). */
static void get_entries(const bt_seg *s, uint32_t row, uint32_t n, int32_t *out)
{
    for (uint32_t i = 0; i < n; i++)
        out[i] = bt_entry_get(s, row, i);
}

/* Drop one reference on each valid id: a batch (one CAS per pool) when it
 * can, one by one when a count was already 0, so one scribbled-on entry does
 * not keep the others from being freed. */
void bt_drop_refs(bt_seg *s, int32_t *ids, uint32_t n)
{
    uint32_t k = 0;
    for (uint32_t i = 0; i < n; i++)
        if (bt_id_ok(s, ids[i]))
            ids[k++] = ids[i];
    if (bt_decref_many(s, ids, k) == BT_OK)
        return;
    for (uint32_t i = 0; i < k; i++)
        bt_decref_many(s, &ids[i], 1);
}

/* Dense rows: zero entries [keep, nb) under the seqlock (past nb is zero
 * already), copying them to `out` (room for nb - keep; NULL for RAW rows)
 * for the caller to drop after. Returns how many were cut. Paged rows are
 * cut by bt_paged_shrink, which walks the directory instead. */
uint32_t bt_row_cut(bt_seg *s, uint32_t row, uint32_t keep, int32_t *out)
{
    struct bt_row *r = &s->rows[row];
    uint32_t nb = bt_row_nblocks(s, row);
    int32_t *e = bt_row_ids(s, row);
    if (keep >= nb)
        return 0;
    for (uint32_t i = keep; out && i < nb; i++)
        out[i - keep] = bt_load_relaxed(&e[i]);
    bt_row_rewrite_begin(r);
    bt_store_relaxed(&s->nblocks[row], (int32_t)keep);
    for (uint32_t i = keep; i < nb; i++)
        bt_store_relaxed(&e[i], 0);
    bt_row_write_end(r);
    return nb - keep;
}

/* Drop entries [keep, nb) and, for a MANAGED row, their references. Dense
 * rows: one cut. Paged rows: chunk by chunk through the directory (holes cost
 * nothing, and a billion-entry row holding one block needs no big buffer). */
static int shrink(bt_client *cl, uint32_t row, uint32_t keep)
{
    bt_seg *s = cl->seg;
    uint32_t nb = bt_row_nblocks(s, row);
    if (keep >= nb)
        return BT_OK;
    if (bt_row_paged(s, row))
        return bt_paged_shrink(s, row, keep, bt_row_managed(s, row));
    int32_t small[256], *drop = nb - keep <= 256 ? small : malloc((size_t)(nb - keep) * sizeof(int32_t));
    if (!drop)
        return -ENOMEM;
    uint32_t n = bt_row_cut(s, row, keep, drop);
    if (bt_row_managed(s, row))
        bt_drop_refs(s, drop, n);
    if (drop != small)
        free(drop);
    return BT_OK;
}

/* Give a row up (its blocks dropped first); the caller is inside an op. */
int bt_row_drop(bt_client *cl, uint32_t row)
{
    int rc = shrink(cl, row, 0);
    if (rc)
        return rc;
    if (bt_row_paged(cl->seg, row))     /* chunks past num_blocks too, if any */
        bt_paged_trim(cl->seg, row, 0, 0);
    bt_store_relaxed(&cl->seg->ntokens[row], (int64_t)0);
    bt_store_release(&cl->seg->rows[row].owner, 0u);
    bt_nrows_add(cl, -1);
    return BT_OK;
}

/* Take a free row's owner word (hint >= 0: that row only). Searches start
 * at *cursor (a batch reads the shared cursor once: UINT32_MAX) and leave it
 * past the row taken, so a batch of claims walks the table once. */
int bt_claim_take(bt_client *cl, int32_t hint, uint32_t *cursor, uint32_t *row_out)
{
    bt_seg *s = cl->seg;
    uint32_t n = s->cfg.num_rows;
    if (hint < 0 && *cursor == UINT32_MAX)
        *cursor = bt_fetch_add_relaxed(&s->hdr->row_cursor, 1u) % n;
    uint32_t start = hint >= 0 ? (uint32_t)hint : *cursor;
    for (uint32_t k = 0; k < (hint >= 0 ? 1 : n); k++) {
        uint32_t row = start + k < n ? start + k : start + k - n, zero = 0;
        if (bt_load_relaxed(&s->rows[row].owner) == 0 &&     /* look before the CAS */
            bt_cas_acqrel(&s->rows[row].owner, &zero, cl->id)) {
            *row_out = row;
            if (hint < 0)
                *cursor = row + 1 < n ? row + 1 : 0;
            return BT_OK;
        }
    }
    return hint >= 0 ? BT_EROWSTATE : BT_ENOROWS;
}

/* Make a taken row the request's: new generation, empty, key and flags. */
void bt_claim_init(bt_client *cl, uint32_t row, uint64_t key, uint32_t flags)
{
    bt_seg *s = cl->seg;
    struct bt_row *r = &s->rows[row];
    bt_row_rewrite_begin(r);
    if (bt_load_relaxed(&s->nblocks[row]) != 0) {  /* should never be: heal */
        bt_store_relaxed(&s->nblocks[row], 0);
        bt_row_wipe(s, row, 0);
    }
    bt_store_relaxed(&r->key, key);
    bt_store_relaxed(&r->flags, flags);
    bt_store_relaxed(&r->generation, bt_load_relaxed(&r->generation) + 1);
    bt_store_relaxed(&s->ntokens[row], (int64_t)0);
    bt_row_write_end(r);
    bt_nrows_add(cl, 1);
}

static int claim_one(bt_client *cl, uint64_t key, int32_t hint, uint32_t flags, uint32_t *row_out)
{
    uint32_t cursor = UINT32_MAX;
    int rc = bt_claim_take(cl, hint, &cursor, row_out);
    if (!rc)
        bt_claim_init(cl, *row_out, key, flags);
    return rc;
}

static int claim_flags_ok(const bt_seg *s, uint32_t flags)
{
    if (flags & ~(uint32_t)(BT_ROW_RAW | BT_ROW_PAGED))
        return 0;
    return !(flags & BT_ROW_PAGED) || s->cfg.chunk_size;  /* paged needs a chunk pool */
}

int bt_row_claim(bt_client *cl, uint64_t key, int32_t hint, uint32_t flags, uint32_t *row_out)
{
    if (!cl || !row_out || !claim_flags_ok(cl->seg, flags))
        return BT_EINVAL;
    if (hint < -1 || (hint >= 0 && (uint32_t)hint >= cl->seg->cfg.num_rows))
        return BT_ERANGE;               /* only -1 means "any row" */
    int rc = bt_op_begin(cl);
    if (rc)
        return rc;
    rc = claim_one(cl, key, hint, flags, row_out);
    bt_op_end(cl);
    return rc;
}

int bt_row_claim_many(bt_client *cl, const uint64_t *keys, uint32_t n, uint32_t flags, uint32_t *rows_out)
{
    if (!cl || (n && (!keys || !rows_out)) || !claim_flags_ok(cl->seg, flags))
        return BT_EINVAL;
    int rc = bt_op_begin(cl);
    if (rc)
        return rc;
    /* Take every owner word first, touching nothing else, so that running
     * out of rows can hand them back with no trace (all or nothing). */
    uint32_t i = 0, cursor = UINT32_MAX;
    while (i < n && !(rc = bt_claim_take(cl, -1, &cursor, &rows_out[i])))
        i++;
    bt_store_relaxed(&cl->seg->hdr->row_cursor, cursor);  /* a hint for the next claimer */
    if (rc) {
        while (i-- > 0)
            bt_store_release(&cl->seg->rows[rows_out[i]].owner, 0u);
    } else {
        for (i = 0; i < n; i++)
            bt_claim_init(cl, rows_out[i], keys[i], flags);
    }
    bt_op_end(cl);
    return rc;
}

int bt_row_release(bt_client *cl, uint32_t row)
{
    struct bt_row *r;
    if (!cl)
        return BT_EINVAL;
    int rc = bt_op_begin(cl);
    if (rc)
        return rc;
    if (!(rc = bt_row_owned(cl, row, &r)))
        rc = bt_row_drop(cl, row);
    bt_op_end(cl);
    return rc;
}

/* Common checks of the append family: owned, right kind, room, ids. */
static int append_prep(bt_client *cl, uint32_t row, const int32_t *ids, uint32_t n,
                       int need_managed, struct bt_row **r, uint32_t *nb)
{
    int rc = bt_row_owned(cl, row, r);
    if (rc)
        return rc;
    if (need_managed && !bt_row_managed(cl->seg, row))
        return BT_EROWSTATE;
    *nb = bt_row_nblocks(cl->seg, row);
    if ((uint64_t)*nb + n > bt_row_cap(cl->seg, row))
        return BT_EROWFULL;
    return ids ? check_ids(cl->seg, row, ids, n) : BT_OK;
}

int bt_row_append(bt_client *cl, uint32_t row, const int32_t *ids, uint32_t n)
{
    struct bt_row *r;
    uint32_t nb;
    if (!cl || (!ids && n))
        return BT_EINVAL;
    int rc = bt_op_begin(cl);
    if (rc)
        return rc;
    if (!(rc = append_prep(cl, row, ids, n, 0, &r, &nb))) {
        int managed = bt_row_managed(cl->seg, row);
        if ((!managed || !(rc = bt_hand_find_all(cl, ids, n))) &&
            !(rc = bt_paged_reserve(cl->seg, row, nb, nb + n))) {
            bt_row_write_begin(r);
            put_entries(cl->seg, row, nb, ids, n);
            bt_row_write_end(r);
            if (managed)
                bt_hand_drop(cl, n);    /* the references now live in the row */
        }
    }
    bt_op_end(cl);
    return rc;
}

int bt_row_append_shared(bt_client *cl, uint32_t row, const int32_t *ids, uint32_t n)
{
    struct bt_row *r;
    uint32_t nb;
    if (!cl || (!ids && n))
        return BT_EINVAL;
    int rc = bt_op_begin(cl);
    if (rc)
        return rc;
    if (!(rc = append_prep(cl, row, ids, n, 1, &r, &nb)) &&
        !(rc = bt_paged_reserve(cl->seg, row, nb, nb + n))) {
        if (!(rc = bt_incref_many(cl->seg, ids, n))) {
            bt_row_write_begin(r);
            put_entries(cl->seg, row, nb, ids, n);
            bt_row_write_end(r);
        } else if (bt_row_paged(cl->seg, row)) {
            bt_paged_trim(cl->seg, row, nb, nb);   /* give back the chunks reserved */
        }
    }
    bt_op_end(cl);
    return rc;
}

int bt_row_alloc_append(bt_client *cl, uint32_t row, uint32_t pool, uint32_t n, int32_t *ids_out)
{
    struct bt_row *r;
    uint32_t nb;
    if (!cl)
        return BT_EINVAL;
    int rc = bt_stack_pool_err(cl->seg, pool);
    if (rc)
        return rc;
    rc = bt_op_begin(cl);
    if (rc)
        return rc;
    if (!(rc = append_prep(cl, row, NULL, n, 1, &r, &nb)) && n) {
        int32_t small[256], *ids = ids_out ? ids_out : n <= 256 ? small : malloc((size_t)n * sizeof(int32_t));
        if (!ids)
            rc = -ENOMEM;
        else if (!(rc = bt_paged_reserve(cl->seg, row, nb, nb + n)) &&
                 !(rc = bt_pop_raw(cl->seg, pool, n, cl->id, ids))) {
            bt_row_write_begin(r);
            put_entries(cl->seg, row, nb, ids, n);
            bt_row_write_end(r);
        } else if (rc != -ENOMEM && bt_row_paged(cl->seg, row)) {
            bt_paged_trim(cl->seg, row, nb, nb);   /* give back the chunks reserved */
        }
        if (ids && ids != ids_out && ids != small)
            free(ids);
    }
    bt_op_end(cl);
    return rc;
}

int bt_row_set(bt_client *cl, uint32_t row, const int32_t *ids, uint32_t n)
{
    struct bt_row *r;
    uint32_t nb;
    if (!cl || (!ids && n))
        return BT_EINVAL;
    int rc = bt_op_begin(cl);
    if (rc)
        return rc;
    /* Room is checked against an empty row: the old entries are going. */
    if (!(rc = bt_row_owned(cl, row, &r))) {
        int managed = bt_row_managed(cl->seg, row);
        if (n > bt_row_cap(cl->seg, row))
            rc = BT_EROWFULL;
        else if (!(rc = check_ids(cl->seg, row, ids, n)) &&
                 !(rc = managed ? bt_hand_find_all(cl, ids, n) : BT_OK) &&
                 !(rc = bt_paged_reserve(cl->seg, row, 0, n))) {
            /* Take the new references first, then drop the old ones, so a
             * block in both lists never touches zero in between. */
            nb = bt_row_nblocks(cl->seg, row);
            int32_t small[256], *old = nb <= 256 ? small : malloc((size_t)nb * sizeof(int32_t));
            if (!old) {
                rc = -ENOMEM;
            } else {
                get_entries(cl->seg, row, nb, old);
                bt_row_rewrite_begin(r);
                put_entries(cl->seg, row, 0, ids, n);
                bt_row_wipe(cl->seg, row, n);
                bt_row_write_end(r);
                if (managed) {
                    bt_hand_drop(cl, n);
                    bt_drop_refs(cl->seg, old, nb);
                }
                if (old != small)
                    free(old);
            }
        }
    }
    bt_op_end(cl);
    return rc;
}

int bt_row_truncate(bt_client *cl, uint32_t row, uint32_t keep)
{
    struct bt_row *r;
    if (!cl)
        return BT_EINVAL;
    int rc = bt_op_begin(cl);
    if (rc)
        return rc;
    if (!(rc = bt_row_owned(cl, row, &r))) {
        if (keep > bt_row_nblocks(cl->seg, row))
            rc = BT_ERANGE;
        else
            rc = shrink(cl, row, keep);
    }
    bt_op_end(cl);
    return rc;
}

int bt_row_set_tokens(bt_client *cl, uint32_t row, int64_t num_tokens)
{
    struct bt_row *r;
    if (!cl || num_tokens < 0)
        return BT_EINVAL;
    int rc = bt_op_begin(cl);           /* a write like any other: freeze, fork, reaping */
    if (rc)
        return rc;
    if (!(rc = bt_row_owned(cl, row, &r))) {
        bt_row_write_begin(r);
        bt_store_relaxed(&cl->seg->ntokens[row], num_tokens);
        bt_row_write_end(r);
    }
    bt_op_end(cl);
    return rc;
}

/* Exchange the contents of two owned rows (entries, counts, tokens). */
static int exchange(bt_client *cl, uint32_t a, uint32_t b)
{
    bt_seg *s = cl->seg;
    struct bt_row *ra, *rb;
    int rc;
    if ((rc = bt_row_owned(cl, a, &ra)) || (rc = bt_row_owned(cl, b, &rb)))
        return rc;
    if (bt_load_relaxed(&ra->flags) != bt_load_relaxed(&rb->flags))
        return BT_EROWSTATE;
    if (a == b)
        return BT_OK;
    uint32_t na = bt_row_nblocks(s, a), nb = bt_row_nblocks(s, b);
    int32_t *ea = bt_row_ids(s, a), *eb = bt_row_ids(s, b);
    uint32_t m = na > nb ? na : nb;
    bt_row_rewrite_begin(ra);
    bt_row_rewrite_begin(rb);
    if (bt_row_paged(s, a)) {
        bt_paged_swap(s, a, b);         /* directories, not entries */
        m = 0;
    }
    for (uint32_t i = 0; i < m; i++) {
        int32_t x = bt_load_relaxed(&ea[i]), y = bt_load_relaxed(&eb[i]);
        bt_store_relaxed(&ea[i], y);
        bt_store_relaxed(&eb[i], x);
    }
    bt_store_relaxed(&s->nblocks[a], (int32_t)nb);
    bt_store_relaxed(&s->nblocks[b], (int32_t)na);
    int64_t ta = bt_load_relaxed(&s->ntokens[a]), tb = bt_load_relaxed(&s->ntokens[b]);
    bt_store_relaxed(&s->ntokens[a], tb);
    bt_store_relaxed(&s->ntokens[b], ta);
    bt_row_write_end(rb);
    bt_row_write_end(ra);
    return BT_OK;
}

/* Move = exchange, then drop what dst held (now in src): src ends zeroed and
 * dst's old references are released, never leaked. */
int bt_row_move(bt_client *cl, uint32_t src, uint32_t dst)
{
    if (!cl)
        return BT_EINVAL;
    int rc = bt_op_begin(cl);
    if (rc)
        return rc;
    if (!(rc = exchange(cl, src, dst)) && src != dst) {
        rc = shrink(cl, src, 0);
        bt_store_relaxed(&cl->seg->ntokens[src], (int64_t)0);
    }
    bt_op_end(cl);
    return rc;
}

int bt_row_swap(bt_client *cl, uint32_t a, uint32_t b)
{
    if (!cl)
        return BT_EINVAL;
    int rc = bt_op_begin(cl);
    if (rc)
        return rc;
    rc = exchange(cl, a, b);
    bt_op_end(cl);
    return rc;
}

int bt_row_read(const bt_seg *s, uint32_t row, int32_t *ids, uint32_t cap, bt_row_info *info)
{
    if (!s)
        return BT_EINVAL;
    if (row >= s->cfg.num_rows)
        return BT_ERANGE;
    const struct bt_row *r = &s->rows[row];
    uint64_t t0 = 0;
    for (uint32_t spin = 0; !bt_seq_backoff(spin, &t0); spin++) {
        uint32_t s1 = bt_load_acquire(&r->seq);
        if (s1 & 1u)
            continue;
        bt_row_info in = { .owner = bt_load_relaxed(&r->owner), .flags = bt_load_relaxed(&r->flags),
                           .key = bt_load_relaxed(&r->key), .generation = bt_load_relaxed(&r->generation),
                           .num_tokens = bt_load_relaxed(&s->ntokens[row]) };
        in.seq = s1;
        in.rewrite_seq = bt_load_relaxed(&r->rewrite_seq);
        int32_t raw = bt_load_relaxed(&s->nblocks[row]);
        int bad = raw < 0 || (uint32_t)raw > bt_row_cap(s, row);
        in.num_blocks = bad ? 0 : (uint32_t)raw;
        int small = ids && in.num_blocks > cap;
        if (ids && !bad && !small)
            get_entries(s, row, in.num_blocks, ids);
        bt_fence_acquire();
        if (bt_load_relaxed(&r->seq) != s1)
            continue;
        if (bad)
            return BT_ECORRUPT;
        if (small)
            return BT_EINVAL;
        if (info)
            *info = in;
        return BT_OK;
    }
    return BT_EBUSY;
}

/* ---- paged rows: entries by index, holes ---------------------------------- */

/* Length of the row once trailing holes are dropped; a chunk that is not
 * there is skipped whole (a sparse row may span 2^30 entries). */
static uint32_t trim_holes(const bt_seg *s, uint32_t row, uint32_t nb)
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

int bt_row_set_block(bt_client *cl, uint32_t row, uint32_t index, int32_t id)
{
    struct bt_row *r;
    if (!cl)
        return BT_EINVAL;
    bt_seg *s = cl->seg;
    int rc = bt_op_begin(cl);
    if (rc)
        return rc;
    if ((rc = bt_row_owned(cl, row, &r)))
        goto out;
    int managed = bt_row_managed(s, row);
    uint32_t nb = bt_row_nblocks(s, row);
    if (!bt_row_paged(s, row))
        rc = BT_EROWSTATE;
    else if (index >= bt_row_cap(s, row))
        rc = BT_EROWFULL;
    else if (id < 0)
        rc = BT_ERANGE;
    else if (managed && id != 0 && !bt_id_ok(s, id))
        rc = bt_id_err(s, id);
    if (!rc && id != 0 && managed)
        rc = bt_hand_find_all(cl, &id, 1);          /* the reference to move */
    if (!rc && id != 0)
        rc = bt_paged_reserve(s, row, index, index + 1);
    if (rc)
        goto out;
    int32_t old = index < nb ? bt_entry_get(s, row, index) : 0;
    int32_t *p = bt_entry_ptr(s, row, index);
    bt_row_rewrite_begin(r);
    if (p)
        bt_store_relaxed(p, id);
    uint32_t len = index >= nb ? (id ? index + 1 : nb) : index + 1 == nb ? trim_holes(s, row, nb) : nb;
    bt_store_relaxed(&s->nblocks[row], (int32_t)len);
    if (id == 0)                        /* give back chunks left holding only holes */
        bt_paged_trim(s, row, len, index < len ? index : len);
    bt_row_write_end(r);
    if (managed && id != 0)
        bt_hand_drop(cl, 1);
    if (managed && old != 0)
        bt_drop_refs(s, &old, 1);
out:
    bt_op_end(cl);
    return rc;
}

int bt_row_punch(bt_client *cl, uint32_t row, uint32_t from, uint32_t to)
{
    struct bt_row *r;
    if (!cl)
        return BT_EINVAL;
    bt_seg *s = cl->seg;
    int rc = bt_op_begin(cl);
    if (rc)
        return rc;
    if ((rc = bt_row_owned(cl, row, &r)))
        goto out;
    uint32_t nb = bt_row_nblocks(s, row);
    if (!bt_row_paged(s, row))
        rc = BT_EROWSTATE;
    else if (from > to || to > nb)
        rc = BT_ERANGE;
    if (rc || from == to)
        goto out;
    int32_t small[256], *drop = to - from <= 256 ? small : malloc((to - from) * sizeof(int32_t));
    if (!drop) {
        rc = -ENOMEM;
        goto out;
    }
    uint32_t n = 0;
    bt_row_rewrite_begin(r);
    for (uint32_t i = from; i < to; i++) {
        int32_t *p = bt_entry_ptr(s, row, i);
        if (!p || !bt_load_relaxed(p))
            continue;
        drop[n++] = bt_load_relaxed(p);
        bt_store_relaxed(p, 0);
    }
    uint32_t len = to == nb ? trim_holes(s, row, from) : nb;
    bt_store_relaxed(&s->nblocks[row], (int32_t)len);
    bt_paged_trim(s, row, len, from < len ? from : len);
    bt_row_write_end(r);
    if (bt_row_managed(s, row))
        bt_drop_refs(s, drop, n);
    if (drop != small)
        free(drop);
out:
    bt_op_end(cl);
    return rc;
}
