/*
 * test_paged.c -- paged rows (BT_ROW_PAGED): entries in chunks from a shared
 * chunk pool, holes, bt_row_set_block, bt_row_punch, chunk accounting.
 *
 * Chunks in use must stay between the chunks that hold a block and the
 * chunks that the rows' lengths span; every error leaves rows, counts and
 * the chunk pool as they were; a release gives every chunk back.
 */
#include <stddef.h>
#include "bt_test.h"
#include "bt_layout.h"

#define CS   4                           /* chunk size */
#define NCH  10                          /* chunks */
#define DIRW 8                           /* directory width: capacity 32 */
#define CAP  (CS * DIRW)

static bt_config cfg(void)
{
    bt_config c = t_config(1, 64, 6, 8);
    c.hand_size = 64;
    c.chunk_size = CS;
    c.num_chunks = NCH;
    c.dir_width = DIRW;
    return c;
}

static uint32_t chunks_free(const bt_seg *seg)
{
    uint32_t n = 0;
    T_OK(bt_chunks_free(seg, &n));
    return n;
}

static void test_basic(void)
{
    bt_config c = cfg();
    bt_seg *seg = t_seg_embedded(&c);
    bt_client *a = t_client(seg), *b = t_client(seg);
    uint32_t row, dense;
    int32_t x[CAP], got[CAP];

    T_EQ(chunks_free(seg), NCH);
    T_OK(bt_row_claim(a, 1, -1, BT_ROW_PAGED, &row));
    T_ASSERT(t_row(seg, row, NULL, 0).flags & BT_ROW_PAGED);
    T_OK(bt_row_alloc_append(a, row, 0, 5, x));
    T_EQ(chunks_free(seg), NCH - 2);
    bt_row_info ri = t_row(seg, row, got, CAP);
    T_EQ(ri.num_blocks, 5);
    for (int i = 0; i < 5; i++)
        T_EQ(got[i], x[i]);
    T_OK(bt_blocks_alloc(a, 0, 3, x + 5));
    T_OK(bt_row_append(a, row, x + 5, 3));
    T_EQ(chunks_free(seg), NCH - 2);
    T_OK(bt_row_alloc_append(a, row, 0, CAP - 8, x + 8));  /* past the dense width */
    T_EQ(chunks_free(seg), NCH - DIRW);
    ri = t_row(seg, row, got, CAP);
    T_EQ(ri.num_blocks, CAP);
    for (int i = 0; i < CAP; i++)
        T_EQ(got[i], x[i]);
    t_check_quiet(seg);

    /* full: nothing changes */
    t_snap *s = t_snap_take(seg);
    T_RC(bt_row_alloc_append(a, row, 0, 1, NULL), BT_EROWFULL);
    T_RC(bt_row_set_block(a, row, CAP, x[0]), BT_EROWFULL);
    T_SAME(seg, s);
    T_EQ(chunks_free(seg), NCH - DIRW);

    /* slot mapping reads through the chunks */
    int64_t out[CAP * 16 + 8];
    bt_slot_params sp = { 0 };
    T_OK(bt_slots_row(seg, &sp, row, 0, CAP * 16 + 8, out));
    for (int p = 0; p < CAP * 16 + 8; p++)
        T_EQ(out[p], p < CAP * 16 ? (int64_t)x[p / 16] * 16 + p % 16 : -1);

    /* truncate gives back the chunks past the cut */
    T_OK(bt_row_truncate(a, row, 6));
    T_EQ(chunks_free(seg), NCH - 2);
    T_EQ(t_free(seg, 0), 63 - 6);
    ri = t_row(seg, row, got, CAP);
    T_EQ(ri.num_blocks, 6);
    t_check_quiet(seg);
    T_OK(bt_row_release(a, row));
    T_EQ(chunks_free(seg), NCH);
    T_EQ(t_free(seg, 0), 63);

    /* set_block and punch are for paged rows only */
    T_OK(bt_row_claim(a, 2, -1, BT_ROW_MANAGED, &dense));
    T_OK(bt_blocks_alloc(a, 0, 1, x));
    s = t_snap_take(seg);
    T_RC(bt_row_set_block(a, dense, 0, x[0]), BT_EROWSTATE);
    T_RC(bt_row_punch(a, dense, 0, 0), BT_EROWSTATE);
    T_SAME(seg, s);
    bt_client_close(a);
    bt_client_close(b);
    t_check_quiet(seg);
    T_EQ(chunks_free(seg), NCH);
    bt_seg_close(seg);

    /* no chunk pool: no paged rows */
    c.chunk_size = c.num_chunks = c.dir_width = 0;
    seg = t_seg_embedded(&c);
    a = t_client(seg);
    T_ERR(bt_row_claim(a, 1, -1, BT_ROW_PAGED, &row));
    T_END(seg, a);
}

