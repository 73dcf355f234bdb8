/*
 * mirror.c -- GPU mirror descriptors and dirty tracking, without CUDA.
 *
 * Each row's seqlock is also its version. A mirror records, per row, the
 * version and length its device copy last received. Staging compares: an
 * unchanged version is skipped; if nothing but appends happened since (the
 * row's rewrite_seq is older than what the mirror saw), only the new tail is
 * staged; otherwise the row up to the longer of the two lengths. So a decode
 * step that appends one block to each of 256 rows stages 256 entries and 256
 * counts, not 256 rows.
 */
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>
#include "bt_internal.h"


/* The fields a descriptor (bt_mirror_desc) and a mirror slot share by name,
 * copied either way: plain copies, published and read under the slot's
 * state and generation words. */
#define DESC_COPY(dst, src) do {                                        \
        memcpy((dst)->uuid, (src)->uuid, sizeof((dst)->uuid));          \
        memcpy((dst)->handle, (src)->handle, sizeof((dst)->handle));    \
        (dst)->alloc_size = (src)->alloc_size;                          \
        (dst)->table_off = (src)->table_off;                            \
        (dst)->counts_off = (src)->counts_off;                          \
        (dst)->device_index = (src)->device_index;                      \
    } while (0)

static int after(uint32_t a, uint32_t b) { return (int32_t)(a - b) > 0; }

static int mirror_ok(const bt_seg *s, uint32_t idx)
{
    return s && idx < s->cfg.max_mirrors;
}

int bt_mirror_claim(bt_seg *s, uint32_t *idx_out)
{
    if (!s || !idx_out)
        return BT_EINVAL;
    for (uint32_t i = 0; i < s->cfg.max_mirrors; i++) {
        struct bt_mirror *m = &s->mirrors[i];
        uint32_t st = BT_MIRROR_FREE;
        if (!bt_cas_acqrel(&m->state, &st, (uint32_t)BT_MIRROR_CLAIMED))
            continue;
        bt_store_relaxed(&m->exporter_pid, (int32_t)getpid());
        bt_store_relaxed(&m->exporter_start, bt_self_start_time());
        bt_store_relaxed(&m->valid, 0u);
        *idx_out = i;
        return BT_OK;
    }
    return BT_ENOCLIENTS;
}

int bt_mirror_publish(bt_seg *s, uint32_t idx, const bt_mirror_desc *d)
{
    if (!mirror_ok(s, idx) || !d)
        return s && d ? BT_ERANGE : BT_EINVAL;
    struct bt_mirror *m = &s->mirrors[idx];
    uint64_t need_t = (uint64_t)s->cfg.num_rows * s->cfg.row_width * 4, need_c = (uint64_t)s->cfg.num_rows * 4;
    if (d->table_off > d->alloc_size || d->alloc_size - d->table_off < need_t ||
        d->counts_off > d->alloc_size || d->alloc_size - d->counts_off < need_c)
        return BT_EINVAL;               /* the allocation could not hold the copy */
    bt_store_relaxed(&m->state, (uint32_t)BT_MIRROR_CLAIMED);
    DESC_COPY(m, d);
    bt_store_relaxed(&m->exporter_pid, (int32_t)getpid());
    bt_store_relaxed(&m->exporter_start, bt_self_start_time());
    bt_store_relaxed(&m->valid, 0u);
    bt_fetch_add_relaxed(&m->generation, 1ull);
    bt_store_release(&m->state, (uint32_t)BT_MIRROR_PUBLISHED);
    return BT_OK;
}

int bt_mirror_retire(bt_seg *s, uint32_t idx)
{
    if (!mirror_ok(s, idx))
        return s ? BT_ERANGE : BT_EINVAL;
    struct bt_mirror *m = &s->mirrors[idx];
    bt_fetch_add_relaxed(&m->generation, 1ull);
    bt_store_relaxed(&m->valid, 0u);
    bt_store_release(&m->state, (uint32_t)BT_MIRROR_FREE);
    return BT_OK;
}

int bt_mirror_get(const bt_seg *s, uint32_t idx, bt_mirror_desc *o)
{
    if (!mirror_ok(s, idx) || !o)
        return s && o ? BT_ERANGE : BT_EINVAL;
    const struct bt_mirror *m = &s->mirrors[idx];
    /* A publish in progress shows as CLAIMED: read the state around the copy. */
    for (int tries = 0; tries < 1000; tries++) {
        uint64_t g1 = bt_load_acquire(&m->generation);
        o->state = bt_load_acquire(&m->state);
        o->exporter_pid = bt_load_relaxed(&m->exporter_pid);
        o->exporter_start = bt_load_relaxed(&m->exporter_start);
        DESC_COPY(o, m);
        o->_pad = 0;
        bt_fence_acquire();
        o->generation = bt_load_relaxed(&m->generation);
        if (o->generation == g1 && bt_load_relaxed(&m->state) == o->state)
            return BT_OK;
    }
    return BT_EBUSY;
}

