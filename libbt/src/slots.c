/*
 * slots.c -- token position -> KV-cache slot, into a caller's int64 buffer.
 *
 *   slot = table[row][pos / bs] * bs + pos % bs      (-1: no block backs pos)
 *
 * With decode context parallelism a virtual block of vbs = bs * W tokens is
 * striped over W ranks in runs of I tokens (vLLM's dcp): this rank keeps
 * positions with (pos % vbs) / I % W == rank, at offset
 * (pos % vbs) / (W * I) * I + pos % I of the block.
 *
 * Rows are read without the seqlock (the scheduler that computes slots is
 * the rows' writer, or they are quiescent, as in vLLM), but every value read
 * from shared memory is bounded: num_blocks is clamped to the row width, so
 * a scribbled count can make a slot wrong, never a read stray.
 * Tokens arrive grouped by request, so the per-row part (count, entries,
 * kind) is looked up once per run of tokens of one row. The common case
 * (a segment without paged rows, a power-of-two block, no context
 * parallelism) has its own path, "dense" below, with no call per token or
 * per request and no bt_row_nblocks (a segment without paged rows has the
 * row width for every cap):
 *   - decode (every request one token; the check pass says so): one flat
 *     loop of masks, four tokens at a time by gather where the CPU has AVX2;
 *   - runs (a request's positions go p, p+1, ...: prefill, form 1): the
 *     tokens of block bi are pos + (id - bi) << sh, one add per token, four
 *     lanes at a time, while every position is checked against the one the
 *     run predicts (a request that breaks the run is redone token by token);
 *   - short requests (under 16 tokens) by masked gathers, four at a time.
 * The AVX2 paths are chosen once at load (bt_slots_simd); the others are
 * portable C that compilers vectorize where they can.
 * Bounds stay: a caller's row index and query_start_loc are checked before
 * anything is written, and checked again (clamped) where they are used, so a
 * caller that changes its own arrays meanwhile gets wrong slots, never a
 * stray access; num_blocks from shared memory is clamped at every use.
 */
#include "bt_internal.h"

struct sp {
    int64_t  bs, vbs, world, rank, il;
    int      shift;                     /* log2(bs) if a power of two and no cp, else -1 */
    int      dense;                     /* shift >= 0 and the segment has no paged rows */
};

static int sp_init(const bt_seg *s, const bt_slot_params *p, struct sp *o)
{
    uint32_t bs = p && p->block_size ? p->block_size : s->cfg.block_size;
    uint32_t w = p && p->cp_world > 1 ? p->cp_world : 1;
    uint32_t il = p && p->cp_interleave ? p->cp_interleave : 1;
    uint32_t rank = p ? p->cp_rank : 0;
    if (bs == 0 || bs > (1u << 20) || w > 1024 || rank >= w || il > bs)
        return BT_EINVAL;
    if (w > 1 && bs % il)
        return BT_EINVAL;
    *o = (struct sp){ .bs = bs, .vbs = (int64_t)bs * w, .world = w, .rank = rank, .il = il, .shift = -1 };
    if (w == 1 && (bs & (bs - 1)) == 0)
        o->shift = __builtin_ctz(bs);
    o->dense = o->shift >= 0 && s->cfg.chunk_size == 0;
    return BT_OK;
}

/* The entry that backs position pos >= 0 of a row of nb entries, and the
 * offset in its block: -1 if none does, or another rank keeps pos. */
static int64_t entry_of(const struct sp *p, int64_t pos, uint32_t nb, int64_t *off)
{
    int64_t bi = pos / p->vbs;
    if (bi >= nb)
        return -1;
    int64_t v = pos % p->vbs;
    if (p->world > 1 && (v / p->il) % p->world != p->rank)
        return -1;
    *off = v / (p->world * p->il) * p->il + v % p->il;
    return bi;
}

/* A paged row's hole (entry 0) backs nothing: -1. */
static int64_t slot_paged(const bt_seg *s, const struct sp *p, uint32_t row, int64_t pos, uint32_t nb)
{
    int64_t off, bi = entry_of(p, pos, nb, &off);
    int32_t id = bi < 0 ? 0 : bt_entry_get(s, row, (uint32_t)bi);
    return id == 0 ? -1 : (int64_t)id * p->bs + off;
}

