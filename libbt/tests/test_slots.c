/*
 * test_slots.c -- slot mapping: the three forms against a naive reference
 * computed here, kernel-block views, decode context parallelism.
 *
 * Reference (bt.h, DESIGN.md, vLLM's dcp): virtual block vbs = bs * world;
 * position pos is local to rank iff (pos % vbs) / I % world == rank, and then
 *   slot = table[row][pos / vbs] * bs + (pos % vbs) / (world * I) * I + pos % I
 * -1 for negative positions, positions past the row's blocks, and (with
 * world > 1) positions of other ranks.
 */
#include "bt_test.h"
#include <pthread.h>

#define ROWS 8
#define WIDTH 64
#define SENTINEL ((int64_t)0x5a5a5a5a5a5a5a5all)

struct params { uint32_t bs, world, rank, il; };

/* The rows, read once per segment: they do not change while slots are checked. */
static int32_t cache_ids[ROWS][WIDTH];
static uint32_t cache_nb[ROWS], cache_B;
static void cache_rows(const bt_seg *seg)
{
    cache_B = t_info(seg).config.block_size;
    for (uint32_t r = 0; r < ROWS; r++)
        cache_nb[r] = t_row(seg, r, cache_ids[r], WIDTH).num_blocks;
}

static int64_t ref_slot(const struct params *p, uint32_t row, int64_t pos)
{
    const int32_t *ids = cache_ids[row];
    int64_t bs = p->bs ? p->bs : cache_B;
    int64_t world = p->world > 1 ? p->world : 1, rank = world > 1 ? p->rank : 0;
    int64_t il = p->il ? p->il : 1;
    if (pos < 0)
        return -1;
    int64_t vbs = bs * world;
    if (pos / vbs >= (int64_t)cache_nb[row])
        return -1;
    int64_t v = pos % vbs;
    if (world > 1 && (v / il) % world != rank)
        return -1;
    return (int64_t)ids[pos / vbs] * bs + v / (world * il) * il + pos % il;
}

static bt_slot_params sp(const struct params *p)
{
    bt_slot_params o = { .block_size = p->bs, .cp_world = p->world, .cp_rank = p->rank,
                         .cp_interleave = p->il };
    return o;
}

static const char *pstr(const struct params *p)
{
    static char buf[96];
    snprintf(buf, sizeof(buf), "bs %u world %u rank %u interleave %u", p->bs, p->world, p->rank,
             p->il);
    return buf;
}

/* Every parameter set that makes sense for block size B: bs a divisor of B
 * (kernel views), worlds 1..4 with every rank, interleaves dividing bs. */
static int param_sets(uint32_t B, struct params *out, int max)
{
    int n = 0;
    for (uint32_t bs = 1; bs <= B; bs++) {
        if (B % bs)
            continue;
        for (uint32_t world = 0; world <= 4; world++)
            for (uint32_t rank = 0; rank < (world > 1 ? world : 1); rank++)
                for (uint32_t il = 0; il <= bs; il++) {
                    if (il > 1 && bs % il)
                        continue;
                    if (world <= 1 && il > 1)
                        continue;       /* interleave means nothing without cp */
                    if (n < max)
                        out[n] = (struct params){ bs == B && world == 0 ? 0 : bs, world, rank, il };
                    n++;
                }
    }
    return n < max ? n : max;
}

/* Segment with block size B and a few rows of known contents:
 *   0: MANAGED, 5 allocated blocks      1: RAW { 7, 0, 300, INT32_MAX, 2 }
 *   2: RAW, row 0 in kernel blocks of K 3: claimed, empty
 *   4: never claimed                    5: RAW, WIDTH entries (a full row)
 *   6: MANAGED, 1 block                 7: RAW, 3 blocks, ids up to 2^29 */
