/*
 * test_check.c -- bt_seg_check (read-only and repairing) and
 * bt_seg_recover_client.
 *
 * Damage is done the way a buggy or dying process would do it: raw pops
 * never pushed, table entries and counts scribbled on (through the public
 * table offset, or white-box through bt_layout.h for counts, free lists,
 * client slots and the freeze word), clients that _exit() without closing.
 * After every repair the segment must be exactly consistent again and no
 * block may be handed out twice.
 */
#include <stddef.h>
#include "bt_test.h"
#include "bt_layout.h"

#define W 8

static bt_config cfg(void)
{
    return t_config(1, 64, 6, W);
}

/* ---- white-box access to the layout ---------------------------------------- */
static uint8_t *base_of(const bt_seg *seg) { return bt_seg_base(seg); }
static uint64_t region(const bt_seg *seg, int r)
{
    uint64_t v;
    memcpy(&v, base_of(seg) + offsetof(struct bt_header, off) + 8 * (size_t)r, 8);
    return v;
}
static uint32_t *refcnt_word(const bt_seg *seg, int32_t id)
{
    return (uint32_t *)(base_of(seg) + region(seg, BT_R_REFCNT)) + id;
}
static struct bt_cslot *slot_ptr(const bt_seg *seg, uint32_t id)
{
    return (struct bt_cslot *)(base_of(seg) + region(seg, BT_R_CLIENTS)) + (id - 1);
}
static struct bt_pool *pool_ptr(const bt_seg *seg, uint32_t p)
{
    return (struct bt_pool *)(base_of(seg) + region(seg, BT_R_POOLS)) + p;
}
static uint64_t *freeze_word(const bt_seg *seg)
{
    return &((struct bt_header *)base_of(seg))->freeze;
}
/* the public view: the dense table and counts */
static int32_t *entry(const bt_seg *seg, uint32_t row, uint32_t i)
{
    return (int32_t *)t_table(seg) + (uint64_t)row * W + i;
}
static int32_t *nblocks_word(const bt_seg *seg, uint32_t row)
{
    return (int32_t *)t_nblocks(seg) + row;
}

static bt_check_report check(bt_seg *seg, int flags)
{
    bt_check_report rep;
    memset(&rep, 0xa5, sizeof(rep));
    int rc = bt_seg_check(seg, flags, 1000, &rep);
    if (rc)
        T_FAIL("bt_seg_check(flags %d) returned %d (%s)", flags, rc, bt_errname(rc));
    return rep;
}

static void print_rep(const char *what, const bt_check_report *r)
{
    printf("%-28s free %" PRIu64 " held %" PRIu64 " refcnt_fixed %" PRIu64 " leaked %" PRIu64
           " double_free %" PRIu64 " rows_fixed %" PRIu64 " bad_entries %" PRIu64
           " reaped %" PRIu64 "\n", what, r->blocks_free, r->blocks_held, r->refcnt_fixed,
           r->leaked, r->double_free, r->rows_fixed, r->bad_entries, r->clients_reaped);
}

/* Take every free block: none may be one that something holds. */
static void drain_pool_and_give_back(bt_seg *seg, const int32_t *held, int nheld)
{
    bt_client *cl = t_client(seg);
    uint32_t n = t_free(seg, 0);
    int32_t ids[64];
    T_ASSERT(n <= 64);
    T_OK(bt_blocks_alloc(cl, 0, n, ids));
    T_EQ(t_free(seg, 0), 0);
    for (uint32_t i = 0; i < n; i++) {
        T_EQ(t_refcnt(seg, ids[i]), 1);
        for (int k = 0; k < nheld; k++)
            T_ASSERTF(ids[i] != held[k], "block %d handed out while held", ids[i]);
    }
    int32_t more;
    T_RC(bt_blocks_alloc(cl, 0, 1, &more), BT_ENOBLOCKS);
    bt_client_close(cl);
    T_EQ(t_free(seg, 0), n);
}

