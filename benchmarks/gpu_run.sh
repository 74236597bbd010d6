#!/usr/bin/env bash
# The prepared GPU run of issue #17: one unattended script, CPU and CUDA figures from the same
# machine. Run from the repository root after `pip install --no-deps --no-build-isolation -e .`:
#
#     OUT=/some/dir bash benchmarks/gpu_run.sh                 # every stage, ~3-5 min, at most ~8
#     GPU_RUN_SMOKE=1 OUT=/tmp/x bash benchmarks/gpu_run.sh    # tiny sizes on a CPU: a dry run
#
# or source it and call single stages (each prints and logs its own wall time):
#
#     source benchmarks/gpu_run.sh; gpu_run_env; gpu_run_throughput; gpu_run_train; gpu_run_eval
#
# Stages (each under its own `timeout`, output appended to "$OUT/<stage>.log" as it goes, so a
# stage that is killed still leaves what it printed; one line per stage in "$OUT/summary.txt"):
#   env         nvidia-smi, versions, git commit                                (cap  40 s)
#   throughput  device_throughput.py: CPU and CUDA PGD/APGD image-steps/s per batch and
#               option, % of measured peak, PGD-AT s/epoch       -> throughput.json (cap 150 s)
#   train       robustkit train experiments/mnist_cnn_pgd_at.toml --device cuda, 12 epochs,
#               timed; metrics.csv (per-epoch test clean acc, val robust acc)   (cap 200 s)
#               (if it fails before its first epoch: again with ROBUSTKIT_CUDA_GRAPHS=0)
#   eval        full 10k test set, APGD-100x2 CE + margin at eps 0.3 on the model just
#               trained: clean and robust test accuracy, seconds -> eval.json   (cap 120 s)
#   profile     torch.profiler tables: one PGD / APGD step, one PGD-AT step     (cap  75 s)
#   eval_released  the same evaluation on reports/mnist_cnn_pgd_at/model.safetensors (the
#               CPU-trained model, when released in the tree): GPU vs committed CPU (cap  90 s)
#   compile     torch.compile(mode="reduce-overhead") PGD and PGD-AT timings    (cap  90 s)
# A total budget (GPU_RUN_BUDGET, default 480 s) bounds the sum: each stage's timeout is its cap
# or what is left of the budget, whichever is smaller; a stage with < 10 s left is skipped
# (stages run in the order above, most important first; e.g. GPU_RUN_BUDGET=300 when this
# shares a window with other work).
#
# MNIST: ./.data/mnist inside the tree when it is there (ROBUSTKIT_DATA is set to it), else
# $ROBUSTKIT_DATA as given.

set -u

GPU_RUN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$GPU_RUN_ROOT/gpu_run_out}"
PYTHON="${PYTHON:-python}"
GPU_RUN_SMOKE="${GPU_RUN_SMOKE:-0}"
GPU_RUN_BUDGET="${GPU_RUN_BUDGET:-480}"
GPU_RUN_DEVICE="${GPU_RUN_DEVICE:-cuda}"
if [ "$GPU_RUN_SMOKE" = 1 ]; then GPU_RUN_DEVICE=cpu; fi
if [ -d "$GPU_RUN_ROOT/.data/mnist" ]; then export ROBUSTKIT_DATA="$GPU_RUN_ROOT/.data/mnist"; fi
export PYTHONPATH="$GPU_RUN_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
GPU_RUN_STARTED="${GPU_RUN_STARTED:-$(date +%s)}"

# gpu_run_stage NAME CAP_SECONDS COMMAND...: run COMMAND under timeout, tee into $OUT/NAME.log
gpu_run_stage() {
    local name="$1" cap="$2"
    shift 2
    local now left limit start rc seconds
    now=$(date +%s)
    left=$((GPU_RUN_BUDGET - (now - GPU_RUN_STARTED)))
    limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 10 ]; then
        echo "stage $name: skipped, ${left}s of the ${GPU_RUN_BUDGET}s budget left" \
            | tee -a "$OUT/summary.txt"
        return 0
    fi
    echo "=== stage $name (timeout ${limit}s) $(date -u +%H:%M:%S)" | tee -a "$OUT/$name.log"
    start=$(date +%s%N)
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    seconds=$((($(date +%s%N) - start) / 1000000))
    seconds="$((seconds / 1000)).$(printf %03d $((seconds % 1000)))"
    local what="rc=$rc"
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then what="TIMED OUT after ${limit}s (rc=$rc)"; fi
    echo "stage $name: $what, wall ${seconds} s" | tee -a "$OUT/$name.log" "$OUT/summary.txt"
    return 0
}

gpu_run_env() {
    gpu_run_stage env 40 bash -c '
        nvidia-smi || echo "nvidia-smi: not available"
        nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv \
            2>/dev/null || true
        getconf _NPROCESSORS_ONLN; free -g 2>/dev/null | head -2
        "'"$PYTHON"'" -c "import torch, robustkit; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available(), \"robustkit\", robustkit.__file__)"
        git -C "'"$GPU_RUN_ROOT"'" log -1 --format="commit %H %s" 2>/dev/null || true
        echo "ROBUSTKIT_DATA=${ROBUSTKIT_DATA:-unset}"; ls "${ROBUSTKIT_DATA:-/nonexistent}" 2>&1'
}

