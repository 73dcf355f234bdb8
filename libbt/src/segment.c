/*
 * segment.c -- configuration, layout, create / attach / validate.
 * Attach trusts nothing in the header: it recomputes the layout from the
 * config and refuses any difference, so a later read of a region can never
 * leave the mapping.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "bt_internal.h"

void bt_config_default(bt_config *cfg)
{
    *cfg = (bt_config){ .block_size = 16, .kernel_block_size = 16, .num_pools = 1,
                        .blocks_per_pool = 65536, .num_rows = 256, .row_width = 128,
                        .max_clients = 64, .hand_size = 4096, .max_mirrors = 8 };
}

int bt_config_explain(const bt_config *c, char *buf, size_t len)
{
    const char *why = NULL;
    uint32_t k = c ? (c->kernel_block_size ? c->kernel_block_size : c->block_size) : 0;
    if (!c) why = "config is NULL";
    else if (c->block_size == 0 || c->block_size > (1u << 20)) why = "block_size must be in [1, 2^20]";
    else if (k == 0 || c->block_size % k) why = "kernel_block_size must divide block_size";
    else if (c->num_pools == 0 || c->num_pools > BT_MAX_POOLS) why = "num_pools must be in [1, 256]";
    else if (c->blocks_per_pool < 2) why = "blocks_per_pool must be at least 2";
    else if ((uint64_t)c->num_pools * c->blocks_per_pool > BT_MAX_BLOCKS) why = "num_pools * blocks_per_pool must be at most 2^30";
    else if (c->num_rows == 0 || c->num_rows > BT_MAX_ROWS) why = "num_rows must be in [1, 2^22]";
    else if (c->row_width == 0 || c->row_width > BT_MAX_WIDTH) why = "row_width must be in [1, 2^22]";
    else if ((uint64_t)c->num_rows * c->row_width * 4 > BT_MAX_TABLE) why = "num_rows * row_width * 4 must be at most 16 GiB";
    else if (c->max_clients == 0 || c->max_clients > BT_MAX_CLIENTS) why = "max_clients must be in [1, 4096]";
    else if (c->hand_size == 0 || c->hand_size > BT_MAX_HAND) why = "hand_size must be in [1, 2^20]";
    else if (c->max_mirrors > BT_MAX_MIRRORS) why = "max_mirrors must be in [0, 64]";
    else if (c->chunk_size == 0 && (c->num_chunks || c->dir_width)) why = "num_chunks and dir_width need a chunk_size";
    else if (c->chunk_size > BT_MAX_CHUNK) why = "chunk_size must be in [0, 4096]";
    else if (c->chunk_size && (c->num_chunks == 0 || c->num_chunks > BT_MAX_CHUNKS)) why = "num_chunks must be in [1, 2^26]";
    else if (c->chunk_size && (c->dir_width == 0 || c->dir_width > BT_MAX_DIR)) why = "dir_width must be in [1, 2^20]";
    else if ((uint64_t)c->num_chunks * c->chunk_size * 4 > BT_MAX_TABLE) why = "num_chunks * chunk_size * 4 must be at most 16 GiB";
    else if ((uint64_t)c->num_rows * c->dir_width * 4 > BT_MAX_TABLE) why = "num_rows * dir_width * 4 must be at most 16 GiB";
    else if ((uint64_t)c->dir_width * c->chunk_size >= (1u << 31)) why = "dir_width * chunk_size must be below 2^31";
    else if (!c->cache_pools && c->cache_keys) why = "cache_keys needs cache_pools";
    else if (c->cache_pools > c->num_pools) why = "cache_pools must be at most num_pools";
    else if (c->cache_pools && (bt_cache_keys_of(c) < 1 || bt_cache_keys_of(c) > BT_MAX_CACHE_KEYS))
        why = "cache_keys must be in [1, 2^28] (0 = 2 * blocks_per_pool)";
    else if ((uint64_t)c->cache_pools * bt_cache_keys_of(c) * sizeof(struct bt_ckey) > BT_MAX_TABLE)
        why = "cache_pools * cache_keys * 96 must be at most 16 GiB";
    if (buf && len)
        snprintf(buf, len, "%s", why ? why : "ok");
    return why ? BT_ECONFIG : BT_OK;
}

int bt_config_check(const bt_config *cfg) { return bt_config_explain(cfg, NULL, 0); }

static uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

uint32_t bt_cache_keys_of(const bt_config *c)
{
    if (!c->cache_pools)
        return 0;
    if (c->cache_keys)
        return c->cache_keys;
    uint64_t k = 2ull * c->blocks_per_pool;
    return k > BT_MAX_CACHE_KEYS ? BT_MAX_CACHE_KEYS : (uint32_t)k;
}

/* Buckets per cache pool: a power of two >= the entries (load <= 1). */
uint32_t bt_cache_buckets_of(const bt_config *c)
{
    uint32_t k = bt_cache_keys_of(c), b = 1;
    while (b < k)
        b <<= 1;
    return k ? b : 0;
}

