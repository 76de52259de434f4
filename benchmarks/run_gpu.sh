#!/usr/bin/env bash
# Every GPU figure of the project in one call of a lent H100 (about 6 to 9 minutes):
#
#   1. `heartmula-rt bench` on synthetic 3B bf16 weights, 240 s songs, engines plain, graph and
#      compile side by side, codec and greedy agreement (64 top-1 frames) included;
#   2. greedy agreement in float32, where the engines' rounding differences are smallest;
#   3. the micro-benchmarks: pytest benchmarks/ --benchmark-json;
#   4. the sampler and engine tests on the GPU (compiled kernel, real graph capture), if the
#      fixtures travelled: `mkdir -p .shared && cp -r ../shared/fixtures .shared/` and
#      `echo /.shared/ >> .git/info/exclude` here, then `.shared` in the call's carry list.
#
# Results (two bench JSON files, micro.json, run.log) go to $OUT, else benchmarks/results; commit
# the bench files under benchmarks/results/. Overrides: MAX_SECONDS (240), REPEATS (1 counted
# run per engine after one warm-up: a 240 s run already averages 3000 frames), ENGINES.
#
# The device image has torch, triton, pytest-benchmark and matplotlib but not soundfile, which
# the CLI imports. Carry it as wheels: here, in the repo root (once per checkout),
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl soundfile cffi pycparser
# then run `bash benchmarks/run_gpu.sh` with `.whl` in the call's carry list.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
MAX_SECONDS=${MAX_SECONDS:-240}
REPEATS=${REPEATS:-1}
ENGINES=${ENGINES:-plain,graph,compile}
mkdir -p "$OUT"
exec > >(tee "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1

nvidia-smi
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
# Offline: the package alone (its dependencies are in the image).
python3 -m pip install -q --no-deps --no-build-isolation -e .

bench() {
    python3 -m heartmula_rt.cli bench --synthetic 3B --engines "$ENGINES" --out-dir "$OUT" "$@"
}
bench --max-seconds "$MAX_SECONDS" --repeats "$REPEATS" --warmup 1 --greedy-frames 64
bench --dtype float32 --max-seconds 1 --repeats 1 --warmup 0 --no-codec --greedy-frames 64 \
    --name greedy-fp32
python3 -m pytest benchmarks/ -q --benchmark-json="$OUT/micro.json"
if [ -d .shared/fixtures ]; then
    HEARTMULA_RT_SHARED=.shared python3 -m pytest -q tests/test_fused_sampler.py tests/test_engine.py
fi
