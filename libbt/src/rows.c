/*
 * rows.c -- per-request block tables: every write to a row but a paged
 * row's directory (paged.c), and the row API.
 *
 * A row has one writer, the client that claimed it; anyone reads it under
 * its seqlock (seq odd while a write is in progress). Entries at and past
 * num_blocks are 0 after every call: stale tails let a request read another
 * request's KV (vLLM learnt this the hard way).
 *
 * For a MANAGED row every entry holds one reference on its block. Entries
 * enter the row before the hand lets go of them, and leave the row before
 * their references are released: a client dying in between leaves a count
 * too high (repaired), never a holder without a count.
 *
 * The scheduler step (step.c) and the checker (check.c) write rows only
 * through the bt_rows_* / bt_row_put / bt_row_repair entries below.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "bt_internal.h"

/* ---- entries ---------------------------------------------------------------- */

/* Clear entries [from, capacity): the tail invariant, restored wholesale.
 * A paged row gives back the chunks past `from`. Under the seqlock. */
static void clear_from(bt_seg *s, uint32_t row, uint32_t from)
{
    if (bt_row_paged(s, row)) {
        bt_paged_clear(s, row, from, from);
        return;
    }
    int32_t *e = bt_row_ids(s, row);
    for (uint32_t i = from; i < s->cfg.row_width; i++)
        bt_store_relaxed(&e[i], 0);
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

/* Put ids at entry `at` (the row's length: an append) under the seqlock. */
void bt_row_put(bt_seg *s, uint32_t row, uint32_t at, const int32_t *ids, uint32_t n)
{
    bt_row_write_begin(&s->rows[row]);
    put_entries(s, row, at, ids, n);
    bt_row_write_end(&s->rows[row]);
}

/* Copy the row's first n entries out (owner's view, no seqlock needed). */
static void get_entries(const bt_seg *s, uint32_t row, uint32_t n, int32_t *out)
{
    for (uint32_t i = 0; i < n; i++)
        out[i] = bt_entry_get(s, row, i);
}

/* Truncate a dense row to `keep` entries under the seqlock (past nb is zero
 * already), copying the cut ones to `out` (room for nb - keep; NULL: not
 * wanted, a RAW row) for the caller to release after. Returns how many. */
static uint32_t dense_truncate(bt_seg *s, uint32_t row, uint32_t keep, int32_t *out)
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

/* Truncate a row to keep <= num_blocks entries, releasing the cut references
 * of a MANAGED row. Paged rows go through their directory (holes cost
 * nothing, and a billion-entry row holding one block needs no big buffer). */
static int truncate_row(bt_seg *s, uint32_t row, uint32_t keep)
{
    uint32_t nb = bt_row_nblocks(s, row);
    int managed = bt_row_managed(s, row);
    if (keep >= nb)
        return BT_OK;
    if (bt_row_paged(s, row))
        return bt_paged_truncate(s, row, keep, managed);
    int32_t small[256], *cut = !managed ? NULL : nb - keep <= 256 ? small :
                               malloc((size_t)(nb - keep) * sizeof(int32_t));
    if (managed && !cut)
        return -ENOMEM;
    uint32_t n = dense_truncate(s, row, keep, cut);
    if (managed)
        bt_refs_release(s, cut, n);
    if (cut != small)
        free(cut);
    return BT_OK;
}

/* ---- claim and release -------------------------------------------------------- */

/* Take a free row's owner word (hint >= 0: that row only). Searches start
 * at *cursor (a batch reads the shared cursor once: UINT32_MAX) and leave it
 * past the row taken, so a batch of claims walks the table once. */
static int take_one(bt_seg *s, uint32_t id, int32_t hint, uint32_t *cursor, uint32_t *row_out)
{
    uint32_t n = s->cfg.num_rows;
    if (hint < 0 && *cursor == UINT32_MAX)
        *cursor = bt_fetch_add_relaxed(&s->hdr->row_cursor, 1u) % n;
    uint32_t start = hint >= 0 ? (uint32_t)hint : *cursor;
    for (uint32_t k = 0; k < (hint >= 0 ? 1 : n); k++) {
        uint32_t row = start + k < n ? start + k : start + k - n, zero = 0;
        if (bt_load_relaxed(&s->rows[row].owner) == 0 &&     /* look before the CAS */
            bt_cas_acqrel(&s->rows[row].owner, &zero, id)) {
            *row_out = row;
            if (hint < 0)
                *cursor = row + 1 < n ? row + 1 : 0;
            return BT_OK;
        }
    }
    return hint >= 0 ? BT_EROWSTATE : BT_ENOROWS;
}

/* Take n free rows' owner words, touching nothing else, so that running out
 * of rows hands them back with no trace (all or nothing: BT_ENOROWS). */
int bt_rows_take(bt_seg *s, uint32_t id, uint32_t n, uint32_t *rows_out)
{
    uint32_t i = 0, cursor = UINT32_MAX;
    int rc = BT_OK;
    while (i < n && !(rc = take_one(s, id, -1, &cursor, &rows_out[i])))
        i++;
    if (cursor != UINT32_MAX)
        bt_store_relaxed(&s->hdr->row_cursor, cursor);  /* a hint for the next claimer */
    if (rc)
        bt_rows_untake(s, rows_out, i);
    return rc;
}

/* Hand back rows taken but never initialised: nothing else was written. */
void bt_rows_untake(bt_seg *s, const uint32_t *rows, uint32_t n)
{
    for (uint32_t i = n; i-- > 0;)
        bt_store_release(&s->rows[rows[i]].owner, 0u);
}

/* Make taken rows the requests': new generation, empty, key and flags. */
void bt_rows_init(bt_seg *s, uint32_t id, const uint32_t *rows, const uint64_t *keys,
                  uint32_t n, uint32_t flags)
{
    for (uint32_t i = 0; i < n; i++) {
        uint32_t row = rows[i];
        struct bt_row *r = &s->rows[row];
        bt_row_rewrite_begin(r);
        if (bt_load_relaxed(&s->nblocks[row]) != 0) {  /* should never be: heal */
            bt_store_relaxed(&s->nblocks[row], 0);
            clear_from(s, row, 0);
        }
        bt_store_relaxed(&r->key, keys[i]);
        bt_store_relaxed(&r->flags, flags);
        bt_store_relaxed(&r->generation, bt_load_relaxed(&r->generation) + 1);
        bt_store_relaxed(&s->ntokens[row], (int64_t)0);
        bt_row_write_end(r);
    }
    bt_nrows_add(s, id, (int32_t)n);
}

/* Release rows[0..n) of client id: every entry truncated and the MANAGED
 * references released in one batch after the rows let go of them, a paged
 * row's chunks given back (past num_blocks too), tokens 0, the owner word
 * freed. -ENOMEM before anything changed (scratch for more than 1024 dense
 * MANAGED entries). */
int bt_rows_release(bt_seg *s, uint32_t id, const uint32_t *rows, uint32_t n)
{
    if (n == 1 && !bt_row_paged(s, rows[0])) {   /* one dense row: no batch to gather */
        int rc = truncate_row(s, rows[0], 0);
        if (rc)
            return rc;
        bt_store_relaxed(&s->ntokens[rows[0]], (int64_t)0);
        bt_store_release(&s->rows[rows[0]].owner, 0u);
        bt_nrows_add(s, id, -1);
        return BT_OK;
    }
    uint64_t total = 0;
    for (uint32_t i = 0; i < n; i++)
        if (bt_row_managed(s, rows[i]) && !bt_row_paged(s, rows[i]))
            total += bt_row_nblocks(s, rows[i]);
    int32_t small[1024], *cut = total <= 1024 ? small : malloc(total * sizeof(int32_t));
    if (!cut)
        return -ENOMEM;
    uint32_t k = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t row = rows[i];
        int managed = bt_row_managed(s, row);
        if (bt_row_paged(s, row))       /* by directory: no buffer as long as the row */
            bt_paged_truncate(s, row, 0, managed);
        else if (managed)
            k += dense_truncate(s, row, 0, cut + k);
        else
            dense_truncate(s, row, 0, NULL);
        bt_store_relaxed(&s->ntokens[row], (int64_t)0);
        bt_store_release(&s->rows[row].owner, 0u);
    }
    bt_nrows_add(s, id, -(int32_t)n);
    bt_refs_release(s, cut, k);
    if (cut != small)
        free(cut);
    return BT_OK;
}

