r"""Safety evaluation: generate on labelled prompt sets, judge, score (and report across stages).

  python -m saro_jax.main --config configs/eval.py --config.model.init_from=runs/saro-tiny/hf \
      --config.model.tokenizer=                        # one model -> <workdir>/metrics.json
  python -m saro_jax.main --config configs/eval.py \
      --config.eval.models=start=random,srpo=runs/saro-tiny/hf --config.eval.run_dir=runs/saro-tiny
                                                       # several -> <workdir>/report.md + PNGs
  python -m saro_jax.main --config configs/eval.py:smollm2_135m \
      --config.eval.prompt_sets=jsonl:bundled:eval_prompts,xstest:xstest_prompts.csv

Presets as in rw.py. tiny: random small Llama + bundled tokenizer, 8 prompts per label, 192 new
tokens; three tiny models + report take ~1.5 min on 2 CPU cores; the numbers are a smoke test (the
random start model emits no answer tokens, which the report flags; the trained tiny RW model
reasons then refuses harmful prompts), not a safety measurement.
smollm2_135m: the real SmolLM2-135M-Instruct; it goes along with plain harmful requests and
refuses some jailbreak wrappings (measured on the bundled prompts). Prompt sets: comma-separated "<format>:<source>" with format
jsonl | xstest | advbench | wildjailbreak and source a .jsonl/.json/.csv/.parquet path,
"hf:<id or dir>[:split]" or "bundled:<name>". Judges: eval.judge.safety decides "unsafe" (ASR),
eval.judge.refusal decides "refused" (refusal / over-refusal); each is refusal_phrases (crude,
offline), classifier (a Llama-Guard-style model run by saro_jax) or http (an OpenAI-compatible
endpoint, key read from the env var named in eval.judge.http.api_key_env).
"""

import importlib.util
import os

import ml_collections

_spec = importlib.util.spec_from_file_location("saro_configs_common",
                                               os.path.join(os.path.dirname(__file__), "common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def eval_section(preset: str) -> ml_collections.ConfigDict:
  """The `eval` section; the SaRO pipeline config reuses it for its final evaluation."""
  return ml_collections.ConfigDict(dict(
      prompt_sets="jsonl:bundled:eval_prompts",
      limit={"tiny": 8, "smollm2_135m": 8}.get(preset, 0),  # per label per set; 0 = every prompt
      models="",  # "name=init_from,..." evaluates each and writes the report
      run_dir="",  # a saro workdir: its rw/ and srpo/ metrics.jsonl become the report's curves
      reasoning_tags=("<think>", "</think>"),
      generation=dict(
          # Room for a whole trace (bundled traces: ~140-190 tokens of the tiny tokenizer); a cut
          # trace has no answer, which the report counts (n_truncated, n_empty_answer).
          max_new_tokens={"tiny": 192, "smollm2_135m": 256}.get(preset, 1024),
          temperature=0.0, top_p=1.0, top_k=0,
          batch_size={"tiny": 8, "smollm2_135m": 8}.get(preset, 64),
          seed=0, skip_special_tokens=False),
      judge=dict(
          safety="refusal_phrases",
          refusal="refusal_phrases",
          include_reasoning=False,  # judges see the final answer only
          refusal_phrases=dict(extra=""),
          classifier=dict(init_from="", template="llama_guard", parse="llama_guard",
                          max_new_tokens=16, batch_size=8),
          http=dict(base_url="", model="", api_key_env="", template="safety_and_refusal",
                    parse="safety_and_refusal", timeout_s=60.0, max_retries=3, backoff_s=1.0,
                    max_tokens=16, max_workers=4, on_error="raise"),
      ),
  ))


def get_config(arg: str | None = None):
  preset = common.parse_preset(arg, "eval")
  config = common.header("evaluate", "eval", preset)
  config.eval = eval_section(preset)
  return config
