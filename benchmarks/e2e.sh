#!/usr/bin/env bash
# tune-app end to end on this machine: run (8 trials, ASHA) -> export -> predict -> evaluate, with logs in $OUT.
# Fails if a command fails or a trial worker aborted ('Fatal Python error'). On the lent GPU machine
# (benchmarks/README.md), after gpu-bundle's line:   bash benchmarks/e2e.sh
#   CKPT  model folder (default: random-init roberta-large, built by bench.py under /tmp/bench)
#   DATA  labelled csv (default: the bundle's disaster tweets)     N, LIMIT, EPOCHS: trials, rows, epochs
set -uo pipefail
OUT=${OUT:-/tmp/e2e-out}; DATA=${DATA:-.gpu-bundle/data/disaster_tweets_train.csv}
N=${N:-8}; LIMIT=${LIMIT:-1500}; EPOCHS=${EPOCHS:-2}
if [[ -z ${CKPT:-} ]]; then
  CKPT=$(python3 -c "import sys, pathlib; sys.path.insert(0, 'benchmarks'); import bench
print(bench.model_folder('roberta-large', pathlib.Path('/tmp/bench'), '.bench-assets/tokenizer'))" | tail -1) || exit 1
fi
mkdir -p "$OUT"; runs=$(mktemp -d)
cat > "$runs/e2e.yaml" <<EOF
name: e2e
data: {source: $DATA, text: text, label: target, max_length: 128, limit: $LIMIT}
models:
  roberta: {checkpoint: $CKPT, gpu: auto}
space:
  lora_rank: {choice: [8, 16]}
  learning_rate: {loguniform: [1.0e-5, 2.0e-4]}
  batch_size: {choice: [8, 16]}
  target_modules: {choice: [attention_qv, all_linear]}
train: {epochs: $EPOCHS}
tune: {num_samples: $N, n_startup_trials: 2, asha: {grace_period: 1, reduction_factor: 2}}
output_dir: $runs
wandb: {mode: disabled}
EOF
step() {  # name, command...: time it, keep its log, stop on failure
  local name=$1; shift; local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "$name: exit $rc, $((SECONDS - t0)) s"; tail -n 3 "$OUT/$name.log"
  [[ $rc == 0 ]] || exit "$rc"
}
step run python3 -m tune_app run "$runs/e2e.yaml"
run_dir=$(ls -d "$runs"/e2e-*/)
step predict python3 -m tune_app predict "$run_dir/best" --text "Forest fire near La Ronge" --text "I love fruits"
step evaluate python3 -m tune_app evaluate "$run_dir/best" --data "$DATA" --json-out "$OUT/evaluate.json"
cp "$run_dir/report.md" "$run_dir/trials.csv" "$OUT/"
aborts=$(grep -c "Fatal Python error" "$OUT/run.log")
echo "trial workers that aborted: $aborts"
[[ $aborts == 0 ]]
