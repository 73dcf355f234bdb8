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
_SHIM_SOURCE = ""


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
