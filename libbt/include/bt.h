/*
 * bt.h -- libbt, the core of blocktable: KV-cache block tables in shared memory.
 *
 * This header is the manual. It is read in eleven parts, one section each:
 *   1. error codes             (bt_strerror, bt_errname)
 *   2. the segment             (bt_config_*, bt_seg_*)   size, create / attach / validate
 *   3. clients and processes   (bt_client_*, bt_proc_start_time)  a slot per attached
 *                              process; who is alive
 *   4. the allocator           (bt_blocks_*, bt_pool_*, bt_block_get)  lock-free pools
 *   5. rows                    (bt_row_*, bt_chunks_free)  per-request block tables,
 *                              dense or paged (bt_row_set_block, bt_row_punch)
 *   6. the scheduler step      (bt_step, bt_step_ex)     many rows, one call
 *   7. slot mapping            (bt_slots_*)              token position -> KV slot
 *   8. recovery and checking   (bt_seg_check, bt_seg_recover_client)
 *   9. GPU mirrors             (bt_mirror_*)             descriptors, dirty tracking
 *  10. the prefix cache        (bt_cache_*)              vLLM's BlockPool in the segment
 *  11. gathering rows by key   (bt_row_find, bt_rows_gather)
 *
 * Conventions (after liburing and LMDB):
 *   - Every function returns 0 (BT_OK) or a negative code. Library codes lie in
 *     [BT_ERR_LAST, BT_ERR_FIRST]; anything else negative is -errno from the OS.
 *     errno is never the result channel.
 *   - Out-parameters come last.
 *   - Shared memory holds offsets and indices only, never pointers. Every index
 *     read from shared memory is bounds-checked before use: a process that
 *     scribbles on the segment can make calls fail with BT_ECORRUPT, never make
 *     this library write outside the segment.
 *   - A call that returns an error has changed nothing (unless it says so).
 *   - Every function lists its errors ("Errors:"). Two families are said once
 *     instead of at every call: the client protocol's (section 3: BT_ECLIENT,
 *     BT_EFROZEN, for every call that takes a bt_client and changes the
 *     segment) and a row call's (section 5: BT_ERANGE, BT_EROWSTATE,
 *     BT_ENOTOWNER for the row it names). BT_EINVAL also means a NULL handle
 *     or a NULL pointer the call needs, everywhere.
 *
 * Thread and process safety:
 *   - A bt_seg is a process-local handle to a mapping. Any number of threads and
 *     processes may use one segment at once.
 *   - A bt_client is one registered user of the segment. Its calls may come from
 *     any thread, but not from two threads at once (one client per thread if you
 *     need parallel threads; clients are cheap).
 *   - A row has one writer at a time: the client that claimed it. Any client or
 *     plain attached process may read any row consistently (bt_row_read uses the
 *     row's seqlock).
 *   - Block reference counts and free lists are lock-free and shared by all.
 *
 * Block ids: global id = pool * blocks_per_pool + index in pool. Block 0 is the
 * null block (as in vLLM): never handed out, and what unused table entries hold.
 *
 * The part between BT_CDEF_BEGIN and BT_CDEF_END is fed verbatim to CFFI's cdef
 * (bindings/blocktable/_build.py), so it holds no preprocessor logic except
 * integer #defines.
 */
#ifndef BT_H
#define BT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define BT_VERSION_MAJOR 0
#define BT_VERSION_MINOR 1
#define BT_VERSION_PATCH 0

/* BT_CDEF_BEGIN */

/* ---- 1. Errors ----------------------------------------------------------- */
#define BT_OK              0
#define BT_ERR_FIRST       (-31000)
#define BT_EINVAL          (-31000) /* an argument is invalid (null, zero, mis-sized) */
#define BT_ERANGE          (-31001) /* a row, block, pool or position is out of range */
#define BT_ENOBLOCKS       (-31002) /* the pool has fewer free blocks than asked for */
#define BT_EROWFULL        (-31003) /* the row has no room for that many blocks */
#define BT_ENOROWS         (-31004) /* every row is claimed */
#define BT_ENOCLIENTS      (-31005) /* every client slot is taken */
#define BT_EHANDFULL       (-31006) /* the client holds as many loose blocks as it may */
#define BT_ENOTHELD        (-31007) /* the block is free, or not held by this client */
#define BT_ENOTOWNER       (-31008) /* the row is claimed by another client */
#define BT_EROWSTATE       (-31009) /* the row is not claimed / not empty, as needed */
#define BT_EBADMAGIC       (-31010) /* not a blocktable segment (or other byte order) */
#define BT_EVERSION        (-31011) /* segment layout format or ABI fingerprint differs */
#define BT_ECORRUPT        (-31012) /* an impossible value was found in shared memory */
#define BT_EBUSY           (-31013) /* a row stayed mid-write too long (writer died?) */
#define BT_EFROZEN         (-31014) /* frozen for recovery by a process that died */
#define BT_ENAME           (-31015) /* a segment name is empty, too long or has '/' */
#define BT_ECONFIG         (-31016) /* the configuration is impossible */
#define BT_ECLIENT         (-31017) /* the client handle is dead or its slot was reclaimed */
#define BT_ENOCHUNKS       (-31018) /* the chunk pool of paged rows is exhausted */
#define BT_ENOKEYS         (-31019) /* a cache pool's key entries are exhausted */
#define BT_ERR_LAST        (-31019)

/* Names and messages of codes; never NULL, never fail. */
const char *bt_strerror(int err);  /* "BT_ENOBLOCKS: ..." or strerror(-err) */
const char *bt_errname(int err);   /* "BT_ENOBLOCKS", "ENOENT", ... */

/* ---- 2. The segment ------------------------------------------------------ */
typedef struct bt_seg bt_seg;

#define BT_NAME_MAX 48          /* bytes of a segment name, without the NUL */

/* Size of a segment, chosen once at creation. */
typedef struct bt_config {
    uint32_t block_size;        /* tokens per KV block (B) */
    uint32_t kernel_block_size; /* tokens per attention-kernel block (K); divides B; 0 = B */
    uint32_t num_pools;         /* one per worker / GPU */
    uint32_t blocks_per_pool;   /* block ids per pool (pool 0 loses id 0, the null block) */
    uint32_t num_rows;          /* rows (live requests) in the table */
    uint32_t row_width;         /* block ids per row (max blocks per request) */
    uint32_t max_clients;       /* client slots */
    uint32_t hand_size;         /* loose (not in a row) references one client may hold */
    uint32_t max_mirrors;       /* GPU mirrors that can be published (0..64) */
    uint32_t chunk_size;        /* block ids per chunk of a paged row; 0 = no paged rows */
    uint32_t num_chunks;        /* chunks in the shared chunk pool */
    uint32_t dir_width;         /* chunks one paged row may hold (capacity / chunk_size) */
    uint32_t cache_pools;       /* pools [0, cache_pools) are cache pools (section 10:
                                   vLLM's BlockPool); 0 = none. A cache pool's blocks
                                   are never on a free stack: the allocator calls
                                   (bt_blocks_alloc, bt_row_alloc_append, bt_step*,
                                   bt_pool_pop/push) refuse them with BT_EINVAL, and
                                   MANAGED rows and hands never hold their ids */
    uint32_t cache_keys;        /* hash-map entries per cache pool; 0 = 2 * blocks_per_pool
                                   (resolved at creation: bt_seg_info reports the value) */
} bt_config;

/* Flags for bt_seg_create. */
#define BT_CREATE_EXCL     1    /* fail with -EEXIST if the name exists */
#define BT_CREATE_GROUP    2    /* mode 0660 instead of 0600 */