/* Write a check's verdict on a row (the segment is frozen): its count
 * becomes `good`; a dead owner's row, or a free one, forgets a paged
 * directory (its chunks may be someone else's: the repair rebuilds the chunk
 * list), any other is cleared past `good`; a dead owner's row is freed. */
void bt_row_repair(bt_seg *s, uint32_t row, uint32_t good, int dead)
{
    struct bt_row *r = &s->rows[row];
    uint32_t o = bt_load_relaxed(&r->owner);
    bt_row_rewrite_begin(r);
    bt_store_relaxed(&s->nblocks[row], (int32_t)good);
    if (bt_row_paged(s, row) && (dead || o == 0))
        bt_paged_forget(s, row);
    else
        clear_from(s, row, good);
    if (dead)
        bt_store_relaxed(&s->ntokens[row], (int64_t)0);
    bt_row_write_end(r);
    if (dead)
        bt_store_release(&r->owner, 0u);
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
    uint32_t cursor = UINT32_MAX;
    if (!(rc = take_one(cl->seg, cl->id, hint, &cursor, row_out)))
        bt_rows_init(cl->seg, cl->id, row_out, &key, 1, flags);
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
    if (!(rc = bt_rows_take(cl->seg, cl->id, n, rows_out)))
        bt_rows_init(cl->seg, cl->id, rows_out, keys, n, flags);
    bt_op_end(cl);
    return rc;
}

