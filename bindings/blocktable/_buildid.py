"""Helpers shared by the build script and the import-time check: where the
cdef comes from, and the build id (package version + hash of the sources).
No cffi import here, so the package can use it at run time."""
import glob
import hashlib
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
_CDEF_RE = re.compile(r"/\* BT_CDEF_BEGIN \*/(.*?)/\* BT_CDEF_END \*/", re.S)


def header_path(root=ROOT):
    return os.path.join(root, "libbt", "include", "bt.h")


def read_cdef(header_text):
    """The text between the markers; refuse a header without them."""
    m = _CDEF_RE.search(header_text)
    if not m:
        raise RuntimeError("bt.h: BT_CDEF_BEGIN/BT_CDEF_END markers not found")
    # CFFI's cdef takes `#define NAME <integer>` but not `(-31000)`: drop the
    # parentheses, the value is the same.
    return re.sub(r"^(\s*#\s*define\s+\w+\s+)\((-?\d+)\)", r"\1\2", m.group(1), flags=re.M)


def c_sources(root=ROOT):
    return sorted(glob.glob(os.path.join(root, "libbt", "src", "*.c")))


def source_files(root=ROOT):
    """Every file whose content goes into the extension, in a stable order."""
    headers = sorted(glob.glob(os.path.join(root, "libbt", "src", "*.h")))
    here = os.path.join(root, "bindings", "blocktable")
    # _version.py is not hashed: the version is a part of the id of its own.
    return [header_path(root), *headers, *c_sources(root), os.path.join(here, "_build.py")]


def version(root=ROOT):
    ns = {}
    with open(os.path.join(root, "bindings", "blocktable", "_version.py")) as f:
        exec(f.read(), ns)
    return ns["__version__"]


def build_id(root=ROOT):
    """'<version>+<16 hex of sha256 over the sources' names and bytes>'."""
    h = hashlib.sha256()
    for path in source_files(root):
        h.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
    return f"{version(root)}+{h.hexdigest()[:16]}"


def in_source_tree(root=ROOT):
    return os.path.exists(header_path(root))
