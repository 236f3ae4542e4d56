#!/bin/bash
# graphprune's CUDA paths on a GPU machine that has PyTorch, torchvision and CUDA 13 but no
# onnxruntime-gpu and no network (the device machine lent to some sessions; docs/budgets.md,
# round 40). onnxruntime-gpu 1.31.1 (cp312, CUDA 13) travels as an xz tarball of the unpacked
# wheel split into parts under .gpu/ (git-ignored, carried one part per call: at most 64 MiB
# travel per call), with onnx_graphsurgeon's wheel:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 onnxruntime-gpu==1.31.1 onnx_graphsurgeon==0.6.1 -d wheels
#   unzip the onnxruntime wheel into x/; tar cf - -C x . | xz -6 > ortgpu.tar.xz; split -b 52000000 -d -a 1 ortgpu.tar.xz part
# Calls 1-3 copy .gpu/part0..2 to /tmp/chunks on the (warm) machine; call 4 carries part3, the
# graphsurgeon wheel and this script as .gpu/check.sh and runs it. Output: $OUT/log.txt and reports.
exec > >(tee $OUT/log.txt) 2>&1
set -x
cp .gpu/part* /tmp/chunks/ 2>/dev/null
ls -la /tmp/chunks
cat /tmp/chunks/part0 /tmp/chunks/part1 /tmp/chunks/part2 /tmp/chunks/part3 > /tmp/ortgpu.tar.xz || exit 9
mkdir -p /tmp/site && tar xJf /tmp/ortgpu.tar.xz -C /tmp/site || exit 9
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/onnx_graphsurgeon-*.whl || exit 9
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/gp . > /tmp/pipgp.log 2>&1 || { tail -20 /tmp/pipgp.log; exit 9; }
export PYTHONPATH=/tmp/gp:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi -L
python3 - <<'PY'
import onnxruntime as ort, graphprune, numpy as np, onnx
print(ort.__version__, ort.__file__, ort.get_available_providers(), graphprune.__file__, onnx.__version__, np.__version__)
from graphprune.examples import example_cnn
s = ort.InferenceSession(example_cnn().SerializeToString(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
print("session providers", s.get_providers())
print(s.run(None, {"image": np.zeros((1, 3, 64, 64), np.float32)})[0].shape)
PY
timeout 200 python3 -m pytest -p no:cacheprovider -q -rs tests/test_timing.py tests/test_cli.py tests/test_budget.py -k "cuda or provider or latency" 2>&1 | tail -8
cd /tmp
python3 -c "
import torch, torchvision
m = torchvision.models.resnet18().eval()
torch.onnx.export(m, (torch.randn(1, 3, 224, 224),), '/tmp/r18.onnx', dynamo=False, opset_version=17)
" 2>&1 | grep -v Deprecation | tail -2
M=/tmp/r18.onnx
timeout 200 python3 -m graphprune prune $M -o /tmp/y2.onnx --target-latency 0.6 --provider cuda --report $OUT/r18_latency.json 2>&1 | grep -v "^[0-9]" | tail -12
timeout 200 python3 -m graphprune prune $M -o /tmp/y3.onnx --erase-blocks 2 --provider cuda --report $OUT/r18_depth.json 2>&1 | tail -6
timeout 120 python3 -m graphprune prune $M -o /tmp/y4.onnx --ratio 0.5 --calibration random:16 --provider cuda --report $OUT/r18_cal.json 2>&1 | tail -6
echo DONE