/* What bt_seg_info reports; plain values, copied out. */
typedef struct bt_seg_info {
    bt_config config;
    uint64_t  size;             /* bytes mapped */
    uint64_t  generation;       /* bumped by every recovery / repair */
    uint64_t  total_blocks;     /* num_pools * blocks_per_pool (ids, incl. the null block) */
    int32_t   owner_pid;        /* process that created / adopted the segment (daemon) */
    uint32_t  format;           /* layout format version */
    uint64_t  abi;              /* ABI fingerprint of the library that created it */
    uint64_t  table_offset;     /* byte offset of the int32 [num_rows][row_width] table */
    uint64_t  nblocks_offset;   /* byte offset of the int32 [num_rows] block counts */
    uint64_t  ntokens_offset;   /* byte offset of the int64 [num_rows] token counts */
    uint64_t  owner_start_time; /* the owner's start time (bt_proc_start_time; 0 unknown):
                                   with owner_pid it tells a live owner from a recycled pid */
} bt_seg_info;

/* Fill *cfg with the defaults (B=16, 1 pool of 65536 blocks, 256 rows x 128,
 * 64 clients with hands of 4096, 8 mirrors). */
void bt_config_default(bt_config *cfg);

/* Check a configuration without creating anything. BT_ECONFIG names nothing more
 * specific (a NULL cfg included); bt_config_explain() writes a human reason
 * into buf (may be NULL). Errors: BT_ECONFIG. */
int bt_config_check(const bt_config *cfg);
int bt_config_explain(const bt_config *cfg, char *buf, size_t buflen);

/* Bytes a segment of this config needs. 0 if the config is impossible (no
 * error code: see bt_config_explain). */
uint64_t bt_config_size(const bt_config *cfg);

/* Create a segment. name == NULL: embedded mode, a private anonymous mapping
 * (no other process can attach). Otherwise a POSIX shm object "/bt.<name>",
 * mode 0600 (0660 with BT_CREATE_GROUP). Without BT_CREATE_EXCL an existing
 * segment of that name is attached instead (waiting up to ~2 s for a
 * concurrent creator to finish formatting it): only one process ever formats
 * a name. The memory is reserved at creation (posix_fallocate): a segment
 * larger than the free space of /dev/shm fails here with -ENOSPC (or -ENOMEM),
 * leaving no object behind, instead of a SIGBUS on first touch. The creator
 * holds flock(LOCK_EX) on the object until the header's magic is written, so
 * an object without magic whose lock is free was left by a creator that died
 * mid-format. Errors: BT_EINVAL (out NULL), BT_ECONFIG, BT_ENAME, -EEXIST
 * (with BT_CREATE_EXCL), -EACCES, -ENOSPC, -ENOMEM, and when an existing
 * segment is attached instead, bt_seg_attach's. */
int bt_seg_create(const char *name, const bt_config *cfg, int flags, bt_seg **out);

/* Create a segment over memory the caller owns (size >= bt_config_size(cfg)),
 * e.g. an mmap that posix_ipc made. The memory must stay mapped until close.
 * Errors: BT_EINVAL (mem or out NULL, size too small), BT_ECONFIG, -ENOMEM. */
int bt_seg_create_at(void *mem, uint64_t size, const bt_config *cfg, bt_seg **out);

/* Attach to an existing named segment; validates the header fully.
 * Errors: BT_EINVAL (out NULL), BT_ENAME, -ENOENT, -EACCES, BT_EBADMAGIC
 * (also: smaller than a header), BT_EVERSION, BT_ECORRUPT, -ENOMEM. */
int bt_seg_attach(const char *name, bt_seg **out);

/* Attach to (validate) memory the caller mapped. Errors: BT_EINVAL (mem or
 * out NULL), BT_EBADMAGIC, BT_EVERSION, BT_ECORRUPT, -ENOMEM. */
int bt_seg_attach_at(void *mem, uint64_t size, bt_seg **out);

/* Validate a header in place without attaching (what attach checks).
 * Errors: BT_EINVAL (mem NULL), BT_EBADMAGIC (no magic, the other byte order,
 * or size smaller than a header), BT_EVERSION (format, ABI fingerprint or
 * header size differ), BT_ECORRUPT (the layout does not follow from the
 * config, or size is short of it). */
int bt_seg_validate(const void *mem, uint64_t size);

/* Unmap (and close). Does not unlink. Safe with NULL. Clients of this handle
 * must be closed first; their slots are released (see bt_client_close). */
void bt_seg_close(bt_seg *seg);

/* Remove the name; mappings stay valid until closed.
 * Errors: BT_ENAME, -ENOENT (absent), -EACCES. */
int bt_seg_unlink(const char *name);

/* A copy of the segment's geometry and owner. Errors: BT_EINVAL. */
int   bt_seg_info_get(const bt_seg *seg, bt_seg_info *out);
/* Start of the mapping; NULL if seg is NULL. */
void *bt_seg_base(const bt_seg *seg);
/* Record the segment's owner (the daemon that adopts it): pid and its
 * bt_proc_start_time. Errors: BT_EINVAL (seg NULL, pid <= 0). */
int   bt_seg_set_owner(bt_seg *seg, int32_t pid, uint64_t start_time);

/* ---- 3. Clients and processes -------------------------------------------- */
typedef struct bt_client bt_client;

/* Client slot states (bt_client_slot_info.state). A slot goes
 * FREE -> RESERVED -> ACTIVE (bt_client_reserve, then bt_client_adopt; or
 * both at once, bt_client_open) -> FREE (bt_client_close). A client whose
 * process died goes ACTIVE -> DEAD -> RECOVERING -> FREE through
 * bt_seg_recover_client (or straight to FREE by a repairing bt_seg_check). */
#define BT_CLIENT_FREE       0
#define BT_CLIENT_ACTIVE     1
#define BT_CLIENT_DEAD       2  /* declared dead, awaiting recovery (or a repair) */
#define BT_CLIENT_RESERVED   3  /* reserved by the daemon for pid, not yet adopted */
#define BT_CLIENT_RECOVERING 4  /* a recoverer is releasing its holdings; back to
                                   DEAD if the recoverer must leave it to a repair */

/* The client protocol. Every call that takes a bt_client and changes the
 * segment (sections 4, 5, 6 and the mutating calls of 10) may also fail with
 * these two, not repeated at each:
 *   BT_ECLIENT  the handle was opened before a fork (in the child), or its
 *               slot was declared dead and reaped;
 *   BT_EFROZEN  a repair froze the segment and its sweeper died, or kept it
 *               frozen for more than ~5 s.
 * A call that fails with them has changed nothing. */

/* Register the calling process in a free slot and return a handle.
 * Errors: BT_EINVAL, BT_ENOCLIENTS, -ENOMEM. Thread-safe. */
int bt_client_open(bt_seg *seg, bt_client **out);

/* Reserve a slot for process pid (what the daemon does after checking the
 * peer's credentials); the process then takes it with bt_client_adopt.
 * Errors: BT_EINVAL (pid <= 0), BT_ENOCLIENTS. Any thread or process. */
int bt_client_reserve(bt_seg *seg, int32_t pid, uint64_t start_time, uint32_t *slot_out);

/* Take over a slot reserved for the calling process (pid must match).
 * Errors: BT_EINVAL, BT_ERANGE (slot 0 or past max_clients), BT_ECLIENT (the
 * slot is not RESERVED for this pid -- e.g. it is already active for a
 * handle of this process: that handle is left untouched), -ENOMEM. */
int bt_client_adopt(bt_seg *seg, uint32_t slot, bt_client **out);

