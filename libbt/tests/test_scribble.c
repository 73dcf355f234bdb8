/*
 * test_scribble.c -- a process that scribbles on the segment can make calls
 * fail, never make libbt read or write outside the segment (bt.h), and a
 * repairing check leaves a consistent segment whatever was scribbled.
 *
 * A populated segment is copied into a heap buffer of exactly its size (so
 * AddressSanitizer sees any access past it), attached, and random words past
 * the header are overwritten with plausible poison (0, -1, ids just out of
 * range, huge counts); then every kind of call is made. Return codes are not
 * judged here, only memory safety and termination. The header itself
 * (sizeof(struct bt_header), white-box) is covered by test_segment; its hot
 * words (freeze) would only make calls wait.
 *
 * Deterministic for a seed (BT_TEST_SEED); BT_STRESS_SECONDS bounds each part.
 */
#include "bt_test.h"
#include "bt_layout.h"

static bt_config cfg(void)
{
    bt_config c = t_config(2, 48, 8, 8);
    c.max_clients = 6;
    c.hand_size = 16;
    c.chunk_size = 4;                   /* paged rows too */
    c.num_chunks = 8;
    c.dir_width = 4;
    return c;
}

static uint8_t *pristine;
static bt_client *volatile kept[2];
static uint64_t seg_size, hdr_size;

/* A segment in use: two clients with rows, shares and loose blocks. */
static void make_pristine(void)
{
    bt_seg *seg = t_seg_new(cfg());
    bt_client *a = t_client(seg), *b = t_client(seg);
    uint32_t r;
    int32_t x[4], y[4];
    T_OK(bt_row_claim(a, 1, -1, BT_ROW_MANAGED, &r));
    T_OK(bt_row_alloc_append(a, r, 0, 4, x));
    T_OK(bt_row_claim(b, 2, -1, BT_ROW_MANAGED, &r));
    T_OK(bt_row_append_shared(b, r, x, 2));
    T_OK(bt_row_alloc_append(b, r, 1, 3, NULL));
    T_OK(bt_row_claim(b, 3, -1, BT_ROW_RAW, &r));
    T_OK(bt_row_append(b, r, x, 3));
    T_OK(bt_blocks_alloc(a, 1, 4, y));
    T_OK(bt_blocks_share(b, y, 2));
    T_OK(bt_row_claim(a, 4, -1, BT_ROW_PAGED, &r));
    T_OK(bt_row_alloc_append(a, r, 0, 6, NULL));
    T_OK(bt_row_punch(a, r, 1, 3));
    T_OK(bt_row_set_block(a, r, 12, y[3]));
    T_OK(bt_row_claim(b, 5, -1, BT_ROW_PAGED | BT_ROW_RAW, &r));
    T_OK(bt_row_append(b, r, x, 3));
    seg_size = t_info(seg).size;
    pristine = aligned_alloc(4096, seg_size);
    T_ASSERT(pristine);
    memcpy(pristine, bt_seg_base(seg), seg_size);
    hdr_size = sizeof(struct bt_header);
    /* the handles are dropped, not closed: the slots stay ACTIVE with our
     * (live) pid and keep their holdings (kept reachable for LeakSanitizer) */
    kept[0] = a;
    kept[1] = b;
    bt_seg_close(seg);
}

static uint32_t poison(uint64_t *rnd, uint32_t old, uint64_t total)
{
    switch (t_below(rnd, 12)) {
    case 0: return 0;
    case 1: return 0xffffffffu;
    case 2: return (uint32_t)total;
    case 3: return (uint32_t)total - 1;
    case 4: return (uint32_t)total + t_below(rnd, 100);
    case 5: return 0x7fffffffu;
    case 6: return 0x80000000u;
    case 7: return old + 1;
    case 8: return old - 1;
    case 9: return old ^ (1u << t_below(rnd, 32));
    case 10: return t_below(rnd, 16);
    default: return (uint32_t)t_rand(rnd);
    }
}

/* The last scribble, for the failure message: which region, which word. */
struct scrib { uint64_t off; uint32_t was, now; };
static struct scrib last[8];
static uint32_t nlast;

