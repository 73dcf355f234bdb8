/*
 * test_mt_stress.c -- many threads, one segment (what `make tsan` runs).
 *
 *   test_clients_threads   N threads, a client each, the random workload of
 *                          bt_stress.h with ownership stamps; meanwhile a
 *                          checker thread freezes the segment for exact checks
 *                          and repairs, which must find nothing to fix.
 *   test_raw_pool_threads  N threads on bt_pool_pop / bt_pool_push alone, small
 *                          pools that run dry: no block handed out twice.
 *   test_seqlock_readers   writers rewrite RAW rows with self-describing
 *                          contents (every entry v, num_blocks v % W + 1);
 *                          readers on other threads must never see a mix.
 *   test_client_churn      threads open and close clients and claim rows by
 *                          hint at once: ids and rows are never given twice.
 *
 * At the end every block is free or held, free + held == total - 1, and the
 * library's counts equal what the workers hold.
 *
 * BT_STRESS_THREADS (default 4), BT_STRESS_SECONDS (default 3 per phase).
 */
#include <pthread.h>
#include "bt_stress.h"

static uint32_t nthreads(void)
{
    const char *s = getenv("BT_STRESS_THREADS");
    uint32_t n = s && *s ? (uint32_t)strtoul(s, NULL, 0) : 4;
    return n < 2 ? 2 : n > ST_MAXW - 1 ? ST_MAXW - 1 : n;
}

static void *worker_main(void *p)
{
    st_run(p);
    return NULL;
}

struct checker { bt_seg *seg; struct st_shared *sh; uint64_t frozen, repairs, busy; };

/* Exact checks under load: with every client outside its calls, the counts
 * must match the rows and hands exactly. */
static void *checker_main(void *p)
{
    struct checker *c = p;
    while (!__atomic_load_n(&c->sh->stop, __ATOMIC_ACQUIRE)) {
        struct timespec ts = { 0, 20 * 1000 * 1000 };
        nanosleep(&ts, NULL);
        bt_check_report rep;
        int flags = (c->frozen + c->repairs) % 4 == 3 ? BT_CHECK_REPAIR : BT_CHECK_FROZEN;
        int rc = bt_seg_check(c->seg, flags, 2000, &rep);
        if (rc == BT_EBUSY) {
            c->busy++;
            continue;
        }
        if (rc)
            T_FAIL("checker: bt_seg_check(%d) returned %s", flags, bt_errname(rc));
        if (rep.leaked || rep.double_free || rep.refcnt_fixed || rep.rows_fixed ||
            rep.bad_entries || rep.clients_reaped)
            T_FAIL("checker: %s under load found leaked %" PRIu64 " double_free %" PRIu64
                   " refcnt_fixed %" PRIu64 " rows_fixed %" PRIu64 " bad_entries %" PRIu64
                   " reaped %" PRIu64, flags == BT_CHECK_REPAIR ? "repair" : "frozen check",
                   rep.leaked, rep.double_free, rep.refcnt_fixed, rep.rows_fixed,
                   rep.bad_entries, rep.clients_reaped);
        if (flags == BT_CHECK_REPAIR)
            c->repairs++;
        else
            c->frozen++;
    }
    return NULL;
}