/* The daemon's undo of bt_client_reserve: free slot `slot` if it is still
 * RESERVED (never adopted) for `pid`. Races bt_client_adopt safely (one CAS
 * each, one wins). BT_ECLIENT if it was adopted or is not pid's; BT_ERANGE,
 * BT_EINVAL. Any thread or process. */
int bt_client_unreserve(bt_seg *seg, uint32_t slot, int32_t pid);

/* Release everything the client holds (its rows and loose blocks; the cache
 * pools it owns are reset and given up, see section 10) and free its
 * slot. Safe with NULL. In a forked child that did not open it, it only frees
 * the handle and touches nothing shared. */
void bt_client_close(bt_client *cl);

/* Slot id of a handle (1-based; 0 means "nobody" in owner fields); 0 for NULL. */
uint32_t bt_client_id(const bt_client *cl);

typedef struct bt_client_slot_info {
    uint32_t state;             /* BT_CLIENT_* */
    int32_t  pid;
    uint64_t start_time;        /* of pid (bt_proc_start_time), 0 = unknown */
    uint32_t in_op;             /* nonzero while inside a data-path call */
    uint32_t hand_count;        /* loose references held */
    uint32_t rows;              /* rows claimed */
    uint32_t magazine;          /* free blocks cached in its magazine (section 4) */
    uint64_t ops;               /* data-path calls made */
} bt_client_slot_info;

/* Read slot `id` (1..max_clients). Plain snapshot; may race with the client.
 * Errors: BT_EINVAL, BT_ERANGE (id). */
int bt_client_slot_get(const bt_seg *seg, uint32_t id, bt_client_slot_info *out);

/* The start time of process pid: field 22 of /proc/<pid>/stat (clock ticks
 * since boot), never 0. With the pid it names one process for good: a pid
 * the kernel recycles comes with another start time. This is what
 * bt_client_slot_info.start_time, bt_seg_info.owner_start_time and the
 * mirrors' start times hold, and what libbt compares to tell a live client
 * from a dead one.
 * A zombie (exited, not yet reaped by its parent) counts as dead: -ESRCH.
 * It has released its memory and will never make another call, so what it
 * held is to be recovered now, not when its parent gets round to wait();
 * its pid cannot be recycled before that, so nothing is mistaken either way.
 * Errors: BT_EINVAL (pid <= 0, out NULL), -ESRCH (no such process, or a
 * zombie), -EIO (the stat file could not be parsed), other -errno from
 * reading /proc (-EACCES, ...). A caller deciding whether a process is
 * alive must take any error but -ESRCH as "cannot tell": reaping a live
 * client would free blocks it holds. Thread-safe; reads /proc (a few
 * microseconds: not for a hot path). */
int bt_proc_start_time(int32_t pid, uint64_t *out);

/* ---- 4. The allocator ---------------------------------------------------- */
/* Pools are lock-free Treiber stacks; a batch pops or pushes with one CAS.
 * bt_blocks_alloc hands out n blocks with reference count 1 as *loose*
 * references held by the client (counted in its hand until appended to a row
 * or released). All-or-nothing: on BT_ENOBLOCKS nothing was taken.
 *
 * Magazines (DPDK's per-lcore mempool cache). Each client caches free blocks
 * of one pool in its slot of the segment: bt_blocks_alloc,
 * bt_row_alloc_append and bt_step take from it (batches up to half its
 * capacity), blocks whose count a client's call brings to 0 go into it
 * (bt_blocks_release, a row released or cut, bt_step's ending rows), and it
 * is refilled / flushed half at a time with one CAS on the pool's
 * stack, so that clients of one pool in different processes do not bounce
 * the stack's head line. Capacity: min(64, blocks_per_pool / (8 *
 * max_clients)), 0 (no magazines) below 4, so that all magazines together
 * hold at most an eighth of a pool. Cached blocks are free (count 0, owner
 * 0): bt_pool_free_count and bt_seg_check count them as free, and a client's
 * close, its recovery and any repair return them to the stack exactly once.
 * A client may get BT_ENOBLOCKS while the free count is higher: the rest sit
 * in other clients' magazines. A client that finds the stack short (under an
 * eighth of the pool) refills with just what it needs and releases straight
 * to the stack, its magazine with it; only idle clients keep cached blocks.
 * Cache pools (section 10) have no magazines: their order is vLLM's LRU.
 *
 * bt_blocks_alloc's errors: BT_EINVAL (ids_out NULL with n > 0; pool is a cache pool),
 * BT_ERANGE (pool >= num_pools), BT_EHANDFULL (the hand would pass
 * hand_size), BT_ENOBLOCKS, BT_ECORRUPT (a scribbled free list, or a
 * free-listed block with a count: the good blocks go back, the bad stay off
 * the lists until a repair), and the client protocol's. */
int bt_blocks_alloc(bt_client *cl, uint32_t pool, uint32_t n, int32_t *ids_out);

/* Release n loose references the client holds (decref; a block is freed when its
 * count reaches 0). Every id must be held loose by this client, else nothing
 * changes. Errors: BT_EINVAL (ids NULL with n > 0; a cache pool's id),
 * BT_ERANGE (the null block, or an id past the pools), BT_ENOTHELD (not in
 * this client's hand, or a count already 0), BT_ECORRUPT (the hand's count
 * is out of range), -ENOMEM (more than 256 ids need scratch), and the client
 * protocol's. */
int bt_blocks_release(bt_client *cl, const int32_t *ids, uint32_t n);

/* Take an extra loose reference on n allocated blocks (prefix sharing); all
 * or nothing. Errors: BT_EINVAL (ids NULL with n > 0; a cache pool's id),
 * BT_ERANGE (the null block, or an id past the pools), BT_ENOTHELD (a free
 * block), BT_EHANDFULL, and the client protocol's. */
int bt_blocks_share(bt_client *cl, const int32_t *ids, uint32_t n);

/* Free blocks in one pool: on its stack or in a client's magazine (exact
 * when quiet, a racy snapshot when others allocate; reads every client slot);
 * a cache pool's is the length of its queue. Errors: BT_EINVAL, BT_ERANGE
 * (pool). Any thread or process. */
int bt_pool_free_count(const bt_seg *seg, uint32_t pool, uint32_t *out);

/* Reference count and owner stamp of one block (snapshot; either pointer may
 * be NULL). Errors: BT_EINVAL (seg NULL), BT_ERANGE (id < 0 or past the
 * pools). */
int bt_block_get(const bt_seg *seg, int32_t id, uint32_t *refcnt, uint32_t *owner);

/* The raw pool, without the client protocol: what the benchmarks and the
 * allocator stress tests drive. No hand, no in_op, no freeze: a crash between
 * pop and push loses blocks until bt_seg_check(..., BT_CHECK_REPAIR).
 * Pops set refcount 1 and owner = stamp; pushes require refcount 1. Both all
 * or nothing. Errors of pop: BT_EINVAL (ids_out NULL with n > 0; a cache
 * pool), BT_ERANGE (pool), BT_ENOBLOCKS, BT_ECORRUPT (as bt_blocks_alloc).
 * Errors of push: BT_EINVAL (ids NULL with n > 0; a cache pool's id),
 * BT_ERANGE (the null block, or past the pools), BT_ENOTHELD (a count that
 * is not 1). Thread- and process-safe. */
int bt_pool_pop(bt_seg *seg, uint32_t pool, uint32_t n, uint32_t stamp, int32_t *ids_out);
int bt_pool_push(bt_seg *seg, const int32_t *ids, uint32_t n);

