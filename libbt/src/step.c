/*
 * step.c -- a whole scheduler step in one call: the per-call cost of Python
 * is the enemy, not the CAS. Validate everything, release the ending rows
 * (their blocks can serve the same step), pop every new block with one CAS,
 * then fill the growing rows.
 */
#include <errno.h>
#include <stdlib.h>
#include "bt_internal.h"

static inline int mark_test_set(uint8_t *m, uint32_t i)
{
    int was = m[i >> 3] >> (i & 7) & 1;
    m[i >> 3] |= (uint8_t)(1u << (i & 7));
    return was;
}

static void mark_clear(uint8_t *m, const uint32_t *rows, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        m[rows[i] >> 3] = 0;
}

/* Every row valid, owned, listed once over both lists; growing rows MANAGED
 * dense with room. Marks are cleared for exactly the rows that were marked. */
static int step_check(bt_client *cl, const uint32_t *free_rows, uint32_t n_free,
                      const uint32_t *rows, const uint32_t *n_new, uint32_t n_rows,
                      uint64_t *total)
{
    bt_seg *s = cl->seg;
    struct bt_row *r;
    int rc = BT_OK;
    uint32_t nf = 0, ng = 0;            /* rows marked in each list */
    *total = 0;
    for (; nf < n_free; nf++) {
        if ((rc = bt_row_owned(cl, free_rows[nf], &r)))
            break;
        if (mark_test_set(cl->mark, free_rows[nf])) {
            rc = BT_EINVAL;             /* listed twice: the first mark stays ours */
            break;
        }
    }
    for (; !rc && ng < n_rows; ng++) {
        if ((rc = bt_row_owned(cl, rows[ng], &r)))
            break;
        if (mark_test_set(cl->mark, rows[ng])) {
            rc = BT_EINVAL;
            break;
        }
        if (bt_load_relaxed(&r->flags) != BT_ROW_MANAGED)
            rc = BT_EROWSTATE;          /* step grows dense managed rows */
        else if ((uint64_t)bt_row_nblocks(s, rows[ng]) + n_new[ng] > s->cfg.row_width)
            rc = BT_EROWFULL;
        *total += n_new[ng];
        if (rc) {
            ng++;                       /* this one was marked */
            break;
        }
    }
    mark_clear(cl->mark, free_rows, nf);
    mark_clear(cl->mark, rows, ng);
    return rc;
}

/* Release ending rows, dropping all their references in one batch. */
static int release_rows(bt_client *cl, const uint32_t *rows, uint32_t n)
{
    bt_seg *s = cl->seg;
    uint64_t total = 0;
    for (uint32_t i = 0; i < n; i++)
        if (bt_row_managed(s, rows[i]) && !bt_row_paged(s, rows[i]))
            total += bt_row_nblocks(s, rows[i]);
    int32_t small[1024], *drop = total <= 1024 ? small : malloc(total * sizeof(int32_t));
    if (!drop)
        return -ENOMEM;             /* before anything changed */
    uint32_t k = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t row = rows[i];
        int managed = bt_row_managed(s, row);
        if (bt_row_paged(s, row))       /* by directory: no buffer as long as the row */
            bt_paged_shrink(s, row, 0, managed);
        else
            k += bt_row_cut(s, row, 0, managed ? drop + k : NULL) * (uint32_t)managed;
        bt_store_relaxed(&s->ntokens[row], (int64_t)0);
        bt_store_release(&s->rows[row].owner, 0u);
    }
    bt_nrows_add(cl, -(int32_t)n);
    bt_drop_refs(s, drop, k);
    if (drop != small)
        free(drop);
    return BT_OK;
}

/* Give arrivals their rows (owner words only: nothing to undo but those). */
static int arrive_take(bt_client *cl, const bt_step_args *a)
{
    int rc = BT_OK;
    uint32_t i = 0, cursor = UINT32_MAX;
    while (i < a->n_arrive && !(rc = bt_claim_take(cl, -1, &cursor, &a->arrive_rows[i])))
        i++;
    if (cursor != UINT32_MAX)
        bt_store_relaxed(&cl->seg->hdr->row_cursor, cursor);  /* a hint for the next claimer */
    while (rc && i-- > 0)
        bt_store_release(&cl->seg->rows[a->arrive_rows[i]].owner, 0u);
    return rc;
}