static void test_holes(void)
{
    bt_seg *seg = t_seg_new(cfg());
    bt_client *a = t_client(seg), *b = t_client(seg);
    uint32_t row, raw;
    int32_t x[4], got[CAP];
    int64_t out[12 * 16];
    bt_slot_params sp = { 0 };

    T_OK(bt_row_claim(a, 1, -1, BT_ROW_PAGED, &row));
    T_OK(bt_blocks_alloc(a, 0, 4, x));
    T_OK(bt_row_set_block(a, row, 10, x[0]));       /* holes 0..9 */
    bt_row_info ri = t_row(seg, row, got, CAP);
    T_EQ(ri.num_blocks, 11);
    for (int i = 0; i < 10; i++)
        T_EQ(got[i], 0);
    T_EQ(got[10], x[0]);
    T_EQ(chunks_free(seg), NCH - 1);                /* only chunk 2 */
    T_EQ(t_hand(seg, a), 3);
    T_EQ(t_refcnt(seg, x[0]), 1);
    T_OK(bt_slots_row(seg, &sp, row, 0, 12 * 16, out));
    for (int p = 0; p < 12 * 16; p++)
        T_EQ(out[p], p / 16 == 10 ? (int64_t)x[0] * 16 + p % 16 : -1);
    t_check_quiet(seg);

    T_OK(bt_row_set_block(a, row, 2, x[1]));
    T_EQ(chunks_free(seg), NCH - 2);
    T_OK(bt_row_set_block(a, row, 2, x[2]));        /* replaces: x[1] dropped */
    T_EQ(t_refcnt(seg, x[1]), 0);
    T_EQ(t_refcnt(seg, x[2]), 1);
    T_EQ(t_hand(seg, a), 1);
    T_OK(bt_row_set_block(a, row, 2, 0));           /* a hole: chunk 0 only holes */
    T_EQ(t_refcnt(seg, x[2]), 0);
    T_EQ(chunks_free(seg), NCH - 1);
    t_check_quiet(seg);

    /* errors change nothing */
    t_snap *s = t_snap_take(seg);
    T_RC(bt_row_set_block(a, row, 0, -1), BT_ERANGE);
    T_RC(bt_row_set_block(a, row, 0, 64), BT_ERANGE);
    T_RC(bt_row_set_block(a, row, 0, x[1]), BT_ENOTHELD);       /* free */
    T_RC(bt_row_set_block(a, row, 0, x[0]), BT_ENOTHELD);       /* in the row, not loose */
    T_RC(bt_row_set_block(b, row, 0, x[3]), BT_ENOTOWNER);
    T_RC(bt_row_punch(a, row, 3, 2), BT_ERANGE);
    T_RC(bt_row_punch(a, row, 0, 12), BT_ERANGE);               /* past num_blocks */
    T_RC(bt_row_punch(b, row, 0, 1), BT_ENOTOWNER);
    T_SAME(seg, s);
    T_EQ(chunks_free(seg), NCH - 1);

    /* the last block becomes a hole: nothing is held, every chunk goes back */
    T_OK(bt_row_set_block(a, row, 10, 0));
    ri = t_row(seg, row, got, CAP);
    for (uint32_t i = 0; i < ri.num_blocks; i++)
        T_EQ(got[i], 0);
    T_EQ(chunks_free(seg), NCH);
    T_EQ(t_refcnt(seg, x[0]), 0);

    /* a sliding window: punch the past */
    T_OK(bt_row_truncate(a, row, 0));
    T_OK(bt_row_alloc_append(a, row, 0, 12, NULL));
    T_EQ(chunks_free(seg), NCH - 3);
    T_OK(bt_row_punch(a, row, 0, 8));
    ri = t_row(seg, row, got, CAP);
    T_EQ(ri.num_blocks, 12);
    for (int i = 0; i < 8; i++)
        T_EQ(got[i], 0);
    T_EQ(chunks_free(seg), NCH - 1);
    T_EQ(t_free(seg, 0), 63 - 4 - 1);           /* 4 in the row, x[3] loose */
    t_check_quiet(seg);
    T_OK(bt_row_punch(a, row, 8, 12));
    T_EQ(chunks_free(seg), NCH);
    T_EQ(t_free(seg, 0), 63 - 1);

    /* RAW paged rows: 0 is a hole, any other id goes */
    T_OK(bt_row_claim(a, 2, -1, BT_ROW_PAGED | BT_ROW_RAW, &raw));
    int32_t ids[3] = { 5, 0, 1 << 30 };
    T_OK(bt_row_append(a, raw, ids, 3));
    T_OK(bt_slots_row(seg, &sp, raw, 0, 48, out));
    for (int p = 0; p < 48; p++)
        T_EQ(out[p], p < 16 ? 5 * 16 + p : p < 32 ? -1 : ((int64_t)1 << 30) * 16 + p % 16);
    T_EQ(t_free(seg, 0), 63 - 1);               /* RAW: the allocator is not involved */
    bt_client_close(a);
    bt_client_close(b);
    T_EQ(chunks_free(seg), NCH);
    T_END(seg);
}

