#!/usr/bin/env bash
# The GPU run of blocktable.gpu, as one command on the GPU machine (the
# workplace's `run` tool, carrying .whl from ../shared/gpu/wheels.sh):
# build the extension for that Python, the GPU tests (the vLLM adapter's
# and the host-emulated ones too), the example, the benchmark. Everything
# lands under $OUT (log, pytest, bench JSON). Exits non-zero if a step failed.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/bindings:$PWD/daemon PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 setup.py -q build_ext --inplace > "$OUT/build.txt" 2>&1 || { tail -30 "$OUT/build.txt"; exit 1; }
python3 -c "import blocktable, blocktable.gpu as g; print(blocktable.BUILD_ID, g.gpu_available())"
rc=0
timeout 300 python3 -m pytest -q -rs -p no:cacheprovider --timeout 150 \
    tests/test_gpu.py tests/test_vllm_compat.py tests/test_gpu_sync_host.py \
    tests/test_gpu_kernels_host.py tests/test_api_fixes.py 2>&1 | tee "$OUT/pytest.txt" || rc=1
timeout 60 python3 examples/gpu_two_process.py --steps 120 2>&1 | tee "$OUT/example.txt" || rc=1
timeout 200 python3 bench/bench_gpu.py --json "$OUT/gpu_results.json" 2>&1 | tee "$OUT/bench.txt" || rc=1
exit $rc
