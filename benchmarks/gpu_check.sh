#!/usr/bin/env bash
# One-shot check of a single GPU in at most ~8 minutes: the figures the CPU cannot give.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]
#
# OUT_DIR defaults to $OUT, else outputs/gpu_check. Each piece writes OUT_DIR/<piece>.json as soon as it
# ends (a run cut short keeps what finished); a piece that fails or runs out of time writes
# OUT_DIR/<piece>.failed.json and is named on stderr; the remaining pieces still run; at the end
# OUT_DIR/gpu_check.json gathers everything and the exit status is 1 if any piece failed.
# Pieces (python -m benchmarks.gpu_check <subcommand>; see that module):
#   env          GPU, versions, the peak bf16 TFLOP/s assumed for MFU
#   train_step   BiFlowNet base, 32^3 x 8 latents, 256^2 X-rays, bf16: step time, TFLOP/s, MFU, memory (batch 1, 2, 4)
#   prepare      a tiny prepared set with synthetic latents for the next two pieces
#   ddp          torchrun --nproc_per_node=1 -m train.train_BiFlowNet ... trainer=ddp trainer.devices=1, 20 steps
#   fsdp         the same with trainer=fsdp, 5 steps
#   codec        8x autoencoder encode + sliding decode of 256^3 and 512^3: seconds, peak memory
#   generate     one 256^3 CT with 25 and 50 DDIM steps: seconds, peak memory
# --dry-run runs the same pieces on the CPU with the tiny presets (a check of the plumbing, not of speed).
# Environment: PYTHON (default .venv/bin/python, else python3), GPU_CHECK_BUDGET_S (default 470 s in all),
# GPU_BUNDLE (default .gpu_bundle: the wheels `python -m benchmarks.gpu_bundle` writes for a machine whose image
# lacks the project's libraries; installed into $TMPDIR before the pieces run).
set -euo pipefail

cd "$(dirname "$0")/.."
dry=()
out=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry=(--dry-run) ;;
        -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
        -*) echo "gpu_check.sh: error: unknown option $arg (expected --dry-run and/or an output folder)" >&2; exit 2 ;;
        *) out="$arg" ;;
    esac
done
out="${out:-${OUT:-outputs/gpu_check}}"
if [[ -n "${PYTHON:-}" ]]; then
    python="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
    python=.venv/bin/python
else
    python=python3
fi
budget="${GPU_CHECK_BUDGET_S:-470}"
mkdir -p "$out"
start=$SECONDS
failed=()

# A package bundle (python -m benchmarks.gpu_bundle) for a machine whose image lacks the project's libraries:
# its wheels go into a temporary folder once (reinstalled when bundle.json changes), and onto PYTHONPATH.
bundle="${GPU_BUNDLE:-.gpu_bundle}"
if [[ -d "$bundle/wheels" ]]; then
    site="${TMPDIR:-/tmp}/xray2ct-gpu-site"
    if ! cmp -s "$bundle/bundle.json" "$site/.bundle.json"; then
        echo "== installing the package bundle $bundle into $site"
        rm -rf "$site"
        if ! "$python" -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check \
            --target "$site" "$bundle"/wheels/*.whl; then
            echo "gpu_check.sh: error: the wheels of $bundle did not install with $python (message above)" >&2
            exit 2
        fi
        cp "$bundle/bundle.json" "$site/.bundle.json"
    fi
    export PYTHONPATH="$site:$(cd "$bundle" && pwd)/src${PYTHONPATH:+:$PYTHONPATH}"
fi
# Every piece needs these: refuse at once, naming what is missing, rather than fail each piece in turn.
if ! missing=$("$python" -c '
import importlib, sys
need = ("torch", "lightning", "hydra", "omegaconf", "torchio", "monai", "nibabel", "timm", "einops",
        "diffdrr.renderers")
gone = []
for name in need:
    try:
        importlib.import_module(name)
    except Exception as e:
        gone.append(f"{name} ({type(e).__name__}: {e})")
print("; ".join(gone))
sys.exit(1 if gone else 0)
' 2>/dev/null); then
    echo "gpu_check.sh: error: $python cannot import ${missing:-every required library}; expected the project's" \
        "environment, or a package bundle in ${bundle} (build one where pip reaches an index:" \
        "python -m benchmarks.gpu_bundle --python-version X.Y, then carry .gpu_bundle)" >&2
    exit 2
fi

record_failure() {  # record_failure PIECE REASON
    printf '{"piece": "%s", "status": "failed", "reason": "%s"}\n' "$1" "$2" >"$out/$1.failed.json"
    failed+=("$1")
    echo "gpu_check: FAILED: $1: $2" >&2
}

piece() {  # piece NAME LIMIT_S SUBCOMMAND [ARGS...]
    local name=$1 limit=$2
    shift 2
    rm -f "$out/$name.json" "$out/$name.failed.json"
    local left=$((budget - (SECONDS - start)))
    if ((left < 15)); then
        record_failure "$name" "not run: the ${budget} s budget is spent"
        return 0
    fi
    ((limit > left)) && limit=$left
    echo "== $name (at most ${limit} s)"
    local rc=0
    timeout --kill-after=10 "$limit" "$python" -m benchmarks.gpu_check "$@" --out "$out" ${dry[@]+"${dry[@]}"} || rc=$?
    if ((rc == 124 || rc == 137)); then
        record_failure "$name" "timed out after ${limit} s"
    elif ((rc != 0)); then
        record_failure "$name" "exit status $rc (message above)"
    elif [[ ! -s "$out/$name.json" ]]; then
        record_failure "$name" "exit status 0 but no $name.json"
    fi
    return 0
}

piece env 60 env
piece train_step 120 train-step
piece prepare 90 prepare
if [[ -s "$out/prepare.json" ]]; then
    piece ddp 120 train-run --trainer ddp --steps 20
    piece fsdp 90 train-run --trainer fsdp --steps 5
else
    record_failure ddp "not run: the prepare piece failed"
    record_failure fsdp "not run: the prepare piece failed"
fi
piece codec 90 codec
piece generate 90 generate

echo "== summary ($((SECONDS - start)) s)"
"$python" -m benchmarks.gpu_check summary --out "$out" ${dry[@]+"${dry[@]}"}
