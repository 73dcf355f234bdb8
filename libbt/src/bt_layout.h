/*
 * bt_layout.h -- the bytes of a segment. Everything here lives in shared
 * memory, mapped at a different address in every process: offsets and
 * indices only, never pointers. Changing anything here changes BT_FORMAT or
 * the ABI fingerprint, and old segments are refused (BT_EVERSION).
 *
 *   [header][pools][next u32 x T][refcnt u32 x T][owner u32 x T]
 *   [row meta x R][table i32 x R*W][nblocks i32 x R][ntokens i64 x R]
 *   [client slots (with magazines) x C][hands u32 x C*H]
 *   [mirror descriptors x M][synced {seq, nb} u32 x 2 x M*R]
 *   [chunk pool][chunk next u32 x N][chunks i32 x N*S][directory u32 x R*D]
 *   [cache pool headers x CP][cache blocks x CP*bpp][key entries x CP*K]
 *   [buckets u32 x CP*pow2(K)]
 * A directory entry holds chunk index + 1 (0 = no chunk), so fresh zeroed
 * memory is a valid empty directory. Likewise key-entry links (bucket heads,
 * chain links, a block's key list) hold entry index + 1.
 *
 * Every region starts on a 64-byte line; the table on a 4 KiB page, so that a
 * GPU can register it and a numpy view of it is aligned.
 */
#ifndef BT_LAYOUT_H
#define BT_LAYOUT_H

#include <stddef.h>
#include <stdint.h>
#include "bt.h"

#define BT_CACHELINE   64
#define BT_PAGE        4096
/* "BTSEG" then 0x01 0x02 0x03: a segment written with the other byte order
 * reads as a different number, which attach names as such. */
#define BT_MAGIC       0x4254534547010203ULL
#define BT_MAGIC_SWAP  0x0302014745535442ULL
#define BT_FORMAT      2u

#define BT_NIL         0xFFFFFFFFu      /* end of a free list */
#define BT_MAX_POOLS   256u
#define BT_MAX_BLOCKS  (1u << 30)       /* ids stay positive int32, slots fit int64 */
#define BT_MAX_ROWS    (1u << 22)
#define BT_MAX_WIDTH   (1u << 22)
#define BT_MAX_CLIENTS 4096u
#define BT_MAX_HAND    (1u << 20)
#define BT_MAX_TABLE   (1ull << 34)     /* bytes of the dense table */

enum bt_region {
    BT_R_POOLS, BT_R_NEXT, BT_R_REFCNT, BT_R_OWNER, BT_R_ROWS, BT_R_TABLE,
    BT_R_NBLOCKS, BT_R_NTOKENS, BT_R_CLIENTS, BT_R_HANDS, BT_R_MIRRORS, BT_R_SYNCED,
    BT_R_CPOOL, BT_R_CNEXT, BT_R_CHUNKS, BT_R_DIR,
    BT_R_CACHE, BT_R_CBLOCKS, BT_R_CKEYS, BT_R_CBUCKETS, BT_R_COUNT
};

struct bt_header {
    uint64_t magic;
    uint32_t format;
    uint32_t header_size;
    uint64_t abi;
    uint64_t size;
    bt_config cfg;
    uint64_t off[BT_R_COUNT];
    int32_t  owner_pid;
    uint32_t _pad0;
    uint64_t owner_start_time;
    uint64_t generation;                /* atomic */
    uint8_t  _pad1[BT_CACHELINE * 5 - 8 * 5 - sizeof(bt_config) - 8 * BT_R_COUNT - 8 * 3];
    /* Hot words, each on its own line. */
    uint64_t freeze __attribute__((aligned(BT_CACHELINE))); /* 0, or the sweeper's pid */
    uint8_t  _pad2[BT_CACHELINE - 8];
    uint32_t row_cursor __attribute__((aligned(BT_CACHELINE))); /* where claims start looking */
    uint8_t  _pad3[BT_CACHELINE - 4];
};

/* A Treiber stack: head packs {index:32 low, tag:32 high}; the tag changes on
 * every successful CAS, so an unchanged head means an unchanged chain. */
struct bt_pool {
    uint64_t head __attribute__((aligned(BT_CACHELINE)));
    int64_t  nfree;                     /* statistics only; updated after the CAS */
    uint8_t  _pad[BT_CACHELINE - 16];
};

struct bt_row {
    uint32_t seq;                       /* seqlock: odd while the owner writes */
    uint32_t owner;                     /* client id, 0 = free; claimed by CAS */
    uint32_t flags;
    uint32_t generation;
    uint64_t key;
    uint32_t rewrite_seq;               /* seq of the last non-append write */
    uint8_t  _pad[BT_CACHELINE - 28];
} __attribute__((aligned(BT_CACHELINE)));

/* A client's magazine (DPDK's per-lcore mempool cache): free blocks of one
 * pool, taken off the shared stack in bulk, so that a client's alloc and
 * release touch only its own lines. Blocks in it have count 0 and owner 0,
 * are on no free list, and count as free (bt_pool_free_count). Written by its
 * client inside a call, by whoever releases a dead client's holdings, and by
 * a repair (which empties every magazine into the rebuilt lists). */
#define BT_MAG_MAX     64u

