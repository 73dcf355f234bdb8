/* errors.c -- names and messages of the error codes (LMDB's mdb_strerror). */
#include <string.h>
#include "bt.h"

static const char *const msgs[] = {
    "BT_EINVAL: invalid argument",
    "BT_ERANGE: row, block, pool or position out of range",
    "BT_ENOBLOCKS: not enough free blocks in the pool",
    "BT_EROWFULL: the row has no room for that many blocks",
    "BT_ENOROWS: every row is claimed",
    "BT_ENOCLIENTS: every client slot is taken",
    "BT_EHANDFULL: the client holds as many loose blocks as it may",
    "BT_ENOTHELD: block is free or not held by this client",
    "BT_ENOTOWNER: row is claimed by another client",
    "BT_EROWSTATE: row is not in the state this call needs",
    "BT_EBADMAGIC: not a blocktable segment",
    "BT_EVERSION: segment layout format or ABI differs from this library's",
    "BT_ECORRUPT: impossible value found in shared memory",
    "BT_EBUSY: row stayed mid-write too long, or a client stayed in a call",
    "BT_EFROZEN: segment frozen for recovery by a process that died",
    "BT_ENAME: segment name is empty, too long, or contains '/'",
    "BT_ECONFIG: impossible configuration",
    "BT_ECLIENT: client handle is closed, forked, or its slot was reclaimed",
    "BT_ENOCHUNKS: the chunk pool of paged rows is exhausted",
    "BT_ENOKEYS: the cache pool's key entries are exhausted",
};

const char *bt_strerror(int err)
{
    if (err == 0)
        return "BT_OK: success";
    if (err <= BT_ERR_FIRST && err >= BT_ERR_LAST)
        return msgs[BT_ERR_FIRST - err];
    if (err < 0)
        return strerror(-err);
    return "unknown error";
}

const char *bt_errname(int err)
{
    static const char *const names[] = {
        "BT_EINVAL", "BT_ERANGE", "BT_ENOBLOCKS", "BT_EROWFULL", "BT_ENOROWS",
        "BT_ENOCLIENTS", "BT_EHANDFULL", "BT_ENOTHELD", "BT_ENOTOWNER",
        "BT_EROWSTATE", "BT_EBADMAGIC", "BT_EVERSION", "BT_ECORRUPT", "BT_EBUSY",
        "BT_EFROZEN", "BT_ENAME", "BT_ECONFIG", "BT_ECLIENT", "BT_ENOCHUNKS",
        "BT_ENOKEYS",
    };
    _Static_assert(sizeof(names) / sizeof(names[0]) == BT_ERR_FIRST - BT_ERR_LAST + 1, "names");
    _Static_assert(sizeof(msgs) / sizeof(msgs[0]) == BT_ERR_FIRST - BT_ERR_LAST + 1, "msgs");
    if (err == 0)
        return "BT_OK";
    if (err <= BT_ERR_FIRST && err >= BT_ERR_LAST)
        return names[BT_ERR_FIRST - err];
    if (err < 0) {
        const char *s = strerrorname_np(-err);
        return s ? s : "EUNKNOWN";
    }
    return "EUNKNOWN";
}