/* ---- a quiet segment ---------------------------------------------------------- */
static void test_quiet(void)
{
    bt_seg *seg = t_seg_new(cfg());
    bt_client *a = t_client(seg), *b = t_client(seg);
    uint32_t ra, rb;
    int32_t x[3], loose[2];

    bt_check_report rep = t_check_quiet(seg);
    T_EQ(rep.blocks_free, 63);
    T_EQ(rep.blocks_held, 0);
    T_OK(bt_row_claim(a, 1, -1, BT_ROW_MANAGED, &ra));
    T_OK(bt_row_alloc_append(a, ra, 0, 3, x));
    T_OK(bt_blocks_alloc(a, 0, 2, loose));
    T_OK(bt_row_claim(b, 2, -1, BT_ROW_MANAGED, &rb));
    T_OK(bt_row_append_shared(b, rb, x, 2));
    T_OK(bt_blocks_share(b, &loose[0], 1));
    rep = t_check_quiet(seg);
    T_EQ(rep.blocks_held, 5);           /* distinct blocks, not references */
    T_EQ(rep.blocks_free, 58);
    T_EQ(rep.clients_reaped, 0);
    T_EQ(rep.stuck_client, 0);
#ifdef BT_CHECK_FROZEN
    rep = check(seg, BT_CHECK_FROZEN);
    T_EQ(rep.blocks_held, 5);
    T_EQ(rep.blocks_free, 58);
    T_EQ(rep.leaked + rep.double_free + rep.refcnt_fixed + rep.rows_fixed + rep.bad_entries, 0);
#endif
    /* a repair of a healthy segment changes nothing but the generation */
    uint64_t gen = t_info(seg).generation;
    t_snap *s = t_snap_take(seg);
    rep = check(seg, BT_CHECK_REPAIR);
    T_EQ(rep.leaked + rep.double_free + rep.refcnt_fixed + rep.rows_fixed + rep.bad_entries, 0);
    T_EQ(rep.blocks_free, 58);
    T_EQ(rep.blocks_held, 5);
    T_EQ(rep.clients_reaped, 0);
    T_SAME(seg, s);
    T_ASSERT(t_info(seg).generation > gen);
    T_EQ(*freeze_word(seg), 0);
    t_check_quiet(seg);
    T_OK(bt_seg_check(seg, 0, 0, NULL));
    T_RC(bt_seg_check(NULL, 0, 0, &rep), BT_EINVAL);
    bt_client_close(a);
    bt_client_close(b);
    rep = t_check_quiet(seg);
    T_EQ(rep.blocks_free, 63);
    bt_seg_close(seg);
}

/* ---- leaks through the raw pool ------------------------------------------------ */
static void test_leak_repair(void)
{
    bt_seg *seg = t_seg_new(cfg());
    bt_client *a = t_client(seg);
    uint32_t ra;
    int32_t x[2], lost[3];
    T_OK(bt_row_claim(a, 1, -1, BT_ROW_MANAGED, &ra));
    T_OK(bt_row_alloc_append(a, ra, 0, 2, x));

    T_OK(bt_pool_pop(seg, 0, 3, 999, lost));     /* and never pushed */
    bt_check_report rep = check(seg, 0);
    print_rep("3 popped, read-only:", &rep);
    T_EQ(rep.leaked, 3);
    T_EQ(rep.double_free, 0);
    T_EQ(rep.rows_fixed, 0);
    T_EQ(rep.bad_entries, 0);
    T_EQ(t_free(seg, 0), 58);                    /* read-only changed nothing */
    T_EQ(t_refcnt(seg, lost[0]), 1);

    uint64_t gen = t_info(seg).generation;
    rep = check(seg, BT_CHECK_REPAIR);
    print_rep("3 popped, repaired:", &rep);
    T_EQ(rep.leaked, 3);
    T_EQ(rep.blocks_free, 61);
    T_EQ(rep.blocks_held, 2);
    T_ASSERT(t_info(seg).generation > gen);
    for (int i = 0; i < 3; i++)
        T_EQ(t_refcnt(seg, lost[i]), 0);
    T_EQ(t_free(seg, 0), 61);
    T_EQ(t_refcnt(seg, x[0]), 1);                /* the row kept its blocks */
    T_EQ(t_row(seg, ra, NULL, 0).num_blocks, 2);
    t_check_quiet(seg);
    drain_pool_and_give_back(seg, x, 2);
    T_END(seg, a);
}

