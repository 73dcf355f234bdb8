/*
 * bt_stress.h -- the random workload of test_mt_stress (threads) and
 * test_fork_stress (processes), with DPDK-style ownership stamping.
 *
 * Every worker has its own client and does random allocator and row calls.
 * Beside the segment, in memory all workers share, it keeps:
 *
 *   stamp[block]        0, or the client id of the worker that got the block
 *                       fresh from the allocator (alloc, alloc_append, step).
 *                       Getting a block fresh CASes 0 -> me and fails the test
 *                       if it was not 0: the block was handed out while its
 *                       previous holder still held it. The stamper CASes back
 *                       to 0 *before* the call that drops its last reference.
 *   refs[worker][block] references this worker holds, by its own count:
 *                       incremented after a call that took one succeeds,
 *                       decremented before the call that drops it. When all
 *                       workers are quiet, the library's count of every block
 *                       must equal the sum over workers.
 *
 * A worker also mirrors its own rows and hand, checks every return code
 * against what the mirror predicts (BT_EROWFULL, BT_EHANDFULL exactly when
 * due; BT_ENOBLOCKS only where the pool may be dry; BT_ENOTHELD only for
 * blocks it took from another worker's row), and reads its rows back.
 * Reads of other workers' rows check that a seqlocked read is never torn.
 *
 * Seeds: worker i uses t_substream(i); the seed is printed on failure.
 */
#ifndef BT_STRESS_H
#define BT_STRESS_H

#include "bt_test.h"

#define ST_W        8                   /* row width */
#define ST_HAND     24                  /* hand size */
#define ST_MAXR     4                   /* rows a worker claims at most */
#define ST_MAXW     64                  /* workers at most */

static T_UNUSED bt_config st_config(uint32_t workers)
{
    uint32_t rows = workers * ST_MAXR > 4 ? workers * ST_MAXR - 2 : 2;   /* ENOROWS happens */
    bt_config c = t_config(2, 128, rows, ST_W);
    c.max_clients = workers + 4;
    c.hand_size = ST_HAND;
    return c;
}

/* The same with clients' magazines on (client.c): pools of 64 blocks per
 * client slot make magazines of 8 (bt_mag_cap_of), so that every alloc of
 * st_one (1 to 4 blocks) goes through one, switching pools as it goes. */
static T_UNUSED bt_config st_config_mag(uint32_t workers)
{
    bt_config c = st_config(workers);
    c.blocks_per_pool = 64 * c.max_clients;
    return c;
}

/* Shared by all workers: one MAP_SHARED anonymous mapping, made before any
 * fork, so its pointers are valid in every process. */
struct st_shared {
    uint64_t  total;
    uint32_t  nworkers;
    uint32_t  stop;
    uint32_t *stamp;                    /* [total] */
    uint32_t *refs;                     /* [nworkers][total] */
    uint32_t  client_id[ST_MAXW];
    uint64_t  ops[ST_MAXW];
    uint64_t  calls_ok[ST_MAXW];
    uint64_t  calls_refused[ST_MAXW];   /* expected errors: full, dry, freed meanwhile */
};

static T_UNUSED struct st_shared *st_shared_new(uint64_t total, uint32_t nworkers)
{
    size_t size = sizeof(struct st_shared) + (size_t)total * 4 * (1 + nworkers);
    void *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        T_FAIL("mmap: %s", strerror(errno));
    struct st_shared *sh = m;
    sh->total = total;
    sh->nworkers = nworkers;
    sh->stamp = (uint32_t *)(sh + 1);
    sh->refs = sh->stamp + total;
    return sh;
}

struct st_row { uint32_t row, n; int32_t ids[ST_W]; };

struct st_worker {
    bt_seg           *seg;
    bt_client        *cl;
    struct st_shared *sh;
    uint32_t          w, me;            /* worker index, client id */
    uint64_t          rnd;
    uint64_t          deadline_ns, max_ops;
    uint32_t          nloose, nrows;
    int32_t           loose[ST_HAND];
    struct st_row     rows[ST_MAXR];
};

