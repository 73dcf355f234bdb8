/*
 * test_rows.c -- rows: claim / release, the append family, set, truncate,
 * move, swap, read; ownership across clients; RAW rows.
 *
 * After every call: entries past num_blocks are 0 (t_check_tails), and a
 * call that fails has changed nothing (T_SAME against a snapshot).
 */
#include "bt_test.h"

#define W 8                              /* row width */

static bt_config cfg(void)
{
    return t_config(1, 64, 4, W);
}

/* The row must hold exactly ids[0..n). */
#define T_ROW(seg, row, ...) do { \
    const int32_t want_[] = { __VA_ARGS__ }; \
    t_row_is(seg, row, want_, (uint32_t)(sizeof(want_) / sizeof(want_[0])), __FILE__, __LINE__); \
} while (0)
#define T_ROW_EMPTY(seg, row) t_row_is(seg, row, NULL, 0, __FILE__, __LINE__)
static void t_row_is(bt_seg *seg, uint32_t row, const int32_t *want, uint32_t n,
                     const char *file, int line)
{
    int32_t got[W];
    bt_row_info ri = t_row(seg, row, got, W);
    if (ri.num_blocks != n)
        t_fail_at(file, line, "row %u has %u blocks, expected %u", row, ri.num_blocks, n);
    for (uint32_t i = 0; i < n; i++)
        if (got[i] != want[i])
            t_fail_at(file, line, "row %u entry %u is %d, expected %d", row, i, got[i], want[i]);
    t_check_tails_at(seg, file, line);
}

static void test_claim_release(void)
{
    bt_seg *seg = t_seg_new(cfg());
    bt_client *a = t_client(seg), *b = t_client(seg);
    uint32_t row, r2, rows[4];
    t_snap *s;

    T_OK(bt_row_claim(a, 100, -1, BT_ROW_MANAGED, &row));
    T_ASSERT(row < 4);
    bt_row_info ri = t_row(seg, row, NULL, 0);
    T_EQ(ri.owner, bt_client_id(a));
    T_EQ(ri.flags, BT_ROW_MANAGED);
    T_EQ(ri.key, 100);
    T_EQ(ri.num_blocks, 0);
    T_EQ(ri.num_tokens, 0);
    uint32_t gen0 = ri.generation;

    s = t_snap_take(seg);
    T_RC(bt_row_claim(a, 1, (int32_t)row, BT_ROW_MANAGED, &r2), BT_EROWSTATE);
    T_RC(bt_row_claim(b, 1, (int32_t)row, BT_ROW_MANAGED, &r2), BT_EROWSTATE);
    T_RC(bt_row_claim(a, 1, 4, BT_ROW_MANAGED, &r2), BT_ERANGE);
    T_RC(bt_row_claim(a, 1, INT32_MAX, BT_ROW_MANAGED, &r2), BT_ERANGE);
    T_RC(bt_row_claim(a, 1, -1, 2, &r2), BT_EINVAL);
    T_RC(bt_row_claim(a, 1, -1, 0xff, &r2), BT_EINVAL);
    T_RC(bt_row_claim(a, 1, -1, BT_ROW_MANAGED, NULL), BT_EINVAL);
    T_RC(bt_row_claim(NULL, 1, -1, BT_ROW_MANAGED, &r2), BT_EINVAL);
    /* releases by the wrong client, of a free row, out of range */
    T_RC(bt_row_release(b, row), BT_ENOTOWNER);
    T_RC(bt_row_release(a, (row + 1) % 4), BT_EROWSTATE);
    T_RC(bt_row_release(a, 4), BT_ERANGE);
    T_RC(bt_row_release(a, UINT32_MAX), BT_ERANGE);
    T_SAME(seg, s);

    /* every row claimed: BT_ENOROWS */
    rows[0] = row;
    for (int i = 1; i < 4; i++)
        T_OK(bt_row_claim(i % 2 ? b : a, 200 + i, -1, BT_ROW_MANAGED, &rows[i]));
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < i; j++)
            T_ASSERT(rows[i] != rows[j]);
    s = t_snap_take(seg);
    T_RC(bt_row_claim(a, 9, -1, BT_ROW_MANAGED, &r2), BT_ENOROWS);
    T_SAME(seg, s);
    bt_client_slot_info si;
    T_OK(bt_client_slot_get(seg, bt_client_id(b), &si));
    T_EQ(si.rows, 2);

    /* release, reclaim: a new generation each time */
    uint32_t gen = gen0;
    for (int k = 0; k < 3; k++) {
        T_OK(bt_row_release(a, row));
        ri = t_row(seg, row, NULL, 0);
        T_EQ(ri.owner, 0);
        T_EQ(ri.num_blocks, 0);
        T_OK(bt_row_claim(k == 1 ? b : a, 300 + k, (int32_t)row, BT_ROW_MANAGED, &r2));
        T_EQ(r2, row);
        ri = t_row(seg, row, NULL, 0);
        T_ASSERTF(ri.generation > gen, "generation %u after %u", ri.generation, gen);
        T_EQ(ri.key, 300 + k);
        gen = ri.generation;
        if (k == 1) {
            T_OK(bt_row_release(b, row));
            T_OK(bt_row_claim(a, 300 + k, (int32_t)row, BT_ROW_MANAGED, &r2));
            gen = t_row(seg, row, NULL, 0).generation;
        }
    }
    t_check_quiet(seg);
    bt_client_close(a);
    bt_client_close(b);
    for (uint32_t r = 0; r < 4; r++)
        T_EQ(t_row(seg, r, NULL, 0).owner, 0);
    T_END(seg);
}