static inline int64_t slot_of(const bt_seg *s, const struct sp *p, uint32_t row, int64_t pos)
{
    if (pos < 0)
        return -1;
    uint32_t nb = bt_row_nblocks(s, row);
    if (bt_row_paged(s, row))
        return slot_paged(s, p, row, pos, nb);
    const int32_t *e = bt_row_ids(s, row);
    if (p->shift >= 0) {
        int64_t bi = pos >> p->shift;
        if (bi >= nb)
            return -1;
        return (int64_t)((uint64_t)(int64_t)bt_load_relaxed(&e[bi]) << p->shift) | (pos & (p->bs - 1));
    }
    int64_t off, bi = entry_of(p, pos, nb, &off);
    return bi < 0 ? -1 : (int64_t)bt_load_relaxed(&e[bi]) * p->bs + off;
}

/* ---- the dense path ----------------------------------------------------- */

/* Loops here are written to vectorize: GCC at -O2 does not try (its "very
 * cheap" model), so the functions that hold them ask for it, and on x86-64
 * Linux they are also built for AVX2, picked at load time (an ifunc); the
 * sanitizer builds keep one portable copy, the one they then check. */
#if defined(__GNUC__) && !defined(__clang__)
#define BT_VECTORIZE __attribute__((optimize("tree-vectorize")))
#else
#define BT_VECTORIZE
#endif
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && \
    !defined(__SANITIZE_THREAD__) && !defined(__SANITIZE_ADDRESS__)
#define BT_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define BT_CLONES
#endif
#define BT_INLINE static inline __attribute__((always_inline))

/* A dense row's num_blocks, clamped as bt_row_nblocks does, without the
 * paged test (the segment has no paged rows) and inline. */
BT_INLINE uint32_t dense_nb(const bt_seg *s, uint32_t row)
{
    int32_t n = bt_load_relaxed(&s->nblocks[row]);
    uint32_t w = s->cfg.row_width;
    uint32_t u = n < 0 ? 0 : (uint32_t)n;
    return u > w ? w : u;
}

/* The slot of position x in a dense row e whose blocks end at position lim
 * (nb << sh). Branch-free: an out-of-range position reads entry 0 (always
 * there) and the select drops it. Unsigned shifts: a scribbled negative id
 * is no UB. */
BT_INLINE int64_t dense_slot(const int32_t *e, uint64_t lim, int sh, int64_t x)
{
    int in = (uint64_t)x < lim;
    uint64_t id = (uint64_t)(int64_t)bt_load_relaxed(&e[in ? (uint64_t)x >> sh : 0]);
    int64_t v = (int64_t)((id << sh) | ((uint64_t)x & (((uint64_t)1 << sh) - 1)));
    return in ? v : -1;
}

/* Four int64 lanes (GCC/Clang vector extension: AVX2 registers in the AVX2
 * build, pairs of SSE2 ones otherwise); unaligned, and it may alias the
 * caller's int64 arrays. */
typedef uint64_t bt_v4 __attribute__((vector_size(32), aligned(8), may_alias));

/* A run of m tokens from position p whose slots are pos + delta, checked:
 * returns nonzero if a position is not p + k. Four lanes at a time, the
 * last m % 4 one by one. */
BT_INLINE uint64_t run_add(const int64_t *src, int64_t *dst, uint32_t m, uint64_t p,
                           uint64_t delta)
{
    uint64_t acc = 0;
    uint32_t k = 0;
    bt_v4 va = { 0, 0, 0, 0 }, want = { p, p + 1, p + 2, p + 3 };
    for (; k + 4 <= m; k += 4) {
        bt_v4 v = *(const bt_v4 *)(src + k);
        *(bt_v4 *)(dst + k) = v + delta;
        va |= v ^ want;
        want += 4;
    }
    for (; k < m; k++) {
        uint64_t v = (uint64_t)src[k];
        dst[k] = (int64_t)(v + delta);
        acc |= v ^ (p + k);
    }
    return acc | va[0] | va[1] | va[2] | va[3];
}