#define ST_FAIL(w, ...) do { \
    char st_m_[400]; \
    snprintf(st_m_, sizeof(st_m_), __VA_ARGS__); \
    T_FAIL("worker %u (client %u, op %" PRIu64 "): %s", (w)->w, (w)->me, \
           (w)->sh->ops[(w)->w], st_m_); \
} while (0)

static uint32_t *st_refs(struct st_worker *w, int32_t id)
{
    return &w->sh->refs[(uint64_t)w->w * w->sh->total + (uint32_t)id];
}

/* A reference taken (after the call succeeded). */
static void st_got(struct st_worker *w, int32_t id, int fresh, int pool)
{
    if (id <= 0 || (uint64_t)id >= w->sh->total)
        ST_FAIL(w, "got block id %d, out of range", id);
    if (pool >= 0 && (uint32_t)id / (uint32_t)(w->sh->total / 2) != (uint32_t)pool)
        ST_FAIL(w, "block %d is not from pool %d", id, pool);
    if (fresh) {
        uint32_t zero = 0;
        if (!__atomic_compare_exchange_n(&w->sh->stamp[id], &zero, w->me, 0, __ATOMIC_ACQ_REL,
                                         __ATOMIC_ACQUIRE))
            ST_FAIL(w, "block %d handed out fresh while client %u still holds it (stamp)", id,
                    zero);
        uint32_t ref, owner;
        T_OK(bt_block_get(w->seg, id, &ref, &owner));
        if (ref < 1 || owner != w->me)
            ST_FAIL(w, "fresh block %d: refcount %u owner %u", id, ref, owner);
    }
    __atomic_store_n(st_refs(w, id), *st_refs(w, id) + 1, __ATOMIC_RELAXED);
}

/* A reference about to be dropped (before the call). Returns 1 if this was
 * the stamper's last reference and the stamp was cleared. */
static int st_drop(struct st_worker *w, int32_t id)
{
    uint32_t *r = st_refs(w, id);
    if (*r == 0)
        ST_FAIL(w, "test bug: dropping block %d, not held", id);
    __atomic_store_n(r, *r - 1, __ATOMIC_RELAXED);
    if (*r == 0 && __atomic_load_n(&w->sh->stamp[id], __ATOMIC_ACQUIRE) == w->me) {
        uint32_t me = w->me;
        if (!__atomic_compare_exchange_n(&w->sh->stamp[id], &me, 0u, 0, __ATOMIC_ACQ_REL,
                                         __ATOMIC_ACQUIRE))
            ST_FAIL(w, "block %d: my stamp became %u", id, me);
        return 1;
    }
    return 0;
}

/* The call failed after all: the references are still ours. */
static T_UNUSED void st_undrop(struct st_worker *w, int32_t id, int cleared)
{
    __atomic_store_n(st_refs(w, id), *st_refs(w, id) + 1, __ATOMIC_RELAXED);
    if (cleared) {
        uint32_t zero = 0;
        if (!__atomic_compare_exchange_n(&w->sh->stamp[id], &zero, w->me, 0, __ATOMIC_ACQ_REL,
                                         __ATOMIC_ACQUIRE))
            ST_FAIL(w, "block %d taken fresh by client %u while a failed call kept it mine", id,
                    zero);
    }
}

static void st_count(struct st_worker *w, int refused)
{
    if (refused)
        w->sh->calls_refused[w->w]++;
    else
        w->sh->calls_ok[w->w]++;
}

/* k random loose references out of the hand mirror. */
static uint32_t st_take_loose(struct st_worker *w, uint32_t k, int32_t *out)
{
    if (k > w->nloose)
        k = w->nloose;
    for (uint32_t i = 0; i < k; i++) {
        uint32_t j = t_below(&w->rnd, w->nloose);
        out[i] = w->loose[j];
        w->loose[j] = w->loose[--w->nloose];
    }
    return k;
}
static void st_put_loose(struct st_worker *w, const int32_t *ids, uint32_t k)
{
    for (uint32_t i = 0; i < k; i++) {
        if (w->nloose >= ST_HAND)
            ST_FAIL(w, "test bug: hand mirror overflow");
        w->loose[w->nloose++] = ids[i];
    }
}

