#!/usr/bin/env bash
# Every GPU check of the project in one call of a lent GPU. A call runs at most 10 minutes and a
# task has 15 device-minutes in all: the default run's budgets sum to at most 420 s (graph
# captures and compiles included), so a second call fits in what is left to rerun what failed.
#
#   bash benchmarks/run_gpu.sh              # every default step, most valuable first
#   bash benchmarks/run_gpu.sh quant vram   # env, then only these steps (to rerun what failed)
#   bash benchmarks/run_gpu.sh --plan       # each step and its budget, then `total: N s`
#   bash benchmarks/run_gpu.sh --fake       # no GPU: each step writes one fake run (FAKE_HANG:
#                                           # steps that then hang until their deadline kills
#                                           # them; FAKE_BUDGET_S: every step's budget)
#
# Steps in order (budgets: --plan), each under its own deadline (`timeout`), so that one slow step
# cannot eat the others; a failed or cut step does not stop the later ones:
#   env          imports every module of the package and makes three frames with each engine
#                (plain, graph, compile traced with aot_eager) and one codec window through its
#                graph, on the tiny fixture on the GPU: API drift of the image's torch shows here,
#                in seconds, and the run stops with the list of what failed
#   decode       graph engine (with the #34 kernels: merged q/k/v and w1/w3, add+RMSNorm,
#                RoPE+KV write, split-key decode attention) vs compile engine (a cold inductor
#                compile: its budget is here now), synthetic 3B bf16, one song with CFG, 20 s:
#                frames/s, bytes/step, launches, ms/frame against the bandwidth floor, GB/s,
#                peak VRAM, greedy agreement over 64 frames
#   batch        graph engine, one song and 8 songs at once, 20 s each
#   codec        graph engine, a 240 s song: the codec mixed vs float32 (and bfloat16), SNR
#                against float32, and a streamed song's time to first audio
#   quant        graph engine, --quant int8,int4, 20 s
#   quant-batch  graph engine, --quant int8, one song and 8 at once
#   vram         --vram 12G, a 240 s song: measured peak against the plan's, RTF
#   tests        the tests marked `gpu` or `kernels` (each Triton kernel against its plain twin,
#                run on the interpreter elsewhere) but not `inductor`, under pytest-timeout
#   compile      compile engine again, 20 s (inductor's cache warm from decode): last, a check
# Named only: micro (pytest benchmarks/), serve and overlap (on a random 3B checkpoint made at
# /tmp/3B-never-eos, ~7 GB of disk; they need fastapi, uvicorn and httpx, in the image), and lora
# (benchmarks/lora_bench.py on that checkpoint, graph engine: 4 songs of 20 s with no adapter,
# one merged, and 4 different rank-16 adapters per song in one batch).
#
# Results go to $OUT (else benchmarks/results/gpu): run.log (everything printed) and one bench
# JSON per benchmark step, each rewritten after every run it measures (each quant mode, batch
# size, budget), so a step cut by its deadline keeps what it measured: 8 files at most, the
# device tool's limit. The run ends with a summary of what was measured and what was not. Commit
# the JSON files under benchmarks/results/.
#
# Carry (the device image has torch, triton, pytest, pytest-timeout and numpy, but not soundfile,
# which the CLI imports; the tests and the env step read the fixtures, codec_T150 and T400 too).
# Once per checkout, in the repo root:
#   printf '/.whl/\n/.shared/\n' >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     soundfile cffi pycparser
#   mkdir -p .shared && cp -r ../shared/fixtures .shared/ && chmod -R u+w .shared
# then call with carry [".whl", ".shared"] (about 26 MiB with the tree; the limit is 64 MiB:
# any other untracked, unignored folder travels too) and a timeout_s of 480.
set -uo pipefail # no -e: one failed step must not cost the others
cd "$(dirname "$0")/.."

# name budget (seconds): the default steps, in order; then those run only when named.
DEFAULT_STEPS=(env:40 decode:80 batch:35 codec:85 quant:45 quant-batch:30 vram:55 tests:40
    compile:10)
