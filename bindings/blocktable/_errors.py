"""Layer 2a: one exception hierarchy for every libbt result code.

Every library code BT_E* gets a subclass of BtError, generated from the
constants in the compiled module (a code added to bt.h gets a class without
a change here). Where a builtin exception says the same thing, the class
inherits it too, so `except IndexError` works as Python users expect.
OS errors (-errno) become subclasses of both BtError and the builtin OSError
subclass for that errno (FileNotFoundError for -ENOENT, ...).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ._ffi import ffi, lib

__all__ = ["BtError", "BtOSError", "error_class", "make_error", "check", "CODES"]


class BtError(Exception):
    """Base of every error raised by blocktable.

    Attributes: ``code`` (the negative C result), ``name`` (its symbol,
    "BT_EROWFULL" or "ENOENT"), ``detail`` (what was wrong, with which value).
    A call that raised has changed nothing, unless its docstring says so.
    """

    code = 0
    detail = ""

    @property
    def name(self) -> str:
        return errname(self.code)


class BtOSError(BtError, OSError):
    """An operating-system error (-errno) from libbt; ``errno`` is set."""


# Friendly names and the builtin that says the same thing, per library code.
_NAMES = {
    "BT_EINVAL": ("InvalidArgument", ValueError),
    "BT_ERANGE": ("OutOfRange", IndexError),
    "BT_ENOBLOCKS": ("OutOfBlocks", MemoryError),
    "BT_EROWFULL": ("RowFull", ValueError),
    "BT_ENOROWS": ("OutOfRows", None),
    "BT_ENOCLIENTS": ("OutOfClients", None),
    "BT_EHANDFULL": ("HandFull", None),
    "BT_ENOTHELD": ("NotHeld", ValueError),
    "BT_ENOTOWNER": ("NotOwner", None),
    "BT_EROWSTATE": ("RowStateError", ValueError),
    "BT_EBADMAGIC": ("BadMagic", None),
    "BT_EVERSION": ("VersionMismatch", None),
    "BT_ECORRUPT": ("Corrupt", None),
    "BT_EBUSY": ("Busy", None),
    "BT_EFROZEN": ("Frozen", None),
    "BT_ENAME": ("BadName", ValueError),
    "BT_ECONFIG": ("ConfigError", ValueError),
    "BT_ECLIENT": ("ClientGone", None),
    "BT_ENOCHUNKS": ("OutOfChunks", MemoryError),
    "BT_ENOKEYS": ("OutOfKeys", MemoryError),
}

# code -> class, for library codes and the OS errors seen so far.
CODES: dict[int, type[BtError]] = {}


def _camel(symbol: str) -> str:
    return "".join(p.capitalize() for p in symbol[4:].split("_")) or symbol


def _library_classes() -> dict[str, type[BtError]]:
    out = {}
    for sym in sorted(dir(lib)):
        if not sym.startswith("BT_E") or sym in ("BT_ERR_FIRST", "BT_ERR_LAST"):
            continue
        code = getattr(lib, sym)
        name, builtin = _NAMES.get(sym, (_camel(sym), None))
        bases = (BtError, builtin) if builtin else (BtError,)
        doc = ffi.string(lib.bt_strerror(code)).decode()
        cls = type(name, bases, {"code": code, "__doc__": doc, "__module__": "blocktable"})
        CODES[code] = cls
        out[name] = cls
    missing = [c for c in range(lib.BT_ERR_LAST, lib.BT_ERR_FIRST + 1) if c not in CODES]
    assert not missing, f"library codes without a BT_E* constant: {missing}"
    return out


globals().update(_library_classes())
__all__ += [c.__name__ for c in CODES.values()]

if TYPE_CHECKING:
    # What a type checker sees of the classes made above from bt.h's codes and _NAMES
    # (tests/test_typing.py checks that the two lists agree).
    class InvalidArgument(BtError, ValueError): ...
    class OutOfRange(BtError, IndexError): ...
    class OutOfBlocks(BtError, MemoryError): ...
    class RowFull(BtError, ValueError): ...
    class OutOfRows(BtError): ...
    class OutOfClients(BtError): ...
    class HandFull(BtError): ...
    class NotHeld(BtError, ValueError): ...
    class NotOwner(BtError): ...
    class RowStateError(BtError, ValueError): ...
    class BadMagic(BtError): ...
    class VersionMismatch(BtError): ...
    class Corrupt(BtError): ...
    class Busy(BtError): ...
    class Frozen(BtError): ...
    class BadName(BtError, ValueError): ...
    class ConfigError(BtError, ValueError): ...
    class ClientGone(BtError): ...
    class OutOfChunks(BtError, MemoryError): ...
    class OutOfKeys(BtError, MemoryError): ...

    __all__ += ["InvalidArgument", "OutOfRange", "OutOfBlocks", "RowFull", "OutOfRows",
                "OutOfClients", "HandFull", "NotHeld", "NotOwner", "RowStateError",
                "BadMagic", "VersionMismatch", "Corrupt", "Busy", "Frozen", "BadName",
                "ConfigError", "ClientGone", "OutOfChunks", "OutOfKeys"]


def errname(code: int) -> str:
    return ffi.string(lib.bt_errname(code)).decode()


def _os_class(err: int) -> type[BtError]:
    """BtError + the builtin OSError subclass Python uses for this errno."""
    cls = CODES.get(-err)
    if cls is None:
        builtin = type(OSError(err, "")) if err else OSError
        if builtin is OSError:
            cls = BtOSError
        else:
            cls = type("Bt" + builtin.__name__, (BtOSError, builtin),
                       {"__module__": "blocktable"})
        CODES[-err] = cls
    return cls


def error_class(code: int) -> type[BtError]:
    """The exception class for result `code` (< 0)."""
    cls = CODES.get(code)
    if cls is None:
        cls = _os_class(-code) if code > -4096 else BtError
    return cls


def make_error(code: int, detail: str = "", filename: str | None = None) -> BtError:
    """An exception instance for `code`: bt_strerror's text, then `detail`."""
    cls = error_class(code)
    msg = ffi.string(lib.bt_strerror(code)).decode()
    if detail:
        msg = f"{msg} ({detail})"
    if issubclass(cls, OSError):
        exc = cls(-code, msg, filename) if filename else cls(-code, msg)
    else:
        exc = cls(msg)  # type: ignore[assignment]  # (mypy narrowed cls to the OSError branch's)
    exc.code = code
    exc.detail = detail
    return exc


def check(rc: int, detail: str = "") -> int:
    """Raise for a negative result; return rc otherwise (the cold path helper:
    hot methods test `if rc:` inline and only then build a message)."""
    if rc < 0:
        raise make_error(rc, detail)
    return rc