static void clients_threads(int magazines)
{
    uint32_t n = nthreads();
    bt_seg *seg = t_seg_new(magazines ? st_config_mag(n) : st_config(n));
    struct st_shared *sh = st_shared_new(t_info(seg).total_blocks, n);
    struct st_worker *w = calloc(n, sizeof(*w));
    pthread_t *tid = calloc(n, sizeof(*tid)), ctid;
    T_ASSERT(w && tid);
    double secs = st_seconds(3.0);
    uint64_t t0 = t_now_ns();

    for (uint32_t i = 0; i < n; i++) {
        w[i] = (struct st_worker){ .seg = seg, .cl = t_client(seg), .sh = sh, .w = i,
                                   .rnd = t_substream(i), .max_ops = 50u * 1000 * 1000,
                                   .deadline_ns = t0 + (uint64_t)(secs * 1e9) };
        w[i].me = sh->client_id[i] = bt_client_id(w[i].cl);
    }
    struct checker chk = { .seg = seg, .sh = sh };
    T_ASSERT(pthread_create(&ctid, NULL, checker_main, &chk) == 0);
    for (uint32_t i = 0; i < n; i++)
        T_ASSERT(pthread_create(&tid[i], NULL, worker_main, &w[i]) == 0);
    for (uint32_t i = 0; i < n; i++)
        T_ASSERT(pthread_join(tid[i], NULL) == 0);
    __atomic_store_n(&sh->stop, 1u, __ATOMIC_RELEASE);
    T_ASSERT(pthread_join(ctid, NULL) == 0);
    st_print(sh, "clients", (double)(t_now_ns() - t0) / 1e9);
    printf("checker: %" PRIu64 " frozen checks, %" PRIu64 " repairs, %" PRIu64 " busy\n",
           chk.frozen, chk.repairs, chk.busy);

    st_final_check(seg, sh);
    for (uint32_t i = 0; i < n; i++) {
        st_forget(sh, i);
        bt_client_close(w[i].cl);
    }
    bt_check_report rep = t_check_quiet(seg);
    T_EQ(rep.blocks_free, t_info(seg).total_blocks - 1);
    T_EQ(rep.blocks_held, 0);
    free(w);
    free(tid);
    bt_seg_close(seg);
}

static void test_clients_threads(void) { clients_threads(0); }
/* with magazines, the checker's repairs emptying them under the workers */
static void test_clients_threads_magazines(void) { clients_threads(1); }

static void *raw_main(void *p)
{
    st_raw_run(p);
    return NULL;
}

static void test_raw_pool_threads(void)
{
    uint32_t n = nthreads();
    bt_config c = t_config(2, 64, 8, 8);  /* 127 blocks: 4 threads x 4 x 16 run it dry */
    bt_seg *seg = t_seg_embedded(&c);
    uint64_t total = t_info(seg).total_blocks;
    uint32_t *stamp = calloc(total, 4);
    struct st_raw *r = calloc(n, sizeof(*r));
    pthread_t *tid = calloc(n, sizeof(*tid));
    T_ASSERT(stamp && r && tid);
    uint64_t t0 = t_now_ns(), deadline = t0 + (uint64_t)(st_seconds(3.0) / 2 * 1e9);
    for (uint32_t i = 0; i < n; i++) {
        r[i] = (struct st_raw){ .seg = seg, .stamp = stamp, .me = i + 1, .pools = 2, .bpp = 64,
                                .rnd = t_substream(100 + i), .deadline_ns = deadline };
        T_ASSERT(pthread_create(&tid[i], NULL, raw_main, &r[i]) == 0);
    }
    uint64_t pops = 0, dry = 0;
    for (uint32_t i = 0; i < n; i++) {
        T_ASSERT(pthread_join(tid[i], NULL) == 0);
        T_EQ(r[i].pops, r[i].pushes);
        pops += r[i].pops;
        dry += r[i].dry;
    }
    printf("raw pool: %u threads, %" PRIu64 " blocks popped and pushed, %" PRIu64
           " pops found the pool dry, %.2f s\n", n, pops, dry, (double)(t_now_ns() - t0) / 1e9);
    st_raw_check_end(seg, stamp, 63, 64);
    T_ASSERT(pops > 0);
    free(stamp);
    free(r);
    free(tid);
    bt_seg_close(seg);
}

struct sl_arg { bt_seg *seg; bt_client *cl; uint32_t row; uint64_t n, rnd; uint32_t *stop; };