NAMED_STEPS=(micro:240 serve:300 overlap:300 lora:240)

budget_of() {
    local s
    for s in "${DEFAULT_STEPS[@]}" "${NAMED_STEPS[@]}"; do
        [ "${s%%:*}" = "$1" ] && echo "${s#*:}" && return
    done
    return 1
}

FAKE=0
case "${1:-}" in
--plan)
    total=0
    for s in "${DEFAULT_STEPS[@]}"; do
        printf '%-12s %4d s\n' "${s%%:*}" "${s#*:}"
        total=$((total + ${s#*:}))
    done
    echo "total: $total s"
    exit 0
    ;;
--fake)
    FAKE=1
    shift
    ;;
esac

OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
export OUT PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 HEARTMULA_RT_SHARED=.shared
TESTS_LOG=$(mktemp)
if (($#)); then STEPS=(env "$@"); else STEPS=("${DEFAULT_STEPS[@]%%:*}"); fi
results=() # name:status:seconds:budget

# step NAME COMMAND...: run COMMAND under NAME's budget (its deadline); true if it passed.
step() {
    local name=$1 budget rc start status
    shift
    budget=$(budget_of "$name")
    ((FAKE)) && budget=${FAKE_BUDGET_S:-3}
    echo "=== $name (at most $budget s)"
    start=$(date +%s)
    # bash -c: the command may be one of this script's functions (exported below).
    timeout --kill-after=5 "$budget" bash -c '"$@"' "$name" "$@"
    rc=$?
    case $rc in
    0) status=ok ;;
    124 | 137) status="timed out" ;;
    *) status="failed ($rc)" ;;
    esac
    echo "=== $name: $status after $(($(date +%s) - start)) s"
    results+=("$name:$status:$(($(date +%s) - start)):$budget")
    ((rc == 0))
}

bench() {
    heartmula-rt bench --synthetic 3B --out-dir "$OUT" "$@"
}

# One fake run in bench's results format, then (for the steps in FAKE_HANG) a hang.
fake_step() {
    python3 - "$1" <<'PY' || return 1
import json, os, sys
name = sys.argv[1]
run = {"name": f"fake-{name}", "lm_frames_per_s": 1.0, "song_frames_per_s": 1.0}
result = {"device": "fake", "runs": [run]}
with open(os.path.join(os.environ["OUT"], f"2000-01-01_fake_{name}.json"), "w") as f:
    json.dump(result, f)
PY
    case ",${FAKE_HANG:-}," in *",$1,"*) sleep 600 ;; esac
}