/* The whole blocks of a run from token *j (position p + *j, block *bi),
 * block size 4 << k: each is bs/4 steps of four lanes (for 16, one
 * straight block of code), the expected positions carried from block to
 * block. Loads come before stores: out may be pos (form 1). Returns the
 * run check (nonzero: a position was not the expected one). */
BT_INLINE uint64_t whole_blocks(const int32_t *e, int sh, const int64_t *pos, int64_t *out,
                                uint32_t n, uint64_t p, uint32_t *jp, uint64_t *bip)
{
    uint32_t j = *jp, bs = 1u << sh;
    uint64_t bi = *bip, p0 = p + j;
    bt_v4 va = { 0, 0, 0, 0 }, want = { p0, p0 + 1, p0 + 2, p0 + 3 };
    for (; j + bs <= n; j += bs, bi++) {
        uint64_t d = ((uint64_t)(int64_t)bt_load_relaxed(&e[bi]) - bi) << sh;
        const bt_v4 *src = (const bt_v4 *)(pos + j);
        bt_v4 *dst = (bt_v4 *)(out + j);
        if (sh == 4) {
            bt_v4 a0 = src[0], a1 = src[1], a2 = src[2], a3 = src[3];
            dst[0] = a0 + d;
            dst[1] = a1 + d;
            dst[2] = a2 + d;
            dst[3] = a3 + d;
            va |= (a0 ^ want) | (a1 ^ (want + 4)) | (a2 ^ (want + 8)) | (a3 ^ (want + 12));
            want += 16;
        } else {
            for (uint32_t k = 0; k < bs / 4; k++) {
                bt_v4 a = src[k];
                dst[k] = a + d;
                va |= a ^ want;
                want += 4;
            }
        }
    }
    *jp = j;
    *bip = bi;
    return va[0] | va[1] | va[2] | va[3];
}

/* n tokens of one dense row. If the positions run on from pos[0] (prefill,
 * a chunk of it, form 1), the tokens of block bi are pos + (id - bi) << sh:
 * an add per token, while the run is checked: a partial block first, then
 * whole blocks four lanes at a time, then a partial block. A request whose
 * positions do not run on (acc) is redone token by token, which is also the
 * path of short requests. */
BT_INLINE void dense_run(const int32_t *e, uint64_t lim, int sh, const int64_t *pos,
                         uint32_t n, int64_t *out)
{
    uint64_t p = (uint64_t)pos[0], bs = (uint64_t)1 << sh, acc = 0;
    if (n > 2 && p < lim && n <= lim - p) {     /* a run from p stays in the row */
        uint64_t bi = p >> sh, off = p & (bs - 1);
        uint32_t j = 0;
        if (off || sh < 2) {                    /* the first block, from off */
            uint32_t m = n < bs - off ? n : (uint32_t)(bs - off);
            uint64_t delta = ((uint64_t)(int64_t)bt_load_relaxed(&e[bi]) - bi) << sh;
            acc = run_add(pos, out, m, p, delta);
            j = m;
            bi++;
        }
        if (sh >= 2 && j + bs <= n)
            acc |= whole_blocks(e, sh, pos, out, n, p, &j, &bi);
        for (; j < n; j += (uint32_t)bs, bi++) {    /* a last partial block (or bs < 4) */
            uint32_t m = n - j < bs ? n - j : (uint32_t)bs;
            uint64_t delta = ((uint64_t)(int64_t)bt_load_relaxed(&e[bi]) - bi) << sh;
            acc |= run_add(pos + j, out + j, m, p + j, delta);
        }
        if (!acc)
            return;
    }
    for (uint32_t j = 0; j < n; j++)
        out[j] = dense_slot(e, lim, sh, pos[j]);
}

/* Decode: request i is token i (query_start_loc 0, 1, 2, ...), in rows[i]
 * or row i. Flat loops with masks instead of branches: every value in a
 * register, nothing per request but the token. A row index is clamped
 * (checked before: the caller's array), num_blocks clamped as
 * bt_row_nblocks does, an out-of-range position reads entry 0 of the row
 * and comes out -1. */