static bt_seg *setup(uint32_t B, uint32_t K, bt_client **clp)
{
    bt_config c = t_config_small();
    c.block_size = B;
    c.kernel_block_size = K;
    c.num_pools = 2;
    c.blocks_per_pool = 256;
    c.num_rows = ROWS;
    c.row_width = WIDTH;
    bt_seg *seg = t_seg_embedded(&c);
    bt_client *cl = t_client(seg);
    uint32_t r;
    int32_t x[WIDTH];
    T_OK(bt_row_claim(cl, 0, 0, BT_ROW_MANAGED, &r));
    T_OK(bt_row_alloc_append(cl, 0, 1, 5, x));
    T_OK(bt_row_claim(cl, 1, 1, BT_ROW_RAW, &r));
    int32_t raw1[5] = { 7, 0, 300, INT32_MAX, 2 };
    T_OK(bt_row_append(cl, 1, raw1, 5));
    T_OK(bt_row_claim(cl, 2, 2, BT_ROW_RAW, &r));
    uint32_t per = B / K;
    int32_t kv[WIDTH];
    for (uint32_t i = 0; i < 5 * per; i++)
        kv[i] = x[i / per] * (int32_t)per + (int32_t)(i % per);
    T_OK(bt_row_append(cl, 2, kv, 5 * per));
    T_OK(bt_row_claim(cl, 3, 3, BT_ROW_MANAGED, &r));
    T_OK(bt_row_claim(cl, 5, 5, BT_ROW_RAW, &r));
    for (int i = 0; i < WIDTH; i++)
        kv[i] = 1000 + 3 * i;
    T_OK(bt_row_append(cl, 5, kv, WIDTH));
    T_OK(bt_row_claim(cl, 6, 6, BT_ROW_MANAGED, &r));
    T_OK(bt_row_alloc_append(cl, 6, 0, 1, NULL));
    T_OK(bt_row_claim(cl, 7, 7, BT_ROW_RAW, &r));
    int32_t big[3] = { 1 << 29, (1 << 29) - 1, 12345678 };
    T_OK(bt_row_append(cl, 7, big, 3));
    *clp = cl;
    return seg;
}

static void check_form1(bt_seg *seg, const struct params *p)
{
    const int64_t starts[] = { -100, -1, 0, 5, 15, 16, 17, 63, 79, 200, 1023, (int64_t)1 << 40 };
    const uint32_t lens[] = { 0, 1, 3, 37, 129, 700 };
    static int64_t out[1024];
    bt_slot_params prm = sp(p);
    for (uint32_t row = 0; row < ROWS; row++)
        for (size_t si = 0; si < sizeof(starts) / sizeof(starts[0]); si++)
            for (size_t li = 0; li < sizeof(lens) / sizeof(lens[0]); li++) {
                uint32_t n = lens[li];
                for (uint32_t i = 0; i <= n; i++)
                    out[i] = SENTINEL;
                int rc = bt_slots_row(seg, &prm, row, starts[si], n, out);
                if (rc)
                    T_FAIL("bt_slots_row(row %u, start %" PRId64 ", n %u, %s) returned %s", row,
                           starts[si], n, pstr(p), bt_errname(rc));
                for (uint32_t i = 0; i < n; i++) {
                    int64_t want = ref_slot(p, row, starts[si] + i);
                    if (out[i] != want)
                        T_FAIL("bt_slots_row row %u pos %" PRId64 " (%s): %" PRId64
                               ", reference %" PRId64, row, starts[si] + i, pstr(p), out[i], want);
                }
                if (out[n] != SENTINEL)
                    T_FAIL("bt_slots_row wrote past n = %u", n);
            }
}

static void check_form2(bt_seg *seg, const struct params *p, uint64_t *rnd)
{
    enum { N = 600 };
    static int32_t rows[N];
    static int64_t pos[N], out[N + 1];
    bt_slot_params prm = sp(p);
    for (int i = 0; i < N; i++) {
        rows[i] = (int32_t)t_below(rnd, ROWS);
        uint32_t k = t_below(rnd, 16);
        pos[i] = k == 0 ? -(int64_t)t_below(rnd, 100) - 1
               : k == 1 ? (int64_t)t_below(rnd, 1u << 31) * 4096
               : k == 2 ? INT64_MAX - t_below(rnd, 3)
               : k == 3 ? INT64_MIN + t_below(rnd, 3)
               : (int64_t)t_below(rnd, 1200);
    }
    out[N] = SENTINEL;
    T_OK(bt_slots_req(seg, &prm, rows, pos, N, out));
    for (int i = 0; i < N; i++) {
        int64_t want = ref_slot(p, (uint32_t)rows[i], pos[i]);
        if (out[i] != want)
            T_FAIL("bt_slots_req row %d pos %" PRId64 " (%s): %" PRId64 ", reference %" PRId64,
                   rows[i], pos[i], pstr(p), out[i], want);
    }
    T_EQ(out[N], SENTINEL);
}