/* ---- 5. Rows ------------------------------------------------------------- */
/* Row flags for bt_row_claim. */
#define BT_ROW_MANAGED     0    /* entries are references to this segment's blocks */
#define BT_ROW_RAW         1    /* entries are ids the caller manages (vLLM's pool) */
#define BT_ROW_PAGED       2    /* entries live in chunks from the shared chunk pool:
                                   memory follows the blocks used; 0 entries are
                                   holes (no block, slot -1). Or'd with the above. */

typedef struct bt_row_info {
    uint32_t owner;             /* client id, 0 = free */
    uint32_t flags;             /* BT_ROW_* */
    uint64_t key;               /* request key given at claim */
    uint32_t num_blocks;
    uint32_t generation;        /* bumped each time the row is claimed */
    int64_t  num_tokens;
    uint32_t seq;               /* the seqlock at the time of the read: a version */
    uint32_t rewrite_seq;       /* seq of the last change other than an append */
} bt_row_info;

/* Errors of a row call, said once here: every call below that names a row it
 * must own (all that take a bt_client) may fail with
 *   BT_ERANGE     row >= num_rows;
 *   BT_EROWSTATE  the row is not claimed (free);
 *   BT_ENOTOWNER  the row is claimed by another client;
 * and with the client protocol's (section 3). Each call lists the rest.
 * A row's capacity is row_width, or dir_width * chunk_size for a paged row.
 * Ids a MANAGED row takes must be references: BT_ERANGE for the null block,
 * a negative id or one past the pools, BT_EINVAL for a cache pool's id. A RAW
 * row takes any id >= 0 (BT_ERANGE below). Paged rows take chunks as they
 * grow: BT_ENOCHUNKS when the chunk pool is empty (nothing changed). */

/* Claim a free row for request `key`. row_hint >= 0 asks for that row; -1
 * takes any free row. Errors: BT_EINVAL (row_out NULL, unknown flags,
 * BT_ROW_PAGED without a chunk pool), BT_ERANGE (row_hint below -1 or past
 * the rows), BT_EROWSTATE (the hinted row is taken), BT_ENOROWS. */
int bt_row_claim(bt_client *cl, uint64_t key, int32_t row_hint, uint32_t flags, uint32_t *row_out);

/* Claim n rows at once (requests arriving in one scheduler step), any free
 * ones; all or nothing. Errors: BT_EINVAL (keys or rows_out NULL with n > 0,
 * flags as bt_row_claim), BT_ENOROWS (fewer than n free: none claimed). */
int bt_row_claim_many(bt_client *cl, const uint64_t *keys, uint32_t n, uint32_t flags, uint32_t *rows_out);

/* Release a claimed row: its blocks are decref'd (freed at zero), entries
 * zeroed, a paged row's chunks given back, the row free. Errors: a row
 * call's, -ENOMEM (scratch for a dense MANAGED row of more than 256
 * entries; nothing changed). */
int bt_row_release(bt_client *cl, uint32_t row);

/* Append n ids. MANAGED: each id must be a loose reference this client holds;
 * the reference moves from the hand into the row. RAW: any id in [0, 2^31).
 * Errors: a row call's, BT_EINVAL (ids NULL with n > 0), BT_EROWFULL
 * (num_blocks + n > capacity), the id errors above, BT_ENOTHELD (MANAGED:
 * an id not loose in this client's hand, counting repeats), BT_ENOCHUNKS,
 * -ENOMEM. */
int bt_row_append(bt_client *cl, uint32_t row, const int32_t *ids, uint32_t n);

/* MANAGED only: take a new reference on already-allocated blocks (held by
 * anyone) and append them: prefix sharing in one step. Errors: as
 * bt_row_append, but BT_EROWSTATE for a RAW row and BT_ENOTHELD for a free
 * block (count 0); the hand is not involved. */
int bt_row_append_shared(bt_client *cl, uint32_t row, const int32_t *ids, uint32_t n);

/* Allocate n fresh blocks from `pool` straight into the row (MANAGED).
 * ids_out may be NULL. Errors: a row call's, BT_EINVAL (pool is a cache
 * pool), BT_ERANGE (pool >= num_pools), BT_EROWSTATE (a RAW row),
 * BT_EROWFULL, BT_ENOBLOCKS, BT_ENOCHUNKS, BT_ECORRUPT (as bt_blocks_alloc),
 * -ENOMEM (ids_out NULL and n > 256). */
int bt_row_alloc_append(bt_client *cl, uint32_t row, uint32_t pool, uint32_t n, int32_t *ids_out);

/* Replace the row's contents (vLLM's add_row): old entries released, new ones
 * taken as in bt_row_append. Errors: as bt_row_append, with BT_EROWFULL for
 * n > capacity (the old entries do not count). */
int bt_row_set(bt_client *cl, uint32_t row, const int32_t *ids, uint32_t n);

/* Truncate: keep the row's first `keep` entries, release the rest (keep = 0
 * empties the row). Errors: a row call's, BT_ERANGE (keep > num_blocks),
 * -ENOMEM (scratch to truncate more than 256 entries of a dense MANAGED row;
 * nothing changed). */
int bt_row_truncate(bt_client *cl, uint32_t row, uint32_t keep);

/* Paged rows: set entry `index` (num_blocks grows to index + 1 if needed,
 * holes in between). id 0 makes a hole. MANAGED: the id's reference moves
 * from the hand, the old entry's is released. Chunks are taken as needed
 * and given back when they hold only holes. Errors: a row call's,
 * BT_EROWSTATE (a dense row), BT_EROWFULL (index >= capacity), the id
 * errors above (0 is allowed: a hole), BT_ENOTHELD (MANAGED: id not loose in
 * the hand), BT_ENOCHUNKS, -ENOMEM. */
int bt_row_set_block(bt_client *cl, uint32_t row, uint32_t index, int32_t id);

/* Paged rows: punch holes in entries [from, to) (a sliding window's past);
 * their references are released and emptied chunks given back. Errors: a
 * row call's, BT_EROWSTATE (a dense row), BT_ERANGE (from > to, or to >
 * num_blocks), -ENOMEM (scratch for more than 256 entries). */
int bt_row_punch(bt_client *cl, uint32_t row, uint32_t from, uint32_t to);

/* Free chunks in the chunk pool (snapshot). Errors: BT_EINVAL. */
int bt_chunks_free(const bt_seg *seg, uint32_t *out);

/* Token count bookkeeping (not used by slot mapping, which takes positions).
 * Errors: a row call's, BT_EINVAL (num_tokens < 0). */
int bt_row_set_tokens(bt_client *cl, uint32_t row, int64_t num_tokens);

/* Move src's contents into dst; src ends empty (zeroed) and what dst held
 * before is released (vLLM's move_row left src stale and dst's old ids
 * unaccounted). Both rows must be claimed by cl and of the same flags.
 * Errors: a row call's for either row, BT_EROWSTATE (flags differ), -ENOMEM
 * (as bt_row_truncate: the contents have moved, dst's old entries are left
 * in src). */
int bt_row_move(bt_client *cl, uint32_t src, uint32_t dst);

/* Swap two claimed rows' contents. Errors: a row call's for either row,
 * BT_EROWSTATE (flags differ). */
int bt_row_swap(bt_client *cl, uint32_t a, uint32_t b);

/* Read a row consistently (seqlock), from any process, without a client.
 * ids_out may be NULL; cap is its capacity. Paged rows read as dense, holes
 * as 0. Errors: BT_EINVAL (seg NULL; cap < num_blocks with ids_out given),
 * BT_ERANGE (row), BT_ECORRUPT (a count outside [0, capacity]), BT_EBUSY (a
 * writer stayed mid-write for ~2 s: it died). */
int bt_row_read(const bt_seg *seg, uint32_t row, int32_t *ids_out, uint32_t cap, bt_row_info *info_out);

