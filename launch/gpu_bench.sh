#!/usr/bin/env bash
# The RW and SRPO train-step throughput of a 1B-shaped random Llama (Llama-3.2-1B's shape, ~1.24B
# params) on ONE lent GPU: bf16 compute with fp32 master weights (params and AdamW state fp32),
# attention_impl=auto (jax.nn.dot_product_attention: cuDNN flash attention on GPU), remat none,
# MFU against the H200's dense bf16 peak (989 TFLOP/s; override with PEAK_TFLOPS). It runs
# benchmarks/throughput.py (see its docstring for how MFU is counted), after the cuDNN attention
# parity tests and a kernel timing (the stages below). Budget: BUDGET seconds (default 520).
#
#   launch/gpu_bench.sh --fetch_wheels   # HERE, before asking for a device (needs pip + PyPI):
#                                        # the wheels the GPU image lacks -> .whl/ (gitignored)
#   launch/gpu_bench.sh                  # ON THE GPU, from the repo root, with .whl carried
#   launch/gpu_bench.sh --smoke          # anywhere (CPU too): the same path at a tiny size
#
# On the device tool: run(command="launch/gpu_bench.sh", carry=[".whl"], timeout_s=570); the log
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
    LIMIT=300 ATTN_SHAPES=2x256:causal ;;
  "")
    # 8 rows x 2048 tokens (RW) and 8 pairs x 2 x 2048 tokens (SRPO + live reference) per step.
    ARGS=(--model tiny --arch llama_1b --batch 8 --length 2048 --steps 10 --warmup 2)
    LIMIT=330 ATTN_SHAPES=8x2048:causal,4x2048:trees ;;
  *) echo "usage: $0 [--smoke | --fetch_wheels]" >&2; exit 2 ;;
esac

# Stages, each under its own timeout inside one budget (BUDGET seconds, default 520), so one that
# fails or hangs leaves the others' figures in the log:
#   1. versions and the GPU;
#   2. (GPU) the cuDNN attention parity tests (tests/test_attention.py: cuDNN's output and
#      gradients within the bf16 flash-attention bounds, for packed, tree and window masks, and the
#      lost-mask control caught);
#   3. (GPU) one layer's attention, fwd and fwd + bwd, Llama-3.2-1B's heads at 8 x 2048: cuDNN
#      (mask as bias + causal), cuDNN causal alone, ours (tiled), side by side;
#   4. the RW and SRPO steps (throughput.py) with attention_impl=auto (cuDNN on a GPU); if that
#      fails, again with xla;
#   5. if time is left: the RW step with attention_impl=xla (ours), for the kernel's share.
BUDGET=${BUDGET:-520}
left() { echo $(( BUDGET - SECONDS )); }
stage() {  # stage SECONDS NAME CMD...: at most SECONDS (and the budget left), logged with its rc
  local limit=$1 name=$2; shift 2
  (( $(left) < limit )) && limit=$(left)
  if (( limit < 20 )); then echo "== $name: skipped ($(left) s of the budget left)"; return 99; fi
  echo "== $name (limit ${limit} s, $(left) s of the budget left)"
  timeout "$limit" "$@"
  local rc=$?
  echo "== $name: rc $rc after $SECONDS s"
  return $rc
}

# throughput.py's train steps, bf16 compute over fp32 master weights; each stage adds --skip and
# --attention_impl.
STEPS=("$PY" benchmarks/throughput.py "${ARGS[@]}" --compute_dtype bfloat16 --remat none
       --peak_tflops "$PEAK_TFLOPS")

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
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
  stage 60 versions "$PY" -c "import importlib.metadata as m, jax; print({p: m.version(p) for p in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'transformers', 'numpy')}, jax.devices())" || exit 5
  GPU=$("$PY" -c "import jax; print(int(jax.default_backend() == 'gpu'))" 2>/dev/null)
  if [[ "$GPU" == 1 ]]; then
    # The suite's conftest pins JAX_PLATFORMS=cpu and CPU-only XLA flags unless they are set
    # (XLA reads a value that is not a flag as a file name: a CPU-only flag stands in).
    JAX_PLATFORMS=cuda XLA_FLAGS="--xla_force_host_platform_device_count=1" stage 100 "cudnn attention parity" "$PY" -m pytest -q -s \
      -p no:cacheprovider tests/test_attention.py -k "cudnn or bf16_flash or auto_attention"
    stage 80 "attention kernels" "$PY" benchmarks/attention_tiles.py --dtype bfloat16 \
      --heads 32,8,64 --shapes "$ATTN_SHAPES" --tiles 128 --cudnn --repeats 5
  fi
  stage "$LIMIT" "RW + SRPO steps, attention auto" "${STEPS[@]}" --skip sample --attention_impl auto
  rc=$?
  if (( rc != 0 && rc != 99 )); then
    stage "$LIMIT" "RW + SRPO steps, attention xla (auto failed)" "${STEPS[@]}" --skip sample \
      --attention_impl xla
  elif [[ "$GPU" == 1 ]]; then
    stage 150 "RW step, attention xla (ours)" "${STEPS[@]}" --skip srpo,sample --attention_impl xla
  fi
  echo "exit after $SECONDS s"
} 2>&1 | tee "$OUT/gpu_bench.log"
# The figures: the JSON lines throughput.py printed, the last one of each run the fullest.
grep '^{' "$OUT/gpu_bench.log" > "$OUT/gpu_bench.json"
test -s "$OUT/gpu_bench.json"