static void check_form3(bt_seg *seg, const struct params *p, uint64_t *rnd)
{
    enum { MAXT = 512 };
    int32_t qsl[ROWS + 1], rows[ROWS];
    static int64_t pos[MAXT], out[MAXT + 1];
    bt_slot_params prm = sp(p);
    for (int with_rows = 0; with_rows < 2; with_rows++) {
        uint32_t nreq = 1 + t_below(rnd, ROWS);
        qsl[0] = 0;
        for (uint32_t i = 0; i < nreq; i++) {
            rows[i] = (int32_t)t_below(rnd, ROWS);
            uint32_t len = t_below(rnd, 4) == 0 ? 0 : 1 + t_below(rnd, 40);
            qsl[i + 1] = qsl[i] + (int32_t)len;
            int64_t start = (int64_t)t_below(rnd, 120) - 4;
            for (int32_t t = qsl[i]; t < qsl[i + 1]; t++)
                pos[t] = start + (t - qsl[i]);          /* a request's tokens run on */
        }
        uint32_t total = (uint32_t)qsl[nreq];
        uint32_t out_len = total + t_below(rnd, 20);    /* CUDA-graph padding */
        for (uint32_t t = 0; t <= out_len; t++)
            out[t] = SENTINEL;
        T_OK(bt_slots_qsl(seg, &prm, with_rows ? rows : NULL, qsl, nreq, pos, out, out_len));
        for (uint32_t i = 0; i < nreq; i++)
            for (int32_t t = qsl[i]; t < qsl[i + 1]; t++) {
                uint32_t row = with_rows ? (uint32_t)rows[i] : i;
                int64_t want = ref_slot(p, row, pos[t]);
                if (out[t] != want)
                    T_FAIL("bt_slots_qsl req %u (row %u) token %d pos %" PRId64 " (%s): %" PRId64
                           ", reference %" PRId64, i, row, t, pos[t], pstr(p), out[t], want);
            }
        for (uint32_t t = total; t < out_len; t++)
            if (out[t] != -1)
                T_FAIL("bt_slots_qsl padding out[%u] = %" PRId64 ", expected -1", t, out[t]);
        T_EQ(out[out_len], SENTINEL);
    }
}

static void test_against_reference(uint32_t B, uint32_t K)
{
    bt_client *cl;
    bt_seg *seg = setup(B, K, &cl);
    static struct params ps[4096];
    int np = param_sets(B, ps, 4096);
    uint64_t rnd = t_substream(B * 100 + K);
    cache_rows(seg);
    for (int i = 0; i < np; i++) {
        check_form1(seg, &ps[i]);
        check_form2(seg, &ps[i], &rnd);
        check_form3(seg, &ps[i], &rnd);
    }
    printf("B=%u K=%u: %d parameter sets agree with the reference\n", B, K, np);
    bt_client_close(cl);
    bt_seg_close(seg);
}

/* A table of kernel-block ids (K tokens each) maps every token to the same
 * slot as the table of B-token blocks it was derived from. */
static void test_kernel_view(uint32_t B, uint32_t K)
{
    bt_client *cl;
    bt_seg *seg = setup(B, K, &cl);
    int64_t a[1024], b[1024];
    bt_slot_params pb = { .block_size = 0 }, pk = { .block_size = K };
    T_OK(bt_slots_row(seg, &pb, 0, -3, 1000, a));
    T_OK(bt_slots_row(seg, &pk, 2, -3, 1000, b));
    for (int i = 0; i < 1000; i++)
        if (a[i] != b[i])
            T_FAIL("B=%u K=%u pos %d: block view %" PRId64 ", kernel view %" PRId64, B, K, i - 3,
                   a[i], b[i]);
    T_EQ(a[2], -1);                     /* position -1 */
    T_ASSERT(a[3] >= 0);
    T_ASSERT(a[3 + 5 * B - 1] >= 0);
    T_EQ(a[3 + 5 * B], -1);
    bt_client_close(cl);
    bt_seg_close(seg);
}

/* With context parallelism each rank keeps exactly bs tokens of every
 * virtual block, and they fill its local block: slots id*bs .. id*bs+bs-1,
 * each once. */