int bt_layout(const bt_config *c, uint64_t off[BT_R_COUNT], uint64_t *size)
{
    int rc = bt_config_check(c);
    if (rc)
        return rc;
    uint64_t t = (uint64_t)c->num_pools * c->blocks_per_pool;
    uint64_t r = c->num_rows, cl = c->max_clients;
    uint64_t bytes[BT_R_COUNT] = {
        [BT_R_POOLS] = c->num_pools * sizeof(struct bt_pool),
        [BT_R_NEXT] = t * 4, [BT_R_REFCNT] = t * 4, [BT_R_OWNER] = t * 4,
        [BT_R_ROWS] = r * sizeof(struct bt_row), [BT_R_TABLE] = r * c->row_width * 4,
        [BT_R_NBLOCKS] = r * 4, [BT_R_NTOKENS] = r * 8,
        [BT_R_CLIENTS] = cl * sizeof(struct bt_cslot), [BT_R_HANDS] = cl * c->hand_size * 4,
        [BT_R_MIRRORS] = (uint64_t)c->max_mirrors * sizeof(struct bt_mirror),
        [BT_R_SYNCED] = (uint64_t)c->max_mirrors * r * sizeof(struct bt_synced),
        [BT_R_CPOOL] = sizeof(struct bt_pool), [BT_R_CNEXT] = (uint64_t)c->num_chunks * 4,
        [BT_R_CHUNKS] = (uint64_t)c->num_chunks * c->chunk_size * 4,
        [BT_R_DIR] = r * c->dir_width * 4,
        [BT_R_CACHE] = (uint64_t)c->cache_pools * sizeof(struct bt_cache_hdr),
        [BT_R_CBLOCKS] = (uint64_t)c->cache_pools * c->blocks_per_pool * sizeof(struct bt_cblock),
        [BT_R_CKEYS] = (uint64_t)c->cache_pools * bt_cache_keys_of(c) * sizeof(struct bt_ckey),
        [BT_R_CBUCKETS] = (uint64_t)c->cache_pools * bt_cache_buckets_of(c) * 4,
    };
    uint64_t at = sizeof(struct bt_header);
    for (int i = 0; i < BT_R_COUNT; i++) {
        at = align_up(at, i == BT_R_TABLE || i == BT_R_CHUNKS ? BT_PAGE : BT_CACHELINE);
        off[i] = at;
        at += bytes[i];
    }
    *size = align_up(at, BT_PAGE);
    return BT_OK;
}

uint64_t bt_config_size(const bt_config *cfg)
{
    uint64_t off[BT_R_COUNT], size;
    return bt_layout(cfg, off, &size) ? 0 : size;
}

