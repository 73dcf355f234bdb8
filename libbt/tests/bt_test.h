/*
 * bt_test.h -- what every libbt test program shares (after liburing's
 * test/helpers.h). One program per feature; exit 0 pass, 1 fail, 77 skip;
 * run.sh runs them with a per-test timeout.
 *
 *   T_ASSERT(cond)          fail with file:line and the expression
 *   T_EQ(a, b)              both values printed (as long long)
 *   T_OK(call)              a BT call must return 0; prints bt_errname of rc
 *   T_RC(call, want)        a BT call must return `want` exactly
 *   T_RC2(call, w1, w2)     ... one of two codes (where the header allows both)
 *   T_ERR(call)             ... some negative code (no crash is the point)
 *
 * A failure prints the seed (BT_TEST_SEED reproduces it), unlinks the named
 * segments this process made (t_name), and _exits 1: atexit handlers do not
 * run while other threads may still be inside the library. A forked child
 * that fails _exits 1 and touches nothing of its parent's.
 *
 * Randomness is deterministic: the default seed is fixed, so a run is
 * repeatable up to thread scheduling.
 */
#ifndef BT_TEST_H
#define BT_TEST_H

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include "bt.h"

#define T_EXIT_PASS 0
#define T_EXIT_FAIL 1
#define T_EXIT_SKIP 77

#define T_UNUSED __attribute__((unused))

static uint64_t t_seed_value = 1;
static pid_t    t_main_pid;
static int      t_alarm_s;

/* ---- names of the named segments this process made (unlinked on exit) ---- */
#define T_MAX_NAMES 32
static char t_names[T_MAX_NAMES][BT_NAME_MAX + 1];
static int  t_nnames;

static T_UNUSED void t_cleanup(void)
{
    if (getpid() != t_main_pid)
        return;
    for (int i = 0; i < t_nnames; i++)
        if (t_names[i][0])
            bt_seg_unlink(t_names[i]);
    t_nnames = 0;
}

static T_UNUSED __attribute__((noreturn, format(printf, 3, 4)))
void t_fail_at(const char *file, int line, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "FAIL %s:%d: ", file, line);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n     pid %d, seed %" PRIu64 " (rerun with BT_TEST_SEED=%" PRIu64 ")\n",
            (int)getpid(), t_seed_value, t_seed_value);
    fflush(stderr);
    fflush(stdout);
    t_cleanup();
    _exit(T_EXIT_FAIL);
}

#define T_FAIL(...) t_fail_at(__FILE__, __LINE__, __VA_ARGS__)

#define T_ASSERT(cond) do { \
    if (!(cond)) T_FAIL("assertion failed: %s", #cond); \
} while (0)

#define T_ASSERTF(cond, ...) do { \
    if (!(cond)) { \
        char t_msg_[512]; \
        snprintf(t_msg_, sizeof(t_msg_), __VA_ARGS__); \
        T_FAIL("assertion failed: %s: %s", #cond, t_msg_); \
    } \
} while (0)

#define T_EQ(a, b) do { \
    long long t_a_ = (long long)(a), t_b_ = (long long)(b); \
    if (t_a_ != t_b_) \
        T_FAIL("%s == %s: %lld != %lld", #a, #b, t_a_, t_b_); \
} while (0)

#define T_RC(call, want) do { \
    int t_rc_ = (call), t_w_ = (want); \
    if (t_rc_ != t_w_) \
        T_FAIL("%s returned %d (%s), expected %s", #call, t_rc_, bt_errname(t_rc_), \
               bt_errname(t_w_)); \
} while (0)

#define T_OK(call) T_RC(call, 0)

#define T_RC2(call, w1, w2) do { \
    int t_rc_ = (call), t_w1_ = (w1), t_w2_ = (w2); \
    if (t_rc_ != t_w1_ && t_rc_ != t_w2_) \
        T_FAIL("%s returned %d (%s), expected %s or %s", #call, t_rc_, \
               bt_errname(t_rc_), bt_errname(t_w1_), bt_errname(t_w2_)); \
} while (0)

