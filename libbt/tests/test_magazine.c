/*
 * test_magazine.c -- the client's magazine of free blocks (client.c): what it
 * caches counts as free, every block comes back exactly once however its
 * client ends (close, death outside a call, death inside a refill, a flush
 * or a take), a repair empties it, and a scribbled one is refused, not
 * trusted.
 *
 * "Exactly once" is checked the hard way: after the recovery every block of
 * the pool is popped raw, and each must come out once and the pool then be
 * dry (a block on a list twice would come out twice, one lost would not).
 */
#include <stddef.h>
#include <sys/wait.h>
#include "bt_test.h"
#include "bt_layout.h"

#define BPP 2048u                       /* with 4 clients: magazines of 64 */

static bt_config cfg(void)
{
    bt_config c = t_config_small();
    c.blocks_per_pool = BPP;
    c.hand_size = 256;
    return c;
}

static uint8_t *base_of(const bt_seg *seg) { return bt_seg_base(seg); }
static uint64_t region(const bt_seg *seg, int r)
{
    uint64_t v;
    memcpy(&v, base_of(seg) + offsetof(struct bt_header, off) + 8 * (size_t)r, 8);
    return v;
}
static struct bt_cslot *slot_ptr(const bt_seg *seg, uint32_t id)
{
    return (struct bt_cslot *)(base_of(seg) + region(seg, BT_R_CLIENTS)) + (id - 1);
}
static uint32_t *refcnt_word(const bt_seg *seg, int32_t id)
{
    return (uint32_t *)(base_of(seg) + region(seg, BT_R_REFCNT)) + id;
}
static uint32_t mag_of(const bt_seg *seg, uint32_t id)
{
    bt_client_slot_info si;
    T_OK(bt_client_slot_get(seg, id, &si));
    return si.magazine;
}

/* Every block of pool 0 comes out of the stack once, then it is dry; then
 * all go back. Only on a quiet segment with no magazine holding any. */
static void every_block_once(bt_seg *seg)
{
    static int32_t ids[BPP];
    static uint8_t seen[BPP];
    memset(seen, 0, sizeof(seen));
    T_OK(bt_pool_pop(seg, 0, BPP - 1, 7, ids));
    for (uint32_t i = 0; i < BPP - 1; i++) {
        T_ASSERT(ids[i] > 0 && (uint32_t)ids[i] < BPP);
        T_ASSERTF(!seen[ids[i]], "block %d came out twice", ids[i]);
        seen[ids[i]] = 1;
    }
    int32_t one;
    T_RC(bt_pool_pop(seg, 0, 1, 7, &one), BT_ENOBLOCKS);
    T_OK(bt_pool_push(seg, ids, BPP - 1));
    T_EQ(t_free(seg, 0), BPP - 1);
}

static void test_cached_blocks_are_free(void)
{
    bt_config c = cfg();
    bt_seg *seg = t_seg_embedded(&c);
    bt_client *cl = t_client(seg);
    uint32_t id = bt_client_id(cl);
    int32_t ids[16];
    T_OK(bt_blocks_alloc(cl, 0, 16, ids));
    /* one refill: 16 and half a magazine off the stack, 16 handed out */
    T_EQ(mag_of(seg, id), 32);
    T_EQ(t_free(seg, 0), BPP - 1 - 16);
    for (int i = 0; i < 16; i++) {
        T_EQ(t_refcnt(seg, ids[i]), 1);
        uint32_t owner;
        T_OK(bt_block_get(seg, ids[i], NULL, &owner));
        T_EQ(owner, id);
    }
    bt_check_report rep = t_check_quiet(seg);
    T_EQ(rep.blocks_held, 16);
    T_OK(bt_blocks_release(cl, ids, 16));
    T_EQ(mag_of(seg, id), 48);
    T_EQ(t_free(seg, 0), BPP - 1);
    t_check_quiet(seg);
    /* the magazine is LIFO: the blocks just released come back first */
    int32_t again[16];
    T_OK(bt_blocks_alloc(cl, 0, 16, again));
    for (int i = 0; i < 16; i++)
        T_EQ(again[i], ids[15 - i]);
    T_OK(bt_blocks_release(cl, again, 16));
    bt_client_close(cl);
    every_block_once(seg);
    t_check_quiet(seg);
    bt_seg_close(seg);
}