/* Found by tests/test_model.py: a truncate whose kept part of the boundary
 * chunk holds only holes gave the chunk back when rows were cut by
 * a cut + trim, but not once paged rows shrank by directory (the chunk
 * stayed attached, holding nothing: "free chunks 5, model 6"). bt.h: memory
 * follows the blocks used, as for set_block and punch. */
static void test_truncate_to_holes(void)
{
    bt_seg *seg = t_seg_new(cfg());
    bt_client *a = t_client(seg);
    uint32_t row;
    int32_t x[2], got[CAP];

    T_OK(bt_row_claim(a, 1, -1, BT_ROW_PAGED, &row));
    T_OK(bt_blocks_alloc(a, 0, 2, x));
    T_OK(bt_row_set_block(a, row, 1, x[1]));        /* entries: hole, x[1] */
    T_EQ(chunks_free(seg), NCH - 1);
    T_OK(bt_blocks_share(a, &x[1], 1));             /* a second reference, loose */
    T_OK(bt_row_truncate(a, row, 1));               /* keeps the hole alone */
    bt_row_info ri = t_row(seg, row, got, CAP);
    T_EQ(ri.num_blocks, 1);
    T_EQ(got[0], 0);
    T_EQ(chunks_free(seg), NCH);                    /* the chunk held only a hole */
    T_EQ(t_refcnt(seg, x[1]), 1);                   /* the shared reference stays */
    t_check_quiet(seg);

    /* a kept block keeps its chunk; the cut part of it is zeroed */
    T_OK(bt_row_truncate(a, row, 0));
    int32_t y[CS + 1];
    T_OK(bt_row_alloc_append(a, row, 0, CS + 1, y));
    T_EQ(chunks_free(seg), NCH - 2);
    T_OK(bt_row_truncate(a, row, 1));
    T_EQ(chunks_free(seg), NCH - 1);
    ri = t_row(seg, row, got, CAP);
    T_EQ(ri.num_blocks, 1);
    T_EQ(got[0], y[0]);
    T_OK(bt_row_set_block(a, row, 0, 0));           /* and gives it back as a hole */
    T_EQ(chunks_free(seg), NCH);
    t_check_quiet(seg);
    bt_client_close(a);
    T_EQ(chunks_free(seg), NCH);
    bt_seg_close(seg);
}

