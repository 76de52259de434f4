#!/usr/bin/env bash
# Every GPU check of the project in one call of a lent GPU (a call runs at most 10 minutes; a task
# has 15 device-minutes in all, so this fits about 9 and leaves time to rerun what failed):
#
#   bash benchmarks/run_gpu.sh              # every step, most valuable first
#   bash benchmarks/run_gpu.sh quant vram   # env, then only these steps (to rerun what failed)
#
# Steps, in order (each under its own timeout, never past the deadline; a failed step does not
# stop the later ones; each writes its results as it ends):
#   env      always first: nvidia-smi, versions, the carried wheels and the package (~20 s)
#   tests    the GPU-aware tests: fused sampler and int8 kernel compiled for real, engines with
#            real graph capture, quantized fast paths, streaming, mixed codec, offload (~150 s)
#   decode   plain vs graph, synthetic 3B bf16, 20 s of audio: frames/s, achieved vs copy GB/s,
#            peak VRAM, greedy agreement over 64 top-1 frames (~60 s)
#   batch    graph engine, 1, 2, 4 and 8 songs at once side by side, synthetic 3B bf16, 20 s
#            songs: aggregate and per-song frames/s, speed-up over one song, GB/s, peak VRAM
#            (~120 s)
#   quant    graph engine, --quant none,int8,int4,nf4 side by side, 20 s of audio (~90 s)
#   vram     --vram 12G,8G, 20 s songs: measured peak against the plan, RTF (~100 s)
#   codec    graph engine, a 240 s song: the codec per dtype (mixed, float32, bfloat16: seconds,
#            SNR against float32), and a streamed song's time to first audio (~90 s)
#   micro    only when named: pytest benchmarks/ (sampler, decode frame, codec window, each
#            quantized linear's plain / fast / compiled forward, which picks the int8 kernel)
#   serve    only when named: `heartmula-rt serve` under load (benchmarks/serve_bench.py) on a
#            random 3B bf16 checkpoint made here (/tmp/serve-3B, ~7 GB of disk), graph engine,
#            --batch 8: 8 clients, one 40 s song each (past one codec window, 29.8 s, so first
#            audio comes before the song's end): songs/min, frames/s, queue wait, time to first
#            audio (~200 s). Needs fastapi, uvicorn and httpx (and their dependencies) in the
#            image or carried in .whl
#   overlap  only when named: the LM and the codec as a pipeline (benchmarks/pipeline_overlap.py)
#            on the same random 3B checkpoint, graph engine, 4 songs of 40 s: the LM's frames/s
#            alone, with the codec on its own thread, and in turn with it; the codec on a second
#            GPU where the machine has one, else on the same (~240 s). Needs what `serve` needs
#
# Results go to $OUT (else benchmarks/results/gpu): run.log (everything printed), tests.xml (the
# tests' JUnit report) and one bench JSON per step (`..._decode.json`, `..._quant.json`,
# `..._vram-12G.json`, `..._vram-8G.json`, `..._codec.json`, `..._batch.json`): 8 files, the
# device tool's limit (`micro`, `serve` and `overlap` add `micro.json`, `..._serve.json` and
# `..._overlap.json`: name them in a call of their own).
# Commit the JSON files under benchmarks/results/. BUDGET_S (540) sets the deadline.
#
# The device image has torch, triton, pytest and numpy but not soundfile (the CLI imports it) or
# bitsandbytes (NF4's fast path). Carry them as wheels, and the fixtures the tests need (without
# the codec reference outputs, to stay under the 64 MiB a call carries). Here, in the repo root,
# once per checkout:
#   printf '/.whl/\n/.shared/\n' >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     soundfile cffi pycparser bitsandbytes
#   (for `serve` also, with their dependencies: the same download without --no-deps of
#    fastapi uvicorn httpx)
#   mkdir -p .shared && rsync -a --exclude 'codec_T*' ../shared/fixtures .shared/
# then call with `.whl` and `.shared` in the carry list, and a timeout_s of about 600.
set -uo pipefail # no -e: one failed step must not cost the others
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
DEADLINE=$(($(date +%s) + ${BUDGET_S:-540}))
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 HEARTMULA_RT_SHARED=.shared
STEPS=${*:-tests decode batch quant vram codec}
failed=()

