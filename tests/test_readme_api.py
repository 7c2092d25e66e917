"""README "Python API": every python block of that section runs, in order, in one namespace."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks(section: str) -> list[str]:
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    text = f.read()
  start = text.index(f"## {section}\n")
  end = text.find("\n## ", start + 1)
  body = text[start:end if end != -1 else len(text)]
  return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_python_api_snippets_run():
  blocks = python_blocks("Python API")
  assert len(blocks) == 4  # load, forward, DPO log-probs, export
  namespace: dict = {}
  for block in blocks:
    exec(compile(block, "README.md (Python API)", "exec"), namespace)  # noqa: S102
  # What the snippets left behind: a loss and finite DPO log-probs from the real loaders.
  assert float(namespace["loss"]) > 0
  assert float(namespace["chosen_len"][0]) > 0 and float(namespace["chosen"][0]) < 0
  assert os.path.isfile(os.path.join(namespace["out_dir"], "model.safetensors"))


def test_forward_mask_matches_explicit_positions():
  """Left padding through the mask == the row run alone (positions restart at 0 after pads)."""
  import numpy as np
  from saro_jax import models
  spec = {"init_from": "random", "tokenizer": "bundled",
          "arch": dict(family="llama", hidden_size=32, intermediate_size=64, num_layers=1,
                       num_heads=2, num_kv_heads=1, head_dim=16)}
  model = models.load(spec, seed=0)
  row = np.asarray([[5, 9, 2, 7]])
  padded = np.asarray([[0, 0, 5, 9, 2, 7]])
  mask = np.asarray([[0, 0, 1, 1, 1, 1]])
  alone = np.asarray(models.forward(model, row))
  left = np.asarray(models.forward(model, padded, attention_mask=mask))[:, 2:]
  # Same tokens, positions and visible keys; only the padded program's reduction lengths differ
  # (masked keys add exact zeros), so float32 results agree to a few units of roundoff: the
  # logits are O(1) (|logit| < 0.5 here), fp32 unit roundoff is 6e-8, and the depth is 1 layer
  # with reductions over D=32 and L<=6, so 1e-5 (~100 ulp at that scale) bounds it with room.
  np.testing.assert_allclose(left, alone, rtol=0, atol=1e-5)
  # The bug this guards against: a mask that is not applied (the real tokens attend to the pads).
  # No mask = every position real: positions 0..5 and one segment, so the row attends to the pads.
  wrong = np.asarray(models.forward(model, padded))[:, 2:]
  assert np.max(np.abs(wrong - alone)) > 1e-3  # measured 0.19: far outside the bound
  positions, segments = models.positions_and_segments(mask)
  assert np.asarray(positions).tolist() == [[0, 0, 0, 1, 2, 3]]
  assert np.asarray(segments).tolist() == [[0, 0, 1, 1, 1, 1]]
