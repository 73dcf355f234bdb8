/*
 * test_step.c -- bt_step: a scheduler step (release ending rows, allocate and
 * append for growing rows) in one call, all-or-nothing.
 *
 * Besides fixed cases, a random sequence of steps is run against a model of
 * the rows. Validation errors (BT_EROWFULL, ownership, ranges) change
 * nothing; on BT_ENOBLOCKS the ending rows are released (bt.h: they ended,
 * and their blocks count toward the step's supply) and no row grows.
 */
#include "bt_test.h"

#define R 8                              /* rows */
#define W 8                              /* row width */

static bt_config cfg(void)
{
    bt_config c = t_config_small();
    c.num_pools = 2;
    c.blocks_per_pool = 64;
    c.num_rows = R;
    c.row_width = W;
    return c;
}

static void test_basic(void)
{
    bt_config c = cfg();
    bt_seg *seg = t_seg_embedded(&c);
    bt_client *a = t_client(seg);
    uint32_t row[4];
    int32_t ids[16], got[W];

    for (int i = 0; i < 4; i++)
        T_OK(bt_row_claim(a, 10 + i, i, BT_ROW_MANAGED, &row[i]));
    uint32_t rows[3] = { 0, 1, 2 }, n_new[3] = { 1, 2, 0 };
    T_OK(bt_step(a, 0, NULL, 0, rows, n_new, 3, ids));
    T_EQ(t_free(seg, 0), 60);
    bt_row_info ri = t_row(seg, 0, got, W);
    T_EQ(ri.num_blocks, 1);
    T_EQ(got[0], ids[0]);
    ri = t_row(seg, 1, got, W);
    T_EQ(ri.num_blocks, 2);
    T_EQ(got[0], ids[1]);
    T_EQ(got[1], ids[2]);
    T_EQ(t_row(seg, 2, got, W).num_blocks, 0);
    for (int i = 0; i < 3; i++) {
        uint32_t ref, owner;
        T_OK(bt_block_get(seg, ids[i], &ref, &owner));
        T_EQ(ref, 1);
        T_EQ(owner, bt_client_id(a));
        T_ASSERT(ids[i] > 0 && ids[i] < 64);
    }
    bt_client_slot_info si;
    T_OK(bt_client_slot_get(seg, bt_client_id(a), &si));
    T_EQ(si.hand_count, 0);

    /* appends after what the row holds */
    int32_t first = ids[0];
    uint32_t r0 = 0, two = 2;
    T_OK(bt_step(a, 0, NULL, 0, &r0, &two, 1, ids));
    ri = t_row(seg, 0, got, W);
    T_EQ(ri.num_blocks, 3);
    T_EQ(got[0], first);
    T_EQ(got[1], ids[0]);
    T_EQ(got[2], ids[1]);

    /* release row 1 and grow row 0 in one call */
    int32_t gone[2];
    t_row(seg, 1, gone, W);
    uint32_t f1 = 1, one = 1;
    T_OK(bt_step(a, 0, &f1, 1, &r0, &one, 1, ids));
    T_EQ(t_row(seg, 1, NULL, 0).owner, 0);
    T_EQ(t_row(seg, 1, NULL, 0).num_blocks, 0);
    for (int i = 0; i < 2; i++)         /* freed, or handed straight to row 0 */
        T_EQ(t_refcnt(seg, gone[i]), gone[i] == ids[0]);
    T_EQ(t_row(seg, 0, got, W).num_blocks, 4);
    T_EQ(got[3], ids[0]);
    T_EQ(t_free(seg, 0), 63 - 4);
    t_check_quiet(seg);

    /* only releases; a RAW row may be released by a step too */
    uint32_t rr;
    T_OK(bt_row_claim(a, 99, -1, BT_ROW_RAW, &rr));
    int32_t rawids[2] = { 1000, 2000 };
    T_OK(bt_row_append(a, rr, rawids, 2));
    uint32_t frees[2] = { 0, rr };
    T_OK(bt_step(a, 0, frees, 2, NULL, NULL, 0, ids));
    T_EQ(t_row(seg, 0, NULL, 0).owner, 0);
    T_EQ(t_row(seg, rr, NULL, 0).owner, 0);
    T_EQ(t_free(seg, 0), 63);

    /* another pool */
    uint32_t r2 = 2, three = 3;
    T_OK(bt_step(a, 1, NULL, 0, &r2, &three, 1, ids));
    for (int i = 0; i < 3; i++)
        T_ASSERT(ids[i] >= 64 && ids[i] < 128);
    T_EQ(t_free(seg, 1), 61);
    /* an empty step */
    T_OK(bt_step(a, 0, NULL, 0, NULL, NULL, 0, ids));
    bt_client_close(a);
    T_EQ(t_free(seg, 1), 64);
    t_check_quiet(seg);
    bt_seg_close(seg);
}

