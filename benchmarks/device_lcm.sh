#!/usr/bin/env bash
# The GPU measurement of the LCM distillation step beside diffusers' train_lcm_distill_sd_wds.py (issue 14,
# Performance; docs/benchmarks.md), in one device `run` of a few minutes, results under $OUT.
#
# Prepare on the CPU machine first (the device machine has no network):
#   ../shared/device/make-wheels.sh webdataset==0.2.86 braceexpand torchvision==0.26.0   # into .whl/
#   mkdir -p .ref && <diffusers>/examples/consistency_distillation/train_lcm_distill_sd_wds.py -> .ref/
# webdataset 0.2.86: from 0.2.96 on its tar_file_expander yields an end-of-file {} that the script's own
# group_by_keys_nothrow does not expect (KeyError: 'fname'). torchvision (which the script imports) is installed only
# where the machine lacks it (0.26.0 is the build for its torch 2.11, cu130).
# Then: run(command="bash benchmarks/device_lcm.sh", carry=[".whl", ".ref"], timeout_s=580).
set -u
OUT=${OUT:-/tmp/bench_lcm_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  $(ls .whl/*.whl | grep -v '/torchvision-') > "$OUT/pip.log" 2>&1 || { tail "$OUT/pip.log"; exit 1; }
if ! python3 -c "import torchvision" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/torchvision-*.whl >> "$OUT/pip.log" 2>&1 || echo "torchvision could not be installed"
fi
export PYTHONPATH=/tmp/site:$PWD/src TQDM_DISABLE=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, diffusers, transformers, accelerate, webdataset, torchvision as tv
print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__,
      'accelerate', accelerate.__version__, 'webdataset', webdataset.__version__, 'torchvision', tv.__version__)" \
  2>&1 | tee "$OUT/versions.txt"

# SD v1.5 size, batch 12, bf16, 512 px: diffusers' script, ours eager, ours --compile (each tool at most 240 s).
timeout 540 python3 benchmarks/bench_lcm.py --compile --work_dir /tmp/bench_lcm --timeout 240 \
  --json "$OUT/bench_lcm.json" > "$OUT/bench_lcm.log" 2>&1
echo "bench_lcm exit status $?"
grep -v "^Writing\|it/s\]" "$OUT/bench_lcm.log" | tail -40
mkdir -p "$OUT/runs"
cp /tmp/bench_lcm/*.log /tmp/bench_lcm/*.json "$OUT/runs/" 2>/dev/null
for f in "$OUT"/runs/*.log; do tr '\r' '\n' < "$f" | grep -v "it/s\]" | tail -15 > "$f.tail" && rm "$f"; done