static void *sl_writer(void *p)
{
    struct sl_arg *a = p;
    int32_t ids[8];
    for (uint32_t v = 1; !__atomic_load_n(a->stop, __ATOMIC_ACQUIRE); v++) {
        uint32_t n = v % 8 + 1;
        for (uint32_t i = 0; i < 8; i++)
            ids[i] = (int32_t)v;
        switch (t_below(&a->rnd, 3)) {
        case 0:
            T_OK(bt_row_set(a->cl, a->row, ids, n));
            break;
        case 1:                         /* truncate then append: two writes */
            T_OK(bt_row_truncate(a->cl, a->row, 0));
            T_OK(bt_row_append(a->cl, a->row, ids, n));
            break;
        default: {                      /* via a second row and a swap */
            uint32_t other = a->row + 1;
            T_OK(bt_row_set(a->cl, other, ids, n));
            T_OK(bt_row_swap(a->cl, a->row, other));
        }
        }
        a->n++;
    }
    return NULL;
}

static void *sl_reader(void *p)
{
    struct sl_arg *a = p;
    int32_t ids[8];
    while (!__atomic_load_n(a->stop, __ATOMIC_ACQUIRE)) {
        uint32_t row = 2 * t_below(&a->rnd, 2);     /* rows 0 and 2 are written */
        bt_row_info ri;
        int rc = bt_row_read(a->seg, row, ids, 8, &ri);
        if (rc)
            T_FAIL("reader: bt_row_read(%u) returned %s", row, bt_errname(rc));
        if (ri.num_blocks == 0)
            continue;                   /* between a truncate and an append */
        int32_t v = ids[0];
        for (uint32_t i = 0; i < ri.num_blocks; i++)
            if (ids[i] != v)
                T_FAIL("torn read of row %u: entry %u is %d, entry 0 is %d (%u blocks)", row, i,
                       ids[i], v, ri.num_blocks);
        if (v <= 0 || ri.num_blocks != (uint32_t)v % 8 + 1)
            T_FAIL("torn read of row %u: %u blocks of %d", row, ri.num_blocks, v);
        a->n++;
    }
    return NULL;
}

static void test_seqlock_readers(void)
{
    bt_seg *seg = t_seg_new(t_config(1, 64, 4, 8));
    uint32_t stop = 0, r;
    struct sl_arg w[2], rd[2];
    pthread_t tw[2], tr[2];
    for (int i = 0; i < 2; i++) {
        bt_client *cl = t_client(seg);
        T_OK(bt_row_claim(cl, 1, 2 * i, BT_ROW_RAW, &r));
        T_OK(bt_row_claim(cl, 2, 2 * i + 1, BT_ROW_RAW, &r));
        w[i] = (struct sl_arg){ .seg = seg, .cl = cl, .row = 2 * (uint32_t)i, .stop = &stop,
                                .rnd = t_substream(300 + i) };
        rd[i] = (struct sl_arg){ .seg = seg, .stop = &stop, .rnd = t_substream(310 + i) };
    }
    for (int i = 0; i < 2; i++) {
        T_ASSERT(pthread_create(&tw[i], NULL, sl_writer, &w[i]) == 0);
        T_ASSERT(pthread_create(&tr[i], NULL, sl_reader, &rd[i]) == 0);
    }
    t_sleep(st_seconds(3.0) / 3);
    __atomic_store_n(&stop, 1u, __ATOMIC_RELEASE);
    for (int i = 0; i < 2; i++) {
        T_ASSERT(pthread_join(tw[i], NULL) == 0);
        T_ASSERT(pthread_join(tr[i], NULL) == 0);
    }
    printf("seqlock: %" PRIu64 " writes, %" PRIu64 " non-empty reads, none torn\n",
           w[0].n + w[1].n, rd[0].n + rd[1].n);
    T_ASSERT(rd[0].n + rd[1].n > 0);
    bt_client_close(w[0].cl);
    bt_client_close(w[1].cl);
    T_END(seg);
}

struct churn { bt_seg *seg; uint32_t *slot_owner, *row_owner, me, *stop; uint64_t rnd, opens, claims; };