struct bt_cslot {
    uint32_t state;                     /* BT_CLIENT_* (bt.h: all five states) */
    int32_t  pid;
    uint64_t start_time;                /* of pid, from /proc: pid reuse is caught */
    uint32_t in_op;
    uint32_t hand_count;
    uint32_t nrows;
    int32_t  recoverer;                 /* pid of the process recovering this slot */
    uint64_t ops;
    uint32_t mag_pool;                  /* the pool of mag[], when mag_count > 0 */
    uint32_t mag_count;                 /* mag[0, mag_count) are the cached blocks */
    uint8_t  _pad[BT_CACHELINE - 48];
    uint32_t mag[BT_MAG_MAX];           /* block ids; the top is mag[mag_count - 1] */
} __attribute__((aligned(BT_CACHELINE)));

struct bt_mirror {
    uint32_t state;
    int32_t  exporter_pid;
    uint64_t exporter_start;
    uint64_t generation;
    uint8_t  uuid[16];
    uint8_t  handle[64];
    uint64_t alloc_size;
    uint64_t table_off;
    uint64_t counts_off;
    uint32_t device_index;
    uint32_t lock;                      /* pid of the process staging a sync */
    uint32_t valid;                     /* 0: the next stage is a full one */
    int32_t  sync_pid;                  /* the last sync: who, and its CUDA event */
    uint64_t sync_start;
    uint64_t sync_seq;
    uint8_t  sync_event[64];
    uint8_t  _pad[BT_CACHELINE * 4 - 232];
} __attribute__((aligned(BT_CACHELINE)));

/* What a mirror last saw of a row. */
struct bt_synced {
    uint32_t seq;
    uint32_t nb;
};

/* A cache pool (vLLM's BlockPool, cache.c). One writer, the owner client;
 * readers use the seqlock. */
#define BT_CACHE_RESETTING 0xFFFFFFFFu  /* owner word: a recoverer is resetting it */
#define BT_MAX_CACHE_KEYS  (1u << 28)
struct bt_cache_hdr {
    uint32_t seq;                       /* seqlock: odd while the owner writes */
    uint32_t owner;                     /* client id, 0 = none, BT_CACHE_RESETTING */
    int32_t  owner_pid;                 /* for display; liveness is the slot's */
    int32_t  locker;                    /* pid of the recoverer resetting it */
    uint64_t owner_start;
    uint32_t head, tail;                /* the free queue: block ids, BT_NIL = empty */
    uint32_t nfree;                     /* blocks in the queue */
    uint32_t nkeys;                     /* entries in the map */
    uint32_t ncached;                   /* blocks in the queue that have keys */
    uint32_t free_key;                  /* free-entry list (entry + 1, 0 = empty) */
    uint32_t key_top;                   /* entries [0, key_top) were ever used since reset */
    uint32_t _pad0;
    /* statistics, on their own line: readers bump queries and hits */
    uint64_t stored __attribute__((aligned(BT_CACHELINE)));
    uint64_t evicted, blocks_evicted, resets;
    uint64_t queries, hits;
    uint8_t  _pad1[BT_CACHELINE - 48];
} __attribute__((aligned(BT_CACHELINE)));

/* Per block of a cache pool, indexed by global id. */
struct bt_cblock {
    uint32_t prev, next;                /* queue links (block ids), BT_NIL at the ends */
    uint32_t keys;                      /* first key entry + 1 (the primary), 0 = none */
    uint32_t inq;                       /* 1 while in the queue */
};

/* A map entry: key -> block. On a bucket chain (oldest first) and on its
 * block's key list (primary first). A free entry links the free list through
 * bucket_next. */
struct bt_ckey {
    uint64_t digest;
    uint32_t block;
    uint32_t bucket_next;               /* entry + 1, 0 = end */
    uint32_t block_next;                /* entry + 1, 0 = end */
    uint32_t ntokens;
    uint16_t len;
    uint16_t _pad0;
    uint32_t _pad1;
    uint64_t key[8];                    /* BT_CACHE_KEY_MAX bytes, zero-padded */
};

#define BT_MAX_MIRRORS 64u
#define BT_MAX_CHUNK   4096u
#define BT_MAX_CHUNKS  (1u << 26)
#define BT_MAX_DIR     (1u << 20)

_Static_assert(sizeof(struct bt_header) == BT_CACHELINE * 7, "header layout");
_Static_assert(sizeof(struct bt_pool) == BT_CACHELINE, "pool layout");
_Static_assert(sizeof(struct bt_row) == BT_CACHELINE, "row layout");
_Static_assert(sizeof(struct bt_cslot) == BT_CACHELINE * 5, "client slot layout");
_Static_assert(sizeof(bt_config) == 56, "config layout");
_Static_assert(sizeof(struct bt_cache_hdr) == BT_CACHELINE * 2, "cache pool header layout");
_Static_assert(sizeof(struct bt_cblock) == 16, "cache block layout");
_Static_assert(sizeof(struct bt_ckey) == 96, "cache key entry layout");
_Static_assert(sizeof(struct bt_mirror) == BT_CACHELINE * 4, "mirror layout");
_Static_assert(offsetof(struct bt_header, freeze) % BT_CACHELINE == 0, "freeze line");

/* Fingerprint of the layout this library was built with: cache line, struct
 * sizes and the format, so that two builds disagreeing on any of them refuse
 * each other's segments (LMDB's lock-file fingerprint). */
#define BT_ABI ((uint64_t)BT_FORMAT << 56 | (uint64_t)BT_CACHELINE << 44 | \
                (uint64_t)sizeof(struct bt_header) << 32 | \
                (uint64_t)sizeof(struct bt_pool) << 24 | \
                (uint64_t)sizeof(struct bt_row) << 16 | \
                (uint64_t)sizeof(struct bt_cslot) << 4 | (uint64_t)sizeof(bt_config) >> 3 | \
                (uint64_t)sizeof(struct bt_mirror) << 8)

#endif /* BT_LAYOUT_H */