/* ---- 6. The scheduler step ----------------------------------------------- */
/* A whole scheduler step in one call (the per-call cost of Python is the
 * enemy, not the CAS), in this order:
 *   1. every listed row is validated: free_rows and rows owned by cl and
 *      listed once across both lists; growing rows MANAGED, dense, with room.
 *      On any error here nothing changed.
 *   2. free_rows are released (ending requests): their blocks can serve
 *      this very step.
 *   3. a row is claimed (MANAGED, dense) for each arriving request; all or
 *      nothing (BT_ENOROWS: no arrival got a row).
 *   4. every new block (sum of n_new and arrive_n) is popped with one CAS;
 *      all or nothing (BT_ENOBLOCKS: no row got a block, the arrivals' rows
 *      are handed back untouched).
 *   5. growing rows, then arrivals, get their blocks.
 * After step 2 the releases stand even if 3 or 4 fail: those requests ended.
 * ids_out receives the new ids, growing rows first then arrivals, each row's
 * in order; ids_total says how many (or how many were needed: BT_EINVAL
 * before anything is done when ids_cap is too small). */
typedef struct bt_step_args {
    uint32_t        pool;               /* the pool every new block comes from (not a cache pool) */
    uint32_t        n_free;             /* rows to release (ending requests) ... */
    const uint32_t *free_rows;          /* ... these, each owned by cl (any flags) */
    uint32_t        n_rows;             /* rows that grow (running requests) ... */
    const uint32_t *rows;               /* ... these, owned by cl, MANAGED and dense ... */
    const uint32_t *n_new;              /* ... by n_new[i] new blocks each (0 allowed) */
    uint32_t        n_arrive;           /* requests arriving: a new row each ... */
    const uint64_t *arrive_keys;        /* ... claimed with these keys ... */
    const uint32_t *arrive_n;           /* ... and given arrive_n[i] new blocks */
    uint32_t       *arrive_rows;        /* out: the rows claimed, n_arrive of them */
    int32_t        *ids_out;            /* out: the new ids (growing rows, then arrivals) */
    uint64_t        ids_cap;            /* entries ids_out has room for */
    uint64_t        ids_total;          /* out: the new ids made, or needed (on BT_EINVAL) */
} bt_step_args;

/* Errors (step numbers as above): BT_EINVAL (args or a list NULL where its
 * count is not 0; a row listed twice; ids_cap < the new ids), BT_ERANGE
 * (pool; a listed row past the rows), BT_EINVAL (pool is a cache pool),
 * BT_EROWSTATE (a listed row not claimed; a growing row RAW or paged),
 * BT_ENOTOWNER, BT_EROWFULL (a growing row or an arrival past row_width),
 * -ENOMEM (scratch for the entries of the ending rows, past 1024 -- 256
 * for one row; nothing changed):
 * these at step 1 or before, nothing changed. BT_ENOROWS (step 3),
 * BT_ENOBLOCKS or BT_ECORRUPT (step 4, as bt_blocks_alloc): the releases of
 * step 2 stand. And the client protocol's. */
int bt_step_ex(bt_client *cl, bt_step_args *args);

/* bt_step_ex on a persistent args struct (a scheduler loop's plan): sets
 * its three counts, after checking them against caps[0..2], what its
 * free_rows, rows / n_new and arrive_* arrays hold, then steps. Returns the
 * number of new ids (args->ids_total), or a negative error: BT_EINVAL
 * (args or caps NULL; a count past its cap: nothing changed, args
 * included), and bt_step_ex's. Thread safety: bt_step_ex's (one thread
 * per args). */
int64_t bt_step_run(bt_client *cl, bt_step_args *args, uint32_t n_free, uint32_t n_rows,
                    uint32_t n_arrive, const uint32_t *caps);

/* bt_step_ex without arrivals, with ids_out large enough for sum(n_new).
 * Errors: bt_step_ex's. */
int bt_step(bt_client *cl, uint32_t pool,
            const uint32_t *free_rows, uint32_t n_free,
            const uint32_t *rows, const uint32_t *n_new, uint32_t n_rows,
            int32_t *ids_out);

/* ---- 7. Slot mapping ----------------------------------------------------- */
/* slot = table[row][pos / bs] * bs + pos % bs, int64, -1 where no block backs
 * the position (pos < 0 or pos / bs >= the row's num_blocks).
 * `bs` is the unit of the stored ids: the segment's block size, or its kernel
 * block size for tables that store kernel-block ids (slots are equal in both
 * views). With decode context parallelism (cp_world > 1) a virtual block of
 * bs * cp_world tokens is striped over ranks in runs of cp_interleave tokens;
 * positions that are not this rank's get -1. */
typedef struct bt_slot_params {
    uint32_t block_size;        /* 0 = the segment's block size */
    uint32_t cp_world;          /* 0 or 1 = no context parallelism */
    uint32_t cp_rank;
    uint32_t cp_interleave;     /* 0 = 1 */
} bt_slot_params;

/* Errors of all three forms: BT_EINVAL (seg NULL, a buffer NULL where n > 0;
 * impossible params: block_size past 2^20, cp_world past 1024, cp_rank >=
 * cp_world, cp_interleave past block_size or, with cp_world > 1, not
 * dividing it), BT_ERANGE (a row past the rows). Read-only: any process,
 * any thread, no client; rows are read without their seqlock (see slots.c). */

/* Form 1 (the seed's): positions start..start+n-1 of one row. */
int bt_slots_row(const bt_seg *seg, const bt_slot_params *p, uint32_t row,
                 int64_t start, uint32_t n, int64_t *out);

/* Form 2 (vLLM v1): per token (row index, position). On BT_ERANGE (a bad
 * row) the first entries of out may have been written: out is the caller's
 * scratch, and nothing shared changed. */
int bt_slots_req(const bt_seg *seg, const bt_slot_params *p, const int32_t *rows,
                 const int64_t *positions, uint32_t n, int64_t *out);

/* Form 3: request i covers tokens [qsl[i], qsl[i+1]) and lives in rows[i]
 * (rows == NULL: row i). out has out_len >= qsl[num_reqs] entries; the tail
 * past qsl[num_reqs] is filled with -1 (CUDA-graph padding). Also BT_EINVAL:
 * qsl or out NULL, qsl[0] != 0, qsl decreasing or past out_len (checked
 * before anything is written). */
int bt_slots_qsl(const bt_seg *seg, const bt_slot_params *p, const int32_t *rows,
                 const int32_t *qsl, uint32_t num_reqs, const int64_t *positions,
                 int64_t *out, uint32_t out_len);

/* ---- 8. Recovery and checking -------------------------------------------- */
#define BT_CHECK_REPAIR    1    /* rebuild counts and free lists (freezes the segment) */
#define BT_CHECK_FROZEN    2    /* freeze for an exact read-only check, change nothing */

typedef struct bt_check_report {
    uint64_t blocks_free;       /* on free lists or in magazines (after repair, if repairing) */
    uint64_t blocks_held;       /* with a nonzero count */
    uint64_t refcnt_fixed;      /* blocks whose count disagreed with their holders */
    uint64_t leaked;            /* held by nobody, not free (repair frees them) */
    uint64_t double_free;       /* on a free list twice, or free and held */
    uint64_t rows_fixed;        /* rows with a bad count, stale tail or odd seqlock */
    uint64_t bad_entries;       /* row / hand entries out of range (dropped on repair) */
    uint64_t clients_reaped;    /* dead clients' slots freed */
    uint64_t pause_ns;          /* how long the segment was frozen */
    uint32_t stuck_client;      /* a live client that stayed in_op: repair deferred */
    uint32_t _pad;
    uint64_t chunks_free;       /* paged rows' chunk pool: free chunks */
    uint64_t chunks_leaked;     /* chunks neither free nor in a live row's directory */
    uint64_t cache_bad;         /* cache-pool problems found (links, counts, keys, owner) */
    uint64_t cache_reset;       /* cache pools reset by a repair (dead owner or corrupt) */
} bt_check_report;

