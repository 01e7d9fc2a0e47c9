#!/usr/bin/env bash
# The GPU snapshot benchmark, as one call on a lent GPU machine (the `device` tool), from
# the repository root. Prepare here with `make device-bundle` (a release build of the
# extension and Keras's wheels, in the ignored folder .device), then run there:
#
#   bash benches/gpu_on_device.sh            carrying .device, timeout about 480 s
#
# Its image has torch and JAX with CUDA, not TensorFlow: both of those are measured. What
# comes back under $OUT: the GPU's description, the table, and the figures as JSON. The
# exit status is gpu_snapshot.py's: 1 if a value read back differs from Keras's.
set -euo pipefail
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
test -f .device/_fastckpt.abi3.so || { echo "no .device bundle: run make device-bundle" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .device/wheels/*.whl
cp .device/_fastckpt.abi3.so python/fastckpt/_fastckpt.abi3.so
export PYTHONPATH="/tmp/site:$PWD/python" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current \
    --format=csv | tee "$out/gpu.txt"
python3 -c "import keras, fastckpt, fastckpt._fastckpt as f; print('keras', keras.__version__, 'cuda driver', f.cuda_available())" \
    | tee -a "$out/gpu.txt"
python3 benches/gpu_snapshot.py --gib "${GIB:-1.0}" --repeats "${REPEATS:-5}" --backends jax,torch \
    --json "$out/gpu_snapshot.json" 2>&1 | tee "$out/gpu_snapshot.txt"