static void test_cp_partition(void)
{
    bt_client *cl;
    bt_seg *seg = setup(16, 16, &cl);
    int32_t ids[WIDTH];
    bt_row_info ri = t_row(seg, 0, ids, WIDTH);
    for (uint32_t world = 2; world <= 8; world *= 2)
        for (uint32_t il = 1; il <= 16; il *= 2) {
            uint32_t owners[5 * 16 * 8];
            memset(owners, 0, sizeof(owners));
            for (uint32_t rank = 0; rank < world; rank++) {
                bt_slot_params p = { 16, world, rank, il };
                int64_t out[5 * 16 * 8];
                uint32_t n = ri.num_blocks * 16 * world;
                T_OK(bt_slots_row(seg, &p, 0, 0, n, out));
                uint8_t seen[5][16];
                memset(seen, 0, sizeof(seen));
                for (uint32_t pos = 0; pos < n; pos++) {
                    if (out[pos] < 0)
                        continue;
                    owners[pos]++;
                    uint32_t blk = pos / (16 * world);
                    int64_t off = out[pos] - (int64_t)ids[blk] * 16;
                    T_ASSERTF(off >= 0 && off < 16, "world %u il %u rank %u pos %u: slot %" PRId64
                              " outside block %d", world, il, rank, pos, out[pos], ids[blk]);
                    T_ASSERTF(!seen[blk][off], "world %u il %u rank %u: slot %" PRId64 " twice",
                              world, il, rank, out[pos]);
                    seen[blk][off] = 1;
                }
                for (uint32_t blk = 0; blk < ri.num_blocks; blk++)
                    for (int off = 0; off < 16; off++)
                        T_ASSERTF(seen[blk][off], "world %u il %u rank %u: block %u slot %d unused",
                                  world, il, rank, blk, off);
            }
            for (uint32_t pos = 0; pos < ri.num_blocks * 16 * world; pos++)
                T_ASSERTF(owners[pos] == 1, "world %u il %u: pos %u on %u ranks", world, il, pos,
                          owners[pos]);
        }
    bt_client_close(cl);
    bt_seg_close(seg);
}

static void test_errors(void)
{
    bt_client *cl;
    bt_seg *seg = setup(16, 4, &cl);
    bt_slot_params p = { 0 };
    int64_t out[64], pos[4] = { 0, 1, 2, 3 };
    for (int i = 0; i < 64; i++)
        out[i] = SENTINEL;

    /* bad rows: BT_ERANGE, and nothing written */
    T_RC(bt_slots_row(seg, &p, ROWS, 0, 4, out), BT_ERANGE);
    T_RC(bt_slots_row(seg, &p, UINT32_MAX, 0, 4, out), BT_ERANGE);
    const int32_t badrows[][4] = { { 0, 1, 2, ROWS }, { -1, 0, 0, 0 }, { 0, INT32_MAX, 0, 0 },
                                   { 0, 0, 0, INT32_MIN } };
    int32_t qsl[5] = { 0, 1, 2, 3, 4 };
    for (int k = 0; k < 4; k++)
        T_RC(bt_slots_qsl(seg, &p, badrows[k], qsl, 4, pos, out, 8), BT_ERANGE);
    /* rows == NULL means row i: request ROWS has no row */
    static int32_t qbig[ROWS + 2];
    static int64_t pbig[ROWS + 1];
    for (int i = 0; i <= ROWS + 1; i++)
        qbig[i] = i;
    T_RC(bt_slots_qsl(seg, &p, NULL, qbig, ROWS + 1, pbig, out, 16), BT_ERANGE);
    for (int i = 0; i < 64; i++)
        T_EQ(out[i], SENTINEL);
    /* form 2 may have written the entries before the bad row (bt.h) */
    for (int k = 0; k < 4; k++)
        T_RC(bt_slots_req(seg, &p, badrows[k], pos, 4, out), BT_ERANGE);
    for (int i = 4; i < 64; i++)
        T_EQ(out[i], SENTINEL);

    /* query_start_loc: out too short, or going backwards */
    T_RC(bt_slots_qsl(seg, &p, NULL, qsl, 4, pos, out, 3), BT_EINVAL);
    int32_t back[3] = { 0, 3, 2 };
    T_RC(bt_slots_qsl(seg, &p, NULL, back, 2, pos, out, 8), BT_EINVAL);
    /* no requests: all padding */
    T_OK(bt_slots_qsl(seg, &p, NULL, qsl, 0, pos, out, 8));
    for (int i = 0; i < 8; i++)
        T_EQ(out[i], -1);
    T_EQ(out[8], SENTINEL);

    /* impossible parameters */
    bt_slot_params bad1 = { .cp_world = 2, .cp_rank = 2 };
    bt_slot_params bad2 = { .cp_world = 0, .cp_rank = 1 };
    T_ERR(bt_slots_row(seg, &bad1, 0, 0, 4, out));
    T_ERR(bt_slots_row(seg, &bad2, 0, 0, 4, out));
    T_ERR(bt_slots_req(seg, &bad1, badrows[0], pos, 3, out));

    /* null buffers */
    T_RC(bt_slots_row(seg, &p, 0, 0, 4, NULL), BT_EINVAL);
    T_RC(bt_slots_req(seg, &p, NULL, pos, 4, out), BT_EINVAL);
    T_RC(bt_slots_req(seg, &p, badrows[0], NULL, 4, out), BT_EINVAL);
    T_RC(bt_slots_qsl(seg, &p, NULL, NULL, 1, pos, out, 8), BT_EINVAL);
    T_RC(bt_slots_row(NULL, &p, 0, 0, 4, out), BT_EINVAL);
    bt_client_close(cl);
    bt_seg_close(seg);
}

