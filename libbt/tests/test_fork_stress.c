/*
 * test_fork_stress.c -- many processes, one named segment.
 *
 *   test_clients_processes  P children attach by name and run the random
 *                           workload of bt_stress.h, the stamps and counts
 *                           in a MAP_SHARED anonymous mapping. Half of them
 *                           exit without closing (dead clients, recovered by
 *                           the parent at the end); one more is SIGKILLed at
 *                           a random moment mid-run and recovered while the
 *                           others go on. The parent freezes the segment for
 *                           exact checks meanwhile.
 *   test_clients_processes_magazines  the same with clients' magazines on.
 *   test_raw_pool_processes P children x 2 threads on bt_pool_pop / push.
 *
 * BT_STRESS_PROCS (default 4), BT_STRESS_SECONDS (default 3 per phase).
 */
#include <pthread.h>
#include <signal.h>
#include "bt_stress.h"

static uint32_t nprocs(void)
{
    const char *s = getenv("BT_STRESS_PROCS");
    uint32_t n = s && *s ? (uint32_t)strtoul(s, NULL, 0) : 4;
    return n < 2 ? 2 : n > ST_MAXW - 2 ? ST_MAXW - 2 : n;
}

/* The parent's exact check while children run (BT_CHECK_FROZEN). */
static void frozen_check(bt_seg *seg, uint64_t *count)
{
#ifdef BT_CHECK_FROZEN
    bt_check_report rep;
    int rc = bt_seg_check(seg, BT_CHECK_FROZEN, 2000, &rep);
    if (rc == BT_EBUSY)
        return;
    if (rc)
        T_FAIL("bt_seg_check(BT_CHECK_FROZEN) returned %s", bt_errname(rc));
    if (rep.leaked || rep.double_free || rep.refcnt_fixed || rep.rows_fixed || rep.bad_entries)
        T_FAIL("frozen check under load: leaked %" PRIu64 " double_free %" PRIu64
               " refcnt_fixed %" PRIu64 " rows_fixed %" PRIu64 " bad_entries %" PRIu64,
               rep.leaked, rep.double_free, rep.refcnt_fixed, rep.rows_fixed, rep.bad_entries);
    (*count)++;
#else
    (void)seg;
    (void)count;
#endif
}

static pid_t spawn_worker(const char *name, struct st_shared *sh, uint32_t i, uint64_t deadline,
                          int close_at_end)
{
    pid_t pid = fork();
    T_ASSERT(pid >= 0);
    if (pid)
        return pid;
    t_timeout(60);
    bt_seg *seg;
    T_OK(bt_seg_attach(name, &seg));
    struct st_worker w = { .seg = seg, .cl = t_client(seg), .sh = sh, .w = i,
                           .rnd = t_substream(i), .max_ops = 50u * 1000 * 1000,
                           .deadline_ns = deadline };
    w.me = bt_client_id(w.cl);
    __atomic_store_n(&sh->client_id[i], w.me, __ATOMIC_RELEASE);
    st_run(&w);
    if (close_at_end) {
        st_forget(sh, i);
        bt_client_close(w.cl);
        bt_seg_close(seg);
    }
    _exit(0);                           /* the others die holding what they hold */
}

static void recover(bt_seg *seg, uint32_t id)
{
    bt_check_report rep;
    int rc;
    for (int tries = 0; (rc = bt_seg_recover_client(seg, id, 2000, &rep)) == BT_EBUSY && tries < 50;
         tries++) {
        struct timespec ts = { 0, 10 * 1000 * 1000 };
        nanosleep(&ts, NULL);
    }
    if (rc)
        T_FAIL("bt_seg_recover_client(%u) returned %s", id, bt_errname(rc));
    bt_client_slot_info si;
    T_OK(bt_client_slot_get(seg, id, &si));
    T_EQ(si.state, BT_CLIENT_FREE);
}