int bt_mirror_invalidate(bt_seg *s, uint32_t idx)
{
    if (!mirror_ok(s, idx))
        return s ? BT_ERANGE : BT_EINVAL;
    bt_store_release(&s->mirrors[idx].valid, 0u);
    return BT_OK;
}

static int lock_mirror(struct bt_mirror *m)
{
    uint32_t me = (uint32_t)getpid(), cur = 0;
    if (bt_cas_acqrel(&m->lock, &cur, me))
        return BT_OK;
    if (cur != me && !(kill((pid_t)cur, 0) < 0 && errno == ESRCH))
        return BT_EBUSY;
    /* Our own stale lock (a full re-stage takes it again), or a dead
     * process's: that one may have died between staging and its copy, so
     * the records may be ahead of the device: the next stage is a full one. */
    if (!bt_cas_acqrel(&m->lock, &cur, me))
        return BT_EBUSY;
    if (cur != me)
        bt_store_relaxed(&m->valid, 0u);
    return BT_OK;
}

struct stage {
    int64_t *idx;
    int32_t *val;
    uint64_t cap, n;
};

/* Stage one row if it changed; 1 if staged, 0 if clean, <0 on error. */
static int stage_row(bt_seg *s, uint32_t row, struct bt_synced *sy, int valid, struct stage *st)
{
    const struct bt_row *r = &s->rows[row];
    const int32_t *e = bt_row_ids(s, row);
    uint32_t w = s->cfg.row_width;
    uint64_t t0 = 0;
    for (uint32_t spin = 0, s1; !bt_seq_backoff(spin, &t0); spin++) {
        if (!bt_seq_read_begin(&r->seq, &s1))
            continue;
        if (valid && s1 == sy->seq)
            return 0;
        /* The mirror holds the dense table: a paged row shows there as empty. */
        uint32_t nb = bt_row_paged(s, row) ? 0 : bt_row_nblocks(s, row);
        if (nb > w)
            nb = w;
        uint32_t old = valid ? (sy->nb > w ? w : sy->nb) : w;
        int appends_only = valid && !after(bt_load_relaxed(&r->rewrite_seq), sy->seq) && nb >= old;
        uint32_t from = appends_only ? old : 0, to = nb > old ? nb : old;
        if (st->n + (to - from) + 1 > st->cap)
            return BT_EINVAL;
        uint64_t base = (uint64_t)row * w;
        for (uint32_t j = from; j < to; j++) {
            st->idx[st->n + j - from] = (int64_t)(base + j);
            st->val[st->n + j - from] = j < nb ? bt_load_relaxed(&e[j]) : 0;
        }
        st->idx[st->n + to - from] = (int64_t)((uint64_t)s->cfg.num_rows * w + row);
        st->val[st->n + to - from] = (int32_t)nb;
        if (bt_seq_read_retry(&r->seq, s1))
            continue;                   /* torn: read it again */
        st->n += to - from + 1;
        sy->seq = s1;
        sy->nb = nb;
        return 1;
    }
    return BT_EBUSY;
}

int bt_mirror_stage(bt_seg *s, uint32_t idx, uint32_t num_rows, int64_t *idx_out,
                    int32_t *val_out, uint64_t cap, uint64_t *n_out, uint32_t *rows_dirty)
{
    return bt_mirror_stage_ex(s, idx, num_rows, 0, idx_out, val_out, cap, n_out, rows_dirty, NULL);
}

static void sync_read(const struct bt_mirror *m, bt_mirror_sync *o)
{
    *o = (bt_mirror_sync){ .pid = bt_load_relaxed(&m->sync_pid),
                           .start_time = bt_load_relaxed(&m->sync_start),
                           .seq = bt_load_acquire(&m->sync_seq) };
    memcpy(o->event, m->sync_event, sizeof(o->event));
}

int bt_mirror_sync_get(const bt_seg *s, uint32_t idx, bt_mirror_sync *o)
{
    if (!mirror_ok(s, idx) || !o)
        return s && o ? BT_ERANGE : BT_EINVAL;
    sync_read(&s->mirrors[idx], o);
    return BT_OK;
}

