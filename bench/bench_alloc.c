/*
 * bench_alloc.c -- the C allocator alone, in ns per block.
 *   raw      bt_pool_pop / bt_pool_push: the Treiber stack and counts
 *   client   bt_blocks_alloc / bt_blocks_release: plus the hand and the
 *            in_op/freeze protocol that makes crash recovery possible
 * each for batches of 1 and 16, on 1 and 2 threads (one pool, contended).
 * Prints one JSON object per line; bench/run.py collects them.
 */
#include <pthread.h>
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

int main(int argc, char **argv)
{
    bt_config c;
    bt_config_default(&c);
    iters = argc > 1 ? atol(argv[1]) : 2000000;
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
    return 0;
}