#define T_ERR(call) do { \
    int t_rc_ = (call); \
    if (t_rc_ >= 0) \
        T_FAIL("%s returned %d, expected an error", #call, t_rc_); \
} while (0)

/* ---- time, timeout, seed ----------------------------------------------- */
static T_UNUSED uint64_t t_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void t_on_alarm(int sig)
{
    (void)sig;
    /* async-signal-safe only */
    static const char msg[] = "FAIL: timed out (t_timeout); rerun with the seed below\n";
    char buf[64];
    int n = snprintf(buf, sizeof(buf), "     seed %" PRIu64 "\n", t_seed_value);
    ssize_t r = write(2, msg, sizeof(msg) - 1);
    r = write(2, buf, (size_t)n);
    (void)r;
    t_cleanup();                        /* unlink(2) underneath: safe enough here */
    _exit(T_EXIT_FAIL);
}

static T_UNUSED void t_sleep(double seconds)
{
    struct timespec ts = { (time_t)seconds, (long)((seconds - (double)(time_t)seconds) * 1e9) };
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

/* Fail the test (from any thread) if it runs longer than `seconds`. A child
 * inherits no alarm: call t_timeout again in it if it may hang. */
static T_UNUSED void t_timeout(int seconds)
{
    t_alarm_s = seconds;
    signal(SIGALRM, t_on_alarm);
    alarm((unsigned)seconds);
}

/* Call first in main. Seed from BT_TEST_SEED (default: fixed), a safety
 * alarm below run.sh's timeout, unbuffered output. */
static T_UNUSED uint64_t t_init(int argc, char **argv)
{
    (void)argc;
    (void)argv;
    t_main_pid = getpid();
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *s = getenv("BT_TEST_SEED");
    if (s && *s)
        t_seed_value = strtoull(s, NULL, 0);
    atexit(t_cleanup);
    t_timeout(100);
    return t_seed_value;
}

/* xorshift64*: small, fast, good enough to pick operations. */
static T_UNUSED uint64_t t_rand(uint64_t *st)
{
    uint64_t x = *st ? *st : 0x9E3779B97F4A7C15ull;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *st = x;
    return x * 0x2545F4914F6CDD1Dull;
}
static T_UNUSED uint32_t t_below(uint64_t *st, uint32_t n)
{
    return n ? (uint32_t)((t_rand(st) >> 32) % n) : 0;
}
/* A per-thread / per-process state derived from the seed. */
static T_UNUSED uint64_t t_substream(uint64_t k)
{
    uint64_t z = t_seed_value + 0x9E3779B97F4A7C15ull * (k + 1);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (z ^ (z >> 31)) | 1;
}

/* ---- sub-tests ------------------------------------------------------------- */
/* Each test function runs in a forked child, so that one failure (or crash)
 * does not hide the others: every sub-test reports, and the program fails if
 * any did. The child has its own timeout and unlinks its own named segments. */
static int t_failed_subtests, t_skipped_subtests, t_subtests;

/* Skip the current sub-test (or the whole program, outside T_RUN). */
#define T_SKIP(...) do { \
    printf("SKIP: "); printf(__VA_ARGS__); printf("\n"); fflush(stdout); \
    exit(T_EXIT_SKIP); \
} while (0)

/* Named segments need a writable /dev/shm (containers sometimes lack one). */
static T_UNUSED void t_need_shm(void)
{
    char path[64];
    snprintf(path, sizeof(path), "/bt.t.probe.%d", (int)getpid());
    int fd = shm_open(path, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0)
        T_SKIP("no POSIX shared memory here (shm_open: %s)", strerror(errno));
    close(fd);
    shm_unlink(path);
}

