#!/usr/bin/env bash
# The GPU benchmark in one command, on a machine that brings its own Python (the GPU image of
# scripts/gpu_image.txt: Python 3.12 with jax[cuda], torch and transformers) and reaches no registry.
#
#   bash scripts/gpu_check.sh --prepare     # where PyPI is reachable: the wheels the image lacks
#                                           # (grain, array_record, ...) into .device/wheels
#   bash scripts/gpu_check.sh [--out DIR] [--presets "1b-1b 270m-270m"] [--batch 8] [--encoder-length 2048]
#       [--decoder-length 512] [--steps 5] [--new-tokens 128] [--peak-matmul 8192] [--budget 480]
#       [--wheels DIR] [--no-install] [--no-hf] [--no-profile] [--cpu]
#
# On the GPU machine, from the checkout: installs the wheels into a directory on PYTHONPATH with
# pip's --no-index (scripts/device_wheels.py), checks that every requirement of pyproject.toml is
# met, that `t5gemma2_jax` imports and whether transformers has T5Gemma2ForConditionalGeneration
# (if not, the transformers side is skipped and the reason recorded), then for each preset: the
# JAX train step (bf16 compute, float32 master weights, default `auto` attention; MFU against the
# datasheet's dense bf16 peak and a measured 8192^3 bf16 matmul; a jax.profiler summary), the
# same train step and greedy generation in transformers (sdpa attention, float32 weights under
# bf16 autocast, torch.optim.AdamW), and JAX's greedy generation (128 new tokens). Each part runs in
# a process of its own: JAX's allocator keeps what it takes, so a framework sharing the process
# would get what is left, and JAX's peak device memory cannot be reset between parts. The parts
# share a time budget (--budget seconds, default 480) and run 1b-1b first; a part that fails or
# runs out of time leaves an error line and the next one runs.
#
# Writes into DIR (default: $OUT when set, else ./gpu_check): gpu_check.jsonl (one JSON line per
# part; `python scripts/benchmark.py --summarize DIR/gpu_check.jsonl` tabulates them),
# gpu_check.log (versions, GPU, each part's output, the summary) and profile_<preset>.txt.
# Exits 2 with one line on a machine whose JAX sees no GPU, or when the wheels are missing.
# --cpu runs the same parts on the CPU instead (transformers on torch's CPU): the command itself,
# tried with small shapes (--presets tiny) on a machine without a GPU; its time limits are 6x.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PY:-python3}

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "error: gpu_check.sh: $*" >&2; [ -n "${LOG:-}" ] && echo "error: $*" >>"$LOG"; exit 2; }

OUTDIR=${OUT:-gpu_check}
PRESETS="1b-1b 270m-270m"
BATCH=8; ENC=2048; DEC=512; STEPS=5; NEW=128; PEAK=8192; BUDGET=
WHEELS=.device/wheels
PREPARE=0; INSTALL=1; HF=1; PROFILE=1; PLATFORM=gpu; HF_DEVICE=cuda
# A CPU compiles and runs each part many times slower: its limits and budget are scaled.
SCALE=1
while [ $# -gt 0 ]; do
    case "$1" in
        --prepare) PREPARE=1 ;;
        --out|--presets|--batch|--encoder-length|--decoder-length|--steps|--new-tokens|--peak-matmul|--budget|--wheels)
            [ $# -ge 2 ] || die "$1 needs a value"
            case "$1" in
                --out) OUTDIR=$2 ;; --presets) PRESETS=$2 ;; --batch) BATCH=$2 ;; --encoder-length) ENC=$2 ;;
                --decoder-length) DEC=$2 ;; --steps) STEPS=$2 ;; --new-tokens) NEW=$2 ;; --peak-matmul) PEAK=$2 ;;
                --budget) BUDGET=$2 ;; --wheels) WHEELS=$2 ;;
            esac
            shift ;;
        --no-install) INSTALL=0 ;;
        --no-hf) HF=0 ;;
        --no-profile) PROFILE=0 ;;
        --cpu) PLATFORM=cpu; HF_DEVICE=cpu; SCALE=6 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done
BUDGET=${BUDGET:-$((480 * SCALE))}
for v in "$BATCH" "$ENC" "$DEC" "$STEPS" "$NEW" "$PEAK" "$BUDGET"; do
    [[ "$v" =~ ^[0-9]+$ ]] || die "'$v' is not a whole number"
done
[ -n "$PRESETS" ] || die "--presets is empty"

if [ "$PREPARE" = 1 ]; then
    exec "$PY" scripts/device_wheels.py prepare --dir "$WHEELS"
fi

mkdir -p "$OUTDIR"
RESULTS=$OUTDIR/gpu_check.jsonl
LOG=$OUTDIR/gpu_check.log
: >"$LOG"
say() { echo "$*" | tee -a "$LOG"; }
START=$SECONDS

