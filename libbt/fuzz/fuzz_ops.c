/*
 * fuzz_ops.c -- libFuzzer harness (b): operation sequences on an embedded
 * segment that nobody scribbles on. The input is decoded into a small
 * configuration, then into up to FZ_MAX_OPS calls with arbitrary arguments
 * (fuzz_common.h). Judged strictly: every error leaves the segment as it was,
 * every allocation hands out blocks nobody held, a read-only fsck stays
 * clean every 16 calls, and once the clients are closed every block, chunk
 * and row is free again. ASan, UBSan and LeakSanitizer judge the rest.
 *
 * The segment lives in a heap buffer of exactly its size, so that
 * AddressSanitizer sees any access past it.
 */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_in in = { data, size };
    fz_ctx z;
    memset(&z, 0, sizeof(z));
    z.strict = 1;
    fz_config(&in, &z.cfg);
    uint64_t need = bt_config_size(&z.cfg);
    char why[128];
    int rc = bt_config_explain(&z.cfg, why, sizeof(why));
    if ((rc == 0) != (need != 0))
        FZ_FAIL("bt_config_explain says %d (%s) but bt_config_size says %" PRIu64, rc, why, need);
    if (rc || need > (1u << 20) || z.cfg.num_rows > 8 || z.cfg.row_width > 64 ||
        (uint64_t)z.cfg.num_pools * z.cfg.blocks_per_pool > 512 || z.cfg.hand_size > 16 ||
        z.cfg.max_clients > 8 || z.cfg.chunk_size * z.cfg.dir_width > 64 ||
        z.cfg.num_pools > 4 || z.cfg.max_mirrors > 8) {
        /* refused, or outside what the strict snapshots cover: make sure
         * creating over too small a buffer is refused too, and stop */
        uint8_t small[64];
        bt_seg *s;
        if (bt_seg_create_at(small, sizeof(small), &z.cfg, &s) == 0)
            FZ_FAIL("bt_seg_create_at accepted a 64-byte buffer");
        return 0;
    }
    uint8_t *mem = aligned_alloc(4096, (size_t)need);
    if (!mem)
        return 0;
    if ((rc = bt_seg_create_at(mem, need, &z.cfg, &z.seg)))
        FZ_FAIL("bt_seg_create_at of a checked config: %s", bt_errname(rc));
    bt_seg_info info;
    bt_seg_info_get(z.seg, &info);
    z.cfg = info.config;                /* kernel_block_size 0 becomes B */
    z.total = info.total_blocks;
    z.wait_ms = 1;
    fz_run(&z, &in, FZ_MAX_OPS);
    fz_finish(&z);
    bt_seg_close(z.seg);
    free(mem);
    return 0;
}