/* Releases past the capacity flush half of it; allocations past it refill;
 * a batch larger than half a magazine goes straight to the stack. */
static void test_overflow_and_big_batches(void)
{
    bt_config c = cfg();
    bt_seg *seg = t_seg_embedded(&c);
    bt_client *cl = t_client(seg);
    uint32_t id = bt_client_id(cl);
    static int32_t held[240];
    for (int k = 0; k < 15; k++)
        T_OK(bt_blocks_alloc(cl, 0, 16, held + 16 * k));
    T_ASSERT(mag_of(seg, id) <= BT_MAG_MAX);
    t_check_quiet(seg);
    for (int k = 0; k < 15; k++) {
        T_OK(bt_blocks_release(cl, held + 16 * k, 16));
        T_ASSERT(mag_of(seg, id) <= BT_MAG_MAX);
        T_EQ(t_free(seg, 0), BPP - 1 - 16 * (14 - k));
    }
    t_check_quiet(seg);
    uint32_t before = mag_of(seg, id);
    T_OK(bt_blocks_alloc(cl, 0, 200, held));        /* > half: the stack */
    T_EQ(mag_of(seg, id), before);
    T_OK(bt_blocks_release(cl, held, 200));
    t_check_quiet(seg);
    bt_client_close(cl);
    every_block_once(seg);
    bt_seg_close(seg);
}

/* A magazine holds one pool's blocks: allocating from another sends them
 * back to their stack first. */
static void test_two_pools(void)
{
    bt_config c = cfg();
    c.num_pools = 2;
    bt_seg *seg = t_seg_embedded(&c);
    bt_client *cl = t_client(seg);
    int32_t a[8], b[8];
    T_OK(bt_blocks_alloc(cl, 0, 8, a));
    T_OK(bt_blocks_alloc(cl, 1, 8, b));
    for (int i = 0; i < 8; i++)
        T_ASSERT((uint32_t)b[i] >= BPP && (uint32_t)b[i] < 2 * BPP);
    T_EQ(t_free(seg, 0), BPP - 1 - 8);
    T_EQ(t_free(seg, 1), BPP - 8);
    int32_t mixed[16];
    memcpy(mixed, a, sizeof(a));
    memcpy(mixed + 8, b, sizeof(b));
    T_OK(bt_blocks_release(cl, mixed, 16));
    T_EQ(t_free(seg, 0), BPP - 1);
    T_EQ(t_free(seg, 1), BPP);
    t_check_quiet(seg);
    bt_client_close(cl);
    bt_check_report rep = t_check_quiet(seg);
    T_EQ(rep.blocks_free, 2 * BPP - 1);
    bt_seg_close(seg);
}

/* Two clients: blocks in one's magazine are not there for the other (the
 * free count says they are free), but a client finding the stack short gives
 * its magazine back at its next release, and refills with no more than it
 * needs. */
static void test_short_stack(void)
{
    bt_config c = cfg();
    bt_seg *seg = t_seg_embedded(&c);
    bt_client *a = t_client(seg), *b = t_client(seg);
    static int32_t big[BPP];
    int32_t x[16], y[4];
    T_OK(bt_blocks_alloc(a, 0, 16, x));
    T_OK(bt_blocks_release(a, x, 16));
    uint32_t cached = mag_of(seg, bt_client_id(a));
    T_EQ(cached, 48);
    T_EQ(t_free(seg, 0), BPP - 1);
    uint32_t on_stack = BPP - 1 - cached;
    T_OK(bt_pool_pop(seg, 0, on_stack, 9, big));    /* someone takes the whole stack */
    T_EQ(t_free(seg, 0), cached);
    T_RC(bt_blocks_alloc(b, 0, 1, y), BT_ENOBLOCKS);   /* a's are out of b's reach */
    T_OK(bt_blocks_alloc(a, 0, 16, x));             /* a's own serve a */
    T_OK(bt_blocks_release(a, x, 16));              /* the stack is short: all back */
    T_EQ(mag_of(seg, bt_client_id(a)), 0);
    T_OK(bt_blocks_alloc(b, 0, 4, y));
    T_EQ(mag_of(seg, bt_client_id(b)), 0);          /* short: just what it needs */
    T_EQ(t_free(seg, 0), cached - 4);
    T_OK(bt_blocks_release(b, y, 4));
    T_OK(bt_pool_push(seg, big, on_stack));
    /* One client alone gets every free block, its own cached ones included,
     * whatever the batch (larger than half a magazine: off the stack). */
    T_OK(bt_blocks_alloc(a, 0, 16, x));
    T_OK(bt_blocks_release(a, x, 16));
    cached = mag_of(seg, bt_client_id(a));
    T_ASSERT(cached >= 40);
    on_stack = BPP - 1 - cached;
    T_OK(bt_pool_pop(seg, 0, on_stack - 10, 9, big));   /* 10 left on the stack */
    int32_t z[64];
    T_OK(bt_blocks_alloc(a, 0, cached + 10, z));
    T_EQ(t_free(seg, 0), 0);
    T_OK(bt_blocks_release(a, z, cached + 10));
    T_OK(bt_pool_push(seg, big, on_stack - 10));
    t_check_quiet(seg);
    bt_client_close(a);
    bt_client_close(b);
    every_block_once(seg);
    bt_seg_close(seg);
}

