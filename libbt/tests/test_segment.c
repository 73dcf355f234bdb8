/*
 * test_segment.c -- configs, create / attach / validate / unlink.
 *
 * The header-corruption part is white-box: it takes field offsets from
 * bt_layout.h (so it follows the layout when it changes) and corrupts each
 * field of a copy in turn; every mismatch must be its documented error code,
 * never a crash. A layout-blind pass then scribbles on every header word.
 */
#include <fcntl.h>
#include <stddef.h>
#include <sys/stat.h>
#include "bt_test.h"
#include "bt_layout.h"

/* ---- configurations ------------------------------------------------------ */

static void expect_bad_config(const bt_config *c, const char *what)
{
    char buf[256] = "";
    int rc = bt_config_check(c);
    if (rc != BT_ECONFIG)
        T_FAIL("config %s: bt_config_check returned %d (%s), expected BT_ECONFIG", what, rc,
               bt_errname(rc));
    if (bt_config_size(c) != 0)
        T_FAIL("config %s: bt_config_size is %" PRIu64 ", expected 0", what, bt_config_size(c));
    rc = bt_config_explain(c, buf, sizeof(buf));
    if (rc != BT_ECONFIG || !buf[0] || !strcmp(buf, "ok"))
        T_FAIL("config %s: bt_config_explain returned %d, \"%s\"", what, rc, buf);
    bt_seg *seg = (bt_seg *)0x1;
    rc = bt_seg_create(NULL, c, 0, &seg);
    if (rc != BT_ECONFIG)
        T_FAIL("config %s: bt_seg_create returned %d (%s), expected BT_ECONFIG", what, rc,
               bt_errname(rc));
}

static void test_config(void)
{
    bt_config c;
    char buf[256];

    bt_config_default(&c);
    T_EQ(c.block_size, 16);
    T_ASSERT(c.kernel_block_size == 0 || c.kernel_block_size == 16);
    T_EQ(c.num_pools, 1);
    T_EQ(c.blocks_per_pool, 65536);
    T_EQ(c.num_rows, 256);
    T_EQ(c.row_width, 128);
    T_EQ(c.max_clients, 64);
    T_ASSERT(c.hand_size > 0);
    T_OK(bt_config_check(&c));
    T_OK(bt_config_explain(&c, buf, sizeof(buf)));
    T_ASSERT(bt_config_size(&c) >= (uint64_t)256 * 128 * 4);

    /* kernel block size 0 means B; divisors of B are fine */
    c = t_config_small();
    c.kernel_block_size = 0;
    T_OK(bt_config_check(&c));
    for (uint32_t k = 1; k <= 16; k *= 2) {
        c.kernel_block_size = k;
        T_OK(bt_config_check(&c));
    }

    struct { const char *what; bt_config c; } bad[32];
    int nb = 0;
#define BAD(label, field, value) do { \
        bad[nb].what = label; bad[nb].c = t_config_small(); bad[nb].c.field = (value); nb++; \
    } while (0)
    BAD("K=3 does not divide B=16", kernel_block_size, 3);
    BAD("K=32 > B=16", kernel_block_size, 32);
    BAD("K=12 does not divide B=16", kernel_block_size, 12);
    BAD("block_size=0", block_size, 0);
    BAD("num_pools=0", num_pools, 0);
    BAD("blocks_per_pool=0", blocks_per_pool, 0);
    BAD("num_rows=0", num_rows, 0);
    BAD("row_width=0", row_width, 0);
    BAD("max_clients=0", max_clients, 0);
    BAD("block_size=UINT32_MAX", block_size, UINT32_MAX);
    BAD("blocks_per_pool=UINT32_MAX", blocks_per_pool, UINT32_MAX);
    BAD("num_pools=UINT32_MAX", num_pools, UINT32_MAX);
    BAD("num_rows=UINT32_MAX", num_rows, UINT32_MAX);
    BAD("row_width=UINT32_MAX", row_width, UINT32_MAX);
    BAD("max_clients=UINT32_MAX", max_clients, UINT32_MAX);
    BAD("hand_size=UINT32_MAX", hand_size, UINT32_MAX);