/* bt.h: blocks_free counts blocks "on free lists", blocks_held those "with a
 * nonzero count". Three popped-and-lost blocks are on no free list and have
 * count 1: a read-only check must say free 60, held 3 (not free 63). */
static void test_leak_counts(void)
{
    bt_seg *seg = t_seg_new(cfg());
    int32_t lost[3];
    T_OK(bt_pool_pop(seg, 0, 3, 999, lost));
    bt_check_report rep = check(seg, 0);
    T_EQ(rep.leaked, 3);
    T_EQ(rep.blocks_free, 60);
    T_EQ(rep.blocks_held, 3);
    bt_seg_close(seg);
}

/* ---- scribbled rows and counts ------------------------------------------------- */
struct two_rows { bt_seg *seg; bt_client *a; uint32_t ra, rb; int32_t x[3], y[1]; };
static struct two_rows two_rows(void)
{
    struct two_rows t;
    bt_config c = cfg();
    t.seg = t_seg_embedded(&c);
    t.a = t_client(t.seg);
    T_OK(bt_row_claim(t.a, 1, 0, BT_ROW_MANAGED, &t.ra));
    T_OK(bt_row_claim(t.a, 2, 1, BT_ROW_MANAGED, &t.rb));
    T_OK(bt_row_alloc_append(t.a, t.ra, 0, 3, t.x));
    T_OK(bt_row_alloc_append(t.a, t.rb, 0, 1, t.y));
    t_check_quiet(t.seg);
    return t;
}
static void finish(struct two_rows *t)
{
    t_check_quiet(t->seg);
    bt_client_close(t->a);
    bt_check_report rep = t_check_quiet(t->seg);
    T_EQ(rep.blocks_free, 63);
    bt_seg_close(t->seg);
}

static void test_stale_tail(void)
{
    struct two_rows t = two_rows();
    *entry(t.seg, t.ra, 6) = t.y[0];             /* past num_blocks */
    bt_check_report rep = check(t.seg, 0);
    print_rep("stale tail, read-only:", &rep);
    T_ASSERT(rep.rows_fixed >= 1);
    rep = check(t.seg, BT_CHECK_REPAIR);
    T_ASSERT(rep.rows_fixed >= 1);
    T_EQ(*entry(t.seg, t.ra, 6), 0);
    T_EQ(t_row(t.seg, t.ra, NULL, 0).num_blocks, 3);
    T_EQ(t_refcnt(t.seg, t.y[0]), 1);
    finish(&t);
}

static void test_bad_entry(void)
{
    struct two_rows t = two_rows();
    *entry(t.seg, t.ra, 1) = 9999;               /* out of range */
    /* readers and slot mapping survive it */
    int64_t slots[64];
    bt_slot_params p = { 0 };
    T_OK(bt_slots_row(t.seg, &p, t.ra, 0, 64, slots));
    bt_check_report rep = check(t.seg, 0);
    print_rep("bad entry, read-only:", &rep);
    T_ASSERT(rep.bad_entries >= 1);
    rep = check(t.seg, BT_CHECK_REPAIR);
    T_ASSERT(rep.bad_entries >= 1);
    int32_t got[W];
    bt_row_info ri = t_row(t.seg, t.ra, got, W);
    for (uint32_t i = 0; i < ri.num_blocks; i++)
        T_ASSERT(got[i] > 0 && got[i] < 64);
    T_EQ(got[0], t.x[0]);
    T_EQ(t_refcnt(t.seg, t.x[0]), 1);
    finish(&t);
}

