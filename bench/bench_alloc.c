/*
 * bench_alloc.c -- the C allocator alone, in ns per block.
 *   raw      bt_pool_pop / bt_pool_push: the Treiber stack and counts
 *   client   bt_blocks_alloc / bt_blocks_release: plus the hand and the
 *            in_op/freeze protocol that makes crash recovery possible
 * each for batches of 1 and 16, on 1 and 2 threads (one pool, contended).
 * Then processes (issue 11): the client API, batch 16, in 1 process, in 2
 * processes on one pool, and in 2 processes on a pool each; throughput is
 * blocks per second summed over the processes, and the ratio is against 1
 * process. Processes, not threads: what a deployment runs (an engine per GPU).
 * Prints one JSON object per line; bench/run.py collects them.
 */
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "bt.h"

static bt_seg *seg;
static long iters;

struct arg { int mode; uint32_t batch; double ns; int rc; };

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static void *worker(void *p)
{
    struct arg *a = p;
    int32_t ids[64];
    bt_client *cl = NULL;
    if (a->mode == 1 && (a->rc = bt_client_open(seg, &cl)))
        return NULL;
    double t0 = now_ns();
    for (long i = 0; i < iters; i++) {
        int rc = a->mode ? bt_blocks_alloc(cl, 0, a->batch, ids) : bt_pool_pop(seg, 0, a->batch, 1, ids);
        if (rc || (rc = a->mode ? bt_blocks_release(cl, ids, a->batch) : bt_pool_push(seg, ids, a->batch))) {
            a->rc = rc;
            break;
        }
    }
    a->ns = (now_ns() - t0) / ((double)iters * a->batch);
    bt_client_close(cl);
    return NULL;
}

static int run(int mode, uint32_t batch, int threads)
{
    pthread_t th[8];
    struct arg a[8];
    double sum = 0;
    for (int t = 0; t < threads; t++) {
        a[t] = (struct arg){ .mode = mode, .batch = batch };
        pthread_create(&th[t], NULL, worker, &a[t]);
    }
    for (int t = 0; t < threads; t++) {
        pthread_join(th[t], NULL);
        if (a[t].rc) {
            fprintf(stderr, "bench: %s\n", bt_strerror(a[t].rc));
            return 1;
        }
        sum += a[t].ns;
    }
    /* ns per block for one thread's view: alloc+free of one block */
    printf("{\"api\": \"%s\", \"batch\": %u, \"threads\": %d, \"ns_per_block\": %.2f}\n",
           mode ? "client" : "raw", batch, threads, sum / threads);
    return 0;
}

/* ---- processes ------------------------------------------------------------ */

/* CPU time, as well as wall time: on a machine shared with other work a
 * process is descheduled for part of the wall time, and its CPU time per
 * block is what a cache line bouncing between processes costs. */
static double cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

struct pshared {
    int go;                             /* the start line: every child waits on it */
    int ready;
    double ns[8];                       /* per child: wall ns per block */
    double cpu[8];                      /* per child: CPU ns per block */
    int rc[8];
};

/* Child p: alloc+release batches through its own client on `pool`. */
static void proc_child(bt_seg *s, struct pshared *sh, int p, uint32_t pool, uint32_t batch)
{
    int32_t ids[64];
    bt_client *cl = NULL;
    /* A core each: left to the scheduler, two children on a busy machine
     * may share one core, taking turns instead of contending. */
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(p % sysconf(_SC_NPROCESSORS_ONLN), &set);
    sched_setaffinity(0, sizeof(set), &set);
    int rc = bt_client_open(s, &cl);
    __atomic_fetch_add(&sh->ready, 1, __ATOMIC_ACQ_REL);
    while (!__atomic_load_n(&sh->go, __ATOMIC_ACQUIRE))
        ;
    double t0 = now_ns(), c0 = cpu_ns();
    for (long i = 0; !rc && i < iters; i++)
        if (!(rc = bt_blocks_alloc(cl, pool, batch, ids)))
            rc = bt_blocks_release(cl, ids, batch);
    sh->ns[p] = (now_ns() - t0) / ((double)iters * batch);
    sh->cpu[p] = (cpu_ns() - c0) / ((double)iters * batch);
    sh->rc[p] = rc;
    bt_client_close(cl);
    _exit(0);
}

