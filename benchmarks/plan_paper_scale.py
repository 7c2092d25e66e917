r"""The paper-scale memory plans: Qwen2.5-7B and Llama-3.1-8B, RW and SRPO, on three slices.

  python benchmarks/plan_paper_scale.py                       # every model x slice (hours on 2 cores)
  python benchmarks/plan_paper_scale.py --models qwen2_5_7b --slices v5e-16 --stages srpo

Each entry is one `python -m saro_jax.plan` run (its own process: the device count is fixed when
jax starts); this script only prints the planner's summary lines and a table. TPU slices compile
with the TPU compiler through jax.experimental.topologies when libtpu is importable (or
TPU_LIBRARY_PATH is set), else on virtual CPU devices (see saro_jax/plan.py for the caveat).
"v4-16" is 8 v4 chips (TPU v4 names count TensorCores, 2 per chip; libtpu compiles for 16
TensorCore devices of half a chip's HBM each); 8x H100 has no deviceless GPU compiler here, so
it is planned on 8 CPU devices (see the CPU caveat in BUILD.md) -- prefer --target local on a GPU host.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# slice -> (devices, HBM GiB per device, TPU topology for the TPU compiler)
# (libtpu shows a v4 2x2x2 slice as 16 devices, one per TensorCore, each with half a chip's HBM.)
SLICES = {
    "v5e-16": (16, 16.0, "v5e:4x4"),
    "v4-16": (16, 16.0, "v4:2x2x2"),
    "8xH100": (8, 80.0, None),  # no deviceless GPU compiler: CPU devices
}
MODELS = ("qwen2_5_7b", "llama3_8b")


def tpu_available() -> bool:
  if os.environ.get("TPU_LIBRARY_PATH"):
    return True
  try:
    import libtpu  # noqa: F401
    return True
  except ImportError:
    return False


def run_one(model: str, slice_name: str, stages: str, knobs: bool, target: str,
            timeout: int) -> tuple[str, str]:
  devices, hbm, topology = SLICES[slice_name]
  target = f"tpu:{topology}" if target == "tpu" and topology else "cpu"
  cmd = [sys.executable, "-m", "saro_jax.plan", "--config", f"configs/saro.py:{model}",
         "--devices", str(devices), "--hbm_gib", str(hbm), "--target", target, "--stages", stages,
         "--knobs" if knobs else "--noknobs"]
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  try:
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return target, f"timed out after {timeout} s"
  text = out.stdout.strip()
  print(text, flush=True)
  if out.returncode:
    return target, f"failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1:]}"
  return target, text.splitlines()[-1]


def main(argv=None) -> list[tuple[str, str, str, str]]:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", default=",".join(MODELS))
  ap.add_argument("--slices", default=",".join(SLICES))
  ap.add_argument("--stages", default="rw,srpo")
  ap.add_argument("--target", choices=("auto", "tpu", "cpu"), default="auto")
  ap.add_argument("--knobs", action="store_true", help="re-plan with knobs when it does not fit")
  ap.add_argument("--timeout", type=int, default=7200, help="seconds per entry")
  args = ap.parse_args(argv)
  target = ("tpu" if tpu_available() else "cpu") if args.target == "auto" else args.target
  rows = []
  for model in args.models.split(","):
    for slice_name in args.slices.split(","):
      used, summary = run_one(model, slice_name, args.stages, args.knobs, target, args.timeout)
      rows.append((model, slice_name, used, summary))
  print("\n| model | slice | compiled for | planner summary |\n|---|---|---|---|")
  for row in rows:
    print("| " + " | ".join(row) + " |")
  return rows


if __name__ == "__main__":
  main()