/* Check the segment. Without flags, a read-only scan (racy under load, exact
 * when quiet). BT_CHECK_FROZEN: exact under load (a pause, nothing changed;
 * the invariant check of the chaos tests). BT_CHECK_REPAIR: freeze, wait up to wait_ms for live
 * clients to leave their calls (BT_EBUSY with stuck_client set if one does
 * not), recompute every count from the rows and the live clients' hands,
 * rebuild the free lists (clients' magazines emptied into them), thaw.
 * Cache pools (section 10) are not on free lists and their counts are their
 * owner's: each is verified on its own
 * (queue links, counts against the queue, key lists, bucket chains; problems
 * counted in cache_bad) and, when repairing, reset if its owner is gone or
 * its structure is broken -- even with a live owner, which must then stop
 * using it (bt_cache_close and bt_cache_open again). out may be NULL.
 * Errors: BT_EINVAL (seg NULL), BT_EBUSY (another live process is sweeping;
 * or a live client stayed in a call past wait_ms: out->stuck_client names
 * it, nothing was repaired), -ENOMEM (the scan's scratch: a byte or a word
 * per block). Any thread or process; a repair pauses every client. */
int bt_seg_check(bt_seg *seg, int flags, uint32_t wait_ms, bt_check_report *out);

/* Declare client `id` dead (its process is gone) and recover what it held:
 * rows released, loose references released, cache pools it owned reset,
 * slot freed. If it died inside a
 * call, a repairing check runs (see bt_seg_check) so that half-done work is
 * undone; BT_EBUSY if that had to be deferred (the slot stays DEAD and is
 * recovered by the next successful bt_seg_check with BT_CHECK_REPAIR).
 * Recovering a FREE slot is a no-op. Errors: BT_EINVAL (seg NULL), BT_ERANGE
 * (id 0 or past max_clients), BT_EBUSY (its process is alive -- a zombie is
 * dead, see bt_proc_start_time -- or the repair was deferred), -ENOMEM.
 * Any thread or process. */
int bt_seg_recover_client(bt_seg *seg, uint32_t id, uint32_t wait_ms, bt_check_report *out);

/* ---- 9. GPU mirrors: descriptors and dirty tracking ----------------------- */
/* libbt knows no CUDA: it keeps, per mirror, what an exporter published (an
 * IPC handle and offsets into the allocation it covers, the device's UUID, a
 * generation bumped on every publish) and what the device copy last saw of
 * each row, so that any process can bring it up to date with only what
 * changed. The CUDA side lives in the Python package. */
#define BT_MIRROR_FREE      0
#define BT_MIRROR_CLAIMED   1   /* being set up by its exporter */
#define BT_MIRROR_PUBLISHED 2

typedef struct bt_mirror_desc {
    uint32_t state;
    int32_t  exporter_pid;
    uint64_t exporter_start;
    uint64_t generation;        /* bumped by publish and retire */
    uint8_t  uuid[16];          /* the device's UUID: indices differ between processes */
    uint8_t  handle[64];        /* cudaIpcMemHandle_t of the allocation */
    uint64_t alloc_size;        /* bytes of the allocation the handle covers */
    uint64_t table_off;         /* offset of int32 [num_rows][row_width] in it */
    uint64_t counts_off;        /* offset of int32 [num_rows] in it */
    uint32_t device_index;      /* the exporter's index, for display only */
    uint32_t _pad;
} bt_mirror_desc;

/* Errors of every bt_mirror_* call: BT_EINVAL (seg or a needed pointer
 * NULL), BT_ERANGE (idx >= max_mirrors); each lists the rest. Any thread or
 * process; a mirror has one exporter, and one syncer at a time (its lock). */

/* Claim a free mirror slot for the calling process. Errors: BT_ENOCLIENTS
 * (every mirror slot is taken). */
int bt_mirror_claim(bt_seg *seg, uint32_t *idx_out);
/* Publish the descriptor (state, pid, generation are set here). The device
 * copy is taken as empty: the first stage is a full one. Errors: BT_EINVAL
 * also when the allocation (alloc_size, offsets) cannot hold the table and
 * the counts. */
int bt_mirror_publish(bt_seg *seg, uint32_t idx, const bt_mirror_desc *d);
/* Withdraw a mirror (its exporter is going away). */
int bt_mirror_retire(bt_seg *seg, uint32_t idx);
/* A consistent copy of the descriptor. Errors: BT_EBUSY (a publish kept
 * changing it). */
int bt_mirror_get(const bt_seg *seg, uint32_t idx, bt_mirror_desc *out);
/* Forget what the device copy saw: the next stage is a full one (after a
 * failed copy, or a new allocation). */
int bt_mirror_invalidate(bt_seg *seg, uint32_t idx);

/* Stage what changed in rows [0, num_rows) since the mirror last saw them, as
 * (flat index, value) pairs: index < num_rows_total * row_width is a table
 * entry, index >= that is the block count of row (index - that). Each row is
 * read under its seqlock (never torn). Appends stage only the new entries;
 * other edits stage the row up to the longer of its old and new length
 * (zeroing the old tail). The mirror's record is updated as staged: if the
 * copy then fails, call bt_mirror_invalidate. Serialised per mirror by a lock
 * word (BT_EBUSY if another live process holds it). A mirror whose device
 * copy is unknown (new, or invalidated) stages every row of the segment in
 * full, whatever num_rows says. BT_EINVAL if cap is too small: nothing to
 * upload, and the mirror is invalidated. cap >= total rows * (row_width + 1)
 * always suffices. Errors: BT_EINVAL (n_out NULL; idx_out or val_out NULL
 * with cap > 0; cap too small), BT_ERANGE (num_rows past the rows), BT_EBUSY
 * (the lock is held by a live process; or a row stayed mid-write: the mirror
 * is invalidated). */
int bt_mirror_stage(bt_seg *seg, uint32_t idx, uint32_t num_rows,
                    int64_t *idx_out, int32_t *val_out, uint64_t cap,
                    uint64_t *n_out, uint32_t *rows_dirty_out);

/* Ordering syncs between processes: a sync that holds the mirror's lock
 * from staging until its copy is enqueued, and leaves behind a CUDA IPC
 * event recorded after that copy, lets the next syncer (any process) wait
 * on it before its own copy. */
typedef struct bt_mirror_sync {
    int32_t  pid;               /* the last syncer (set by bt_mirror_sync_done) */
    uint32_t _pad;
    uint64_t start_time;        /* of pid, to tell a recycled pid */
    uint64_t seq;               /* bumped by every bt_mirror_sync_done */
    uint8_t  event[64];         /* cudaIpcEventHandle_t recorded after its copy */
} bt_mirror_sync;

#define BT_STAGE_KEEP_LOCK 1    /* on success, keep the mirror's lock held */

/* bt_mirror_stage with flags; with BT_STAGE_KEEP_LOCK the lock stays held on
 * success (release it with bt_mirror_sync_done or bt_mirror_unlock) and
 * *last_out (may be NULL) receives the previous sync's record. */
int bt_mirror_stage_ex(bt_seg *seg, uint32_t idx, uint32_t num_rows, int flags,
                       int64_t *idx_out, int32_t *val_out, uint64_t cap,
                       uint64_t *n_out, uint32_t *rows_dirty_out, bt_mirror_sync *last_out);