install_env() {
    nvidia-smi -L
    python3 -c 'import sys, torch, triton; print(sys.version); print("torch", torch.__version__,
        "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name())'
    if [ -d .whl ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || return 1
    fi
    # Offline: the package alone (its dependencies are in the image or carried).
    python3 -m pip install -q --no-deps --no-build-isolation -e . || return 1
    check_env
}

# Every module imported, then each engine's frames and a codec window on the tiny fixture.
check_env() {
    python3 - <<'PY'
import importlib, os, pkgutil, sys, traceback
from pathlib import Path

failed, notes = [], []
OPTIONAL = {"fastapi", "uvicorn", "starlette", "ray", "httpx", "matplotlib", "bitsandbytes"}
import heartmula_rt

for mod in pkgutil.walk_packages(heartmula_rt.__path__, "heartmula_rt."):
    try:
        importlib.import_module(mod.name)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in OPTIONAL:
            notes.append(f"{mod.name}: needs {e.name} (not in the image)")
        else:
            failed.append(f"import {mod.name}: {e!r}")
    except Exception as e:
        failed.append(f"import {mod.name}: {e!r}")


def check(what, fn):
    try:
        fn()
        print(f"ok: {what}")
    except Exception:
        failed.append(f"{what}: {traceback.format_exc(limit=-3).strip()}")


if not failed:
    import torch
    from tokenizers import Tokenizer

    from heartmula_rt.model.checkpoint import load_codec, load_lm
    from heartmula_rt.model.folder import CODEC_DIR, LM_DIR, load_gen_config
    from heartmula_rt.model.prompt import build_prompt
    from heartmula_rt.request import CodecParams, SamplingParams
    from heartmula_rt.runtime.engine import PlainEngine, StaticEngine

    ckpt = Path(os.environ["HEARTMULA_RT_SHARED"]) / "fixtures/tiny-public/ckpt"
    gen = load_gen_config(ckpt)
    lm = load_lm(ckpt / LM_DIR, device="cuda", dtype=torch.bfloat16)[0]
    prompt = build_prompt(Tokenizer.from_file(str(ckpt / "tokenizer.json")), gen, "jazz", "hi")
    frames = {}
    engines = {
        "plain": lambda: PlainEngine(lm, gen),
        "graph": lambda: StaticEngine(lm, gen),
        # Dynamo's trace of the step, without inductor's minutes of code generation.
        "compile (aot_eager)": lambda: StaticEngine(
            lm, gen, compile=True, compile_backend="aot_eager"
        ),
    }
    for name, make in engines.items():
        sampling = SamplingParams(max_frames=3, seed=0, stop_at_eos=False)  # warm, capture, replay
        check(f"{name} engine", lambda: frames.setdefault(name, make().generate_frames(prompt, sampling)))

    def codec_window():
        codec = load_codec(ckpt / CODEC_DIR, device="cuda")[0]
        codec.use_fast_path("graph")
        codes = frames.get("plain", torch.zeros(8, 3, dtype=torch.long))
        wav = codec.detokenize(codes, CodecParams(num_steps=2), generator=torch.Generator())
        assert torch.isfinite(wav).all(), "the codec's waveform is not finite"

    check("codec window through its graph", codec_window)

for note in notes:
    print(f"note: {note}")
if failed:
    print(f"env: {len(failed)} check(s) failed:", *failed, sep="\n- ")
    sys.exit(1)
print("env: every module imports, every engine and the codec run")
PY
}

gpu_tests() {
    python3 -m pytest -q -p no:cacheprovider -m "(gpu or kernels) and not inductor" --timeout=60 tests/ |
        tee "$TESTS_LOG"
}

# A random 3B checkpoint folder, made once per machine (a cut run leaves only the .part folder).
CKPT=/tmp/3B-never-eos
make_3b() {
    [ -d "$CKPT" ] && return
    rm -rf "$CKPT.part"
    python3 tools/make_checkpoint.py "$CKPT.part" --lm 3B --codec full --dtype bfloat16 \
        --never-eos &&
        mv "$CKPT.part" "$CKPT"
}
# 8 clients on a server of that checkpoint, within the step's BUDGET seconds (its argument).
serve_bench() {
    local budget=$1
    make_3b || return 1
    python3 benchmarks/serve_bench.py --model-path "$CKPT" --engine graph --batch 8 \
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

# LoRA adapters: none, merged, per song (4 different ones in one batch), side by side.
lora_bench() {
    make_3b || return 1
    python3 benchmarks/lora_bench.py --model-path "$CKPT" --engine graph --songs 4 --seconds 20 \
        --rounds 2 --out-dir "$OUT" --name lora
}

# The summary: each step's outcome, then every run of every results file.
summary() {
    python3 - "$TESTS_LOG" "${results[@]}" <<'PY'
import glob, json, os, sys

tests_log, outcomes = sys.argv[1], [r.split(":") for r in sys.argv[2:]]
print("=== summary")
print(f"{'step':<12} {'outcome':<12} {'took':>6} {'budget':>6}")
for name, status, took, budget in outcomes:
    print(f"{name:<12} {status:<12} {took:>4} s {budget:>4} s")
lines = open(tests_log).read().strip().splitlines()
if lines:
    print(f"tests: {lines[-1].strip('= ')}")
FIELDS = (  # (run field, label, format)
    ("lm_frames_per_s", "f/s", ".1f"), ("song_frames_per_s", "song f/s", ".1f"),
    ("achieved_gbps", "GB/s", ".0f"), ("peak_vram_gib", "peak GiB", ".1f"),
    ("predicted_peak_gib", "planned GiB", ".1f"), ("codec_s", "codec s", ".1f"),
    ("ttfa_s", "1st audio s", ".2f"), ("e2e_rtf", "RTF", ".3f"),
    ("greedy_agreement", "greedy", ".3f"),
)
for path in sorted(glob.glob(os.path.join(os.environ["OUT"], "*.json"))):
    try:
        result = json.load(open(path))
    except ValueError:
        print(f"{os.path.basename(path)}: not whole JSON")
        continue
    print(f"{os.path.basename(path)} ({result.get('device')}):")
    for run in result.get("runs", []):
        cells = [f"{label} {run[k]:{spec}}" for k, label, spec in FIELDS if run.get(k) is not None]
        print(f"  {run['name']:<26} " + "  ".join(cells))
    for mode, c in ((result.get("codec") or {}).get("dtypes") or {}).items():
        snr = "" if c["snr_db"] is None else f", SNR {c['snr_db']:.1f} dB"
        print(f"  codec {mode:<20} {c['codec_s']:.2f} s{snr}")
missed = [f"{n} ({s})" for n, s, _, _ in outcomes if s != "ok"]
print("not measured or cut: " + (", ".join(missed) if missed else "none"))
PY
}

if [ -d .whl ]; then export PYTHONPATH=/tmp/site; fi
export CKPT TESTS_LOG
export -f bench fake_step install_env check_env gpu_tests make_3b serve_bench overlap_bench lora_bench

for s in "${STEPS[@]}"; do
    if ! budget_of "$s" >/dev/null; then
        echo "unknown step $s: use ${DEFAULT_STEPS[*]%%:*} ${NAMED_STEPS[*]%%:*}"
        results+=("$s:unknown:0:0")
        continue
    fi
    if ((FAKE)); then
        cmd=(fake_step "$s")
    else
        case "$s" in
        env) cmd=(install_env) ;;
        decode) cmd=(bench --engines graph,compile --max-seconds 20 --repeats 2 --warmup 1
            --no-codec --greedy-frames 64 --name decode) ;;
        batch) cmd=(bench --engines graph --batch 1,8 --max-seconds 20 --repeats 1 --warmup 1
            --no-codec --name batch) ;;
        codec) cmd=(bench --engines graph --max-seconds 240 --repeats 1 --warmup 0
            --codec-repeats 1 --name codec) ;;
        quant) cmd=(bench --engines graph --quant int8,int4 --max-seconds 20 --repeats 2
            --warmup 1 --no-codec --greedy-frames 64 --name quant) ;;
        quant-batch) cmd=(bench --engines graph --quant int8 --batch 1,8 --max-seconds 20
            --repeats 1 --warmup 1 --no-codec --name quant-batch) ;;
        vram) cmd=(bench --engines graph --vram 12G --max-seconds 240 --repeats 1 --warmup 0) ;;
        tests) cmd=(gpu_tests) ;;
        compile) cmd=(bench --engines compile --max-seconds 20 --repeats 1 --warmup 1 --no-codec
            --name compile) ;;
        micro) cmd=(python3 -m pytest -q benchmarks/ --benchmark-json="$OUT/micro.json") ;;
        serve) cmd=(serve_bench "$(budget_of serve)") ;;
        overlap) cmd=(overlap_bench) ;;
        lora) cmd=(lora_bench) ;;
        esac
    fi
    if ! step "$s" "${cmd[@]}" && [ "$s" = env ]; then
        echo "=== env failed: nothing else runs (fix the list above first)"
        break
    fi
done

rm -f "$OUT"/*.part # a write cut between its two halves (bench's ResultsFile)
summary
rm -f "$TESTS_LOG"
for r in "${results[@]}"; do [[ $r == *:ok:* ]] || exit 1; done