#undef BAD
    /* products that overflow: ids must stay int32, sizes must fit 64 bits */
    bad[nb].what = "4 pools x 2^30 blocks (2^32 ids)";
    bad[nb].c = t_config_small(); bad[nb].c.num_pools = 4; bad[nb].c.blocks_per_pool = 1u << 30; nb++;
    bad[nb].what = "2 pools x 2^31 blocks";
    bad[nb].c = t_config_small(); bad[nb].c.num_pools = 2; bad[nb].c.blocks_per_pool = 1u << 31; nb++;
    bad[nb].what = "2^16 pools x 2^16 blocks";
    bad[nb].c = t_config_small(); bad[nb].c.num_pools = 1u << 16; bad[nb].c.blocks_per_pool = 1u << 16; nb++;
    bad[nb].what = "2^31 rows x 2^31 wide";
    bad[nb].c = t_config_small(); bad[nb].c.num_rows = 1u << 31; bad[nb].c.row_width = 1u << 31; nb++;
    bad[nb].what = "2^20 rows x 2^20 wide (4 TiB table)";
    bad[nb].c = t_config_small(); bad[nb].c.num_rows = 1u << 20; bad[nb].c.row_width = 1u << 20; nb++;
    bad[nb].what = "2^31 clients x 2^31 hand";
    bad[nb].c = t_config_small(); bad[nb].c.max_clients = 1u << 31; bad[nb].c.hand_size = 1u << 31; nb++;
    for (int i = 0; i < nb; i++)
        expect_bad_config(&bad[i].c, bad[i].what);

    T_RC2(bt_config_check(NULL), BT_EINVAL, BT_ECONFIG);
    T_EQ(bt_config_size(NULL), 0);

    /* explain truncates into a short buffer and still terminates it */
    c = t_config_small();
    c.kernel_block_size = 3;
    memset(buf, 'x', sizeof(buf));
    T_RC(bt_config_explain(&c, buf, 4), BT_ECONFIG);
    T_ASSERT(memchr(buf, 0, 4) != NULL);
    T_EQ(buf[4], 'x');
    T_RC(bt_config_explain(&c, NULL, 0), BT_ECONFIG);
}

/* ---- embedded, create_at, attach_at ------------------------------------- */

static void test_embedded(void)
{
    bt_config c = t_config(2, 64, 8, 8);
    c.kernel_block_size = 4;
    bt_seg *seg = NULL;
    T_RC(bt_seg_create(NULL, &c, 0, NULL), BT_EINVAL);
    T_RC2(bt_seg_create(NULL, NULL, 0, &seg), BT_EINVAL, BT_ECONFIG);
    T_OK(bt_seg_create(NULL, &c, 0, &seg));
    T_ASSERT(seg != NULL);

    bt_seg_info info = t_info(seg);
    T_ASSERT(!memcmp(&info.config, &c, sizeof(c)));
    T_ASSERT(info.size >= bt_config_size(&c));
    T_EQ(info.total_blocks, 2 * 64);
    T_ASSERT(info.format != 0);
    T_ASSERT(info.abi != 0);
    T_ASSERT(info.table_offset % 64 == 0);
    T_ASSERT(info.nblocks_offset % 4 == 0);
    T_ASSERT(info.ntokens_offset % 8 == 0);
    T_EQ(info.owner_pid, getpid());
    T_ASSERT(info.owner_start_time != 0);   /* with the pid, tells a recycled pid */
    T_ASSERT(info.table_offset + (uint64_t)c.num_rows * c.row_width * 4 <= info.size);
    T_ASSERT(info.nblocks_offset + (uint64_t)c.num_rows * 4 <= info.size);
    T_ASSERT(info.ntokens_offset + (uint64_t)c.num_rows * 8 <= info.size);
    /* regions do not overlap */
    T_ASSERT(info.table_offset + (uint64_t)c.num_rows * c.row_width * 4 <= info.nblocks_offset ||
             info.nblocks_offset + (uint64_t)c.num_rows * 4 <= info.table_offset);

    void *base = bt_seg_base(seg);
    T_ASSERT(base != NULL);
    T_EQ((uintptr_t)base % 4096, 0);
    T_OK(bt_seg_validate(base, info.size));
    const int32_t *tab = t_table(seg);
    for (uint32_t i = 0; i < c.num_rows * c.row_width; i++)
        T_EQ(tab[i], 0);
    T_EQ(t_free(seg, 0), 63);          /* the null block is not free */
    T_EQ(t_free(seg, 1), 64);
    t_check_quiet(seg);

    /* kernel block size 0 is B */
    bt_seg *s2;
    c.kernel_block_size = 0;
    T_OK(bt_seg_create(NULL, &c, 0, &s2));
    bt_seg_info i2 = t_info(s2);
    T_ASSERT(i2.config.kernel_block_size == 0 || i2.config.kernel_block_size == 16);
    bt_seg_close(s2);

    T_RC(bt_seg_info_get(NULL, &info), BT_EINVAL);
    T_RC(bt_seg_info_get(seg, NULL), BT_EINVAL);
    T_ASSERT(bt_seg_base(NULL) == NULL);
    bt_seg_close(seg);
    bt_seg_close(NULL);
}

