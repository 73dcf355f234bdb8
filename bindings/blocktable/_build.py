"""CFFI build script for blocktable._bt (out-of-line API mode).

The cdef is the part of libbt/include/bt.h between BT_CDEF_BEGIN and
BT_CDEF_END, read at build time: declarations are never copied by hand, and
since set_source #includes the same header, the C compiler catches any drift
between what CFFI believes and what libbt declares.

The libbt sources are compiled straight into the extension (no libbt.so to
find at run time). The build id from _buildid.py is compiled in too;
blocktable/_ffi.py refuses an extension whose id differs from its sources.
"""
import importlib.util
import os

from cffi import FFI

# cffi exec()s this file by path, so the sibling is loaded by path as well.
_spec = importlib.util.spec_from_file_location(
    "_blocktable_buildid", os.path.join(os.path.dirname(os.path.abspath(__file__)), "_buildid.py"))
_bid = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bid)


_SHIM_CDEF = """
const char *blocktable_build_id(void);
"""
# CFFI releases the GIL around every call. For the data-path calls (a few
# hundred nanoseconds each) that hand-off is the largest cost in a process
# with other busy Python threads (vLLM's EngineCore: its output thread
# encodes the last step while the scheduler runs the next one): a scheduler
# that releases the GIL a dozen times a step waits for it a dozen times.
# So only the calls that may take long (create/attach/check/recover a
# segment, open/close a client or a cache pool, GPU-mirror staging, slot
# mapping of a whole batch, reading /proc for a start time) release it;
# every other call keeps it. Each
# wrapper CFFI generates below this text is named "_cffi_f_<function>", so
# the test folds at compile time.
_SHIM_SOURCE = r"""
#include <string.h>
static inline int bt__releases_gil(const char *w)
{
    return !strncmp(w, "_cffi_f_bt_seg_", 15) || !strncmp(w, "_cffi_f_bt_mirror_", 18) ||
           !strncmp(w, "_cffi_f_bt_slots_", 17) || !strncmp(w, "_cffi_f_bt_client_", 18) ||
           !strcmp(w, "_cffi_f_bt_cache_open") || !strcmp(w, "_cffi_f_bt_cache_close") ||
           !strcmp(w, "_cffi_f_bt_cache_queue") || !strncmp(w, "_cffi_f_bt_config_", 18) ||
           !strcmp(w, "_cffi_f_bt_proc_start_time");
}
#undef Py_BEGIN_ALLOW_THREADS
#undef Py_END_ALLOW_THREADS
#define Py_BEGIN_ALLOW_THREADS \
    { PyThreadState *_save = bt__releases_gil(__func__) ? PyEval_SaveThread() : NULL;
#define Py_END_ALLOW_THREADS if (_save) PyEval_RestoreThread(_save); }
"""


def make_ffibuilder():
    root = _bid.ROOT
    with open(_bid.header_path(root)) as f:
        cdef = _bid.read_cdef(f.read())
    ffi = FFI()
    ffi.cdef(cdef + _SHIM_CDEF)
    rel = lambda paths: [os.path.relpath(p, root) for p in paths]  # noqa: E731
    ffi.set_source(
        "blocktable._bt",
        '#include "bt.h"\n'
        f'const char *blocktable_build_id(void) {{ return "{_bid.build_id(root)}"; }}\n'
        + _SHIM_SOURCE,
        # setuptools wants paths relative to setup.py's folder (the root).
        sources=rel(_bid.c_sources(root)),
        include_dirs=[os.path.join("libbt", "include"), os.path.join("libbt", "src")],
        depends=rel(_bid.source_files(root)),
        extra_compile_args=["-std=c11", "-D_GNU_SOURCE", "-O2"],
        libraries=["rt", "pthread"],
    )
    return ffi


ffibuilder = make_ffibuilder()

if __name__ == "__main__":
    os.chdir(_bid.ROOT)
    ffibuilder.compile(tmpdir="build/cffi", verbose=True)