#define T_RUN(fn) t_run(#fn, fn)
static T_UNUSED void t_run(const char *name, void (*fn)(void))
{
    fflush(stdout);
    fflush(stderr);
    uint64_t t0 = t_now_ns();
    pid_t pid = fork();
    if (pid < 0)
        T_FAIL("fork: %s", strerror(errno));
    if (pid == 0) {
        t_main_pid = getpid();
        t_nnames = 0;                   /* the parent's names are the parent's */
        t_timeout(t_alarm_s > 0 ? t_alarm_s : 100);
        fn();
        fflush(stdout);
        exit(T_EXIT_PASS);              /* atexit: t_cleanup, LeakSanitizer */
    }
    int st;
    while (waitpid(pid, &st, 0) < 0)
        if (errno != EINTR)
            T_FAIL("waitpid: %s", strerror(errno));
    double ms = (double)(t_now_ns() - t0) / 1e6;
    t_subtests++;
    if (WIFEXITED(st) && WEXITSTATUS(st) == T_EXIT_SKIP) {
        t_skipped_subtests++;
        printf("  skip  %s\n", name);
        return;
    }
    if (WIFEXITED(st) && WEXITSTATUS(st) == T_EXIT_PASS) {
        printf("  ok    %s (%.0f ms)\n", name, ms);
        return;
    }
    t_failed_subtests++;
    if (WIFSIGNALED(st))
        printf("  FAIL  %s: killed by signal %d (%.0f ms)\n", name, WTERMSIG(st), ms);
    else
        printf("  FAIL  %s: exit %d (%.0f ms)\n", name, WEXITSTATUS(st), ms);
}

/* main's return value: 1 if any sub-test failed. */
static T_UNUSED int t_done(void)
{
    if (t_failed_subtests)
        fprintf(stderr, "%d sub-test(s) failed (seed %" PRIu64 ")\n", t_failed_subtests,
                t_seed_value);
    if (t_failed_subtests)
        return T_EXIT_FAIL;
    if (t_subtests && t_skipped_subtests == t_subtests) {
        printf("every sub-test skipped\n");
        return T_EXIT_SKIP;
    }
    return T_EXIT_PASS;
}

/* ---- segments ---------------------------------------------------------- */
/* A small config with the shape a test asks for: `pools` pools of `blocks`
 * blocks, `rows` rows of `width`; blocks of 16 tokens, 4 clients, hand 64. */
static T_UNUSED bt_config t_config(uint32_t pools, uint32_t blocks, uint32_t rows, uint32_t width)
{
    bt_config c;
    bt_config_default(&c);
    c.block_size = 16;
    c.kernel_block_size = 16;
    c.num_pools = pools;
    c.blocks_per_pool = blocks;
    c.num_rows = rows;
    c.row_width = width;
    c.max_clients = 4;
    c.hand_size = 64;
    return c;
}

/* The default small config: 1 pool of 64 blocks, 8 rows of 8. */
static T_UNUSED bt_config t_config_small(void)
{
    return t_config(1, 64, 8, 8);
}

/* An embedded segment (private mapping) or fail. */
static T_UNUSED bt_seg *t_seg_embedded(const bt_config *cfg)
{
    bt_seg *seg = NULL;
    int rc = bt_seg_create(NULL, cfg, 0, &seg);
    if (rc)
        T_FAIL("bt_seg_create(NULL) returned %d (%s)", rc, bt_errname(rc));
    return seg;
}

/* A segment over a MAP_SHARED anonymous mapping: forked children share it
 * without a name. Close with t_seg_shared_close. */
static T_UNUSED bt_seg *t_seg_shared(const bt_config *cfg)
{
    uint64_t size = bt_config_size(cfg);
    if (!size)
        T_FAIL("bt_config_size: impossible config");
    void *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        T_FAIL("mmap(%" PRIu64 "): %s", size, strerror(errno));
    bt_seg *seg = NULL;
    int rc = bt_seg_create_at(m, size, cfg, &seg);
    if (rc)
        T_FAIL("bt_seg_create_at returned %d (%s)", rc, bt_errname(rc));
    return seg;
}
static T_UNUSED void t_seg_shared_close(bt_seg *seg)
{
    bt_seg_info info;
    void *base = bt_seg_base(seg);
    if (bt_seg_info_get(seg, &info))
        T_FAIL("bt_seg_info_get");
    bt_seg_close(seg);
    munmap(base, info.size);
}

/* A segment name unique to this process ("t.<tag>.<pid>.<n>"), unlinked at
 * exit or failure. */