void bt_seg_bind(bt_seg *s)
{
    s->hdr = (struct bt_header *)s->base;
    s->total = (uint64_t)s->cfg.num_pools * s->cfg.blocks_per_pool;
    s->pools = (struct bt_pool *)(s->base + s->off[BT_R_POOLS]);
    s->next = (uint32_t *)(s->base + s->off[BT_R_NEXT]);
    s->refcnt = (uint32_t *)(s->base + s->off[BT_R_REFCNT]);
    s->owner = (uint32_t *)(s->base + s->off[BT_R_OWNER]);
    s->rows = (struct bt_row *)(s->base + s->off[BT_R_ROWS]);
    s->table = (int32_t *)(s->base + s->off[BT_R_TABLE]);
    s->nblocks = (int32_t *)(s->base + s->off[BT_R_NBLOCKS]);
    s->ntokens = (int64_t *)(s->base + s->off[BT_R_NTOKENS]);
    s->clients = (struct bt_cslot *)(s->base + s->off[BT_R_CLIENTS]);
    s->hands = (uint32_t *)(s->base + s->off[BT_R_HANDS]);
    s->mirrors = (struct bt_mirror *)(s->base + s->off[BT_R_MIRRORS]);
    s->synced = (struct bt_synced *)(s->base + s->off[BT_R_SYNCED]);
    s->cpool = (struct bt_pool *)(s->base + s->off[BT_R_CPOOL]);
    s->cnext = (uint32_t *)(s->base + s->off[BT_R_CNEXT]);
    s->chunks = (int32_t *)(s->base + s->off[BT_R_CHUNKS]);
    s->dir = (uint32_t *)(s->base + s->off[BT_R_DIR]);
    s->cache = (struct bt_cache_hdr *)(s->base + s->off[BT_R_CACHE]);
    s->cblocks = (struct bt_cblock *)(s->base + s->off[BT_R_CBLOCKS]);
    s->ckeys = (struct bt_ckey *)(s->base + s->off[BT_R_CKEYS]);
    s->cbuckets = (uint32_t *)(s->base + s->off[BT_R_CBUCKETS]);
    s->cache_lo = s->cfg.cache_pools * s->cfg.blocks_per_pool;
    s->mag_cap = bt_mag_cap_of(&s->cfg);
    s->nbuckets = bt_cache_buckets_of(&s->cfg);
}

/* Fresh memory is zero (ftruncate, MAP_ANONYMOUS): only non-zero state is
 * written. Each pool's free list is its ids in ascending order, so that early
 * allocations are contiguous runs. */
static void seg_format(bt_seg *s)
{
    const bt_config *c = &s->cfg;
    for (uint32_t p = c->cache_pools; p < c->num_pools; p++) {
        uint32_t first = p * c->blocks_per_pool, end = first + c->blocks_per_pool;
        if (p == 0)
            first = 1;                  /* block 0 is the null block */
        for (uint32_t b = first; b < end; b++)
            s->next[b] = b + 1 < end ? b + 1 : BT_NIL;
        s->pools[p].head = first;       /* tag 0 */
        s->pools[p].nfree = end - first;
    }
    for (uint32_t p = 0; p < c->cache_pools; p++)
        s->pools[p].head = BT_NIL;      /* cache pools: no free stack */
    bt_cache_format(s);
    for (uint32_t k = 0; k < c->num_chunks; k++)
        s->cnext[k] = k + 1 < c->num_chunks ? k + 1 : BT_NIL;
    s->cpool->head = c->num_chunks ? 0 : BT_NIL;
    s->cpool->nfree = c->num_chunks;
    struct bt_header *h = s->hdr;
    h->format = BT_FORMAT;
    h->header_size = sizeof(*h);
    h->abi = BT_ABI;
    h->size = s->size;
    h->cfg = *c;
    memcpy(h->off, s->off, sizeof(h->off));
    h->owner_pid = getpid();
    h->owner_start_time = bt_self_start_time();   /* bt_proc_start_time of getpid() */
    /* The magic last, released: a concurrent attacher sees all or nothing. */
    bt_store_release(&h->magic, BT_MAGIC);
}

static int seg_new(void *mem, uint64_t size, int unmap, const bt_config *cfg, bt_seg **out)
{
    bt_seg *s = calloc(1, sizeof(*s));
    if (!s)
        return -ENOMEM;
    s->base = mem;
    s->size = size;
    s->unmap = unmap;
    s->cfg = *cfg;
    if (!s->cfg.kernel_block_size)
        s->cfg.kernel_block_size = s->cfg.block_size;
    s->cfg.cache_keys = bt_cache_keys_of(&s->cfg);   /* 0 = the default, resolved */
    *out = s;
    return BT_OK;
}