/* Read any row: a consistent snapshot whatever its owner is doing. */
static uint32_t st_read_any(struct st_worker *w, uint32_t row, int32_t *ids)
{
    bt_row_info ri;
    int rc = bt_row_read(w->seg, row, ids, ST_W, &ri);
    if (rc)
        ST_FAIL(w, "bt_row_read(%u) returned %s", row, bt_errname(rc));
    if (ri.num_blocks > ST_W)
        ST_FAIL(w, "row %u: num_blocks %u", row, ri.num_blocks);
    if (!ri.owner && ri.num_blocks)
        ST_FAIL(w, "row %u: free but %u blocks", row, ri.num_blocks);
    for (uint32_t i = 0; i < ri.num_blocks; i++)
        if (ids[i] <= 0 || (uint64_t)ids[i] >= w->sh->total)
            ST_FAIL(w, "row %u (owner %u, %u blocks): entry %u is %d: a torn or stale read",
                    row, ri.owner, ri.num_blocks, i, ids[i]);
    return ri.num_blocks;
}

/* My rows read back exactly as mirrored, tails zero. */
static void st_verify_mine(struct st_worker *w)
{
    bt_seg_info info = t_info(w->seg);
    const int32_t *tab = t_table(w->seg);
    for (uint32_t k = 0; k < w->nrows; k++) {
        struct st_row *m = &w->rows[k];
        int32_t ids[ST_W];
        bt_row_info ri;
        T_OK(bt_row_read(w->seg, m->row, ids, ST_W, &ri));
        if (ri.owner != w->me || ri.num_blocks != m->n || ri.flags != BT_ROW_MANAGED)
            ST_FAIL(w, "row %u: owner %u blocks %u, mirror says me / %u", m->row, ri.owner,
                    ri.num_blocks, m->n);
        for (uint32_t i = 0; i < m->n; i++)
            if (ids[i] != m->ids[i])
                ST_FAIL(w, "row %u entry %u is %d, mirror %d", m->row, i, ids[i], m->ids[i]);
        for (uint32_t i = m->n; i < ST_W; i++) {
            int32_t v = __atomic_load_n(&tab[(uint64_t)m->row * info.config.row_width + i],
                                        __ATOMIC_RELAXED);
            if (v)
                ST_FAIL(w, "row %u entry %u past num_blocks %u is %d", m->row, i, m->n, v);
        }
    }
    bt_client_slot_info si;
    T_OK(bt_client_slot_get(w->seg, w->me, &si));
    if (si.hand_count != w->nloose || si.rows != w->nrows)
        ST_FAIL(w, "slot says hand %u rows %u, mirror %u / %u", si.hand_count, si.rows,
                w->nloose, w->nrows);
}

/* A block id this worker holds (loose or in a row), or 0. */
static int32_t st_pick_held(struct st_worker *w)
{
    uint32_t total = w->nloose;
    for (uint32_t k = 0; k < w->nrows; k++)
        total += w->rows[k].n;
    if (!total)
        return 0;
    uint32_t j = t_below(&w->rnd, total);
    if (j < w->nloose)
        return w->loose[j];
    j -= w->nloose;
    for (uint32_t k = 0; k < w->nrows; k++) {
        if (j < w->rows[k].n)
            return w->rows[k].ids[j];
        j -= w->rows[k].n;
    }
    return 0;
}

/* A block id seen in some other row (maybe freed by the time it is used). */
static int32_t st_pick_seen(struct st_worker *w)
{
    int32_t ids[ST_W];
    uint32_t rows = t_info(w->seg).config.num_rows;
    uint32_t n = st_read_any(w, t_below(&w->rnd, rows), ids);
    return n ? ids[t_below(&w->rnd, n)] : 0;
}

