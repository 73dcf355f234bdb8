"""The package is typed (PEP 561, py.typed): every public callable reachable from
blocktable.__all__ and blocktable.compat.vllm.__all__ (the public classes' methods
and properties included), and every public function of the daemon's plain-function
modules, has annotations for each parameter and its return, the names in them
resolve, and mypy passes on the package (the [tool.mypy] section of pyproject.toml)
and on a typed user program, tests/typing_sample.py, written the way README.md uses
the package."""
import ast
import inspect
import os
import subprocess
import sys
import typing

import pytest

import blocktable as bt
from blocktable import _errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "tests", "typing_sample.py")


def public_objects():
    """(name, object) of blocktable.__all__, and of blocktable.compat.vllm.__all__ (the
    vLLM drop-in: MultiGroupBlockTable[i] hands out its BlockTable)."""
    import blocktable.compat.vllm as compat
    return [(n, getattr(bt, n)) for n in bt.__all__] + \
        [(f"compat.vllm.{n}", getattr(compat, n)) for n in compat.__all__]


def public_callables():
    """(qualified name, function) of every public function of public_objects() and
    every public method, classmethod, staticmethod and property (its getter) of its
    classes, inherited ones included, as long as blocktable defines them (not
    Exception's or Enum's own). __init__ counts: it is the constructor's signature."""
    out, seen = [], set()
    for name, obj in public_objects():
        if inspect.isfunction(obj):
            out.append((name, obj))
        if not inspect.isclass(obj):
            continue
        for klass in obj.__mro__:
            if not (klass.__module__ or "").startswith("blocktable"):
                continue
            for attr, raw in vars(klass).items():
                if (attr.startswith("_") and attr != "__init__") or (name, attr) in seen:
                    continue
                seen.add((name, attr))
                if isinstance(raw, property):
                    out.append((f"{name}.{attr}", raw.fget))
                elif isinstance(raw, (staticmethod, classmethod)):
                    out.append((f"{name}.{attr}", raw.__func__))
                elif inspect.isfunction(raw):
                    out.append((f"{name}.{attr}", raw))
    return out


def namespace(fn):
    """Where an annotation's names are looked up: the function's module, then
    blocktable's and blocktable.gpu's public names (a class named only under
    TYPE_CHECKING, to break an import cycle (cache.Client) or to import no GPU code
    (compat.vllm's MirrorExporter)), and torch (imported only for type checking in
    the GPU and vLLM signatures)."""
    import blocktable.gpu as gpu
    ns = {n: getattr(gpu, n) for n in gpu.__all__}
    ns.update(vars(bt))
    try:
        import torch
        ns["torch"] = torch
    except ImportError:       # pragma: no cover - torch is in the test extra
        pass
    ns.update(fn.__globals__)
    return ns


def missing_annotations(fn):
    """The parameters (and 'return') without an annotation; get_type_hints must
    resolve every name."""
    hints = typing.get_type_hints(fn, localns=namespace(fn))
    params = list(inspect.signature(fn).parameters.values())
    if params and params[0].name in ("self", "cls"):
        params = params[1:]
    return [p.name for p in params if p.name not in hints] + \
        ([] if "return" in hints else ["return"])


def test_every_public_callable_is_annotated():
    found = public_callables()
    # The census itself: if the walk above broke, it would find nothing to check.
    assert len(found) > 250, len(found)
    names = {n for n, _ in found}
    assert {"Segment.create", "Client.alloc", "StepPlan.run", "CachePool.alloc", "connect",
            "BlockTable.compute_slot_mapping", "CpuGpuBuffer.copy_to_gpu",
            "BtError.name", "make_error", "compat.vllm.BlockTable.commit_block_table"} <= names
    bad = {}
    for name, fn in found:
        try:
            miss = missing_annotations(fn)
        except Exception as e:     # an annotation whose names do not resolve
            miss = [f"get_type_hints: {type(e).__name__}: {e}"]
        if miss:
            bad[name] = miss
    assert not bad, f"{len(bad)} of {len(found)} public callables lack annotations: {bad}"


DAEMON_TYPED = ("procfs", "protocol", "sdnotify", "clib", "config", "orphans", "ctl", "logs",
                "testing")


@pytest.mark.parametrize("modname", DAEMON_TYPED)
def test_daemon_public_functions_are_annotated(modname):
    """The daemon's modules of plain functions (what bt-ctl, tests and tools call;
    [tool.mypy] files checks them): every public function, and every public method of
    their classes, annotated."""
    import importlib
    mod = importlib.import_module(f"blocktable_daemon.{modname}")
    found = []
    for name, obj in vars(mod).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
            continue
        if inspect.isfunction(obj):
            found.append((name, obj))
        elif inspect.isclass(obj):
            found += [(f"{name}.{a}", f) for a, f in vars(obj).items()
                      if inspect.isfunction(f) and (not a.startswith("_") or a == "__init__")]
    assert found
    bad = {n: m for n, f in found if (m := missing_annotations(f))}
    assert not bad, bad


