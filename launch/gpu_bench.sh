#!/usr/bin/env bash
# The RW and SRPO train-step throughput of a 1B-shaped random Llama (Llama-3.2-1B's shape, ~1.24B
# params) on ONE lent GPU: bf16 compute with fp32 master weights (params and AdamW state fp32),
# attention_impl=auto (jax.nn.dot_product_attention: cuDNN flash attention on GPU), remat none,
# MFU against the H200's dense bf16 peak (989 TFLOP/s; override with PEAK_TFLOPS). It runs
# benchmarks/throughput.py (see its docstring for how MFU is counted). Budget: ~8 minutes.
#
#   launch/gpu_bench.sh --fetch_wheels   # HERE, before asking for a device (needs pip + PyPI):
#                                        # the wheels the GPU image lacks -> .whl/ (gitignored)
#   launch/gpu_bench.sh                  # ON THE GPU, from the repo root, with .whl carried
#   launch/gpu_bench.sh --smoke          # anywhere (CPU too): the same path at a tiny size
#
# On the device tool: run(command="launch/gpu_bench.sh", carry=[".whl"], timeout_s=560); the log
# and the figures come back as $OUT/gpu_bench.log and $OUT/gpu_bench.json (BUILD.md, "GPU").
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/runs/gpu_bench}
mkdir -p "$OUT"
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
# What saro_jax imports that the GPU image (KINDS.md's package list) does not have; their own
# requirements (absl-py, etils, cloudpickle, numpy, protobuf, psutil, pyyaml, requests, tqdm) are
# in the image. The versions are the ones this repo's venv tests with.
WHEELS=(grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 ml_collections==1.1.0 gguf==0.19.0)

case "${1:-}" in
  --fetch_wheels)
    # cp312 x86-64 wheels, as the device README says (the GPU image's python3 is 3.12).
    exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}" ;;
  --smoke)
    # A 2-layer model of the same family; on CPU attention_impl=auto falls back to the XLA path.
    ARGS=(--model tiny --arch '{"family": "llama", "hidden_size": 64, "intermediate_size": 128,
          "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16,
          "tie_embeddings": true, "vocab_size": 4096}'
          --batch 2 --length 64 --steps 2 --warmup 1)
    LIMIT=300 ;;
  "")
    # 8 rows x 2048 tokens (RW) and 8 pairs x 2 x 2048 tokens (SRPO + live reference) per step.
    ARGS=(--model tiny --arch llama_1b --batch 8 --length 2048 --steps 10 --warmup 2)
    LIMIT=480 ;;
  *) echo "usage: $0 [--smoke | --fetch_wheels]" >&2; exit 2 ;;
esac

{
  date -u
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  # Install the carried wheels only for what is missing (here, with the venv, nothing is).
  if ! "$PY" -c "import grain, ml_collections, gguf" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
      echo "missing grain/ml_collections/gguf and no .whl/: run '$0 --fetch_wheels' here and carry .whl" >&2
      exit 3
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/saro_site .whl/*.whl || exit 4
    export PYTHONPATH=/tmp/saro_site
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  "$PY" -c "import jax, flax, saro_jax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
  timeout "$LIMIT" "$PY" benchmarks/throughput.py "${ARGS[@]}" --skip sample \
    --compute_dtype bfloat16 --attention_impl auto --remat none --peak_tflops "$PEAK_TFLOPS"
  echo "exit $?"
} 2>&1 | tee "$OUT/gpu_bench.log"
# The last JSON line of the log is the figures (throughput.py prints it last).
grep '^{' "$OUT/gpu_bench.log" | tail -1 > "$OUT/gpu_bench.json"
test -s "$OUT/gpu_bench.json"
