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
 * Tokens arrive grouped by request, so the per-row part (count, entries,
 * kind) is looked up once per run of tokens of one row, and the common case
 * (dense row, power-of-two block, no context parallelism) is a shift, a mask
 * and one bounds compare per token.
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

/* The entry that backs position pos >= 0 of a row of nb entries, and the
 * offset in its block: -1 if none does, or another rank keeps pos. */
static int64_t entry_of(const struct sp *p, int64_t pos, uint32_t nb, int64_t *off)
{
    int64_t bi = pos / p->vbs;
    if (bi >= nb)
        return -1;
    int64_t v = pos % p->vbs;
    if (p->world > 1 && (v / p->il) % p->world != p->rank)
        return -1;
    *off = v / (p->world * p->il) * p->il + v % p->il;
    return bi;
}

/* A paged row's hole (entry 0) backs nothing: -1. */
static int64_t slot_paged(const bt_seg *s, const struct sp *p, uint32_t row, int64_t pos, uint32_t nb)
{
    int64_t off, bi = entry_of(p, pos, nb, &off);
    int32_t id = bi < 0 ? 0 : bt_entry_get(s, row, (uint32_t)bi);
    return id == 0 ? -1 : (int64_t)id * p->bs + off;
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
        return (int64_t)((uint64_t)(int64_t)bt_load_relaxed(&e[bi]) << p->shift) | (pos & (p->bs - 1));
    }
    int64_t off, bi = entry_of(p, pos, nb, &off);
    return bi < 0 ? -1 : (int64_t)bt_load_relaxed(&e[bi]) * p->bs + off;
}

/* The per-row part of a slot computation, cached while consecutive tokens
 * belong to the same row (the usual case: tokens come grouped by request). */
struct rowc {
    uint32_t row;
    int      paged;
    uint32_t nb;
    int64_t  lim;                       /* first position past the row's blocks (fast path) */
    const int32_t *e;
};

static inline void rowc_load(const bt_seg *s, const struct sp *p, struct rowc *c, uint32_t row)
{
    c->row = row;
    c->paged = bt_row_paged(s, row);
    c->nb = bt_row_nblocks(s, row);
    c->e = bt_row_ids(s, row);
    c->lim = p->shift >= 0 ? (int64_t)c->nb << p->shift : 0;
}

/* Fill out[0..n) for positions pos[0..n) of one row. */
static void slots_run(const bt_seg *s, const struct sp *p, const struct rowc *c,
                      const int64_t *pos, uint32_t n, int64_t *out)
{
    if (p->shift >= 0 && !c->paged) {
        int sh = p->shift;
        int64_t mask = p->bs - 1;
        /* Branch-free: an out-of-range position reads entry 0 (always
         * there) and the select drops it. Unsigned shift: a scribbled
         * negative id is no UB. */
        const int32_t *e = c->e;
        uint64_t lim = (uint64_t)c->lim;
        for (uint32_t i = 0; i < n; i++) {
            int64_t x = pos[i];
            int in = (uint64_t)x < lim;
            int64_t id = bt_load_relaxed(&e[in ? x >> sh : 0]);
            int64_t v = (int64_t)((uint64_t)id << sh) | (x & mask);
            out[i] = in ? v : -1;
        }
        return;
    }
    for (uint32_t i = 0; i < n; i++)
        out[i] = slot_of(s, p, c->row, pos[i]);
}

int bt_slots_row(const bt_seg *s, const bt_slot_params *prm, uint32_t row,
                 int64_t start, uint32_t n, int64_t *out)
{
    struct sp p;
    struct rowc c;
    if (!s || (!out && n))
        return BT_EINVAL;
    if (row >= s->cfg.num_rows)
        return BT_ERANGE;
    int rc = sp_init(s, prm, &p);
    if (rc)
        return rc;
    rowc_load(s, &p, &c, row);
    /* positions start + i, computed unsigned: past INT64_MAX they wrap
     * negative, which maps to -1 like any position no block backs */
    for (uint32_t i = 0; i < n; i++)
        out[i] = (int64_t)((uint64_t)start + i);
    slots_run(s, &p, &c, out, n, out);
    return BT_OK;
}

/* Out is the caller's scratch: on BT_ERANGE its first entries may be written. */
int bt_slots_req(const bt_seg *s, const bt_slot_params *prm, const int32_t *rows,
                 const int64_t *pos, uint32_t n, int64_t *out)
{
    struct sp p;
    struct rowc c = { .row = UINT32_MAX };
    if (!s || (n && (!rows || !pos || !out)))
        return BT_EINVAL;
    int rc = sp_init(s, prm, &p);
    if (rc)
        return rc;
    for (uint32_t i = 0; i < n;) {
        uint32_t row = (uint32_t)rows[i], j = i + 1;
        if (row >= s->cfg.num_rows)     /* negatives wrap: refused */
            return BT_ERANGE;
        while (j < n && (uint32_t)rows[j] == row)
            j++;
        if (row != c.row)
            rowc_load(s, &p, &c, row);
        slots_run(s, &p, &c, pos + i, j - i, out + i);
        i = j;
    }
    return BT_OK;
}

int bt_slots_qsl(const bt_seg *s, const bt_slot_params *prm, const int32_t *rows,
                 const int32_t *qsl, uint32_t num_reqs, const int64_t *pos,
                 int64_t *out, uint32_t out_len)
{
    struct sp p;
    struct rowc c;
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
        rowc_load(s, &p, &c, rows ? (uint32_t)rows[i] : i);
        slots_run(s, &p, &c, pos + qsl[i], (uint32_t)(qsl[i + 1] - qsl[i]), out + qsl[i]);
    }
    for (uint32_t t = (uint32_t)qsl[num_reqs]; t < out_len; t++)
        out[t] = -1;
    return BT_OK;
}
