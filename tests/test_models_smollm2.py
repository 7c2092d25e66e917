"""Real weights: SmolLM2-135M-Instruct (GGUF Q4_1) in saro_jax vs transformers/PyTorch.

The reference is transformers' own GGUF loader (it reads the file's metadata itself, so a lost
rope_theta = 100000 on our side shows up as a ~4-logit gap). Both sides run fp32 on the same
dequantized weights; the HF directory written by `gguf_to_hf_dir` is checked bit for bit.
"""

import os
import time

import jax
import numpy as np
import pytest
from flax import nnx

import error_model as em
import tiny_hf
from saro_jax import sharding
from saro_jax.models import gguf as gg

pytestmark = pytest.mark.heavy

PROMPTS = [
  [{"role": "user", "content": "What is the capital of France?"}],
  [{"role": "system", "content": "You are a careful assistant who explains its reasoning."},
   {"role": "user", "content": "How can I keep my passwords safe?"}],
  [{"role": "user", "content": "Write one sentence about rain."},
   {"role": "assistant", "content": "Rain taps softly on the roof."},
   {"role": "user", "content": "Now one about snow."}],
]


@pytest.fixture(scope="session")
def smollm2_path() -> str:
  return gg.smollm2_gguf_path()


@pytest.fixture(scope="session")
def torch_reference(smollm2_path):
  transformers = pytest.importorskip("transformers")
  start = time.perf_counter()
  model = transformers.AutoModelForCausalLM.from_pretrained(
    os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path),
    dtype="float32").eval()
  print(f"\ntransformers GGUF load: {time.perf_counter() - start:.1f} s")
  return model


@pytest.fixture(scope="session")
def prompt_ids(smollm2_hf_dir) -> list[np.ndarray]:
  """The prompts through SmolLM2's chat template (the tokenizer saved next to the weights)."""
  import transformers
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(smollm2_hf_dir))
  texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
           for m in PROMPTS]
  return [np.asarray(tokenizer(t, add_special_tokens=False)["input_ids"], np.int32) for t in texts]


@pytest.fixture(scope="session")
def torch_logits(torch_reference, prompt_ids) -> list[np.ndarray]:
  import torch
  with torch.no_grad():
    return [torch_reference(torch.from_numpy(ids[None].astype(np.int64))).logits[0].numpy()
            for ids in prompt_ids]


def max_abs_diff_per_prompt(logits_BxLxV, prompt_ids, torch_logits) -> list[float]:
  logits_BxLxV = np.asarray(logits_BxLxV)
  return [float(np.abs(logits_BxLxV[b, :len(ids)] - ref).max())
          for b, (ids, ref) in enumerate(zip(prompt_ids, torch_logits))]


def test_hf_dir_is_bit_exact_vs_transformers_gguf(smollm2_hf_dir, torch_reference):
  import safetensors.numpy
  import transformers
  ours = safetensors.numpy.load_file(str(smollm2_hf_dir / "model.safetensors"))
  reference = {k: v.numpy() for k, v in torch_reference.state_dict().items()}
  # Tied: transformers lists lm_head.weight as an alias of the embedding; the file stores it once.
  assert set(ours) == set(reference) - {"lm_head.weight"}
  assert len(ours) == 272
  for name, w in ours.items():
    np.testing.assert_array_equal(w.view(np.uint32), reference[name].view(np.uint32), err_msg=name)
  config = transformers.AutoConfig.from_pretrained(str(smollm2_hf_dir))
  assert config.rope_parameters["rope_theta"] == 100000.0
  assert torch_reference.config.rope_parameters["rope_theta"] == 100000.0
  assert config.tie_word_embeddings and (config.num_attention_heads, config.num_key_value_heads) == (9, 3)


def test_gguf_tokenizer_has_chat_template(smollm2_path, smollm2_hf_dir, prompt_ids):
  tokenizer = gg.gguf_tokenizer(smollm2_path)
  text = tokenizer.apply_chat_template(PROMPTS[0], tokenize=False, add_generation_prompt=True)
  assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
  np.testing.assert_array_equal(tokenizer(text, add_special_tokens=False)["input_ids"], prompt_ids[0])
  assert tokenizer.eos_token_id == 2


@pytest.fixture(scope="module")  # freed with the file: ~540 MB of float32
def smollm2_tensors(smollm2_path) -> tuple[dict, dict[str, np.ndarray]]:
  """read_gguf's (HF config, tensors), every tensor dequantized once for the whole file: the
  1-device model and both planted bugs build from these (a dequantization pass over SmolLM2 is
  ~17-40 s here); the 2x2x2 test goes through load_gguf itself."""
  config, tensors = gg.read_gguf(smollm2_path)
  return config, {name: tensors[name] for name in tensors}


@pytest.fixture(scope="module")
def jax_model(smollm2_path, smollm2_tensors):
  """What load_gguf(path) builds: hf.load_from_tensors of read_gguf's config and tensors."""
  from saro_jax.models import hf
  start = time.perf_counter()
  model = hf.load_from_tensors(*smollm2_tensors, param_dtype="float32", compute_dtype="float32",
                               source=smollm2_path)
  jax.block_until_ready(jax.tree.leaves(model))
  print(f"\nload_from_tensors (1 device): {time.perf_counter() - start:.1f} s")
  return model