static void st_drop_row_entries(struct st_worker *w, const struct st_row *m, uint32_t from,
                                uint8_t *cleared)
{
    for (uint32_t i = from; i < m->n; i++)
        cleared[i] = (uint8_t)st_drop(w, m->ids[i]);
}

static void st_remove_row(struct st_worker *w, uint32_t k)
{
    w->rows[k] = w->rows[--w->nrows];
}

enum { OP_ALLOC, OP_RELEASE, OP_SHARE, OP_SHARE_SEEN, OP_CLAIM, OP_APPEND, OP_ALLOC_APPEND,
       OP_APPEND_SHARED, OP_TRUNCATE, OP_SET, OP_RELEASE_ROW, OP_MOVE, OP_SWAP, OP_STEP,
       OP_TOKENS, OP_READ, OP_COUNT };
static const uint8_t st_weights[OP_COUNT] = {
    [OP_ALLOC] = 6, [OP_RELEASE] = 5, [OP_SHARE] = 2, [OP_SHARE_SEEN] = 2, [OP_CLAIM] = 4,
    [OP_APPEND] = 4, [OP_ALLOC_APPEND] = 4, [OP_APPEND_SHARED] = 3, [OP_TRUNCATE] = 2,
    [OP_SET] = 2, [OP_RELEASE_ROW] = 3, [OP_MOVE] = 1, [OP_SWAP] = 1, [OP_STEP] = 4,
    [OP_TOKENS] = 1, [OP_READ] = 3,
};

static int st_pick_op(struct st_worker *w)
{
    uint32_t sum = 0;
    for (int i = 0; i < OP_COUNT; i++)
        sum += st_weights[i];
    uint32_t x = t_below(&w->rnd, sum);
    for (int i = 0; i < OP_COUNT; i++) {
        if (x < st_weights[i])
            return i;
        x -= st_weights[i];
    }
    return OP_READ;
}

#define ST_EXPECT(w, cond, rc, what) do { \
    if (!(cond)) ST_FAIL(w, "%s returned %s", what, bt_errname(rc)); \
} while (0)