static void test_append(void)
{
    bt_seg *seg = t_seg_new(cfg());
    bt_client *a = t_client(seg), *b = t_client(seg);
    int32_t x[8], y[2];
    uint32_t row, other;
    t_snap *s;

    T_OK(bt_row_claim(a, 1, -1, BT_ROW_MANAGED, &row));
    T_OK(bt_blocks_alloc(a, 0, 8, x));
    T_OK(bt_row_append(a, row, x, 3));
    T_ROW(seg, row, x[0], x[1], x[2]);
    T_EQ(t_hand(seg, a), 5);             /* the references moved into the row */
    for (int i = 0; i < 3; i++)
        T_EQ(t_refcnt(seg, x[i]), 1);

    T_OK(bt_blocks_alloc(b, 0, 2, y));
    T_OK(bt_row_claim(b, 2, -1, BT_ROW_MANAGED, &other));
    s = t_snap_take(seg);
    T_RC(bt_row_append(a, row, y, 1), BT_ENOTHELD);                 /* b's block */
    T_RC(bt_row_append(a, row, x, 1), BT_ENOTHELD);                 /* in the row, not loose */
    int32_t twice[2] = { x[3], x[3] };
    T_RC(bt_row_append(a, row, twice, 2), BT_ENOTHELD);             /* held once */
    int32_t mixed[3] = { x[3], x[4], y[0] };
    T_RC(bt_row_append(a, row, mixed, 3), BT_ENOTHELD);
    int32_t oor[2] = { x[3], 64 }, neg[2] = { x[3], -1 }, null_blk[1] = { 0 };
    T_RC(bt_row_append(a, row, oor, 2), BT_ERANGE);
    T_RC(bt_row_append(a, row, neg, 2), BT_ERANGE);
    T_RC2(bt_row_append(a, row, null_blk, 1), BT_ERANGE, BT_ENOTHELD);
    T_RC(bt_row_append(a, row, x + 3, 6), BT_EROWFULL);             /* 3 + 6 > 8 */
    T_RC(bt_row_append(b, row, y, 1), BT_ENOTOWNER);
    T_RC(bt_row_append(a, other, x + 3, 1), BT_ENOTOWNER);
    uint32_t unclaimed = 0;
    while (unclaimed == row || unclaimed == other)
        unclaimed++;
    T_RC(bt_row_append(a, unclaimed, x + 3, 1), BT_EROWSTATE);      /* a free row */
    T_RC(bt_row_append(a, 4, x + 3, 1), BT_ERANGE);
    T_RC(bt_row_append(a, row, NULL, 1), BT_EINVAL);
    T_SAME(seg, s);

    T_OK(bt_row_append(a, row, x + 3, 0));
    T_OK(bt_row_append(a, row, x + 3, 5));                          /* exactly full */
    T_ROW(seg, row, x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7]);
    T_EQ(t_hand(seg, a), 0);
    s = t_snap_take(seg);
    T_OK(bt_blocks_alloc(a, 0, 1, x));
    T_RC(bt_row_append(a, row, x, 1), BT_EROWFULL);
    T_OK(bt_blocks_release(a, x, 1));
    T_SAME(seg, s);

    /* tokens */
    T_OK(bt_row_set_tokens(a, row, 100));
    T_EQ(t_row(seg, row, NULL, 0).num_tokens, 100);
    s = t_snap_take(seg);
    T_RC2(bt_row_set_tokens(a, row, -1), BT_EINVAL, BT_ERANGE);
    T_RC(bt_row_set_tokens(b, row, 5), BT_ENOTOWNER);
    T_RC(bt_row_set_tokens(a, 4, 5), BT_ERANGE);
    T_SAME(seg, s);

    /* read: capacity and bounds */
    int32_t got[W];
    bt_row_info ri;
    T_RC(bt_row_read(seg, row, got, 7, &ri), BT_EINVAL);
    T_OK(bt_row_read(seg, row, NULL, 0, &ri));
    T_EQ(ri.num_blocks, 8);
    T_OK(bt_row_read(seg, row, got, 8, NULL));
    T_RC(bt_row_read(seg, 4, got, 8, &ri), BT_ERANGE);
    T_RC(bt_row_read(NULL, 0, got, 8, &ri), BT_EINVAL);

    /* release: every block freed */
    T_OK(bt_row_release(a, row));
    T_EQ(t_free(seg, 0), 63 - 2);
    T_OK(bt_blocks_release(b, y, 2));
    t_check_quiet(seg);
    T_END(seg, a, b);
}

