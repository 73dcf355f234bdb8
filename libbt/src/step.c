/*
 * step.c -- a whole scheduler step in one call: the per-call cost of Python
 * is the enemy, not the CAS. Validate everything, release the ending rows
 * (their blocks can serve the same step), pop every new block with one CAS,
 * then fill the growing rows. The rows are written by rows.c's batch
 * entries (bt_rows_release, bt_rows_take, bt_rows_init, bt_row_put).
 */
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

/* Append the popped ids to rows[0..n) in order; returns the ids not used. */
static const int32_t *put_new(bt_seg *s, const uint32_t *rows, const uint32_t *n_new,
                              uint32_t n, const int32_t *src)
{
    for (uint32_t j = 0; j < n; j++) {
        if (!n_new[j])
            continue;
        bt_row_put(s, rows[j], bt_row_nblocks(s, rows[j]), src, n_new[j]);
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
    if (a->n_free && (rc = bt_rows_release(s, cl->id, a->free_rows, a->n_free)))
        goto out;
    if ((rc = bt_rows_take(s, cl->id, a->n_arrive, a->arrive_rows)))
        goto out;
    if (total > s->cfg.blocks_per_pool)
        rc = BT_ENOBLOCKS;              /* more than the pool could ever hold */
    else if (total)
        rc = bt_mag_pop(cl, a->pool, (uint32_t)total, a->ids_out);
    if (rc) {
        bt_rows_untake(s, a->arrive_rows, a->n_arrive);
        goto out;
    }
    bt_rows_init(s, cl->id, a->arrive_rows, a->arrive_keys, a->n_arrive, BT_ROW_MANAGED);
    const int32_t *src = put_new(s, a->rows, a->n_new, a->n_rows, a->ids_out);
    put_new(s, a->arrive_rows, a->arrive_n, a->n_arrive, src);
out:
    bt_op_end(cl);
    return rc;
}

/* The counts are the only thing a plan changes between steps: checked and
 * set here, in the call, so that the caller's per-step work is one call. */
int64_t bt_step_run(bt_client *cl, bt_step_args *a, uint32_t n_free, uint32_t n_rows,
                    uint32_t n_arrive, const uint32_t *caps)
{
    if (!a || !caps)
        return BT_EINVAL;
    if (n_free > caps[0] || n_rows > caps[1] || n_arrive > caps[2])
        return BT_EINVAL;
    a->n_free = n_free;
    a->n_rows = n_rows;
    a->n_arrive = n_arrive;
    int rc = bt_step_ex(cl, a);
    return rc ? rc : (int64_t)a->ids_total;
}

int bt_step(bt_client *cl, uint32_t pool, const uint32_t *free_rows, uint32_t n_free,
            const uint32_t *rows, const uint32_t *n_new, uint32_t n_rows, int32_t *ids_out)
{
    bt_step_args a = { .pool = pool, .n_free = n_free, .free_rows = free_rows, .n_rows = n_rows,
                       .rows = rows, .n_new = n_new, .ids_out = ids_out, .ids_cap = UINT64_MAX };
    return bt_step_ex(cl, &a);
}