static const char *where(uint64_t off)
{
    static const char *const names[] = {
        "pools", "next", "refcnt", "owner", "rows", "table", "nblocks", "ntokens", "clients",
        "hands", "mirrors", "synced", "cpool", "cnext", "chunks", "dir",
        "cache", "cblocks", "ckeys", "cbuckets",
    };
    static char buf[64];
    const struct bt_header *h = (const struct bt_header *)pristine;
    int best = -1;
    for (int r = 0; r < BT_R_COUNT; r++)
        if (h->off[r] <= off && (best < 0 || h->off[r] >= h->off[best]))
            best = r;
    if (best < 0)
        snprintf(buf, sizeof(buf), "header +%" PRIu64, off);
    else
        snprintf(buf, sizeof(buf), "%s +%" PRIu64,
                 best < (int)(sizeof(names) / sizeof(names[0])) ? names[best] : "region",
                 off - h->off[best]);
    return buf;
}

static const char *last_scribble(void)
{
    static char buf[600];
    size_t n = 0;
    for (uint32_t k = 0; k < nlast && n < sizeof(buf) - 80; k++)
        n += (size_t)snprintf(buf + n, sizeof(buf) - n, "%s%s: %#x -> %#x", k ? "; " : "",
                              where(last[k].off), last[k].was, last[k].now);
    return buf;
}

static void scribble(uint8_t *mem, uint64_t *rnd, uint32_t words, uint64_t total)
{
    nlast = 0;
    for (uint32_t k = 0; k < words; k++) {
        uint64_t off = hdr_size + 4 * (uint64_t)t_below(rnd, (uint32_t)((seg_size - hdr_size) / 4));
        uint32_t v, was;
        memcpy(&was, mem + off, 4);
        v = poison(rnd, was, total);
        memcpy(mem + off, &v, 4);
        if (nlast < 8)
            last[nlast++] = (struct scrib){ off, was, v };
    }
}

/* Every kind of call, arguments mostly sensible, results ignored. Slot
 * mapping has its own test (test_scribble_slots) so that its known UBSan
 * finding does not hide the rest. */
static int with_slots;
static void calls(bt_seg *seg, bt_client *cl, uint64_t *rnd, uint64_t total)
{
    int32_t ids[16], got[16];
    int64_t slots[64], pos[16];
    uint32_t rows[4] = { 0, 1, 2, 3 }, nn[4] = { 1, 1, 0, 2 }, r = 0, u;
    bt_slot_params sp = { 0 };
    bt_row_info ri;
    bt_check_report rep;
    bt_client_slot_info si;
    for (int i = 0; i < 16; i++) {
        ids[i] = (int32_t)t_below(rnd, (uint32_t)total + 4) - 2;
        pos[i] = (int64_t)t_below(rnd, 200) - 5;
    }
    for (int k = 0; k < 24; k++) {
        uint32_t n = 1 + t_below(rnd, 4), row = t_below(rnd, 9);
        uint32_t op = t_below(rnd, 25);
        if (op >= 14 && op <= 16 && !with_slots)
            op = 13;
        switch (op) {
        case 0: bt_blocks_alloc(cl, t_below(rnd, 2), n, ids); break;
        case 1: bt_blocks_release(cl, ids, n); break;
        case 2: bt_blocks_share(cl, ids, n); break;
        case 3: bt_row_claim(cl, 9, t_below(rnd, 2) ? -1 : (int32_t)row, t_below(rnd, 4), &r); break;
        case 4: bt_row_release(cl, row); break;
        case 5: bt_row_append(cl, row, ids, n); break;
        case 6: bt_row_append_shared(cl, row, ids, n); break;
        case 7: bt_row_alloc_append(cl, row, t_below(rnd, 2), n, NULL); break;
        case 8: bt_row_set(cl, row, ids, n); break;
        case 9: bt_row_truncate(cl, row, t_below(rnd, 4)); break;
        case 10: bt_row_move(cl, row, t_below(rnd, 8)); break;
        case 11: bt_row_swap(cl, row, t_below(rnd, 8)); break;
        case 12: {
            uint32_t fr = row % 8;      /* out-of-range free rows: test_step's known crash */
            bt_step(cl, t_below(rnd, 2), &fr, t_below(rnd, 2), rows, nn, 4, got);
            break;
        }
        case 13: bt_row_read(seg, row, got, 16, &ri); break;
        case 14: bt_slots_row(seg, &sp, row % 8, (int64_t)t_below(rnd, 300) - 5, 64, slots); break;
        case 15: {
            int32_t rr[16];
            for (int i = 0; i < 16; i++)
                rr[i] = (int32_t)t_below(rnd, 8);
            bt_slots_req(seg, &sp, rr, pos, 16, slots);
            break;
        }
        case 16: {
            int32_t qsl[3] = { 0, 5, 16 };
            bt_slots_qsl(seg, &sp, NULL, qsl, 2, pos, slots, 20);
            break;
        }
        case 17: bt_pool_free_count(seg, t_below(rnd, 2), &u); break;
        case 18: bt_block_get(seg, ids[0], &u, &u); break;
        case 19: bt_seg_check(seg, 0, 0, &rep); break;
        case 20: bt_client_slot_get(seg, 1 + t_below(rnd, 6), &si); break;
        case 21: bt_row_set_tokens(cl, row, 5); break;
        case 22: bt_row_set_block(cl, row, t_below(rnd, 20), ids[1]); break;
        case 23: bt_row_punch(cl, row, t_below(rnd, 4), t_below(rnd, 20)); break;
        case 24: bt_chunks_free(seg, &u); break;
        }
    }
}