gpu_run_throughput() {
    local smoke=()
    if [ "$GPU_RUN_SMOKE" = 1 ]; then smoke=(--smoke --threads 1); fi
    gpu_run_stage throughput 150 "$PYTHON" "$GPU_RUN_ROOT/benchmarks/device_throughput.py" \
        "${smoke[@]}" --json "$OUT/throughput.json"
}

gpu_run_train() {
    local sets=()
    if [ "$GPU_RUN_SMOKE" = 1 ]; then  # 256 training images, one epoch, the fast mlp
        sets=(--set data.val_size=59744 --set train.epochs=1 --set train.adversarial.warmup_epochs=0
              --set train.adversarial.val_n=32 --set train.adversarial.val_steps=2
              --set model.arch=mlp)
    fi
    gpu_run_stage train 200 "$PYTHON" -m robustkit train \
        "$GPU_RUN_ROOT/experiments/mnist_cnn_pgd_at.toml" --device "$GPU_RUN_DEVICE" \
        --out "$OUT/train_pgd_at" --fresh -q "${sets[@]}"
    if [ ! -f "$OUT/train_pgd_at/model-best.safetensors" ] \
        && ! grep -q "TIMED OUT" "$OUT/train.log"; then  # it failed early: try without graphs
        ROBUSTKIT_CUDA_GRAPHS=0 gpu_run_stage train_eager 200 "$PYTHON" -m robustkit train \
            "$GPU_RUN_ROOT/experiments/mnist_cnn_pgd_at.toml" --device "$GPU_RUN_DEVICE" \
            --out "$OUT/train_pgd_at" --fresh -q "${sets[@]}"
    fi
    if [ -f "$OUT/train_pgd_at/metrics.csv" ]; then
        cp "$OUT/train_pgd_at/metrics.csv" "$OUT/train_metrics.csv"
        echo "metrics (per epoch; seconds = the epoch's wall time):" >> "$OUT/train.log"
        cat "$OUT/train_pgd_at/metrics.csv" >> "$OUT/train.log"
    fi
}

gpu_run_eval() {
    local model="$OUT/train_pgd_at/model-best.safetensors" extra=()
    if [ "$GPU_RUN_SMOKE" = 1 ]; then extra=(--smoke --threads 1); fi
    if [ ! -f "$model" ]; then
        echo "stage eval: skipped, no $model (the train stage did not finish an epoch)" \
            | tee -a "$OUT/summary.txt"
        return 0
    fi
    gpu_run_stage eval 120 "$PYTHON" "$GPU_RUN_ROOT/benchmarks/device_throughput.py" \
        "${extra[@]}" --evaluate "$model" --json "$OUT/eval.json"
    {
        echo "CPU-trained reference, same evaluation (reports/mnist_cnn_pgd_at_apgd/results.csv):"
        cat "$GPU_RUN_ROOT/reports/mnist_cnn_pgd_at_apgd/results.csv" 2>/dev/null
    } >> "$OUT/eval.log"
}

# The CPU-trained model as released in the report folder (when the tree has it): the same
# evaluation on the GPU, to set beside the committed CPU figures of that very model.
gpu_run_eval_released() {
    local model="$GPU_RUN_ROOT/reports/mnist_cnn_pgd_at/model.safetensors" extra=()
    if [ "$GPU_RUN_SMOKE" = 1 ]; then extra=(--smoke --threads 1); fi
    if [ ! -f "$model" ]; then
        echo "stage eval_released: skipped, no $model in this tree" | tee -a "$OUT/summary.txt"
        return 0
    fi
    gpu_run_stage eval_released 90 "$PYTHON" "$GPU_RUN_ROOT/benchmarks/device_throughput.py" \
        "${extra[@]}" --evaluate "$model" --json "$OUT/eval_released.json"
}

gpu_run_profile() {
    local smoke=()
    if [ "$GPU_RUN_SMOKE" = 1 ]; then smoke=(--smoke --threads 1); fi
    gpu_run_stage profile 75 "$PYTHON" "$GPU_RUN_ROOT/benchmarks/device_throughput.py" \
        "${smoke[@]}" --profile --json "$OUT/profile.json"
}

gpu_run_compile() {
    local smoke=()
    if [ "$GPU_RUN_SMOKE" = 1 ]; then smoke=(--smoke --threads 1); fi
    gpu_run_stage compile 90 "$PYTHON" "$GPU_RUN_ROOT/benchmarks/device_throughput.py" \
        "${smoke[@]}" --compile --json "$OUT/compile.json"
}

gpu_run_all() {
    echo "gpu_run: OUT=$OUT budget ${GPU_RUN_BUDGET}s smoke=$GPU_RUN_SMOKE device=$GPU_RUN_DEVICE" \
        | tee -a "$OUT/summary.txt"
    gpu_run_env
    gpu_run_throughput
    gpu_run_train
    gpu_run_eval
    gpu_run_profile
    gpu_run_eval_released
    gpu_run_compile
    echo "gpu_run: done in $(($(date +%s) - GPU_RUN_STARTED)) s" | tee -a "$OUT/summary.txt"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    gpu_run_all
fi