BT_INLINE int64_t decode_one(const int32_t *tab, const int32_t *nbs, uint32_t w, int sh,
                             uint32_t row, int64_t pos)
{
    int32_t c = bt_load_relaxed(&nbs[row]);
    uint64_t nb = c < 0 ? 0 : (uint32_t)c > w ? w : (uint32_t)c;
    uint64_t x = (uint64_t)pos, in = -(uint64_t)(x < nb << sh);     /* all ones if backed */
    uint64_t id = (uint64_t)(int64_t)bt_load_relaxed(&tab[(uint64_t)row * w + ((x >> sh) & in)]);
    return (int64_t)(((id << sh) | (x & ((1ull << sh) - 1))) | ~in);
}

/* Whether the AVX2 paths run: set once at load from the CPU; tests clear it
 * to check the portable paths too (bt_internal.h). */
int bt_slots_simd;

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define BT_HAVE_AVX2_DECODE 1
__attribute__((constructor)) static void simd_init(void)
{
    bt_slots_simd = __builtin_cpu_supports("avx2");
}
/* decode_dense four tokens at a time: rows, counts and ids come by gather.
 * The same masks as decode_one; a row past the rows is clamped to the last
 * (checked before, so only a caller changing its own array gets there). */
__attribute__((target("avx2")))
static uint32_t decode_avx2(const int32_t *tab, const int32_t *nbs, uint32_t w, uint32_t nrows,
                            int sh, const int32_t *rows, uint32_t n, const int64_t *pos,
                            int64_t *out)
{
    const __m128i cnt = _mm_cvtsi32_si128(sh), top = _mm_set1_epi32((int)(nrows - 1));
    const __m128i wid = _mm_set1_epi32((int)w), zero = _mm_setzero_si128();
    const __m256i w64 = _mm256_set1_epi64x(w), ones = _mm256_set1_epi64x(-1);
    const __m256i mask = _mm256_set1_epi64x((long long)((1ull << sh) - 1));
    __m128i seq = _mm_setr_epi32(0, 1, 2, 3);
    const __m128i four = _mm_set1_epi32(4);
    uint32_t i = 0;
    for (; i + 4 <= n; i += 4) {
        __m128i r, c;
        if (rows) {
            r = _mm_min_epu32(_mm_loadu_si128((const __m128i *)(rows + i)), top);
            c = _mm_i32gather_epi32(nbs, r, 4);
        } else {                                /* row i: i < n <= nrows */
            r = seq;
            c = _mm_loadu_si128((const __m128i *)(nbs + i));
        }
        seq = _mm_add_epi32(seq, four);
        c = _mm_min_epu32(_mm_max_epi32(c, zero), wid);
        __m256i lim = _mm256_sll_epi64(_mm256_cvtepu32_epi64(c), cnt);
        __m256i x = _mm256_loadu_si256((const __m256i *)(pos + i));
        __m256i in = _mm256_andnot_si256(_mm256_cmpgt_epi64(_mm256_setzero_si256(), x),
                                         _mm256_cmpgt_epi64(lim, x));   /* 0 <= x < lim */
        __m256i bi = _mm256_and_si256(_mm256_srl_epi64(x, cnt), in);
        __m256i idx = _mm256_add_epi64(_mm256_mul_epu32(_mm256_cvtepu32_epi64(r), w64), bi);
        __m256i id = _mm256_cvtepi32_epi64(_mm256_i64gather_epi32(tab, idx, 4));
        __m256i v = _mm256_or_si256(_mm256_sll_epi64(id, cnt), _mm256_and_si256(x, mask));
        v = _mm256_or_si256(v, _mm256_xor_si256(in, ones));
        _mm256_storeu_si256((__m256i *)(out + i), v);
    }
    return i;
}

/* dense_run built for AVX2, out of line: the request loop below keeps its
 * registers (inlined, the two spill each other's). Blocks of 16 tokens
 * (vLLM's default) get a copy where the shift is a constant. */
__attribute__((target("avx2"), noinline))
static void dense_run_avx2(const int32_t *e, uint64_t lim, int sh, const int64_t *pos,
                           uint32_t n, int64_t *out)
{
    if (sh == 4)
        dense_run(e, lim, 4, pos, n, out);
    else
        dense_run(e, lim, sh, pos, n, out);
}