/* Form 1 near the end of int64: positions start .. start + n - 1 would pass
 * INT64_MAX. The call must refuse or give -1; computing start + i in int64 is
 * undefined behaviour (UBSan in `make asan` reports it). */
static void test_form1_overflow(void)
{
    bt_client *cl;
    bt_seg *seg = setup(16, 16, &cl);
    bt_slot_params p = { 0 };
    int64_t out[8];
    int rc = bt_slots_row(seg, &p, 0, INT64_MAX - 3, 8, out);
    if (rc == 0)
        for (int i = 0; i < 8; i++)
            T_EQ(out[i], -1);
    bt_client_close(cl);
    bt_seg_close(seg);
}


/* ---- the dense fast paths (decode, runs, short requests) ----------------
 * A wider segment (DR rows of DW entries) whose rows hold random counts,
 * empty rows and never-claimed rows included; every form is compared with
 * ref_dense (the rows read here) for block sizes 1..16 (shift paths and the
 * bs < 4 runs), lengths around the four-lane steps, runs that stay in the
 * row, run past it, start at a block's middle, or break in the middle. */
#define DR 96
#define DW 40
static int32_t dids[DR][DW];
static uint32_t dnb[DR];

static bt_seg *dense_setup(uint64_t *rnd, bt_client **clp)
{
    bt_config c = t_config_small();
    c.num_rows = DR;
    c.row_width = DW;
    c.blocks_per_pool = DR * DW;
    bt_seg *seg = t_seg_embedded(&c);
    bt_client *cl = t_client(seg);
    for (uint32_t r = 0; r < DR; r++) {
        uint32_t got, k = t_below(rnd, 8);
        if (k == 0)
            continue;                   /* never claimed: count 0 */
        T_OK(bt_row_claim(cl, r, r, k == 1 ? BT_ROW_RAW : BT_ROW_MANAGED, &got));
        uint32_t n = k == 2 ? 0 : k == 3 ? DW : t_below(rnd, DW + 1);
        if (k == 1) {                   /* RAW: any ids, 0 and INT32_MAX too */
            int32_t v[DW];
            for (uint32_t i = 0; i < n; i++)
                v[i] = i % 7 == 3 ? 0 : i % 11 == 5 ? INT32_MAX : (int32_t)t_below(rnd, 1u << 30);
            if (n)
                T_OK(bt_row_append(cl, r, v, n));
        } else if (n) {
            T_OK(bt_row_alloc_append(cl, r, 0, n, NULL));
        }
    }
    for (uint32_t r = 0; r < DR; r++)
        dnb[r] = t_row(seg, r, dids[r], DW).num_blocks;
    *clp = cl;
    return seg;
}

static int64_t ref_dense(uint32_t bs, uint32_t row, int64_t pos)
{
    if (pos < 0 || pos / bs >= dnb[row])
        return -1;
    return (int64_t)((uint64_t)(int64_t)dids[row][pos / bs] * bs + (uint64_t)(pos % bs));
}

/* Positions for one request of n tokens in `row`: mostly a run. */
static void dense_positions(uint64_t *rnd, uint32_t bs, uint32_t row, int64_t *pos, uint32_t n)
{
    uint32_t kind = t_below(rnd, 8);
    int64_t end = (int64_t)dnb[row] * bs;
    int64_t start = kind == 0 ? end - (int64_t)t_below(rnd, n + 2)     /* runs past the row */
                  : kind == 1 ? -(int64_t)t_below(rnd, 3)              /* starts before 0 */
                  : (int64_t)t_below(rnd, (uint32_t)(end > 0 ? end : 1) + 1);
    for (uint32_t i = 0; i < n; i++)
        pos[i] = start + i;
    if (kind == 2 && n)                 /* a run that breaks somewhere */
        pos[t_below(rnd, n)] += 1 + t_below(rnd, 3);
    if (kind == 3)                      /* no run at all */
        for (uint32_t i = 0; i < n; i++)
            pos[i] = (int64_t)t_below(rnd, (uint32_t)end + 40) - 8;
    if (kind == 4 && n)
        pos[t_below(rnd, n)] = t_below(rnd, 2) ? INT64_MAX : INT64_MIN;
}