int bt_seg_create_at(void *mem, uint64_t size, const bt_config *cfg, bt_seg **out)
{
    uint64_t off[BT_R_COUNT], need;
    if (!mem || !out)
        return BT_EINVAL;
    int rc = bt_layout(cfg, off, &need);
    if (rc)
        return rc;
    if (size < need)
        return BT_EINVAL;
    memset(mem, 0, need);
    bt_seg *s;
    if ((rc = seg_new(mem, need, 0, cfg, &s)))
        return rc;
    memcpy(s->off, off, sizeof(off));
    bt_seg_bind(s);
    seg_format(s);
    *out = s;
    return BT_OK;
}

int bt_seg_attach(const char *name, bt_seg **out);

/* Attach to a segment another process is creating: its size and magic appear
 * a moment after its name. Bounded: a creator that died half way leaves an
 * object that stays refused (BT_EBADMAGIC), never a hang. */
static int attach_wait(const char *name, bt_seg **out)
{
    int rc = BT_EBADMAGIC;
    for (int tries = 0; tries < 2000; tries++) {
        rc = bt_seg_attach(name, out);
        if (rc != BT_EBADMAGIC)
            return rc;
        struct timespec ts = { 0, 1000000 };
        nanosleep(&ts, NULL);
    }
    return rc;
}

static int shm_path(const char *name, char *path)
{
    if (!name || !*name)
        return BT_ENAME;
    size_t n = strnlen(name, BT_NAME_MAX + 1);
    if (n > BT_NAME_MAX || strchr(name, '/') || !strcmp(name, ".") || !strcmp(name, ".."))
        return BT_ENAME;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)name[i] < 0x21 || (unsigned char)name[i] > 0x7e)
            return BT_ENAME;
    snprintf(path, BT_NAME_MAX + 8, "/bt.%s", name);
    return BT_OK;
}

/* Size the object and reserve its memory now. ftruncate alone makes a sparse
 * tmpfs file: the pages are found missing only when seg_format (or a client,
 * later) first touches them, and that is a SIGBUS, not an error. */
static int seg_reserve(int fd, uint64_t size)
{
    if (ftruncate(fd, (off_t)size) < 0)
        return -errno;
    int err = posix_fallocate(fd, 0, (off_t)size);   /* returns the error, no errno */
    if (err == EINTR)
        err = posix_fallocate(fd, 0, (off_t)size);
    if (err == EFBIG)
        err = ENOSPC;                   /* over the filesystem's limits: no room */
    return err ? -err : BT_OK;
}

int bt_seg_create(const char *name, const bt_config *cfg, int flags, bt_seg **out)
{
    uint64_t off[BT_R_COUNT], size;
    char path[BT_NAME_MAX + 8];
    if (!out)
        return BT_EINVAL;
    int rc = bt_layout(cfg, off, &size);
    if (rc)
        return rc;
    if (!name) {
        void *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED)
            return -errno;
        bt_seg *s;
        if ((rc = seg_new(m, size, 1, cfg, &s))) {
            munmap(m, size);
            return rc;
        }
        memcpy(s->off, off, sizeof(off));
        bt_seg_bind(s);
        seg_format(s);
        *out = s;
        return BT_OK;
    }
    if ((rc = shm_path(name, path)))
        return rc;
    /* Only the process whose O_EXCL open succeeds formats. Without
     * BT_CREATE_EXCL an existing object is attached instead, waiting for its
     * creator to finish (two racing creators must never both format). */
    int fd = shm_open(path, O_RDWR | O_CREAT | O_EXCL, (flags & BT_CREATE_GROUP) ? 0660 : 0600);
    if (fd < 0) {
        rc = -errno;
        if (rc != -EEXIST || (flags & BT_CREATE_EXCL))
            return rc;
        return attach_wait(name, out);
    }
    fchmod(fd, (flags & BT_CREATE_GROUP) ? 0660 : 0600); /* umask must not widen/narrow it */
    /* Held until the magic is written (the fd is closed after seg_format), and
     * dropped by the kernel if we die: an object with no magic whose lock is
     * free is a format that never finished, which btd may recreate. */
    flock(fd, LOCK_EX);
    if ((rc = seg_reserve(fd, size))) {
        close(fd);
        shm_unlink(path);
        return rc;
    }
    void *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    rc = m == MAP_FAILED ? -errno : 0;
    bt_seg *s = NULL;
    if (!rc && (rc = seg_new(m, size, 1, cfg, &s)))
        munmap(m, size);
    if (rc) {
        close(fd);
        shm_unlink(path);
        return rc;
    }
    memcpy(s->off, off, sizeof(off));
    bt_seg_bind(s);
    seg_format(s);
    close(fd);
    *out = s;
    return BT_OK;
}