# Tolerances: tests/error_model.py. SmolLM2 (30 layers, D 576, F 1536, 9 x 64 heads) on these
# prompts (L = 59) has transformer_depth 123,774 reductions on a logit's path; with the logit
# scale max|logit| = 43 that gives max|d| <= 2 gamma(depth) 43 = 0.64 and mean|d| <= 2 sqrt(depth)
# u 43 = 1.8e-3 between two fp32 programs (saro_jax/XLA vs PyTorch, or sharded vs one device).
# Measured on one x86 CPU: 3.8e-4 / 2.2e-5 vs PyTorch, 4.9e-4 / 2.2e-5 sharded (1300-1650x /
# 81x under). The planted bugs below exceed the same bounds by >= 10x (rope_theta 598x, one norm
# weight 17x). See BUILD.md "Parity bounds".
def smollm2_depth(seq_len: int) -> int:
  return em.transformer_depth(layers=30, hidden=576, intermediate=1536, num_heads=9, head_dim=64,
                              seq_len=seq_len)


def logits_parity(logits_BxLxV, prompt_ids, torch_logits, check=em.assert_parity, what=""):
  """Every real token's logits (of the right-padded batch) against the per-prompt reference."""
  logits_BxLxV = np.asarray(logits_BxLxV)
  ours = np.concatenate([logits_BxLxV[b, :len(ids)] for b, ids in enumerate(prompt_ids)])
  return check(ours, np.concatenate(torch_logits), smollm2_depth(logits_BxLxV.shape[1]),
               what=what)


def test_logits_match_pytorch(jax_model, prompt_ids, torch_logits):
  assert jax_model.config.rope_theta == 100000.0
  c = jax_model.config
  assert (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.head_dim) == (
      30, 576, 1536, 9, 64)  # the depth used by logits_parity
  logits_BxLxV = tiny_hf.jax_logits(jax_model, *tiny_hf.right_padded(prompt_ids))
  for b, (ids, ref) in enumerate(zip(prompt_ids, torch_logits)):
    d = np.abs(np.asarray(logits_BxLxV)[b, :len(ids)] - ref)
    print(f"SmolLM2 prompt of {len(ids)} tokens: max |logits - torch| = {d.max():.2e}, "
          f"mean {d.mean():.1e}")
  result = logits_parity(logits_BxLxV, prompt_ids, torch_logits, what="SmolLM2 vs PyTorch")
  # The same greedy next token wherever the reference's top two logits are further apart than
  # twice the measured error (a closer pair may legitimately swap on another CPU).
  for b, (ids, ref) in enumerate(zip(prompt_ids, torch_logits)):
    top2 = np.sort(ref, -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * result.max_err
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(np.asarray(logits_BxLxV)[b, :len(ids)].argmax(-1)[clear],
                                  ref.argmax(-1)[clear])


def _final_norm_element_up_10_percent(config, tensors):
  tensors = {k: tensors[k] for k in tensors}
  w = np.array(tensors["model.norm.weight"])
  w[np.abs(w).argmax()] *= 1.1
  return config, {**tensors, "model.norm.weight": w}


def _rope_theta_1e4(config, tensors):
  return {**config, "rope_theta": 10000.0,
          "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}, tensors


@pytest.mark.parametrize("bug", [_rope_theta_1e4, _final_norm_element_up_10_percent],
                         ids=["rope_theta_1e4", "one_final_norm_weight_+10%"])
def test_planted_bug_is_caught(bug, smollm2_tensors, prompt_ids, torch_logits):
  """Negative control: the bound of test_logits_match_pytorch fails by >= 10x on a real bug.
  (rms_norm_eps 1e-6 instead of 1e-5 also fails it, by 1.7x only: see BUILD.md.)"""
  from saro_jax.models import hf
  config, tensors = bug(*smollm2_tensors)
  model = hf.load_from_tensors(config, tensors, param_dtype="float32", compute_dtype="float32")
  logits_parity(model(*tiny_hf.right_padded(prompt_ids)), prompt_ids, torch_logits,
                check=em.assert_caught, what=bug.__name__)


def test_sharded_2x2x2_equals_single_device(smollm2_path, jax_model, prompt_ids):
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  start = time.perf_counter()
  sharded = gg.load_gguf(smollm2_path, mesh=mesh, param_dtype="float32", compute_dtype="float32")
  print(f"\nload_gguf (2x2x2 mesh): {time.perf_counter() - start:.1f} s")
  tokens_BxL, positions_BxL, segment_ids_BxL = tiny_hf.right_padded(  # B=4
      prompt_ids + prompt_ids[:1])
  graphdef, state = nnx.split(sharded)

  @jax.jit
  def forward(state, tokens_BxL, positions_BxL, segment_ids_BxL):
    return nnx.merge(graphdef, state)(tokens_BxL, positions_BxL, segment_ids_BxL)

  with sharding.use(mesh):
    put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh))
    logits_sharded = forward(state, put(tokens_BxL), put(positions_BxL), put(segment_ids_BxL))
  logits_single = tiny_hf.jax_logits(jax_model, tokens_BxL, positions_BxL, segment_ids_BxL)
  # The weights really are split over the mesh (not 8 replicas).
  assert sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state)) >= 30
  # Sharded contractions sum in another order (partial sums per device, then an all-reduce):
  # two fp32 programs of the same function, the same error model as against PyTorch.
  em.assert_parity(logits_sharded, logits_single, smollm2_depth(tokens_BxL.shape[1]),
                   mask=segment_ids_BxL > 0, what="2x2x2 mesh vs 1 device")
