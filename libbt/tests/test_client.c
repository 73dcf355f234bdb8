/*
 * test_client.c -- client slots: open / close, the slot limit, reserve and
 * adopt (what the daemon does), and handles across fork.
 */
#include "bt_test.h"

static void test_open_close(void)
{
    bt_config c = t_config_small();
    bt_seg *seg = t_seg_embedded(&c);
    bt_client *cl[5] = { 0 };
    bt_client_slot_info si;
    uint32_t seen = 0;

    for (int i = 0; i < 4; i++) {
        T_OK(bt_client_open(seg, &cl[i]));
        uint32_t id = bt_client_id(cl[i]);
        T_ASSERT(id >= 1 && id <= 4);
        T_ASSERT(!(seen & (1u << id)));
        seen |= 1u << id;
        T_OK(bt_client_slot_get(seg, id, &si));
        T_EQ(si.state, BT_CLIENT_ACTIVE);
        T_EQ(si.pid, getpid());
        T_EQ(si.hand_count, 0);
        T_EQ(si.rows, 0);
    }
    T_RC(bt_client_open(seg, &cl[4]), BT_ENOCLIENTS);
    uint32_t id1 = bt_client_id(cl[1]);
    bt_client_close(cl[1]);
    T_OK(bt_client_slot_get(seg, id1, &si));
    T_EQ(si.state, BT_CLIENT_FREE);
    T_OK(bt_client_open(seg, &cl[1]));
    T_EQ(bt_client_id(cl[1]), id1);

    /* slot_get bounds and the counters it reports */
    T_RC(bt_client_slot_get(seg, 0, &si), BT_ERANGE);
    T_RC(bt_client_slot_get(seg, 5, &si), BT_ERANGE);
    T_RC(bt_client_slot_get(seg, 1, NULL), BT_EINVAL);
    int32_t ids[3];
    uint32_t row;
    T_OK(bt_blocks_alloc(cl[0], 0, 3, ids));
    T_OK(bt_row_claim(cl[0], 5, -1, BT_ROW_MANAGED, &row));
    T_OK(bt_client_slot_get(seg, bt_client_id(cl[0]), &si));
    T_EQ(si.hand_count, 3);
    T_EQ(si.rows, 1);
    T_EQ(si.in_op, 0);
    T_ASSERT(si.ops >= 1);
    T_EQ(bt_client_id(NULL), 0);
    T_RC(bt_client_open(NULL, &cl[4]), BT_EINVAL);
    T_RC(bt_client_open(seg, NULL), BT_EINVAL);

    for (int i = 0; i < 4; i++)
        bt_client_close(cl[i]);
    bt_client_close(NULL);
    for (uint32_t id = 1; id <= 4; id++) {
        T_OK(bt_client_slot_get(seg, id, &si));
        T_EQ(si.state, BT_CLIENT_FREE);
    }
    T_EQ(t_row(seg, row, NULL, 0).owner, 0);
    t_check_quiet(seg);
    bt_seg_close(seg);
}

