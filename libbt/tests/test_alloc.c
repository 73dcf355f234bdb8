/*
 * test_alloc.c -- the allocator through the client API (alloc / release /
 * share, single and batch) and the raw pool API (pop / push).
 *
 * Every error path is checked for "nothing changed": free counts, reference
 * counts and the client's hand are compared before and after.
 */
#include "bt_test.h"

static uint32_t hand_count(bt_seg *seg, bt_client *cl)
{
    bt_client_slot_info si;
    T_OK(bt_client_slot_get(seg, bt_client_id(cl), &si));
    return si.hand_count;
}

static void test_single(void)
{
    bt_config c = t_config_small();
    bt_seg *seg = t_seg_embedded(&c);
    bt_client *cl = t_client(seg);
    uint32_t me = bt_client_id(cl);
    int32_t id, id2;
    uint32_t ref, owner;

    T_EQ(t_free(seg, 0), 63);
    T_OK(bt_blocks_alloc(cl, 0, 1, &id));
    T_ASSERT(id > 0 && id < 64);
    T_OK(bt_block_get(seg, id, &ref, &owner));
    T_EQ(ref, 1);
    T_EQ(owner, me);
    T_EQ(t_free(seg, 0), 62);
    T_EQ(hand_count(seg, cl), 1);

    T_OK(bt_blocks_alloc(cl, 0, 1, &id2));
    T_ASSERT(id2 != id && id2 > 0);

    T_OK(bt_blocks_release(cl, &id, 1));
    T_EQ(t_refcnt(seg, id), 0);
    T_EQ(t_free(seg, 0), 62);
    T_EQ(hand_count(seg, cl), 1);

    /* double release: BT_ENOTHELD and nothing changes */
    t_snap *before;
    before = t_snap_take(seg);
    T_RC(bt_blocks_release(cl, &id, 1), BT_ENOTHELD);
    T_SAME(seg, before);

    /* out of range ids */
    const int32_t bad[] = { -1, -64, 64, 65, 1 << 20, INT32_MAX, INT32_MIN };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        T_RC(bt_blocks_release(cl, &bad[i], 1), BT_ERANGE);
        T_RC(bt_blocks_share(cl, &bad[i], 1), BT_ERANGE);
        uint32_t r;
        T_RC(bt_block_get(seg, bad[i], &r, NULL), BT_ERANGE);
    }
    /* the null block is never held */
    int32_t zero = 0;
    T_RC2(bt_blocks_release(cl, &zero, 1), BT_ENOTHELD, BT_ERANGE);
    T_RC2(bt_blocks_share(cl, &zero, 1), BT_ENOTHELD, BT_ERANGE);
    T_SAME(seg, before);

    /* bad arguments */
    T_RC(bt_blocks_alloc(cl, 1, 1, &id), BT_ERANGE);       /* one pool only */
    T_RC(bt_blocks_alloc(cl, UINT32_MAX, 1, &id), BT_ERANGE);
    T_RC(bt_blocks_alloc(cl, 0, 1, NULL), BT_EINVAL);
    T_RC(bt_blocks_alloc(NULL, 0, 1, &id), BT_EINVAL);
    T_RC(bt_blocks_release(cl, NULL, 1), BT_EINVAL);
    T_RC(bt_blocks_share(cl, NULL, 1), BT_EINVAL);
    uint32_t n;
    T_RC(bt_pool_free_count(seg, 1, &n), BT_ERANGE);
    T_RC(bt_pool_free_count(seg, 0, NULL), BT_EINVAL);
    T_RC(bt_pool_free_count(NULL, 0, &n), BT_EINVAL);
    T_SAME(seg, before);

    T_OK(bt_blocks_release(cl, &id2, 1));
    T_EQ(t_free(seg, 0), 63);
    t_check_quiet(seg);
    bt_client_close(cl);
    bt_seg_close(seg);
}

