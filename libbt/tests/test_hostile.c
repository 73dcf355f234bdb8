/*
 * test_hostile.c -- minimal reproductions of what issue 6's hostile-input
 * testing found in libbt (the libFuzzer harnesses in libbt/fuzz, the model
 * test tests/test_model.py, probes of long paged rows). One sub-test per
 * finding; each failed until its bug was fixed, then guards it. Fixed in
 * 769f902: the 32-bit malloc sizes, the chunks of failed paged appends.
 * Open: the release of a long sparse row.
 *
 *   test_set_on_a_long_paged_row
 *       bt_row_set sizes its copy of the old entries as `malloc(nb * 4)` in
 *       32-bit arithmetic: a paged row of 2^30 entries (one set_block far
 *       out, a 1 MiB segment: chunk_size 4096, dir_width 2^18) makes it
 *       malloc(0) and write 2^30 entries into it (heap overflow; ASan:
 *       heap-buffer-overflow in get_entries, rows.c). bt_row_alloc_append has
 *       the same `malloc(n * 4)` (reachable with a chunk pool of 2^18 chunks).
 *
 *   test_release_of_a_long_sparse_row
 *       Releasing (truncating, punching) a paged row copies all its entries,
 *       holes included, into a malloc'd array before dropping references:
 *       memory follows num_blocks, not the chunks held. A row of 2^30
 *       entries holding one block in one chunk needs a 4 GiB malloc to be
 *       released; where that fails (cgroup limits, no overcommit, here a
 *       1 GiB address-space cap) release returns -ENOMEM, so the row can
 *       never be given back, and bt_client_close leaves it owned by a freed
 *       slot. Where it succeeds, every release writes 4 GiB. bt.h: "memory
 *       follows the blocks used".
 *
 *   test_failed_paged_append_keeps_no_chunk (append_shared, alloc_append)
 *       Both reserve the row's chunks before the step that can fail (the
 *       incref: BT_ENOTHELD; the pop: BT_ENOBLOCKS) and keep them on error:
 *       the free chunk count drops although "a call that returns an error
 *       has changed nothing" (bt.h). Releasing the still empty row then
 *       trims nothing (then: a dense cut returned early at num_blocks 0): the
 *       chunk stays in the free row's directory, fsck counts it leaked, and
 *       the next claimer of that row inherits it.
 */
#include <sys/resource.h>
#include "bt_test.h"

#if defined(__SANITIZE_ADDRESS__)
#define T_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define T_ASAN 1
#endif
#endif

#ifdef T_ASAN
/* A fixed bt_row_set may still want 4 GiB for a 2^30-entry row: let malloc
 * say no (-ENOMEM) rather than touch that much in CI. */
const char *__asan_default_options(void);
const char *__asan_default_options(void)
{
    return "allocator_may_return_null=1:max_allocation_size_mb=1024";
}
#endif

/* The same without sanitizers: at most 1 GiB more address space. */
static void cap_memory(void)
{
#ifndef T_ASAN
    unsigned long pages = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f || fscanf(f, "%lu", &pages) != 1)
        T_SKIP("no /proc/self/statm to size a memory cap");
    fclose(f);
    struct rlimit rl;
    if (getrlimit(RLIMIT_AS, &rl))
        T_SKIP("getrlimit: %s", strerror(errno));
    rlim_t cap = (rlim_t)pages * 4096 + (1ull << 30);
    if (rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur > cap)
        rl.rlim_cur = cap;
    if (setrlimit(RLIMIT_AS, &rl))
        T_SKIP("cannot cap the address space: %s", strerror(errno));
#endif
}