/* Scribble on a fresh copy of the pristine segment, then make calls, for
 * `seconds`; with `repairs`, a quarter of the rounds also repair, recover a
 * client and call again. Returns the rounds run. */
static uint64_t scribble_rounds(uint64_t stream, double seconds, int repairs)
{
    make_pristine();
    uint8_t *mem = aligned_alloc(4096, seg_size);
    T_ASSERT(mem);
    uint64_t rnd = t_substream(stream), deadline = t_now_ns() + (uint64_t)(seconds * 1e9);
    uint64_t total = 2 * 48, it;
    for (it = 0; t_now_ns() < deadline; it++) {
        memcpy(mem, pristine, seg_size);
        bt_seg *seg;
        T_OK(bt_seg_attach_at(mem, seg_size, &seg));
        bt_client *cl = t_client(seg);
        scribble(mem, &rnd, 1 + t_below(&rnd, 8), total);
        calls(seg, cl, &rnd, total);
        if (repairs && t_below(&rnd, 4) == 0) {
            bt_check_report rep;
            bt_seg_check(seg, BT_CHECK_REPAIR, 5, &rep);
            bt_seg_recover_client(seg, 1 + t_below(&rnd, 6), 5, &rep);
            calls(seg, cl, &rnd, total);
        }
        bt_client_close(cl);
        bt_seg_close(seg);
    }
    free(mem);
    free(pristine);
    return it;
}

static void test_scribble_calls(void)
{
    printf("%" PRIu64 " scribbled segments survived every call\n", scribble_rounds(1, 2, 1));
}

/* Slot mapping over scribbled tables and counts: never a read outside the
 * table. Entries may be any int32 (a negative one is garbage, not undefined
 * behaviour: UBSan watches the shifts in slots.c). */
static void test_scribble_slots(void)
{
    with_slots = 1;
    printf("%" PRIu64 " scribbled segments mapped to slots\n", scribble_rounds(3, 1, 0));
}

/* After a repair, whatever was scribbled (past the header), a read-only
 * check finds nothing wrong, counts add up, and no block is handed out
 * twice. */
