"""Layer 1: the raw CFFI module, and the refusal to load a mismatching build.

pyca/cryptography learnt that a stale compiled module next to newer Python
code fails in baffling ways. We compare the build id compiled into _bt with
the package version (always) and with the sources of this tree (when the
package runs from a checkout, e.g. an editable install, where a C change
without a rebuild is the usual mistake).
"""
import os

from . import _buildid
from ._version import __version__

try:
    from ._bt import ffi, lib
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        f"blocktable._bt, the compiled libbt extension, could not be loaded ({e}); "
        "install the package with `pip install .` (or `make venv`)") from e

__all__ = ["ffi", "lib", "BUILD_ID"]

BUILD_ID = ffi.string(lib.blocktable_build_id()).decode()


def _verify_build():
    version = BUILD_ID.split("+", 1)[0]
    if version != __version__:
        raise ImportError(
            f"blocktable {__version__} found an extension built for {version} "
            f"({BUILD_ID}); reinstall the package")
    if os.environ.get("BLOCKTABLE_SKIP_BUILD_CHECK") or not _buildid.in_source_tree():
        return
    expected = _buildid.build_id()
    if expected != BUILD_ID:
        raise ImportError(
            f"blocktable._bt was built from other sources ({BUILD_ID}) than the "
            f"ones in this tree ({expected}); rebuild with `make venv` or "
            "`pip install -e .` (BLOCKTABLE_SKIP_BUILD_CHECK=1 skips this check)")


_verify_build()
