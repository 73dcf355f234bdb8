/*
 * fuzz_attach.c -- libFuzzer harness (a): segments made of hostile bytes.
 *
 * The first input byte picks how the segment is made:
 *   even  [ops length: 2 bytes][ops][segment]: a heap copy of exactly the
 *         segment's bytes goes to bt_seg_validate and bt_seg_attach_at (the
 *         seed corpus holds real segments, so mutations start from valid
 *         ones), the freeze word and seqlocks excepted (fz_unstick);
 *   odd   a configuration is decoded from the input, a segment of that size
 *         is formatted and populated (clients, dense / raw / paged rows,
 *         shared and loose blocks, a mirror), then the input's patches
 *         (offset, width, value) are written anywhere in it, header included,
 *         and the copy is attached again, as a second process would.
 * Then, if attach succeeded, the rest of the input drives calls of every
 * kind (fuzz_common.h, lax mode: results are not judged), a repairing check,
 * and more calls. After a successful repair the segment must be sane again:
 * a read-only check finds nothing, and every free block can be allocated
 * once, with count 1 (no block handed out twice).
 *
 * Judged by ASan (any access outside the heap copy), UBSan, LeakSanitizer
 * and libFuzzer's -timeout (every loop over shared links must be bounded).
 */
#include "fuzz_common.h"

static void after_repair(fz_ctx *z)
{
    bt_check_report rep;
    if (bt_seg_check(z->seg, 0, 0, &rep))
        FZ_FAIL("read-only check after a repair failed");
    if (rep.leaked || rep.double_free || rep.refcnt_fixed || rep.rows_fixed || rep.bad_entries ||
        rep.chunks_leaked || rep.cache_bad)
        FZ_FAIL("after a repair: leaked %" PRIu64 " double_free %" PRIu64 " refcnt_fixed %" PRIu64
                " rows_fixed %" PRIu64 " bad_entries %" PRIu64 " chunks_leaked %" PRIu64
                " cache_bad %" PRIu64, rep.leaked, rep.double_free, rep.refcnt_fixed,
                rep.rows_fixed, rep.bad_entries, rep.chunks_leaked, rep.cache_bad);
    bt_client *cl;
    if (bt_client_open(z->seg, &cl))
        return;                         /* every slot is live: fine */
    for (uint32_t p = z->cfg.cache_pools; p < z->cfg.num_pools; p++) {    /* Treiber pools */
        uint32_t n;
        int32_t ids[FZ_BUF];
        bt_pool_free_count(z->seg, p, &n);
        n = n > z->cfg.hand_size ? z->cfg.hand_size : n;
        n = n > FZ_BUF ? FZ_BUF : n;
        int rc = bt_blocks_alloc(cl, p, n, ids);
        if (rc)
            FZ_FAIL("after a repair, allocating %u free blocks of pool %u: %s", n, p,
                    bt_errname(rc));
        fz_fresh(z, ids, n, bt_client_id(cl), "allocation after a repair");
        if ((rc = bt_blocks_release(cl, ids, n)))
            FZ_FAIL("after a repair, releasing what was just allocated: %s", bt_errname(rc));
    }
    bt_client_close(cl);
}

static void patch(uint8_t *mem, uint64_t size, fz_in *in)
{
    uint32_t np = fz_below(in, 9);
    for (uint32_t k = 0; k < np; k++) {
        uint32_t w = 1u << fz_below(in, 4);     /* 1, 2, 4 or 8 bytes */
        uint64_t off = (fz_u8(in) & 3) == 0 ? fz_below(in, 384) : fz_u32(in) % size;
        off &= ~(uint64_t)(w - 1);
        if (off + w > size)
            continue;
        uint64_t v;
        uint8_t kind = fz_u8(in) % 6;
        v = kind == 0 ? 0 : kind == 1 ? ~0ull : kind == 2 ? fz_u8(in) :
            kind == 3 ? (uint64_t)(int64_t)(int8_t)fz_u8(in) : (uint64_t)fz_u32(in) | (uint64_t)fz_u32(in) << 32;
        if (kind == 4) {                /* a nearby value: off by a little */
            uint64_t old = 0;
            memcpy(&old, mem + off, w);
            v = old + (uint64_t)(int64_t)(int8_t)fz_u8(in);
        }
        memcpy(mem + off, &v, w);       /* little-endian: the low w bytes */
    }
}

static void calls(fz_ctx *z, fz_in *in)
{
    for (int c = 0; c < FZ_CLIENTS; c++)
        if (!z->cl[c])
            bt_client_open(z->seg, &z->cl[c]);
    fz_run(z, in, 48);
    bt_check_report rep;
    int rc = bt_seg_check(z->seg, BT_CHECK_REPAIR, 0, &rep);
    if (rc == 0)
        after_repair(z);
    fz_run(z, in, 48);
    fz_finish(z);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_in in = { data, size };
    fz_ctx z;
    memset(&z, 0, sizeof(z));
    z.wait_ms = 0;
    uint8_t mode = fz_u8(&in);
    uint8_t *mem;
    uint64_t msize;
    fz_in ops_in = in;
    if (!(mode & 1)) {
        /* [mode][ops length: 2 bytes][ops][segment]: a heap copy of exactly
         * the segment's bytes is validated and attached */
        uint32_t nops = fz_u8(&in);
        nops |= (uint32_t)fz_u8(&in) << 8;
        if (nops > in.n)
            nops = (uint32_t)in.n;
        ops_in = (fz_in){ in.p, nops };
        msize = in.n - nops;
        if (msize == 0)
            return 0;
        mem = malloc(msize);
        if (!mem)
            return 0;
        memcpy(mem, in.p + nops, msize);
        int v = bt_seg_validate(mem, msize);
        int rc = bt_seg_attach_at(mem, msize, &z.seg);
        if ((v == 0) != (rc == 0))
            FZ_FAIL("bt_seg_validate says %s, bt_seg_attach_at %s", bt_errname(v), bt_errname(rc));
        if (rc) {
            free(mem);
            return 0;
        }
    } else {
        bt_config cfg;
        fz_config(&in, &cfg);
        msize = bt_config_size(&cfg);
        if (!msize || msize > (4u << 20))
            return 0;
        uint8_t *orig = aligned_alloc(4096, msize);
        if (!orig)
            return 0;
        bt_seg *s;
        if (bt_seg_create_at(orig, msize, &cfg, &s))
            FZ_FAIL("bt_seg_create_at refused a config bt_config_size accepted");
        z.seg = s;
        z.cfg = s->cfg;
        z.total = s->total;
        fz_populate(&z);
        /* the populating clients' slots stay ACTIVE with our (live) pid */
        for (int c = 0; c < FZ_CLIENTS; c++) {
            if (z.cl[c]) {
                free(z.cl[c]->mark);
                free(z.cl[c]);
                z.cl[c] = NULL;
            }
        }
        bt_seg_close(s);
        z.seg = NULL;
        mem = orig;
        patch(mem, msize, &in);
        ops_in = in;
        if (bt_seg_attach_at(mem, msize, &z.seg)) {
            free(mem);
            return 0;
        }
    }
    bt_seg_info info;
    bt_seg_info_get(z.seg, &info);
    z.cfg = info.config;
    z.total = info.total_blocks;
    if (z.total > (1u << 16) || (uint64_t)z.cfg.num_rows * z.cfg.row_width > (1u << 16)) {
        bt_seg_close(z.seg);            /* valid but big: attach was the test */
        free(mem);
        return 0;
    }
    fz_unstick(&z);
    calls(&z, &ops_in);
    bt_seg_close(z.seg);
    free(mem);
    return 0;
}
