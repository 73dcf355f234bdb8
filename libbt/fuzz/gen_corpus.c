/*
 * gen_corpus.c -- the seed corpus, generated (run.sh builds and runs it;
 * nothing binary is committed):
 *
 *   gen_corpus DIR_ATTACH DIR_OPS
 *
 * fuzz_attach seeds: real segments of a few configurations, populated as
 * fz_populate does (rows of every kind, shared and loose blocks, a mirror),
 * in the harness's "input is the segment" form, plus a few "config and
 * patches" inputs. fuzz_ops seeds: byte strings from a fixed PRNG.
 * Deterministic: the same files every run.
 */
#include <errno.h>
#include "fuzz_common.h"

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint8_t rnd8(void)
{
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return (uint8_t)((rng * 0x2545F4914F6CDD1Dull) >> 56);
}

static void put(const char *dir, const char *name, const uint8_t *a, size_t na,
                const uint8_t *b, size_t nb)
{
    char path[1024];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(a, 1, na, f) != na || (nb && fwrite(b, 1, nb, f) != nb)) {
        fprintf(stderr, "gen_corpus: %s: %s\n", path, strerror(errno));
        exit(1);
    }
    fclose(f);
}

/* Seed file <dir>/<prefix>-<v>: the first len bytes of buf, whose bytes from
 * `keep` on (up to cap) are drawn first, all of them, so that every file after
 * it gets the same bytes whatever len is. */
static void put_random(const char *dir, const char *prefix, int v, uint8_t *buf, size_t cap,
                       size_t keep, unsigned len)
{
    for (size_t k = keep; k < cap; k++)
        buf[k] = rnd8();
    char name[64];
    snprintf(name, sizeof(name), "%s-%d", prefix, v);
    put(dir, name, buf, len, NULL, 0);
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s DIR_ATTACH DIR_OPS\n", argv[0]);
        return 2;
    }
    static const bt_config cfgs[] = {
        /* B  K  pools bpp rows width clients hand mirrors chunk nchunks dir cache_pools keys */
        { 4, 0, 1, 16, 4, 4, 2, 8, 0, 0, 0, 0, 0, 0 },
        { 16, 8, 2, 24, 6, 6, 3, 8, 1, 2, 6, 4, 0, 0 },
        { 1, 1, 3, 8, 8, 8, 4, 16, 2, 4, 8, 5, 0, 0 },
        { 8, 0, 1, 40, 2, 3, 1, 4, 0, 3, 2, 2, 0, 0 },
        { 4, 0, 2, 16, 4, 4, 2, 8, 0, 0, 0, 0, 1, 0 },     /* a cache pool */
        { 8, 0, 3, 12, 4, 4, 3, 8, 1, 2, 4, 2, 2, 6 },
    };
    int files = 0;
    for (size_t i = 0; i < sizeof(cfgs) / sizeof(cfgs[0]); i++) {
        fz_ctx z;
        memset(&z, 0, sizeof(z));
        uint64_t size = bt_config_size(&cfgs[i]);
        uint8_t *mem = aligned_alloc(4096, size);
        if (!size || !mem || bt_seg_create_at(mem, size, &cfgs[i], &z.seg)) {
            fprintf(stderr, "gen_corpus: config %zu refused\n", i);
            return 1;
        }
        z.cfg = z.seg->cfg;
        z.total = z.seg->total;
        fz_populate(&z);
        for (int c = 0; c < FZ_CLIENTS; c++)    /* slots stay ACTIVE, as a crash leaves them */
            if (z.cl[c]) {
                free(z.cl[c]->mark);
                free(z.cl[c]);
            }
        bt_seg_close(z.seg);
        for (int v = 0; v < 3; v++) {
            uint8_t head[3 + 96];
            uint16_t nops = v == 0 ? 0 : 96;
            head[0] = 0;                /* mode: the input is the segment */
            head[1] = (uint8_t)nops;
            head[2] = (uint8_t)(nops >> 8);
            for (int k = 0; k < nops; k++)
                head[3 + k] = rnd8();
            char name[64];
            snprintf(name, sizeof(name), "segment-%zu-%d", i, v);
            put(argv[1], name, head, 3u + nops, mem, size);
            files++;
        }
        free(mem);
    }
    for (int v = 0; v < 8; v++) {       /* config + patches + ops */
        uint8_t buf[256] = { 1 };
        put_random(argv[1], "patched", v, buf, sizeof(buf), 1, 32u + 28u * (unsigned)v);
        files++;
    }
    for (int v = 0; v < 16; v++) {
        uint8_t buf[1024];
        put_random(argv[2], "ops", v, buf, sizeof(buf), 0, 16u + 63u * (unsigned)v);
        files++;
    }
    printf("gen_corpus: %d seed files\n", files);
    return 0;
}