static void clients_processes(int magazines)
{
    t_need_shm();
    uint32_t n = nprocs();
    uint32_t victim = n;                /* worker index n: killed mid-run */
    bt_config c = magazines ? st_config_mag(n + 1) : st_config(n + 1);
    const char *name = t_name("fork");
    bt_seg *seg;
    T_OK(bt_seg_create(name, &c, BT_CREATE_EXCL, &seg));
    struct st_shared *sh = st_shared_new(t_info(seg).total_blocks, n + 1);
    double secs = st_seconds(3.0);
    uint64_t t0 = t_now_ns(), deadline = t0 + (uint64_t)(secs * 1e9);
    pid_t pids[ST_MAXW];
    uint64_t frozen = 0;

    for (uint32_t i = 0; i < n; i++)
        pids[i] = spawn_worker(name, sh, i, deadline, i % 2 == 0);
    pids[victim] = spawn_worker(name, sh, victim, deadline + 60ull * 1000000000ull, 0);

    /* kill the victim somewhere in the first half, checking meanwhile */
    uint64_t rnd = t_substream(999);
    uint64_t kill_at = t0 + (uint64_t)(secs * 1e9 * (0.1 + 0.4 * t_below(&rnd, 1000) / 1000.0));
    while (t_now_ns() < kill_at) {
        struct timespec ts = { 0, 30 * 1000 * 1000 };
        nanosleep(&ts, NULL);
        frozen_check(seg, &frozen);
    }
    while (!__atomic_load_n(&sh->client_id[victim], __ATOMIC_ACQUIRE))
        T_ASSERT(t_now_ns() < deadline + 10ull * 1000000000ull);
    T_ASSERT(kill(pids[victim], SIGKILL) == 0);
    int st;
    T_ASSERT(waitpid(pids[victim], &st, 0) == pids[victim]);
    T_ASSERTF(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL, "victim exited %d before the kill",
              WIFEXITED(st) ? WEXITSTATUS(st) : -1);
    uint64_t victim_ops = sh->ops[victim];
    /* its stamps go first: its blocks are still held, so nobody can get one
     * fresh before the recovery frees them */
    st_forget(sh, victim);
    recover(seg, sh->client_id[victim]);

    for (int alive = 1; alive;) {
        alive = 0;
        for (uint32_t i = 0; i < n; i++)
            if (pids[i] && waitpid(pids[i], &st, WNOHANG) == 0)
                alive = 1;
            else if (pids[i]) {
                if (!WIFEXITED(st) || WEXITSTATUS(st))
                    T_FAIL("worker %u (pid %d) %s %d", i, (int)pids[i],
                           WIFSIGNALED(st) ? "killed by signal" : "exited",
                           WIFSIGNALED(st) ? WTERMSIG(st) : WEXITSTATUS(st));
                pids[i] = 0;
            }
        if (alive) {
            struct timespec ts = { 0, 30 * 1000 * 1000 };
            nanosleep(&ts, NULL);
            frozen_check(seg, &frozen);
        }
    }
    st_print(sh, "processes", (double)(t_now_ns() - t0) / 1e9);
    printf("victim killed after %" PRIu64 " ops; %" PRIu64 " frozen checks by the parent\n",
           victim_ops, frozen);

    /* the dead (odd) workers still hold their blocks: exact counts */
    st_final_check(seg, sh);
    for (uint32_t i = 1; i < n; i += 2) {
        st_forget(sh, i);
        recover(seg, sh->client_id[i]);
    }
    bt_check_report rep = t_check_quiet(seg);
    T_EQ(rep.blocks_free, t_info(seg).total_blocks - 1);
    bt_seg_close(seg);
    T_OK(bt_seg_unlink(name));
}

static void test_clients_processes(void) { clients_processes(0); }
static void test_clients_processes_magazines(void) { clients_processes(1); }

struct raw_proc_arg { struct st_raw r; };
static void *raw_main(void *p)
{
    st_raw_run(p);
    return NULL;
}

static void test_raw_pool_processes(void)
{
    t_need_shm();
    uint32_t n = nprocs();
    bt_config c = t_config(2, 96, 8, 8);
    const char *name = t_name("raw");
    bt_seg *seg;
    T_OK(bt_seg_create(name, &c, BT_CREATE_EXCL, &seg));
    uint64_t total = t_info(seg).total_blocks;
    /* stamps, then per worker: pops, pushes */
    uint32_t *stamp = mmap(NULL, total * 4 + 4096, PROT_READ | PROT_WRITE,
                           MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    T_ASSERT(stamp != MAP_FAILED);
    uint64_t *pops = (uint64_t *)(stamp + total);
    uint64_t t0 = t_now_ns(), deadline = t0 + (uint64_t)(st_seconds(3.0) / 2 * 1e9);
    pid_t pids[ST_MAXW];
    for (uint32_t i = 0; i < n; i++) {
        pids[i] = fork();
        T_ASSERT(pids[i] >= 0);
        if (pids[i])
            continue;
        t_timeout(60);
        bt_seg *s;
        T_OK(bt_seg_attach(name, &s));
        struct st_raw r[2];
        pthread_t tid[2];
        for (int k = 0; k < 2; k++) {
            r[k] = (struct st_raw){ .seg = s, .stamp = stamp, .me = 2 * i + (uint32_t)k + 1,
                                    .pools = 2, .bpp = 96, .rnd = t_substream(200 + 2 * i + k),
                                    .deadline_ns = deadline };
            T_ASSERT(pthread_create(&tid[k], NULL, raw_main, &r[k]) == 0);
        }
        for (int k = 0; k < 2; k++) {
            T_ASSERT(pthread_join(tid[k], NULL) == 0);
            T_EQ(r[k].pops, r[k].pushes);
            __atomic_fetch_add(&pops[0], r[k].pops, __ATOMIC_RELAXED);
            __atomic_fetch_add(&pops[1], r[k].dry, __ATOMIC_RELAXED);
        }
        bt_seg_close(s);
        _exit(0);
    }
    for (uint32_t i = 0; i < n; i++)
        t_wait_ok(pids[i], "raw pool worker");
    printf("raw pool: %u processes x 2 threads, %" PRIu64 " blocks popped and pushed, %" PRIu64
           " pops found the pool dry, %.2f s\n", n, pops[0], pops[1],
           (double)(t_now_ns() - t0) / 1e9);
    st_raw_check_end(seg, stamp, 95, 96);
    T_ASSERT(pops[0] > 0);
    munmap(stamp, total * 4 + 4096);
    bt_seg_close(seg);
    T_OK(bt_seg_unlink(name));
}

int main(int argc, char **argv)
{
    t_init(argc, argv);
    T_RUN(test_clients_processes);
    T_RUN(test_clients_processes_magazines);
    T_RUN(test_raw_pool_processes);
    return t_done();
}