static void test_exhaust(void)
{
    bt_seg *seg = t_seg_new(cfg());
    bt_client *a = t_client(seg);
    uint32_t ra, rb;
    int32_t x[2];

    T_OK(bt_row_claim(a, 1, -1, BT_ROW_PAGED, &ra));
    T_OK(bt_row_claim(a, 2, -1, BT_ROW_PAGED, &rb));
    T_OK(bt_row_alloc_append(a, ra, 0, CAP, NULL));
    T_OK(bt_row_alloc_append(a, rb, 0, 8, NULL));
    T_EQ(chunks_free(seg), 0);
    T_OK(bt_blocks_alloc(a, 0, 2, x));
    t_snap *s = t_snap_take(seg);
    T_RC(bt_row_alloc_append(a, rb, 0, 1, NULL), BT_ENOCHUNKS);
    T_RC(bt_row_append(a, rb, x, 1), BT_ENOCHUNKS);
    T_RC(bt_row_set_block(a, rb, 20, x[0]), BT_ENOCHUNKS);
    T_SAME(seg, s);
    T_EQ(chunks_free(seg), 0);
    T_OK(bt_row_set(a, rb, x, 2));      /* 2 fit in a chunk rb has; one goes back */
    T_EQ(chunks_free(seg), 1);
    /* a set of 9 needs a third chunk */
    T_OK(bt_row_truncate(a, rb, 0));
    T_OK(bt_row_alloc_append(a, rb, 0, 8, NULL));
    T_EQ(chunks_free(seg), 0);
    T_OK(bt_blocks_alloc(a, 0, 1, x));
    s = t_snap_take(seg);
    T_RC(bt_row_alloc_append(a, rb, 0, 1, NULL), BT_ENOCHUNKS);
    T_SAME(seg, s);
    /* within a chunk it has, a row still grows */
    T_OK(bt_row_truncate(a, rb, 6));
    T_EQ(chunks_free(seg), 0);
    T_OK(bt_row_alloc_append(a, rb, 0, 2, NULL));
    T_OK(bt_row_release(a, ra));
    T_EQ(chunks_free(seg), DIRW);
    T_OK(bt_row_alloc_append(a, rb, 0, 1, NULL));
    bt_client_close(a);
    T_EQ(chunks_free(seg), NCH);
    T_END(seg);
}

/* ---- random operations against a model ------------------------------------ */
struct mrow { uint32_t row, nb; int32_t e[CAP]; };

static void chunk_bounds(bt_seg *seg, struct mrow *m, int nrows, int it)
{
    uint32_t lo = 0, hi = 0, used = NCH - chunks_free(seg);
    for (int k = 0; k < nrows; k++) {
        for (uint32_t ch = 0; ch < DIRW; ch++) {
            int any = 0;
            for (uint32_t i = ch * CS; i < ch * CS + CS && i < m[k].nb; i++)
                any |= m[k].e[i] != 0;
            lo += any;
            hi += ch * CS < m[k].nb;
        }
    }
    T_ASSERTF(lo <= used && used <= hi, "iteration %d: %u chunks in use, rows need %u..%u", it,
              used, lo, hi);
}

/* Compare the row with the model; adopt the library's length where it
 * differs only by trailing holes (whether they are trimmed is its choice). */
static void compare(bt_seg *seg, struct mrow *m, int it)
{
    int32_t got[CAP];
    bt_row_info ri = t_row(seg, m->row, got, CAP);
    uint32_t n = ri.num_blocks > m->nb ? ri.num_blocks : m->nb;
    for (uint32_t i = 0; i < n; i++) {
        int32_t l = i < ri.num_blocks ? got[i] : 0, w = i < m->nb ? m->e[i] : 0;
        if (l != w)
            T_FAIL("iteration %d: row %u entry %u is %d, model %d (%u blocks, model %u)", it,
                   m->row, i, l, w, ri.num_blocks, m->nb);
    }
    for (uint32_t i = ri.num_blocks; i < m->nb; i++)
        m->e[i] = 0;
    m->nb = ri.num_blocks;
}