/* Append the popped ids to rows[0..n) in order; returns the ids used. */
static const int32_t *fill_rows(bt_seg *s, const uint32_t *rows, const uint32_t *n_new,
                                uint32_t n, const int32_t *src)
{
    for (uint32_t j = 0; j < n; j++) {
        uint32_t row = rows[j], nb = bt_row_nblocks(s, row);
        int32_t *e = bt_row_ids(s, row);
        if (!n_new[j])
            continue;
        bt_row_write_begin(&s->rows[row]);
        for (uint32_t k = 0; k < n_new[j]; k++)
            bt_store_relaxed(&e[nb + k], src[k]);
        bt_store_relaxed(&s->nblocks[row], (int32_t)(nb + n_new[j]));
        bt_row_write_end(&s->rows[row]);
        src += n_new[j];
    }
    return src;
}

static int step_args_ok(const bt_step_args *a)
{
    return (!a->n_free || a->free_rows) && (!a->n_rows || (a->rows && a->n_new)) &&
           (!a->n_arrive || (a->arrive_keys && a->arrive_n && a->arrive_rows));
}

int bt_step_ex(bt_client *cl, bt_step_args *a)
{
    uint64_t total = 0, grow;
    if (!cl || !a || !step_args_ok(a))
        return BT_EINVAL;
    bt_seg *s = cl->seg;
    int prc = bt_stack_pool_err(s, a->pool);    /* a cache pool: BT_EINVAL */
    if (prc)
        return prc;
    for (uint32_t i = 0; i < a->n_arrive; i++) {
        if (a->arrive_n[i] > s->cfg.row_width)
            return BT_EROWFULL;
        total += a->arrive_n[i];
    }
    for (uint32_t i = 0; i < a->n_rows; i++)
        total += a->n_new[i];
    a->ids_total = total;
    if (total > a->ids_cap || (total && !a->ids_out))
        return BT_EINVAL;
    int rc = bt_op_begin(cl);
    if (rc)
        return rc;
    if ((rc = step_check(cl, a->free_rows, a->n_free, a->rows, a->n_new, a->n_rows, &grow)))
        goto out;
    /* Ending requests go first, so their blocks can serve this very step. */
    if (a->n_free && (rc = release_rows(cl, a->free_rows, a->n_free)))
        goto out;
    if ((rc = arrive_take(cl, a)))
        goto out;
    if (total > s->cfg.blocks_per_pool)
        rc = BT_ENOBLOCKS;              /* more than the pool could ever hold */
    else if (total)
        rc = bt_pop_raw(s, a->pool, (uint32_t)total, cl->id, a->ids_out);
    if (rc) {
        for (uint32_t i = 0; i < a->n_arrive; i++)
            bt_store_release(&s->rows[a->arrive_rows[i]].owner, 0u);
        goto out;
    }
    for (uint32_t i = 0; i < a->n_arrive; i++)
        bt_claim_init(cl, a->arrive_rows[i], a->arrive_keys[i], BT_ROW_MANAGED);
    const int32_t *src = fill_rows(s, a->rows, a->n_new, a->n_rows, a->ids_out);
    fill_rows(s, a->arrive_rows, a->arrive_n, a->n_arrive, src);
out:
    bt_op_end(cl);
    return rc;
}

int bt_step(bt_client *cl, uint32_t pool, const uint32_t *free_rows, uint32_t n_free,
            const uint32_t *rows, const uint32_t *n_new, uint32_t n_rows, int32_t *ids_out)
{
    bt_step_args a = { .pool = pool, .n_free = n_free, .free_rows = free_rows, .n_rows = n_rows,
                       .rows = rows, .n_new = n_new, .ids_out = ids_out, .ids_cap = UINT64_MAX };
    return bt_step_ex(cl, &a);
}
