/*
 * slots.c -- token position -> KV-cache slot, into a caller's int64 buffer.
 *
 *   slot = table[row][pos / bs] * bs + pos % bs      (-1: no block backs pos)
 *
 * With decode context parallelism a virtual block of vbs = bs * W tokens is
 * striped over W ranks in runs of I tokens (vLLM's dcp): this rank keeps
 * positions with (pos % vbs) / I % W == rank, at offset
 * (pos % vbs) / (W * I) * I + pos % I of the block.
 *
 * Rows are read without the seqlock (the scheduler that computes slots is
 * the rows' writer, or they are quiescent, as in vLLM), but every value read
 * from shared memory is bounded: num_blocks is clamped to the row width, so
 * a scribbled count can make a slot wrong, never a read stray.
 * All rows are checked before anything is written.
 */
#include "bt_internal.h"

struct sp {
    int64_t  bs, vbs, world, rank, il;
    int      shift;                     /* log2(bs) if a power of two and no cp, else -1 */
};

static int sp_init(const bt_seg *s, const bt_slot_params *p, struct sp *o)
{
    uint32_t bs = p && p->block_size ? p->block_size : s->cfg.block_size;
    uint32_t w = p && p->cp_world > 1 ? p->cp_world : 1;
    uint32_t il = p && p->cp_interleave ? p->cp_interleave : 1;
    uint32_t rank = p ? p->cp_rank : 0;
    if (bs == 0 || bs > (1u << 20) || w > 1024 || rank >= w || il > bs)
        return BT_EINVAL;
    if (w > 1 && bs % il)
        return BT_EINVAL;
    *o = (struct sp){ .bs = bs, .vbs = (int64_t)bs * w, .world = w, .rank = rank, .il = il, .shift = -1 };
    if (w == 1 && (bs & (bs - 1)) == 0)
        o->shift = __builtin_ctz(bs);
    return BT_OK;
}

/* A paged row's hole (entry 0) backs nothing: -1. */
static int64_t slot_paged(const bt_seg *s, const struct sp *p, uint32_t row, int64_t pos, uint32_t nb)
{
    int64_t bi = pos / p->vbs;
    if (bi >= nb)
        return -1;
    int64_t v = pos % p->vbs;
    if (p->world > 1 && (v / p->il) % p->world != p->rank)
        return -1;
    int32_t id = bt_entry_get(s, row, (uint32_t)bi);
    if (id == 0)
        return -1;
    return (int64_t)id * p->bs + v / (p->world * p->il) * p->il + v % p->il;
}

static inline int64_t slot_of(const bt_seg *s, const struct sp *p, uint32_t row, int64_t pos)
{
    if (pos < 0)
        return -1;
    uint32_t nb = bt_row_nblocks(s, row);
    if (bt_row_paged(s, row))
        return slot_paged(s, p, row, pos, nb);
    const int32_t *e = bt_row_ids(s, row);
    if (p->shift >= 0) {
        int64_t bi = pos >> p->shift;
        if (bi >= nb)
            return -1;
        return ((int64_t)bt_load_relaxed(&e[bi]) << p->shift) | (pos & (p->bs - 1));
    }
    int64_t bi = pos / p->vbs;
    if (bi >= nb)
        return -1;
    int64_t v = pos % p->vbs;
    if (p->world > 1 && (v / p->il) % p->world != p->rank)
        return -1;
    int64_t off = v / (p->world * p->il) * p->il + v % p->il;
    return (int64_t)bt_load_relaxed(&e[bi]) * p->bs + off;
}

int bt_slots_row(const bt_seg *s, const bt_slot_params *prm, uint32_t row,
                 int64_t start, uint32_t n, int64_t *out)
{
    struct sp p;
    if (!s || (!out && n))
        return BT_EINVAL;
    if (row >= s->cfg.num_rows)
        return BT_ERANGE;
    int rc = sp_init(s, prm, &p);
    if (rc)
        return rc;
    for (uint32_t i = 0; i < n; i++)
        out[i] = slot_of(s, &p, row, start + i);
    return BT_OK;
}

int bt_slots_req(const bt_seg *s, const bt_slot_params *prm, const int32_t *rows,
                 const int64_t *pos, uint32_t n, int64_t *out)
{
    struct sp p;
    if (!s || (n && (!rows || !pos || !out)))
        return BT_EINVAL;
    int rc = sp_init(s, prm, &p);
    if (rc)
        return rc;
    for (uint32_t i = 0; i < n; i++)
        if ((uint32_t)rows[i] >= s->cfg.num_rows)     /* negatives wrap: refused */
            return BT_ERANGE;
    for (uint32_t i = 0; i < n; i++)
        out[i] = slot_of(s, &p, (uint32_t)rows[i], pos[i]);
    return BT_OK;
}

int bt_slots_qsl(const bt_seg *s, const bt_slot_params *prm, const int32_t *rows,
                 const int32_t *qsl, uint32_t num_reqs, const int64_t *pos,
                 int64_t *out, uint32_t out_len)
{
    struct sp p;
    if (!s || !qsl || !out || (num_reqs && !pos))
        return BT_EINVAL;
    int rc = sp_init(s, prm, &p);
    if (rc)
        return rc;
    if (qsl[0] != 0)
        return BT_EINVAL;
    for (uint32_t i = 0; i < num_reqs; i++) {
        uint32_t row = rows ? (uint32_t)rows[i] : i;
        if (qsl[i + 1] < qsl[i] || (uint32_t)qsl[i + 1] > out_len)
            return BT_EINVAL;
        if (row >= s->cfg.num_rows)
            return BT_ERANGE;
    }
    for (uint32_t i = 0; i < num_reqs; i++) {
        uint32_t row = rows ? (uint32_t)rows[i] : i;
        for (int32_t t = qsl[i]; t < qsl[i + 1]; t++)
            out[t] = slot_of(s, &p, row, pos[t]);
    }
    for (uint32_t t = (uint32_t)qsl[num_reqs]; t < out_len; t++)
        out[t] = -1;
    return BT_OK;
}