static void test_create_at(void)
{
    bt_config c = t_config_small();
    uint64_t size = bt_config_size(&c);
    uint8_t *mem = aligned_alloc(4096, size + 4096);
    T_ASSERT(mem != NULL);
    memset(mem, 0xee, size + 4096);     /* create_at must not trust the memory */
    bt_seg *a = NULL, *b = NULL;

    T_RC(bt_seg_create_at(NULL, size, &c, &a), BT_EINVAL);
    T_RC(bt_seg_create_at(mem, size - 1, &c, &a), BT_EINVAL);
    T_RC(bt_seg_create_at(mem, size, &c, NULL), BT_EINVAL);
    T_OK(bt_seg_create_at(mem, size, &c, &a));
    T_ASSERT(bt_seg_base(a) == mem);
    T_EQ(mem[size], 0xee);              /* nothing written past size */
    T_OK(bt_seg_validate(mem, size));
    T_OK(bt_seg_validate(mem, size + 4096));    /* a larger mapping is fine */

    /* a second handle on the same memory sees the same state */
    T_RC(bt_seg_attach_at(mem, size, NULL), BT_EINVAL);
    T_RC(bt_seg_attach_at(NULL, size, &b), BT_EINVAL);
    T_OK(bt_seg_attach_at(mem, size, &b));
    bt_seg_info ia = t_info(a), ib = t_info(b);
    T_ASSERT(!memcmp(&ia.config, &ib.config, sizeof(ia.config)));
    T_EQ(ia.table_offset, ib.table_offset);
    T_EQ(ia.total_blocks, ib.total_blocks);

    bt_client *cl = t_client(a);
    uint32_t row;
    int32_t ids[3], got[8];
    T_OK(bt_row_claim(cl, 42, -1, BT_ROW_MANAGED, &row));
    T_OK(bt_row_alloc_append(cl, row, 0, 3, ids));
    bt_row_info ri = t_row(b, row, got, 8);
    T_EQ(ri.num_blocks, 3);
    T_EQ(ri.key, 42);
    T_EQ(ri.owner, bt_client_id(cl));
    for (int i = 0; i < 3; i++)
        T_EQ(got[i], ids[i]);
    T_EQ(t_free(b, 0), 63 - 3);
    bt_client_close(cl);
    T_EQ(t_free(b, 0), 63);
    t_check_quiet(b);
    bt_seg_close(b);
    bt_seg_close(a);

    /* zeroed memory is no segment */
    memset(mem, 0, size);
    T_RC(bt_seg_validate(mem, size), BT_EBADMAGIC);
    T_RC(bt_seg_attach_at(mem, size, &b), BT_EBADMAGIC);
    free(mem);
}

/* ---- named segments ----------------------------------------------------- */

static int shm_mode(const char *name)
{
    char path[128];
    struct stat st;
    snprintf(path, sizeof(path), "/bt.%s", name);
    int fd = shm_open(path, O_RDONLY, 0);
    if (fd < 0)
        return -errno;
    int rc = fstat(fd, &st);
    close(fd);
    return rc < 0 ? -errno : (int)(st.st_mode & 0777);
}