static void test_model_raw(void)
{
    bt_seg *seg = t_seg_new(cfg());
    bt_client *a = t_client(seg);
    struct mrow m[2];
    uint64_t rnd = t_substream(7);
    int counts[3] = { 0 };                      /* ok, refused (full / no chunks), other */
    memset(m, 0, sizeof(m));
    for (int k = 0; k < 2; k++)
        T_OK(bt_row_claim(a, (uint64_t)k, -1, BT_ROW_PAGED | BT_ROW_RAW, &m[k].row));

    for (int it = 0; it < 20000; it++) {
        struct mrow *r = &m[t_below(&rnd, 2)];
        int32_t ids[CAP + 2];
        uint32_t n = 1 + t_below(&rnd, 6);
        for (uint32_t i = 0; i < CAP + 2; i++)
            ids[i] = t_below(&rnd, 3) ? 1 + (int32_t)t_below(&rnd, 1000) : 0;
        t_snap *s = t_snap_take(seg);
        uint32_t cf = chunks_free(seg);
        int rc;
        switch (t_below(&rnd, 7)) {
        case 0:
            rc = bt_row_append(a, r->row, ids, n);
            if (r->nb + n > CAP)
                T_ASSERTF(rc == BT_EROWFULL, "iteration %d: append: %s", it, bt_errname(rc));
            if (!rc) {
                memcpy(r->e + r->nb, ids, n * 4);
                r->nb += n;
            }
            break;
        case 1: {
            uint32_t idx = t_below(&rnd, CAP + 2);
            rc = bt_row_set_block(a, r->row, idx, ids[0]);
            if (idx >= CAP)
                T_ASSERTF(rc == BT_EROWFULL, "iteration %d: set_block(%u): %s", it, idx,
                          bt_errname(rc));
            if (!rc) {
                r->e[idx] = ids[0];
                if (idx >= r->nb && ids[0])
                    r->nb = idx + 1;
            }
            break;
        }
        case 2: {
            uint32_t from = t_below(&rnd, r->nb + 2), to = from + t_below(&rnd, 8);
            rc = bt_row_punch(a, r->row, from, to);
            if (to > r->nb)
                T_ASSERTF(rc == BT_ERANGE, "iteration %d: punch(%u, %u) of %u: %s", it, from, to,
                          r->nb, bt_errname(rc));
            else
                T_ASSERTF(rc == 0, "iteration %d: punch(%u, %u): %s", it, from, to,
                          bt_errname(rc));
            if (!rc)
                for (uint32_t i = from; i < to; i++)
                    r->e[i] = 0;
            break;
        }
        case 3: {
            uint32_t keep = t_below(&rnd, r->nb + 1);
            rc = bt_row_truncate(a, r->row, keep);
            T_ASSERTF(rc == 0, "iteration %d: truncate: %s", it, bt_errname(rc));
            for (uint32_t i = keep; i < r->nb; i++)
                r->e[i] = 0;
            r->nb = keep;
            break;
        }
        case 4: {
            uint32_t len = t_below(&rnd, CAP + 2);
            rc = bt_row_set(a, r->row, ids, len);
            if (len > CAP)
                T_ASSERTF(rc == BT_EROWFULL, "iteration %d: set(%u): %s", it, len, bt_errname(rc));
            if (!rc) {
                memset(r->e, 0, sizeof(r->e));
                memcpy(r->e, ids, len * 4);
                r->nb = len;
            }
            break;
        }
        case 5: {
            rc = bt_row_swap(a, m[0].row, m[1].row);
            T_ASSERTF(rc == 0, "iteration %d: swap: %s", it, bt_errname(rc));
            struct mrow t = m[0];
            memcpy(m[0].e, m[1].e, sizeof(t.e));
            m[0].nb = m[1].nb;
            memcpy(m[1].e, t.e, sizeof(t.e));
            m[1].nb = t.nb;
            break;
        }
        default:
            rc = bt_row_alloc_append(a, r->row, 0, n, NULL);   /* RAW: refused */
            T_ASSERTF(rc != 0, "iteration %d: alloc_append into a RAW row succeeded", it);
            rc = BT_EROWSTATE;
            break;
        }
        if (rc) {
            T_SAME(seg, s);
            T_EQ(chunks_free(seg), cf);
            counts[rc == BT_EROWFULL || rc == BT_ENOCHUNKS || rc == BT_ERANGE ? 1 : 2]++;
        } else {
            counts[0]++;
        }
        compare(seg, &m[0], it);
        compare(seg, &m[1], it);
        chunk_bounds(seg, m, 2, it);
        if (it % 500 == 0)
            t_check_quiet(seg);
    }
    printf("paged RAW model: %d ok, %d refused as due, %d other errors\n", counts[0], counts[1],
           counts[2]);
    bt_client_close(a);
    T_EQ(chunks_free(seg), NCH);
    T_END(seg);
}

/* MANAGED paged rows: no model of contents, but the segment's own check
 * must agree with every count after every call. */