static void st_one(struct st_worker *w)
{
    int32_t ids[ST_W * ST_MAXR + ST_HAND];
    uint8_t cleared[ST_W * ST_MAXR + ST_HAND];
    int rc;
    struct st_row *m = w->nrows ? &w->rows[t_below(&w->rnd, w->nrows)] : NULL;
    int pool = (int)t_below(&w->rnd, 2);

    switch (st_pick_op(w)) {
    case OP_ALLOC: {
        uint32_t k = 1 + t_below(&w->rnd, 4);
        rc = bt_blocks_alloc(w->cl, (uint32_t)pool, k, ids);
        if (w->nloose + k > ST_HAND) {
            ST_EXPECT(w, rc == BT_EHANDFULL, rc, "bt_blocks_alloc past the hand");
        } else {
            ST_EXPECT(w, rc == 0 || rc == BT_ENOBLOCKS, rc, "bt_blocks_alloc");
            for (uint32_t i = 0; !rc && i < k; i++)
                st_got(w, ids[i], 1, pool);
            if (!rc)
                st_put_loose(w, ids, k);
        }
        st_count(w, rc != 0);
        break;
    }
    case OP_RELEASE: {
        uint32_t k = st_take_loose(w, 1 + t_below(&w->rnd, 4), ids);
        if (!k)
            break;
        for (uint32_t i = 0; i < k; i++)
            cleared[i] = (uint8_t)st_drop(w, ids[i]);
        rc = bt_blocks_release(w->cl, ids, k);
        ST_EXPECT(w, rc == 0, rc, "bt_blocks_release of held blocks");
        st_count(w, 0);
        break;
    }
    case OP_SHARE:
    case OP_SHARE_SEEN: {
        int seen = t_below(&w->rnd, 2) == 0;
        int32_t id = seen ? st_pick_seen(w) : st_pick_held(w);
        if (!id)
            break;
        int own = *st_refs(w, id) > 0;
        rc = bt_blocks_share(w->cl, &id, 1);
        if (w->nloose + 1 > ST_HAND)
            ST_EXPECT(w, rc == BT_EHANDFULL, rc, "bt_blocks_share past the hand");
        else if (own)
            ST_EXPECT(w, rc == 0, rc, "bt_blocks_share of a block I hold");
        else
            ST_EXPECT(w, rc == 0 || rc == BT_ENOTHELD, rc, "bt_blocks_share of a block seen");
        if (!rc) {
            st_got(w, id, 0, -1);
            st_put_loose(w, &id, 1);
        }
        st_count(w, rc != 0);
        break;
    }
    case OP_CLAIM: {
        if (w->nrows >= ST_MAXR)
            break;
        uint32_t row;
        rc = bt_row_claim(w->cl, ((uint64_t)w->w << 32) | w->sh->ops[w->w], -1, BT_ROW_MANAGED,
                          &row);
        ST_EXPECT(w, rc == 0 || rc == BT_ENOROWS, rc, "bt_row_claim");
        if (!rc) {
            for (uint32_t k = 0; k < w->nrows; k++)
                if (w->rows[k].row == row)
                    ST_FAIL(w, "claimed row %u twice", row);
            w->rows[w->nrows++] = (struct st_row){ .row = row, .n = 0 };
        }
        st_count(w, rc != 0);
        break;
    }
    case OP_APPEND: {
        if (!m || !w->nloose)
            break;
        uint32_t k = st_take_loose(w, 1 + t_below(&w->rnd, 3), ids);
        rc = bt_row_append(w->cl, m->row, ids, k);
        if (m->n + k > ST_W) {
            ST_EXPECT(w, rc == BT_EROWFULL, rc, "bt_row_append past the width");
            st_put_loose(w, ids, k);
        } else {
            ST_EXPECT(w, rc == 0, rc, "bt_row_append of loose blocks");
            memcpy(m->ids + m->n, ids, k * 4);
            m->n += k;
        }
        st_count(w, rc != 0);
        break;
    }
    case OP_ALLOC_APPEND: {
        if (!m)
            break;
        uint32_t k = 1 + t_below(&w->rnd, 3);
        rc = bt_row_alloc_append(w->cl, m->row, (uint32_t)pool, k, ids);
        if (m->n + k > ST_W) {
            ST_EXPECT(w, rc == BT_EROWFULL, rc, "bt_row_alloc_append past the width");
        } else {
            ST_EXPECT(w, rc == 0 || rc == BT_ENOBLOCKS, rc, "bt_row_alloc_append");
            for (uint32_t i = 0; !rc && i < k; i++) {
                st_got(w, ids[i], 1, pool);
                m->ids[m->n++] = ids[i];
            }
        }
        st_count(w, rc != 0);
        break;
    }
    case OP_APPEND_SHARED: {
        if (!m)
            break;
        int32_t id = t_below(&w->rnd, 2) ? st_pick_seen(w) : st_pick_held(w);
        if (!id)
            break;
        int own = *st_refs(w, id) > 0;
        rc = bt_row_append_shared(w->cl, m->row, &id, 1);
        if (m->n + 1 > ST_W)
            ST_EXPECT(w, rc == BT_EROWFULL, rc, "bt_row_append_shared past the width");
        else if (own)
            ST_EXPECT(w, rc == 0, rc, "bt_row_append_shared of a block I hold");
        else
            ST_EXPECT(w, rc == 0 || rc == BT_ENOTHELD, rc, "bt_row_append_shared of a block seen");
        if (!rc) {
            st_got(w, id, 0, -1);
            m->ids[m->n++] = id;
        }
        st_count(w, rc != 0);
        break;
    }
    case OP_TRUNCATE: {
        if (!m)
            break;
        uint32_t keep = t_below(&w->rnd, m->n + 1);
        st_drop_row_entries(w, m, keep, cleared);
        rc = bt_row_truncate(w->cl, m->row, keep);
        ST_EXPECT(w, rc == 0, rc, "bt_row_truncate");
        m->n = keep;
        st_count(w, 0);
        break;
    }
    case OP_SET: {
        if (!m)
            break;
        uint32_t k = st_take_loose(w, t_below(&w->rnd, ST_W + 1), ids);
        st_drop_row_entries(w, m, 0, cleared);
        rc = bt_row_set(w->cl, m->row, ids, k);
        ST_EXPECT(w, rc == 0, rc, "bt_row_set");
        memcpy(m->ids, ids, k * 4);
        m->n = k;
        st_count(w, 0);
        break;
    }
    case OP_RELEASE_ROW: {
        if (!m)
            break;
        st_drop_row_entries(w, m, 0, cleared);
        rc = bt_row_release(w->cl, m->row);
        ST_EXPECT(w, rc == 0, rc, "bt_row_release");
        st_remove_row(w, (uint32_t)(m - w->rows));
        st_count(w, 0);
        break;
    }
    case OP_MOVE:
    case OP_SWAP: {
        if (w->nrows < 2)
            break;
        uint32_t a = t_below(&w->rnd, w->nrows), b = (a + 1 + t_below(&w->rnd, w->nrows - 1)) % w->nrows;
        struct st_row *ra = &w->rows[a], *rb = &w->rows[b];
        if (t_below(&w->rnd, 2) == 0 || rb->n) {
            rc = bt_row_swap(w->cl, ra->row, rb->row);
            ST_EXPECT(w, rc == 0, rc, "bt_row_swap");
            struct st_row t = *ra;
            memcpy(ra->ids, rb->ids, sizeof(ra->ids));
            ra->n = rb->n;
            memcpy(rb->ids, t.ids, sizeof(rb->ids));
            rb->n = t.n;
        } else {
            rc = bt_row_move(w->cl, ra->row, rb->row);      /* into an empty row */
            ST_EXPECT(w, rc == 0, rc, "bt_row_move");
            memcpy(rb->ids, ra->ids, sizeof(rb->ids));
            rb->n = ra->n;
            ra->n = 0;
        }
        st_count(w, 0);
        break;
    }
    case OP_STEP: {
        uint32_t fr[ST_MAXR], rows[ST_MAXR], nn[ST_MAXR], nf = 0, ng = 0, total = 0, nc = 0;
        uint32_t fk[ST_MAXR];
        for (uint32_t k = 0; k < w->nrows; k++) {
            uint32_t x = t_below(&w->rnd, 6);
            if (x == 0) {
                fk[nf] = k;
                fr[nf++] = w->rows[k].row;
            } else if (x < 4) {
                uint32_t room = ST_W - w->rows[k].n;
                rows[ng] = w->rows[k].row;
                nn[ng] = t_below(&w->rnd, (room < 3 ? room : 3) + 1);
                total += nn[ng++];
            }
        }
        if (!nf && !ng)
            break;
        uint8_t *cl_at = cleared;
        for (uint32_t i = 0; i < nf; i++) {
            st_drop_row_entries(w, &w->rows[fk[i]], 0, cl_at + nc);
            nc += w->rows[fk[i]].n;
        }
        rc = bt_step(w->cl, (uint32_t)pool, fr, nf, rows, nn, ng, ids);
        ST_EXPECT(w, rc == 0 || rc == BT_ENOBLOCKS, rc, "bt_step");
        /* on BT_ENOBLOCKS too, the ending rows are released (bt.h) */
        if (!rc) {
            const int32_t *src = ids;
            for (uint32_t i = 0; i < ng; i++) {
                struct st_row *g = NULL;
                for (uint32_t k = 0; k < w->nrows; k++)
                    if (w->rows[k].row == rows[i])
                        g = &w->rows[k];
                for (uint32_t j = 0; j < nn[i]; j++) {
                    st_got(w, *src, 1, pool);
                    g->ids[g->n++] = *src++;
                }
            }
        }
        for (uint32_t i = nf; i-- > 0;)       /* highest index first */
            st_remove_row(w, fk[i]);
        (void)total;
        st_count(w, rc != 0);
        break;
    }
    case OP_TOKENS: {
        if (!m)
            break;
        int64_t tok = (int64_t)t_below(&w->rnd, 1u << 20);
        T_OK(bt_row_set_tokens(w->cl, m->row, tok));
        bt_row_info ri = t_row(w->seg, m->row, NULL, 0);
        if (ri.num_tokens != tok)
            ST_FAIL(w, "row %u tokens %" PRId64 ", set %" PRId64, m->row, ri.num_tokens, tok);
        break;
    }
    case OP_READ:
        st_pick_seen(w);
        st_verify_mine(w);
        break;
    }
    w->sh->ops[w->w]++;
}

