"""The engine's step: sharded (2x2x2) == one device, and gradient accumulation 4x2 == 1x8."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import error_model as em
from saro_jax import models, sharding, train, xla_options
from saro_jax.data import bundled, pipeline
from saro_jax.models.config import ModelConfig
from saro_jax.optimizer import make_optimizer
from saro_jax.stages import rw

STEPS = 2
BATCH = 8
LENGTH = 64
LR, EPS = 1e-2, 1e-8


@pytest.fixture(scope="module")
def tokenizer():
  return models.load_tokenizer(bundled.path("tokenizer"))


@pytest.fixture(scope="module")
def host_batches(tokenizer):
  it = pipeline.sft_batches("bundled:rw_train", tokenizer, batch_size=BATCH, max_length=LENGTH,
                            seed=1, process_index=0, process_count=1)
  return [next(it) for _ in range(STEPS)]


def tiny_config(tokenizer) -> ModelConfig:
  return ModelConfig(family="llama", vocab_size=len(tokenizer), hidden_size=32,
                     intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                     rope_theta=5000.0, rms_norm_eps=1e-5, tie_embeddings=False)


def make_step(config, mesh, grad_accum=1, jit=True):
  """(the RW train step, its start state) for ``config`` on ``mesh``; call under sharding.use."""
  model = models.init_random(config, seed=0, mesh=mesh)
  graphdef, params = train.split_model(model)
  tx = make_optimizer(learning_rate=LR, warmup_steps=0, total_steps=STEPS, schedule="constant",
                      eps=EPS)
  state = train.init_state(params, tx, seed=0)
  loss_fn = rw.make_loss_fn(graphdef, vocab_size=config.vocab_size, chunk_size=16)
  step = train.make_train_step(loss_fn, tx, grad_accum=grad_accum,
                               normalizer_fn=rw.target_token_count, mesh=mesh)
  if jit:
    step = train.jit_step(step, state, {k: 2 for k in rw.SFT_KEYS}, mesh)
  return step, state


def run_steps(config, mesh, batches, grad_accum=1, jit=True):
  with sharding.use(mesh):
    step, state = make_step(config, mesh, grad_accum, jit)
    losses, sqrt_v_hats = [], []
    for batch in batches:
      state, metrics = step(state, train.put_batch(batch, mesh))
      losses.append(float(metrics["loss"]))
      sqrt_v_hats.append(sqrt_v_hat(state))
  return state, losses, sqrt_v_hats


def sqrt_v_hat(state) -> dict[str, np.ndarray]:
  """Adam's bias-corrected RMS gradient per parameter element after the step just taken."""
  adam, = [s for s in jax.tree.leaves(state.opt_state,
                                      is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
           if isinstance(s, optax.ScaleByAdamState)]
  correction = 1 - 0.999 ** int(adam.count)  # make_optimizer's default b2
  return {k: np.sqrt(v / correction) for k, v in params_of_tree(adam.nu).items()}


def params_of_tree(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(p): np.asarray(x, np.float64) for p, x in
          jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def params_of(state):
  return params_of_tree(state.params)


# Error model (tests/error_model.py). The tiny model's logits: depth = transformer_depth at
# LENGTH; the token-mean loss adds logsumexp over the vocabulary and the sum over BATCH * LENGTH
# tokens; a gradient adds the backward's transposed reductions (grad_depth). Both layouts are fp32
# programs of the same step, so every difference is rounding:
#  - losses: max_bound / mean_bound at loss_depth, relative to the loss (~7.6 nats);
#  - parameters: Adam divides each gradient by its own RMS, so the bound is per element
#    (adam_param_bound), from the gradient's worst-case relative error 2 * gamma(grad_depth)
#    (two programs) and the reference run's sqrt(v_hat) after each step.
def depths(config) -> tuple[int, int]:
  forward = em.model_depth(config, LENGTH)
  tokens = BATCH * LENGTH
  return (em.loss_depth(forward, vocab=config.vocab_size, tokens=tokens),
          em.grad_depth(forward, vocab=config.vocab_size, tokens=tokens))


def param_excess(config, reference, other_state) -> float:
  """max over elements of |param difference| / adam_param_bound (<= 1: within the model)."""
  ref_state, _, ref_sqrt_v_hats = reference
  grad_rel_err = 2 * em.gamma(depths(config)[1])
  ref, other = params_of(ref_state), params_of(other_state)
  excess = {}
  for k in ref:
    bound = em.adam_param_bound([s[k] for s in ref_sqrt_v_hats], lr=LR,
                                grad_rel_err=grad_rel_err, eps=EPS)
    excess[k] = float(np.max(np.abs(ref[k] - other[k]) / bound))
  worst = max(excess, key=excess.get)
  print(f"params: max |d| {max(float(np.abs(ref[k] - other[k]).max()) for k in ref):.2e}; "
        f"worst |d| / bound = {excess[worst]:.2e} in {worst}")
  return excess[worst]


def assert_same_step(config, reference, run, what):
  state, losses, _ = run
  em.assert_parity(losses, reference[1], depths(config)[0], what=f"{what} losses")
  excess = param_excess(config, reference, state)
  assert excess <= 1.0, f"{what}: parameters differ beyond the Adam error model ({excess:.2f}x)"


@pytest.fixture(scope="module")
def baseline(tokenizer, host_batches):
  """One device, no accumulation: the reference every other layout must reproduce."""
  return run_steps(tiny_config(tokenizer), sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]),
                   host_batches)