/* Request i of form 3, clamped (qsl and rows are the caller's and are read
 * again after qsl_check, so they are clamped again): its tokens run from t0
 * to *t1, its row's entries are returned and *lim is where its blocks end. */
BT_INLINE const int32_t *qsl_req(const bt_seg *s, int sh, const int32_t *rows,
                                 const int32_t *qsl, uint32_t i, int32_t t0, int32_t end,
                                 int32_t *t1, uint64_t *lim)
{
    int32_t t = qsl[i + 1];
    uint32_t row = rows ? (uint32_t)rows[i] : i;
    *t1 = t < t0 ? t0 : t > end ? end : t;
    row = row < s->cfg.num_rows ? row : 0;
    *lim = (uint64_t)dense_nb(s, row) << sh;
    return s->table + (uint64_t)row * s->cfg.row_width;
}

/* Form 3's requests of a few tokens each (prefill chunks, speculative
 * decoding): a request's tokens four at a time by gather, the last ones
 * masked, so a request costs a few vector steps and no scalar tail. Long
 * runs go to dense_run (an add per token). Returns nonzero if used. */
__attribute__((target("avx2")))
static void qsl_avx2(const bt_seg *s, int sh, const int32_t *rows, const int32_t *qsl,
                     uint32_t num_reqs, int32_t end, const int64_t *pos, int64_t *out)
{
    const __m128i cnt = _mm_cvtsi32_si128(sh);
    const __m256i ones = _mm256_set1_epi64x(-1), lane = _mm256_setr_epi64x(0, 1, 2, 3);
    const __m256i mask = _mm256_set1_epi64x((long long)((1ull << sh) - 1));
    int32_t t0 = 0;
    for (uint32_t i = 0; i < num_reqs; i++) {
        int32_t t1;
        uint64_t lim;
        const int32_t *e = qsl_req(s, sh, rows, qsl, i, t0, end, &t1, &lim);
        uint32_t n = (uint32_t)(t1 - t0);
        if (n >= 16) {
            dense_run_avx2(e, lim, sh, pos + t0, n, out + t0);
        } else {
            const __m256i vlim = _mm256_set1_epi64x((long long)lim);
            for (uint32_t k = 0; k < n; k += 4) {
                __m256i live = _mm256_cmpgt_epi64(_mm256_set1_epi64x(n - k), lane);
                __m256i x = _mm256_maskload_epi64((const long long *)(pos + t0 + k), live);
                __m256i in = _mm256_andnot_si256(_mm256_cmpgt_epi64(_mm256_setzero_si256(), x),
                                                 _mm256_cmpgt_epi64(vlim, x));
                __m256i bi = _mm256_and_si256(_mm256_srl_epi64(x, cnt), in);
                __m256i id = _mm256_cvtepi32_epi64(_mm256_i64gather_epi32(e, bi, 4));
                __m256i v = _mm256_or_si256(_mm256_sll_epi64(id, cnt), _mm256_and_si256(x, mask));
                v = _mm256_or_si256(v, _mm256_xor_si256(in, ones));
                _mm256_maskstore_epi64((long long *)(out + t0 + k), live, v);
            }
        }
        t0 = t1;
    }
}
#endif

static void decode_dense(const bt_seg *s, int sh, const int32_t *rows, uint32_t n,
                         const int64_t *pos, int64_t *out)
{
    const int32_t *tab = s->table, *nbs = s->nblocks;
    uint32_t w = s->cfg.row_width, nrows = s->cfg.num_rows, i = 0;
#ifdef BT_HAVE_AVX2_DECODE
    if (bt_slots_simd)
        i = decode_avx2(tab, nbs, w, nrows, sh, rows, n, pos, out);
#endif
    if (!rows) {
        for (; i < n; i++)                      /* n <= nrows: checked */
            out[i] = decode_one(tab, nbs, w, sh, i, pos[i]);
        return;
    }
    for (; i < n; i++) {
        uint32_t row = (uint32_t)rows[i];
        out[i] = decode_one(tab, nbs, w, sh, row < nrows ? row : 0, pos[i]);
    }
}

