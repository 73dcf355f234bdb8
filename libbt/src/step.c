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
        if (bt_row_managed(s, rows[i]))
            total += bt_row_nblocks(s, rows[i]);
    int32_t small[1024], *drop = total <= 1024 ? small : malloc(total * sizeof(int32_t));
    if (!drop)
        return -ENOMEM;             /* before anything changed */
    uint32_t k = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t row = rows[i];
        int managed = bt_row_managed(s, row);
        k += bt_row_cut(s, row, 0, managed ? drop + k : NULL) * (uint32_t)managed;
        bt_store_relaxed(&s->ntokens[row], (int64_t)0);
        bt_store_release(&s->rows[row].owner, 0u);
    }
    __atomic_fetch_sub(&cl->slot->nrows, n, __ATOMIC_RELAXED);
    bt_drop_refs(s, drop, k);
    if (drop != small)
        free(drop);
    return BT_OK;
}

int bt_step(bt_client *cl, uint32_t pool, const uint32_t *free_rows, uint32_t n_free,
            const uint32_t *rows, const uint32_t *n_new, uint32_t n_rows, int32_t *ids_out)
{
    uint64_t total;
    if (!cl || (n_free && !free_rows) || (n_rows && (!rows || !n_new)) || (n_rows && !ids_out))
        return BT_EINVAL;
    bt_seg *s = cl->seg;
    if (pool >= s->cfg.num_pools)
        return BT_ERANGE;
    int rc = bt_op_begin(cl);
    if (rc)
        return rc;
    if ((rc = step_check(cl, free_rows, n_free, rows, n_new, n_rows, &total)))
        goto out;
    /* Ending requests go first, so their blocks can serve this very step. */
    if (n_free && (rc = release_rows(cl, free_rows, n_free)))
        goto out;
    if (total > s->cfg.blocks_per_pool)
        rc = BT_ENOBLOCKS;              /* more than the pool could ever hold */
    else if (total)
        rc = bt_pop_raw(s, pool, (uint32_t)total, cl->id, ids_out);
    if (rc)
        goto out;
    const int32_t *src = ids_out;
    for (uint32_t j = 0; j < n_rows; j++) {
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
out:
    bt_op_end(cl);
    return rc;
}