/* What a client's rows let go of inside its calls (a row released, cut)
 * goes to its magazine too; its close sends everything back. */
static void test_rows_release_to_magazine(void)
{
    bt_config c = cfg();
    bt_seg *seg = t_seg_embedded(&c);
    bt_client *a = t_client(seg);
    uint32_t id = bt_client_id(a), row;
    T_OK(bt_row_claim(a, 1, -1, BT_ROW_MANAGED, &row));
    T_OK(bt_row_alloc_append(a, row, 0, 8, NULL));
    T_EQ(mag_of(seg, id), 32);
    T_OK(bt_row_truncate(a, row, 2));
    T_EQ(mag_of(seg, id), 38);
    T_EQ(t_free(seg, 0), BPP - 1 - 2);
    t_check_quiet(seg);
    T_OK(bt_row_release(a, row));
    T_EQ(mag_of(seg, id), 40);
    T_EQ(t_free(seg, 0), BPP - 1);
    t_check_quiet(seg);
    bt_client_close(a);
    every_block_once(seg);
    bt_seg_close(seg);
}

/* ---- deaths ----------------------------------------------------------------- */

enum { OUTSIDE, MID_REFILL, MID_REFILL_RECORDED, MID_FLUSH, MID_TAKE, MID_TAKE_IN_HAND };
static const char *how_name[] = { "outside a call", "mid-refill (popped, unrecorded)",
    "mid-refill (recorded)", "mid-flush (count dropped, not pushed)",
    "mid-take (counts set)", "mid-take (in the hand too)" };

/* A child opens a client, fills its magazine, holds 8 loose blocks, then
 * dies as `how` says: white-box, the state a SIGKILL at that point of
 * client.c would leave. */
static uint32_t child_dies(bt_seg *seg, int how)
{
    uint32_t *box = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    T_ASSERT(box != MAP_FAILED);
    pid_t pid = fork();
    T_ASSERT(pid >= 0);
    if (pid == 0) {
        t_timeout(30);
        bt_client *cl = t_client(seg);
        uint32_t id = bt_client_id(cl);
        int32_t ids[16];
        T_OK(bt_blocks_alloc(cl, 0, 16, ids));
        T_OK(bt_blocks_release(cl, ids, 16));
        T_OK(bt_blocks_alloc(cl, 0, 8, ids));       /* 8 in the hand, 40 cached */
        uint32_t row;
        T_OK(bt_row_claim(cl, 1, -1, BT_ROW_MANAGED, &row));
        T_OK(bt_row_alloc_append(cl, row, 0, 4, NULL));  /* 4 in a row, 36 cached */
        struct bt_cslot *sl = slot_ptr(seg, id);
        uint32_t c = sl->mag_count;
        T_EQ(c, 36);
        if (how != OUTSIDE)
            __atomic_store_n(&sl->in_op, 1u, __ATOMIC_SEQ_CST);
        if (how == MID_REFILL || how == MID_REFILL_RECORDED) {
            int32_t more[16];
            T_OK(bt_pool_pop(seg, 0, 16, id, more));
            for (int i = 0; i < 16; i++) {
                *refcnt_word(seg, more[i]) = 0;
                sl->mag[c + i] = (uint32_t)more[i];
            }
            if (how == MID_REFILL_RECORDED)
                sl->mag_count = c + 16;
        } else if (how == MID_FLUSH) {
            sl->mag_count = c / 2;
        } else if (how == MID_TAKE || how == MID_TAKE_IN_HAND) {
            for (uint32_t i = c - 4; i < c; i++) {
                *refcnt_word(seg, (int32_t)sl->mag[i]) = 1;
                if (how == MID_TAKE_IN_HAND) {
                    uint32_t *hand = (uint32_t *)(base_of(seg) + region(seg, BT_R_HANDS)) +
                                     (uint64_t)(id - 1) * 256;
                    hand[sl->hand_count++] = sl->mag[i];
                }
            }
        }
        box[0] = id;
        _exit(0);
    }
    t_wait_ok(pid, "dying child");
    uint32_t id = box[0];
    munmap(box, 4096);
    return id;
}

