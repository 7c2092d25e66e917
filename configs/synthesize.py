r"""Synthesize SaRO training data from the train side of the public prompt sets (configs/splits.py).

  python -m saro_jax.main --config configs/synthesize.py:tiny          # template writer, a few seconds
  python -m saro_jax.main --config configs/synthesize.py \
      --config.synthesize.teacher=http --config.synthesize.http.base_url=https://api.openai.com/v1 \
      --config.synthesize.http.model=gpt-4o --config.synthesize.http.api_key_env=OPENAI_API_KEY \
      --config.synthesize.shortest_of=4
  python -m saro_jax.main --config configs/synthesize.py:smollm2_135m \
      --config.synthesize.teacher=sampler    # the local model under the written safety policy
  python -m saro_jax.main --config configs/synthesize.py:smollm2_135m \
      --config.synthesize.teacher=self       # benign answers by the model itself (self-distillation)

Teachers: template (fixed wording; writes refusals and compliance openings for harmful prompts,
drops benign prompts, which need a model to answer them), http (an OpenAI-compatible endpoint,
as the paper used GPT-4o; retries, rate limit, cache in <workdir>/http_cache.jsonl), sampler (the
config's model through saro_jax.sample; the policy in its context = context distillation), self
(the config's model answers benign prompts after a prefilled template reasoning block, so the
answers stay in its own distribution; harmful prompts get the template writer's text).
limit (limit_benign for benign/borderline prompts) keeps that many prompts per label per spec,
spread evenly over the set.
Every generation is validated (reasoning block, steps, length, and the refusal-phrase judge on the
answer); a prompt whose texts all fail gets the template writer's text when ``fallback`` is on.
Writes <workdir>/{rw,trajectories,pairs}.jsonl + stats.json; rerunning resumes (records.jsonl).
The outputs are data specs for configs/rw.py (rw.jsonl) and configs/srpo.py (pairs.jsonl).
"""

from saro_jax import presets


def get_config(arg: str | None = None):
  preset = presets.parse_preset(arg, "synthesize")
  config = presets.header("synthesize", "synthesize", preset)
  config.synthesize = presets.synthesize_section(preset)  # keys and defaults: config.SynthesizeConfig
  return config
