r"""Compile time vs depth, scanned layers against per-layer (unrolled) layers.

  python benchmarks/scan_compile.py                          # Qwen2.5-7B widths, SRPO, depths 1 2 4 8
  python benchmarks/scan_compile.py --depths 2,4 --stage rw --devices 8

Each point is the memory planner's AOT compile (saro_jax/plan.py ``plan_stage``: the real jitted
train step plus, for SRPO, the live reference forward, lowered on abstract weights sharded over
``--devices`` virtual CPU devices) of the preset's model with only ``num_layers`` changed. The
figure is XLA's compile wall time (``lowered.compile()``, summed over the step and reference
programs), as the planner prints it. Side by side in one process, so both columns see the same
machine load; the last lines fit seconds-per-layer for each column.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="qwen2_5_7b")
  parser.add_argument("--stage", default="srpo", choices=("rw", "srpo"))
  parser.add_argument("--depths", default="1,2,4,8")
  parser.add_argument("--devices", type=int, default=16)
  args = parser.parse_args()

  import jax
  jax.config.update("jax_num_cpu_devices", args.devices)
  from saro_jax import plan
  from saro_jax.config import MeshConfig, training_config

  spec = importlib.util.spec_from_file_location("saro_cfg", os.path.join(ROOT, "configs", "saro.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(args.preset)
  devices = jax.devices()[:args.devices]
  n = len(devices)
  cfg = training_config(config, args.stage, device_count=n, process_count=1,
                        dpo=args.stage == "srpo")
  cfg = dataclasses.replace(cfg, mesh=MeshConfig(*cfg.mesh.resolved(n)))
  base = plan.model_config_for(cfg)
  depths = [int(d) for d in args.depths.split(",")]
  print(f"{args.preset} {args.stage}: hidden {base.hidden_size}, mlp {base.intermediate_size}, "
        f"{base.num_heads}/{base.num_kv_heads} heads, remat {base.remat}; {n} CPU devices; "
        f"compile seconds (step + reference), by num_layers", flush=True)
  print(f"{'layers':>6} {'per-layer':>10} {'scanned':>9} {'ratio':>6}", flush=True)
  rows = []
  for depth in depths:
    seconds = []
    for scan in (False, True):
      p = plan.plan_stage(args.stage, cfg, base.replace(num_layers=depth, scan_layers=scan), devices)
      seconds.append(p.step.compile_s + (p.reference.compile_s if p.reference else 0.0))
    rows.append((depth, *seconds))
    print(f"{depth:6d} {seconds[0]:10.1f} {seconds[1]:9.1f} {seconds[0] / seconds[1]:6.1f}",
          flush=True)
  if len(rows) > 1:
    (d0, u0, s0), (d1, u1, s1) = rows[0], rows[-1]
    print(f"slope, layers {d0} -> {d1}: per-layer {(u1 - u0) / (d1 - d0):+.1f} s/layer, "
          f"scanned {(s1 - s0) / (d1 - d0):+.1f} s/layer")


if __name__ == "__main__":
  sys.exit(main())
