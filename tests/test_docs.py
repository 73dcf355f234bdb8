"""The API reference: every public name of blocktable has a docstring, and
`make docs` (docs/make_api.py, pdoc) writes a page per public module."""
import inspect
import os
import subprocess
import sys

import pytest

import blocktable as bt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Public data names (constants, the CFFI objects) that have no docstring for pdoc yet. Only
# shrinks: a new public name must come documented. (Variables are documented by a string
# literal right after their assignment, in the module that assigns them: for the
# names of blocktable itself, blocktable/__init__.py.)
KNOWN_UNDOCUMENTED: set[str] = set()   # __version__, BUILD_ID, ffi, lib, CODES, ROW_*: documented
                                       # where blocktable/__init__.py binds them


def own_doc(obj):
    if inspect.isclass(obj):
        return obj.__dict__.get("__doc__") or ""
    return getattr(obj, "__doc__", None) or ""


def assigned_doc(name):
    """The string literal right after `name = ...` in blocktable/__init__.py (how a
    constant is documented; the CFFI `lib` is a module object whose __doc__ cannot be set,
    and pdoc shows no module member, so this is where its documentation is read)."""
    import ast
    tree = ast.parse(inspect.getsource(bt))
    body = tree.body
    for a, b in zip(body, body[1:]):
        target = a.target if isinstance(a, ast.AnnAssign) else \
            (a.targets[0] if isinstance(a, ast.Assign) and len(a.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id == name and isinstance(b, ast.Expr) \
                and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str):
            return b.value.value
    return ""


def is_code(obj):
    return inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj)


@pytest.mark.parametrize("name", [n for n in bt.__all__ if n not in KNOWN_UNDOCUMENTED])
def test_public_name_has_a_docstring(name):
    obj = getattr(bt, name)
    if is_code(obj):
        assert (own_doc(obj) or assigned_doc(name)).strip(), \
            f"blocktable.{name} has no docstring of its own"
    else:
        pdoc_doc = pytest.importorskip("pdoc.doc")
        d = pdoc_doc.Module(bt).get(name)
        assert d is not None and d.docstring.strip(), f"blocktable.{name} has no docstring"


def test_known_undocumented_are_still_public():
    """The exemption list names only public names (a renamed one leaves no stale entry)."""
    assert KNOWN_UNDOCUMENTED <= set(bt.__all__)


def test_make_docs_writes_the_reference(tmp_path):
    pytest.importorskip("pdoc")
    out = tmp_path / "api"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "docs", "make_api.py"), str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    page = (out / "blocktable.html").read_text()
    assert "Segment" in page and "CachePool" in page
    for mod in ("blocktable/cache.html", "blocktable/connect.html",
                "blocktable_daemon/ctl.html", "blocktable_daemon/orphans.html"):
        assert (out / mod).is_file(), mod
    assert "Warn" not in r.stderr, r.stderr


def test_changelog_keeps_a_changelog():
    """CHANGELOG.md: Keep a Changelog's shape, an Unreleased section first, only its
    kinds of subsections."""
    import re
    with open(os.path.join(ROOT, "CHANGELOG.md")) as f:
        text = f.read()
    versions = re.findall(r"^## \[([^\]]+)\]", text, re.M)
    assert versions and versions[0] == "Unreleased"
    kinds = set(re.findall(r"^### (\w+)", text, re.M))
    assert kinds and kinds <= {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}
    unreleased = text.split("## [Unreleased]", 1)[1]
    for word in ("blocktable_daemon", "bt-ctl orphans", "make install", "vLLM plugin"):
        assert word in unreleased, word
