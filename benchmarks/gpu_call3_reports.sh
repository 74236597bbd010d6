#!/usr/bin/env bash
# GPU call 3 (reports again after the batch_independent fix): the autoattack ensemble on the full test set for the five robust recipes trained in
# call 1 (carried in runs/), torchattacks' AutoAttack beside it on the first 1,000 images of each
# CNN, then gpu_run.sh's throughput and profile stages with whatever time is left.
set -u
cd "$(dirname "$0")/.."
rm -rf .git   # the copy's .git is an older snapshot; provenance comes from ROBUSTKIT_SOURCE_COMMIT
export ROBUSTKIT_DATA="$PWD/.data/mnist" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT" logs
T0=$(date +%s); BUDGET=${BUDGET:-470}
log() { echo "[$(($(date +%s) - T0))s] $*" | tee -a logs/session2.txt; }
left() { echo $((BUDGET - ($(date +%s) - T0))); }
python3 -m pip install -q --no-deps --no-build-isolation -e . > logs/setup2.log 2>&1 || log "pip -e failed"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .data/whl/*.whl \
    >> logs/setup2.log 2>&1 && export PYTHONPATH=/tmp/site
python3 -c "import torch, torchattacks, robustkit.runtime as r; print(torch.__version__, torchattacks.__version__, r.git_commit())" > logs/env2.txt 2>&1
log "$(cat logs/env2.txt | tr '\n' ' ')"
pack() {
    tar czf "$OUT/reports.tgz" reports/*_autoattack 2>/dev/null
    tar czf "$OUT/logs2.tgz" logs runs/*/seed-0/manifest.json runs/*/seed-0/metrics.csv 2>/dev/null
}
one() {
    local name=$1 eps=$2 t0; t0=$(date +%s)
    timeout --kill-after=5 200 python3 -m robustkit run "experiments/$name.toml" --device cuda -q \
        --out "reports/${name}_autoattack" --set 'attacks=[{name="fgsm"},{name="autoattack"}]' \
        --set "evaluate.eps=[0, $eps]" > "logs/aa_run_$name.log" 2>&1
    log "run $name rc=$? in $(($(date +%s) - t0)) s"
    return
    t0=$(date +%s)
    timeout --kill-after=5 $(($(left) - 150)) python3 benchmarks/autoattack_compare.py \
        --checkpoint "runs/$name/seed-0/model-best.safetensors" --eps "$eps" --n 1000 \
        --device cuda --json "logs/aa_compare_$name.json" > "logs/aa_compare_$name.log" 2>&1
    log "compare $name rc=$? in $(($(date +%s) - t0)) s"
}
one mnist_cnn_pgd_at 0.3 & one mnist_cnn_trades 0.3 & one mnist_cnn_fast_at 0.3 &
one mnist_cnn_fast_at_ema 0.3 & one mnist_mlp_pgd_at 0.1 &
wait
pack
pack
log done