static void test_append_shared(void)
{
    bt_seg *seg = t_seg_new(cfg());
    bt_client *a = t_client(seg), *b = t_client(seg);
    int32_t x[3];
    uint32_t ra, rb, raw;
    t_snap *s;

    T_OK(bt_row_claim(a, 1, -1, BT_ROW_MANAGED, &ra));
    T_OK(bt_row_alloc_append(a, ra, 0, 3, x));
    T_OK(bt_row_claim(b, 2, -1, BT_ROW_MANAGED, &rb));
    /* b shares a's prefix */
    T_OK(bt_row_append_shared(b, rb, x, 2));
    T_ROW(seg, rb, x[0], x[1]);
    T_EQ(t_refcnt(seg, x[0]), 2);
    T_EQ(t_refcnt(seg, x[1]), 2);
    T_EQ(t_refcnt(seg, x[2]), 1);
    T_EQ(t_hand(seg, b), 0);
    /* the same block twice in a row is two references */
    T_OK(bt_row_append_shared(a, ra, &x[2], 1));
    T_ROW(seg, ra, x[0], x[1], x[2], x[2]);
    T_EQ(t_refcnt(seg, x[2]), 2);

    int32_t fresh;
    T_OK(bt_blocks_alloc(b, 0, 1, &fresh));
    T_OK(bt_blocks_release(b, &fresh, 1));          /* now free */
    T_OK(bt_row_claim(b, 3, -1, BT_ROW_RAW, &raw));
    s = t_snap_take(seg);
    T_RC(bt_row_append_shared(b, rb, &fresh, 1), BT_ENOTHELD);
    int32_t mix[2] = { x[2], fresh };
    T_RC(bt_row_append_shared(b, rb, mix, 2), BT_ENOTHELD);         /* no ref taken on x[2] */
    int32_t oor[2] = { x[2], 64 };
    T_RC(bt_row_append_shared(b, rb, oor, 2), BT_ERANGE);
    int32_t many[7] = { x[0], x[0], x[0], x[0], x[0], x[0], x[0] };
    T_RC(bt_row_append_shared(b, rb, many, 7), BT_EROWFULL);        /* 2 + 7 > 8 */
    T_RC(bt_row_append_shared(a, rb, x, 1), BT_ENOTOWNER);
    T_RC2(bt_row_append_shared(b, raw, x, 1), BT_EROWSTATE, BT_EINVAL);  /* MANAGED only */
    T_SAME(seg, s);

    /* a's row goes: shared blocks survive in b's row */
    T_OK(bt_row_release(a, ra));
    T_EQ(t_refcnt(seg, x[0]), 1);
    T_EQ(t_refcnt(seg, x[1]), 1);
    T_EQ(t_refcnt(seg, x[2]), 0);
    T_ROW(seg, rb, x[0], x[1]);
    T_EQ(t_free(seg, 0), 63 - 2);
    T_OK(bt_row_release(b, rb));
    T_EQ(t_free(seg, 0), 63);
    t_check_quiet(seg);
    T_END(seg, a, b);
}

