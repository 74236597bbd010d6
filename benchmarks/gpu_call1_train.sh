#!/usr/bin/env bash
# GPU call 1: train the committed robust recipes on CUDA (PGD-AT alone first, timed; then the
# other four at once), each through `robustkit run` with a cheap FGSM evaluation so the checkpoint
# lands where `robustkit run` looks for it (runs/NAME/seed-0).
set -u
cd "$(dirname "$0")/.."
export ROBUSTKIT_DATA="$PWD/.data/mnist" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT" logs
T0=$(date +%s)
log() { echo "[$(($(date +%s) - T0))s] $*" | tee -a logs/session.txt; }
python3 -m pip install -q --no-deps --no-build-isolation -e . > logs/setup.log 2>&1 || log "pip -e failed"
{ nvidia-smi; python3 -c "import torch, robustkit; print(torch.__version__, robustkit.__file__, torch.cuda.get_device_name())"; git log -1 --format=%H; } > logs/env.txt 2>&1
log "$(tail -2 logs/env.txt | tr '\n' ' ')"
quick() {  # train NAME via robustkit run, FGSM-only evaluation
    local name=$1 eps=$2 t0; t0=$(date +%s)
    timeout --kill-after=5 "$3" python3 -m robustkit run "experiments/$name.toml" --device cuda -q \
        --out "/tmp/quick/$name" --set 'attacks=[{name="fgsm"}]' --set "evaluate.eps=[0, $eps]" \
        > "logs/train_$name.log" 2>&1
    log "run $name rc=$? in $(($(date +%s) - t0)) s"
}
quick mnist_cnn_pgd_at 0.3 200
pack() { tar czf "$OUT/runs.tgz" runs logs /tmp/quick 2>/dev/null; }
pack
quick mnist_cnn_trades 0.3 170 & quick mnist_cnn_fast_at 0.3 170 &
quick mnist_cnn_fast_at_ema 0.3 170 & quick mnist_mlp_pgd_at 0.1 170 &
wait
pack
pack
log done
