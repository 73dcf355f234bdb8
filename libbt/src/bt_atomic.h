/*
 * bt_atomic.h -- every memory ordering libbt uses, named, in one place
 * (after liburing's barrier.h). Shared memory is touched only through these.
 *
 *   relaxed   atomic, no ordering: counters, and reads whose value is checked
 *             later by a CAS or a seqlock re-read.
 *   acquire   a load; nothing after it in program order moves before it. Pairs
 *             with a release store of the same location: what the releaser
 *             wrote before the store is visible after the load.
 *   release   a store; nothing before it moves after it.
 *   seq_cst   the Dekker pair of the recovery protocol: a client's in_op
 *             exchange then freeze load, against the sweeper's freeze store
 *             then in_op load. Only a total order guarantees that at least one
 *             side sees the other.
 *
 * Plain (non-_Atomic) shared words are accessed with the __atomic builtins so
 * that the compiler never tears or invents accesses, and ThreadSanitizer sees
 * what is going on. On x86-64 relaxed/acquire/release loads and stores are
 * plain moves: the cost is nil.
 */
#ifndef BT_ATOMIC_H
#define BT_ATOMIC_H

#include <stdatomic.h>
#include <stdint.h>

/* Process-shared atomics must be lock-free: a lock-based fallback would use a
 * process-local lock and silently stop being atomic across processes. */
_Static_assert(ATOMIC_INT_LOCK_FREE == 2, "32-bit atomics must be lock-free");
_Static_assert(ATOMIC_LLONG_LOCK_FREE == 2, "64-bit atomics must be lock-free");

#define bt_load_relaxed(p)      __atomic_load_n((p), __ATOMIC_RELAXED)
#define bt_load_acquire(p)      __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define bt_load_seqcst(p)       __atomic_load_n((p), __ATOMIC_SEQ_CST)
#define bt_store_relaxed(p, v)  __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define bt_store_release(p, v)  __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define bt_store_seqcst(p, v)   __atomic_store_n((p), (v), __ATOMIC_SEQ_CST)
#define bt_xchg_seqcst(p, v)    __atomic_exchange_n((p), (v), __ATOMIC_SEQ_CST)
#define bt_fetch_add_relaxed(p, v) __atomic_fetch_add((p), (v), __ATOMIC_RELAXED)
/* A generation bumped after a rebuild (a repair): what was rebuilt before
 * the bump is visible to whoever acquire-loads the new generation. */
#define bt_fetch_add_release(p, v) __atomic_fetch_add((p), (v), __ATOMIC_RELEASE)

/* Strong CAS; on failure *expected is refreshed. acq_rel on success so that a
 * pop sees the links pushed before, and a push publishes its links. */
#define bt_cas_acqrel(p, expected, desired) \
    __atomic_compare_exchange_n((p), (expected), (desired), 0, \
                                __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)
#define bt_cas_relaxed(p, expected, desired) \
    __atomic_compare_exchange_n((p), (expected), (desired), 0, \
                                __ATOMIC_RELAXED, __ATOMIC_RELAXED)

#define bt_fence_acquire()      __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define bt_fence_release()      __atomic_thread_fence(__ATOMIC_RELEASE)
/* The sweeper's side of the Dekker pair when its freeze store is a CAS
 * (acq_rel, to take over a dead sweeper's word): the fence puts that store
 * in the total order before its seq_cst in_op loads, as a seq_cst store
 * would be. */
#define bt_fence_seqcst()       __atomic_thread_fence(__ATOMIC_SEQ_CST)

static inline void bt_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

#endif /* BT_ATOMIC_H */
