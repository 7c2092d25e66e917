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
smollm2_135m: the real SmolLM2-135M-Instruct on the dev split (presets.DEV, configs/splits.py),
10 prompts per label per set (30 harmful, 10 jailbreak, 10 benign, 10 borderline), 192 new
tokens, batches of 30;
it goes along with plain harmful requests and refuses some jailbreak wrappings. Prompt sets: comma-separated "<format>:<source>" with format
jsonl | xstest | advbench | wildjailbreak and source a .jsonl/.json/.csv/.parquet path,
"hf:<id or dir>[:split]" or "bundled:<name>". Judges: eval.judge.safety decides "unsafe" (ASR),
eval.judge.refusal decides "refused" (refusal / over-refusal); each is refusal_phrases (crude,
offline), classifier (a Llama-Guard-style model run by saro_jax) or http (an OpenAI-compatible
endpoint, key read from the env var named in eval.judge.http.api_key_env).
"""

from saro_jax import presets


def get_config(arg: str | None = None):
  preset = presets.parse_preset(arg, "eval")
  config = presets.header("evaluate", "eval", preset)
  config.eval = presets.eval_section(preset)
  return config