static void test_bad_count(void)
{
    struct two_rows t = two_rows();
    __atomic_store_n(nblocks_word(t.seg, t.ra), 100, __ATOMIC_RELAXED);   /* > width */
    int32_t got[W];
    bt_row_info ri;
    T_ERR(bt_row_read(t.seg, t.ra, got, W, &ri));
    int64_t slots[2000];
    bt_slot_params p = { 0 };
    T_OK(bt_slots_row(t.seg, &p, t.ra, 0, 2000, slots));      /* bounded, no stray read */
    bt_check_report rep = check(t.seg, 0);
    T_ASSERT(rep.rows_fixed >= 1);
    rep = check(t.seg, BT_CHECK_REPAIR);
    T_ASSERT(rep.rows_fixed >= 1);
    ri = t_row(t.seg, t.ra, got, W);
    T_ASSERT(ri.num_blocks <= W);
    for (uint32_t i = 0; i < ri.num_blocks; i++)
        T_ASSERT(got[i] > 0 && got[i] < 64);
    finish(&t);

    /* negative count */
    t = two_rows();
    __atomic_store_n(nblocks_word(t.seg, t.rb), -5, __ATOMIC_RELAXED);
    rep = check(t.seg, BT_CHECK_REPAIR);
    T_ASSERT(rep.rows_fixed >= 1);
    finish(&t);
}

/* A row names another row's block instead of its own. */
static void test_crossed_entry(void)
{
    struct two_rows t = two_rows();
    *entry(t.seg, t.ra, 2) = t.y[0];             /* x[2] lost, y[0] twice */
    bt_check_report rep = check(t.seg, 0);
    print_rep("crossed entry, read-only:", &rep);
    T_EQ(rep.refcnt_fixed, 2);
    T_EQ(rep.leaked, 1);
    rep = check(t.seg, BT_CHECK_REPAIR);
    T_EQ(t_refcnt(t.seg, t.y[0]), 2);
    T_EQ(t_refcnt(t.seg, t.x[2]), 0);
    T_EQ(t_free(t.seg, 0), 60);
    t_check_quiet(t.seg);
    /* releasing both rows frees y[0] once, at the second release */
    T_OK(bt_row_release(t.a, t.rb));
    T_EQ(t_refcnt(t.seg, t.y[0]), 1);
    T_OK(bt_row_release(t.a, t.ra));
    T_EQ(t_refcnt(t.seg, t.y[0]), 0);
    finish(&t);
}

/* A row names a block that is on the free list: the worst case, a block
 * that the next allocation would hand to someone else. */
static void test_free_block_in_row(void)
{
    struct two_rows t = two_rows();
    int32_t f;
    T_OK(bt_blocks_alloc(t.a, 0, 1, &f));
    T_OK(bt_blocks_release(t.a, &f, 1));          /* f is free again */
    *entry(t.seg, t.ra, 0) = f;
    bt_check_report rep = check(t.seg, 0);
    print_rep("free block in a row:", &rep);
    T_ASSERT(rep.double_free >= 1);
    rep = check(t.seg, BT_CHECK_REPAIR);
    T_EQ(t_refcnt(t.seg, f), 1);
    T_EQ(t_refcnt(t.seg, t.x[0]), 0);
    t_check_quiet(t.seg);
    int32_t held[4] = { f, t.x[1], t.x[2], t.y[0] };
    drain_pool_and_give_back(t.seg, held, 4);
    finish(&t);
}