static void test_named(void)
{
    t_need_shm();
    bt_config c = t_config_small();
    const char *name = t_name("seg");
    bt_seg *a = NULL, *b = NULL, *d = NULL;

    mode_t old = umask(022);
    T_OK(bt_seg_create(name, &c, BT_CREATE_EXCL, &a));
    T_EQ(shm_mode(name), 0600);
    T_RC(bt_seg_create(name, &c, BT_CREATE_EXCL, &b), -EEXIST);
    /* without EXCL an existing segment is opened, never reformatted */
    bt_client *cl = t_client(a);
    uint32_t row;
    int32_t ids[2], got[8];
    T_OK(bt_row_claim(cl, 7, 3, BT_ROW_MANAGED, &row));
    T_EQ(row, 3);
    T_OK(bt_row_alloc_append(cl, row, 0, 2, ids));
    T_OK(bt_seg_create(name, &c, 0, &d));
    T_EQ(t_row(d, 3, got, 8).num_blocks, 2);
    bt_seg_close(d);

    T_OK(bt_seg_attach(name, &b));
    bt_seg_info ia = t_info(a), ib = t_info(b);
    T_ASSERT(!memcmp(&ia.config, &ib.config, sizeof(ia.config)));
    T_EQ(ia.size, ib.size);
    T_OK(bt_seg_validate(bt_seg_base(b), ib.size));
    T_EQ(t_row(b, 3, got, 8).num_blocks, 2);
    T_EQ(got[0], ids[0]);
    T_EQ(got[1], ids[1]);

    /* another process attaches by name, sees the row, writes its own */
    pid_t pid = fork();
    T_ASSERT(pid >= 0);
    if (pid == 0) {
        bt_seg *s;
        int32_t g[8];
        T_OK(bt_seg_attach(name, &s));
        bt_row_info ri = t_row(s, 3, g, 8);
        T_EQ(ri.num_blocks, 2);
        T_EQ(g[1], ids[1]);
        bt_client *ccl = t_client(s);
        uint32_t r2;
        T_OK(bt_row_claim(ccl, 8, 5, BT_ROW_RAW, &r2));
        int32_t raw[3] = { 11, 12, 13 };
        T_OK(bt_row_append(ccl, r2, raw, 3));
        bt_client_close(ccl);          /* releases the row again */
        T_EQ(t_row(s, 5, g, 8).num_blocks, 0);
        T_OK(bt_row_claim(t_client(s), 9, 6, BT_ROW_RAW, &r2));
        bt_seg_close(s);               /* handle gone, slot stays: the parent checks */
        _exit(0);
    }
    t_wait_ok(pid, "attaching child");
    bt_row_info r6 = t_row(a, 6, NULL, 0);
    T_ASSERT(r6.owner != 0);
    T_EQ(r6.key, 9);
    bt_client_slot_info si;
    T_OK(bt_client_slot_get(a, r6.owner, &si));
    T_EQ(si.pid, pid);

    /* unlink: the name goes, the mappings stay */
    T_OK(bt_seg_unlink(name));
    T_EQ(shm_mode(name), -ENOENT);
    T_RC(bt_seg_unlink(name), -ENOENT);
    T_RC(bt_seg_attach(name, &d), -ENOENT);
    T_EQ(t_row(b, 3, got, 8).num_blocks, 2);
    T_OK(bt_row_truncate(cl, 3, 1));
    T_EQ(t_row(b, 3, got, 8).num_blocks, 1);
    bt_client_close(cl);
    bt_seg_close(b);
    bt_seg_close(a);

    /* BT_CREATE_GROUP gives 0660 whatever the umask */
    name = t_name("grp");
    T_OK(bt_seg_create(name, &c, BT_CREATE_EXCL | BT_CREATE_GROUP, &a));
    T_EQ(shm_mode(name), 0660);
    bt_seg_close(a);
    T_OK(bt_seg_unlink(name));
    umask(old);

    T_RC(bt_seg_attach(t_name("absent"), &a), -ENOENT);
}