static void test_scribble_repair(void)
{
    make_pristine();
    uint8_t *mem = aligned_alloc(4096, seg_size);
    T_ASSERT(mem);
    uint64_t rnd = t_substream(2), deadline = t_now_ns() + (uint64_t)(2e9);
    uint64_t total = 2 * 48, it, busy = 0, chunk_leaks = 0;
    static char chunk_fail[800];
    for (it = 0; t_now_ns() < deadline; it++) {
        memcpy(mem, pristine, seg_size);
        bt_seg *seg;
        T_OK(bt_seg_attach_at(mem, seg_size, &seg));
        scribble(mem, &rnd, 1 + t_below(&rnd, 8), total);
        bt_check_report rep;
        int rc = bt_seg_check(seg, BT_CHECK_REPAIR, 5, &rep);
        if (rc == BT_EBUSY) {           /* a scribbled in_op on a live slot */
            busy++;
            bt_seg_close(seg);
            continue;
        }
        T_ASSERTF(rc == 0, "iteration %" PRIu64 ": repair returned %s; scribbled %s", it,
                  bt_errname(rc), last_scribble());
        memset(&rep, 0, sizeof(rep));
        T_OK(bt_seg_check(seg, 0, 0, &rep));
        if (rep.chunks_leaked && !chunk_fail[0]) {   /* reported at the end: see below */
            snprintf(chunk_fail, sizeof(chunk_fail), "iteration %" PRIu64 ": %" PRIu64
                     " chunks leaked after a repair; scribbled %s", it, rep.chunks_leaked,
                     last_scribble());
        }
        chunk_leaks += rep.chunks_leaked != 0;
        if (rep.leaked || rep.double_free || rep.refcnt_fixed || rep.rows_fixed ||
            rep.bad_entries)
            T_FAIL("iteration %" PRIu64 ": after a repair, leaked %" PRIu64 " double_free %" PRIu64
                   " refcnt_fixed %" PRIu64 " rows_fixed %" PRIu64 " bad_entries %" PRIu64
                   " chunks_leaked %" PRIu64 "; scribbled %s", it, rep.leaked, rep.double_free,
                   rep.refcnt_fixed, rep.rows_fixed, rep.bad_entries, rep.chunks_leaked,
                   last_scribble());
        if (rep.blocks_free + rep.blocks_held != total - 1 ||
            rep.blocks_free != t_free(seg, 0) + (uint64_t)t_free(seg, 1))
            T_FAIL("iteration %" PRIu64 ": free %" PRIu64 " + held %" PRIu64 ", pools say %u + %u;"
                   " scribbled %s", it, rep.blocks_free, rep.blocks_held, t_free(seg, 0),
                   t_free(seg, 1), last_scribble());
        /* everything free can be taken, once */
        bt_client *cl = NULL;
        if (bt_client_open(seg, &cl) == 0) {
            for (uint32_t p = 0; p < 2; p++) {
                uint32_t n = t_free(seg, p);
                int32_t ids[48];
                T_ASSERT(n <= 48);
                if (n > 16)
                    n = 16;                 /* the hand's size */
                rc = bt_blocks_alloc(cl, p, n, ids);
                T_ASSERTF(rc == 0, "iteration %" PRIu64 ": alloc of %u free blocks: %s", it, n,
                          bt_errname(rc));
                for (uint32_t i = 0; i < n; i++)
                    T_ASSERTF(t_refcnt(seg, ids[i]) == 1, "iteration %" PRIu64 ": block %d"
                              " handed out with count %u", it, ids[i], t_refcnt(seg, ids[i]));
                T_OK(bt_blocks_release(cl, ids, n));
            }
            bt_client_close(cl);
        }
        bt_seg_close(seg);
    }
    printf("%" PRIu64 " scribbled segments repaired (%" PRIu64 " repairs deferred: busy)\n", it,
           busy);
    free(mem);
    free(pristine);
    /* chunks a repair leaves leaked (test_paged's test_repair_shortened has
     * the plain case) are counted, not fatal at once, so that the loop goes
     * on looking for everything else */
    if (chunk_leaks)
        T_FAIL("%" PRIu64 " repairs left chunks leaked; the first: %s", chunk_leaks, chunk_fail);
}

int main(int argc, char **argv)
{
    t_init(argc, argv);
    T_RUN(test_scribble_calls);
    T_RUN(test_scribble_repair);
    T_RUN(test_scribble_slots);
    return t_done();
}
