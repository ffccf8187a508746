#!/usr/bin/env bash
# One prepared GPU check, sized for a short device lease (about 15 minutes in all, so this
# script targets under 8 minutes on one GPU and leaves room for a rerun).
#
# Why one script: a GPU is lent to some sessions only and briefly; everything worth checking on
# CUDA is prepared here so that a lease is spent measuring, not typing. `--cpu` runs the same
# steps at CPU sizes so the script is exercised without a GPU and cannot rot.
#
#   bash benchmarks/gpu_check.sh [--cpu] [OUT_DIR]
#
# OUT_DIR defaults to $OUT (the device tool's result folder) or benchmarks/results/gpu_check.
# It installs nothing: run it where the README's install command has already been run (or in
# the repository with pdd_ray importable). Steps, each timed into OUT_DIR/summary.txt:
#   env      torch / CUDA / Ray facts
#   tests    the CUDA-only tests (skipped, and reported as such, on --cpu)
#   speed    benchmarks/speed.py --anchors-only: the official step and all three unroll modes, K = 1..8, peak max_memory_allocated
#            on CUDA (on --cpu the --quick subset, since the CIFAR anchors take minutes on a CPU)
#   stage    one short CIFAR-shaped PDD stage (random images in CIFAR-10's on-disk format, 3x32x32)
#            with 2 Ray Train workers sharing the GPU (distill.gpus_per_worker=0.5)
# At most 8 files are written to OUT_DIR (the device tool returns no more).
#
# Without Ray (the lent GPU machine has PyTorch but no Ray or MLflow, and Ray's wheel is larger
# than what may travel to it), the Ray-free steps still run: env, the CUDA tests of modules that
# need no Ray, and speed; the stage step is reported as skipped, not as passed.
set -uo pipefail

CPU=0
if [[ "${1:-}" == "--cpu" ]]; then CPU=1; shift; fi
OUT_DIR=${1:-${OUT:-benchmarks/results/gpu_check}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d -t pdd_gpu_check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
: > "$OUT_DIR/summary.txt"
status=0

step() {  # step NAME COMMAND...: run, log to OUT_DIR/NAME.log, record rc and seconds
    local name=$1; shift
    local t0=$SECONDS
    echo "== $name: $*"
    "$@" > "$OUT_DIR/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $((SECONDS - t0)) s" | tee -a "$OUT_DIR/summary.txt"
    tail -n 3 "$OUT_DIR/$name.log"
    [[ $rc == 0 ]] || status=1
}

step env "$PY" - <<'EOF'
import os, platform, torch
try:
    import ray
    ray_version = ray.__version__
except ImportError:
    ray_version = "not installed"
print("python", platform.python_version(), "| torch", torch.__version__, "| ray", ray_version)
print("cuda available:", torch.cuda.is_available(), "| cpus:", os.cpu_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", p.name, f"{p.total_memory / 1024**3:.1f} GiB", "| capability", torch.cuda.get_device_capability(0))
EOF

HAVE_RAY=1
"$PY" -c "import ray, mlflow" 2>/dev/null || HAVE_RAY=0

# the tests that skip without CUDA: name them by their skip reason, so a new one is picked up
# (without Ray, only the modules that import none: collecting the others would fail)
if [[ $HAVE_RAY == 1 ]]; then
    step tests "$PY" -m pytest -q -rs -p no:cacheprovider tests -k "gpu or cuda"
else
    step tests "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_augment.py -k "gpu or cuda"
fi

if [[ $CPU == 1 ]]; then
    step speed "$PY" benchmarks/speed.py --quick --threads 2 --out "$OUT_DIR/speed.json"
    GPU_ARGS=(distill.use_gpu=false experts.gpus=0 evaluation.gpus_per_run=0)
    SIZE=(experts.num_experts=2 experts.epochs=3 distill.max_start_epoch=1 distill.expert_epochs=1
          distill.iterations=3 distill.syn_steps=5 distill.eval_epochs=3
          distill.transition_syn_epochs=3 evaluation.epochs_per_stage=3 evaluation.full_epochs=3 model.width=16)
else
    step speed "$PY" benchmarks/speed.py --anchors-only --unrolls official,full,checkpoint,tesla --ks 1,2,4,8 --out "$OUT_DIR/speed.json"
    GPU_ARGS=(distill.use_gpu=true distill.gpus_per_worker=0.5 experts.gpus=0.5 evaluation.gpus_per_run=0.5)
    SIZE=(experts.num_experts=4 experts.epochs=8 distill.max_start_epoch=4 distill.iterations=40 distill.syn_steps=20
          distill.eval_epochs=100 evaluation.epochs_per_stage=100 evaluation.full_epochs=20)
fi

if [[ $HAVE_RAY == 0 ]]; then
    echo "stage skipped: Ray or MLflow not importable here" | tee -a "$OUT_DIR/summary.txt"
    echo "gpu_check: $([[ $status == 0 ]] && echo "Ray-free steps passed, stage skipped" || echo some steps FAILED) (summary: $OUT_DIR/summary.txt)"
    exit $status
fi

# CIFAR-10's own on-disk format, random images (the test suite's fake writer): 500 train, 100 test
step data "$PY" -c "import sys; sys.path.insert(0, 'tests'); from fakes import write_fake_cifar10; \
print(write_fake_cifar10('$WORK/data', n_per_batch=100, n_test=100))"

step stage pdd-ray run cifar10_ipc10 "data.root=$WORK/data" "storage=$WORK/runs" \
    distill.num_stages=1 distill.ipc_per_stage=2 distill.num_workers=2 distill.cpus_per_worker=1 \
    distill.eval_every=20 distill.eval_runs=2 distill.checkpoint_every=20 data.zca=false \
    evaluation.runs=2 "evaluation.archs=[convnet]" \
    tracking.enabled=false "${GPU_ARGS[@]}" "${SIZE[@]}"
find "$WORK/runs" -name results.json -exec cp {} "$OUT_DIR/stage_results.json" \; 2>/dev/null

echo "gpu_check: $([[ $status == 0 ]] && echo all steps passed || echo some steps FAILED) (summary: $OUT_DIR/summary.txt)"
exit $status