/* Named objects that are not segments: empty, short, zeroed, other magic. */
static void test_named_garbage(void)
{
    t_need_shm();
    const char *name = t_name("junk");
    char path[128];
    bt_seg *s = NULL;
    snprintf(path, sizeof(path), "/bt.%s", name);
    int fd = shm_open(path, O_RDWR | O_CREAT | O_EXCL, 0600);
    T_ASSERT(fd >= 0);
    T_ERR(bt_seg_attach(name, &s));                     /* size 0 */
    T_ASSERT(ftruncate(fd, 10) == 0);
    T_ERR(bt_seg_attach(name, &s));                     /* shorter than a header */
    T_ASSERT(ftruncate(fd, 1 << 16) == 0);
    T_RC(bt_seg_attach(name, &s), BT_EBADMAGIC);        /* zeroes */
    close(fd);
    T_OK(bt_seg_unlink(name));

    /* a real segment whose magic a writer broke, then mended */
    bt_config c = t_config_small();
    bt_seg *a;
    name = t_name("magic");
    T_OK(bt_seg_create(name, &c, BT_CREATE_EXCL, &a));
    uint64_t *magic = (uint64_t *)bt_seg_base(a);
    uint64_t good = *magic;
    *magic = __builtin_bswap64(good);                   /* the other byte order */
    T_RC(bt_seg_attach(name, &s), BT_EBADMAGIC);
    *magic = good ^ 1;
    T_RC(bt_seg_attach(name, &s), BT_EBADMAGIC);
    *magic = good;
    T_OK(bt_seg_attach(name, &s));
    bt_seg_close(s);
    /* create without EXCL on a broken segment must refuse, not reformat */
    *magic = 0;
    T_RC(bt_seg_create(name, &c, 0, &s), BT_EBADMAGIC);
    T_EQ(*magic, 0);
    *magic = good;
    bt_seg_close(a);
    T_OK(bt_seg_unlink(name));
}

static void test_bad_names(void)
{
    t_need_shm();
    bt_config c = t_config_small();
    bt_seg *s = NULL;
    char longest[BT_NAME_MAX + 2];
    const char *bad[] = { "", "a/b", "/abc", "abc/", "..", "." };

    memset(longest, 'x', sizeof(longest));
    longest[BT_NAME_MAX + 1] = 0;                       /* 49 bytes: one too many */
    T_RC(bt_seg_create(longest, &c, 0, &s), BT_ENAME);
    T_RC(bt_seg_attach(longest, &s), BT_ENAME);
    T_RC(bt_seg_unlink(longest), BT_ENAME);
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        T_RC(bt_seg_create(bad[i], &c, BT_CREATE_EXCL, &s), BT_ENAME);
        T_RC(bt_seg_attach(bad[i], &s), BT_ENAME);
        T_RC(bt_seg_unlink(bad[i]), BT_ENAME);
    }
    T_RC2(bt_seg_attach(NULL, &s), BT_ENAME, BT_EINVAL);
    T_RC2(bt_seg_unlink(NULL), BT_ENAME, BT_EINVAL);

    /* exactly BT_NAME_MAX bytes is fine */
    const char *base = t_name("max");
    snprintf(longest, sizeof(longest), "%s", base);
    size_t n = strlen(longest);
    memset(longest + n, 'y', BT_NAME_MAX - n);
    longest[BT_NAME_MAX] = 0;
    memcpy(t_names[t_nnames - 1], longest, BT_NAME_MAX + 1);          /* unlink it on failure */
    T_OK(bt_seg_create(longest, &c, BT_CREATE_EXCL, &s));
    bt_seg_close(s);
    T_OK(bt_seg_attach(longest, &s));
    bt_seg_close(s);
    T_OK(bt_seg_unlink(longest));
}

/* ---- header validation -------------------------------------------------- */

static const bt_config odd_cfg = {
    .block_size = 16, .kernel_block_size = 4, .num_pools = 3, .blocks_per_pool = 1000,
    .num_rows = 37, .row_width = 23, .max_clients = 11, .hand_size = 29,
};

static uint8_t *orig, *copy;
static uint64_t seg_size;

static int validate_with(size_t off, const void *val, size_t len)
{
    memcpy(copy, orig, seg_size);
    memcpy(copy + off, val, len);
    int rc = bt_seg_validate(copy, seg_size);
    bt_seg *s = NULL;
    int rc2 = bt_seg_attach_at(copy, seg_size, &s);
    if (rc2 != rc)
        T_FAIL("header byte %zu: validate says %s, attach_at says %s", off, bt_errname(rc),
               bt_errname(rc2));
    bt_seg_close(s);
    return rc;
}
static int poke32(size_t off, uint32_t v) { return validate_with(off, &v, 4); }
static int poke64(size_t off, uint64_t v) { return validate_with(off, &v, 8); }
static uint32_t get32(size_t off) { uint32_t v; memcpy(&v, orig + off, 4); return v; }
static uint64_t get64(size_t off) { uint64_t v; memcpy(&v, orig + off, 8); return v; }