def test_sharded_2x2x2_equals_one_device(tokenizer, host_batches, baseline):
  config = tiny_config(tokenizer)
  one, one_losses, _ = baseline
  mesh = sharding.make_mesh(2, 2, 2)
  many, many_losses, _ = run = run_steps(config, mesh, host_batches)
  # The weights really are spread over the mesh (embed over fsdp, vocab over tensor).
  embed = many.params["embed_VxD"][...]
  assert len(embed.sharding.device_set) == 8
  assert embed.addressable_shards[0].data.shape == (config.vocab_size // 2, config.hidden_size // 2)
  print("losses 1 device", one_losses, "2x2x2", many_losses)
  assert one_losses[-1] < one_losses[0]  # it learns
  assert_same_step(config, baseline, run, "2x2x2 vs 1 device")
  assert int(many.step) == STEPS
  # AdamW's mu and nu live where their params live, not replicated on every device (jit gave
  # zeros_like outputs a replicated sharding until train._state_init_fn constrained them).
  mu = many.opt_state[1][0].mu
  for path, p_leaf in jax.tree_util.tree_flatten_with_path(many.params)[0]:
    m_leaf = dict(jax.tree_util.tree_flatten_with_path(mu)[0])[path]
    assert m_leaf.sharding.is_equivalent_to(p_leaf.sharding, p_leaf.ndim), jax.tree_util.keystr(path)
  like = train.abstract_state(jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), many.params),
      make_optimizer(learning_rate=1e-2, warmup_steps=0, total_steps=STEPS, schedule="constant"), 0)
  assert jax.tree.map(lambda a, b: a.sharding.is_equivalent_to(b.sharding, a.ndim),
                      like.opt_state, many.opt_state) == jax.tree.map(lambda _: True, like.opt_state)


def test_grad_accumulation_4x2_equals_1x8(tokenizer, host_batches, baseline):
  """Token-normalised over the GLOBAL batch, so accumulation changes nothing (packed rows hold
  different numbers of target tokens, which a mean of micro-batch means would get wrong).
  The 4 micro-batches of 2 run sharded on a 1x2x4 mesh; the 1x8 reference on one device."""
  config = tiny_config(tokenizer)
  mesh = sharding.make_mesh(1, 2, 4)
  run = run_steps(config, mesh, host_batches, grad_accum=4)
  print("losses 1x8", baseline[1], "4x2", run[1])
  assert_same_step(config, baseline, run, "4x2 accumulated vs 1x8")