static void test_managed_random(void)
{
    bt_seg *seg = t_seg_new(cfg());
    bt_client *a = t_client(seg);
    uint32_t rows[3];
    uint64_t rnd = t_substream(8);
    for (int k = 0; k < 3; k++)
        T_OK(bt_row_claim(a, (uint64_t)k, -1, BT_ROW_PAGED, &rows[k]));
    for (int it = 0; it < 6000; it++) {
        uint32_t row = rows[t_below(&rnd, 3)], n = 1 + t_below(&rnd, 5);
        bt_row_info ri = t_row(seg, row, NULL, 0);
        int32_t id;
        int rc = 0;
        switch (t_below(&rnd, 6)) {
        case 0: rc = bt_row_alloc_append(a, row, 0, n, NULL); break;
        case 1:
            if (bt_blocks_alloc(a, 0, 1, &id) == 0) {
                rc = bt_row_set_block(a, row, t_below(&rnd, CAP), id);
                if (rc)
                    T_OK(bt_blocks_release(a, &id, 1));
            }
            break;
        case 2: rc = bt_row_set_block(a, row, t_below(&rnd, CAP), 0); break;
        case 3: {
            uint32_t from = t_below(&rnd, ri.num_blocks + 1);
            rc = bt_row_punch(a, row, from, from + t_below(&rnd, ri.num_blocks - from + 1));
            break;
        }
        case 4: rc = bt_row_truncate(a, row, t_below(&rnd, ri.num_blocks + 1)); break;
        default: {
            uint32_t other = rows[t_below(&rnd, 3)];
            int32_t got[CAP];
            uint32_t nb = t_row(seg, other, got, CAP).num_blocks, k = 0;
            for (uint32_t i = 0; i < nb && k < 4; i++)
                if (got[i])
                    got[k++] = got[i];
            rc = bt_row_append_shared(a, row, got, k);
        }
        }
        T_ASSERTF(rc == 0 || rc == BT_ENOBLOCKS || rc == BT_ENOCHUNKS || rc == BT_EROWFULL,
                  "iteration %d: %s", it, bt_errname(rc));
        if (it % 16 == 0)
            t_check_quiet(seg);
    }
    bt_client_close(a);
    T_EQ(chunks_free(seg), NCH);
    bt_check_report rep = t_check_quiet(seg);
    T_EQ(rep.blocks_free, 63);
    bt_seg_close(seg);
}

/* A repair that shortens a live paged row (here: its count scribbled to -1)
 * must leave its chunks either in the directory or on the free list; a
 * read-only check afterwards finds none leaked. (Found by test_scribble.) */
static void test_repair_shortened(void)
{
    bt_seg *seg = t_seg_new(cfg());
    bt_client *a = t_client(seg);
    uint32_t row;
    int32_t ids[3] = { 5, 6, 7 };
    T_OK(bt_row_claim(a, 1, -1, BT_ROW_PAGED | BT_ROW_RAW, &row));
    T_OK(bt_row_append(a, row, ids, 3));
    T_EQ(chunks_free(seg), NCH - 1);
    int32_t *nb = (int32_t *)t_nblocks(seg) + row;
    __atomic_store_n(nb, -1, __ATOMIC_RELAXED);
    bt_check_report rep;
    T_OK(bt_seg_check(seg, BT_CHECK_REPAIR, 100, &rep));
    T_ASSERT(rep.rows_fixed >= 1);
    memset(&rep, 0, sizeof(rep));
    T_OK(bt_seg_check(seg, 0, 0, &rep));
    uint32_t in_dir = t_row(seg, row, NULL, 0).num_blocks ? 1 : 0;
    printf("after the repair: row holds %u blocks, %u chunks free, %" PRIu64 " leaked\n",
           t_row(seg, row, NULL, 0).num_blocks, chunks_free(seg), rep.chunks_leaked);
    T_EQ(rep.chunks_leaked, 0);
    T_ASSERT(chunks_free(seg) == NCH - in_dir || (in_dir == 0 && chunks_free(seg) >= NCH - 1));
    bt_client_close(a);
    T_EQ(chunks_free(seg), NCH);
    T_END(seg);
}