SITE=${SITE:-$(mktemp -d /tmp/t5gemma2_site.XXXXXX)}
if [ "$INSTALL" = 1 ]; then
    "$PY" scripts/device_wheels.py install --dir "$WHEELS" --target "$SITE" 2>&1 | tee -a "$LOG" \
        || die "the wheels of $WHEELS did not install (see $LOG)"
    export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

if [ "$PLATFORM" = gpu ] && ! "$PY" -c 'import jax, sys; sys.exit(0 if jax.devices()[0].platform == "gpu" else 1)' 2>/dev/null; then
    die "JAX sees no GPU (run it on a GPU machine whose jax has the CUDA plugin)"
fi
"$PY" scripts/device_wheels.py check >>"$LOG" 2>&1 || die "unmet requirements (see $LOG)"
"$PY" -c 'import t5gemma2_jax' >>"$LOG" 2>&1 || die "t5gemma2_jax does not import (see $LOG)"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c 'import sys, jax; print("python", sys.version.split()[0], "| jax", jax.__version__, jax.devices()[0].device_kind)'
} 2>&1 | tee -a "$LOG"

# The transformers side runs only where the image's transformers has the model and torch sees CUDA.
HF_SKIP=""
if [ "$HF" = 0 ]; then
    HF_SKIP="--no-hf given"
else
    HF_SKIP=$("$PY" - "$HF_DEVICE" <<'EOF' 2>>"$LOG"
import importlib.metadata as m
import sys
try:
    import torch
    import transformers
except ImportError as e:
    print(f"torch or transformers does not import: {e}")
else:
    if not hasattr(transformers, "T5Gemma2ForConditionalGeneration"):
        print(f"transformers {m.version('transformers')} has no T5Gemma2ForConditionalGeneration")
    elif sys.argv[1] == "cuda" and not torch.cuda.is_available():
        print(f"torch {torch.__version__} sees no CUDA device")
EOF
)
fi
[ -n "$HF_SKIP" ] && say "transformers side skipped: $HF_SKIP"

SHAPE="--batch $BATCH --encoder-length $ENC --decoder-length $DEC --dtype bfloat16 --steps $STEPS --new-tokens $NEW"
# A line for a part that did not produce its own: the shape's keys, so --summarize files it.
record() {  # preset, field, message
    "$PY" -c 'import json, sys; p, k, v, b, s, t = sys.argv[1:7]
print(json.dumps({"preset": p, "batch": int(b), "encoder_length": int(s), "decoder_length": int(t),
                  "dtype": "bfloat16", k: v, "part": sys.argv[7]}))' "$1" "$2" "$3" "$BATCH" "$ENC" "$DEC" "${4:-}" >>"$RESULTS"
}
part() {  # preset, name, limit seconds, command...
    local preset=$1 name=$2 limit=$(($3 * SCALE)); shift 3
    local left=$((BUDGET - (SECONDS - START)))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        say "== $preset $name: skipped, the budget is spent"; record "$preset" error "skipped: budget spent" "$name"; return
    fi
    say "== $preset $name (at most ${limit}s)"
    local t0=$SECONDS rc=0
    PYTHONUNBUFFERED=1 timeout "$limit" "$@" >>"$LOG" 2>&1 || rc=$?
    if [ "$rc" != 0 ]; then
        local why="exit $rc"; [ "$rc" = 124 ] && why="timed out after ${limit}s"
        say "   failed: $why (the log has its output)"; record "$preset" error "$why" "$name"
    else
        say "   done in $((SECONDS - t0))s"
    fi
}

for preset in $PRESETS; do
    prof=(); [ "$PROFILE" = 1 ] && prof=(--profile "$OUTDIR/profile_$preset.txt")
    part "$preset" "jax train" 150 "$PY" scripts/benchmark.py --preset "$preset" $SHAPE --what train \
        --peak-matmul "$PEAK" ${prof[@]+"${prof[@]}"} --json "$RESULTS"
    if [ -z "$HF_SKIP" ]; then
        JAX_PLATFORMS=cpu part "$preset" "transformers train,generate" 150 "$PY" scripts/benchmark.py \
            --preset "$preset" $SHAPE --framework hf --hf-device "$HF_DEVICE" --what train,generate --json "$RESULTS"
    else
        record "$preset" hf_skipped "$HF_SKIP" transformers
    fi
    part "$preset" "jax generate" 100 "$PY" scripts/benchmark.py --preset "$preset" $SHAPE --what generate \
        --json "$RESULTS"
done
say "== summary ($((SECONDS - START))s in all)"
"$PY" scripts/benchmark.py --summarize "$RESULTS" 2>&1 | tee -a "$LOG"
say "results: $RESULTS, log: $LOG"