static T_UNUSED const char *t_name(const char *tag)
{
    static int counter;
    if (t_nnames >= T_MAX_NAMES)
        T_FAIL("t_name: too many names");
    char *buf = t_names[t_nnames++];
    snprintf(buf, BT_NAME_MAX + 1, "t.%s.%d.%d", tag, (int)getpid(), counter++);
    return buf;
}

static T_UNUSED bt_seg_info t_info(const bt_seg *seg)
{
    bt_seg_info info;
    int rc = bt_seg_info_get(seg, &info);
    if (rc)
        T_FAIL("bt_seg_info_get returned %d (%s)", rc, bt_errname(rc));
    return info;
}

static T_UNUSED bt_client *t_client(bt_seg *seg)
{
    bt_client *cl = NULL;
    int rc = bt_client_open(seg, &cl);
    if (rc)
        T_FAIL("bt_client_open returned %d (%s)", rc, bt_errname(rc));
    return cl;
}

static T_UNUSED uint32_t t_free(const bt_seg *seg, uint32_t pool)
{
    uint32_t n = 0;
    int rc = bt_pool_free_count(seg, pool, &n);
    if (rc)
        T_FAIL("bt_pool_free_count(%u) returned %d (%s)", pool, rc, bt_errname(rc));
    return n;
}
static T_UNUSED uint64_t t_free_all(const bt_seg *seg)
{
    bt_seg_info info = t_info(seg);
    uint64_t n = 0;
    for (uint32_t p = 0; p < info.config.num_pools; p++)
        n += t_free(seg, p);
    return n;
}

static T_UNUSED uint32_t t_refcnt(const bt_seg *seg, int32_t id)
{
    uint32_t ref = 0, owner = 0;
    int rc = bt_block_get(seg, id, &ref, &owner);
    if (rc)
        T_FAIL("bt_block_get(%d) returned %d (%s)", id, rc, bt_errname(rc));
    return ref;
}

/* The dense table and per-row counts, as a GPU copy or numpy would see them. */
static T_UNUSED const int32_t *t_table(const bt_seg *seg)
{
    bt_seg_info info = t_info(seg);
    return (const int32_t *)((const char *)bt_seg_base(seg) + info.table_offset);
}
static T_UNUSED const int32_t *t_nblocks(const bt_seg *seg)
{
    bt_seg_info info = t_info(seg);
    return (const int32_t *)((const char *)bt_seg_base(seg) + info.nblocks_offset);
}

/* Read a row (contents into ids[cap]) or fail. */
static T_UNUSED bt_row_info t_row(const bt_seg *seg, uint32_t row, int32_t *ids, uint32_t cap)
{
    bt_row_info ri;
    int rc = bt_row_read(seg, row, ids, cap, &ri);
    if (rc)
        T_FAIL("bt_row_read(%u) returned %d (%s)", row, rc, bt_errname(rc));
    return ri;
}

/* Every row: the raw count agrees with bt_row_read, is within the width, and
 * every entry past it is 0 (a stale tail lets a kernel read someone else's
 * KV). Only for quiet segments. */
#define t_check_tails(seg) t_check_tails_at(seg, __FILE__, __LINE__)
static T_UNUSED void t_check_tails_at(const bt_seg *seg, const char *file, int line)
{
    bt_seg_info info = t_info(seg);
    const int32_t *tab = t_table(seg), *nb = t_nblocks(seg);
    uint32_t w = info.config.row_width;
    for (uint32_t r = 0; r < info.config.num_rows; r++) {
        bt_row_info ri;
        int rc = bt_row_read(seg, r, NULL, 0, &ri);
        if (rc)
            t_fail_at(file, line, "row %u: bt_row_read returned %d (%s)", r, rc, bt_errname(rc));
#ifdef BT_ROW_PAGED
        if (ri.flags & BT_ROW_PAGED) {  /* entries live in chunks: bt_row_read's view */
            if (nb[r] < 0 || (uint32_t)nb[r] != ri.num_blocks)
                t_fail_at(file, line, "paged row %u: nblocks %d, bt_row_read says %u", r, nb[r],
                          ri.num_blocks);
            continue;
        }
#endif
        if (nb[r] < 0 || (uint32_t)nb[r] > w || (uint32_t)nb[r] != ri.num_blocks)
            t_fail_at(file, line, "row %u: nblocks %d, bt_row_read says %u, width %u",
                      r, nb[r], ri.num_blocks, w);
        if (!ri.owner && ri.num_blocks)
            t_fail_at(file, line, "row %u: free but holds %u blocks", r, ri.num_blocks);
        for (uint32_t i = ri.num_blocks; i < w; i++)
            if (tab[(uint64_t)r * w + i])
                t_fail_at(file, line, "row %u: entry %u past num_blocks %u is %d, not 0",
                          r, i, ri.num_blocks, tab[(uint64_t)r * w + i]);
    }
}