#define EXPECT(call, want, ...) do { \
    int e_rc_ = (call); \
    if (e_rc_ != (want)) { \
        char e_m_[200]; snprintf(e_m_, sizeof(e_m_), __VA_ARGS__); \
        T_FAIL("%s: got %s, expected %s", e_m_, bt_errname(e_rc_), bt_errname(want)); \
    } \
} while (0)

static const char *cfg_name(int f)
{
    static const char *const names[] = {
        "block_size", "kernel_block_size", "num_pools", "blocks_per_pool", "num_rows",
        "row_width", "max_clients", "hand_size",
    };
    static char buf[32];
    if (f < (int)(sizeof(names) / sizeof(names[0])))
        return names[f];
    snprintf(buf, sizeof(buf), "field #%d", f);
    return buf;
}
static const char *region_name(int r)
{
    static const char *const names[] = {
        "pools", "next", "refcnt", "owner", "rows", "table", "nblocks", "ntokens", "clients", "hands",
    };
    static char buf[32];
    if (r < (int)(sizeof(names) / sizeof(names[0])))
        return names[r];
    snprintf(buf, sizeof(buf), "#%d", r);
    return buf;
}

/* A segment of odd_cfg, copied to `orig` (pristine) and `copy` (to poke). */
static bt_seg *setup_copies(bt_seg_info *info)
{
    bt_seg *seg = t_seg_embedded(&odd_cfg);
    *info = t_info(seg);
    seg_size = info->size;
    orig = aligned_alloc(4096, seg_size);
    copy = aligned_alloc(4096, seg_size);
    T_ASSERT(orig && copy);
    memcpy(orig, bt_seg_base(seg), seg_size);
    T_OK(bt_seg_validate(orig, seg_size));
    return seg;
}

