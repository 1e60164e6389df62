#!/usr/bin/env bash
# Issue #14's GPU measurements in one go, for a session lent an H200 (no network there).
#
# Sections, in priority order (each bounded; what a section measured is kept if it is stopped):
#   vit           ViT-B/16, 224 px, 100 classes, batch 256, bf16: floor, full, linear, ssf, lora, vpt, bitfit,
#                 mask_tuning, hst, lst, unipt, sara (hst again at batch 64, beside full, if it fails at 256)
#   unet          SD 1.5's full UNet (built from its config by petl_vision/bench/unet_workload.py, no hub),
#                 64x64 latents (512 px), batch 4, bf16: full, lora, sara, spm; inference as trained vs
#                 merged gives SPM's live membranes (strengths set as transport sets them) vs merged, and
#                 SaRA unmerged vs merged
#   unet_compile  --compile, inference only: spm live vs merged
#   vit_compile   --compile: full, ssf, lora
# Results: $OUT/summary.md (every table and issue #14's targets met or missed), $OUT/<section>.json,
# $OUT/vit.png, $OUT/log.txt (at most 8 files: what the device tool brings back).
#
# Beforehand, on a machine with network, in the repository root (the wheels travel with the tree):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 \
#       --platform any -d .whl diffusers==0.42.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 importlib_metadata==10.2.0
# then: run(command="bash scripts/gpu_benchmark.sh", carry=[".whl"], timeout_s=400) (BUDGET_S 300 plus the install).
#
# Environment:
#   BUDGET_S   seconds for all sections (default 300); a section starts only with 20 s left and is
#              stopped at the budget. About 2 min for vit and 1.5 min for unet are estimates, not yet
#              measured; rerun a section alone with SECTIONS=... and a budget of its own.
#   SECTIONS   default "vit unet unet_compile vit_compile"
#   TINY=1     dry run on the CPU with tiny models, 1 step, the aot_eager compile backend, methods
#              measured in one process (tests/test_bench_gpu_script.py runs it)
#   OUT        output folder (the device tool sets it; default runs/gpu_benchmark)
#   PYTHON     default python3
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_benchmark}
PYTHON=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-300}
SECTIONS=${SECTIONS:-vit unet unet_compile vit_compile}
TINY=${TINY:-0}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_benchmark.XXXXXX")
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: > "$LOG"

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >> "$LOG" 2>&1 \
        && export PYTHONPATH=/tmp/site:$PWD || { echo "pip install of .whl/ failed (see $LOG)"; exit 1; }
else
    echo "no .whl/*.whl: using the installed packages" | tee -a "$LOG"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
{ date -u; nvidia-smi 2>/dev/null | head -15; "$PYTHON" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"; } >> "$LOG" 2>&1

VIT_METHODS=${VIT_METHODS:-floor,full,linear,ssf,lora,vpt,bitfit,mask_tuning,hst,lst,unipt,sara}
if [ "$TINY" = 1 ]; then
    VIT=(--model vit_base_patch16_224 --model-kwargs '{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2}'
         --num-classes 5 --batch-size 2 --device cpu --steps 1 --warmup 0 --in-process)
    VIT_B64=(--batch-size 2)
    UNET=(--model tiny-unet --batch-size 2 --device cpu --steps 1 --warmup 0 --in-process)
    COMPILE=(--compile --compile-backend aot_eager)
else
    VIT=(--model vit_base_patch16_224 --num-classes 100 --batch-size 256 --device cuda --steps 8 --warmup 3 --max-warmup 15
         --method-timeout 60)
    VIT_B64=(--batch-size 64)
    UNET=(--model sd15-unet --batch-size 4 --device cuda --steps 5 --warmup 2 --max-warmup 10 --method-timeout 90)
    COMPILE=(--compile --method-timeout 150)
fi
COMMON=(--mixed-precision bf16)
UNET+=(--import petl_vision.bench.unet_workload --workload diffusers-unet)

# run SECTION CAP_S ARGS...: benchmark.py into $WORK/SECTION, at most CAP_S seconds and what the budget leaves.
run() {
    local name=$1 cap=$2; shift 2
    [ "$TINY" = 1 ] && cap=$((cap * 4))  # a shared CPU is slower than the H200 the caps are set for
    local left=$((BUDGET_S - SECONDS))
    [ "$left" -lt "$cap" ] && cap=$left
    if [ "$cap" -lt 20 ]; then
        echo "== $name: skipped, ${left}s of BUDGET_S=${BUDGET_S}s left" | tee -a "$LOG"
        return 1
    fi
    echo "== $name (at most ${cap}s): benchmark.py $*" | tee -a "$LOG"
    timeout -k 10 "$cap" "$PYTHON" scripts/benchmark.py "$@" --out-dir "$WORK/$name" >> "$LOG" 2>&1
    echo "== $name: exit $? after $SECONDS s in all" | tee -a "$LOG"
    [ -f "$WORK/$name/benchmark.json" ] && cp "$WORK/$name/benchmark.json" "$OUT/$name.json"
    summarize
}

# summary.md: the tables measured so far and issue #14's targets.
summarize() {
    {
        echo "# GPU benchmark ($(date -u +%F), TINY=$TINY)"
        for f in "$WORK"/*/benchmark.md; do
            [ -f "$f" ] || continue
            echo; echo "## $(basename "$(dirname "$f")")"; echo; cat "$f"
        done
        jsons=("$OUT"/*.json)
        if [ -f "${jsons[0]}" ]; then
            echo; echo "## Issue #14 targets (ratios)"; echo
            "$PYTHON" -m petl_vision.bench.targets "${jsons[@]}"
        fi
    } > "$OUT/summary.md" 2>> "$LOG"
}

for section in $SECTIONS; do
    case $section in
        vit)
            run vit 150 "${VIT[@]}" "${COMMON[@]}" --methods "$VIT_METHODS"
            [ -f "$WORK/vit/benchmark.png" ] && cp "$WORK/vit/benchmark.png" "$OUT/vit.png"
            if [ -f "$OUT/vit.json" ] && "$PYTHON" -c "import json, sys; r = json.load(open(sys.argv[1])); \
sys.exit(0 if any(m['method'] == 'hst' and m['error'] for m in r['methods']) else 1)" "$OUT/vit.json"; then
                run vit_b64 60 "${VIT[@]}" "${COMMON[@]}" "${VIT_B64[@]}" --methods floor,full,hst
            fi
            ;;
        unet)
            run unet 100 "${UNET[@]}" "${COMMON[@]}" --methods full,lora,sara,spm --method-arg lora.train_head=false ;;
        unet_compile)
            run unet_compile 150 "${UNET[@]}" "${COMMON[@]}" "${COMPILE[@]}" --infer-only --methods spm ;;
        vit_compile)
            run vit_compile 200 "${VIT[@]}" "${COMMON[@]}" "${COMPILE[@]}" --methods full,ssf,lora ;;
        *)
            echo "unknown section $section (known: vit unet unet_compile vit_compile)" | tee -a "$LOG" ;;
    esac
done
summarize
rm -rf "$WORK"
echo "done in $SECONDS s; results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