/* Counts scribbled on directly (white-box). */
static void test_bad_refcounts(void)
{
    struct two_rows t = two_rows();
    __atomic_store_n(refcnt_word(t.seg, t.y[0]), 0u, __ATOMIC_RELAXED);   /* too low */
    __atomic_store_n(refcnt_word(t.seg, t.x[0]), 7u, __ATOMIC_RELAXED);   /* too high */
    bt_check_report rep = check(t.seg, 0);
    print_rep("bad refcounts, read-only:", &rep);
    T_EQ(rep.refcnt_fixed, 2);
    /* a release meeting a count of 0 must not wrap it or free anything twice */
    int32_t extra;
    T_OK(bt_blocks_alloc(t.a, 0, 1, &extra));
    T_ERR(bt_blocks_share(t.a, &t.y[0], 1));      /* count 0 reads as free */
    T_OK(bt_blocks_release(t.a, &extra, 1));
    rep = check(t.seg, BT_CHECK_REPAIR);
    T_EQ(rep.refcnt_fixed, 2);
    T_EQ(t_refcnt(t.seg, t.y[0]), 1);
    T_EQ(t_refcnt(t.seg, t.x[0]), 1);
    finish(&t);
}

/* A free list pointing out of its pool (white-box): allocation fails with
 * BT_ECORRUPT instead of handing out garbage; a repair rebuilds the lists. */
static void test_broken_free_list(void)
{
    struct two_rows t = two_rows();
    struct bt_pool *p = pool_ptr(t.seg, 0);
    uint64_t head = __atomic_load_n(&p->head, __ATOMIC_RELAXED);
    __atomic_store_n(&p->head, (head & ~0xffffffffull) | 0x0fffff00u, __ATOMIC_RELAXED);
    int32_t ids[4];
    T_ERR(bt_blocks_alloc(t.a, 0, 1, ids));
    T_ERR(bt_row_alloc_append(t.a, t.ra, 0, 1, ids));
    bt_check_report rep = check(t.seg, 0);
    T_ASSERT(rep.double_free >= 1 || rep.leaked >= 1);
    rep = check(t.seg, BT_CHECK_REPAIR);
    T_EQ(rep.blocks_free, 59);
    t_check_quiet(t.seg);
    int32_t held[4] = { t.x[0], t.x[1], t.x[2], t.y[0] };
    drain_pool_and_give_back(t.seg, held, 4);
    finish(&t);
}

/* ---- dead clients ------------------------------------------------------------------ */
/* A child attaches by name, takes rows, blocks and shares of the parent's
 * blocks, reports its client id and _exit()s without closing. */
static uint32_t dead_child(const char *name, const int32_t *share, int in_op)
{
    int fd[2];
    pid_t pid = t_fork_pipe(fd);
    if (pid == 0) {
        bt_seg *seg;
        uint32_t r1, r2;
        int32_t ids[4];
        close(fd[0]);
        T_OK(bt_seg_attach(name, &seg));
        bt_client *cl = t_client(seg);
        T_OK(bt_row_claim(cl, 1000, -1, BT_ROW_MANAGED, &r1));
        T_OK(bt_row_claim(cl, 1001, -1, BT_ROW_RAW, &r2));
        T_OK(bt_row_alloc_append(cl, r1, 0, 3, NULL));
        T_OK(bt_row_append_shared(cl, r1, share, 2));
        int32_t raw[2] = { 5, 6 };
        T_OK(bt_row_append(cl, r2, raw, 2));
        T_OK(bt_blocks_alloc(cl, 0, 2, ids));
        T_OK(bt_blocks_share(cl, &share[2], 1));
        uint32_t id = bt_client_id(cl);
        if (in_op) {
            /* died inside a call: a block popped but recorded nowhere */
            T_OK(bt_pool_pop(seg, 0, 1, id, ids));
            __atomic_store_n(&slot_ptr(seg, id)->in_op, 1u, __ATOMIC_SEQ_CST);
        }
        T_EQ(write(fd[1], &id, sizeof(id)), (ssize_t)sizeof(id));
        _exit(0);
    }
    close(fd[1]);
    uint32_t id = 0;
    T_EQ(read(fd[0], &id, sizeof(id)), (ssize_t)sizeof(id));
    close(fd[0]);
    t_wait_ok(pid, "dying child");
    T_ASSERT(id >= 1);
    return id;
}