static void test_validate_fields(void)
{
    bt_seg_info info;
    bt_seg *seg = setup_copies(&info);
    T_EQ(poke32(0, get32(0)), 0);      /* the copy itself is fine */

    /* magic: any bit, or the other byte order */
    const size_t o_magic = offsetof(struct bt_header, magic);
    for (int bit = 0; bit < 64; bit++)
        EXPECT(poke64(o_magic, get64(o_magic) ^ (1ull << bit)), BT_EBADMAGIC, "magic bit %d", bit);
    EXPECT(poke64(o_magic, __builtin_bswap64(get64(o_magic))), BT_EBADMAGIC, "byte-swapped magic");
    EXPECT(poke64(o_magic, 0), BT_EBADMAGIC, "zero magic");

    /* format, header size, ABI fingerprint */
    const size_t o_fmt = offsetof(struct bt_header, format);
    T_EQ(get32(o_fmt), info.format);
    EXPECT(poke32(o_fmt, info.format + 1), BT_EVERSION, "format + 1");
    EXPECT(poke32(o_fmt, info.format - 1), BT_EVERSION, "format - 1");
    EXPECT(poke32(o_fmt, UINT32_MAX), BT_EVERSION, "format ~0");
    const size_t o_hs = offsetof(struct bt_header, header_size);
    uint32_t hs = get32(o_hs);
    T_RC2(poke32(o_hs, hs + 64), BT_EVERSION, BT_ECORRUPT);
    T_RC2(poke32(o_hs, 0), BT_EVERSION, BT_ECORRUPT);
    const size_t o_abi = offsetof(struct bt_header, abi);
    T_EQ(get64(o_abi), info.abi);
    for (int bit = 0; bit < 64; bit++)
        EXPECT(poke64(o_abi, info.abi ^ (1ull << bit)), BT_EVERSION, "abi bit %d", bit);

    /* size: the header's, then the mapping's */
    const size_t o_size = offsetof(struct bt_header, size);
    T_EQ(get64(o_size), seg_size);
    const uint64_t sizes[] = { 0, 1, seg_size - 1, seg_size + 1, seg_size - 4096,
                               seg_size + 4096, seg_size * 2, UINT64_MAX, 1ull << 63 };
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++)
        EXPECT(poke64(o_size, sizes[i]), BT_ECORRUPT, "size %" PRIu64, sizes[i]);

    /* every config field: impossible values, or ones that move the layout,
     * are BT_ECORRUPT; a value that leaves the layout as it is cannot be told
     * from the truth by the header alone and may pass */
    const size_t o_cfg = offsetof(struct bt_header, cfg);
    T_ASSERT(!memcmp(orig + o_cfg, &odd_cfg, sizeof(odd_cfg)));
    for (int f = 0; f < (int)(sizeof(bt_config) / 4); f++) {
        size_t off = o_cfg + 4 * (size_t)f;
        uint32_t v = get32(off);
        const uint32_t vals[] = { 0, 1, 3, v - 1, v + 1, v * 2, v / 2, 1u << 31, UINT32_MAX };
        for (size_t i = 0; i < sizeof(vals) / sizeof(vals[0]); i++) {
            if (vals[i] == v)
                continue;
            bt_config alt = odd_cfg;
            memcpy((uint8_t *)&alt + 4 * f, &vals[i], 4);
            uint64_t alt_size = bt_config_size(&alt);
            int rc = poke32(off, vals[i]);
            if (alt_size != seg_size) {
                if (rc != BT_ECORRUPT)
                    T_FAIL("config %s = %u (%s, needs %" PRIu64 " bytes, segment has %" PRIu64
                           "): validate returned %s, expected BT_ECORRUPT", cfg_name(f), vals[i],
                           alt_size ? "possible" : "impossible", alt_size, seg_size,
                           bt_errname(rc));
            } else if (rc != 0 && rc != BT_ECORRUPT) {
                T_FAIL("config %s = %u: validate returned %s", cfg_name(f), vals[i],
                       bt_errname(rc));
            }
        }
    }
    /* a layout-preserving change the header cannot betray (documented above) */
    int kb = poke32(o_cfg + 4, 8);
    printf("note: kernel_block_size 4 -> 8 in the header: validate says %s\n", bt_errname(kb));

    /* every region offset, moved a little or a lot */
    const size_t o_off = offsetof(struct bt_header, off);
    T_EQ(get64(o_off + 8 * BT_R_TABLE), info.table_offset);
    T_EQ(get64(o_off + 8 * BT_R_NBLOCKS), info.nblocks_offset);
    T_EQ(get64(o_off + 8 * BT_R_NTOKENS), info.ntokens_offset);
    for (int r = 0; r < BT_R_COUNT; r++) {
        size_t off = o_off + 8 * (size_t)r;
        uint64_t v = get64(off);
        const uint64_t vals[] = { 0, v + 1, v + 4, v + 64, v - 64, v + 4096, seg_size,
                                  seg_size - 64, UINT64_MAX, v ^ (1ull << 40) };
        for (size_t i = 0; i < sizeof(vals) / sizeof(vals[0]); i++)
            if (vals[i] != v)
                EXPECT(poke64(off, vals[i]), BT_ECORRUPT, "offset of region %s = %" PRIu64
                       " (was %" PRIu64 ")", region_name(r), vals[i], v);
    }

    /* buffers too short for the header, or for the segment */
    for (uint64_t n = 0; n < sizeof(struct bt_header); n += 8) {
        int rc = bt_seg_validate(orig, n);
        if (rc != BT_EBADMAGIC && rc != BT_ECORRUPT && rc != BT_EINVAL)
            T_FAIL("validate(%" PRIu64 " bytes) returned %d (%s)", n, rc, bt_errname(rc));
    }
    EXPECT(bt_seg_validate(orig, seg_size - 1), BT_ECORRUPT, "validate(size - 1)");
    EXPECT(bt_seg_validate(orig, seg_size - 4096), BT_ECORRUPT, "validate(size - 4096)");
    EXPECT(bt_seg_validate(orig, sizeof(struct bt_header)), BT_ECORRUPT, "validate(header only)");
    T_RC(bt_seg_validate(NULL, seg_size), BT_EINVAL);
    bt_seg *s = NULL;
    T_ERR(bt_seg_attach_at(orig, seg_size - 1, &s));
    T_ERR(bt_seg_attach_at(orig, 16, &s));

    bt_seg_close(seg);
    free(orig);
    free(copy);
}