/* Form 3 on the dense path, qsl and rows already checked (qsl_check). They
 * are the caller's and are read again here, so they are clamped again. */
BT_CLONES BT_VECTORIZE
static void qsl_dense(const bt_seg *s, int sh, const int32_t *rows, const int32_t *qsl,
                      uint32_t num_reqs, const int64_t *pos, int64_t *out, int32_t end)
{
    int32_t t0 = 0;
    for (uint32_t i = 0; i < num_reqs; i++) {
        int32_t t1;
        uint64_t lim;
        const int32_t *e = qsl_req(s, sh, rows, qsl, i, t0, end, &t1, &lim);
        if (t1 - t0 == 1)
            out[t0] = dense_slot(e, lim, sh, pos[t0]);
        else if (t1 > t0)
            dense_run(e, lim, sh, pos + t0, (uint32_t)(t1 - t0), out + t0);
        t0 = t1;
    }
}

/* Form 2 on the dense path: runs of one row. BT_ERANGE at the first bad row
 * (the entries before it are written, as bt.h says). */
BT_CLONES BT_VECTORIZE
static int req_dense(const bt_seg *s, int sh, const int32_t *rows, const int64_t *pos,
                     uint32_t n, int64_t *out)
{
    const int32_t *tab = s->table;
    uint32_t w = s->cfg.row_width, nrows = s->cfg.num_rows;
    for (uint32_t i = 0; i < n;) {
        uint32_t row = (uint32_t)rows[i], j = i + 1;
        if (row >= nrows)               /* negatives wrap: refused */
            return BT_ERANGE;
        const int32_t *e = tab + (uint64_t)row * w;
        uint64_t lim = (uint64_t)dense_nb(s, row) << sh;
        while (j < n && (uint32_t)rows[j] == row)
            j++;
        if (j - i == 1)
            out[i] = dense_slot(e, lim, sh, pos[i]);
        else
            dense_run(e, lim, sh, pos + i, j - i, out + i);
        i = j;
    }
    return BT_OK;
}

/* ---- the general path: paged rows, context parallelism, any block size ---- */

/* The per-row part of a slot computation, cached while consecutive tokens
 * belong to the same row (the usual case: tokens come grouped by request). */
struct rowc {
    uint32_t row;
    int      paged;
    uint32_t nb;
    int64_t  lim;                       /* first position past the row's blocks (fast path) */
    const int32_t *e;
};

static inline void rowc_load(const bt_seg *s, const struct sp *p, struct rowc *c, uint32_t row)
{
    c->row = row;
    c->paged = bt_row_paged(s, row);
    c->nb = bt_row_nblocks(s, row);
    c->e = bt_row_ids(s, row);
    c->lim = p->shift >= 0 ? (int64_t)c->nb << p->shift : 0;
}

/* Fill out[0..n) for positions pos[0..n) of one row. */
static void slots_run(const bt_seg *s, const struct sp *p, const struct rowc *c,
                      const int64_t *pos, uint32_t n, int64_t *out)
{
    if (p->shift >= 0 && !c->paged) {
        dense_run(c->e, (uint64_t)c->lim, p->shift, pos, n, out);
        return;
    }
    for (uint32_t i = 0; i < n; i++)
        out[i] = slot_of(s, p, c->row, pos[i]);
}

/* ---- the three forms ---------------------------------------------------- */

int bt_slots_row(const bt_seg *s, const bt_slot_params *prm, uint32_t row,
                 int64_t start, uint32_t n, int64_t *out)
{
    struct sp p;
    struct rowc c;
    if (!s || (!out && n))
        return BT_EINVAL;
    if (row >= s->cfg.num_rows)
        return BT_ERANGE;
    int rc = sp_init(s, prm, &p);
    if (rc)
        return rc;
    rowc_load(s, &p, &c, row);
    /* positions start + i, computed unsigned: past INT64_MAX they wrap
     * negative, which maps to -1 like any position no block backs */
    for (uint32_t i = 0; i < n; i++)
        out[i] = (int64_t)((uint64_t)start + i);
    slots_run(s, &p, &c, out, n, out);
    return BT_OK;
}