/* The live client of the dead-client tests: it holds a managed row of three
 * fresh blocks (their ids in x), which the dead children share. */
static bt_client *holder_of_three(bt_seg *seg, int32_t x[3])
{
    bt_client *p = t_client(seg);
    uint32_t row;
    T_OK(bt_row_claim(p, 1, -1, BT_ROW_MANAGED, &row));
    T_OK(bt_row_alloc_append(p, row, 0, 3, x));
    return p;
}

static void test_dead_client(void)
{
    const char *name;
    bt_seg *seg = t_seg_new_named(cfg(), "chk", &name);
    int32_t x[3];
    bt_client *p = holder_of_three(seg, x);
    t_snap *before = t_snap_take(seg);

    uint32_t id = dead_child(name, x, 0);
    bt_client_slot_info si;
    T_OK(bt_client_slot_get(seg, id, &si));
    T_EQ(si.state, BT_CLIENT_ACTIVE);          /* nobody has noticed yet */
    T_EQ(si.rows, 2);
    T_EQ(si.hand_count, 3);
    T_EQ(t_free(seg, 0), 60 - 5);
    T_EQ(t_refcnt(seg, x[0]), 2);
    T_EQ(t_refcnt(seg, x[2]), 2);
    t_check_quiet(seg);                         /* consistent, just orphaned */

    /* not for live clients, nor out of range */
    bt_check_report rep;
    t_snap *s = t_snap_take(seg);
    T_RC(bt_seg_recover_client(seg, bt_client_id(p), 100, &rep), BT_EBUSY);
    T_RC(bt_seg_recover_client(seg, 0, 100, &rep), BT_ERANGE);
    T_RC(bt_seg_recover_client(seg, t_info(seg).config.max_clients + 1, 100, &rep), BT_ERANGE);
    T_SAME(seg, s);

    T_OK(bt_seg_recover_client(seg, id, 1000, &rep));
    print_rep("dead client recovered:", &rep);
    T_OK(bt_client_slot_get(seg, id, &si));
    T_EQ(si.state, BT_CLIENT_FREE);
    T_SAME(seg, before);                        /* as if the child never ran */
    t_check_quiet(seg);
    T_OK(bt_seg_recover_client(seg, id, 1000, &rep));   /* again: nothing to do */
    T_SAME(seg, before);

    /* a second one, found by a repairing check instead */
    id = dead_child(name, x, 0);
    T_EQ(t_free(seg, 0), 55);
    rep = check(seg, BT_CHECK_REPAIR);
    print_rep("dead client, repair:", &rep);
    T_ASSERT(rep.clients_reaped >= 1);
    T_OK(bt_client_slot_get(seg, id, &si));
    T_EQ(si.state, BT_CLIENT_FREE);
    T_SAME(seg, before);
    t_check_quiet(seg);

    /* one that died inside a call, with a popped block recorded nowhere */
    id = dead_child(name, x, 1);
    T_EQ(t_free(seg, 0), 54);
    T_OK(bt_seg_recover_client(seg, id, 1000, &rep));
    print_rep("died in a call, recovered:", &rep);
    T_OK(bt_client_slot_get(seg, id, &si));
    T_EQ(si.state, BT_CLIENT_FREE);
    T_SAME(seg, before);
    t_check_quiet(seg);
    drain_pool_and_give_back(seg, x, 3);

    T_END_NAMED(name, seg, p);
}

/* A live client that stays inside a call blocks a repair (BT_EBUSY, and it
 * is named); the segment is thawed again, and a dead client's recovery is
 * deferred to the next successful repair. */
