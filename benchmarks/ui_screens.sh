#!/usr/bin/env bash
# Screenshots of the MLflow UI as a user meets it after `pdd-ray run`, taken with headless Chromium.
#
#   benchmarks/ui_screens.sh [STORAGE] [OUTDIR]
#
# STORAGE  a run's storage folder (holds mlflow.db); default /tmp/pdd_ray_ui_screens. When it has
#          no mlflow.db yet, a tiny digits run (seconds of work, minutes of Ray start-up on a busy
#          machine) is made there first.
# OUTDIR   where the PNGs go; default benchmarks/results/ui (the README's "Browsing results" shows them).
#
# It starts `pdd-ray ui STORAGE`, opens the URL it prints (the runs page), the parent run, a stage
# run's metrics (with the image slider of the synthetic images) and the parent run's artifacts
# (the accuracy-vs-stage figure), then downsizes each PNG with Pillow. Everything it started (the
# UI with its MLflow server, every Chromium) is stopped on exit, also on Ctrl-C. Needs Debian's
# `chromium` (apt-get install -y chromium) or CHROMIUM=/path/to/chrome.
set -euo pipefail

HERE="$(cd "$(dirname "$0")/.." && pwd)"
STORAGE="${1:-/tmp/pdd_ray_ui_screens}"
OUT="${2:-$HERE/benchmarks/results/ui}"
CHROMIUM="${CHROMIUM:-$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)}"
PYTHON="${PYTHON:-python}"
[ -n "$CHROMIUM" ] || { echo "ui_screens.sh: error: no chromium found (apt-get install -y chromium, or set CHROMIUM=)" >&2; exit 2; }
mkdir -p "$OUT"
WORK="$(mktemp -d)"
UI_PID=""
CHROME_PGIDS=()

cleanup() {
    # the UI stops its own server group on SIGTERM; Chromium runs in groups of its own (setsid)
    if [ -n "$UI_PID" ] && kill -0 "$UI_PID" 2>/dev/null; then
        kill -TERM "$UI_PID" 2>/dev/null || true
        for _ in $(seq 1 300); do kill -0 "$UI_PID" 2>/dev/null || break; sleep 0.1; done
    fi
    for g in "${CHROME_PGIDS[@]}"; do kill -KILL -- "-$g" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

if [ ! -f "$STORAGE/mlflow.db" ]; then
    echo "no mlflow.db in $STORAGE: making a tiny digits run there first" >&2
    (cd "$HERE" && pdd-ray run digits "storage=$STORAGE" name=tiny model.width=8 experts.num_experts=2 \
        experts.epochs=4 experts.batch_size=256 distill.num_stages=2 distill.ipc_per_stage=1 distill.iterations=4 \
        distill.syn_steps=3 distill.expert_epochs=1 distill.max_start_epoch=2 distill.eval_every=2 distill.eval_runs=1 \
        distill.eval_epochs=5 distill.checkpoint_every=2 distill.cpus_per_worker=1 distill.transition_syn_epochs=3 \
        evaluation.runs=2 evaluation.epochs_per_stage=5 evaluation.full_epochs=1 tracking.enabled=true --no-progress)
fi

PORT="$("$PYTHON" -c 'from pdd_ray.ui import free_port; print(free_port())')"
pdd-ray ui "$STORAGE" --port "$PORT" > "$WORK/ui.out" 2> "$WORK/ui.err" &
UI_PID=$!
for _ in $(seq 1 1800); do  # the URL line appears once the server answers
    grep -q "http://" "$WORK/ui.out" 2>/dev/null && break
    kill -0 "$UI_PID" 2>/dev/null || { cat "$WORK/ui.err" >&2; exit 1; }
    sleep 0.2
done
RUNS_URL="$(grep -o 'http://[^ ]*' "$WORK/ui.out" | head -1)"
[ -n "$RUNS_URL" ] || { echo "ui_screens.sh: error: pdd-ray ui printed no URL" >&2; exit 1; }
echo "runs page: $RUNS_URL" >&2

# the parent run (no parent of its own, not a sweep) and its stage 1 run, from the REST API
read -r BASE EXP PARENT STAGE < <("$PYTHON" - "$RUNS_URL" <<'EOF'
import json, sys, urllib.request
url = sys.argv[1]
base, exp = url.split("/#/")[0], url.split("/experiments/")[1].split("/")[0]
req = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", headers={"Content-Type": "application/json"},
                             data=json.dumps({"experiment_ids": [exp], "max_results": 1000}).encode())
runs = json.loads(urllib.request.urlopen(req, timeout=60).read())["runs"]
tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
parents = [r for r, t in tags.items() if "mlflow.parentRunId" not in t and "pdd.kind" not in t and "pdd.sweep" not in t]
parent = parents[0]
stage = next(r for r, t in tags.items() if t.get("mlflow.parentRunId") == parent and t.get("pdd.stage") == "1")
print(base, exp, parent, stage)
EOF
)
Q="workflowType=machine_learning"
declare -A PAGES=(
    [runs_page]="$RUNS_URL"
    [parent_run]="$BASE/#/experiments/$EXP/runs/$PARENT?$Q"
    [stage_metrics]="$BASE/#/experiments/$EXP/runs/$STAGE/model-metrics?$Q"
    [artifacts]="$BASE/#/experiments/$EXP/runs/$PARENT/artifacts/accuracy_vs_stage.png?$Q"
)
# the stage's charts are sorted by name: the synthetic_images chart (the slider) is in the third row
declare -A HEIGHT=([runs_page]=900 [parent_run]=900 [stage_metrics]=1180 [artifacts]=900)
for name in runs_page parent_run stage_metrics artifacts; do
    png="$WORK/$name.png"
    setsid "$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
        --disable-sync --no-first-run --hide-scrollbars --user-data-dir="$WORK/profile-$name" --screenshot="$png" \
        --window-size="1400,${HEIGHT[$name]}" --virtual-time-budget="${VIRTUAL_TIME_MS:-20000}" "${PAGES[$name]}" \
        > "$WORK/chromium-$name.log" 2>&1 &
    cpid=$!
    CHROME_PGIDS+=("$cpid")
    for _ in $(seq 1 "${CHROMIUM_TIMEOUT_S:-180}"); do kill -0 "$cpid" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$cpid" 2>/dev/null || true  # the browser and its helpers, whatever they were doing
    wait "$cpid" 2>/dev/null || true
    [ -s "$png" ] || { echo "ui_screens.sh: error: no screenshot of $name (see chromium's log below)" >&2; tail -5 "$WORK/chromium-$name.log" >&2; exit 1; }
    echo "$name: ${PAGES[$name]}" >&2
done

# small committed PNGs: 1000 px wide, 64-colour palette
"$PYTHON" - "$WORK" "$OUT" <<'EOF'
import sys
from pathlib import Path
from PIL import Image
work, out = Path(sys.argv[1]), Path(sys.argv[2])
for name in ("runs_page", "parent_run", "stage_metrics", "artifacts"):
    im = Image.open(work / f"{name}.png").convert("RGB")
    im = im.resize((1000, round(im.height * 1000 / im.width)), Image.LANCZOS)
    im.quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out / f"{name}.png", optimize=True)
    print(f"{out / (name + '.png')}: {(out / (name + '.png')).stat().st_size // 1024} KB")
EOF