int bt_seg_validate(const void *mem, uint64_t size)
{
    const struct bt_header *h = mem;
    uint64_t off[BT_R_COUNT], need;
    if (!mem || size < sizeof(*h))
        return mem ? BT_EBADMAGIC : BT_EINVAL;
    uint64_t magic = bt_load_acquire(&h->magic);
    if (magic != BT_MAGIC)
        return BT_EBADMAGIC;            /* includes BT_MAGIC_SWAP: other byte order */
    if (h->format != BT_FORMAT || h->abi != BT_ABI || h->header_size != sizeof(*h))
        return BT_EVERSION;
    bt_config c = h->cfg;
    if (bt_layout(&c, off, &need))
        return BT_ECORRUPT;
    if (h->size != need || size < need)
        return BT_ECORRUPT;
    if (memcmp(off, h->off, sizeof(off)))
        return BT_ECORRUPT;
    return BT_OK;
}

int bt_seg_attach_at(void *mem, uint64_t size, bt_seg **out)
{
    if (!out)
        return BT_EINVAL;
    int rc = bt_seg_validate(mem, size);
    if (rc)
        return rc;
    const struct bt_header *h = mem;
    bt_seg *s;
    bt_config c = h->cfg;
    if ((rc = seg_new(mem, h->size, 0, &c, &s)))
        return rc;
    memcpy(s->off, h->off, sizeof(s->off));
    bt_seg_bind(s);
    *out = s;
    return BT_OK;
}

int bt_seg_attach(const char *name, bt_seg **out)
{
    char path[BT_NAME_MAX + 8];
    struct stat st;
    int rc = shm_path(name, path);
    if (rc || !out)
        return rc ? rc : BT_EINVAL;
    int fd = shm_open(path, O_RDWR, 0);
    if (fd < 0)
        return -errno;
    if (fstat(fd, &st) < 0 || (uint64_t)st.st_size < sizeof(struct bt_header)) {
        close(fd);
        return BT_EBADMAGIC;
    }
    uint64_t size = (uint64_t)st.st_size;
    void *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    rc = m == MAP_FAILED ? -errno : 0;
    close(fd);
    if (rc)
        return rc;
    if ((rc = bt_seg_attach_at(m, size, out))) {
        munmap(m, size);
        return rc;
    }
    (*out)->size = size;
    (*out)->unmap = 1;
    return BT_OK;
}

void bt_seg_close(bt_seg *s)
{
    if (!s)
        return;
    if (s->unmap)
        munmap(s->base, s->size);
    free(s);
}

int bt_seg_unlink(const char *name)
{
    char path[BT_NAME_MAX + 8];
    int rc = shm_path(name, path);
    if (rc)
        return rc;
    return shm_unlink(path) < 0 ? -errno : BT_OK;
}

int bt_seg_info_get(const bt_seg *s, bt_seg_info *o)
{
    if (!s || !o)
        return BT_EINVAL;
    *o = (bt_seg_info){ .config = s->cfg, .size = s->size,
        .generation = bt_load_relaxed(&s->hdr->generation), .total_blocks = s->total,
        .owner_pid = bt_load_relaxed(&s->hdr->owner_pid),
        .owner_start_time = bt_load_relaxed(&s->hdr->owner_start_time),
        .format = BT_FORMAT, .abi = BT_ABI,
        .table_offset = s->off[BT_R_TABLE], .nblocks_offset = s->off[BT_R_NBLOCKS],
        .ntokens_offset = s->off[BT_R_NTOKENS] };
    return BT_OK;
}

void *bt_seg_base(const bt_seg *s) { return s ? s->base : NULL; }

int bt_seg_set_owner(bt_seg *s, int32_t pid, uint64_t start_time)
{
    if (!s || pid <= 0)
        return BT_EINVAL;
    bt_store_relaxed(&s->hdr->owner_start_time, start_time);
    bt_store_release(&s->hdr->owner_pid, pid);
    return BT_OK;
}