def test_a_lost_row_is_caught(tokenizer, host_batches, baseline):
  """Negative control for the two tests above: the step loses one of the 8 rows' targets (what
  a missing all-reduce over a data shard, or a dropped micro-batch, does). The same bounds must
  fail by >= 10x."""
  config = tiny_config(tokenizer)
  lossy = [{**b, "loss_mask": np.concatenate([0 * b["loss_mask"][:1], b["loss_mask"][1:]])}
           for b in host_batches]
  state, losses, _ = run_steps(config, sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]),
                               lossy)
  em.assert_caught(losses, baseline[1], depths(config)[0], what="one row lost: losses")
  assert param_excess(config, baseline, state) >= 10.0


def test_micro_batches_keep_each_devices_rows():
  """Micro-batch i takes rows i, i+A, ...: every device's contiguous block splits evenly."""
  x = np.arange(8 * 3).reshape(8, 3)
  micro = train.micro_batches({"x": x}, 4, None)["x"]
  assert micro.shape == (4, 2, 3)
  np.testing.assert_array_equal(micro[1], x[[1, 5]])
  # Swapping back restores the batch: the layout is a pure interleave, nothing is lost or doubled.
  np.testing.assert_array_equal(np.asarray(micro).swapaxes(0, 1).reshape(8, 3), x)


def test_the_step_hands_its_gradient_norm_to_the_optimizer():
  """The norm is computed once a step (``optimizer.global_norm``): the metric, the non-finite
  check and the clipping (``grad_norm=``) all read that one value. An optimizer that moves every
  weight by the norm it is given shows which norm arrived; a plain optax one still works."""
  x = np.array([[3.0, 4.0], [0.0, 12.0]], np.float32)  # the gradient: norm 13
  loss_fn = lambda params, batch, normalizer: (jnp.sum(params["w"] * batch["x"]), {})
  by_norm = optax.GradientTransformationExtraArgs(
      lambda params: optax.EmptyState(),
      lambda updates, state, params=None, *, grad_norm=None, **extra: (
          jax.tree.map(lambda u: jnp.zeros_like(u) + grad_norm, updates), state))
  for optimizer, want in ((by_norm, np.full_like(x, 13.0)), (optax.sgd(0.5), -0.5 * x)):
    step = jax.jit(train.make_train_step(loss_fn, optimizer, grad_accum=1,
                                         normalizer_fn=lambda batch: jnp.float32(1)))
    state = train.init_state({"w": jnp.ones_like(x)}, optimizer, 0)
    state, metrics = step(state, {"x": jnp.asarray(x)})
    assert float(metrics["grad_norm"]) == 13.0  # exact: squares and sums of small integers
    np.testing.assert_array_equal(np.asarray(state.params["w"]) - 1.0, want)


def test_the_step_never_copies_a_moment_buffer(tokenizer, host_batches):
  """The update skipped on a non-finite step is a ``lax.cond`` (train.make_train_step): with a
  select of new against old XLA fused each moment's update into the weight's fusion too, read the
  old moments after overwriting them in place, and so copied every moment buffer first (on
  SmolLM2's RW step: 0.28 GiB more temp memory). The compiled step must hold no copy shaped like
  a weight."""
  import re
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  with sharding.use(mesh):
    step, state = make_step(tiny_config(tokenizer), mesh)
    hlo = step.lower(state, train.put_batch(host_batches[0], mesh)).compile().as_text()
  weight_shapes = {"f32[" + ",".join(map(str, x.shape)) + "]"
                   for x in jax.tree.leaves(state.params) if x.ndim >= 2}
  copied = set(re.findall(r"= (f32\[[\d,]+\])\S* copy\(", hlo)) & weight_shapes
  assert not copied, f"the compiled step copies buffers shaped like weights: {sorted(copied)}"


