#!/usr/bin/env bash
# GPU call 4, for the two checks a 2-core CPU cannot finish in a session:
#   #17  the full 10k-image AutoAttack-grade ensemble on a robust CNN, timed alone (≤ 60 s);
#   #20  every committed experiment that trains a CNN, run twice with the README's command
#        `robustkit run experiments/NAME.toml -q` in a tree with no runs/ (what a fresh clone
#        has): exit codes, seconds, and whether run 2's results.csv and per_sample.csv equal
#        run 1's byte for byte.
# The device copy of the working tree carries no runs/ (git-ignored), so it is a fresh clone as
# far as `robustkit run` can tell. MNIST travels in .data/mnist (copy ../shared/data/mnist there).
#
#     OUT=/tmp/out bash benchmarks/gpu_call4_fresh.sh     # ~6-8 min on an H200
#
# One line per step in $OUT/summary.txt; reports/ and logs/ come back as $OUT/fresh.tgz.
set -u
cd "$(dirname "$0")/.."
export ROBUSTKIT_DATA="$PWD/.data/mnist" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT" logs/fresh
T0=$(date +%s); BUDGET=${BUDGET:-540}
log() { echo "[$(($(date +%s) - T0))s] $*" | tee -a "$OUT/summary.txt"; }
left() { echo $((BUDGET - ($(date +%s) - T0))); }
pack() { tar czf "$OUT/fresh.tgz" logs/fresh reports 2>/dev/null; }

python3 -m pip install -q --no-deps --no-build-isolation -e . > logs/fresh/setup.log 2>&1 || log "pip -e failed"
log "$(python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())' 2>&1) $(git log -1 --format=%h 2>/dev/null)"
test -d runs && log "runs/ exists: not a fresh tree" || log "no runs/: fresh tree"

# #17: the ensemble alone on the GPU, full test set, the released PGD-AT weights.
t=$(date +%s)
timeout --kill-after=5 150 robustkit attack --model reports/mnist_cnn_pgd_at/model.safetensors \
    --attack autoattack --eps 0.3 --device cuda --batch-size 10000 -q --json \
    --out /tmp/ensemble_alone > logs/fresh/ensemble_alone.json 2> logs/fresh/ensemble_alone.log
log "#17 ensemble alone, 10k images, eps 0.3: rc=$? in $(($(date +%s) - t)) s"
cp /tmp/ensemble_alone/timings.csv logs/fresh/ensemble_alone_timings.csv 2>/dev/null
pack

# #20: the README's command, twice per experiment, cheapest first.
for name in mnist_cnn mnist_cnn_eot mnist_cnn_fast_at mnist_cnn_fast_at_ema mnist_cnn_trades \
            mnist_cnn_pgd_at mnist_cnn_pgd_at_eot; do
    for run in 1 2; do
        if [ "$(left)" -lt 20 ]; then log "$name run $run: skipped, budget spent"; continue; fi
        t=$(date +%s)
        timeout --kill-after=5 "$(left)" robustkit run "experiments/$name.toml" -q \
            > "logs/fresh/${name}_$run.log" 2>&1
        rc=$?
        mkdir -p "logs/fresh/$name/$run"
        cp "reports/$name/results.csv" "reports/$name/per_sample.csv" "logs/fresh/$name/$run/" 2>/dev/null
        log "$name run $run: exit $rc in $(($(date +%s) - t)) s"
    done
    if cmp -s "logs/fresh/$name/1/results.csv" "logs/fresh/$name/2/results.csv" \
        && cmp -s "logs/fresh/$name/1/per_sample.csv" "logs/fresh/$name/2/per_sample.csv"; then
        log "$name: run 2 == run 1 byte for byte"
    else
        log "$name: run 2 DIFFERS from run 1 (or a run is missing)"
    fi
    pack
done
log done