int bt_mirror_unlock(bt_seg *s, uint32_t idx)
{
    if (!mirror_ok(s, idx))
        return s ? BT_ERANGE : BT_EINVAL;
    uint32_t me = (uint32_t)getpid();
    return bt_cas_acqrel(&s->mirrors[idx].lock, &me, 0u) ? BT_OK : BT_EBUSY;
}

int bt_mirror_sync_done(bt_seg *s, uint32_t idx, const bt_mirror_sync *rec)
{
    if (!mirror_ok(s, idx) || !rec)
        return s && rec ? BT_ERANGE : BT_EINVAL;
    struct bt_mirror *m = &s->mirrors[idx];
    if (bt_load_acquire(&m->lock) != (uint32_t)getpid())
        return BT_EBUSY;
    memcpy(m->sync_event, rec->event, sizeof(m->sync_event));
    bt_store_relaxed(&m->sync_pid, (int32_t)getpid());
    bt_store_relaxed(&m->sync_start, bt_self_start_time());
    bt_store_release(&m->sync_seq, bt_load_relaxed(&m->sync_seq) + 1);
    return bt_mirror_unlock(s, idx);
}

int bt_mirror_stage_ex(bt_seg *s, uint32_t idx, uint32_t num_rows, int flags,
                       int64_t *idx_out, int32_t *val_out, uint64_t cap,
                       uint64_t *n_out, uint32_t *rows_dirty, bt_mirror_sync *last_out)
{
    if (!mirror_ok(s, idx) || !n_out || (cap && (!idx_out || !val_out)))
        return s && n_out ? BT_ERANGE : BT_EINVAL;
    if (num_rows > s->cfg.num_rows)
        return BT_ERANGE;
    struct bt_mirror *m = &s->mirrors[idx];
    int rc = lock_mirror(m);
    if (rc)
        return rc;
    struct bt_synced *sy = s->synced + (uint64_t)idx * s->cfg.num_rows;
    struct stage st = { .idx = idx_out, .val = val_out, .cap = cap };
    int valid = bt_load_acquire(&m->valid) != 0;
    uint32_t dirty = 0;
    if (!valid)
        num_rows = s->cfg.num_rows;     /* an unknown device copy: every row */
    for (uint32_t row = 0; row < num_rows && rc >= 0; row++) {
        rc = stage_row(s, row, &sy[row], valid, &st);
        dirty += rc > 0;
    }
    if (rc < 0) {
        bt_store_relaxed(&m->valid, 0u);  /* records may be ahead of the device */
    } else {
        bt_store_relaxed(&m->valid, 1u);
        rc = BT_OK;
    }
    if (!rc && (flags & BT_STAGE_KEEP_LOCK)) {
        if (last_out)
            sync_read(m, last_out);
    } else {
        bt_store_release(&m->lock, 0u);
    }
    *n_out = rc ? 0 : st.n;
    if (rows_dirty)
        *rows_dirty = rc ? 0 : dirty;
    return rc;
}

/* The sync's host side in one call: a Python caller paid ~20 us in four
 * calls, their argument handling and the record comparison; this is the
 * same work (bt_mirror_stage_ex keeping the lock, then "whose copy must the
 * stream follow") with the answer written where the launch reads it. */
int bt_mirror_sync_begin(bt_seg *s, uint32_t idx, uint32_t num_rows,
                         int64_t *idx_out, int32_t *val_out, uint64_t cap,
                         const uint8_t *self_event, uint32_t block, uint32_t max_grid,
                         int64_t *n_arg, bt_mirror_plan *out)
{
    if (!out || !self_event || !block || !max_grid)
        return BT_EINVAL;
    uint64_t n = 0;
    uint32_t dirty = 0;
    int rc = bt_mirror_stage_ex(s, idx, num_rows, BT_STAGE_KEEP_LOCK, idx_out, val_out, cap,
                                &n, &dirty, &out->last);
    if (rc)
        return rc;                      /* the lock is not held */
    const bt_mirror_sync *l = &out->last;
    int order = BT_ORDER_NONE;
    if (l->seq != 0 && l->pid > 0) {
        if (l->pid != (int32_t)getpid() || l->start_time != bt_self_start_time())
            order = BT_ORDER_PEER;
        else if (memcmp(l->event, self_event, sizeof(l->event)) == 0)
            order = BT_ORDER_SELF;
        /* else: a syncer of ours with another event (an older publish): its
         * copies went to another allocation, nothing to follow. */
    }
    uint64_t grid = (n + block - 1) / block;
    out->n = n;
    out->rows_dirty = dirty;
    out->order = order;
    out->grid = (uint32_t)(grid < max_grid ? grid : max_grid);
    if (n_arg)
        *n_arg = (int64_t)n;
    return BT_OK;
}
