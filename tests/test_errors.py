"""The exception hierarchy: one class per libbt code, the builtin it is
natural to catch, OS errors as OSError subclasses, messages with the value."""
import errno

import pytest

import blocktable as bt
from blocktable import lib


def test_every_library_code_has_its_own_class():
    codes = range(lib.BT_ERR_LAST, lib.BT_ERR_FIRST + 1)
    classes = {bt.error_class(c) for c in codes}
    assert len(classes) == len(codes)
    for c in codes:
        cls = bt.error_class(c)
        assert issubclass(cls, bt.BtError) and cls.code == c
        assert getattr(bt, cls.__name__) is cls


@pytest.mark.parametrize("code,builtin", [
    (lib.BT_EINVAL, ValueError), (lib.BT_ERANGE, IndexError),
    (lib.BT_ENOBLOCKS, MemoryError), (lib.BT_EROWFULL, ValueError),
    (lib.BT_ENOTHELD, ValueError), (lib.BT_ECONFIG, ValueError), (lib.BT_ENAME, ValueError),
])
def test_dual_inheritance(code, builtin):
    assert issubclass(bt.error_class(code), builtin)


def test_named_classes():
    assert bt.error_class(lib.BT_EROWFULL) is bt.RowFull
    assert bt.error_class(lib.BT_ENOBLOCKS) is bt.OutOfBlocks
    assert bt.error_class(lib.BT_ERANGE) is bt.OutOfRange
    assert bt.error_class(lib.BT_EINVAL) is bt.InvalidArgument


@pytest.mark.parametrize("err,builtin", [
    (errno.ENOENT, FileNotFoundError), (errno.EEXIST, FileExistsError),
    (errno.EACCES, PermissionError), (errno.ENOMEM, OSError),
])
def test_os_errors_are_oserror_subclasses(err, builtin):
    e = bt.errors.make_error(-err, "segment 'x'", filename="x")
    assert isinstance(e, builtin) and isinstance(e, bt.BtError)
    assert e.errno == err and e.code == -err and e.filename == "x"
    assert e.name == errno.errorcode[err]


def test_message_names_the_code_and_the_value(client):
    with pytest.raises(bt.RowFull) as info:
        row = client.claim_row()
        client.alloc_append(row, 17)
    e = info.value
    assert e.code == lib.BT_EROWFULL and e.name == "BT_EROWFULL"
    assert str(e).startswith("BT_EROWFULL") and "n=17" in str(e)


def test_cffi_overflow_becomes_out_of_range(client):
    """A negative count or row is refused as OutOfRange, not cffi's OverflowError."""
    with pytest.raises(bt.OutOfRange):
        client.alloc(-1)
    with pytest.raises(bt.OutOfRange):
        client.release_row(-1)


def test_import_refuses_a_mismatching_build(monkeypatch):
    from blocktable import _ffi
    monkeypatch.setattr(_ffi, "BUILD_ID", "0.0.0+deadbeef")
    with pytest.raises(ImportError, match="built for 0.0.0"):
        _ffi._verify_build()
    monkeypatch.setattr(_ffi, "BUILD_ID", f"{bt.__version__}+deadbeef")
    monkeypatch.delenv("BLOCKTABLE_SKIP_BUILD_CHECK", raising=False)
    if bt._buildid.in_source_tree():
        with pytest.raises(ImportError, match="other sources"):
            _ffi._verify_build()
