"""Write the API reference (HTML, pdoc) from the docstrings: `make docs`.

    python docs/make_api.py [OUTDIR]        (default docs/api)

Every public module of blocktable and blocktable_daemon is documented (a name
starting with _ is private). A module whose optional dependency is missing here
(blocktable.vllm needs vLLM, blocktable.gpu's CUDA parts need CuPy) is skipped,
and named on stderr, rather than failing the whole reference.
"""
import importlib
import os
import pkgutil
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("blocktable", "blocktable_daemon")


def modules():
    out, skipped = [], []
    for top in PACKAGES:
        pkg = importlib.import_module(top)
        out.append(top)
        for m in pkgutil.walk_packages(pkg.__path__, top + ".", onerror=lambda name: None):
            if any(part.startswith("_") for part in m.name.split(".")):
                continue
            try:
                importlib.import_module(m.name)
            except Exception as e:          # an optional dependency missing here
                skipped.append((m.name, f"{type(e).__name__}: {e}"))
                continue
            out.append(m.name)
    return out, skipped


def main(argv):
    outdir = Path(argv[1] if len(argv) > 1 else ROOT / "docs" / "api")
    for p in (ROOT / "bindings", ROOT / "daemon"):
        sys.path.insert(0, str(p))
    try:
        import pdoc
    except ImportError:
        print("make_api: pdoc is missing: pip install 'blocktable[docs]'", file=sys.stderr)
        return 1
    mods, skipped = modules()
    for name, why in skipped:
        print(f"make_api: skipped {name} ({why})", file=sys.stderr)
    pdoc.render.configure(docformat="google", footer_text="blocktable API reference",
                          search=True, show_source=False)
    # pdoc walks a package's submodules itself where __all__ does not hide them; naming
    # them again is harmless (one page each), not worth its warning.
    warnings.filterwarnings("ignore", message="The module specification")
    # Fields of the classes made from C structs at import (make_dataclass) have no source
    # line; pdoc says so once per field.
    warnings.filterwarnings("ignore", message="Cannot determine where")
    pdoc.pdoc(*mods, output_directory=outdir)
    print(f"make_api: {len(mods)} modules in {os.path.relpath(outdir)}/ "
          f"(open {os.path.relpath(outdir / 'index.html')})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