static void test_alloc_append(void)
{
    bt_seg *seg = t_seg_new(cfg());
    bt_client *a = t_client(seg), *b = t_client(seg);
    int32_t x[8], hog[64];
    uint32_t row, raw;
    t_snap *s;

    T_OK(bt_row_claim(a, 1, -1, BT_ROW_MANAGED, &row));
    T_OK(bt_row_alloc_append(a, row, 0, 3, x));
    T_ROW(seg, row, x[0], x[1], x[2]);
    for (int i = 0; i < 3; i++) {
        uint32_t ref, owner;
        T_OK(bt_block_get(seg, x[i], &ref, &owner));
        T_EQ(ref, 1);
        T_EQ(owner, bt_client_id(a));
    }
    T_EQ(t_hand(seg, a), 0);
    T_EQ(t_free(seg, 0), 60);
    T_OK(bt_row_alloc_append(a, row, 0, 2, NULL));
    T_EQ(t_row(seg, row, x, W).num_blocks, 5);
    T_EQ(t_free(seg, 0), 58);

    T_OK(bt_row_claim(a, 2, -1, BT_ROW_RAW, &raw));
    s = t_snap_take(seg);
    T_RC(bt_row_alloc_append(a, row, 0, 4, x), BT_EROWFULL);       /* 5 + 4 > 8 */
    T_RC(bt_row_alloc_append(a, row, 1, 1, x), BT_ERANGE);
    T_RC(bt_row_alloc_append(b, row, 0, 1, x), BT_ENOTOWNER);
    T_RC2(bt_row_alloc_append(a, raw, 0, 1, x), BT_EROWSTATE, BT_EINVAL);
    T_SAME(seg, s);
    /* the pool runs dry: nothing taken */
    T_OK(bt_blocks_alloc(b, 0, 56, hog));
    s = t_snap_take(seg);
    T_RC(bt_row_alloc_append(a, row, 0, 3, x), BT_ENOBLOCKS);
    T_SAME(seg, s);
    T_OK(bt_row_alloc_append(a, row, 0, 2, x));
    T_EQ(t_free(seg, 0), 0);
    T_OK(bt_row_alloc_append(a, row, 0, 0, x));
    bt_client_close(b);
    bt_client_close(a);
    T_EQ(t_free(seg, 0), 63);
    T_END(seg);
}

static void test_set(void)
{
    bt_seg *seg = t_seg_new(cfg());
    bt_client *a = t_client(seg), *b = t_client(seg);
    int32_t x[3], y[2], z[9];
    uint32_t row;
    t_snap *s;

    T_OK(bt_row_claim(a, 1, -1, BT_ROW_MANAGED, &row));
    T_OK(bt_row_alloc_append(a, row, 0, 3, x));
    T_OK(bt_blocks_alloc(a, 0, 2, y));
    T_OK(bt_row_set(a, row, y, 2));
    T_ROW(seg, row, y[0], y[1]);
    for (int i = 0; i < 3; i++)
        T_EQ(t_refcnt(seg, x[i]), 0);
    T_EQ(t_refcnt(seg, y[0]), 1);
    T_EQ(t_hand(seg, a), 0);
    T_EQ(t_free(seg, 0), 61);

    /* a block in both the old and the new list survives: share y[1] loose,
     * then set the row to [y[1]] */
    T_OK(bt_blocks_share(a, &y[1], 1));
    T_OK(bt_row_set(a, row, &y[1], 1));
    T_ROW(seg, row, y[1]);
    T_EQ(t_refcnt(seg, y[1]), 1);
    T_EQ(t_refcnt(seg, y[0]), 0);
    T_EQ(t_hand(seg, a), 0);

    T_OK(bt_blocks_alloc(a, 0, 9, z));
    s = t_snap_take(seg);
    T_RC(bt_row_set(a, row, z, 9), BT_EROWFULL);
    int32_t bad[2] = { z[0], y[0] };                /* y[0] is free */
    T_RC(bt_row_set(a, row, bad, 2), BT_ENOTHELD);
    T_RC(bt_row_set(a, row, &y[1], 1), BT_ENOTHELD);/* in the row, not loose */
    int32_t oor[2] = { z[0], 1000 };
    T_RC(bt_row_set(a, row, oor, 2), BT_ERANGE);
    T_RC(bt_row_set(b, row, z, 1), BT_ENOTOWNER);
    T_SAME(seg, s);

    T_OK(bt_row_set(a, row, z, 8));                 /* a full row */
    T_ROW(seg, row, z[0], z[1], z[2], z[3], z[4], z[5], z[6], z[7]);
    T_EQ(t_refcnt(seg, y[1]), 0);
    T_OK(bt_row_set(a, row, NULL, 0));              /* set to nothing */
    T_ROW_EMPTY(seg, row);
    T_EQ(t_hand(seg, a), 1);
    T_OK(bt_blocks_release(a, &z[8], 1));
    T_EQ(t_free(seg, 0), 63);
    t_check_quiet(seg);
    T_END(seg, a, b);
}