/* A client dies holding paged rows: recovery gives every chunk back. */
static void test_dead_client_chunks(void)
{
    bt_seg *seg = t_seg_new_shared(cfg());
    int fd[2];
    pid_t pid = t_fork_pipe(fd);
    if (pid == 0) {
        bt_client *cl = t_client(seg);
        uint32_t r1, r2, id = bt_client_id(cl);
        T_OK(bt_row_claim(cl, 1, -1, BT_ROW_PAGED, &r1));
        T_OK(bt_row_alloc_append(cl, r1, 0, 9, NULL));
        T_OK(bt_row_punch(cl, r1, 0, 4));
        T_OK(bt_row_claim(cl, 2, -1, BT_ROW_PAGED | BT_ROW_RAW, &r2));
        int32_t ids[2] = { 3, 4 };
        T_OK(bt_row_append(cl, r2, ids, 2));
        T_EQ(write(fd[1], &id, 4), 4);
        _exit(0);
    }
    uint32_t id = 0;
    close(fd[1]);
    T_EQ(read(fd[0], &id, 4), 4);
    close(fd[0]);
    t_wait_ok(pid, "child with paged rows");
    T_EQ(chunks_free(seg), NCH - 3);
    t_check_quiet(seg);
    bt_check_report rep;
    T_OK(bt_seg_recover_client(seg, id, 1000, &rep));
    T_EQ(chunks_free(seg), NCH);
    t_check_quiet(seg);

    /* the same death, found by a repair */
    pid = t_fork_pipe(fd);
    if (pid == 0) {
        bt_client *cl = t_client(seg);
        uint32_t r1;
        T_OK(bt_row_claim(cl, 1, -1, BT_ROW_PAGED, &r1));
        T_OK(bt_row_alloc_append(cl, r1, 0, 9, NULL));
        _exit(0);
    }
    close(fd[0]);
    close(fd[1]);
    t_wait_ok(pid, "child with paged rows");
    T_EQ(chunks_free(seg), NCH - 3);
    T_OK(bt_seg_check(seg, BT_CHECK_REPAIR, 1000, &rep));
    T_ASSERT(rep.clients_reaped >= 1);
    T_EQ(chunks_free(seg), NCH);
    T_END_SHARED(seg);
}

/* A dead client's paged row whose directory names a chunk of a live row
 * (scribbled, white-box): releasing the dead row in a repair must not zero
 * or take the live row's chunk. (Found by test_scribble, seed 11.) */
static void test_repair_foreign_chunk(void)
{
    bt_seg *seg = t_seg_new_shared(cfg());
    bt_client *a = t_client(seg);
    uint32_t ra;
    int32_t x[3], got[CAP];
    T_OK(bt_row_claim(a, 1, -1, BT_ROW_PAGED, &ra));
    T_OK(bt_row_alloc_append(a, ra, 0, 3, x));        /* chunk of entries 0..3 */
    int fd[2];
    pid_t pid = t_fork_pipe(fd);
    if (pid == 0) {
        bt_client *b = t_client(seg);
        uint32_t rb;
        int32_t ids[2] = { 3, 4 };
        T_OK(bt_row_claim(b, 2, -1, BT_ROW_PAGED | BT_ROW_RAW, &rb));
        T_OK(bt_row_append(b, rb, ids, 2));
        T_EQ(write(fd[1], &rb, 4), 4);
        _exit(0);                       /* dies holding the row */
    }
    uint32_t rb = 0;
    close(fd[1]);
    T_EQ(read(fd[0], &rb, 4), 4);
    close(fd[0]);
    t_wait_ok(pid, "child with a paged row");
    /* the dead row's directory slot 3 now names chunk (a's first) */
    const uint8_t *base = bt_seg_base(seg);
    uint64_t dir_off;
    memcpy(&dir_off, base + offsetof(struct bt_header, off) + 8 * BT_R_DIR, 8);
    uint32_t *dir = (uint32_t *)(bt_seg_base(seg)) + dir_off / 4;
    uint32_t a_chunk = dir[(uint64_t)ra * DIRW];
    T_ASSERT(a_chunk != 0);
    dir[(uint64_t)rb * DIRW + 3] = a_chunk;
    bt_check_report rep;
    T_OK(bt_seg_check(seg, BT_CHECK_REPAIR, 1000, &rep));
    T_ASSERT(rep.clients_reaped >= 1);
    bt_row_info ri = t_row(seg, ra, got, CAP);
    T_EQ(ri.num_blocks, 3);
    for (int i = 0; i < 3; i++)
        T_ASSERTF(got[i] == x[i], "live row's entry %d is %d, was %d", i, got[i], x[i]);
    t_check_quiet(seg);
    bt_client_close(a);
    T_EQ(chunks_free(seg), NCH);
    T_END_SHARED(seg);
}

int main(int argc, char **argv)
{
    t_init(argc, argv);
    T_RUN(test_basic);
    T_RUN(test_holes);
    T_RUN(test_truncate_to_holes);
    T_RUN(test_exhaust);
    T_RUN(test_model_raw);
    T_RUN(test_managed_random);
    T_RUN(test_dead_client_chunks);
    T_RUN(test_repair_shortened);
    T_RUN(test_repair_foreign_chunk);
    return t_done();
}
