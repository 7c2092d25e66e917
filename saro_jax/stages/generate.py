r"""Generate: completions for a prompt set -> <workdir>/generations.jsonl (reasoning split off).

  python -m saro_jax.main --config configs/generate.py:smollm2_135m \
      --config.generate.prompts=prompts.jsonl

Prompt sources (``generate.prompts``): a .jsonl / .json file of rows with "prompt" (a string, one
user turn) or "messages" (a chat list), optional "id"; a .txt file with one prompt per line;
"bundled:<name>" (a file of saro_jax/data/bundled); or "text:<a literal prompt>".
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections

from saro_jax import config as config_lib
from saro_jax import models, sample, sharding
from saro_jax.data import bundled, jsonl

logger = logging.getLogger(__name__)

OUTPUT_NAME = "generations.jsonl"
_ROLES = ("system", "user", "assistant")


class PromptFileError(jsonl.InputError):
  """A prompt row that cannot be used; the message names file:line and the field."""

  def __init__(self, message: str):
    super().__init__("", message, reason="prompt_file")


def _messages(value: Any, where: str) -> list[dict[str, str]]:
  if not isinstance(value, list) or not value:
    raise PromptFileError(f"{where}: field 'messages' must be a non-empty list of"
                          " {'role', 'content'} dicts")
  out = []
  for k, m in enumerate(value):
    if not isinstance(m, Mapping) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
      raise PromptFileError(f"{where}: field 'messages[{k}]' must be {{'role': one of {_ROLES},"
                            f" 'content': str}}, got {m!r}")
    out.append({"role": m["role"], "content": m["content"]})
  return out


def _row_prompt(row: Any, where: str) -> tuple[str, str | list[dict[str, str]]]:
  """(id, prompt) of one JSON row."""
  if isinstance(row, str):
    return where, row
  if not isinstance(row, Mapping):
    raise PromptFileError(f"{where}: a row must be an object or a string, got {type(row).__name__}")
  row_id = str(row["id"]) if row.get("id") not in (None, "") else where
  if "messages" in row:
    return row_id, _messages(row["messages"], where)
  if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
    raise PromptFileError(f"{where}: field 'prompt' must be a non-empty string (or give 'messages');"
                          f" row has fields {sorted(row)}")
  return row_id, row["prompt"]


def read_prompt_file(spec: str, limit: int = 0) -> list[tuple[str, str | list[dict[str, str]]]]:
  """[(id, prompt)] from a prompt source spec (see the module docstring)."""
  if spec.startswith("text:"):
    return [("text:0", spec[len("text:"):])]
  path = spec
  if spec.startswith("bundled:"):
    path = bundled.path(spec[len("bundled:"):])
  if not os.path.isfile(path):
    raise PromptFileError(f"config.generate.prompts={spec!r}: no such file {path}")
  base = os.path.basename(path)
  ext = os.path.splitext(path)[1].lower()
  rows: list[tuple[str, Any]] = []
  if ext == ".jsonl":  # the one JSONL reader: BOM, line limits, file:line errors
    rows = [(f"{base}:{where.rsplit(':', 1)[1]}", row) for where, row in jsonl.read_jsonl(path)]
  elif ext == ".json":
    data = jsonl.read_json(path)
    if not isinstance(data, list):
      raise PromptFileError(f"{base}: a .json prompt file must hold a list of rows")
    rows = [(f"{base}:[{k}]", r) for k, r in enumerate(data)]
  elif ext == ".txt":
    with open(path, encoding="utf-8-sig") as f:  # -sig: a leading BOM is not part of the prompt
      rows = [(f"{base}:{n}", line.rstrip("\n")) for n, line in enumerate(f, 1) if line.strip()]
  else:
    raise PromptFileError(f"{path}: unknown prompt file type {ext!r}; use .jsonl, .json or .txt")
  prompts = [_row_prompt(row, where) for where, row in rows]
  if not prompts:
    raise PromptFileError(f"{path}: no prompts")
  return prompts[:limit] if limit else prompts


def _with_system(prompt, system_prompt: str):
  if not system_prompt:
    return prompt
  messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
  if messages[0]["role"] == "system":
    return messages
  return [{"role": "system", "content": system_prompt}] + messages


def generation_config_eos(init_from: str) -> tuple[int, ...]:
  """EOS ids of an HF dir's generation_config.json (chat models often list several there)."""
  path = os.path.join(init_from, "generation_config.json")
  if not os.path.isfile(path):
    return ()
  with open(path, encoding="utf-8") as f:
    eos = json.load(f).get("eos_token_id")
  return () if eos is None else (int(eos),) if isinstance(eos, int) else tuple(int(i) for i in eos)


def write_generations(path: pathlib.Path, prompts: Sequence[tuple[str, Any]], generations,
                      tags: tuple[str, str]) -> None:
  """One JSON row per (id, prompt as read) and its generation."""
  with open(path, "w", encoding="utf-8") as f:
    for (row_id, prompt), g in zip(prompts, generations, strict=True):
      reasoning, answer = sample.split_reasoning(g.text, tags)
      f.write(json.dumps(dict(id=row_id, prompt=prompt, reasoning=reasoning, answer=answer,
                              text=g.text, finish_reason=g.finish_reason,
                              prompt_tokens=g.num_prompt_tokens, completion_tokens=len(g.tokens)),
                         ensure_ascii=False) + "\n")


def run(config: ml_collections.ConfigDict, workdir: str) -> pathlib.Path:
  gen = config_lib.section(config_lib.GenerateConfig, config.get("generate"), "generate")
  gen.validate()
  spec = config_lib.section(config_lib.ModelSpec, config.get("model"), "model")
  spec.validate()
  mesh_cfg = config_lib.section(config_lib.MeshConfig, config.get("mesh"), "mesh")
  mesh_cfg.validate(jax.device_count())
  prompts = read_prompt_file(gen.prompts, gen.limit)  # bad prompt files fail before the model loads
  mesh = sharding.make_mesh(*mesh_cfg.resolved(jax.device_count()))
  tokenizer = models.load_tokenizer(spec)
  with sharding.use(mesh):
    model = models.load(spec, tokenizer=tokenizer, mesh=mesh, seed=config.get("seed", 0))
  eos = sample.eos_token_ids(tokenizer, model.config, generation_config_eos(spec.init_from))
  start = time.perf_counter()
  generations = sample.generate(
      model, tokenizer, [_with_system(p, gen.system_prompt) for _, p in prompts],
      max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
      top_k=gen.top_k, seed=config.get("seed", 0), stop=gen.stop, batch_size=gen.batch_size,
      mesh=mesh, eos_ids=eos, chat_template=gen.chat_template, decode_layout=gen.decode_layout)
  seconds = time.perf_counter() - start
  new_tokens = sum(len(g.tokens) for g in generations)
  out = pathlib.Path(gen.output or os.path.join(workdir, OUTPUT_NAME))
  if jax.process_index() == 0:  # every process generated the same rows; one writes them
    out.parent.mkdir(parents=True, exist_ok=True)
    write_generations(out, prompts, generations, tuple(gen.reasoning_tags))
  logger.info("generate: %d prompts, %d new tokens in %.1f s (%.1f tokens/s, incl. compile)",
              len(generations), new_tokens, seconds, new_tokens / max(seconds, 1e-9))
  print(out)
  return out