/* Publish this sync's record (pid, start time and seq are filled in here)
 * and release the lock taken by bt_mirror_stage_ex. BT_EBUSY if the caller
 * does not hold it. */
int bt_mirror_sync_done(bt_seg *seg, uint32_t idx, const bt_mirror_sync *rec);
/* Release the lock without a record (the copy failed: invalidate first).
 * Errors: BT_EBUSY (the caller does not hold it). */
int bt_mirror_unlock(bt_seg *seg, uint32_t idx);
/* The last sync's record (a plain snapshot). */
int bt_mirror_sync_get(const bt_seg *seg, uint32_t idx, bt_mirror_sync *out);

/* What bt_mirror_sync_begin found: the staged pairs, whose copy the stream
 * must follow, and the scatter launch that uploads the pairs. */
typedef struct bt_mirror_plan {
    uint64_t n;                 /* pairs staged (0: nothing changed) */
    uint32_t rows_dirty;        /* rows with changes */
    int32_t  order;             /* BT_ORDER_*, from `last` against the caller */
    uint32_t grid;              /* blocks of `block` threads for n pairs, <= max_grid */
    uint32_t _pad;
    bt_mirror_sync last;        /* the previous sync's record */
} bt_mirror_plan;

#define BT_ORDER_NONE 0         /* nobody synced yet, or a syncer of ours with another event */
#define BT_ORDER_SELF 1         /* the record names this process and self_event */
#define BT_ORDER_PEER 2         /* the record names another process (alive or dead) */

/* A GPU sync's host side in one call: bt_mirror_stage_ex(..., KEEP_LOCK)
 * into idx_out/val_out, then the plan: n, the rows, the order (the record
 * compared with this process and its 64-byte IPC event handle self_event)
 * and the grid; n is also stored at *n_arg (may be NULL: e.g. the launch's
 * argument slot). On success the lock is held: release it with
 * bt_mirror_sync_done or bt_mirror_unlock. Errors: bt_mirror_stage_ex's,
 * and BT_EINVAL (out or self_event NULL, block or max_grid 0); on an error
 * the lock is not held. Any thread or process (one syncer at a time). */
int bt_mirror_sync_begin(bt_seg *seg, uint32_t idx, uint32_t num_rows,
                         int64_t *idx_out, int32_t *val_out, uint64_t cap,
                         const uint8_t *self_event, uint32_t block, uint32_t max_grid,
                         int64_t *n_arg, bt_mirror_plan *out);

/* ---- 10. The prefix cache: vLLM's BlockPool in the segment ---------------- */
/* A cache pool (pool < cfg.cache_pools) is vLLM 0.32's BlockPool (block_pool.py
 * with FreeKVCacheBlockQueue) kept in shared memory: reference counts (the
 * segment's per-block counts, = vLLM's ref_cnt; the owner stamp is the owning
 * client), the free queue (a doubly linked LRU list: first = next allocated),
 * and the block-hash -> block map (keys of 1..64 bytes; vLLM's
 * BlockHashWithGroupId bytes). Every call does what vLLM's method of the same
 * name does, in the same order, so a pool driven by the same calls holds the
 * same state as vLLM's.
 *
 * The null block: pool 0's id 0, as vLLM's null_block (the first popleft of
 * a fresh pool): never in the queue, never allocated; touch/free skip it and
 * keep no count for it (vLLM keeps one it never reads). Other cache pools
 * have no null block: all their ids [pool * bpp, (pool + 1) * bpp) are
 * usable. Initial state (creation, and after every pool reset): all blocks
 * free with count 0, the queue holds the pool's ids in increasing order, no
 * keys.
 *
 * Concurrency: one writer per pool, the client that opened it
 * (bt_cache_open); every mutating call requires it (BT_ENOTOWNER otherwise)
 * and runs inside the client protocol (freeze respected). Readers in any
 * process (bt_cache_lookup, bt_cache_block_key, bt_cache_stats_get,
 * bt_cache_queue) are lock-free: they read under the pool's seqlock and retry
 * (BT_EBUSY after ~2 s of a writer that stays mid-write: it died).
 *
 * Ownership is recovered: when the owner closes the pool, closes its client
 * (bt_client_close), or dies and is recovered (bt_seg_recover_client, or a
 * repairing bt_seg_check), the pool is reset to its initial state (every
 * block free, every key gone) and unowned. A dead owner's half-done call
 * therefore never matters.
 *
 * Errors common to all: BT_EINVAL (null pointer, pool not a cache pool),
 * BT_ERANGE (pool >= num_pools; a block id not in the pool), BT_ECORRUPT (an
 * impossible link or index in the pool's shared state: a scribble. A mutating
 * call may then have done part of its work; the pool must be reset, by
 * bt_cache_close and bt_cache_open, or a repairing check). Mutating calls
 * (those taking a bt_client) also fail with BT_ENOTOWNER when cl does not
 * own the pool (bt_cache_open excepted), and with the client protocol's;
 * the lock-free readers with BT_EBUSY (a writer stayed mid-write). */
#define BT_CACHE_KEY_MAX 64

typedef struct bt_cache_key {
    int32_t  block;             /* the block the key maps to */
    uint32_t ntokens;           /* as given to bt_cache_insert */
    uint32_t len;               /* bytes of key; 0 = none */
    uint32_t _pad;
    uint8_t  key[64];
} bt_cache_key;

/* Become the pool's writer. The pool is reset to its initial state unless
 * cl already owns it (then a no-op). A pool owned by a dead client (slot not
 * active or its process gone) is taken over. BT_EBUSY if a live client owns
 * it, or a recoverer is resetting it right now (retry). */
int bt_cache_open(bt_client *cl, uint32_t pool);

/* Reset the pool (every block free, every key gone) and give it up. */
int bt_cache_close(bt_client *cl, uint32_t pool);

/* vLLM get_new_blocks(n): pop the first n blocks of the queue; each popped
 * block that has keys loses them all (an eviction, counted); count := 1.
 * BT_ENOBLOCKS if fewer than n are free, nothing changed. removed_out
 * receives the removed keys in order (block by block, each block's primary
 * first, then its extra keys in insertion order; vLLM's extras are a set, so
 * their order there is unspecified); removed_out may be NULL when removed_cap
 * is 0. If removed_cap is too small the call fails with BT_EINVAL before
 * changing anything and *n_removed (may be NULL) says how many were needed. */
int bt_cache_alloc(bt_client *cl, uint32_t pool, uint32_t n, int32_t *ids_out,
                   bt_cache_key *removed_out, uint32_t removed_cap, uint32_t *n_removed);

/* vLLM touch(blocks): for each id in order, a count of 0 takes the block out
 * of the queue, then count += 1. The null block is accepted and ignored. All
 * ids are checked first (BT_ERANGE, nothing changed). */
int bt_cache_touch(bt_client *cl, uint32_t pool, const int32_t *ids, uint32_t n);

/* vLLM free_blocks(ordered_blocks): for each id in order count -= 1; the
 * blocks reaching 0 without keys (all of them when caching == 0) are
 * prepended to the queue keeping list order, those with keys appended to its
 * tail keeping list order. The null block is skipped. BT_ENOTHELD, nothing
 * changed, if a count would go below 0 (duplicates in the list count). */
int bt_cache_free(bt_client *cl, uint32_t pool, const int32_t *ids, uint32_t n, int caching);

/* vLLM unpin_blocks(blocks): count -= 1; those reaching 0 are appended to the
 * tail whatever their keys. BT_ENOTHELD as bt_cache_free; the null block is
 * BT_EINVAL (vLLM asserts). */