static void test_all_or_nothing(void)
{
    bt_config c = cfg();
    bt_seg *seg = t_seg_embedded(&c);
    bt_client *a = t_client(seg), *b = t_client(seg), *hog = t_client(seg);
    uint32_t r;
    int32_t ids[64];
    t_snap *s;

    for (int i = 0; i < 6; i++)
        T_OK(bt_row_claim(i < 5 ? a : b, 10 + i, i, BT_ROW_MANAGED, &r));
    T_OK(bt_row_claim(a, 16, 6, BT_ROW_RAW, &r));
    uint32_t n4 = 4, n2 = 2, n1 = 1, rows1[1] = { 1 }, rows2[1] = { 2 };
    T_OK(bt_step(a, 0, NULL, 0, rows1, &n4, 1, ids));    /* row 1: 4 blocks */
    T_OK(bt_step(a, 1, NULL, 0, rows2, &n2, 1, ids));    /* row 2: 2 blocks of pool 1 */

    s = t_snap_take(seg);
    /* one row would overflow: nothing happens, not even the release */
    {
        uint32_t fr[1] = { 2 }, rows[2] = { 0, 1 }, nn[2] = { 1, 5 };
        T_RC(bt_step(a, 0, fr, 1, rows, nn, 2, ids), BT_EROWFULL);
    }
    /* rows listed twice, or both released and grown */
    {
        uint32_t rows[2] = { 0, 0 }, nn[2] = { 1, 1 };
        T_RC(bt_step(a, 0, NULL, 0, rows, nn, 2, ids), BT_EINVAL);
        uint32_t fr[1] = { 0 };
        T_RC(bt_step(a, 0, fr, 1, rows, nn, 1, ids), BT_EINVAL);
        uint32_t fr2[2] = { 2, 2 };
        T_RC(bt_step(a, 0, fr2, 2, NULL, NULL, 0, ids), BT_EINVAL);
    }
    /* rows not ours, free, out of range, RAW */
    {
        uint32_t theirs = 5, unclaimed = 7, far = 1000, huge = 1u << 30, raw = 6;
        T_RC(bt_step(a, 0, NULL, 0, &theirs, &n1, 1, ids), BT_ENOTOWNER);
        T_RC(bt_step(a, 0, &theirs, 1, NULL, NULL, 0, ids), BT_ENOTOWNER);
        T_RC(bt_step(a, 0, NULL, 0, &unclaimed, &n1, 1, ids), BT_EROWSTATE);
        T_RC(bt_step(a, 0, &unclaimed, 1, NULL, NULL, 0, ids), BT_EROWSTATE);
        T_RC(bt_step(a, 0, NULL, 0, &far, &n1, 1, ids), BT_ERANGE);
        T_RC(bt_step(a, 0, NULL, 0, &huge, &n1, 1, ids), BT_ERANGE);
        /* out-of-range rows among free_rows: test_bad_free_rows */
        T_RC2(bt_step(a, 0, NULL, 0, &raw, &n1, 1, ids), BT_EROWSTATE, BT_EINVAL);
    }
    /* bad pool and null pointers */
    {
        uint32_t r0 = 0;
        T_RC(bt_step(a, 2, NULL, 0, &r0, &n1, 1, ids), BT_ERANGE);
        T_RC(bt_step(a, 0, NULL, 1, NULL, NULL, 0, ids), BT_EINVAL);
        T_RC(bt_step(a, 0, NULL, 0, NULL, &n1, 1, ids), BT_EINVAL);
        T_RC(bt_step(a, 0, NULL, 0, &r0, NULL, 1, ids), BT_EINVAL);
        T_RC(bt_step(a, 0, NULL, 0, &r0, &n1, 1, NULL), BT_EINVAL);
        T_RC(bt_step(NULL, 0, NULL, 0, &r0, &n1, 1, ids), BT_EINVAL);
    }
    T_SAME(seg, s);

    /* the pool runs short: leave 2 free blocks in pool 0 */
    uint32_t left = t_free(seg, 0) - 2;
    T_OK(bt_blocks_alloc(hog, 0, left, ids));
    s = t_snap_take(seg);
    {
        uint32_t rows[2] = { 0, 3 }, nn[2] = { 2, 1 };
        T_RC(bt_step(a, 0, NULL, 0, rows, nn, 2, ids), BT_ENOBLOCKS);
        T_SAME(seg, s);
        /* releasing row 2 frees pool-1 blocks: no help for pool 0. The
         * ending row stays released (bt.h: it ended); no row got a block */
        uint32_t fr[1] = { 2 };
        T_RC(bt_step(a, 0, fr, 1, rows, nn, 2, ids), BT_ENOBLOCKS);
        T_EQ(t_row(seg, 2, NULL, 0).owner, 0);
        T_EQ(t_free(seg, 1), 64);
        T_EQ(t_free(seg, 0), 2);
        T_EQ(t_row(seg, 0, NULL, 0).num_blocks, 0);
        T_EQ(t_row(seg, 3, NULL, 0).num_blocks, 0);
    }
    /* releasing row 1 frees 4 pool-0 blocks, which serve this very step */
    {
        uint32_t fr[1] = { 1 }, rows[2] = { 0, 3 }, nn[2] = { 2, 2 };
        T_OK(bt_step(a, 0, fr, 1, rows, nn, 2, ids));
        T_EQ(t_row(seg, 1, NULL, 0).owner, 0);
        T_EQ(t_row(seg, 0, NULL, 0).num_blocks, 2);
        T_EQ(t_row(seg, 3, NULL, 0).num_blocks, 2);
        T_EQ(t_free(seg, 0), 2);
    }
    t_check_quiet(seg);
    bt_client_close(hog);
    bt_client_close(a);
    bt_client_close(b);
    t_check_quiet(seg);
    T_EQ(t_free(seg, 0), 63);
    T_EQ(t_free(seg, 1), 64);
    bt_seg_close(seg);
}