static int release_one(bt_client *cl, uint32_t row, struct bt_row *r, uint64_t x, uint64_t y)
{
    (void)r, (void)x, (void)y;
    return bt_rows_release(cl->seg, cl->id, &row, 1);
}

int bt_row_release(bt_client *cl, uint32_t row)
{
    return bt_row_in_op(cl, row, release_one, 0, 0);
}

/* ---- appends ------------------------------------------------------------------ */

/* Where an append's references come from. */
enum { FROM_HAND, SHARED, FROM_POOL };

/* The append family, in one order: the row checked (owned, kind, room, ids),
 * chunks reserved, references taken (moved from the hand, new counts on
 * held blocks, or fresh blocks popped into ids: scratch if NULL), entries
 * put; a failure after the reservation gives the chunks back. In an op. */
static inline int append(bt_client *cl, uint32_t row, int from, uint32_t pool, int32_t *ids, uint32_t n)
{
    bt_seg *s = cl->seg;
    struct bt_row *r;
    int rc = bt_row_owned(cl, row, &r);
    if (rc)
        return rc;
    int managed = bt_row_managed(s, row);
    uint32_t nb = bt_row_nblocks(s, row);
    if (from != FROM_HAND && !managed)
        return BT_EROWSTATE;
    if ((uint64_t)nb + n > bt_row_cap(s, row))
        return BT_EROWFULL;
    if (from != FROM_POOL && (rc = check_ids(s, row, ids, n)))
        return rc;
    if (from == FROM_HAND && managed && (rc = bt_hand_find_all(cl, ids, n)))
        return rc;
    if (!n)
        return BT_OK;
    int32_t small[256], *buf = ids ? ids : n <= 256 ? small : malloc((size_t)n * sizeof(int32_t));
    if (!buf)
        return -ENOMEM;
    if (!(rc = bt_paged_reserve(s, row, nb, nb + n))) {
        rc = from == SHARED ? bt_incref_many(s, buf, n) :
             from == FROM_POOL ? bt_mag_pop(cl, pool, n, buf) : BT_OK;
        if (!rc) {
            bt_row_put(s, row, nb, buf, n);
            if (from == FROM_HAND && managed)
                bt_hand_pop(cl, n);     /* the references now live in the row */
        } else if (bt_row_paged(s, row)) {
            bt_paged_clear(s, row, nb, nb);   /* give back the chunks reserved */
        }
    }
    if (buf != ids && buf != small)
        free(buf);
    return rc;
}