/* A read-only bt_seg_check on a quiet segment must find nothing wrong and
 * count exactly: free == the pools' free counts, free + held == total - 1. */
#define t_check_quiet(seg) t_check_quiet_at(seg, __FILE__, __LINE__)
static T_UNUSED bt_check_report t_check_quiet_at(bt_seg *seg, const char *file, int line)
{
    bt_check_report rep;
    memset(&rep, 0xa5, sizeof(rep));
    int rc = bt_seg_check(seg, 0, 0, &rep);
    if (rc)
        t_fail_at(file, line, "bt_seg_check returned %d (%s)", rc, bt_errname(rc));
    bt_seg_info info = t_info(seg);
    uint64_t fr = t_free_all(seg);
    if (rep.leaked || rep.double_free || rep.refcnt_fixed || rep.rows_fixed || rep.bad_entries)
        t_fail_at(file, line, "bt_seg_check on a quiet segment: leaked %" PRIu64
                  " double_free %" PRIu64 " refcnt_fixed %" PRIu64 " rows_fixed %" PRIu64
                  " bad_entries %" PRIu64, rep.leaked, rep.double_free, rep.refcnt_fixed,
                  rep.rows_fixed, rep.bad_entries);
#ifdef BT_ENOCHUNKS
    if (rep.chunks_leaked)
        t_fail_at(file, line, "bt_seg_check on a quiet segment: %" PRIu64 " chunks leaked",
                  rep.chunks_leaked);
#endif
    if (rep.blocks_free != fr || rep.blocks_free + rep.blocks_held != info.total_blocks - 1)
        t_fail_at(file, line, "bt_seg_check: free %" PRIu64 " held %" PRIu64
                  " (pools say free %" PRIu64 ", total %" PRIu64 " incl. the null block)",
                  rep.blocks_free, rep.blocks_held, fr, info.total_blocks);
    t_check_tails_at(seg, file, line);
    return rep;
}

/* ---- the setup and teardown most sub-tests share ------------------------ */
/* t_seg_embedded / t_seg_shared of a config taken by value, so that a test
 * that needs nothing more of its config writes t_seg_new(cfg()). */
static T_UNUSED bt_seg *t_seg_new(bt_config c)
{
    return t_seg_embedded(&c);
}
static T_UNUSED bt_seg *t_seg_new_shared(bt_config c)
{
    return t_seg_shared(&c);
}

/* A named segment (t_name(tag), created exclusively; skips without /dev/shm):
 * its name in *name, for attaching from children and for T_END_NAMED. */
static T_UNUSED bt_seg *t_seg_new_named(bt_config c, const char *tag, const char **name)
{
    t_need_shm();
    *name = t_name(tag);
    bt_seg *seg = NULL;
    int rc = bt_seg_create(*name, &c, BT_CREATE_EXCL, &seg);
    if (rc)
        T_FAIL("bt_seg_create(%s) returned %d (%s)", *name, rc, bt_errname(rc));
    return seg;
}

/* A sub-test's last words: T_END(seg, clients...) closes the clients named,
 * requires the segment to be quiet (t_check_quiet), then closes it. T_END
 * for t_seg_embedded / t_seg_new segments, T_END_SHARED for shared ones,
 * T_END_NAMED(name, seg, clients...) for named ones (then unlinks the name). */