static void test_dense_paths(void)
{
    enum { MAXT = 4096 };
    static int32_t qsl[DR + 1], rows[DR], trows[MAXT];
    static int64_t pos[MAXT], out[MAXT + 8];
    uint64_t rnd = t_substream(77);
    bt_client *cl;
    bt_seg *seg = dense_setup(&rnd, &cl);
    uint64_t checked = 0;
    for (uint32_t bs = 1; bs <= 16; bs *= 2) {
        bt_slot_params prm = { .block_size = bs };
        for (int it = 0; it < 300; it++) {
            /* form 3: decode (all ones) or requests of 0..70 tokens */
            int decode = it % 3 == 0, with_rows = it % 2;
            uint32_t nreq = t_below(&rnd, DR + 1);
            qsl[0] = 0;
            for (uint32_t i = 0; i < nreq; i++) {
                rows[i] = with_rows ? (int32_t)t_below(&rnd, DR) : (int32_t)i;
                uint32_t len = decode ? 1 : t_below(&rnd, 4) == 0 ? t_below(&rnd, 3)
                                                              : t_below(&rnd, 71);
                if ((uint32_t)qsl[i] + len > MAXT)
                    len = 0;
                qsl[i + 1] = qsl[i] + (int32_t)len;
                dense_positions(&rnd, bs, (uint32_t)rows[i], pos + qsl[i], len);
                for (uint32_t t = 0; t < len; t++)
                    trows[qsl[i] + t] = rows[i];
            }
            uint32_t total = (uint32_t)qsl[nreq], out_len = total + t_below(&rnd, 6);
            for (uint32_t t = 0; t < out_len + 8; t++)
                out[t] = SENTINEL;
            T_OK(bt_slots_qsl(seg, &prm, with_rows ? rows : NULL, qsl, nreq, pos, out, out_len));
            for (uint32_t t = 0; t < total; t++)
                if (out[t] != ref_dense(bs, (uint32_t)trows[t], pos[t]))
                    T_FAIL("qsl bs %u it %d token %u (row %d pos %" PRId64 "): %" PRId64
                           ", reference %" PRId64, bs, it, t, trows[t], pos[t], out[t],
                           ref_dense(bs, (uint32_t)trows[t], pos[t]));
            for (uint32_t t = total; t < out_len; t++)
                T_EQ(out[t], -1);
            T_EQ(out[out_len], SENTINEL);
            /* form 2 over the same tokens */
            for (uint32_t t = 0; t < total + 8; t++)
                out[t] = SENTINEL;
            T_OK(bt_slots_req(seg, &prm, trows, pos, total, out));
            for (uint32_t t = 0; t < total; t++)
                T_EQ(out[t], ref_dense(bs, (uint32_t)trows[t], pos[t]));
            T_EQ(out[total], SENTINEL);
            /* form 1: a row from a start */
            uint32_t row = t_below(&rnd, DR), n = t_below(&rnd, 200);
            int64_t start = (int64_t)t_below(&rnd, DW * bs + 20) - 10;
            out[n] = SENTINEL;
            T_OK(bt_slots_row(seg, &prm, row, start, n, out));
            for (uint32_t i = 0; i < n; i++)
                T_EQ(out[i], ref_dense(bs, row, start + i));
            T_EQ(out[n], SENTINEL);
            checked += 2 * total + n;
        }
    }
    printf("%" PRIu64 " tokens agree with the reference on the dense paths\n", checked);
    bt_client_close(cl);
    bt_seg_close(seg);
}

/* The same without the AVX2 paths: what a CPU without AVX2 runs. */
extern int bt_slots_simd;               /* slots.c, bt_internal.h */
static void test_dense_paths_portable(void)
{
    bt_slots_simd = 0;
    test_dense_paths();
}

/* Bad indices on the dense paths: a row past the rows or negative, in any
 * lane of a decode batch or any request, and query_start_loc going back or
 * past out_len: refused before anything is written. */