static void test_stuck_client(void)
{
    const char *name;
    bt_seg *seg = t_seg_new_named(cfg(), "stk", &name);
    int32_t x[3];
    bt_client *p = holder_of_three(seg, x);
    t_snap *before = t_snap_take(seg);
    uint32_t dead = dead_child(name, x, 0);

    uint32_t *in_op = &slot_ptr(seg, bt_client_id(p))->in_op;
    __atomic_store_n(in_op, 1u, __ATOMIC_SEQ_CST);
    bt_check_report rep;
    uint64_t t0 = t_now_ns();
    T_RC(bt_seg_check(seg, BT_CHECK_REPAIR, 50, &rep), BT_EBUSY);
    T_EQ(rep.stuck_client, bt_client_id(p));
    T_ASSERT(t_now_ns() - t0 < 2000000000ull);
    T_EQ(*freeze_word(seg), 0);
    int rc = bt_seg_recover_client(seg, dead, 50, &rep);
    T_ASSERTF(rc == 0 || rc == BT_EBUSY, "recover: %s", bt_errname(rc));
    __atomic_store_n(in_op, 0u, __ATOMIC_SEQ_CST);
    int32_t one;
    T_OK(bt_blocks_alloc(p, 0, 1, &one));       /* thawed */
    T_OK(bt_blocks_release(p, &one, 1));
    if (rc == BT_EBUSY) {
        bt_client_slot_info si;
        T_OK(bt_client_slot_get(seg, dead, &si));
        T_ASSERT(si.state != BT_CLIENT_FREE);
        rep = check(seg, BT_CHECK_REPAIR);
        T_ASSERT(rep.clients_reaped >= 1);
    }
    T_SAME(seg, before);
    T_END_NAMED(name, seg, p);
}

/* A client died inside a call with a block named by both its row and its
 * hand (between an append and the hand's drop), while a live client is stuck
 * in a call. Recovery is deferred, maybe again and again; the dead client's
 * hand must never be released lock-free afterwards, or a block the live
 * client has since been handed would be freed under it. */
static void test_deferred_recovery_keeps_hand(void)
{
    const char *name;
    bt_seg *seg = t_seg_new_named(cfg(), "dfr", &name);
    bt_client *p = t_client(seg);
    int fd[2];
    pid_t pid = t_fork_pipe(fd);
    if (pid == 0) {
        bt_seg *cs;
        uint32_t r;
        int32_t b;
        close(fd[0]);
        T_OK(bt_seg_attach(name, &cs));
        bt_client *cl = t_client(cs);
        T_OK(bt_row_claim(cl, 7, -1, BT_ROW_MANAGED, &r));
        T_OK(bt_blocks_alloc(cl, 0, 1, &b));
        T_OK(bt_row_append(cl, r, &b, 1));
        uint32_t id = bt_client_id(cl);
        struct bt_cslot *sl = slot_ptr(cs, id);
        uint32_t *hand = (uint32_t *)(base_of(cs) + region(cs, BT_R_HANDS)) +
                         (uint64_t)(id - 1) * t_info(cs).config.hand_size;
        hand[0] = (uint32_t)b;                      /* the hand still names it */
        __atomic_store_n(&sl->hand_count, 1u, __ATOMIC_SEQ_CST);
        __atomic_store_n(&sl->in_op, 1u, __ATOMIC_SEQ_CST);
        T_EQ(write(fd[1], &id, sizeof(id)), (ssize_t)sizeof(id));
        _exit(0);
    }
    close(fd[1]);
    uint32_t dead = 0;
    T_EQ(read(fd[0], &dead, sizeof(dead)), (ssize_t)sizeof(dead));
    close(fd[0]);
    t_wait_ok(pid, "dying child");
    uint32_t *in_op = &slot_ptr(seg, bt_client_id(p))->in_op;
    __atomic_store_n(in_op, 1u, __ATOMIC_SEQ_CST);     /* p is "stuck" */
    bt_check_report rep;
    T_RC(bt_seg_recover_client(seg, dead, 20, &rep), BT_EBUSY);
    __atomic_store_n(in_op, 0u, __ATOMIC_SEQ_CST);
    int32_t mine[8];                                    /* p takes blocks, */
    T_OK(bt_blocks_alloc(p, 0, 8, mine));               /* the dead row's among them */
    __atomic_store_n(in_op, 1u, __ATOMIC_SEQ_CST);
    T_RC(bt_seg_recover_client(seg, dead, 20, &rep), BT_EBUSY);
    __atomic_store_n(in_op, 0u, __ATOMIC_SEQ_CST);
    T_OK(bt_seg_recover_client(seg, dead, 1000, &rep));
    for (int i = 0; i < 8; i++) {
        uint32_t rc1;
        T_OK(bt_block_get(seg, mine[i], &rc1, NULL));
        T_EQ(rc1, 1u);
    }
    T_OK(bt_blocks_release(p, mine, 8));
    T_END_NAMED(name, seg, p);
}