# step NAME SECONDS COMMAND...: run COMMAND under a timeout of SECONDS, cut to the deadline.
step() {
    local name=$1 budget=$2 left start rc
    shift 2
    left=$((DEADLINE - $(date +%s)))
    if ((left < 20)); then
        echo "=== $name: skipped, ${left} s left before the deadline"
        failed+=("$name")
        return
    fi
    ((budget > left)) && budget=$left
    echo "=== $name (at most ${budget} s)"
    start=$(date +%s)
    # bash -c: the command may be one of this script's functions (exported below).
    timeout --kill-after=10 "$budget" bash -c '"$@"' "$name" "$@"
    rc=$?
    echo "=== $name: exit $rc after $(($(date +%s) - start)) s"
    ((rc == 0)) || failed+=("$name")
}

bench() {
    python3 -m heartmula_rt.cli bench --synthetic 3B --out-dir "$OUT" "$@"
}

setup_env() {
    nvidia-smi
    python3 -c 'import sys, torch, triton; print(sys.version); print("torch", torch.__version__,
        "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name())'
    if [ -d .whl ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || return 1
    fi
    # Offline: the package alone (its dependencies are in the image or carried).
    python3 -m pip install -q --no-deps --no-build-isolation -e . || return 1
    python3 -c 'import heartmula_rt, soundfile; print("heartmula_rt", heartmula_rt.__file__)'
}
# A random 3B checkpoint folder, made once per machine (a cut run leaves only the .part folder).
CKPT=/tmp/serve-3B
make_3b() {
    [ -d "$CKPT" ] && return
    rm -rf "$CKPT.part"
    python3 tools/make_checkpoint.py "$CKPT.part" --lm 3B --codec full --dtype bfloat16 &&
        mv "$CKPT.part" "$CKPT"
}
# 8 clients on a server of that checkpoint, within the step's BUDGET seconds (its argument).
serve_bench() {
    local budget=$1
    make_3b || return 1
    python3 benchmarks/serve_bench.py --model-path "$CKPT" --no-eos --engine graph --batch 8 \
        --clients 8 --songs-per-client 1 --seconds 40 --warmup 2 \
        --deadline-s $((budget - SECONDS - 30)) --out-dir "$OUT" --name serve
}
overlap_bench() {
    local codec=cuda:0
    make_3b || return 1
    (($(nvidia-smi -L | wc -l) > 1)) && codec=cuda:1
    python3 benchmarks/pipeline_overlap.py --model-path "$CKPT" --device cuda:0 \
        --codec-device "$codec" --engine graph --songs 4 --seconds 40 --rounds 2 \
        --out-dir "$OUT" --name overlap
}
[ -d .whl ] && export PYTHONPATH=/tmp/site
export CKPT
export -f bench setup_env make_3b serve_bench overlap_bench

step env 60 setup_env
for s in $STEPS; do
    case "$s" in
    tests)
        step tests 180 python3 -m pytest -q -x --junitxml="$OUT/tests.xml" \
            tests/test_fused_sampler.py tests/test_engine.py tests/test_quant_fast.py \
            tests/test_stream.py tests/test_codec_mixed.py tests/test_offload.py \
            tests/test_planner_devices.py
        ;;
    decode)
        step decode 120 bench --engines plain,graph --max-seconds 20 --repeats 3 --warmup 1 \
            --no-codec --greedy-frames 64 --name decode
        ;;
    quant)
        step quant 150 bench --engines graph --quant none,int8,int4,nf4 --max-seconds 20 \
            --repeats 3 --warmup 1 --no-codec --greedy-frames 64 --name quant
        ;;
    vram)
        step vram 150 bench --engines graph --vram 12G,8G --max-seconds 20 --repeats 1 \
            --warmup 1
        ;;
    codec)
        step codec 150 bench --engines graph --max-seconds 240 --repeats 1 --warmup 0 \
            --codec-repeats 2 --name codec
        ;;
    batch)
        step batch 150 bench --engines graph --batch 1,2,4,8 --max-seconds 20 --repeats 2 \
            --warmup 1 --no-codec --name batch
        ;;
    micro) step micro 240 python3 -m pytest -q benchmarks/ --benchmark-json="$OUT/micro.json" ;;
    serve) step serve 300 serve_bench 300 ;;
    overlap) step overlap 300 overlap_bench ;;
    *)
        echo "unknown step $s: use tests, decode, quant, vram, codec, batch, micro, serve or overlap"
        failed+=("$s")
        ;;
    esac
done

echo "=== results in $OUT:"
ls -l "$OUT"
if ((${#failed[@]})); then
    echo "=== failed or skipped: ${failed[*]}"
    exit 1
fi
echo "=== every step passed"