/* Out-of-range rows in free_rows must be BT_ERANGE; they must not index the
 * client's scratch bitmap (step.c clears the mark of the failing entry too). */
/* bt_step_run, a plan's call: counts past the caps are refused with nothing
 * changed (the args' counts included); otherwise it is bt_step_ex, returning
 * ids_total or bt_step_ex's error. The steady state of a scheduler loop (B
 * requests end, B arrive with a block each) keeps the pool's count. */
static void test_step_run(void)
{
    bt_config c = cfg();
    bt_seg *seg = t_seg_embedded(&c);
    bt_client *a = t_client(seg);
    uint32_t free_rows[4], rows[4], n_new[4], arrive_n[4] = { 1, 1, 1, 1 }, arrive_rows[4];
    uint64_t keys[4] = { 1, 2, 3, 4 };
    int32_t ids[16];
    bt_step_args args = { .pool = 0, .free_rows = free_rows, .rows = rows, .n_new = n_new,
                          .arrive_keys = keys, .arrive_n = arrive_n, .arrive_rows = arrive_rows,
                          .ids_out = ids, .ids_cap = 16, .n_free = 7, .n_rows = 7, .n_arrive = 7 };
    const uint32_t caps[3] = { 4, 4, 4 };
    /* past a cap: BT_EINVAL, the args untouched, nothing shared changed */
    T_EQ(bt_step_run(a, &args, 5, 0, 0, caps), BT_EINVAL);
    T_EQ(bt_step_run(a, &args, 0, 5, 0, caps), BT_EINVAL);
    T_EQ(bt_step_run(a, &args, 0, 0, UINT32_MAX, caps), BT_EINVAL);
    T_EQ(bt_step_run(a, NULL, 0, 0, 0, caps), BT_EINVAL);
    T_EQ(bt_step_run(a, &args, 0, 0, 0, NULL), BT_EINVAL);
    T_EQ(args.n_free, 7);
    T_EQ(args.n_rows, 7);
    T_EQ(args.n_arrive, 7);
    T_EQ(t_free(seg, 0), 63);
    /* 4 arrive, then 10 steady steps: they end, 4 new arrive */
    T_EQ(bt_step_run(a, &args, 0, 0, 4, caps), 4);
    T_EQ(args.ids_total, 4);
    T_EQ(t_free(seg, 0), 59);
    for (int step = 0; step < 10; step++) {
        memcpy(free_rows, arrive_rows, sizeof(free_rows));
        T_EQ(bt_step_run(a, &args, 4, 0, 4, caps), 4);
        T_EQ(t_free(seg, 0), 59);
        for (int i = 0; i < 4; i++)
            T_EQ(t_row(seg, arrive_rows[i], NULL, 0).num_blocks, 1);
    }
    /* a growing row, and an error of bt_step_ex passed through: a row listed twice */
    rows[0] = arrive_rows[0];
    n_new[0] = 2;
    T_EQ(bt_step_run(a, &args, 0, 1, 0, caps), 2);
    T_EQ(t_row(seg, arrive_rows[0], NULL, 0).num_blocks, 3);
    rows[1] = rows[0];
    n_new[1] = 1;
    T_EQ(bt_step_run(a, &args, 0, 2, 0, caps), BT_EINVAL);
    T_EQ(t_row(seg, arrive_rows[0], NULL, 0).num_blocks, 3);
    n_new[0] = W;                       /* past the width: BT_EROWFULL */
    T_EQ(bt_step_run(a, &args, 0, 1, 0, caps), BT_EROWFULL);
    T_EQ(t_free(seg, 0), 57);
    bt_client_close(a);
    bt_seg_close(seg);
}