static void test_deaths(void)
{
    bt_config c = cfg();
    for (int how = OUTSIDE; how <= MID_TAKE_IN_HAND; how++) {
        bt_seg *seg = t_seg_shared(&c);
        bt_client *live = t_client(seg);            /* a survivor with a magazine of its own */
        int32_t mine[16];
        T_OK(bt_blocks_alloc(live, 0, 16, mine));
        uint32_t id = child_dies(seg, how);
        bt_check_report rep;
        int rc = bt_seg_recover_client(seg, id, 2000, &rep);
        T_ASSERTF(rc == 0, "%s: recover returned %s", how_name[how], bt_errname(rc));
        bt_client_slot_info si;
        T_OK(bt_client_slot_get(seg, id, &si));
        T_EQ(si.state, BT_CLIENT_FREE);
        T_EQ(si.magazine, 0);
        /* outside a call: lock-free, the survivor's magazine untouched;
         * inside: a repair, which empties it into the rebuilt lists */
        T_EQ(mag_of(seg, bt_client_id(live)), how == OUTSIDE ? 32u : 0u);
        T_EQ(t_free(seg, 0), BPP - 1 - 16);
        t_check_quiet(seg);
        int32_t more[16];                           /* the survivor goes on */
        T_OK(bt_blocks_alloc(live, 0, 16, more));
        T_OK(bt_blocks_release(live, more, 16));
        T_OK(bt_blocks_release(live, mine, 16));
        bt_client_close(live);
        t_check_quiet(seg);
        every_block_once(seg);
        t_seg_shared_close(seg);
    }
}

/* A repair (any process's) empties live clients' magazines; a frozen check
 * counts them as free and changes nothing. */
static void test_checks_and_repair(void)
{
    bt_config c = cfg();
    bt_seg *seg = t_seg_embedded(&c);
    bt_client *a = t_client(seg), *b = t_client(seg);
    int32_t x[16], y[8];
    T_OK(bt_blocks_alloc(a, 0, 16, x));
    T_OK(bt_blocks_alloc(b, 0, 8, y));
    bt_check_report rep;
    T_OK(bt_seg_check(seg, BT_CHECK_FROZEN, 1000, &rep));
    T_EQ(rep.leaked + rep.double_free + rep.refcnt_fixed + rep.bad_entries, 0);
    T_EQ(rep.blocks_held, 24);
    T_EQ(rep.blocks_free, BPP - 1 - 24);
    T_EQ(mag_of(seg, bt_client_id(a)), 32);
    T_OK(bt_seg_check(seg, BT_CHECK_REPAIR, 1000, &rep));
    T_EQ(rep.leaked + rep.double_free + rep.refcnt_fixed + rep.bad_entries, 0);
    T_EQ(mag_of(seg, bt_client_id(a)), 0);
    T_EQ(mag_of(seg, bt_client_id(b)), 0);
    T_EQ(t_free(seg, 0), BPP - 1 - 24);
    t_check_quiet(seg);
    T_OK(bt_blocks_release(a, x, 16));
    T_OK(bt_blocks_release(b, y, 8));
    bt_client_close(a);
    bt_client_close(b);
    every_block_once(seg);
    bt_seg_close(seg);
}

/* A scribbled magazine: its client's next alloc refuses it (BT_ECORRUPT)
 * and lets go of it, a check reports it, a repair mends it. */
