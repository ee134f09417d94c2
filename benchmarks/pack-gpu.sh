#!/usr/bin/env bash
# Adapter packing on a lent GPU (issue #16's targets), one command per device call, from the project root, after the
# line ../shared/tools/gpu-bundle prints and the once-only steps of benchmarks/README.md ("On a lent GPU machine"):
#   bash benchmarks/pack-gpu.sh tests      the GPU-only tests of packed CUDA graphs, CUDA graphs and the memory cap
#   bash benchmarks/pack-gpu.sh roberta    16 packed roberta-large trials (target: 4,000 samples/s together)
#   bash benchmarks/pack-gpu.sh llama      8 packed llama-7b trials in 24 GiB (target: 300 samples/s together)
#   bash benchmarks/pack-gpu.sh all        the three, in that order (more than one device call's 10 minutes)
# JSON goes to $OUT (the device tool's folder) or, without it, benchmarks/results; each study's first-step figures
# are in its JSON and its table line. Random-init models, batch 8, 3,000 tweets (2,400 train), one epoch.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}" what="${1:-all}"
bench=(python3 benchmarks/bench.py --parts study --epochs 1 --limit 3000 --tokenizer .bench-assets/tokenizer
       --data .gpu-bundle/data/disaster_tweets_train.csv --workdir /tmp/bench)
case "$what" in
  tests|all) python3 -c "import pytest" 2>/dev/null \
               || python3 -m pip install -q --no-index --no-deps --target /tmp/site .bench-assets/whl/*.whl
             TUNE_APP_TEST_TOKENIZER=.bench-assets/tokenizer python3 -m pytest -q -p no:cacheprovider -m gpu \
               tests/test_pack.py tests/test_cuda_graphs.py tests/test_bench.py ;;&
  roberta|all) "${bench[@]}" --models roberta-large --k 16 --trials 16 --pack 16 \
                 --out "$out/gpu-roberta-large-pack-16.json" ;;&
  llama|all) "${bench[@]}" --models llama-7b --k 8 --trials 8 --pack 8 --gpu-memory-gb 24 \
               --out "$out/gpu-llama-7b-pack-8-24gb.json" ;;&
  tests|roberta|llama|all) ;;
  *) echo "usage: bash benchmarks/pack-gpu.sh tests|roberta|llama|all" >&2; exit 2 ;;
esac