static void *churn_main(void *p)
{
    struct churn *a = p;
    while (!__atomic_load_n(a->stop, __ATOMIC_ACQUIRE)) {
        bt_client *cl;
        int rc = bt_client_open(a->seg, &cl);
        if (rc == BT_ENOCLIENTS)
            continue;
        if (rc)
            T_FAIL("churn %u: bt_client_open returned %s", a->me, bt_errname(rc));
        uint32_t id = bt_client_id(cl), zero = 0;
        if (!__atomic_compare_exchange_n(&a->slot_owner[id], &zero, a->me, 0, __ATOMIC_ACQ_REL,
                                         __ATOMIC_ACQUIRE))
            T_FAIL("client id %u given to thread %u while thread %u has it", id, a->me, zero);
        a->opens++;
        for (int k = 0; k < 4; k++) {
            uint32_t row, hint = t_below(&a->rnd, 6);
            rc = bt_row_claim(cl, a->me, t_below(&a->rnd, 2) ? (int32_t)hint : -1, BT_ROW_MANAGED,
                              &row);
            if (rc == BT_EROWSTATE || rc == BT_ENOROWS)
                continue;
            if (rc)
                T_FAIL("churn %u: bt_row_claim returned %s", a->me, bt_errname(rc));
            zero = 0;
            if (!__atomic_compare_exchange_n(&a->row_owner[row], &zero, a->me, 0,
                                             __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
                T_FAIL("row %u claimed by thread %u while thread %u has it", row, a->me, zero);
            a->claims++;
            T_OK(bt_row_alloc_append(cl, row, 0, 1, NULL));
            uint32_t me = a->me;
            if (t_below(&a->rnd, 2)) {
                T_ASSERT(__atomic_compare_exchange_n(&a->row_owner[row], &me, 0u, 0,
                                                     __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE));
                T_OK(bt_row_release(cl, row));
            }
        }
        /* closing releases the rows still claimed: unmark them first */
        for (uint32_t r = 0; r < 6; r++) {
            uint32_t me = a->me;
            __atomic_compare_exchange_n(&a->row_owner[r], &me, 0u, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE);
        }
        uint32_t me = a->me;
        T_ASSERT(__atomic_compare_exchange_n(&a->slot_owner[id], &me, 0u, 0, __ATOMIC_ACQ_REL,
                                             __ATOMIC_ACQUIRE));
        bt_client_close(cl);
    }
    return NULL;
}

static void test_client_churn(void)
{
    uint32_t n = nthreads();
    bt_config c = t_config(1, 64, 6, 8);
    c.max_clients = n > 2 ? n - 1 : 2;  /* fewer slots than threads: BT_ENOCLIENTS */
    bt_seg *seg = t_seg_embedded(&c);
    uint32_t slot_owner[ST_MAXW + 1] = { 0 }, row_owner[6] = { 0 }, stop = 0;
    struct churn a[ST_MAXW];
    pthread_t tid[ST_MAXW];
    for (uint32_t i = 0; i < n; i++) {
        a[i] = (struct churn){ .seg = seg, .slot_owner = slot_owner, .row_owner = row_owner,
                               .me = i + 1, .stop = &stop, .rnd = t_substream(400 + i) };
        T_ASSERT(pthread_create(&tid[i], NULL, churn_main, &a[i]) == 0);
    }
    t_sleep(st_seconds(3.0) / 3);
    __atomic_store_n(&stop, 1u, __ATOMIC_RELEASE);
    uint64_t opens = 0, claims = 0;
    for (uint32_t i = 0; i < n; i++) {
        T_ASSERT(pthread_join(tid[i], NULL) == 0);
        opens += a[i].opens;
        claims += a[i].claims;
    }
    printf("churn: %u threads, %" PRIu64 " client opens, %" PRIu64 " row claims\n", n, opens,
           claims);
    for (uint32_t id = 1; id <= c.max_clients; id++) {
        bt_client_slot_info si;
        T_OK(bt_client_slot_get(seg, id, &si));
        T_EQ(si.state, BT_CLIENT_FREE);
    }
    bt_check_report rep = t_check_quiet(seg);
    T_EQ(rep.blocks_free, 63);
    bt_seg_close(seg);
}

int main(int argc, char **argv)
{
    t_init(argc, argv);
    T_RUN(test_clients_threads);
    T_RUN(test_clients_threads_magazines);
    T_RUN(test_raw_pool_threads);
    T_RUN(test_seqlock_readers);
    T_RUN(test_client_churn);
    return t_done();
}
