/*
 * test_gather.c -- bt_row_find / bt_rows_gather: a worker's block table built
 * from rows by key, in batch order; stale hints (released, re-claimed rows);
 * missing keys; a narrow output; and a writer racing the readers (a copy is
 * never torn, never another request's ids).
 */
#include <pthread.h>
#include "bt_test.h"

#define W 8

static bt_config cfg(void)
{
    return t_config(1, 64, 6, W);
}

static void test_find_and_gather(void)
{
    bt_seg *seg = t_seg_new(cfg());
    bt_client *a = t_client(seg);
    uint32_t r1, r2, row;
    T_OK(bt_row_claim(a, 0x1111, -1, BT_ROW_RAW, &r1));
    T_OK(bt_row_claim(a, 0x2222, -1, BT_ROW_RAW, &r2));
    const int32_t ids1[] = { 5, 9, 7 }, ids2[] = { 3 };
    T_OK(bt_row_append(a, r1, ids1, 3));
    T_OK(bt_row_append(a, r2, ids2, 1));

    T_OK(bt_row_find(seg, 0x2222, &row));
    T_EQ(row, r2);
    T_RC(bt_row_find(seg, 0x3333, &row), -ENOENT);
    T_RC(bt_row_find(NULL, 1, &row), BT_EINVAL);

    /* Batch order is the caller's, not the rows'; a missing key reads -1. */
    uint64_t keys[3] = { 0x2222, 0x3333, 0x1111 }, hints[3] = { 0, 0, 0 };
    int32_t out[3 * 4], nb[3];
    memset(out, 0x7f, sizeof(out));
    T_OK(bt_rows_gather(seg, keys, 3, hints, out, 4, nb));
    T_EQ(nb[0], 1); T_EQ(nb[1], -1); T_EQ(nb[2], 3);
    const int32_t want[12] = { 3, 0, 0, 0,  0, 0, 0, 0,  5, 9, 7, 0 };
    for (int i = 0; i < 12; i++)
        T_EQ(out[i], want[i]);
    T_EQ(hints[1], 0);
    T_EQ((uint32_t)hints[0], r2 + 1);
    T_EQ((uint32_t)hints[2], r1 + 1);

    /* Narrower than the row: the count is the whole row's. */
    int32_t narrow[2];
    T_OK(bt_rows_gather(seg, &keys[2], 1, &hints[2], narrow, 2, nb));
    T_EQ(nb[0], 3); T_EQ(narrow[0], 5); T_EQ(narrow[1], 9);

    /* Garbage hints are safe. */
    uint64_t bad[2] = { 0xffffffffffffffffull, (uint64_t)77 << 32 | 5000 };
    T_OK(bt_rows_gather(seg, keys, 1, bad, out, 4, nb));
    T_EQ(nb[0], 1);
    T_EQ((uint32_t)bad[0], r2 + 1);
    T_RC(bt_rows_gather(seg, keys, 1, bad, out, 0, nb), BT_EINVAL);
    T_RC(bt_rows_gather(seg, keys, 1, NULL, out, 4, nb), BT_EINVAL);
    T_OK(bt_rows_gather(seg, NULL, 0, NULL, NULL, 4, NULL));
    T_END(seg, a);
}

