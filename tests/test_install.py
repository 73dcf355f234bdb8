"""C users: `make install` (PREFIX, DESTDIR) puts bt.h, libbt.so.* (with a SONAME) and
libbt.a, and libbt.pc where a C program finds them with pkg-config; such a program runs
without LD_LIBRARY_PATH. And `make fuzz-deps` / libbt/fuzz/run.sh never install clang
silently."""
import os
import shutil
import subprocess

import pytest

import blocktable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = ("make", "cc", "pkg-config", "readelf")
pytestmark = pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                                reason=f"needs {', '.join(TOOLS)}")

PROGRAM = r"""
#include <stdio.h>
#include <bt.h>

int main(void)
{
    bt_config cfg;
    bt_seg *seg;
    bt_config_default(&cfg);
    cfg.blocks_per_pool = 64;
    cfg.num_rows = 4;
    cfg.row_width = 8;
    cfg.max_clients = 2;
    cfg.hand_size = 8;
    int rc = bt_seg_create(NULL, &cfg, 0, &seg);     /* embedded: nothing in /dev/shm */
    if (rc) {
        printf("create: %s\n", bt_errname(rc));
        return 1;
    }
    printf("libbt %d.%d.%d ok\n", BT_VERSION_MAJOR, BT_VERSION_MINOR, BT_VERSION_PATCH);
    bt_seg_close(seg);
    return 0;
}
"""


def make(*args, env=None):
    r = subprocess.run(["make", "-s", "-C", ROOT, *args], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r


def header_version():
    v = {}
    with open(os.path.join(ROOT, "libbt", "include", "bt.h")) as f:
        for line in f:
            for k in ("MAJOR", "MINOR", "PATCH"):
                if line.startswith(f"#define BT_VERSION_{k} "):
                    v[k] = int(line.split()[2])
    return f"{v['MAJOR']}.{v['MINOR']}.{v['PATCH']}", v["MAJOR"]


def test_version_has_one_source():
    """The library's version (SONAME, libbt.pc) is bt.h's; the Python package says the same."""
    version, _ = header_version()
    assert blocktable.__version__ == version


def test_installed_library_links_and_runs_without_ld_library_path(tmp_path):
    version, major = header_version()
    prefix = tmp_path / "prefix"
    make("install", f"PREFIX={prefix}")
    lib = prefix / "lib"
    assert (prefix / "include" / "bt.h").is_file()
    assert os.path.realpath(lib / "libbt.so") == str(lib / f"libbt.so.{version}")
    assert os.readlink(lib / f"libbt.so.{major}") == f"libbt.so.{version}"
    assert (lib / "libbt.a").is_file()
    dyn = subprocess.run(["readelf", "-d", str(lib / f"libbt.so.{version}")],
                         capture_output=True, text=True, check=True).stdout
    assert f"Library soname: [libbt.so.{major}]" in dyn

    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    env["PKG_CONFIG_PATH"] = str(lib / "pkgconfig")
    pc = lambda *a: subprocess.run(["pkg-config", *a, "libbt"], env=env, capture_output=True,  # noqa: E731
                                   text=True, check=True).stdout.split()
    assert pc("--modversion") == [version]
    libdir = pc("--variable=libdir")[0]
    assert libdir == str(lib)
    src = tmp_path / "prog.c"
    src.write_text(PROGRAM)
    exe = tmp_path / "prog"
    # libbt.pc has no rpath (a system prefix needs none; ldconfig finds /usr/local/lib):
    # a program linked against a private prefix records where its library lies itself.
    subprocess.run(["cc", "-std=c11", "-o", str(exe), str(src), *pc("--cflags"), *pc("--libs"),
                    f"-Wl,-rpath,{libdir}"], env=env, check=True)
    needed = subprocess.run(["readelf", "-d", str(exe)], capture_output=True, text=True,
                            check=True).stdout
    assert f"Shared library: [libbt.so.{major}]" in needed          # the SONAME, not libbt.so
    r = subprocess.run([str(exe)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"libbt {version} ok", (r.stdout, r.stderr)

    make("uninstall", f"PREFIX={prefix}")
    assert not any(p.is_file() or p.is_symlink() for p in prefix.rglob("*"))


def test_destdir_stages_without_changing_the_prefix(tmp_path):
    version, major = header_version()
    stage = tmp_path / "stage"
    make("install", f"DESTDIR={stage}", "PREFIX=/usr")
    assert (stage / "usr/include/bt.h").is_file()
    assert (stage / f"usr/lib/libbt.so.{version}").is_file()
    pc = (stage / "usr/lib/pkgconfig/libbt.pc").read_text()
    assert "prefix=/usr\n" in pc and str(stage) not in pc and f"Version: {version}" in pc
    make("uninstall", f"DESTDIR={stage}", "PREFIX=/usr")
    assert not (stage / f"usr/lib/libbt.so.{version}").exists()


def test_fuzz_never_installs_clang_silently(tmp_path):
    """Without the compiler, run.sh says what to run (make fuzz-deps, apt-get install
    clang) and fails: it used to apt-get install clang behind the user's back."""
    env = dict(os.environ, CC_FUZZ=str(tmp_path / "no-such-clang"),
               FUZZ_BUILD=str(tmp_path / "fuzz"), FUZZ_SECONDS="1")
    r = subprocess.run(["sh", os.path.join(ROOT, "libbt/fuzz/run.sh")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "make fuzz-deps" in r.stdout + r.stderr and "apt-get install clang" in r.stdout + r.stderr
    r = subprocess.run(["make", "-s", "-C", ROOT, "fuzz-deps", "CC_FUZZ=cc"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "fuzz-deps: cc is " in r.stdout, r
    if os.geteuid() != 0:                   # as root it would run apt-get, visibly
        r = subprocess.run(["make", "-s", "-C", ROOT, "fuzz-deps",
                            f"CC_FUZZ={tmp_path}/no-such-clang"],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode != 0 and "apt-get install clang" in r.stderr, r