/* Every word of the header's fixed part (up to the hot words, freeze and the
 * row cursor, which are run-time state, not layout) set to a few values:
 * validate must give 0 or a header error, and a header it accepts must be
 * usable without a crash (ASan watches the copy's bounds). */
static void smoke(bt_seg *s)
{
    bt_client *cl = NULL;
    int32_t ids[4];
    int64_t slots[8];
    uint32_t row;
    bt_check_report rep;
    bt_slot_params sp = { 0 };
    if (bt_client_open(s, &cl))
        return;
    bt_blocks_alloc(cl, 0, 2, ids);
    if (bt_row_claim(cl, 1, -1, BT_ROW_MANAGED, &row) == 0) {
        bt_row_alloc_append(cl, row, 0, 2, NULL);
        bt_slots_row(s, &sp, row, 0, 8, slots);
        bt_row_release(cl, row);
    }
    bt_client_close(cl);
    bt_seg_check(s, 0, 0, &rep);
}

static void test_validate_fuzz(void)
{
    bt_seg_info info;
    bt_seg *seg = setup_copies(&info);
    int counts[4] = { 0 };
    for (size_t off = 0; off < offsetof(struct bt_header, freeze); off += 4) {
        uint32_t v = get32(off);
        const uint32_t vals[] = { 0, ~v, v ^ 1, v ^ 0x80000000u, v + 64, 0xffffffffu };
        for (size_t i = 0; i < sizeof(vals) / sizeof(vals[0]); i++) {
            memcpy(copy, orig, seg_size);
            memcpy(copy + off, &vals[i], 4);
            int rc = bt_seg_validate(copy, seg_size);
            if (rc == BT_EBADMAGIC) counts[1]++;
            else if (rc == BT_EVERSION) counts[2]++;
            else if (rc == BT_ECORRUPT) counts[3]++;
            else if (rc == 0) {
                counts[0]++;
                bt_seg *s = NULL;
                T_OK(bt_seg_attach_at(copy, seg_size, &s));
                smoke(s);
                bt_seg_close(s);
            } else
                T_FAIL("header word at %zu = %#x: validate returned %d (%s)", off, vals[i], rc,
                       bt_errname(rc));
        }
    }
    printf("header fuzz: %d accepted, %d BT_EBADMAGIC, %d BT_EVERSION, %d BT_ECORRUPT\n",
           counts[0], counts[1], counts[2], counts[3]);
    free(orig);
    free(copy);
    bt_seg_close(seg);
}

static void test_errors(void)
{
    for (int e = BT_ERR_FIRST; e >= BT_ERR_LAST; e--) {
        const char *n = bt_errname(e), *m = bt_strerror(e);
        T_ASSERT(n && m);
        T_ASSERTF(!strncmp(n, "BT_E", 4), "code %d name %s", e, n);
        T_ASSERTF(!strncmp(m, n, strlen(n)) && m[strlen(n)] == ':', "code %d: \"%s\"", e, m);
    }
    T_ASSERT(!strcmp(bt_errname(BT_ENOBLOCKS), "BT_ENOBLOCKS"));
    T_ASSERT(!strcmp(bt_errname(-ENOENT), "ENOENT"));
    T_ASSERT(bt_strerror(-ENOENT) != NULL && strlen(bt_strerror(-ENOENT)) > 0);
    T_ASSERT(bt_errname(0) != NULL);
    T_ASSERT(bt_strerror(BT_ERR_LAST - 1) != NULL);
    T_ASSERT(bt_errname(12345) != NULL);
}

int main(int argc, char **argv)
{
    t_init(argc, argv);
    T_RUN(test_errors);
    T_RUN(test_config);
    T_RUN(test_embedded);
    T_RUN(test_create_at);
    T_RUN(test_named);
    T_RUN(test_named_garbage);
    T_RUN(test_bad_names);
    T_RUN(test_validate_fields);
    T_RUN(test_validate_fuzz);
    return t_done();
}
