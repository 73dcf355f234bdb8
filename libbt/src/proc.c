/*
 * proc.c -- processes and time: the bottom layer, which touches no segment
 * (bar a row's seqlock wait, bt_seq_backoff, which only takes the time).
 *
 * A process is named for good by its pid and its start time (field 22 of
 * /proc/<pid>/stat): the kernel recycles pids, never that pair. Client slots,
 * the segment's owner, mirrors and cache pools store the pair, and every
 * "is it alive?" in libbt asks bt_pid_alive, which never guesses "dead".
 */
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "bt_internal.h"

/* Zombies are dead (bt.h says why): "Z" and "X" states are -ESRCH. */
int bt_proc_start_time(int32_t pid, uint64_t *out)
{
    char path[64], buf[1024];
    if (pid <= 0 || !out)
        return BT_EINVAL;
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT || errno == ESRCH ? -ESRCH : -errno;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    int err = errno;
    close(fd);
    if (n == 0 || (n < 0 && err == ESRCH))
        return -ESRCH;                  /* it went between the open and the read */
    if (n < 0)
        return -err;
    buf[n] = 0;
    char *p = strrchr(buf, ')');        /* the command name may hold spaces */
    if (!p || p[1] != ' ')
        return -EIO;
    if (p[2] == 'Z' || p[2] == 'X')
        return -ESRCH;
    unsigned long long v = 0;
    /* after ")": " state(3) ppid(4) ... starttime(22)": to the space before 22 */
    for (int field = 3; field <= 22 && p; field++)
        p = strchr(p + 1, ' ');
    if (!p || sscanf(p + 1, "%llu", &v) != 1)
        return -EIO;
    *out = v ? v : 1;                   /* 0 means "unknown" wherever it is stored */
    return BT_OK;
}

int bt_pid_alive(int32_t pid, uint64_t start)
{
    uint64_t now = 0;
    if (pid <= 0)
        return 0;
    if (kill(pid, 0) < 0 && errno == ESRCH)
        return 0;
    int rc = bt_proc_start_time(pid, &now);
    if (rc == -ESRCH)
        return 0;
    if (rc)
        return 1;                       /* can't tell: never reap on a guess */
    return !start || now == start;
}

/* Our own start time, read from /proc once per process (a fork re-reads):
 * hot paths stamp it, and reading /proc costs tens of microseconds. The
 * cache is process-local memory, accessed atomically so that two threads
 * filling it at once are harmless. */
uint64_t bt_self_start_time(void)
{
    static int32_t pid;
    static uint64_t start;
    int32_t me = getpid();
    if (bt_load_acquire(&pid) != me) {
        uint64_t v = 0;
        bt_proc_start_time(me, &v);     /* our own: it cannot be gone */
        bt_store_relaxed(&start, v);
        bt_store_release(&pid, me);
    }
    return bt_load_relaxed(&start);
}

uint64_t bt_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int bt_seq_backoff(uint32_t spin, uint64_t *t0)
{
    if (spin < 256) {
        if (spin)
            bt_cpu_relax();
        return 0;
    }
    uint64_t now = bt_now_ns();
    if (!*t0)
        *t0 = now;
    if (now - *t0 > BT_SEQ_WAIT_NS)
        return 1;
    sched_yield();
    return 0;
}