/* The freeze word names a sweeper that died: calls fail fast with
 * BT_EFROZEN, and a repairing check takes the freeze over and thaws. */
static void test_dead_sweeper(void)
{
    bt_seg *seg = t_seg_new_shared(cfg());
    bt_client *p = t_client(seg);
    pid_t pid = fork();
    T_ASSERT(pid >= 0);
    if (pid == 0)
        _exit(0);
    t_wait_ok(pid, "short-lived child");
    __atomic_store_n(freeze_word(seg), (uint64_t)pid, __ATOMIC_SEQ_CST);
    int32_t id;
    uint64_t t0 = t_now_ns();
    T_RC(bt_blocks_alloc(p, 0, 1, &id), BT_EFROZEN);
    uint64_t dt = t_now_ns() - t0;
    T_ASSERTF(dt < 1000000000ull, "BT_EFROZEN took %" PRIu64 " ms", dt / 1000000);
    T_EQ(t_free(seg, 0), 63);
    check(seg, BT_CHECK_REPAIR);
    T_EQ(*freeze_word(seg), 0);
    T_OK(bt_blocks_alloc(p, 0, 1, &id));
    T_END_SHARED(seg, p);
}

/* Every data-path write honours the freeze word: while a (dead) sweeper
 * holds it, bt_row_set_tokens must refuse like the others, not write the row
 * under a repair (test_mt_stress sees such repairs find a row mid-write). */
static void test_frozen_tokens(void)
{
    bt_seg *seg = t_seg_new_shared(cfg());
    bt_client *p = t_client(seg);
    uint32_t row;
    T_OK(bt_row_claim(p, 1, -1, BT_ROW_MANAGED, &row));
    T_OK(bt_row_set_tokens(p, row, 10));
    pid_t pid = fork();
    T_ASSERT(pid >= 0);
    if (pid == 0)
        _exit(0);
    t_wait_ok(pid, "short-lived child");
    __atomic_store_n(freeze_word(seg), (uint64_t)pid, __ATOMIC_SEQ_CST);
    T_RC(bt_row_truncate(p, row, 0), BT_EFROZEN);
    T_RC(bt_row_set_tokens(p, row, 20), BT_EFROZEN);
    T_EQ(t_row(seg, row, NULL, 0).num_tokens, 10);
    __atomic_store_n(freeze_word(seg), 0ull, __ATOMIC_SEQ_CST);
    T_END_SHARED(seg, p);
}

int main(int argc, char **argv)
{
    t_init(argc, argv);
    T_RUN(test_quiet);
    T_RUN(test_leak_repair);
    T_RUN(test_stale_tail);
    T_RUN(test_bad_entry);
    T_RUN(test_bad_count);
    T_RUN(test_crossed_entry);
    T_RUN(test_free_block_in_row);
    T_RUN(test_bad_refcounts);
    T_RUN(test_broken_free_list);
    T_RUN(test_dead_client);
    T_RUN(test_stuck_client);
    T_RUN(test_deferred_recovery_keeps_hand);
    T_RUN(test_dead_sweeper);
    T_RUN(test_frozen_tokens);
    T_RUN(test_leak_counts);                 /* last: a reporting question, see there */
    return t_done();
}
