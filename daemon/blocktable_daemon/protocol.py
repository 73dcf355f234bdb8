"""The control protocol: newline-delimited JSON over a Unix stream socket.

Request:  {"id": <any JSON scalar>, "cmd": "<name>", "args": {...}}
Reply:    {"id": ..., "status": "ok", "result": ...}
          {"id": ..., "status": "error", "error": {"code", "name", "message"}}

Codes: libbt's own (BT_E*, -31000..), -errno for the OS's, and the JSON-RPC
numbers for what is wrong with the request itself. A line longer than
MAX_LINE gets an ETOOBIG reply and the connection is closed (the rest of the
line cannot be told from the next request); everything else is answered and
the connection stays open. No pickle, nothing evaluated.
"""
from __future__ import annotations

import errno
import json
from typing import Any

MAX_LINE = 64 * 1024

# name -> code, for errors that are not libbt's.
CODES = {
    "EPARSE": -32700,       # not JSON
    "EREQUEST": -32600,     # JSON, but not a request object
    "ENOCMD": -32601,       # unknown command
    "EARGS": -32602,        # missing, unknown or mistyped argument
    "EINTERNAL": -32603,    # a bug in btd: logged with its traceback
    "ETOOBIG": -32001,      # line over MAX_LINE bytes
    "EPERM": -errno.EPERM,  # the peer's uid is not served
    "ENOENT": -errno.ENOENT,  # no such segment / row
    "EBUSY": -errno.EBUSY,  # try again later (e.g. a client is stuck)
}


class RequestError(Exception):
    """An error to send back: name from CODES (or libbt's), message."""

    req_id: Any     # set by parse_request when the line had one

    def __init__(self, name: str, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.name = name
        self.code = CODES.get(name, -1) if code is None else code
        self.message = message


def encode(obj: Any) -> bytes:
    return (json.dumps(obj, separators=(",", ":"), allow_nan=False) + "\n").encode()


def ok(req_id: Any, result: Any) -> bytes:
    return encode({"id": req_id, "status": "ok", "result": result})


def error(req_id: Any, err: RequestError) -> bytes:
    return encode({"id": req_id, "status": "error",
                   "error": {"code": err.code, "name": err.name, "message": err.message}})


def parse_request(line: bytes | str) -> tuple[Any, str, dict[str, Any]]:
    """(id, cmd, args) from one line; RequestError otherwise. The id is
    recovered whenever the line is an object, so that even a bad request's
    reply can be matched."""
    try:
        req = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError("EPARSE", f"not JSON: {e}") from None
    except RecursionError:
        raise RequestError("EPARSE", "JSON nested too deeply") from None
    if not isinstance(req, dict):
        raise RequestError("EREQUEST", f"a request is a JSON object, got {type(req).__name__}")
    req_id = req.get("id")
    if isinstance(req_id, (dict, list)):
        raise RequestError("EREQUEST", "id must be a string, a number or null")
    cmd, args = req.get("cmd"), req.get("args", {})
    if not isinstance(cmd, str):
        raise _with_id(RequestError("EREQUEST", "cmd must be a string"), req_id)
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise _with_id(RequestError("EARGS", "args must be an object"), req_id)
    return req_id, cmd, args


def _with_id(err: RequestError, req_id: Any) -> RequestError:
    err.req_id = req_id
    return err


class LineBuffer:
    """Splits a byte stream into lines of at most `limit` bytes."""

    def __init__(self, limit: int = MAX_LINE) -> None:
        self.limit = limit
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """The complete lines in data (without newlines); RequestError
        ETOOBIG once a line grows past the limit."""
        self.buf += data
        lines = []
        start = 0
        while True:
            nl = self.buf.find(b"\n", start)
            if nl < 0:
                break
            if nl - start > self.limit:
                raise RequestError("ETOOBIG", f"request line over {self.limit} bytes")
            lines.append(bytes(self.buf[start:nl]))
            start = nl + 1
        del self.buf[:start]
        if len(self.buf) > self.limit:
            raise RequestError("ETOOBIG", f"request line over {self.limit} bytes")
        return lines