static void test_dense_bad_indices(void)
{
    uint64_t rnd = t_substream(78);
    bt_client *cl;
    bt_seg *seg = dense_setup(&rnd, &cl);
    bt_slot_params p = { 0 };
    static int32_t qsl[DR + 2], rows[DR + 1];
    static int64_t pos[DR + 1], out[DR + 16];
    for (uint32_t n = 1; n <= 13; n++)
        for (uint32_t bad = 0; bad < n; bad++)
            for (int k = 0; k < 3; k++) {
                for (uint32_t i = 0; i <= n; i++)
                    qsl[i] = (int32_t)i;
                for (uint32_t i = 0; i < n; i++) {
                    rows[i] = (int32_t)t_below(&rnd, DR);
                    pos[i] = 0;
                }
                rows[bad] = k == 0 ? DR : k == 1 ? -1 : INT32_MIN;
                for (uint32_t i = 0; i < n + 16; i++)
                    out[i] = SENTINEL;
                T_RC(bt_slots_qsl(seg, &p, rows, qsl, n, pos, out, n + 4), BT_ERANGE);
                qsl[n] = (int32_t)n + 1;                        /* also a longer last request */
                T_RC(bt_slots_qsl(seg, &p, rows, qsl, n, pos, out, n + 4), BT_ERANGE);
                for (uint32_t i = 0; i < n + 16; i++)
                    T_EQ(out[i], SENTINEL);
                T_RC(bt_slots_req(seg, &p, rows, pos, n, out), BT_ERANGE);
                for (uint32_t i = bad; i < n + 16; i++)  /* entries before the bad row may be written */
                    T_EQ(out[i], SENTINEL);
            }
    /* rows NULL: more requests than rows */
    for (uint32_t i = 0; i <= DR + 1; i++)
        qsl[i] = (int32_t)i;
    T_RC(bt_slots_qsl(seg, &p, NULL, qsl, DR + 1, pos, out, DR + 1), BT_ERANGE);
    /* query_start_loc: back, past out_len, negative end, not from 0 */
    int32_t q1[5] = { 0, 1, 0, 2, 3 }, q2[5] = { 0, 1, 2, 3, 9 }, q3[3] = { 0, -1, -1 },
            q4[3] = { 1, 2, 3 };
    for (uint32_t i = 0; i < 16; i++)
        out[i] = SENTINEL;
    T_RC(bt_slots_qsl(seg, &p, NULL, q1, 4, pos, out, 8), BT_EINVAL);
    T_RC(bt_slots_qsl(seg, &p, NULL, q2, 4, pos, out, 8), BT_EINVAL);
    T_RC(bt_slots_qsl(seg, &p, NULL, q3, 2, pos, out, 8), BT_EINVAL);
    T_RC(bt_slots_qsl(seg, &p, NULL, q4, 2, pos, out, 8), BT_EINVAL);
    for (uint32_t i = 0; i < 16; i++)
        T_EQ(out[i], SENTINEL);
    bt_client_close(cl);
    bt_seg_close(seg);
}

/* Scribbled counts on the dense paths: a negative num_blocks reads as 0, one
 * past the width as the width; slots are those of the clamped row and no
 * read leaves it (ASan in `make asan`). */
static void test_dense_scribbled_counts(void)
{
    uint64_t rnd = t_substream(79);
    bt_client *cl;
    bt_seg *seg = dense_setup(&rnd, &cl);
    int32_t *nbs = (int32_t *)t_nblocks(seg);
    const int32_t vals[] = { -1, INT32_MIN, DW + 1, INT32_MAX };
    static int32_t qsl[DR + 1];
    static int64_t pos[DR], out[DR];
    bt_slot_params p = { 0 };
    for (size_t v = 0; v < sizeof(vals) / sizeof(vals[0]); v++) {
        uint32_t row = t_below(&rnd, DR);
        int32_t keep = nbs[row];
        nbs[row] = vals[v];
        uint32_t nb = vals[v] < 0 ? 0 : DW;
        for (uint32_t i = 0; i <= DR; i++)
            qsl[i] = (int32_t)i;
        for (int64_t x = -2; x < (int64_t)DW * 16 + 20; x += 7) {
            for (uint32_t i = 0; i < DR; i++)
                pos[i] = x;
            T_OK(bt_slots_qsl(seg, &p, NULL, qsl, DR, pos, out, DR));
            int64_t want = x < 0 || x / 16 >= nb ? -1 : (int64_t)dids[row][x / 16] * 16 + x % 16;
            if (nb == DW && x >= 0 && x / 16 < DW) {    /* entries past the old count: the table's */
                const int32_t *tab = t_table(seg);
                want = (int64_t)tab[(uint64_t)row * DW + (uint64_t)(x / 16)] * 16 + x % 16;
            }
            T_EQ(out[row], want);
            T_OK(bt_slots_row(seg, &p, row, x, 40, out));
        }
        nbs[row] = keep;
    }
    bt_client_close(cl);
    bt_seg_close(seg);
}