/* One run of nprocs processes; returns blocks per microsecond, summed. */
static double run_procs(bt_seg *s, struct pshared *sh, int nprocs, int separate, uint32_t batch,
                        double *ns_out, double *cpu_out)
{
    memset(sh, 0, sizeof(*sh));
    pid_t pids[8];
    for (int p = 0; p < nprocs; p++)
        if ((pids[p] = fork()) == 0)
            proc_child(s, sh, p, separate ? (uint32_t)p : 0, batch);
    while (__atomic_load_n(&sh->ready, __ATOMIC_ACQUIRE) < nprocs)
        ;
    __atomic_store_n(&sh->go, 1, __ATOMIC_RELEASE);
    double tput = 0, ns = 0, cpu = 0;
    for (int p = 0; p < nprocs; p++) {
        waitpid(pids[p], NULL, 0);
        if (sh->rc[p]) {
            fprintf(stderr, "bench: process %d: %s\n", p, bt_strerror(sh->rc[p]));
            return -1;
        }
        tput += 1e3 / sh->ns[p];
        ns += sh->ns[p] / nprocs;
        cpu += sh->cpu[p] / nprocs;
    }
    *ns_out = ns;
    *cpu_out = cpu;
    return tput;
}

static double median(double *v, int n)
{
    for (int i = 0; i < n; i++)         /* insertion sort: n is small */
        for (int j = i; j > 0 && v[j] < v[j - 1]; j--) {
            double t = v[j]; v[j] = v[j - 1]; v[j - 1] = t;
        }
    return v[n / 2];
}

/* 1 process, 2 on one pool, 2 on a pool each; the median of `reps` runs each,
 * the modes interleaved so that a noisy neighbour hurts them alike.
 * mblocks_per_s: wall throughput summed over the processes; cpu_ns_per_block:
 * CPU time per block in each process, the cost that line bouncing adds to
 * (2-process throughput where each has a core of its own is 1e3 / it, x2). */
static int bench_procs(uint32_t batch, int reps)
{
    bt_config c;
    bt_config_default(&c);
    c.num_pools = 2;
    uint64_t size = bt_config_size(&c);
    void *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    struct pshared *sh = mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE,
                              MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    bt_seg *s;
    if (mem == MAP_FAILED || sh == MAP_FAILED || bt_seg_create_at(mem, size, &c, &s))
        return 1;
    static const char *names[] = { "procs:1", "procs:2:one-pool", "procs:2:separate-pools" };
    double tput[3][16], ns[3][16], cpu[3][16];
    reps = reps > 16 ? 16 : reps < 1 ? 1 : reps;
    for (int r = 0; r < reps; r++)
        for (int m = 0; m < 3; m++)
            if ((tput[m][r] = run_procs(s, sh, m ? 2 : 1, m == 2, batch, &ns[m][r], &cpu[m][r])) < 0)
                return 1;
    double med[3], mns[3], mcpu[3];
    for (int m = 0; m < 3; m++)
        med[m] = median(tput[m], reps), mns[m] = median(ns[m], reps), mcpu[m] = median(cpu[m], reps);
    for (int m = 0; m < 3; m++)
        printf("{\"api\": \"%s\", \"batch\": %u, \"threads\": %d, \"ns_per_block\": %.2f, "
               "\"cpu_ns_per_block\": %.2f, \"mblocks_per_s\": %.1f, \"vs_1_process\": %.2f, "
               "\"cpu_per_block_vs_1\": %.2f, \"own_cores_vs_1\": %.2f}\n",
               names[m], batch, m ? 2 : 1, mns[m], mcpu[m], med[m], med[m] / med[0],
               mcpu[m] / mcpu[0], (m ? 2 : 1) * mcpu[0] / mcpu[m]);
    bt_seg_close(s);
    munmap(mem, size);
    munmap(sh, sizeof(*sh));
    return 0;
}

int main(int argc, char **argv)
{
    bt_config c;
    bt_config_default(&c);
    iters = argc > 1 ? atol(argv[1]) : 2000000;
    if (argc > 2 && !strcmp(argv[2], "procs"))  /* bench_alloc ITERS procs [REPS]: that part only */
        return bench_procs(16, argc > 3 ? atoi(argv[3]) : 5);
    int rc = bt_seg_create(NULL, &c, 0, &seg);
    if (rc) {
        fprintf(stderr, "bench: %s\n", bt_strerror(rc));
        return 1;
    }
    uint32_t batches[] = { 1, 16 };
    for (int mode = 0; mode < 2; mode++)
        for (int b = 0; b < 2; b++)
            for (int t = 1; t <= 2; t++)
                if (run(mode, batches[b], t))
                    return 1;
    bt_seg_close(seg);
    return bench_procs(16, 5);
}