static int cmp_i32(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

static void test_batch_and_exhaustion(void)
{
    bt_config c = t_config_small();
    bt_seg *seg = t_seg_embedded(&c);
    bt_client *cl = t_client(seg), *cl2 = t_client(seg);
    int32_t ids[64], more[4];
    t_snap *before;

    T_OK(bt_blocks_alloc(cl, 0, 10, ids));
    T_EQ(t_free(seg, 0), 53);
    T_EQ(hand_count(seg, cl), 10);
    /* a batch with one id not held: nothing released */
    int32_t mixed[3] = { ids[0], ids[1], 0 };
    T_OK(bt_blocks_alloc(cl2, 0, 1, &mixed[2]));
    before = t_snap_take(seg);
    T_RC(bt_blocks_release(cl, mixed, 3), BT_ENOTHELD);    /* mixed[2] is cl2's */
    T_SAME(seg, before);
    /* a batch naming one block twice, held once: nothing released */
    int32_t twice[3] = { ids[2], ids[3], ids[2] };
    T_RC(bt_blocks_release(cl, twice, 3), BT_ENOTHELD);
    T_SAME(seg, before);
    /* an out-of-range id at the end: nothing released */
    int32_t tail[3] = { ids[4], ids[5], 9999 };
    T_RC(bt_blocks_release(cl, tail, 3), BT_ERANGE);
    T_SAME(seg, before);
    T_OK(bt_blocks_release(cl2, &mixed[2], 1));

    /* take every remaining block: none is the null block, none twice */
    uint32_t left = t_free(seg, 0);
    T_EQ(left, 53);
    T_OK(bt_blocks_alloc(cl, 0, left, ids + 10));
    T_EQ(t_free(seg, 0), 0);
    qsort(ids, 63, sizeof(int32_t), cmp_i32);
    for (int i = 0; i < 63; i++)
        T_EQ(ids[i], i + 1);

    /* exhausted: all-or-nothing */
    before = t_snap_take(seg);
    T_RC(bt_blocks_alloc(cl, 0, 1, more), BT_ENOBLOCKS);
    T_RC(bt_blocks_alloc(cl2, 0, 1, more), BT_ENOBLOCKS);
    T_SAME(seg, before);
    T_OK(bt_blocks_release(cl, ids, 1));
    before = t_snap_take(seg);
    T_RC(bt_blocks_alloc(cl, 0, 2, more), BT_ENOBLOCKS);
    T_SAME(seg, before);
    T_EQ(t_free(seg, 0), 1);
    T_OK(bt_blocks_alloc(cl2, 0, 1, more));
    T_EQ(more[0], ids[0]);              /* the only free block */

    /* release everything in one batch */
    T_OK(bt_blocks_release(cl, ids + 1, 62));
    T_OK(bt_blocks_release(cl2, more, 1));
    T_EQ(t_free(seg, 0), 63);
    T_EQ(hand_count(seg, cl), 0);
    t_check_quiet(seg);

    /* n = 0 changes nothing */
    before = t_snap_take(seg);
    T_OK(bt_blocks_alloc(cl, 0, 0, ids));
    T_OK(bt_blocks_release(cl, ids, 0));
    T_OK(bt_blocks_share(cl, ids, 0));
    T_SAME(seg, before);

    /* closing a client releases its loose blocks */
    T_OK(bt_blocks_alloc(cl2, 0, 5, ids));
    T_EQ(t_free(seg, 0), 58);
    bt_client_close(cl2);
    T_EQ(t_free(seg, 0), 63);
    for (int i = 0; i < 5; i++)
        T_EQ(t_refcnt(seg, ids[i]), 0);
    t_check_quiet(seg);
    bt_client_close(cl);
    bt_seg_close(seg);
}

static void test_share(void)
{
    bt_config c = t_config_small();
    bt_seg *seg = t_seg_embedded(&c);
    bt_client *a = t_client(seg), *b = t_client(seg);
    int32_t ids[4];
    t_snap *before;

    T_OK(bt_blocks_alloc(a, 0, 4, ids));
    T_OK(bt_blocks_share(a, ids, 2));
    T_EQ(t_refcnt(seg, ids[0]), 2);
    T_EQ(t_refcnt(seg, ids[1]), 2);
    T_EQ(t_refcnt(seg, ids[2]), 1);
    T_EQ(hand_count(seg, a), 6);
    /* another client shares a's block (prefix sharing) */
    T_OK(bt_blocks_share(b, &ids[2], 1));
    T_EQ(t_refcnt(seg, ids[2]), 2);
    T_EQ(hand_count(seg, b), 1);
    /* the same block twice in one call: two references */
    int32_t two[2] = { ids[3], ids[3] };
    T_OK(bt_blocks_share(b, two, 2));
    T_EQ(t_refcnt(seg, ids[3]), 3);
    /* b may not release what only a holds */
    before = t_snap_take(seg);
    T_RC(bt_blocks_release(b, &ids[0], 1), BT_ENOTHELD);
    T_SAME(seg, before);
    /* release [x, x] where held twice: fine */
    T_OK(bt_blocks_release(b, two, 2));
    T_EQ(t_refcnt(seg, ids[3]), 1);
    /* a drops its ref on ids[2]; b's keeps it alive */
    T_OK(bt_blocks_release(a, &ids[2], 1));
    T_EQ(t_refcnt(seg, ids[2]), 1);
    T_EQ(t_free(seg, 0), 59);
    T_OK(bt_blocks_release(b, &ids[2], 1));
    T_EQ(t_refcnt(seg, ids[2]), 0);
    T_EQ(t_free(seg, 0), 60);
    /* sharing a free block: BT_ENOTHELD, nothing changed; a batch with one
     * free block takes no reference on the others */
    before = t_snap_take(seg);
    T_RC(bt_blocks_share(b, &ids[2], 1), BT_ENOTHELD);
    int32_t mix[3] = { ids[0], ids[1], ids[2] };
    T_RC(bt_blocks_share(b, mix, 3), BT_ENOTHELD);
    int32_t oor[2] = { ids[0], 64 };
    T_RC(bt_blocks_share(b, oor, 2), BT_ERANGE);
    T_SAME(seg, before);

    T_OK(bt_blocks_release(a, ids, 2));
    T_OK(bt_blocks_release(a, ids, 2));
    T_OK(bt_blocks_release(a, &ids[3], 1));
    T_EQ(t_free(seg, 0), 63);
    t_check_quiet(seg);
    bt_client_close(a);
    bt_client_close(b);
    bt_seg_close(seg);
}

static void test_hand_limit(void)
{
    bt_config c = t_config_small();
    c.hand_size = 8;
    bt_seg *seg = t_seg_embedded(&c);
    bt_client *cl = t_client(seg);
    int32_t ids[16];
    t_snap *before;

    T_OK(bt_blocks_alloc(cl, 0, 6, ids));
    before = t_snap_take(seg);
    T_RC(bt_blocks_alloc(cl, 0, 3, ids + 6), BT_EHANDFULL);
    T_RC(bt_blocks_share(cl, ids, 3), BT_EHANDFULL);
    T_SAME(seg, before);
    T_OK(bt_blocks_alloc(cl, 0, 1, ids + 6));
    T_OK(bt_blocks_share(cl, ids, 1));
    T_EQ(hand_count(seg, cl), 8);
    before = t_snap_take(seg);
    T_RC(bt_blocks_alloc(cl, 0, 1, ids + 7), BT_EHANDFULL);
    T_RC(bt_blocks_share(cl, ids, 1), BT_EHANDFULL);
    T_SAME(seg, before);
    /* references moved into a row leave the hand */
    uint32_t row;
    T_OK(bt_row_claim(cl, 1, -1, BT_ROW_MANAGED, &row));
    T_OK(bt_row_append(cl, row, ids, 4));
    T_EQ(hand_count(seg, cl), 4);
    T_OK(bt_blocks_alloc(cl, 0, 4, ids + 7));
    T_EQ(hand_count(seg, cl), 8);
    bt_client_close(cl);
    T_EQ(t_free(seg, 0), 63);
    t_check_quiet(seg);
    bt_seg_close(seg);
}

static void test_multi_pool(void)
{
    bt_config c = t_config_small();
    c.num_pools = 3;
    c.blocks_per_pool = 32;
    c.hand_size = 128;
    bt_seg *seg = t_seg_embedded(&c);
    bt_client *cl = t_client(seg);
    int32_t ids[32];

    T_EQ(t_free(seg, 0), 31);
    T_EQ(t_free(seg, 1), 32);
    T_EQ(t_free(seg, 2), 32);
    T_EQ(t_info(seg).total_blocks, 96);
    for (uint32_t p = 0; p < 3; p++) {
        uint32_t n = p == 0 ? 31 : 32;
        T_OK(bt_blocks_alloc(cl, p, n, ids));
        qsort(ids, n, sizeof(int32_t), cmp_i32);
        for (uint32_t i = 0; i < n; i++) {
            /* the id says its pool: id / blocks_per_pool */
            T_EQ(ids[i] / 32, p);
            T_EQ(ids[i], (int32_t)(p * 32 + i + (p == 0)));
        }
        T_EQ(t_free(seg, p), 0);
        for (uint32_t q = p + 1; q < 3; q++)
            T_EQ(t_free(seg, q), 32);
        T_RC(bt_blocks_alloc(cl, p, 1, ids), BT_ENOBLOCKS);
    }
    T_RC(bt_blocks_alloc(cl, 3, 1, ids), BT_ERANGE);
    /* a release batch spanning pools returns each block to its own pool */
    int32_t span[3] = { 5, 40, 70 };
    T_OK(bt_blocks_release(cl, span, 3));
    T_EQ(t_free(seg, 0), 1);
    T_EQ(t_free(seg, 1), 1);
    T_EQ(t_free(seg, 2), 1);
    T_OK(bt_blocks_alloc(cl, 2, 1, ids));
    T_EQ(ids[0], 70);
    T_OK(bt_blocks_alloc(cl, 1, 1, ids));
    T_EQ(ids[0], 40);
    T_OK(bt_blocks_alloc(cl, 0, 1, ids));
    T_EQ(ids[0], 5);
    T_RC(bt_blocks_alloc(cl, 0, 1, ids), BT_ENOBLOCKS);
    bt_client_close(cl);
    T_EQ(t_free(seg, 0), 31);
    T_EQ(t_free(seg, 1), 32);
    T_EQ(t_free(seg, 2), 32);
    t_check_quiet(seg);
    bt_seg_close(seg);
}

static void test_raw_pool(void)
{
    bt_config c = t_config_small();
    c.num_pools = 2;
    bt_seg *seg = t_seg_embedded(&c);
    int32_t ids[64];
    uint32_t ref, owner;
    t_snap *before;

    T_OK(bt_pool_pop(seg, 1, 16, 0xabcd, ids));
    for (int i = 0; i < 16; i++) {
        T_ASSERT(ids[i] >= 64 && ids[i] < 128);
        T_OK(bt_block_get(seg, ids[i], &ref, &owner));
        T_EQ(ref, 1);
        T_EQ(owner, 0xabcd);
    }
    T_EQ(t_free(seg, 1), 48);
    T_OK(bt_pool_push(seg, ids, 16));
    T_EQ(t_free(seg, 1), 64);
    for (int i = 0; i < 16; i++)
        T_EQ(t_refcnt(seg, ids[i]), 0);

    /* pushing a free block, or one pushed twice in a batch: refused */
    before = t_snap_take(seg);
    T_RC(bt_pool_push(seg, ids, 1), BT_ENOTHELD);
    T_OK(bt_pool_pop(seg, 0, 2, 7, ids));
    before = t_snap_take(seg);
    int32_t dup[2] = { ids[0], ids[0] };
    T_RC(bt_pool_push(seg, dup, 2), BT_ENOTHELD);
    int32_t oor[2] = { ids[1], 128 };
    T_RC(bt_pool_push(seg, oor, 2), BT_ERANGE);
    int32_t null_blk = 0;
    T_RC2(bt_pool_push(seg, &null_blk, 1), BT_ERANGE, BT_ENOTHELD);
    T_SAME(seg, before);
    /* a block a client shares has count 2: the raw push refuses it */
    bt_client *cl = t_client(seg);
    T_OK(bt_blocks_share(cl, &ids[0], 1));
    before = t_snap_take(seg);
    T_RC(bt_pool_push(seg, ids, 2), BT_ENOTHELD);
    T_SAME(seg, before);
    T_OK(bt_blocks_release(cl, &ids[0], 1));
    T_OK(bt_pool_push(seg, ids, 2));

    /* exhaustion is all-or-nothing; n = 0 and bad pools */
    int32_t more[16];                   /* out must have room for n, even on failure */
    T_OK(bt_pool_pop(seg, 0, 63, 1, ids));
    T_RC(bt_pool_pop(seg, 0, 1, 1, more), BT_ENOBLOCKS);
    T_OK(bt_pool_push(seg, ids, 10));
    T_RC(bt_pool_pop(seg, 0, 11, 1, more), BT_ENOBLOCKS);
    T_EQ(t_free(seg, 0), 10);
    T_OK(bt_pool_push(seg, ids + 10, 53));
    T_OK(bt_pool_pop(seg, 0, 0, 1, ids));
    T_RC(bt_pool_pop(seg, 2, 1, 1, ids), BT_ERANGE);
    T_RC(bt_pool_pop(seg, 0, 1, 1, NULL), BT_EINVAL);
    T_RC(bt_pool_push(seg, NULL, 1), BT_EINVAL);
    T_EQ(t_free(seg, 0), 63);
    T_EQ(t_free(seg, 1), 64);
    bt_client_close(cl);
    t_check_quiet(seg);
    bt_seg_close(seg);
}

int main(int argc, char **argv)
{
    t_init(argc, argv);
    T_RUN(test_single);
    T_RUN(test_batch_and_exhaustion);
    T_RUN(test_share);
    T_RUN(test_hand_limit);
    T_RUN(test_multi_pool);
    T_RUN(test_raw_pool);
    return t_done();
}