static void test_truncate(void)
{
    bt_seg *seg = t_seg_new(cfg());
    bt_client *a = t_client(seg), *b = t_client(seg);
    int32_t x[6];
    uint32_t row;
    t_snap *s;

    T_OK(bt_row_claim(a, 1, -1, BT_ROW_MANAGED, &row));
    T_OK(bt_row_alloc_append(a, row, 0, 6, x));
    T_OK(bt_row_truncate(a, row, 4));
    T_ROW(seg, row, x[0], x[1], x[2], x[3]);
    T_EQ(t_refcnt(seg, x[4]), 0);
    T_EQ(t_refcnt(seg, x[5]), 0);
    T_OK(bt_row_truncate(a, row, 4));              /* no-op */
    T_ROW(seg, row, x[0], x[1], x[2], x[3]);
    s = t_snap_take(seg);
    T_RC2(bt_row_truncate(a, row, 5), BT_ERANGE, BT_OK);
    T_SAME(seg, s);
    T_RC(bt_row_truncate(b, row, 0), BT_ENOTOWNER);
    T_RC(bt_row_truncate(a, 4, 0), BT_ERANGE);
    T_SAME(seg, s);
    T_OK(bt_row_truncate(a, row, 1));
    T_ROW(seg, row, x[0]);
    T_OK(bt_row_truncate(a, row, 0));
    T_ROW_EMPTY(seg, row);
    T_EQ(t_row(seg, row, NULL, 0).owner, bt_client_id(a));   /* still claimed */
    T_EQ(t_free(seg, 0), 63);
    t_check_quiet(seg);
    T_END(seg, a, b);
}

static void test_move(void)
{
    bt_seg *seg = t_seg_new(cfg());
    bt_client *a = t_client(seg), *b = t_client(seg);
    int32_t x[3], y[1];
    uint32_t src, dst, full, theirs;
    t_snap *s;

    T_OK(bt_row_claim(a, 1, 0, BT_ROW_MANAGED, &src));
    T_OK(bt_row_claim(a, 2, 1, BT_ROW_MANAGED, &dst));
    T_OK(bt_row_claim(a, 3, 2, BT_ROW_MANAGED, &full));
    T_OK(bt_row_claim(b, 4, 3, BT_ROW_MANAGED, &theirs));
    T_OK(bt_row_alloc_append(a, src, 0, 3, x));
    T_OK(bt_row_alloc_append(a, full, 0, 1, y));
    T_OK(bt_row_set_tokens(a, src, 40));

    T_OK(bt_row_move(a, src, dst));
    T_ROW(seg, dst, x[0], x[1], x[2]);
    T_ROW_EMPTY(seg, src);
    for (int i = 0; i < 3; i++)
        T_EQ(t_refcnt(seg, x[i]), 1);
    T_EQ(t_row(seg, src, NULL, 0).owner, bt_client_id(a));
    T_EQ(t_free(seg, 0), 59);

    /* dst must be claimed by the caller, of the same kind (a full dst:
     * test_move_into_full) */
    s = t_snap_take(seg);
    T_RC(bt_row_move(a, dst, theirs), BT_ENOTOWNER);
    T_RC(bt_row_move(b, dst, theirs), BT_ENOTOWNER);
    T_RC(bt_row_move(a, dst, 4), BT_ERANGE);
    T_RC(bt_row_move(a, 4, src), BT_ERANGE);
    T_SAME(seg, s);
    T_OK(bt_row_release(a, src));
    T_OK(bt_row_claim(a, 5, (int32_t)src, BT_ROW_RAW, &src));
    s = t_snap_take(seg);
    T_RC2(bt_row_move(a, dst, src), BT_EROWSTATE, BT_EINVAL);
    T_OK(bt_row_release(a, src));
    T_RC2(bt_row_move(a, dst, src), BT_EROWSTATE, BT_ENOTOWNER);   /* dst free */
    T_OK(bt_row_claim(a, 5, (int32_t)src, BT_ROW_RAW, &src));
    t_snap *s2 = t_snap_take(seg);
    /* moving a row onto itself changes nothing */
    bt_row_move(a, dst, dst);
    T_SAME(seg, s2);

    bt_client_close(a);
    bt_client_close(b);
    T_EQ(t_free(seg, 0), 63);
    T_END(seg);
}

