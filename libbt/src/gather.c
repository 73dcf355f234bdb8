/*
 * gather.c -- a worker's block table from the rows a scheduler wrote.
 *
 * vLLM's workers keep a private copy of every request's block ids, rebuilt
 * from the scheduler's messages. Here they read the scheduler's rows instead,
 * by request key, in batch order: one call per step, no Python per row.
 * Read-only: readers never write the segment, so any number of workers (one
 * per tensor-parallel rank) gather the same rows at once.
 */
#include <errno.h>
#include "bt_internal.h"

/* One consistent read of `row` for `key`: entries into dst (width w, zero
 * filled past them). Returns 1 and the row's count/generation if the row is
 * claimed with that key, 0 if not, BT_EBUSY if its writer stayed mid-write. */
static int read_keyed(const bt_seg *s, uint32_t row, uint64_t key, int32_t *dst, uint32_t w,
                      uint32_t *nb_out, uint32_t *gen_out)
{
    const struct bt_row *r = &s->rows[row];
    uint64_t t0 = 0;
    for (uint32_t spin = 0; !bt_seq_backoff(spin, &t0); spin++) {
        uint32_t s1 = bt_load_acquire(&r->seq);
        if (s1 & 1u)
            continue;
        uint32_t owner = bt_load_relaxed(&r->owner);
        uint64_t k = bt_load_relaxed(&r->key);
        uint32_t gen = bt_load_relaxed(&r->generation);
        int32_t raw = bt_load_relaxed(&s->nblocks[row]);
        /* A scribbled count is clamped to what the row can hold: the copy
         * stays inside the row; the caller compares counts with its own. */
        uint32_t nb = raw < 0 ? 0 : (uint32_t)raw > bt_row_cap(s, row) ? bt_row_cap(s, row) : (uint32_t)raw;
        int match = owner != 0 && k == key;
        if (match && dst) {
            uint32_t m = nb < w ? nb : w;
            if (!bt_row_paged(s, row)) {
                const int32_t *e = bt_row_ids(s, row);
                for (uint32_t i = 0; i < m; i++)
                    dst[i] = bt_load_relaxed(&e[i]);
            } else {
                for (uint32_t i = 0; i < m; i++)
                    dst[i] = bt_entry_get(s, row, i);
            }
        }
        bt_fence_acquire();
        if (bt_load_relaxed(&r->seq) != s1)
            continue;
        /* The owner word is released without the seqlock (bt_rows_release), after
         * the entries were cut under it: re-read it so that a release that
         * finished while we copied is seen as a free row. */
        if (match && bt_load_acquire(&r->owner) == 0)
            match = 0;
        if (!match)
            return 0;
        *nb_out = nb;
        *gen_out = gen;
        return 1;
    }
    return BT_EBUSY;
}

int bt_row_find(const bt_seg *s, uint64_t key, uint32_t *row_out)
{
    if (!s || !row_out)
        return BT_EINVAL;
    uint32_t nb, gen;
    for (uint32_t row = 0; row < s->cfg.num_rows; row++) {
        const struct bt_row *r = &s->rows[row];
        /* Cheap unlocked filter first; the seqlocked read confirms. */
        if (bt_load_relaxed(&r->owner) == 0 || bt_load_relaxed(&r->key) != key)
            continue;
        int rc = read_keyed(s, row, key, NULL, 0, &nb, &gen);
        if (rc < 0)
            return rc;
        if (rc == 1) {
            *row_out = row;
            return BT_OK;
        }
    }
    return -ENOENT;
}

static void zero(int32_t *p, uint32_t from, uint32_t to)
{
    for (uint32_t i = from; i < to; i++)
        p[i] = 0;
}

/* Key i through its hint, else by a search; a row found by search may be
 * released before it is read, so the search is retried a few times. */
static int gather_one(const bt_seg *s, uint64_t key, uint64_t *hint, int32_t *dst, uint32_t w,
                      int32_t *nb_out)
{
    uint32_t nb = 0, gen = 0;
    uint64_t h = *hint;
    uint32_t hrow = (uint32_t)h, hgen = (uint32_t)(h >> 32);
    if (hrow >= 1 && hrow <= s->cfg.num_rows) {
        int rc = read_keyed(s, hrow - 1, key, dst, w, &nb, &gen);
        if (rc < 0)
            return rc;
        if (rc == 1 && gen == hgen)
            goto found;
    }
    for (int tries = 0; tries < 4; tries++) {
        uint32_t row;
        int rc = bt_row_find(s, key, &row);
        if (rc == -ENOENT)
            break;
        if (rc < 0)
            return rc;
        rc = read_keyed(s, row, key, dst, w, &nb, &gen);
        if (rc < 0)
            return rc;
        if (rc == 1) {
            *hint = (uint64_t)gen << 32 | (uint64_t)(row + 1);
            goto found;
        }
    }
    *hint = 0;
    *nb_out = -1;
    zero(dst, 0, w);
    return BT_OK;
found:
    zero(dst, nb < w ? nb : w, w);
    *nb_out = (int32_t)nb;
    return BT_OK;
}

int bt_rows_gather(const bt_seg *s, const uint64_t *keys, uint32_t n, uint64_t *hints,
                   int32_t *out, uint32_t w, int32_t *nblocks_out)
{
    if (!s || w == 0 || (n && (!keys || !hints || !out || !nblocks_out)))
        return BT_EINVAL;
    for (uint32_t i = 0; i < n; i++) {
        int rc = gather_one(s, keys[i], &hints[i], out + (uint64_t)i * w, w, &nblocks_out[i]);
        if (rc < 0)
            return rc;
    }
    return BT_OK;
}