def test_generated_client_methods_are_annotated():
    """release_row, truncate, set_block, ... are made by _lib.int_method, append /
    append_shared / set_row by _ids_method: their annotations are set there, and
    Client declares the same signatures for type checkers under TYPE_CHECKING."""
    hints = typing.get_type_hints(bt.Client.set_block)
    assert hints == {"row": int, "index": int, "block_id": int, "return": type(None)}
    hints = typing.get_type_hints(bt.Client.append, localns=namespace(bt.Client.append))
    assert set(hints) == {"self", "row", "ids", "return"}
    from blocktable import _core
    tree = ast.parse(inspect.getsource(_core.Client))
    stubs = {}
    for node in tree.body[0].body:
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            for f in node.body:
                if isinstance(f, ast.FunctionDef):
                    args = f.args.args[1:]
                    defaults = [None] * (len(args) - len(f.args.defaults)) + \
                        [ast.literal_eval(d) for d in f.args.defaults]
                    stubs[f.name] = [(a.arg, d) for a, d in zip(args, defaults)]
    assert len(stubs) == 10, stubs
    for name, params in stubs.items():
        sig = inspect.signature(getattr(bt.Client, name))
        real = [(p.name, None if p.default is p.empty else p.default)
                for p in list(sig.parameters.values())[1:]]
        assert real == params, name


def test_error_classes_seen_by_type_checkers_are_the_real_ones():
    """_errors declares the generated classes (one per BT_E* code) under
    TYPE_CHECKING; the declaration must name the same classes with the same bases."""
    tree = ast.parse(inspect.getsource(_errors))
    declared = {}
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            for c in node.body:
                if isinstance(c, ast.ClassDef):
                    declared[c.name] = [ast.unparse(b) for b in c.bases]
    real = {cls.__name__: [b.__name__ for b in cls.__bases__]
            for code, cls in _errors.CODES.items()
            if _errors.BtError in cls.__bases__ and code <= _errors.lib.BT_ERR_FIRST}
    assert declared == real


def test_segment_config_seen_by_type_checkers_has_bt_configs_fields():
    """SegmentConfig is made from bt_config at import; _types spells its fields out
    under TYPE_CHECKING: the same names, in the same order."""
    import dataclasses
    from blocktable import _types
    tree = ast.parse(inspect.getsource(_types))
    declared = None
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "SegmentConfig":
            declared = [a.target.id for a in node.body if isinstance(a, ast.AnnAssign)]
    assert declared == [f.name for f in dataclasses.fields(bt.SegmentConfig)]


def test_annotations_import_nothing():
    """`from __future__ import annotations`: importing blocktable does not import
    torch or cupy (the GPU and vLLM signatures name them only for type checkers)."""
    code = "import sys, blocktable; print('torch' in sys.modules, 'cupy' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"]


def mypy(*args, cache):
    pytest.importorskip("mypy", reason="mypy is in the test extra: pip install -e '.[test]'")
    r = subprocess.run([sys.executable, "-m", "mypy", "--config-file",
                        os.path.join(ROOT, "pyproject.toml"), "--cache-dir", str(cache),
                        "--no-color-output", "--no-error-summary", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=180)
    return r.returncode, r.stdout + r.stderr


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("mypy_cache")


def test_mypy_passes_on_the_package(mypy_cache):
    rc, out = mypy(cache=mypy_cache)          # files: [tool.mypy] files
    assert rc == 0, out


def test_mypy_passes_on_a_typed_user_program(mypy_cache):
    rc, out = mypy(SAMPLE, cache=mypy_cache)
    assert rc == 0, out


def test_mypy_catches_misuse(mypy_cache, tmp_path):
    """The annotations are enforced, not Any: wrong arguments and a misspelt name
    are errors, and returns have their real types."""
    prog = tmp_path / "misuse.py"
    prog.write_text(
        "import numpy as np\n"
        "from numpy.typing import NDArray\n"
        "import blocktable as bt\n"
        "seg = bt.Segment.create(None)\n"
        "cl = seg.client()\n"
        "cl.alloc('3')\n"                                  # line 6
        "seg.slots_row(0, 0, n=None)\n"                    # line 7
        "bt.Segmnet\n"                                     # line 8
        "x: NDArray[np.int64] = cl.alloc(1)\n"             # line 9: int32, not int64
        "r: tuple[object, object] = cl.step([0], [1])\n"  # line 10: no arrivals: one array
        "bt.connect(create={'block_size': '16'})\n"       # line 11
        "bt.SegmentConfig(num_row=8)\n"                    # line 12: misspelt field
        "cl.truncate(0, keep='1')\n"                       # line 13: a made method
        "try:\n"
        "    pass\n"
        "except bt.NotHeld as e:\n"
        "    e.code + ''\n")                               # line 17: code is an int
    rc, out = mypy(str(prog), cache=mypy_cache)
    assert rc == 1, out
    lines = {int(ln.split(":")[1]) for ln in out.splitlines() if ": error:" in ln}
    assert lines == {6, 7, 8, 9, 10, 11, 12, 13, 17}, out


def test_the_typed_user_program_runs():
    """The sample is real code: it runs (embedded segments, no daemon)."""
    r = subprocess.run([sys.executable, SAMPLE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