static inline int append_in_op(bt_client *cl, uint32_t row, int from, uint32_t pool, int32_t *ids, uint32_t n)
{
    int rc = bt_op_begin(cl);
    if (rc)
        return rc;
    rc = append(cl, row, from, pool, ids, n);
    bt_op_end(cl);
    return rc;
}

int bt_row_append(bt_client *cl, uint32_t row, const int32_t *ids, uint32_t n)
{
    if (!cl || (!ids && n))
        return BT_EINVAL;
    return append_in_op(cl, row, FROM_HAND, 0, (int32_t *)ids, n);
}

int bt_row_append_shared(bt_client *cl, uint32_t row, const int32_t *ids, uint32_t n)
{
    if (!cl || (!ids && n))
        return BT_EINVAL;
    return append_in_op(cl, row, SHARED, 0, (int32_t *)ids, n);
}

int bt_row_alloc_append(bt_client *cl, uint32_t row, uint32_t pool, uint32_t n, int32_t *ids_out)
{
    if (!cl)
        return BT_EINVAL;
    int rc = bt_stack_pool_err(cl->seg, pool);
    return rc ? rc : append_in_op(cl, row, FROM_POOL, pool, ids_out, n);
}

/* ---- the rest of the row API -------------------------------------------------- */

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
                clear_from(cl->seg, row, n);
                bt_row_write_end(r);
                if (managed) {
                    bt_hand_pop(cl, n);
                    bt_refs_release(cl->seg, old, nb);
                }
                if (old != small)
                    free(old);
            }
        }
    }
    bt_op_end(cl);
    return rc;
}

static int truncate_owned(bt_client *cl, uint32_t row, struct bt_row *r, uint64_t keep, uint64_t y)
{
    (void)r, (void)y;
    if (keep > bt_row_nblocks(cl->seg, row))
        return BT_ERANGE;
    return truncate_row(cl->seg, row, (uint32_t)keep);
}

int bt_row_truncate(bt_client *cl, uint32_t row, uint32_t keep)
{
    return bt_row_in_op(cl, row, truncate_owned, keep, 0);
}

static int set_tokens(bt_client *cl, uint32_t row, struct bt_row *r, uint64_t num_tokens, uint64_t y)
{
    (void)y;
    bt_row_write_begin(r);
    bt_store_relaxed(&cl->seg->ntokens[row], (int64_t)num_tokens);
    bt_row_write_end(r);
    return BT_OK;
}

/* A write like any other, in the protocol: freeze, fork, reaping. */
int bt_row_set_tokens(bt_client *cl, uint32_t row, int64_t num_tokens)
{
    if (!cl || num_tokens < 0)
        return BT_EINVAL;
    return bt_row_in_op(cl, row, set_tokens, (uint64_t)num_tokens, 0);
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

/* Swap, or move = exchange, then release what dst held (now in a): a ends
 * zeroed and dst's old references are released, never leaked. */
static int exchange_in_op(bt_client *cl, uint32_t a, uint32_t b, int move)
{
    if (!cl)
        return BT_EINVAL;
    int rc = bt_op_begin(cl);
    if (rc)
        return rc;
    if (!(rc = exchange(cl, a, b)) && move && a != b) {
        rc = truncate_row(cl->seg, a, 0);
        bt_store_relaxed(&cl->seg->ntokens[a], (int64_t)0);
    }
    bt_op_end(cl);
    return rc;
}

int bt_row_move(bt_client *cl, uint32_t src, uint32_t dst) { return exchange_in_op(cl, src, dst, 1); }
int bt_row_swap(bt_client *cl, uint32_t a, uint32_t b) { return exchange_in_op(cl, a, b, 0); }

int bt_row_read(const bt_seg *s, uint32_t row, int32_t *ids, uint32_t cap, bt_row_info *info)
{
    if (!s)
        return BT_EINVAL;
    if (row >= s->cfg.num_rows)
        return BT_ERANGE;
    const struct bt_row *r = &s->rows[row];
    uint64_t t0 = 0;
    for (uint32_t spin = 0, s1; !bt_seq_backoff(spin, &t0); spin++) {
        if (!bt_seq_read_begin(&r->seq, &s1))
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
        if (bt_seq_read_retry(&r->seq, s1))
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
