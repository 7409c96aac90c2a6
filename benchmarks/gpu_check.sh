#!/usr/bin/env bash
# One script for the GPU machine (H100/H200): parity tests on CUDA in bf16 and fp32, then the
# encoder benchmark on 0.6B-shaped random weights. Prints everything; about 5 minutes.
#   bash benchmarks/gpu_check.sh            (from the repository root, after `make setup`)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 PYTHONDONTWRITEBYTECODE=
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY - <<'PY'
import importlib.util, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-",
      "flash_attn", importlib.util.find_spec("flash_attn") is not None)
PY
for dtype in bfloat16 float32; do
  echo "== parity tests on cuda, $dtype"
  QWEN3_TEST_DEVICE=cuda QWEN3_TEST_DTYPE=$dtype timeout 150 $PY -m pytest -q -p no:cacheprovider \
    tests/test_encoder.py -k "not bad_settings and not non_finite" || status=1
done
echo "== encoder benchmark, 0.6B-shaped random weights, cuda bf16"
timeout 240 $PY benchmarks/encode_bench.py --model-size 0.6b --device cuda \
  --corpus-size 4000 --narrow-size 2000 || status=1
exit $status