/* bt.h: moving onto a row that holds blocks releases what dst held (unlike
 * vLLM's move_row, which left dst's old ids unaccounted). */
static void test_move_into_full(void)
{
    bt_seg *seg = t_seg_new(cfg());
    bt_client *a = t_client(seg), *b = t_client(seg);
    int32_t x[2], y[2];
    uint32_t src, dst, rb;
    T_OK(bt_row_claim(a, 1, -1, BT_ROW_MANAGED, &src));
    T_OK(bt_row_claim(a, 2, -1, BT_ROW_MANAGED, &dst));
    T_OK(bt_row_claim(b, 3, -1, BT_ROW_MANAGED, &rb));
    T_OK(bt_row_alloc_append(a, src, 0, 2, x));
    T_OK(bt_row_alloc_append(a, dst, 0, 2, y));
    T_OK(bt_row_append_shared(b, rb, &y[1], 1));   /* y[1] outlives dst */
    T_OK(bt_row_move(a, src, dst));
    T_ROW(seg, dst, x[0], x[1]);
    T_ROW_EMPTY(seg, src);
    T_EQ(t_refcnt(seg, x[0]), 1);
    T_EQ(t_refcnt(seg, y[0]), 0);
    T_EQ(t_refcnt(seg, y[1]), 1);
    T_EQ(t_free(seg, 0), 63 - 3);
    t_check_quiet(seg);
    bt_client_close(a);
    bt_client_close(b);
    t_check_quiet(seg);
    T_EQ(t_free(seg, 0), 63);
    bt_seg_close(seg);
}

static void test_swap(void)
{
    bt_seg *seg = t_seg_new(cfg());
    bt_client *a = t_client(seg), *b = t_client(seg);
    int32_t x[3], y[1];
    uint32_t ra, rb, theirs, raw;
    t_snap *s;

    T_OK(bt_row_claim(a, 1, -1, BT_ROW_MANAGED, &ra));
    T_OK(bt_row_claim(a, 2, -1, BT_ROW_MANAGED, &rb));
    T_OK(bt_row_claim(b, 3, -1, BT_ROW_MANAGED, &theirs));
    T_OK(bt_row_alloc_append(a, ra, 0, 3, x));
    T_OK(bt_row_alloc_append(a, rb, 0, 1, y));
    T_OK(bt_row_swap(a, ra, rb));
    T_ROW(seg, ra, y[0]);               /* the shorter row's tail is zero */
    T_ROW(seg, rb, x[0], x[1], x[2]);
    T_OK(bt_row_swap(a, rb, ra));
    T_ROW(seg, ra, x[0], x[1], x[2]);
    T_ROW(seg, rb, y[0]);
    T_OK(bt_row_truncate(a, rb, 0));
    T_OK(bt_row_swap(a, ra, rb));       /* with an empty row */
    T_ROW_EMPTY(seg, ra);
    T_ROW(seg, rb, x[0], x[1], x[2]);

    s = t_snap_take(seg);
    T_RC(bt_row_swap(a, ra, theirs), BT_ENOTOWNER);
    T_RC(bt_row_swap(b, ra, theirs), BT_ENOTOWNER);
    T_RC(bt_row_swap(a, ra, 4), BT_ERANGE);
    T_SAME(seg, s);
    bt_row_swap(a, rb, rb);             /* with itself: nothing changes */
    T_SAME(seg, s);

    /* a MANAGED and a RAW row: refused, or the kinds travel with the
     * contents; either way no reference may be lost or invented */
    T_OK(bt_row_release(b, theirs));
    T_OK(bt_row_claim(a, 4, -1, BT_ROW_RAW, &raw));
    int32_t rawids[2] = { 5, 6 };
    T_OK(bt_row_append(a, raw, rawids, 2));
    s = t_snap_take(seg);
    int rc = bt_row_swap(a, rb, raw);
    if (rc) {
        T_ASSERT(rc == BT_EROWSTATE || rc == BT_EINVAL);
        T_SAME(seg, s);
    } else {
        T_EQ(t_row(seg, raw, NULL, 0).flags, BT_ROW_MANAGED);
        T_EQ(t_row(seg, rb, NULL, 0).flags, BT_ROW_RAW);
    }
    t_check_quiet(seg);
    bt_client_close(a);
    bt_client_close(b);
    T_EQ(t_free(seg, 0), 63);
    T_END(seg);
}

