#!/usr/bin/env bash
# Every GPU figure of the project, in parts that each fit one 10-minute call of a lent H100:
#
#   bash benchmarks/run_gpu.sh PART [PART ...]
#
#   decode  engines plain, graph and compile side by side: synthetic 3B bf16, 240 s songs, greedy
#           agreement over 64 top-1 frames, the codec in each dtype (mixed / float32 / bfloat16:
#           seconds, SNR against float32) and each engine's streamed song (time to first audio);
#           then greedy agreement in float32 (~6 min)
#   quant   the graph engine with --quant none,int8,nf4,int4 side by side in one run (~3 min)
#   micro   pytest benchmarks/: sampler, decode frame, codec window, every quantized linear's
#           plain / fast / compiled forward (picks the int8 kernel) (~3 min)
#   tests   the GPU-aware tests: fused sampler, engines (real capture), fast quantized kernels,
#           streaming, mixed codec (~3 min; needs the fixtures, see below)
#   vram-a  --vram 24G,16G,12G,8G: one full 240 s song per budget, enforced (~5 min)
#   vram-b  --vram 6G (~3 min)
#   vram-c  --vram 4.5G (4G is below the minimum): int4, LM layers streamed; RTF up to 1 (~6 min)
#
# Results (bench JSON files, micro.json, run-PART.log) go to $OUT, else benchmarks/results;
# commit the bench files under benchmarks/results/. Overrides: MAX_SECONDS (240).
#
# The device image has torch, triton, pytest-benchmark and matplotlib but not soundfile (the CLI
# imports it) or bitsandbytes (the fast NF4 path). Carry them as wheels, and the fixtures for
# `tests` (without the codec reference outputs, to stay under the 64 MiB a call carries).
# Here, in the repo root, once per checkout:
#   printf '/.whl/\n/.shared/\n' >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     soundfile cffi pycparser bitsandbytes
#   mkdir -p .shared && rsync -a --exclude 'codec_T*' ../shared/fixtures .shared/
# then run this script with `.whl` and `.shared` in the call's carry list.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
MAX_SECONDS=${MAX_SECONDS:-240}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run-${*// /-}.log") 2>&1
export PYTHONUNBUFFERED=1

nvidia-smi
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
# Offline: the package alone (its dependencies are in the image).
python3 -m pip install -q --no-deps --no-build-isolation -e .

bench() {
    python3 -m heartmula_rt.cli bench --synthetic 3B --out-dir "$OUT" "$@"
}
for part in "$@"; do
    echo "=== $part"
    case "$part" in
    decode)
        bench --engines plain,graph,compile --max-seconds "$MAX_SECONDS" --repeats 1 \
            --warmup 1 --greedy-frames 64
        bench --engines plain,graph,compile --dtype float32 --max-seconds 1 --repeats 1 \
            --warmup 0 --no-codec --greedy-frames 64 --name greedy-fp32
        ;;
    quant)
        bench --engines graph --quant none,int8,nf4,int4 --max-seconds "$MAX_SECONDS" \
            --repeats 1 --warmup 1 --no-codec --greedy-frames 64 --name quant
        ;;
    micro)
        python3 -m pytest benchmarks/ -q --benchmark-json="$OUT/micro.json"
        ;;
    tests)
        HEARTMULA_RT_SHARED=.shared python3 -m pytest -q tests/test_fused_sampler.py \
            tests/test_engine.py tests/test_quant_fast.py tests/test_stream.py \
            tests/test_codec_mixed.py tests/test_offload.py
        ;;
    vram-a) bench --engines graph --vram 24G,16G,12G,8G --max-seconds "$MAX_SECONDS" \
        --repeats 1 --warmup 0 ;;
    vram-b) bench --engines graph --vram 6G --max-seconds "$MAX_SECONDS" --repeats 1 --warmup 0 ;;
    vram-c) bench --engines graph --vram 4.5G --max-seconds "$MAX_SECONDS" --repeats 1 --warmup 0 ;;
    *)
        echo "unknown part $part: use decode, quant, micro, tests, vram-a, vram-b or vram-c" >&2
        exit 2
        ;;
    esac
done