#define T_END(...) t_end_at(__FILE__, __LINE__, 0, NULL, __VA_ARGS__, (bt_client *)NULL)
#define T_END_SHARED(...) t_end_at(__FILE__, __LINE__, 1, NULL, __VA_ARGS__, (bt_client *)NULL)
#define T_END_NAMED(name, ...) t_end_at(__FILE__, __LINE__, 0, name, __VA_ARGS__, (bt_client *)NULL)
static T_UNUSED void t_end_at(const char *file, int line, int shared, const char *name,
                              bt_seg *seg, ...)
{
    va_list ap;
    va_start(ap, seg);
    for (bt_client *cl = va_arg(ap, bt_client *); cl; cl = va_arg(ap, bt_client *))
        bt_client_close(cl);
    va_end(ap);
    t_check_quiet_at(seg, file, line);
    if (shared)
        t_seg_shared_close(seg);
    else
        bt_seg_close(seg);
    int rc = name ? bt_seg_unlink(name) : 0;
    if (rc)
        t_fail_at(file, line, "bt_seg_unlink(%s) returned %d (%s)", name, rc, bt_errname(rc));
}

/* pipe(fd) and fork(), or fail: the child's pid (0 in the child). */
static T_UNUSED pid_t t_fork_pipe(int fd[2])
{
    if (pipe(fd) != 0)
        T_FAIL("pipe: %s", strerror(errno));
    pid_t pid = fork();
    if (pid < 0)
        T_FAIL("fork: %s", strerror(errno));
    return pid;
}

/* How many blocks client cl holds in its hand. */
static T_UNUSED uint32_t t_hand(const bt_seg *seg, const bt_client *cl)
{
    bt_client_slot_info si;
    int rc = bt_client_slot_get(seg, bt_client_id(cl), &si);
    if (rc)
        T_FAIL("bt_client_slot_get returned %d (%s)", rc, bt_errname(rc));
    return si.hand_count;
}

/* ---- snapshots: "a call that returns an error has changed nothing" ------- */
/* Everything a data-path call may change, except the per-client op counter.
 * Snapshots live in a small ring (reachable, so LeakSanitizer is quiet): a
 * test holds at most a few at once. */
typedef struct t_snap {
    uint32_t pools, rows, width, clients;
    uint64_t total;
    uint32_t *free, *ref, *owner, *hand, *slot_rows, *slot_state;
    bt_row_info *ri;
    int32_t *table;
} t_snap;

static T_UNUSED t_snap *t_snap_take(const bt_seg *seg)
{
    static t_snap *ring[16];
    static unsigned next;
    t_snap *s = ring[next % 16];
    if (s) {
        free(s->free); free(s->ref); free(s->owner); free(s->hand); free(s->slot_rows);
        free(s->slot_state); free(s->ri); free(s->table); free(s);
    }
    s = calloc(1, sizeof(*s));
    ring[next++ % 16] = s;
    bt_seg_info info = t_info(seg);
    s->pools = info.config.num_pools;
    s->rows = info.config.num_rows;
    s->width = info.config.row_width;
    s->clients = info.config.max_clients;
    s->total = info.total_blocks;
    s->free = calloc(s->pools, 4);
    s->ref = calloc(s->total, 4);
    s->owner = calloc(s->total, 4);
    s->hand = calloc(s->clients + 1, 4);
    s->slot_rows = calloc(s->clients + 1, 4);
    s->slot_state = calloc(s->clients + 1, 4);
    s->ri = calloc(s->rows, sizeof(bt_row_info));
    s->table = calloc((size_t)s->rows * s->width, 4);
    if (!s->free || !s->ref || !s->owner || !s->hand || !s->ri || !s->table ||
        !s->slot_rows || !s->slot_state)
        T_FAIL("t_snap_take: out of memory");
    for (uint32_t p = 0; p < s->pools; p++)
        s->free[p] = t_free(seg, p);
    for (uint64_t b = 0; b < s->total; b++)
        if (bt_block_get(seg, (int32_t)b, &s->ref[b], &s->owner[b]))
            T_FAIL("t_snap_take: bt_block_get(%" PRIu64 ")", b);
    for (uint32_t c = 1; c <= s->clients; c++) {
        bt_client_slot_info si;
        if (bt_client_slot_get(seg, c, &si))
            T_FAIL("t_snap_take: bt_client_slot_get(%u)", c);
        s->hand[c] = si.hand_count;
        s->slot_rows[c] = si.rows;
        s->slot_state[c] = si.state;
    }
    for (uint32_t r = 0; r < s->rows; r++)
        s->ri[r] = t_row(seg, r, NULL, 0);
    memcpy(s->table, t_table(seg), (size_t)s->rows * s->width * 4);
    return s;
}