def _ynn_fusions(compiled) -> tuple[int, int]:
  """(YNNPACK fusions holding a dot, those holding a reduction) in a compiled CPU program: each
  ``kind=kCustom`` call of a computation named ``ynn_fusion*``, classified by the instructions of
  the computation it calls."""
  text = compiled.as_text()
  # Each computation: a header line "[ENTRY ]%name (...) -> ... {", its body, a line "}" (the
  # module's header line can sit right above the first one).
  bodies = dict(re.findall(r"^(?:ENTRY )?%([\w.-]+) [^\n]*\{\n(.*?)^\}$", text, re.M | re.S))
  dots = reductions = 0
  for callee in re.findall(r"%ynn_fusion[.\d]* = .*?kind=kCustom, calls=%([\w.-]+)", text):
    dots += " dot(" in bodies[callee]
    reductions += " reduce(" in bodies[callee]
  return dots, reductions


def test_cpu_steps_compile_with_the_memory_optimized_scheduler_and_ynnpack_dots_only(
    tokenizer, host_batches, monkeypatch):
  """On CPU, train.jit_step compiles with xla_options.CPU_STEP_OPTIONS:
  - XLA's memory-optimized scheduler: the same program in another order, so one step gives the
    same state bit for bit as the compiler's default schedule and needs less temp memory
    (SmolLM2's SRPO step: 3.70 -> 3.21 GiB);
  - YNNPACK for the dots only: no reduction is a YNNPACK call any more (XLA's own loops, with
    their elementwise producers fused in), the dots still are. The same function with the
    reductions' sums in another order, so the steps agree within the fp32 error model: losses at
    loss_depth, parameters within the Adam bound of param_excess (the same bounds
    that test_a_lost_row_is_caught shows failing >= 10x on a lost row).
  GPU/TPU meshes get the compiler's defaults; an option the compiler rejects is dropped alone."""
  import types
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  assert xla_options.step_options(mesh) == xla_options.CPU_STEP_OPTIONS
  gpu = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform="gpu")]))
  assert xla_options.step_options(gpu) is None
  assert not xla_options.cpu_takes({"xla_cpu_scheduler_type": "NO_SUCH_SCHEDULER"})
  scheduler = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
  with monkeypatch.context() as m:
    m.setattr(xla_options, "CPU_STEP_OPTIONS",
              dict(xla_options.CPU_STEP_OPTIONS, xla_cpu_scheduler_type="NO_SUCH_SCHEDULER"))
    assert xla_options.step_options(mesh) == {
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
  config = tiny_config(tokenizer).replace(num_layers=4)
  with sharding.use(mesh):
    step, state = make_step(config, mesh)
    batches = [train.put_batch(b, mesh) for b in host_batches]
    programs = {
        "ours": step.lower(state, batches[0]).compile(),
        "scheduler": jax.jit(step.__wrapped__, donate_argnums=0,
                             compiler_options=scheduler).lower(state, batches[0]).compile(),
        "default": jax.jit(step.__wrapped__, donate_argnums=0).lower(state, batches[0]).compile()}
    runs = {}
    for name, program in programs.items():
      s, losses, sqrt_v_hats = jax.tree.map(jnp.copy, state), [], []
      for batch in batches:
        s, metrics = program(s, batch)
        losses.append(float(metrics["loss"]))
        sqrt_v_hats.append(sqrt_v_hat(s))
      runs[name] = (s, losses, sqrt_v_hats)
  # Buffer assignment is a property of the compiled program, not a timing: on this 4-layer
  # model 11.5 MB against 12.4 MB (a step compiled without the scheduler option would tie).
  temp = lambda c: c.memory_analysis().temp_size_in_bytes
  assert temp(programs["scheduler"]) < temp(programs["default"])
  assert runs["scheduler"][1] == runs["default"][1]
  for x, y in zip(jax.tree.leaves(runs["scheduler"][0]), jax.tree.leaves(runs["default"][0])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  fusions = {name: _ynn_fusions(program) for name, program in programs.items()}
  print("YNNPACK fusions (dots, reductions):", fusions)  # this jaxlib's default: both
  assert fusions["ours"][0] > 0 and fusions["ours"][1] == 0, fusions
  loss_depth, _ = depths(config)
  em.assert_parity(runs["ours"][1], runs["default"][1], loss_depth,
                   what="losses, YNNPACK dots only vs XLA's default")
  assert param_excess(config, runs["default"], runs["ours"][0]) <= 1.0