/* A row that changes under a reader: one thread appends to and truncates a
 * row while another maps its positions by every path. Rows are read without
 * the seqlock (bt.h), so a slot may belong to the row before or after a
 * change (or to the null block 0: an entry zeroed by a truncate the count
 * did not show yet), but each one is -1 or a block of the pool at the right
 * offset, and no read strays (ASan/TSan builds watch the rest). */
struct churn { bt_seg *seg; bt_client *cl; uint32_t row; int stop; int32_t lo, hi; };

static void *churn_main(void *arg)
{
    struct churn *c = arg;
    for (uint64_t i = 0; !__atomic_load_n(&c->stop, __ATOMIC_RELAXED) && i < 2000000; i++) {
        uint32_t n = 1 + (uint32_t)(i % DW);
        if (bt_row_alloc_append(c->cl, c->row, 0, n, NULL) == 0)
            bt_row_truncate(c->cl, c->row, (uint32_t)(i % 3));
        bt_row_truncate(c->cl, c->row, 0);
    }
    return NULL;
}

static void test_dense_row_changing(void)
{
    bt_config cfg = t_config_small();
    cfg.num_rows = 8;
    cfg.row_width = DW;
    cfg.blocks_per_pool = 4 * DW;
    bt_seg *seg = t_seg_embedded(&cfg);
    bt_client *w = t_client(seg);
    uint32_t got;
    T_OK(bt_row_claim(w, 3, 3, BT_ROW_MANAGED, &got));
    struct churn c = { seg, w, 3, 0, 0, (int32_t)(4 * DW) };
    pthread_t th;
    T_ASSERT(pthread_create(&th, NULL, churn_main, &c) == 0);
    static int32_t qsl[65], rows[64];
    static int64_t pos[DW * 16], out[DW * 16];
    bt_slot_params p = { 0 };
    uint64_t nonneg = 0, t_end = t_now_ns() + (uint64_t)3e8;
    for (uint64_t it = 0; t_now_ns() < t_end; it++) {
        uint32_t n = it % 2 ? 64 : DW * 16;
        if (it % 2) {                   /* decode: 64 tokens of row 3 */
            for (uint32_t i = 0; i <= 64; i++)
                qsl[i] = (int32_t)i;
            for (uint32_t i = 0; i < 64; i++) {
                rows[i] = 3;
                pos[i] = (int64_t)(i * 9 % (DW * 16));
            }
            T_OK(bt_slots_qsl(seg, &p, rows, qsl, 64, pos, out, 64));
        } else {                        /* prefill: the whole row as one run */
            qsl[0] = 0;
            qsl[1] = (int32_t)n;
            rows[0] = 3;
            for (uint32_t i = 0; i < n; i++)
                pos[i] = i;
            T_OK(bt_slots_qsl(seg, &p, rows, qsl, 1, pos, out, n));
        }
        for (uint32_t i = 0; i < n; i++) {
            if (out[i] == -1)
                continue;
            nonneg++;
            int64_t id = out[i] / 16;
            T_ASSERTF(out[i] % 16 == pos[i] % 16 && id >= c.lo && id < c.hi,
                      "pos %" PRId64 ": slot %" PRId64 " is no block of the pool at its offset",
                      pos[i], out[i]);
        }
    }
    __atomic_store_n(&c.stop, 1, __ATOMIC_RELAXED);
    pthread_join(th, NULL);
    printf("%" PRIu64 " slots of a changing row were blocks of the pool\n", nonneg);
    bt_client_close(w);
    bt_seg_close(seg);
}

static void test_kernel_views(void)
{
    test_kernel_view(16, 4);
    test_kernel_view(16, 2);
    test_kernel_view(12, 3);
}
static void test_reference_b16_k4(void) { test_against_reference(16, 4); }
static void test_reference_b12_k4(void) { test_against_reference(12, 4); }   /* not a power of two */

int main(int argc, char **argv)
{
    t_init(argc, argv);
    T_RUN(test_errors);
    T_RUN(test_kernel_views);
    T_RUN(test_cp_partition);
    T_RUN(test_reference_b16_k4);
    T_RUN(test_reference_b12_k4);
    T_RUN(test_form1_overflow);
    T_RUN(test_dense_paths);
    T_RUN(test_dense_paths_portable);
    T_RUN(test_dense_bad_indices);
    T_RUN(test_dense_scribbled_counts);
    T_RUN(test_dense_row_changing);
    return t_done();
}