static void test_reserve_adopt(void)
{
    bt_config c = t_config_small();
    bt_seg *seg = t_seg_shared(&c);
    uint32_t slot, other;
    bt_client *cl = NULL;
    bt_client_slot_info si;

    T_RC(bt_client_reserve(seg, 0, 0, &slot), BT_EINVAL);
    T_RC(bt_client_reserve(seg, -5, 0, &slot), BT_EINVAL);
    T_OK(bt_client_reserve(seg, getpid(), 0, &slot));
    T_ASSERT(slot >= 1 && slot <= 4);
    T_OK(bt_client_slot_get(seg, slot, &si));
    T_EQ(si.pid, getpid());
    T_ASSERT(si.state != BT_CLIENT_FREE && si.state != BT_CLIENT_ACTIVE);
    /* a reserved slot is not handed to open */
    bt_client *o[4];
    int n = 0;
    while (n < 4 && bt_client_open(seg, &o[n]) == 0) {
        T_ASSERT(bt_client_id(o[n]) != slot);
        n++;
    }
    T_EQ(n, 3);
    for (int i = 0; i < n; i++)
        bt_client_close(o[i]);

    T_RC(bt_client_adopt(seg, 0, &cl), BT_ERANGE);
    T_RC(bt_client_adopt(seg, 5, &cl), BT_ERANGE);
    T_OK(bt_client_adopt(seg, slot, &cl));
    T_EQ(bt_client_id(cl), slot);
    T_OK(bt_client_slot_get(seg, slot, &si));
    T_EQ(si.state, BT_CLIENT_ACTIVE);
    /* adopting twice fails */
    bt_client *cl2 = NULL;
    int32_t held[3];
    uint32_t row;
    T_OK(bt_row_claim(cl, 7, -1, BT_ROW_MANAGED, &row));
    T_OK(bt_row_alloc_append(cl, row, 0, 3, held));
    T_RC(bt_client_adopt(seg, slot, &cl2), BT_ECLIENT);
    /* ... and leaves the live handle's slot, row and blocks alone (it used
     * to close the new handle, which took the active slot for its own) */
    T_OK(bt_client_slot_get(seg, slot, &si));
    T_EQ(si.state, BT_CLIENT_ACTIVE);
    T_EQ(si.rows, 1u);
    T_EQ(t_free(seg, 0), 60);
    bt_row_info ri;
    T_OK(bt_row_read(seg, row, NULL, 0, &ri));
    T_EQ(ri.owner, slot);
    T_EQ(ri.num_blocks, 3u);
    T_RC(bt_client_unreserve(seg, slot, getpid()), BT_ECLIENT);   /* adopted: stays */
    T_OK(bt_client_slot_get(seg, slot, &si));
    T_EQ(si.state, BT_CLIENT_ACTIVE);
    bt_client_close(cl);
    T_EQ(t_free(seg, 0), 63);
    /* a reservation nobody adopts can be undone, once, by its pid only */
    T_OK(bt_client_reserve(seg, getpid(), 0, &slot));
    T_RC(bt_client_unreserve(seg, slot, getpid() + 1), BT_ECLIENT);
    T_RC(bt_client_unreserve(seg, 0, getpid()), BT_ERANGE);
    T_OK(bt_client_unreserve(seg, slot, getpid()));
    T_OK(bt_client_slot_get(seg, slot, &si));
    T_EQ(si.state, BT_CLIENT_FREE);
    T_RC(bt_client_adopt(seg, slot, &cl2), BT_ECLIENT);

    /* a slot reserved for another pid cannot be adopted here, but can by it */
    int go[2];
    T_ASSERT(pipe(go) == 0);
    pid_t pid = fork();
    T_ASSERT(pid >= 0);
    if (pid == 0) {
        char ch;
        close(go[1]);
        T_EQ(read(go[0], &ch, 1), 1);  /* the parent has reserved our slot */
        uint32_t s;
        bt_client *ccl;
        for (s = 1; s <= 4; s++) {
            bt_client_slot_info csi;
            T_OK(bt_client_slot_get(seg, s, &csi));
            if (csi.pid == getpid())
                break;
        }
        T_ASSERT(s <= 4);
        T_OK(bt_client_adopt(seg, s, &ccl));
        int32_t ids[2];
        T_OK(bt_blocks_alloc(ccl, 0, 2, ids));
        bt_client_close(ccl);
        _exit(0);
    }
    close(go[0]);
    T_OK(bt_client_reserve(seg, pid, 0, &other));
    T_RC(bt_client_adopt(seg, other, &cl), BT_ECLIENT);
    T_EQ(write(go[1], "g", 1), 1);
    close(go[1]);
    t_wait_ok(pid, "adopting child");
    T_OK(bt_client_slot_get(seg, other, &si));
    T_EQ(si.state, BT_CLIENT_FREE);
    T_EQ(t_free(seg, 0), 63);
    t_check_quiet(seg);
    t_seg_shared_close(seg);
}

/* A forked child holds copies of its parent's handles: using them is
 * BT_ECLIENT, closing them touches nothing shared. */