static void test_raw_rows(void)
{
    bt_seg *seg = t_seg_new(cfg());
    bt_client *a = t_client(seg), *b = t_client(seg);
    uint32_t row;
    t_snap *s = t_snap_take(seg);

    T_OK(bt_row_claim(a, 1, -1, BT_ROW_RAW, &row));
    T_EQ(t_row(seg, row, NULL, 0).flags, BT_ROW_RAW);
    /* any id in [0, 2^31): the allocator is not involved */
    int32_t ids[5] = { 0, 1, 12345, INT32_MAX, 63 };
    T_OK(bt_row_append(a, row, ids, 5));
    T_ROW(seg, row, 0, 1, 12345, INT32_MAX, 63);
    t_snap *s2 = t_snap_take(seg);
    const int32_t negs[][2] = { { 5, -1 }, { -1, 5 }, { INT32_MIN, 0 }, { 7, -100000 } };
    for (int i = 0; i < 4; i++) {
        T_RC2(bt_row_append(a, row, negs[i], 2), BT_ERANGE, BT_EINVAL);
        T_RC2(bt_row_set(a, row, negs[i], 2), BT_ERANGE, BT_EINVAL);
    }
    T_RC(bt_row_append(a, row, ids, 4), BT_EROWFULL);
    T_RC(bt_row_append(b, row, ids, 1), BT_ENOTOWNER);
    T_SAME(seg, s2);
    T_OK(bt_row_set(a, row, ids + 2, 2));
    T_ROW(seg, row, 12345, INT32_MAX);
    T_OK(bt_row_truncate(a, row, 1));
    T_ROW(seg, row, 12345);
    T_OK(bt_row_append(a, row, ids, 2));
    T_OK(bt_row_release(a, row));
    /* nothing in the allocator moved */
    for (uint32_t r = 0; r < 4; r++)
        s->ri[r] = t_row(seg, r, NULL, 0);      /* rows differ by design */
    memcpy(s->table, t_table(seg), sizeof(int32_t) * 4 * W);
    T_SAME(seg, s);
    T_EQ(t_free(seg, 0), 63);

    /* RAW rows in a MANAGED world: a block id in a RAW row takes no reference */
    int32_t blk;
    T_OK(bt_blocks_alloc(a, 0, 1, &blk));
    T_OK(bt_row_claim(a, 2, -1, BT_ROW_RAW, &row));
    T_OK(bt_row_append(a, row, &blk, 1));
    T_EQ(t_refcnt(seg, blk), 1);
    T_EQ(t_hand(seg, a), 1);
    T_OK(bt_row_release(a, row));
    T_EQ(t_refcnt(seg, blk), 1);
    t_check_quiet(seg);
    bt_client_close(a);
    T_EQ(t_refcnt(seg, blk), 0);
    T_END(seg, b);
}

/* Rows for a whole step's new requests at once: all or nothing. */
static void test_claim_many(void)
{
    bt_config c = cfg();                /* 4 rows */
    bt_seg *seg = t_seg_embedded(&c);
    bt_client *a = t_client(seg), *b = t_client(seg);
    uint64_t keys[4] = { 11, 12, 13, 14 };
    uint32_t rows[4], r;
    T_OK(bt_row_claim(b, 1, 2, BT_ROW_MANAGED, &r));
    T_OK(bt_row_claim_many(a, keys, 2, BT_ROW_MANAGED, rows));
    for (int i = 0; i < 2; i++) {
        T_ASSERT(rows[i] < 4 && rows[i] != 2);
        bt_row_info ri = t_row(seg, rows[i], NULL, 0);
        T_EQ(ri.owner, bt_client_id(a));
        T_EQ(ri.key, keys[i]);
        T_EQ(ri.num_blocks, 0);
    }
    T_ASSERT(rows[0] != rows[1]);
    t_snap *s = t_snap_take(seg);
    T_RC(bt_row_claim_many(a, keys, 2, BT_ROW_MANAGED, rows), BT_ENOROWS);   /* 1 left */
    T_RC(bt_row_claim_many(a, keys, 2, 0xff, rows), BT_EINVAL);
    T_SAME(seg, s);
    T_OK(bt_row_claim_many(a, keys + 3, 1, BT_ROW_RAW, rows));
    T_EQ(t_row(seg, rows[0], NULL, 0).flags, BT_ROW_RAW);
    T_OK(bt_row_claim_many(a, keys, 0, BT_ROW_MANAGED, rows));
    bt_client_slot_info si;
    T_OK(bt_client_slot_get(seg, bt_client_id(a), &si));
    T_EQ(si.rows, 3);
    T_END(seg, a, b);
}