static void test_bad_free_rows(void)
{
    bt_config c = cfg();
    bt_seg *seg = t_seg_embedded(&c);
    bt_client *a = t_client(seg);
    uint32_t r, far = 1000, huge = 1u << 30;
    int32_t ids[4];
    T_OK(bt_row_claim(a, 1, 2, BT_ROW_MANAGED, &r));
    T_OK(bt_row_alloc_append(a, r, 0, 2, NULL));
    t_snap *s = t_snap_take(seg);
    T_RC(bt_step(a, 0, &far, 1, NULL, NULL, 0, ids), BT_ERANGE);
    uint32_t fr[2] = { 2, far };
    T_RC(bt_step(a, 0, fr, 2, NULL, NULL, 0, ids), BT_ERANGE);
    T_RC(bt_step(a, 0, &huge, 1, NULL, NULL, 0, ids), BT_ERANGE);
    T_SAME(seg, s);
    bt_client_close(a);
    t_check_quiet(seg);
    bt_seg_close(seg);
}

/* Random steps against a model: rows' contents, the pool's free count. */
static void test_random(void)
{
    bt_config c = cfg();
    c.blocks_per_pool = 32;              /* small: the pool runs dry often */
    bt_seg *seg = t_seg_embedded(&c);
    bt_client *a = t_client(seg);
    uint64_t rnd = t_substream(0);
    int32_t model[R][W];
    uint32_t nb[R], claimed[R];
    int32_t ids[R * W];
    int ok = 0, full = 0, dry = 0;

    memset(nb, 0, sizeof(nb));
    memset(claimed, 0, sizeof(claimed));
    for (int it = 0; it < 3000; it++) {
        /* claim any free rows */
        for (uint32_t r = 0; r < R; r++)
            if (!claimed[r] && t_below(&rnd, 2)) {
                uint32_t got;
                T_OK(bt_row_claim(a, (uint64_t)it, (int32_t)r, BT_ROW_MANAGED, &got));
                claimed[r] = 1;
                nb[r] = 0;
            }
        uint32_t fr[R], rows[R], nn[R], nf = 0, ng = 0, want = 0;
        uint32_t perm[R];
        for (uint32_t i = 0; i < R; i++)
            perm[i] = i;
        for (uint32_t i = R - 1; i > 0; i--) {
            uint32_t j = t_below(&rnd, i + 1), t = perm[i];
            perm[i] = perm[j];
            perm[j] = t;
        }
        for (uint32_t i = 0; i < R; i++) {
            uint32_t r = perm[i];
            if (!claimed[r])
                continue;
            uint32_t k = t_below(&rnd, 16);
            if (k < 1)
                fr[nf++] = r;
            else if (k < 13) {
                rows[ng] = r;
                /* mostly fits, sometimes overflows */
                uint32_t room = W - nb[r];
                nn[ng] = t_below(&rnd, 40) ? t_below(&rnd, room < 3 ? room + 1 : 3) : room + 1 + t_below(&rnd, 2);
                want += nn[ng];
                ng++;
            }
        }
        t_snap *s = t_snap_take(seg);
        uint32_t free0 = t_free(seg, 0);
        int overflow = 0;
        for (uint32_t i = 0; i < ng; i++)
            overflow |= nb[rows[i]] + nn[i] > W;
        int rc = bt_step(a, 0, fr, nf, rows, nn, ng, ids);
        if (overflow) {
            T_ASSERTF(rc == BT_EROWFULL, "iteration %d: got %s, a row overflows", it, bt_errname(rc));
            T_SAME(seg, s);
            full++;
            continue;
        }
        /* the ending rows' blocks (none shared here) serve this very step */
        uint32_t released = 0;
        for (uint32_t i = 0; i < nf; i++)
            released += nb[fr[i]];
        if (want > free0 + released) {
            T_ASSERTF(rc == BT_ENOBLOCKS, "iteration %d: got %s, %u wanted, %u free + %u released",
                      it, bt_errname(rc), want, free0, released);
            T_EQ(t_free(seg, 0), free0 + released);     /* released, nothing allocated */
            dry++;
        } else {
            T_ASSERTF(rc == 0, "iteration %d: bt_step returned %s (%u wanted, %u free + %u"
                      " released)", it, bt_errname(rc), want, free0, released);
            T_EQ(t_free(seg, 0), free0 + released - want);
            ok++;
        }
        for (uint32_t i = 0; i < nf; i++) {
            claimed[fr[i]] = 0;
            nb[fr[i]] = 0;
        }
        const int32_t *src = ids;
        for (uint32_t i = 0; !rc && i < ng; i++)
            for (uint32_t k = 0; k < nn[i]; k++)
                model[rows[i]][nb[rows[i]]++] = *src++;
        for (uint32_t r = 0; r < R; r++) {
            int32_t got[W];
            bt_row_info ri = t_row(seg, r, got, W);
            T_EQ(ri.owner, claimed[r] ? bt_client_id(a) : 0);
            T_EQ(ri.num_blocks, claimed[r] ? nb[r] : 0);
            for (uint32_t k = 0; claimed[r] && k < nb[r]; k++)
                T_EQ(got[k], model[r][k]);
        }
        if (it % 64 == 0)
            t_check_quiet(seg);
    }
    printf("random steps: %d ok, %d row full, %d pool dry\n", ok, full, dry);
    T_ASSERT(ok > 100 && full > 10 && dry > 10);
    bt_client_close(a);
    t_check_quiet(seg);
    bt_seg_close(seg);
}

int main(int argc, char **argv)
{
    t_init(argc, argv);
    T_RUN(test_basic);
    T_RUN(test_all_or_nothing);
    T_RUN(test_random);
    T_RUN(test_step_run);
    T_RUN(test_bad_free_rows);               /* last: crashes in step.c as of writing */
    return t_done();
}