static void test_set_on_a_long_paged_row(void)
{
    bt_config c = t_config(1, 64, 1, 8);
    c.chunk_size = 4096;
    c.num_chunks = 2;
    c.dir_width = 1u << 18;             /* capacity 2^30 entries, directory 1 MiB */
    bt_seg *seg = t_seg_embedded(&c);
    bt_client *cl = t_client(seg);
    uint32_t row;
    T_OK(bt_row_claim(cl, 1, -1, BT_ROW_PAGED | BT_ROW_RAW, &row));
    T_OK(bt_row_set_block(cl, row, (1u << 30) - 1, 7));     /* one chunk, far out */
    bt_row_info ri = t_row(seg, row, NULL, 0);
    T_EQ(ri.num_blocks, 1u << 30);
    cap_memory();
    int32_t ids[1] = { 3 };
    int rc = bt_row_set(cl, row, ids, 1);   /* the heap overflow, before the fix */
    T_ASSERTF(rc == 0 || rc == -ENOMEM, "bt_row_set returned %s", bt_errname(rc));
    if (rc == 0) {
        int32_t got[2];
        ri = t_row(seg, row, got, 2);
        T_EQ(ri.num_blocks, 1);
        T_EQ(got[0], 3);
    }
    T_END(seg, cl);
}

static void test_release_of_a_long_sparse_row(void)
{
    bt_config c = t_config(1, 64, 1, 8);
    c.chunk_size = 4096;
    c.num_chunks = 2;
    c.dir_width = 1u << 18;
    bt_seg *seg = t_seg_embedded(&c);
    bt_client *cl = t_client(seg);
    uint32_t row, chunks;
    int32_t id;
    T_OK(bt_row_claim(cl, 1, -1, BT_ROW_PAGED, &row));
    T_OK(bt_blocks_alloc(cl, 0, 1, &id));
    T_OK(bt_row_set_block(cl, row, (1u << 30) - 1, id));    /* one block, one chunk */
    cap_memory();
    T_OK(bt_row_release(cl, row));
    T_EQ(t_refcnt(seg, id), 0);
    T_OK(bt_chunks_free(seg, &chunks));
    T_EQ(chunks, c.num_chunks);
    t_check_quiet(seg);
    T_END(seg, cl);
}

static bt_config paged_cfg(void)
{
    bt_config c = t_config(1, 8, 8, 8);
    c.chunk_size = 2;
    c.num_chunks = 4;
    c.dir_width = 4;
    return c;
}

static void chunk_kept(int shared)
{
    bt_config c = paged_cfg();
    bt_seg *seg = t_seg_embedded(&c);
    bt_client *cl = t_client(seg);
    uint32_t row, before, after;
    int32_t ids[8];
    T_OK(bt_row_claim(cl, 1, -1, BT_ROW_PAGED, &row));
    T_OK(bt_chunks_free(seg, &before));
    if (shared) {
        int32_t free_block = 3;         /* nobody holds it */
        T_RC(bt_row_append_shared(cl, row, &free_block, 1), BT_ENOTHELD);
    } else {
        T_OK(bt_blocks_alloc(cl, 0, 7, ids));   /* pool 0 is now empty */
        T_RC(bt_row_alloc_append(cl, row, 0, 2, NULL), BT_ENOBLOCKS);
        T_OK(bt_blocks_release(cl, ids, 7));
    }
    T_OK(bt_chunks_free(seg, &after));
    T_ASSERTF(after == before, "%s failed but took %u chunk(s): %u free, was %u",
              shared ? "bt_row_append_shared" : "bt_row_alloc_append", before - after,
              after, before);
    T_OK(bt_row_release(cl, row));
    T_OK(bt_chunks_free(seg, &after));
    T_EQ(after, c.num_chunks);          /* a released row holds no chunk */
    t_check_quiet(seg);                 /* and fsck finds none leaked */
    T_END(seg, cl);
}

static void test_failed_paged_append_shared_keeps_no_chunk(void) { chunk_kept(1); }
static void test_failed_paged_alloc_append_keeps_no_chunk(void) { chunk_kept(0); }

int main(int argc, char **argv)
{
    t_init(argc, argv);
    T_RUN(test_set_on_a_long_paged_row);
    T_RUN(test_release_of_a_long_sparse_row);
    T_RUN(test_failed_paged_append_shared_keeps_no_chunk);
    T_RUN(test_failed_paged_alloc_append_keeps_no_chunk);
    return t_done();
}