#define T_SAME(seg, snap) t_snap_same_at(seg, snap, __FILE__, __LINE__)
static T_UNUSED void t_snap_same_at(const bt_seg *seg, const t_snap *a, const char *file, int line)
{
    const int32_t *tab = t_table(seg);
    for (uint32_t p = 0; p < a->pools; p++)
        if (t_free(seg, p) != a->free[p])
            t_fail_at(file, line, "changed: pool %u free count %u, was %u", p, t_free(seg, p),
                      a->free[p]);
    for (uint64_t b = 0; b < a->total; b++) {
        uint32_t ref, owner;
        bt_block_get(seg, (int32_t)b, &ref, &owner);
        if (ref != a->ref[b] || owner != a->owner[b])
            t_fail_at(file, line, "changed: block %" PRIu64 " refcount %u owner %u, was %u / %u",
                      b, ref, owner, a->ref[b], a->owner[b]);
    }
    for (uint32_t c = 1; c <= a->clients; c++) {
        bt_client_slot_info si;
        bt_client_slot_get(seg, c, &si);
        if (si.hand_count != a->hand[c] || si.rows != a->slot_rows[c] || si.state != a->slot_state[c])
            t_fail_at(file, line, "changed: client %u hand %u rows %u state %u, was %u / %u / %u",
                      c, si.hand_count, si.rows, si.state, a->hand[c], a->slot_rows[c],
                      a->slot_state[c]);
    }
    for (uint32_t r = 0; r < a->rows; r++) {
        bt_row_info ri = t_row(seg, r, NULL, 0);
        const bt_row_info *o = &a->ri[r];
        if (!ri.owner && !o->owner && !ri.num_blocks && !o->num_blocks)
            continue;                   /* a free row's key, flags, generation mean nothing */
        if (ri.owner != o->owner || ri.flags != o->flags || ri.key != o->key ||
            ri.num_blocks != o->num_blocks || ri.generation != o->generation ||
            ri.num_tokens != o->num_tokens)
            t_fail_at(file, line, "changed: row %u owner %u flags %u key %" PRIu64 " blocks %u gen %u"
                      " tokens %" PRId64 ", was %u %u %" PRIu64 " %u %u %" PRId64, r, ri.owner,
                      ri.flags, ri.key, ri.num_blocks, ri.generation, ri.num_tokens, o->owner,
                      o->flags, o->key, o->num_blocks, o->generation, o->num_tokens);
        for (uint32_t i = 0; i < a->width; i++)
            if (tab[(uint64_t)r * a->width + i] != a->table[(uint64_t)r * a->width + i])
                t_fail_at(file, line, "changed: row %u entry %u is %d, was %d", r, i,
                          tab[(uint64_t)r * a->width + i], a->table[(uint64_t)r * a->width + i]);
    }
}

/* Wait for a child; fail unless it exited 0. */
static T_UNUSED void t_wait_ok(pid_t pid, const char *what)
{
    int st;
    if (waitpid(pid, &st, 0) != pid)
        T_FAIL("waitpid(%s): %s", what, strerror(errno));
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
        if (WIFSIGNALED(st))
            T_FAIL("%s (pid %d) died of signal %d", what, (int)pid, WTERMSIG(st));
        T_FAIL("%s (pid %d) exited %d", what, (int)pid, WEXITSTATUS(st));
    }
}

#endif /* BT_TEST_H */
