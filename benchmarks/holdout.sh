#!/usr/bin/env bash
# Does the study's winner score on tweets no part of the study saw what its validation score says? With and
# without tune.confirm. Holds out 1,000 of the shared tweets (stratified, seed 2026), runs the quickstart study
# on the other 6,613 with confirmation on (the search's winner is in summary.json as search_best, so one run
# gives both), then scores on the held-out tweets the search's winner and each seed of the confirmed winner.
#   bash benchmarks/holdout.sh [WORKDIR] [TOP] [SEEDS]      (about 55 minutes on 2 CPU cores with 2 and 3)
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-/tmp/tune-app-holdout}" top="${2:-2}" seeds="${3:-3}"
mkdir -p "$work"
export HF_HUB_OFFLINE=1
python - "$work" <<'PY'
import sys

import pandas as pd
from sklearn.model_selection import train_test_split

tweets = pd.read_csv("../shared/data/disaster_tweets/train.csv")
study, held_out = train_test_split(tweets, test_size=1000, random_state=2026, stratify=tweets["target"])
study.to_csv(f"{sys.argv[1]}/study.csv", index=False)
held_out.to_csv(f"{sys.argv[1]}/holdout.csv", index=False)
PY
start=$(date +%s)
tune-app run search_spaces/minilm_quickstart.yaml data.source="$work/study.csv" output_dir="$work/runs" \
    "tune.confirm={top: $top, seeds: $seeds}" | tee "$work/run.log"
echo "study with confirmation: $(( $(date +%s) - start )) s (the log's lines give the search's share)"
run=$(ls -d "$work"/runs/minilm-quickstart-* | tail -1)
python - "$run" > "$work/targets.txt" <<'PY'
import json
import sys

summary = json.load(open(f"{sys.argv[1]}/summary.json"))
entry = summary["confirmation"]["models"]["minilm"]
print("search-winner", summary["search_best"]["trial_id"])
for c in entry["configurations"]:
    if c["search_trial"] == entry["winner"]:
        for trial, seed in zip(c["trials"], c["seeds"]):
            print(f"confirmed-seed-{seed}", trial)
PY
while read -r name trial; do
    [ -d "$work/bundle-$name" ] || tune-app export "$run" --trial "$trial" --out "$work/bundle-$name" > /dev/null
    tune-app evaluate "$work/bundle-$name" --data "$work/holdout.csv" --json-out "$work/eval-$name.json" > /dev/null
    python - "$work/eval-$name.json" "$name" "$trial" <<'PY'
import json
import sys

report = json.load(open(sys.argv[1]))
argmax = report.get("tuned_argmax", report["tuned"])
print(f"{sys.argv[2]} (trial {sys.argv[3]}): held-out F1 {argmax['f1']:.4f} (argmax, as validation is scored), "
      f"{report['tuned']['f1']:.4f} at the bundle's threshold")
PY
done < "$work/targets.txt"