/* A hint is trusted only for the row and generation it names. */
static void test_stale_hints(void)
{
    bt_seg *seg = t_seg_new(cfg());
    bt_client *a = t_client(seg);
    uint32_t r1, r2;
    T_OK(bt_row_claim(a, 42, 0, BT_ROW_RAW, &r1));
    const int32_t x[] = { 11, 12 }, y[] = { 21 };
    T_OK(bt_row_append(a, r1, x, 2));
    uint64_t key = 42, hint = 0;
    int32_t out[W], nb;
    T_OK(bt_rows_gather(seg, &key, 1, &hint, out, W, &nb));
    uint64_t old = hint;
    T_EQ(nb, 2);

    /* Released: the row keeps its old key, but a free row never matches. */
    T_OK(bt_row_release(a, r1));
    T_OK(bt_rows_gather(seg, &key, 1, &hint, out, W, &nb));
    T_EQ(nb, -1);
    T_EQ(hint, 0);

    /* Re-claimed for the same key on the same row: the generation differs,
     * so the old hint is re-resolved and rewritten. */
    T_OK(bt_row_claim(a, 42, 0, BT_ROW_RAW, &r2));
    T_EQ(r2, r1);
    T_OK(bt_row_append(a, r2, y, 1));
    hint = old;
    T_OK(bt_rows_gather(seg, &key, 1, &hint, out, W, &nb));
    T_EQ(nb, 1); T_EQ(out[0], 21); T_EQ(out[1], 0);
    T_ASSERT(hint != old);
    T_EQ((uint32_t)hint, r2 + 1);

    /* Another request on the hinted row: found elsewhere or not at all. */
    T_OK(bt_row_release(a, r2));
    T_OK(bt_row_claim(a, 43, 0, BT_ROW_RAW, &r2));
    T_OK(bt_row_claim(a, 42, -1, BT_ROW_RAW, &r1));
    T_ASSERT(r1 != r2);
    T_OK(bt_rows_gather(seg, &key, 1, &hint, out, W, &nb));
    T_EQ(nb, 0);
    T_EQ((uint32_t)hint, r1 + 1);
    T_END(seg, a);
}

/* A writer claims, appends and releases rows with entries derived from the
 * key; readers must only ever see a prefix of the right pattern. */
struct race { bt_seg *seg; volatile int stop; uint64_t reads, found; };

static void *writer_main(void *arg)
{
    struct race *rc = arg;
    bt_client *cl;
    if (bt_client_open(rc->seg, &cl))
        return (void *)1;
    for (uint64_t it = 0; !rc->stop; it++) {
        uint64_t key = 1 + it % 3;
        uint32_t row;
        if (bt_row_claim(cl, key, -1, BT_ROW_RAW, &row))
            continue;
        for (int32_t i = 0; i < W; i++) {
            int32_t id = (int32_t)(key * 100 + (uint64_t)i);
            bt_row_append(cl, row, &id, 1);
        }
        bt_row_release(cl, row);
    }
    bt_client_close(cl);
    return NULL;
}

static void test_race(void)
{
    bt_seg *seg = t_seg_new(cfg());
    struct race rc = { .seg = seg };
    pthread_t tid;
    T_ASSERT(pthread_create(&tid, NULL, writer_main, &rc) == 0);
    uint64_t keys[3] = { 1, 2, 3 }, hints[3] = { 0, 0, 0 };
    int32_t out[3 * W], nb[3];
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    double t0 = (double)ts.tv_sec + ts.tv_nsec * 1e-9, now = t0;
    /* At least 0.3 s of racing (the writer must get going), at most 10 s. */
    while ((rc.reads < 200000 || now - t0 < 0.3) && now - t0 < 10) {
        T_OK(bt_rows_gather(seg, keys, 3, hints, out, W, nb));
        for (int k = 0; k < 3; k++) {
            T_ASSERT(nb[k] >= -1 && nb[k] <= W);
            for (int i = 0; i < W; i++) {
                int32_t want = i < nb[k] ? (int32_t)(keys[k] * 100 + (uint64_t)i) : 0;
                if (out[k * W + i] != want)
                    t_fail_at(__FILE__, __LINE__, "key %d entry %d: %d, expected %d (nb %d)", k, i, out[k * W + i], want, nb[k]);
            }
            rc.found += nb[k] > 0;
        }
        rc.reads++;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        now = (double)ts.tv_sec + ts.tv_nsec * 1e-9;
    }
    rc.stop = 1;
    T_ASSERT(pthread_join(tid, NULL) == 0);
    T_ASSERT(rc.found > 0);
    T_END(seg);
}

int main(int argc, char **argv)
{
    t_init(argc, argv);
    T_RUN(test_find_and_gather);
    T_RUN(test_stale_hints);
    T_RUN(test_race);
    return t_done();
}