static T_UNUSED void st_run(struct st_worker *w)
{
    for (uint64_t i = 0; i < w->max_ops; i++) {
        if ((i & 63) == 0) {
            if (t_now_ns() > w->deadline_ns || __atomic_load_n(&w->sh->stop, __ATOMIC_RELAXED))
                break;
            st_verify_mine(w);
        }
        st_one(w);
    }
    st_verify_mine(w);
}

/* Forget a worker's holdings in the side arrays (its client is about to be
 * closed or recovered, which drops them all): stamps first, so that nobody
 * finds them set on blocks that come back fresh. */
static T_UNUSED void st_forget(struct st_shared *sh, uint32_t w)
{
    uint32_t me = sh->client_id[w];
    for (uint64_t b = 0; b < sh->total; b++) {
        uint32_t v = me;
        __atomic_compare_exchange_n(&sh->stamp[b], &v, 0u, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
        __atomic_store_n(&sh->refs[(uint64_t)w * sh->total + b], 0u, __ATOMIC_RELAXED);
    }
}

/* Quiet segment: the library's count of every block equals what the
 * workers say they hold; the stamps name holders; bt_seg_check agrees. */
static T_UNUSED void st_final_check(bt_seg *seg, struct st_shared *sh)
{
    uint64_t held = 0;
    for (uint64_t b = 1; b < sh->total; b++) {
        uint32_t sum = 0;
        for (uint32_t w = 0; w < sh->nworkers; w++)
            sum += sh->refs[(uint64_t)w * sh->total + b];
        uint32_t ref = t_refcnt(seg, (int32_t)b);
        if (ref != sum)
            T_FAIL("block %" PRIu64 ": library count %u, workers hold %u", b, ref, sum);
        uint32_t st = sh->stamp[b];
        if (st && !ref)
            T_FAIL("block %" PRIu64 ": stamped by client %u but free", b, st);
        held += sum > 0;
    }
    bt_check_report rep = t_check_quiet(seg);
    if (rep.blocks_held != held)
        T_FAIL("bt_seg_check: %" PRIu64 " held, workers hold %" PRIu64, rep.blocks_held, held);
}

static T_UNUSED void st_print(struct st_shared *sh, const char *what, double secs)
{
    uint64_t ops = 0, ok = 0, refused = 0;
    for (uint32_t w = 0; w < sh->nworkers; w++) {
        ops += sh->ops[w];
        ok += sh->calls_ok[w];
        refused += sh->calls_refused[w];
    }
    printf("%s: %u workers, %" PRIu64 " ops (%" PRIu64 " calls done, %" PRIu64
           " refused as expected) in %.2f s\n", what, sh->nworkers, ops, ok, refused, secs);
}

/* Seconds a stress phase runs: BT_STRESS_SECONDS, default `dflt`. */
static T_UNUSED double st_seconds(double dflt)
{
    const char *s = getenv("BT_STRESS_SECONDS");
    return s && *s ? strtod(s, NULL) : dflt;
}

/* ---- the raw pool: bt_pool_pop / bt_pool_push only ------------------------ */
/* Each raw worker pops batches of 1..16 blocks, stamps each (CAS 0 -> its
 * stamp; a failure is a block handed out twice), keeps up to 4 batches, and
 * pushes them back in random order after clearing the stamps. */
struct st_raw {
    bt_seg   *seg;
    uint32_t *stamp;                    /* [total], shared */
    uint32_t  me, pools, bpp;
    uint64_t  rnd, deadline_ns;
    uint64_t  pops, pushes, dry;
};

static T_UNUSED void st_raw_run(struct st_raw *r)
{
    int32_t held[4][16];
    uint32_t n[4] = { 0 }, nb = 0;
    for (uint64_t it = 0;; it++) {
        if ((it & 255) == 0 && t_now_ns() > r->deadline_ns)
            break;
        if (nb < 4 && (nb == 0 || t_below(&r->rnd, 2))) {
            uint32_t k = t_below(&r->rnd, 3) ? 1 + t_below(&r->rnd, 16) : 1;
            uint32_t pool = t_below(&r->rnd, r->pools);
            int rc = bt_pool_pop(r->seg, pool, k, r->me, held[nb]);
            if (rc == BT_ENOBLOCKS) {
                r->dry++;
                continue;
            }
            if (rc)
                T_FAIL("raw worker %u: bt_pool_pop(%u) returned %s", r->me, k, bt_errname(rc));
            for (uint32_t i = 0; i < k; i++) {
                int32_t id = held[nb][i];
                uint32_t zero = 0;
                if (id <= 0 || (uint32_t)id / r->bpp != pool)
                    T_FAIL("raw worker %u: popped %d from pool %u", r->me, id, pool);
                if (!__atomic_compare_exchange_n(&r->stamp[id], &zero, r->me, 0,
                                                 __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
                    T_FAIL("raw worker %u: popped block %d, which worker %u holds", r->me, id,
                           zero);
            }
            n[nb++] = k;
            r->pops += k;
        } else {
            uint32_t j = t_below(&r->rnd, nb);
            for (uint32_t i = 0; i < n[j]; i++) {
                uint32_t me = r->me;
                if (!__atomic_compare_exchange_n(&r->stamp[held[j][i]], &me, 0u, 0,
                                                 __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
                    T_FAIL("raw worker %u: my block %d is stamped %u", r->me, held[j][i], me);
            }
            int rc = bt_pool_push(r->seg, held[j], n[j]);
            if (rc)
                T_FAIL("raw worker %u: bt_pool_push returned %s", r->me, bt_errname(rc));
            r->pushes += n[j];
            nb--;
            memcpy(held[j], held[nb], sizeof(held[j]));
            n[j] = n[nb];
        }
    }
    while (nb > 0) {
        nb--;
        for (uint32_t i = 0; i < n[nb]; i++)
            __atomic_store_n(&r->stamp[held[nb][i]], 0u, __ATOMIC_RELEASE);
        int rc = bt_pool_push(r->seg, held[nb], n[nb]);
        if (rc)
            T_FAIL("raw worker %u: bt_pool_push returned %s", r->me, bt_errname(rc));
        r->pushes += n[nb];
    }
}

/* After the raw workers are done: no block is stamped any more, the two pools
 * hold free0 and free1 blocks again, and a check finds every block free. */
static T_UNUSED void st_raw_check_end(bt_seg *seg, const uint32_t *stamp, uint32_t free0,
                                      uint32_t free1)
{
    uint64_t total = t_info(seg).total_blocks;
    for (uint64_t b = 0; b < total; b++)
        T_EQ(stamp[b], 0);
    T_EQ(t_free(seg, 0), free0);
    T_EQ(t_free(seg, 1), free1);
    bt_check_report rep = t_check_quiet(seg);
    T_EQ(rep.blocks_free, total - 1);
}

#endif /* BT_STRESS_H */