static void test_scribbled(void)
{
    bt_config c = cfg();
    for (int kind = 0; kind < 4; kind++) {
        bt_seg *seg = t_seg_embedded(&c);
        bt_client *a = t_client(seg);
        int32_t x[16];
        T_OK(bt_blocks_alloc(a, 0, 16, x));
        T_OK(bt_blocks_release(a, x, 16));          /* 48 cached */
        struct bt_cslot *sl = slot_ptr(seg, bt_client_id(a));
        uint32_t top = sl->mag_count - 1;
        if (kind == 0)
            sl->mag_count = 1000;                   /* past the capacity */
        else if (kind == 1)
            sl->mag[top] = 5 * BPP;                 /* out of the segment */
        else if (kind == 2)
            sl->mag[top] = sl->mag[top - 1];        /* twice in it */
        else
            sl->mag_pool = 7;                       /* no such pool */
        bt_check_report rep;
        T_OK(bt_seg_check(seg, 0, 0, &rep));
        T_ASSERTF(rep.bad_entries + rep.double_free + rep.leaked > 0, "kind %d unseen", kind);
        T_RC(bt_blocks_alloc(a, 0, 4, x), BT_ECORRUPT);
        T_OK(bt_seg_check(seg, BT_CHECK_REPAIR, 1000, &rep));
        t_check_quiet(seg);
        T_OK(bt_blocks_alloc(a, 0, 16, x));
        T_OK(bt_blocks_release(a, x, 16));
        bt_client_close(a);
        every_block_once(seg);
        bt_seg_close(seg);
    }
}

/* Random poison in a live client's magazine words, then calls of every kind
 * through it and another client: never an access outside the segment (the
 * asan build watches), and after a repair the segment is exact again and
 * every block comes out once. */
static void test_scribbled_random(void)
{
    bt_config c = cfg();
    uint64_t rnd = t_substream(11), deadline = t_now_ns() + 1000000000ull;
    uint32_t it;
    for (it = 0; it < 3000 && t_now_ns() < deadline; it++) {
        bt_seg *seg = t_seg_embedded(&c);
        bt_client *a = t_client(seg), *b = t_client(seg);
        int32_t x[40], y[16];
        T_OK(bt_blocks_alloc(a, 0, 16, x));
        T_OK(bt_blocks_release(a, x, 8));           /* a: 8 loose, a full-ish magazine */
        struct bt_cslot *sl = slot_ptr(seg, bt_client_id(a));
        for (uint32_t k = 1 + t_below(&rnd, 4); k-- > 0;) {
            uint32_t v, w = t_below(&rnd, BT_MAG_MAX + 2);
            switch (t_below(&rnd, 6)) {
            case 0: v = 0xffffffffu; break;
            case 1: v = BPP + t_below(&rnd, 4); break;
            case 2: v = t_below(&rnd, 80); break;
            case 3: v = sl->mag[t_below(&rnd, BT_MAG_MAX)]; break;   /* a repeat */
            case 4: v = (uint32_t)x[t_below(&rnd, 8)]; break;        /* a held block */
            default: v = (uint32_t)t_rand(&rnd); break;
            }
            if (w == BT_MAG_MAX)
                sl->mag_count = v;
            else if (w == BT_MAG_MAX + 1)
                sl->mag_pool = v;
            else
                sl->mag[w] = v;
        }
        (void)bt_blocks_alloc(a, 0, 1 + t_below(&rnd, 30), x + 8);
        (void)bt_blocks_alloc(b, 0, 1 + t_below(&rnd, 16), y);
        uint32_t fc;
        T_OK(bt_pool_free_count(seg, 0, &fc));
        T_ASSERT(fc <= BPP);
        bt_check_report rep;
        T_OK(bt_seg_check(seg, 0, 0, &rep));
        T_OK(bt_seg_check(seg, BT_CHECK_REPAIR, 1000, &rep));
        t_check_quiet(seg);
        bt_client_close(a);
        bt_client_close(b);
        t_check_quiet(seg);
        every_block_once(seg);
        bt_seg_close(seg);
    }
    printf("%u scribbled magazines repaired\n", it);
}

int main(int argc, char **argv)
{
    t_init(argc, argv);
    T_RUN(test_cached_blocks_are_free);
    T_RUN(test_overflow_and_big_batches);
    T_RUN(test_two_pools);
    T_RUN(test_short_stack);
    T_RUN(test_rows_release_to_magazine);
    T_RUN(test_deaths);
    T_RUN(test_checks_and_repair);
    T_RUN(test_scribbled);
    T_RUN(test_scribbled_random);
    return t_done();
}
