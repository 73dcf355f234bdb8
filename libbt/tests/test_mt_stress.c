/*
 * test_mt_stress.c -- many threads, one segment (what `make tsan` runs).
 *
 *   test_clients_threads   N threads, a client each, the random workload of
 *                          bt_stress.h with ownership stamps; meanwhile a
 *                          checker thread freezes the segment for exact checks
 *                          and repairs, which must find nothing to fix.
 *   test_raw_pool_threads  N threads on bt_pool_pop / bt_pool_push alone, small
 *                          pools that run dry: no block handed out twice.
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

static void test_clients_threads(void)
{
    uint32_t n = nthreads();
    bt_config c = st_config(n);
    bt_seg *seg = t_seg_embedded(&c);
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

static void *raw_main(void *p)
{
    st_raw_run(p);
    return NULL;
}

static void test_raw_pool_threads(void)
{
    uint32_t n = nthreads();
    bt_config c = t_config_small();
    c.num_pools = 2;
    c.blocks_per_pool = 64;              /* 127 blocks: 4 threads x 4 x 16 run it dry */
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
    for (uint64_t b = 0; b < total; b++)
        T_EQ(stamp[b], 0);
    T_EQ(t_free(seg, 0), 63);
    T_EQ(t_free(seg, 1), 64);
    bt_check_report rep = t_check_quiet(seg);
    T_EQ(rep.blocks_free, total - 1);
    T_ASSERT(pops > 0);
    free(stamp);
    free(r);
    free(tid);
    bt_seg_close(seg);
}

int main(int argc, char **argv)
{
    t_init(argc, argv);
    T_RUN(test_clients_threads);
    T_RUN(test_raw_pool_threads);
    return t_done();
}