/* Every mutating call from a client that does not own the row. */
static void test_ownership(void)
{
    bt_seg *seg = t_seg_new(cfg());
    bt_client *a = t_client(seg), *b = t_client(seg);
    int32_t x[2], y[2];
    uint32_t ra, ra2, rb;

    T_OK(bt_row_claim(a, 1, -1, BT_ROW_MANAGED, &ra));
    T_OK(bt_row_claim(a, 2, -1, BT_ROW_MANAGED, &ra2));
    T_OK(bt_row_claim(b, 3, -1, BT_ROW_MANAGED, &rb));
    T_OK(bt_row_alloc_append(a, ra, 0, 2, x));
    T_OK(bt_blocks_alloc(b, 0, 2, y));
    t_snap *s = t_snap_take(seg);
    T_RC(bt_row_release(b, ra), BT_ENOTOWNER);
    T_RC(bt_row_append(b, ra, y, 1), BT_ENOTOWNER);
    T_RC(bt_row_append_shared(b, ra, x, 1), BT_ENOTOWNER);
    T_RC(bt_row_alloc_append(b, ra, 0, 1, NULL), BT_ENOTOWNER);
    T_RC(bt_row_set(b, ra, y, 1), BT_ENOTOWNER);
    T_RC(bt_row_truncate(b, ra, 0), BT_ENOTOWNER);
    T_RC(bt_row_set_tokens(b, ra, 9), BT_ENOTOWNER);
    T_RC(bt_row_move(b, ra, rb), BT_ENOTOWNER);
    T_RC(bt_row_move(b, rb, ra), BT_ENOTOWNER);
    T_RC(bt_row_swap(b, ra, rb), BT_ENOTOWNER);
    T_RC(bt_row_swap(b, rb, ra), BT_ENOTOWNER);
    T_RC(bt_row_swap(b, ra, ra2), BT_ENOTOWNER);
    uint32_t one = 1;
    int32_t out[1];
    T_RC(bt_step(b, 0, &ra, 1, NULL, NULL, 0, NULL), BT_ENOTOWNER);
    T_RC(bt_step(b, 0, NULL, 0, &ra, &one, 1, out), BT_ENOTOWNER);
    T_SAME(seg, s);
    T_END(seg, a, b);
}

/* Closing a client releases its rows and its loose blocks. */
static void test_close_releases(void)
{
    bt_seg *seg = t_seg_new(cfg());
    bt_client *a = t_client(seg), *b = t_client(seg);
    int32_t x[4];
    uint32_t r1, r2, rb;
    T_OK(bt_row_claim(a, 1, -1, BT_ROW_MANAGED, &r1));
    T_OK(bt_row_claim(a, 2, -1, BT_ROW_RAW, &r2));
    T_OK(bt_row_claim(b, 3, -1, BT_ROW_MANAGED, &rb));
    T_OK(bt_row_alloc_append(a, r1, 0, 4, x));
    T_OK(bt_row_append(a, r2, x, 4));
    T_OK(bt_row_append_shared(b, rb, x, 2));
    T_OK(bt_blocks_alloc(a, 0, 3, x));
    T_EQ(t_free(seg, 0), 63 - 7);
    bt_client_close(a);
    T_EQ(t_row(seg, r1, NULL, 0).owner, 0);
    T_EQ(t_row(seg, r2, NULL, 0).owner, 0);
    T_EQ(t_free(seg, 0), 63 - 2);
    t_check_quiet(seg);
    bt_client_close(b);
    T_EQ(t_free(seg, 0), 63);
    T_END(seg);
}

int main(int argc, char **argv)
{
    t_init(argc, argv);
    T_RUN(test_claim_release);
    T_RUN(test_append);
    T_RUN(test_append_shared);
    T_RUN(test_alloc_append);
    T_RUN(test_set);
    T_RUN(test_truncate);
    T_RUN(test_move);
    T_RUN(test_swap);
    T_RUN(test_raw_rows);
    T_RUN(test_claim_many);
    T_RUN(test_ownership);
    T_RUN(test_close_releases);
    T_RUN(test_move_into_full);
    return t_done();
}