static void test_fork_handles(void)
{
    bt_config c = t_config_small();
    bt_seg *seg = t_seg_shared(&c);
    bt_client *cl = t_client(seg);
    int32_t ids[3];
    uint32_t row;
    T_OK(bt_blocks_alloc(cl, 0, 3, ids));
    T_OK(bt_row_claim(cl, 77, -1, BT_ROW_MANAGED, &row));
    T_OK(bt_row_append(cl, row, ids, 2));

    pid_t pid = fork();
    T_ASSERT(pid >= 0);
    if (pid == 0) {
        int32_t x;
        T_RC(bt_blocks_alloc(cl, 0, 1, &x), BT_ECLIENT);
        T_RC(bt_blocks_release(cl, &ids[2], 1), BT_ECLIENT);
        T_RC(bt_row_release(cl, row), BT_ECLIENT);
        T_RC(bt_row_truncate(cl, row, 0), BT_ECLIENT);
        /* the child's own client works */
        bt_client *mine = t_client(seg);
        T_OK(bt_blocks_alloc(mine, 0, 1, &x));
        bt_client_close(mine);
        /* a data-path write, like every other: refused from a copied handle
         * (bt_row_set_tokens skips bt_op_begin as of writing) */
        T_RC(bt_row_set_tokens(cl, row, 123), BT_ECLIENT);
        bt_client_close(cl);            /* frees the copy, touches nothing shared */
        _exit(0);
    }
    t_wait_ok(pid, "child with inherited handles");
    bt_client_slot_info si;
    T_OK(bt_client_slot_get(seg, bt_client_id(cl), &si));
    T_EQ(si.state, BT_CLIENT_ACTIVE);
    T_EQ(si.hand_count, 1);
    bt_row_info ri = t_row(seg, row, NULL, 0);
    T_EQ(ri.owner, bt_client_id(cl));
    T_EQ(ri.num_blocks, 2);
    T_EQ(ri.num_tokens, 0);
    T_EQ(t_free(seg, 0), 60);
    T_OK(bt_blocks_release(cl, &ids[2], 1));
    bt_client_close(cl);
    T_EQ(t_free(seg, 0), 63);
    t_check_quiet(seg);
    t_seg_shared_close(seg);
}

/* bt_proc_start_time: ours matches what a slot records; a zombie (exited,
 * not reaped) is -ESRCH, and its client is recovered without waiting for
 * the reap. */
static void test_proc_start_time(void)
{
    uint64_t me = 0, v = 0;
    T_OK(bt_proc_start_time(getpid(), &me));
    T_ASSERT(me != 0);
    T_RC(bt_proc_start_time(0, &v), BT_EINVAL);
    T_RC(bt_proc_start_time(-5, &v), BT_EINVAL);
    T_RC(bt_proc_start_time(getpid(), NULL), BT_EINVAL);

    bt_config c = t_config_small();
    bt_seg *seg = t_seg_shared(&c);
    bt_client *cl = t_client(seg);
    bt_client_slot_info si;
    T_OK(bt_client_slot_get(seg, bt_client_id(cl), &si));
    T_EQ(si.start_time, me);
    bt_seg_info info;
    T_OK(bt_seg_info_get(seg, &info));
    T_EQ(info.owner_start_time, me);
    bt_client_close(cl);

    int up[2], down[2];
    T_ASSERT(pipe(up) == 0 && pipe(down) == 0);
    pid_t pid = fork();
    T_ASSERT(pid >= 0);
    if (pid == 0) {
        close(up[0]);
        close(down[1]);                 /* else the read below never sees EOF */
        bt_client *ch = t_client(seg);
        int32_t ids[2];
        uint32_t row, id = bt_client_id(ch);
        T_OK(bt_row_claim(ch, 5, -1, BT_ROW_MANAGED, &row));
        T_OK(bt_row_alloc_append(ch, row, 0, 2, ids));
        T_ASSERT(write(up[1], &id, sizeof(id)) == sizeof(id));
        char x;
        T_ASSERT(read(down[0], &x, 1) == 0);   /* until the parent closes it */
        _exit(0);                       /* no close: the recoverer's job */
    }
    close(up[1]);
    close(down[0]);
    uint32_t id = 0;
    T_ASSERT(read(up[0], &id, sizeof(id)) == sizeof(id));
    uint64_t child = 0;
    T_OK(bt_proc_start_time(pid, &child));
    T_OK(bt_client_slot_get(seg, id, &si));
    T_EQ(si.start_time, child);
    T_RC(bt_seg_recover_client(seg, id, 1000, NULL), BT_EBUSY);   /* alive */
    close(down[1]);
    siginfo_t wi;
    memset(&wi, 0, sizeof(wi));
    T_ASSERT(waitid(P_PID, (id_t)pid, &wi, WEXITED | WNOWAIT) == 0);   /* a zombie now */
    T_RC(bt_proc_start_time(pid, &v), -ESRCH);
    T_OK(bt_seg_recover_client(seg, id, 1000, NULL));
    T_OK(bt_client_slot_get(seg, id, &si));
    T_EQ(si.state, BT_CLIENT_FREE);
    T_EQ(t_free(seg, 0), 63);
    t_wait_ok(pid, "zombie child");
    T_RC(bt_proc_start_time(pid, &v), -ESRCH);            /* reaped: gone */
    close(up[0]);
    t_check_quiet(seg);
    t_seg_shared_close(seg);
}

int main(int argc, char **argv)
{
    t_init(argc, argv);
    T_RUN(test_open_close);
    T_RUN(test_reserve_adopt);
    T_RUN(test_fork_handles);
    T_RUN(test_proc_start_time);
    return t_done();
}