int bt_cache_unpin(bt_client *cl, uint32_t pool, const int32_t *ids, uint32_t n);

/* vLLM _insert_block_hash(key, block, ntokens): if (key -> block) is already
 * in the map (the block's primary key, or one of its extras):
 * *inserted = 0, nothing changes. Otherwise a block without keys gets key as
 * its primary (with ntokens), a block with one gets it as an extra key; the
 * map entry goes after any entries of other blocks with the same key (a
 * lookup returns the oldest). Any block state is allowed (vLLM caches held
 * blocks); the null block is BT_EINVAL, as is len outside 1..64. BT_ENOKEYS
 * if the pool's key entries (cfg.cache_keys) are all in use. inserted may be
 * NULL. */
int bt_cache_insert(bt_client *cl, uint32_t pool, int32_t block, const uint8_t *key, uint32_t len,
                    uint32_t ntokens, int *inserted);

/* n bt_cache_insert calls in one (vLLM cache_full_blocks): keys concatenated,
 * each len bytes; ntokens[i] per block (NULL: 0). All arguments are checked
 * first (BT_EINVAL / BT_ERANGE: nothing changed). On BT_ENOKEYS the inserts
 * made before the key that found no free entry stand (this one call is not
 * all-or-nothing); the rest were not made. *n_inserted (may be NULL) counts
 * the entries added. */
int bt_cache_insert_many(bt_client *cl, uint32_t pool, const int32_t *blocks, uint32_t n,
                         const uint8_t *keys, uint32_t len, const uint32_t *ntokens,
                         uint32_t *n_inserted);

/* vLLM _remove_cached_block_hashes(block): every key of the block leaves the
 * map; removed_out gets them (primary first). Capacity rule as in
 * bt_cache_alloc. A block without keys: *n_removed = 0. */
int bt_cache_remove(bt_client *cl, uint32_t pool, int32_t block,
                    bt_cache_key *removed_out, uint32_t removed_cap, uint32_t *n_removed);

/* The oldest-inserted block mapped from key, or *block_out = 0 if none (0
 * is never a cached block). Any process, lock-free (seqlock). Counts a query
 * and, when found, a hit. */
int bt_cache_lookup(const bt_seg *seg, uint32_t pool, const uint8_t *key, uint32_t len,
                    int32_t *block_out);

/* vLLM's find_longest_cache_hit loop in one call: look up keys[i] (each len
 * bytes) in order and stop at the first miss; blocks_out[0..*n_hit) are the
 * hits. Counts a query per key looked up and a hit per hit. */
int bt_cache_lookup_many(const bt_seg *seg, uint32_t pool, const uint8_t *keys, uint32_t n,
                         uint32_t len, int32_t *blocks_out, uint32_t *n_hit);

/* A block's primary key (out->len 0 = none) with its ntokens, and how many
 * extra keys it has (nkeys_out may be NULL). Any process, lock-free. */
int bt_cache_block_key(const bt_seg *seg, int32_t block, bt_cache_key *out, uint32_t *nkeys_out);

/* vLLM reset_prefix_cache(): only when no block but the null block is in use
 * (else BT_EBUSY, nothing changed, as vLLM returns False): every key removed;
 * the queue order and the counts are left as they are. */
int bt_cache_reset(bt_client *cl, uint32_t pool);

/* Set a held block's count (vLLM's copy-on-write path writes ref_cnt on a
 * held block): allowed only from >= 1 to >= 1, else BT_EINVAL (the queue
 * would no longer match the counts). The null block is BT_EINVAL. */
int bt_cache_set_ref(bt_client *cl, uint32_t pool, int32_t block, uint32_t refcnt);

typedef struct bt_cache_stats {
    uint32_t owner;             /* client id, 0 = none */
    int32_t  owner_pid;
    uint32_t num_blocks;        /* blocks_per_pool (incl. the null block of pool 0) */
    uint32_t free;              /* blocks in the queue (vLLM get_num_free_blocks) */
    uint32_t cached_free;       /* free blocks that still have keys */
    uint32_t in_use;            /* blocks with count > 0 (the null block not counted) */
    uint32_t keys;              /* entries in the map */
    uint32_t key_cap;           /* cfg.cache_keys */
    uint64_t queries;           /* keys looked up */
    uint64_t hits;              /* lookups that found a block */
    uint64_t stored;            /* keys inserted */
    uint64_t evicted;           /* keys removed by bt_cache_alloc (eviction) */
    uint64_t blocks_evicted;    /* blocks that lost keys in bt_cache_alloc */
    uint64_t resets;            /* bt_cache_reset calls that cleared the map */
} bt_cache_stats;

/* A consistent snapshot (seqlock), from any process. */
int bt_cache_stats_get(const bt_seg *seg, uint32_t pool, bt_cache_stats *out);

/* The queue in order (first = next allocated): the first min(cap, free) ids
 * go to ids_out, *n_out = the queue's length. Any process, lock-free. */
int bt_cache_queue(const bt_seg *seg, uint32_t pool, int32_t *ids_out, uint32_t cap, uint32_t *n_out);

/* Address of the pool's free count (a 32-bit word in the segment, written by
 * the owner), for a reader that polls it without a call (Python's
 * CachePool.num_free); NULL if pool is not a cache pool. */
const uint32_t *bt_cache_nfree_ptr(const bt_seg *seg, uint32_t pool);

/* ---- 11. Gathering rows by key: the workers' block tables ----------------- */
/* A worker that did not write the rows (vLLM's model runner, one per
 * tensor-parallel rank) builds its batch's block table from them: one row per
 * request, found by the 64-bit key the writer claimed it with, copied into
 * the caller's table in batch order. Read-only on the segment: any attached
 * process may call these, from any thread, without a client. Each row is read
 * under its seqlock, so a copy is never torn; a row being released or
 * re-claimed is either seen whole before or not at all.
 *
 * Keys must be unique among claimed rows (the writer's job); a row whose
 * owner is 0 (free) never matches, whatever key it last held. */

/* The claimed row holding `key` (a scan of the row metadata: O(num_rows)).
 * Errors: BT_EINVAL (seg or row_out NULL), -ENOENT (no claimed row has it),
 * BT_EBUSY (a row stayed mid-write past the seqlock wait). */
int bt_row_find(const bt_seg *seg, uint64_t key, uint32_t *row_out);

/* Gather the rows of keys[0..n) into out (n rows of out_stride int32 each):
 * row i of out gets the first min(num_blocks, out_stride) entries of key i's
 * row and zeros after them; nblocks_out[i] gets that row's num_blocks (the
 * whole count, even past out_stride), or -1 if no claimed row holds key i
 * (out's row i is then all zeros).
 * hints_inout[i] remembers where key i was: (generation << 32 | (row + 1)),
 * 0 = unknown. A hint whose row no longer holds key i claimed under that
 * generation (released, or re-claimed since) is not trusted: the row is
 * searched for again (bt_row_find) and the hint rewritten, so a caller that
 * keeps its hints sees a generation change as a changed hint. Hints are
 * bounds-checked (any value is safe).
 * Errors: BT_EINVAL (a NULL pointer with n > 0, out_stride 0), BT_EBUSY (a
 * row stayed mid-write too long); out and nblocks_out are then unspecified,
 * hints valid. Thread-safe; keys, hints and out belong to the caller. */
int bt_rows_gather(const bt_seg *seg, const uint64_t *keys, uint32_t n, uint64_t *hints_inout,
                   int32_t *out, uint32_t out_stride, int32_t *nblocks_out);

/* BT_CDEF_END */

#ifdef __cplusplus
}
#endif
#endif /* BT_H */