/* Out is the caller's scratch: on BT_ERANGE its first entries may be written. */
int bt_slots_req(const bt_seg *s, const bt_slot_params *prm, const int32_t *rows,
                 const int64_t *pos, uint32_t n, int64_t *out)
{
    struct sp p;
    struct rowc c = { .row = UINT32_MAX };
    if (!s || (n && (!rows || !pos || !out)))
        return BT_EINVAL;
    int rc = sp_init(s, prm, &p);
    if (rc)
        return rc;
    if (p.dense)
        return req_dense(s, p.shift, rows, pos, n, out);
    for (uint32_t i = 0; i < n;) {
        uint32_t row = (uint32_t)rows[i], j = i + 1;
        if (row >= s->cfg.num_rows)     /* negatives wrap: refused */
            return BT_ERANGE;
        while (j < n && (uint32_t)rows[j] == row)
            j++;
        if (row != c.row)
            rowc_load(s, &p, &c, row);
        slots_run(s, &p, &c, pos + i, j - i, out + i);
        i = j;
    }
    return BT_OK;
}

/* query_start_loc from 0, never decreasing, within out_len; every row
 * valid. Branch-free reductions (they vectorize): one pass each, before
 * anything is written. *end: qsl[num_reqs] as read here; *decode: every
 * request has one token. */
BT_VECTORIZE
static int qsl_check(const bt_seg *s, const int32_t *rows, const int32_t *qsl,
                     uint32_t num_reqs, uint32_t out_len, int32_t *end, int *decode)
{
    int bad = qsl[0] != 0, one = 1;
    for (uint32_t i = 0; i < num_reqs; i++) {
        bad |= qsl[i + 1] < qsl[i];
        one &= (uint32_t)qsl[i + 1] - (uint32_t)qsl[i] == 1u;
    }
    *decode = one;
    *end = qsl[num_reqs];
    if (bad || *end < 0 || (uint32_t)*end > out_len)
        return BT_EINVAL;
    uint32_t top = 0;                   /* the largest row named; negatives wrap: refused */
    if (rows)
        for (uint32_t i = 0; i < num_reqs; i++)
            top = (uint32_t)rows[i] > top ? (uint32_t)rows[i] : top;
    else
        top = num_reqs ? num_reqs - 1 : 0;
    return num_reqs && top >= s->cfg.num_rows ? BT_ERANGE : BT_OK;
}

int bt_slots_qsl(const bt_seg *s, const bt_slot_params *prm, const int32_t *rows,
                 const int32_t *qsl, uint32_t num_reqs, const int64_t *pos,
                 int64_t *out, uint32_t out_len)
{
    struct sp p;
    struct rowc c;
    if (!s || !qsl || !out || (num_reqs && !pos))
        return BT_EINVAL;
    int rc = sp_init(s, prm, &p);
    if (rc)
        return rc;
    int32_t end;
    int decode;
    if ((rc = qsl_check(s, rows, qsl, num_reqs, out_len, &end, &decode)))
        return rc;
    if (p.dense) {
        if (decode)
            decode_dense(s, p.shift, rows, num_reqs, pos, out);
#ifdef BT_HAVE_AVX2_DECODE
        else if (bt_slots_simd)
            qsl_avx2(s, p.shift, rows, qsl, num_reqs, end, pos, out);
#endif
        else
            qsl_dense(s, p.shift, rows, qsl, num_reqs, pos, out, end);
    } else {
        int32_t t0 = 0;
        for (uint32_t i = 0; i < num_reqs; i++) {
            int32_t t1 = qsl[i + 1];
            uint32_t row = rows ? (uint32_t)rows[i] : i;
            t1 = t1 < t0 ? t0 : t1 > end ? end : t1;   /* as in qsl_dense */
            rowc_load(s, &p, &c, row < s->cfg.num_rows ? row : 0);
            slots_run(s, &p, &c, pos + t0, (uint32_t)(t1 - t0), out + t0);
            t0 = t1;
        }
    }
    for (uint32_t t = (uint32_t)end; t < out_len; t++)
        out[t] = -1;
    return BT_OK;
}
