"""losses.py against independent NumPy implementations of TRL's formulas."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import error_model as em
from saro_jax import losses, sharding
from saro_jax.models import transformer

# --------------------------------------------------------------------------------------------
# NumPy references (float64): the formulas as TRL writes them, computed independently.
# --------------------------------------------------------------------------------------------


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_token_stats(hidden, unembed, targets, vocab_size):
  logits = (hidden.astype(np.float64) @ unembed.astype(np.float64))[..., :vocab_size]
  logps = np.take_along_axis(np_log_softmax(logits), targets[..., None], -1)[..., 0]
  return logps, logits.mean(-1), logits


def np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def np_dpo(pc, pr, rc, rr, nc, nr, loss_type, beta, eps=0.0, rpo_alpha=None):
  """TRL DPOTrainer.dpo_loss + get_batch_loss_metrics, with TRL's IPO length averaging."""
  if loss_type == "ipo":
    pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
  logits = (pc - pr) - (rc - rr)
  if loss_type == "sigmoid":
    losses_ = -np_log_sigmoid(beta * logits) * (1 - eps) - np_log_sigmoid(-beta * logits) * eps
  elif loss_type == "robust":
    losses_ = (-np_log_sigmoid(beta * logits) * (1 - eps)
               + np_log_sigmoid(-beta * logits) * eps) / (1 - 2 * eps)
  elif loss_type == "hinge":
    losses_ = np.maximum(0.0, 1 - beta * logits)
  elif loss_type == "ipo":
    losses_ = (logits - 1 / (2 * beta)) ** 2
  cr, rj = beta * (pc - rc), beta * (pr - rr)
  metrics = {"rewards/chosen": cr.mean(), "rewards/rejected": rj.mean(),
             "rewards/accuracies": (cr > rj).mean(), "rewards/margins": (cr - rj).mean(),
             "logps/chosen": pc.mean(), "logps/rejected": pr.mean()}
  loss = losses_.mean()
  return loss, metrics


def assert_within(got, want, bound, what=""):
  """|got - want| <= bound elementwise (bound: a scalar or an array like want)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  diff, bound = np.abs(got - want), np.broadcast_to(bound, want.shape)
  # A zero bound (an exactly-zero reference, e.g. padded columns) demands an exact zero.
  excess = float(np.max(np.where(bound > 0, diff / np.where(bound > 0, bound, 1),
                                 np.where(diff > 0, np.inf, 0.0))))
  print(f"{what}: max|d| {np.abs(got - want).max():.2e}, worst |d| / bound {excess:.2e}")
  assert excess <= 1.0, f"{what}: {excess:.2f}x the fp32 error bound"


def token_stats_depth(d, vocab, vocab_chunk=None):
  """A token's log-prob / mean logit (tests/error_model.py): the D-term dot, logsumexp (or the
  mean) over the vocabulary, and the online rescaling per vocabulary chunk (a few ulp each)."""
  chunks = -(-vocab // vocab_chunk) if vocab_chunk else 1
  return d + vocab + chunks * em.ELEMENTWISE_ULPS


def formula_bound(f, arrays, depth, programs=1, rel_step=1e-7):
  """fp32 error bound for each scalar output of the float64 formula ``f(*arrays)`` (a dict):
  gamma(depth) * (|f| + sum_i |x_i df/dx_i|). The second term is the formula's condition number
  at these inputs (e.g. (pc - pr) - (rc - rr) cancels: its error is relative to the inputs, not
  to the result); it is measured by float64 differences of f itself, one input at a time.
  ``depth``: roundings on the path (inputs to fp32, elementwise ops, the batch mean)."""
  base = f(*arrays)
  sensitivity = {k: 0.0 for k in base}
  for j, x in enumerate(arrays):
    for idx in np.ndindex(x.shape):
      h = rel_step * max(abs(x[idx]), 1e-30)
      moved = [np.array(a, np.float64) for a in arrays]
      moved[j][idx] += h
      up = f(*moved)
      moved[j][idx] -= 2 * h
      down = f(*moved)
      for k in base:
        sensitivity[k] += abs(x[idx]) * abs(up[k] - down[k]) / (2 * h)
  return {k: programs * em.gamma(depth) * (abs(base[k]) + sensitivity[k]) for k in base}


def np_dpo_flat(loss_type, beta, eps, rpo_alpha=None):
  """np_dpo as one dict of scalars (loss + metrics), for formula_bound."""
  def f(pc, pr, rc, rr, nc, nr):
    loss, metrics = np_dpo(pc, pr, rc, rr, nc, nr, loss_type, beta, eps)
    return {"loss": loss, **metrics}
  return f


# Roundings of one DPO evaluation: the 4 inputs to fp32, ~8 arithmetic ops per pair, log-sigmoid
# (ELEMENTWISE_ULPS) and the batch mean over up to 16 pairs.
DPO_DEPTH = 4 + 8 + em.ELEMENTWISE_ULPS + 16


def rand(seed, *shape, scale=1.0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


# --------------------------------------------------------------------------------------------
# token log-probs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk,vocab_chunk", [(8, None), (5, None), (64, None), (8, 7), (3, 16)])
def test_token_logps_match_numpy_with_padded_vocab(chunk, vocab_chunk):
  b, l, d, v_pad, vocab = 3, 21, 16, 48, 41  # 7 padding columns that must not enter the softmax
  hidden, unembed = rand(0, b, l, d), rand(1, d, v_pad)
  unembed[:, vocab:] = 50.0  # huge padded logits would dominate if they leaked in
  targets = np.random.default_rng(2).integers(0, vocab, (b, l))
  logps, mean_logits = losses.token_logps_and_mean_logits(
      jnp.asarray(hidden), jnp.asarray(unembed), jnp.asarray(targets), vocab_size=vocab,
      chunk_size=chunk, vocab_chunk_size=vocab_chunk)
  want_logps, want_mean, logits = np_token_stats(hidden, unembed, targets, vocab)
  assert logps.shape == mean_logits.shape == (b, l)
  # One fp32 program vs float64, relative to the logit scale.
  bound = em.max_bound(np.abs(logits).max(), token_stats_depth(d, vocab, vocab_chunk), programs=1)
  assert_within(logps, want_logps, bound, "logps")
  assert_within(mean_logits, want_mean, bound, "mean logits")


@pytest.mark.parametrize("vocab_chunk", [None, 16])
def test_masked_token_logps_compute_only_scored_positions(vocab_chunk):
  """``mask_BxL``: scored positions equal the float64 reference (the same fp32 bound as without the
  mask), the others are exactly 0, and the gradients equal the unmasked path's on a masked loss."""
  b, l, d, v_pad, vocab = 3, 23, 16, 48, 41
  hidden, unembed = rand(40, b, l, d), rand(41, d, v_pad)
  targets = np.random.default_rng(42).integers(0, vocab, (b, l))
  rng = np.random.default_rng(43)
  mask = rng.random((b, l)) < np.array([[0.3], [0.7], [0.0]])  # an empty row too
  run = lambda h, w, m: losses.token_logps_and_mean_logits(
      h, w, jnp.asarray(targets), vocab_size=vocab, chunk_size=5, vocab_chunk_size=vocab_chunk,
      mask_BxL=m)
  # Each call below is one compiled program (op by op, every op would compile on its own).
  logps, mean_logits = jax.jit(run)(jnp.asarray(hidden), jnp.asarray(unembed), jnp.asarray(mask))
  want_logps, want_mean, logits = np_token_stats(hidden, unembed, targets, vocab)
  bound = em.max_bound(np.abs(logits).max(), token_stats_depth(d, vocab, vocab_chunk), programs=1)
  assert_within(np.where(mask, logps, 0.0), np.where(mask, want_logps, 0.0), bound, "logps")
  assert_within(np.where(mask, mean_logits, 0.0), np.where(mask, want_mean, 0.0), bound, "mean")
  assert not np.any(np.asarray(logps)[~mask]) and not np.any(np.asarray(mean_logits)[~mask])

  weights = jnp.asarray(rng.normal(size=(b, l)), jnp.float32)
  def loss(h, w, m):
    lp, ml = run(h, w, m)
    return jnp.sum(jnp.where(jnp.asarray(mask), weights * (lp + ml), 0.0))
  args = (jnp.asarray(hidden), jnp.asarray(unembed))
  got = jax.jit(jax.grad(loss, (0, 1)))(*args, jnp.asarray(mask))
  want = jax.jit(jax.grad(loss, (0, 1)))(*args, None)
  # d hidden: each position's own chunk computation, the same arithmetic. d unembed: a sum over
  # the scored positions in another chunk order (b * l terms of |w| * |h| * |d logits| <= |w| |h|
  # each, d logits summing to <= 2 per position).
  assert_within(got[0], want[0], em.max_bound(np.abs(np.asarray(want[0])).max(),
                                              token_stats_depth(d, vocab, vocab_chunk)), "d hidden")
  scale = 2 * np.abs(weights).max() * np.abs(hidden).max() * b * l
  assert_within(got[1], want[1], em.max_bound(scale, b * l + token_stats_depth(d, vocab)), "d unembed")


def test_masked_token_logps_skip_chunks_past_the_longest_row_forward_and_backward():
  """Rows of 8 scored positions in chunks of 4: chunks 2.. hold only unscored positions, whose
  hidden states are NaN. Were those chunks computed, the NaN would reach d unembed (NaN * 0 is
  NaN); skipped, everything stays finite. Without the mask the same inputs do give NaN."""
  b, l, d, v = 2, 20, 8, 30
  hidden, unembed = rand(50, b, l, d), rand(51, d, v)
  mask = np.zeros((b, l), bool)
  mask[0, [1, 2, 4, 6, 9, 11, 12, 19]] = True
  mask[1, :8] = True
  hidden[~mask] = np.nan
  targets = jnp.asarray(np.random.default_rng(52).integers(0, v, (b, l)))

  def loss(h, w, m):
    lp = losses.token_logps(h, w, targets, vocab_size=v, chunk_size=4, mask_BxL=m)
    return jnp.sum(jnp.where(jnp.asarray(mask), lp, 0.0))

  args = (jnp.asarray(hidden), jnp.asarray(unembed))
  value, (d_hidden, d_unembed) = jax.jit(jax.value_and_grad(loss, (0, 1)))(*args,
                                                                            jnp.asarray(mask))
  assert np.isfinite(float(value)) and np.all(np.isfinite(d_unembed))
  assert np.all(np.isfinite(np.asarray(d_hidden)[mask])) and not np.any(np.asarray(d_hidden)[~mask])
  assert not np.all(np.isfinite(jax.jit(jax.grad(loss, 1))(*args, None)))


def test_masked_chunks_run_to_the_fullest_device_blocks_count_not_the_longest_rows():
  """Rows with 8, 1, 1 and 1 scored positions in chunks of 4: per-row compaction would run
  ceil(8 / 4) = 2 chunks (every row the longest row's count); the scored positions of one block
  of rows share the chunks' B x C = 16 slots, so 11 take 1 chunk on one device. On a mesh whose
  batch is split in 2 blocks (data 2), each block packs its own rows: rows 0-1 (9 scored) and
  2-3 (2) in slots of 2 x 4 = 8 take 2 chunks; in 4 blocks (data 2 x fsdp 2), one row each,
  2 again. The log-probs are the unsharded ones (the bound of test_token_logps_sharded_...), and
  the sort stays within each device's rows: the program moves no hidden state between devices
  (no all-gather, all-to-all or collective-permute; the vocabulary split over tensor adds
  all-reduces only)."""
  b, l, d, v = 4, 12, 8, 64
  hidden, unembed = rand(60, b, l, d), rand(61, d, v)
  targets = np.random.default_rng(62).integers(0, 60, (b, l))
  mask = np.zeros((b, l), bool)
  mask[0, 2:10] = True
  mask[1:, 5] = True

  def n_active(h, t, m):
    return losses._Chunks.of(h, t, m, 4).n_active

  args = (jnp.asarray(hidden), jnp.asarray(targets), jnp.asarray(mask))
  assert int(jax.jit(n_active)(*args)) == 1
  want = losses.token_logps(jnp.asarray(hidden), jnp.asarray(unembed), jnp.asarray(targets),
                            vocab_size=60, chunk_size=4, mask_BxL=jnp.asarray(mask))
  scale = np.abs(hidden.astype(np.float64) @ unembed).max()
  for (data, fsdp, tensor), chunks in (((2, 1, 4), 2), ((2, 2, 2), 2)):
    mesh = sharding.make_mesh(data=data, fsdp=fsdp, tensor=tensor)
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    rows = lambda x: put(x, P(("data", "fsdp")))

    def under_mesh(fn):
      def run(*a):
        with sharding.use(mesh):
          return fn(*a)
      return jax.jit(run)

    assert sharding.batch_blocks(b) == 1  # no mesh in use here
    with sharding.use(mesh):
      assert sharding.batch_blocks(b) == data * fsdp and sharding.batch_blocks(3) == 1
    assert int(under_mesh(n_active)(*map(rows, args))) == chunks
    logps = under_mesh(lambda h, w, t, m: losses.token_logps(
        h, w, t, vocab_size=60, chunk_size=4, mask_BxL=m))
    sharded = (rows(hidden), put(unembed, P(None, "tensor")), rows(targets), rows(mask))
    assert_within(logps(*sharded), want, em.max_bound(scale, token_stats_depth(d, 60, 32)),
                  f"logps on {data}x{fsdp}x{tensor}")
    hlo = logps.lower(*sharded).compile().as_text()
    moved = re.findall(r"all-gather|all-to-all|collective-permute", hlo)
    assert not moved, (data, fsdp, tensor, sorted(set(moved)))


def test_token_logps_bf16_inputs_accumulate_in_float32():
  hidden, unembed = rand(30, 2, 9, 64), rand(31, 64, 40)
  targets = np.random.default_rng(32).integers(0, 40, (2, 9))
  h16, w16 = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(unembed, jnp.bfloat16)
  logps = losses.token_logps(h16, w16, jnp.asarray(targets), vocab_size=40, chunk_size=4)
  assert logps.dtype == jnp.float32
  # Reference on the bf16-rounded values in float64: only the input rounding differs.
  want, _, logits = np_token_stats(np.asarray(h16, np.float32), np.asarray(w16, np.float32),
                                   targets, 40)
  # bf16 x bf16 products are exact in fp32 (8 + 8 significand bits), so with fp32 accumulation
  # the only error left is fp32's: a logit rounded to bf16 anywhere would be 2^-8 |logit|, >> this.
  assert_within(logps, want, em.max_bound(np.abs(logits).max(), token_stats_depth(64, 40),
                                          programs=1), "bf16 inputs")


@pytest.mark.parametrize("vocab_chunk,keep_logits", [(None, False), (10, False), (None, True)])
def test_token_logps_gradient_is_the_analytic_softmax_gradient(vocab_chunk, keep_logits):
  """Recomputed in the backward or kept from the forward (``keep_logits``), the same bound."""
  b, l, d, v_pad, vocab = 2, 12, 8, 32, 29
  hidden, unembed = rand(3, b, l, d), rand(4, d, v_pad)
  targets = np.random.default_rng(5).integers(0, vocab, (b, l))
  weights = rand(6, b, l)

  def objective(h, w):
    return jnp.sum(weights * losses.token_logps(h, w, jnp.asarray(targets), vocab_size=vocab,
                                                chunk_size=5, vocab_chunk_size=vocab_chunk,
                                                keep_logits=keep_logits))

  g_hidden, g_unembed = jax.jit(jax.grad(objective, (0, 1)))(jnp.asarray(hidden),
                                                              jnp.asarray(unembed))
  # d log p(y) / d logits = onehot(y) - softmax; padded columns get no gradient.
  _, _, logits = np_token_stats(hidden, unembed, targets, vocab)
  dlogits = np.eye(vocab)[targets] - np.exp(np_log_softmax(logits))
  dlogits = np.pad(dlogits * weights[..., None], ((0, 0), (0, 0), (0, v_pad - vocab)))
  # Higham's bound per element: gamma(depth) * sum|terms| of the reduction that forms it, depth =
  # the forward (d-term dot, softmax over the vocabulary) + the backward contraction (vocabulary
  # for the hidden gradient, b * l tokens for the unembedding's), plus a vocabulary-chunk pass.
  depth = token_stats_depth(d, vocab, vocab_chunk) + vocab + b * l
  assert_lm_head_gradients(g_hidden, g_unembed, hidden, unembed, dlogits, em.gamma(depth), vocab)


def assert_lm_head_gradients(g_hidden, g_unembed, hidden, unembed, dlogits, gamma, vocab):
  """d hidden = d logits unembed^T and d unembed = hidden^T d logits, each element within
  gamma * the sum of its terms' magnitudes; the padding columns' gradient exactly 0."""
  abs_unembed = np.abs(unembed.T.astype(np.float64))
  assert_within(g_hidden, dlogits @ unembed.T.astype(np.float64),
                gamma * (np.abs(dlogits) @ abs_unembed), "d hidden")
  assert_within(g_unembed, np.einsum("bld,blv->dv", hidden, dlogits),
                gamma * np.einsum("bld,blv->dv", np.abs(hidden), np.abs(dlogits)), "d unembed")
  assert np.all(np.asarray(g_unembed)[:, vocab:] == 0.0)


@pytest.mark.parametrize("chunk,vocab_chunk", [(5, None), (64, None), (4, 16)])
def test_token_nll_sum_value_and_gradient_match_the_analytic_softmax(chunk, vocab_chunk):
  """``token_nll_sum`` (the RW loss's lm head: its gradient formed in the forward) against the
  float64 formula: -sum of the scored log-probs, the count, and under the loss's 1 / count
  scaling d hidden and d unembed = mask * (softmax - onehot) contracted with unembed / hidden."""
  b, l, d, v_pad, vocab = 3, 14, 8, 32, 29
  hidden, unembed = rand(60, b, l, d), rand(61, d, v_pad)
  rng = np.random.default_rng(62)
  targets = rng.integers(0, vocab, (b, l))
  mask = rng.random((b, l)) < np.array([[0.5], [1.0], [0.0]])  # an empty row too

  def loss(h, w, m):
    nll_sum, count = losses.token_nll_sum(h, w, jnp.asarray(targets), m, vocab_size=vocab,
                                          chunk_size=chunk, vocab_chunk_size=vocab_chunk)
    return nll_sum / count, count

  args = (jnp.asarray(hidden), jnp.asarray(unembed), jnp.asarray(mask))
  (value, count), (g_hidden, g_unembed) = jax.jit(
      jax.value_and_grad(loss, (0, 1), has_aux=True))(*args)
  logps, _, logits = np_token_stats(hidden, unembed, targets, vocab)
  n = mask.sum()
  assert float(count) == n
  # The value: each scored log-prob within its own bound (a D-term dot, a log-sum-exp over the
  # vocabulary), then a sum over <= b * l of them and the division.
  per_token = em.max_bound(np.abs(logits).max(), token_stats_depth(d, vocab, vocab_chunk), 1)
  want = -np.where(mask, logps, 0.0).sum() / n
  assert abs(float(value) - want) <= per_token + em.gamma(b * l + 1) * np.abs(logps[mask]).sum() / n
  # The gradients as test_token_logps_gradient_is_the_analytic_softmax_gradient bounds them, with
  # the cotangent 1 / n (one more rounding).
  dlogits = np.exp(np_log_softmax(logits)) - np.eye(vocab)[targets]
  dlogits = np.pad(dlogits * (mask / n)[..., None], ((0, 0), (0, 0), (0, v_pad - vocab)))
  gamma = em.gamma(token_stats_depth(d, vocab, vocab_chunk) + vocab + b * l + 1)
  assert_lm_head_gradients(g_hidden, g_unembed, hidden, unembed, dlogits, gamma, vocab)
  assert not np.any(np.asarray(g_hidden)[~mask])


def _dots(fn, *args) -> int:
  """How many dots ``fn``'s optimized program holds (a loop body's counted once)."""
  return len(re.findall(r" dot\(", jax.jit(fn).lower(*args).compile().as_text()))


def test_token_nll_sum_computes_each_chunks_logits_once():
  # The NLL sum's gradient is formed in the forward (``_full_vocab_nll_sum``): per chunk the
  # logits, d hidden and d unembed products, three in all, where log-probs under ``sft_loss``
  # recompute the logits in the backward: four. Both inside their chunk loops, so the count is
  # per loop body, whatever the number of chunks; the lm head is all these programs multiply.
  b, l, d, v = 2, 16, 8, 96
  args = (jnp.asarray(rand(18, b, l, d)), jnp.asarray(rand(19, d, v)),
          jnp.asarray(np.random.default_rng(20).integers(0, v, (b, l))),
          jnp.asarray(np.arange(l)[None].repeat(b, 0) >= 4))
  fused = lambda h, w, t, m: losses.token_nll_sum(h, w, t, m, vocab_size=v, chunk_size=4)[0]
  plain = lambda h, w, t, m: losses.sft_loss(
      losses.token_logps(h, w, t, vocab_size=v, chunk_size=4, mask_BxL=m), m)[0]
  assert _dots(jax.grad(fused, (0, 1)), *args) == 3
  assert _dots(jax.grad(plain, (0, 1)), *args) == 4
  # A frozen unembedding (LoRA RW): the forward's d unembed is dead code and goes, 2 products.
  assert _dots(jax.grad(fused, 0), *args) == 2


def test_kept_logits_save_the_backwards_lm_head_product():
  """``keep_logits`` (``train.logps_keep_logits``): the backward reads each chunk's logits from
  the forward, three lm-head products per chunk instead of four, with the forward's log-probs
  and mean logits unchanged bit for bit (the same computation; storing the logits adds a copy),
  on a masked batch whose chunks past the longest row are skipped and a padded vocabulary. Its
  gradient against the float64 formula: test_token_logps_gradient_is_the_analytic_softmax_gradient.
  With vocabulary slices the logits are never whole, so asking for both is an error."""
  b, l, d, v_pad, vocab = 3, 20, 16, 96, 90
  rng = np.random.default_rng(72)
  args = (jnp.asarray(rand(70, b, l, d)), jnp.asarray(rand(71, d, v_pad)))
  targets = jnp.asarray(rng.integers(0, vocab, (b, l)))
  mask = jnp.asarray(rng.random((b, l)) < np.array([[0.3], [0.9], [0.0]]))

  def stats(h, w, keep):
    return losses.token_logps_and_mean_logits(h, w, targets, vocab_size=vocab, chunk_size=4,
                                              mask_BxL=mask, keep_logits=keep)

  objective = lambda keep: lambda h, w: sum(jnp.sum(x) for x in stats(h, w, keep))
  kept, recomputed = (jax.jit(stats, static_argnums=2)(*args, keep) for keep in (True, False))
  for got, want in zip(kept, recomputed):
    np.testing.assert_array_equal(got, want)
  assert _dots(jax.grad(objective(True), (0, 1)), *args) == 3
  assert _dots(jax.grad(objective(False), (0, 1)), *args) == 4
  with pytest.raises(ValueError, match="keep_logits needs the full-vocabulary path"):
    losses.token_logps(*args, targets, vocab_size=vocab, chunk_size=4, vocab_chunk_size=32,
                       keep_logits=True)


def _rows_contracting_dots(fn, *args) -> int:
  """How many dots of ``fn``'s optimized program contract their left operand's major dim."""
  hlo = jax.jit(fn).lower(*args).compile().as_text()
  return len(re.findall(r"= f32\[[\d,]+\]\{[\d,]+\} dot\(.*lhs_contracting_dims=\{0\}", hlo))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's product layouts")
def test_unembedding_gradient_is_a_plain_product_on_cpu():
  # d unembed = hidden^T d_logits contracts the rows. On XLA:CPU the loss forms it on a row-major
  # copy of hidden^T (``rows_contracted_dot(wide=True)``): read in place, Eigen ran SmolLM2's
  # [576, 49152] gradient at 38-69 GFLOP/s against 62-145 for the copy's plain product. Its
  # numbers: test_token_logps_gradient_is_the_analytic_softmax_gradient.
  b, l, d, v = 2, 16, 8, 64
  args = (jnp.asarray(rand(10, b, l, d)), jnp.asarray(rand(11, d, v)),
          jnp.asarray(np.random.default_rng(12).integers(0, v, (b, l))))
  objective = lambda h, w, t: losses.token_logps(h, w, t, vocab_size=v, chunk_size=8).sum()
  assert _rows_contracting_dots(jax.grad(objective, (0, 1)), *args) == 0
  # The control: the same product without ``wide`` is read in place.
  a, g = jnp.asarray(rand(13, b * l, d)), jnp.asarray(rand(14, b * l, v))
  assert _rows_contracting_dots(transformer.rows_contracted_dot, a, g) == 1
  assert _rows_contracting_dots(lambda a, g: transformer.rows_contracted_dot(a, g, wide=True),
                                a, g) == 0


def test_skipped_chunks_add_no_zero_unembedding_gradients():
  # The chunks past the scored ones are skipped by the loops' trip count, not by a ``lax.cond``
  # per chunk: a per-chunk VJP inside ``lax.map`` returned a zero-filled [D, V] gradient for each
  # skipped chunk, and the loop added it in (113 MB each way for SmolLM2). The compiled backward
  # has one [D, V] zero fill (the accumulator's start) and no conditional; the per-chunk form had
  # one in a conditional besides. (That skipped chunks are not computed at all:
  # test_masked_token_logps_skip_chunks_past_the_longest_row_forward_and_backward.)
  b, l, d, v = 2, 32, 8, 64
  args = (jnp.asarray(rand(15, b, l, d)), jnp.asarray(rand(16, d, v)),
          jnp.asarray(np.arange(l)[None].repeat(b, 0) >= l - 8))  # the mask, traced
  targets = jnp.asarray(np.random.default_rng(17).integers(0, v, (b, l)))
  objective = lambda h, w, m: losses.token_logps(h, w, targets, vocab_size=v, chunk_size=8,
                                                 mask_BxL=m).sum()
  hlo = jax.jit(jax.grad(objective, (0, 1))).lower(*args).compile().as_text()
  zero_fills = re.findall(rf"= f32\[{d},{v}\]\{{[^}}]*\}} broadcast\(", hlo)
  assert len(zero_fills) == 1 and " conditional(" not in hlo, (len(zero_fills), hlo)


def _temp_bytes(fn, *args):
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_chunking_never_materialises_the_bxlxv_logits():
  b, l, d, v = 4, 512, 32, 4096
  full_bytes = b * l * v * 4
  args = (jax.ShapeDtypeStruct((b, l, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
          jax.ShapeDtypeStruct((b, l), jnp.int32))

  def chunked(h, w, t):
    return losses.token_logps(h, w, t, vocab_size=v, chunk_size=64).sum()

  def vocab_chunked(h, w, t):
    return losses.token_logps(h, w, t, vocab_size=v, chunk_size=64, vocab_chunk_size=512).sum()

  def unchunked(h, w, t):
    return jnp.take_along_axis(jax.nn.log_softmax(h @ w), t[..., None], -1).sum()

  reference = _temp_bytes(jax.grad(unchunked, (0, 1)), *args)
  assert reference >= full_bytes  # the measurement does see a B x L x V buffer when there is one
  for fn in (chunked, vocab_chunked):
    forward, backward = _temp_bytes(fn, *args), _temp_bytes(jax.grad(fn, (0, 1)), *args)
    # One B x 64 x V chunk is 1/8 of the full tensor; allow a few chunk-sized buffers.
    assert max(forward, backward) < full_bytes / 3, (fn.__name__, forward, backward, full_bytes)


def test_token_logps_sharded_on_a_mesh_equals_single_device():
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  b, l, d, v = 8, 16, 8, 64
  hidden, unembed = rand(7, b, l, d), rand(8, d, v)
  targets = np.random.default_rng(9).integers(0, 60, (b, l))
  want = losses.token_logps(jnp.asarray(hidden), jnp.asarray(unembed), jnp.asarray(targets),
                            vocab_size=60, chunk_size=4)
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))

  @jax.jit
  def run(h, w, t):
    with sharding.use(mesh):
      return losses.token_logps(h, w, t, vocab_size=60, chunk_size=4)

  got = run(put(hidden, P(("data", "fsdp"))), put(unembed, P(None, "tensor")),
            put(targets, P(("data", "fsdp"))))
  # Two fp32 programs (the vocabulary split over tensor: partial logsumexps, then combined).
  scale = np.abs(hidden.astype(np.float64) @ unembed).max()
  assert_within(got, want, em.max_bound(scale, token_stats_depth(d, 60, 32)), "sharded logps")


def test_kept_logits_are_split_over_the_mesh_like_the_chunks():
  """``keep_logits`` on a (2, 2, 2) mesh: the kept [N, B, C, V] logits are split over the batch
  (data x fsdp) and the vocabulary (tensor) as each chunk's are (XLA's sharding propagation), so
  a device holds an eighth of them (a quarter is the bound asserted; kept whole on every device,
  a planted constraint, they add 2.5 MB against the 0.5 MB bound), and the gradients are the float64 formula's within the
  bound of test_token_logps_gradient_is_the_analytic_softmax_gradient, the vocabulary's
  log-sum-exp in two tensor halves counted as two vocabulary slices."""
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  b, l, d, v = 8, 16, 8, 4096
  hidden, unembed = rand(7, b, l, d), rand(8, d, v, scale=0.1)
  targets = np.random.default_rng(9).integers(0, v, (b, l))
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  args = (put(hidden, P(("data", "fsdp"))), put(unembed, P(None, "tensor")),
          put(targets, P(("data", "fsdp"))))

  def grads(keep):
    def objective(h, w, t):
      with sharding.use(mesh):
        return losses.token_logps(h, w, t, vocab_size=v, chunk_size=4, keep_logits=keep).sum()
    return jax.jit(jax.grad(objective, (0, 1)))

  temp = lambda keep: grads(keep).lower(*args).compile().memory_analysis().temp_size_in_bytes
  kept_bytes = (l // 4) * b * 4 * v * 4  # [N, B, C, V] fp32, whole
  assert 0 < temp(True) - temp(False) <= kept_bytes // 4, (temp(True), temp(False), kept_bytes)
  g_hidden, g_unembed = grads(True)(*args)
  _, _, logits = np_token_stats(hidden, unembed, targets, v)
  dlogits = np.eye(v)[targets] - np.exp(np_log_softmax(logits))
  depth = token_stats_depth(d, v, v // 2) + v + b * l
  assert_lm_head_gradients(g_hidden, g_unembed, hidden, unembed, dlogits, em.gamma(depth), v)


def test_token_logps_bad_shapes_name_the_argument():
  h, w, t = jnp.zeros((2, 4, 8)), jnp.zeros((8, 10)), jnp.zeros((2, 4), jnp.int32)
  with pytest.raises(ValueError, match="hidden size 8 != unembed rows 9"):
    losses.token_logps(h, jnp.zeros((9, 10)), t, vocab_size=10, chunk_size=2)
  with pytest.raises(ValueError, match="vocab_size=11"):
    losses.token_logps(h, w, t, vocab_size=11, chunk_size=2)
  with pytest.raises(ValueError, match="targets shape"):
    losses.token_logps(h, w, t[:, :3], vocab_size=10, chunk_size=2)
  with pytest.raises(ValueError, match="chunk_size=0"):
    losses.token_logps(h, w, t, vocab_size=10, chunk_size=0)


def test_shift_targets_masks_segment_boundaries_and_padding():
  tokens = np.array([[5, 6, 7, 8, 9, 3, 4, 0]])
  segments = np.array([[1, 1, 1, 2, 2, 2, 2, 0]])
  # token 8 opens segment 2 but is (wrongly) marked; it must not be predicted from segment 1.
  loss_mask = np.array([[0, 0, 1, 1, 0, 1, 1, 0]])
  targets, mask = losses.shift_targets(jnp.asarray(tokens), jnp.asarray(loss_mask),
                                       jnp.asarray(segments))
  np.testing.assert_array_equal(targets, [[6, 7, 8, 9, 3, 4, 0, 0]])
  np.testing.assert_array_equal(mask, [[0, 1, 0, 0, 1, 1, 0, 0]])


# --------------------------------------------------------------------------------------------
# SFT
# --------------------------------------------------------------------------------------------


def test_sft_four_microbatches_of_two_equal_one_batch_of_eight():
  b, l, d, v = 8, 10, 8, 32
  hidden, unembed = jnp.asarray(rand(10, b, l, d)), jnp.asarray(rand(11, d, v))
  rng = np.random.default_rng(12)
  tokens = jnp.asarray(rng.integers(0, v, (b, l)))
  # Very different token counts per row: a mean of micro-batch means would differ.
  loss_mask = jnp.asarray((rng.random((b, l)) < np.linspace(0.1, 0.9, b)[:, None]).astype(np.int32))
  segments = jnp.ones((b, l), jnp.int32)

  @jax.jit
  def summed(w, rows_hidden, rows_tokens, rows_mask, rows_segments):
    targets, mask = losses.shift_targets(rows_tokens, rows_mask, rows_segments)
    logps = losses.token_logps(rows_hidden, w, targets, vocab_size=v, chunk_size=4)
    return losses.sft_loss(logps, mask)

  def rows_of(rows):
    return hidden[rows], tokens[rows], loss_mask[rows], segments[rows]

  def full_loss(w):
    total, count = summed(w, *rows_of(slice(0, 8)))
    return total / count

  want_loss, want_grad = jax.jit(jax.value_and_grad(full_loss))(unembed)
  micro_step = jax.jit(jax.value_and_grad(summed, has_aux=True))
  grad_sum, loss_sum, count_sum, micro_means = 0.0, 0.0, 0.0, []
  for i in range(4):
    micro = rows_of(slice(2 * i, 2 * i + 2))
    (total, count), grad = micro_step(unembed, *micro)
    grad_sum, loss_sum, count_sum = grad_sum + grad, loss_sum + total, count_sum + count
    micro_means.append(total / count)
  # Two fp32 programs of a token-mean loss (error_model.loss_depth) and of its gradient
  # (grad_depth, relative to the gradient's largest entry); the loss is a sum of positive terms,
  # so its bound is relative to the loss itself.
  forward = token_stats_depth(d, v)
  loss_bound = em.max_bound(float(want_loss), em.loss_depth(forward, vocab=v, tokens=b * l))
  assert_within(loss_sum / count_sum, want_loss, loss_bound, "4x2 loss")
  grad_bound = em.max_bound(np.abs(want_grad).max(),
                            em.grad_depth(forward, vocab=v, tokens=b * l))
  assert_within(grad_sum / count_sum, want_grad, grad_bound, "4x2 grad")
  # A mean of the micro-batch means is NOT the same (so the test can tell the two apart): it
  # misses by far more than 10x the bound.
  assert abs(np.mean(micro_means) - want_loss) > 10 * loss_bound
  # And the value itself is the NumPy token-level cross-entropy (one fp32 program vs float64).
  targets, mask = (np.asarray(x) for x in losses.shift_targets(tokens, loss_mask, segments))
  want_logps, _, _ = np_token_stats(np.asarray(hidden), np.asarray(unembed), targets, v)
  assert_within(want_loss, -(want_logps * mask).sum() / mask.sum(), loss_bound / 2, "vs NumPy")


# --------------------------------------------------------------------------------------------
# DPO family
# --------------------------------------------------------------------------------------------


def _pairs(seed, b=16):
  rng = np.random.default_rng(seed)
  nc, nr = rng.integers(3, 40, b).astype(np.float64), rng.integers(3, 40, b).astype(np.float64)
  pc, pr = -nc * rng.uniform(0.5, 2, b), -nr * rng.uniform(0.5, 2, b)
  rc, rr = pc + rng.normal(0, 2, b), pr + rng.normal(0, 2, b)
  return pc, pr, rc, rr, nc, nr


CASES = [("sigmoid", 0.1, 0.0), ("sigmoid", 0.3, 0.2), ("robust", 0.1, 0.1), ("hinge", 0.2, 0.0),
         ("ipo", 0.1, 0.0), ("ipo", 0.5, 0.0)]


@pytest.mark.parametrize("loss_type,beta,eps", CASES)
def test_dpo_losses_and_metrics_match_numpy_trl(loss_type, beta, eps):
  pc, pr, rc, rr, nc, nr = _pairs(13)
  j = lambda x: jnp.asarray(x, jnp.float32)
  loss, metrics = losses.dpo_loss(j(pc), j(pr), j(rc), j(rr), chosen_lengths=j(nc),
                                  rejected_lengths=j(nr), loss_type=loss_type, beta=beta,
                                  label_smoothing=eps)
  want_loss, want_metrics = np_dpo(pc, pr, rc, rr, nc, nr, loss_type, beta, eps)
  bound = formula_bound(np_dpo_flat(loss_type, beta, eps), (pc, pr, rc, rr, nc, nr), DPO_DEPTH)
  assert_within(loss, want_loss, bound["loss"], "loss")
  assert set(metrics) == set(want_metrics)
  for name, value in want_metrics.items():
    assert_within(metrics[name], value, bound[name], name)
  assert 0.0 < float(metrics["rewards/accuracies"]) < 1.0  # the random pairs exercise both sides


@pytest.mark.parametrize("loss_type,beta,eps", CASES)
def test_dpo_gradient_matches_finite_differences(loss_type, beta, eps):
  pc, pr, rc, rr, nc, nr = _pairs(14, b=6)

  def jax_loss(x):
    return losses.dpo_loss(x[0], x[1], jnp.asarray(rc, jnp.float32), jnp.asarray(rr, jnp.float32),
                           chosen_lengths=jnp.asarray(nc), rejected_lengths=jnp.asarray(nr),
                           loss_type=loss_type, beta=beta, label_smoothing=eps, rpo_alpha=0.5)[0]

  def np_loss(x, rc, rr):
    dpo, _ = np_dpo(x[0], x[1], rc, rr, nc, nr, loss_type, beta, eps)
    return dpo + 0.5 * -x[0].sum() / nc.sum()

  def numeric_grad(x, rc, rr, h=1e-5):
    """Central differences in float64: truncation h^2 |f^(3)| / 6 and roundoff 1e-16 |f| / h
    are both < 1e-10 here, far below the fp32 bound: the exact gradient for our purpose."""
    out = {}
    for idx in np.ndindex(x.shape):
      up, down = x.copy(), x.copy()
      up[idx] += h
      down[idx] -= h
      out[idx] = (np_loss(up, rc, rr) - np_loss(down, rc, rr)) / (2 * h)
    return out

  x = np.stack([pc, pr])
  grad = np.asarray(jax.jit(jax.grad(jax_loss))(jnp.asarray(x, jnp.float32)))
  numeric = numeric_grad(x, rc, rr)
  # fp32 gradient vs exact: the backward doubles the forward's roundings; its condition number at
  # these inputs comes from formula_bound (differences of the float64 gradient itself).
  bound = formula_bound(numeric_grad, (x, rc, rr), 2 * DPO_DEPTH, rel_step=1e-4)
  for idx in np.ndindex(x.shape):
    assert_within(grad[idx], numeric[idx], bound[idx], f"d loss / d x{list(idx)}")


def test_dpo_reference_free_rpo_and_logit_metrics():
  pc, pr, _, _, nc, nr = _pairs(15)
  j = lambda x: jnp.asarray(x, jnp.float32)
  logit_sums_c, logit_sums_r = rand(16, 16).astype(np.float64) * nc, rand(17, 16) * nr
  loss, metrics = losses.dpo_loss(
      j(pc), j(pr), None, None, chosen_lengths=j(nc), rejected_lengths=j(nr), beta=0.1,
      reference_free=True, rpo_alpha=1.0, chosen_logit_sums=j(logit_sums_c),
      rejected_logit_sums=j(logit_sums_r))
  zeros = np.zeros_like(pc)

  def reference(pc, pr, nc, nr, logit_sums_c, logit_sums_r):
    want, want_metrics = np_dpo(pc, pr, zeros, zeros, nc, nr, "sigmoid", 0.1)
    nll = -pc.sum() / nc.sum()  # TRL's RPO term: cross-entropy over every chosen token
    # TRL: logits[mask].mean() = mean over every completion token of its mean-over-vocab logit.
    return {"loss": want + nll, "nll_loss": nll, "rewards/chosen": want_metrics["rewards/chosen"],
            "logits/chosen": logit_sums_c.sum() / nc.sum(),
            "logits/rejected": logit_sums_r.sum() / nr.sum()}

  args = (pc, pr, nc, nr, logit_sums_c, logit_sums_r)
  want, bound = reference(*args), formula_bound(reference, args, DPO_DEPTH)
  for name in want:
    assert_within(loss if name == "loss" else metrics[name], want[name], bound[name], name)


def test_dpo_end_to_end_from_token_logps():
  """sequence_sums of chunked token log-probs feed dpo_loss exactly like the NumPy pipeline."""
  b, l, d, v = 4, 12, 8, 24
  h_c, h_r, unembed = rand(18, b, l, d), rand(19, b, l, d), rand(20, d, v)
  rng = np.random.default_rng(21)
  t_c, t_r = rng.integers(0, v, (b, l)), rng.integers(0, v, (b, l))
  m_c, m_r = ((rng.random((b, l)) < 0.6).astype(np.int32) for _ in range(2))
  m_c[:, 0] = m_r[:, 0] = 1

  @jax.jit
  def side(h, t, m):
    logps, mean_logits = losses.token_logps_and_mean_logits(
        h, jnp.asarray(unembed), t, vocab_size=v, chunk_size=5)
    logps_sum, n = losses.sequence_sums(logps, m)
    logit_sum, _ = losses.sequence_sums(mean_logits, m)
    return logps_sum, n, logit_sum

  stats = [side(h, t, m) for h, t, m in ((h_c, t_c, m_c), (h_r, t_r, m_r))]
  (pc, nc, lc), (pr, nr, lr) = stats
  loss, metrics = losses.dpo_loss(pc, pr, pc - 1.0, pr + 1.0, chosen_lengths=nc,
                                  rejected_lengths=nr, beta=0.1, chosen_logit_sums=lc,
                                  rejected_logit_sums=lr)
  np_c, _, logits_c = np_token_stats(h_c, unembed, t_c, v)
  # One fp32 program vs float64 (error_model): a summed log-prob of l same-sign token terms is
  # relative to |sum|; the logit mean cancels, so it is relative to the logit scale.
  depth = token_stats_depth(d, v) + l
  assert_within(pc, (np_c * m_c).sum(-1), em.max_bound(np.abs((np_c * m_c).sum(-1)), depth, 1),
                "chosen logps")
  assert_within(metrics["logits/chosen"], logits_c[m_c.astype(bool)].mean(),
                em.max_bound(np.abs(logits_c).max(), depth + b * l, 1), "logits/chosen")
  # Margin of exactly 2, up to rounding pc - 1.0 and pr + 1.0 in fp32 (u |p| each, slope beta / 2
  # of -log sigmoid) and the log-sigmoid itself.
  loss_bound = (0.1 / 2 * em.gamma(4) * float(np.abs(pc).max() + np.abs(pr).max())
                + em.gamma(em.ELEMENTWISE_ULPS + b))
  assert_within(loss, -np_log_sigmoid(0.1 * 2.0), loss_bound, "loss at margin 2")


def test_dpo_rejects_unknown_and_inapplicable_flags():
  x = jnp.zeros(4)
  kw = dict(chosen_lengths=x + 1, rejected_lengths=x + 1)
  valid = r"'dpop' is unknown; valid: \['hinge', 'ipo', 'robust', 'sigmoid'\]"
  with pytest.raises(ValueError, match=valid):
    losses.dpo_loss(x, x, x, x, loss_type="dpop", **kw)
  for loss_type in ("hinge", "ipo"):
    with pytest.raises(ValueError, match="label_smoothing=0.1 does not apply"):
      losses.dpo_loss(x, x, x, x, loss_type=loss_type, label_smoothing=0.1, **kw)
  with pytest.raises(ValueError, match=r"must be in \[0, 0.5\)"):
    losses.dpo_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5, **kw)
  with pytest.raises(ValueError, match="beta=0"):
    losses.dpo_loss(x, x, x, x, beta=0.0, **kw)
  with pytest.raises(ValueError, match="reference_free=True"):
    losses.dpo_loss(x, x, x, x, reference_free=True, **kw)
  with pytest.raises(ValueError, match="reference_free=False"):
    losses.dpo_loss(x, x, None, None, **kw)
  with pytest.raises(ValueError, match="reference_free=False"):
    losses.dpo_loss(x, x, x, None, **kw)
  with pytest.raises(ValueError, match=r"must be \[B\]"):
    losses.dpo_loss(x, jnp.zeros(3), x, x, **kw)
  with pytest.raises(ValueError, match="rpo_alpha=-1"):
    losses.dpo_loss(x, x, x, x, rpo_alpha=-1.0, **kw)


def test_dpo_padding_pairs_weigh_nothing():
  """The pipeline's padded last batch: rows with no completion tokens change nothing."""
  pc, pr, rc, rr, nc, nr = _pairs(22, b=6)
  j = lambda *xs: [jnp.asarray(x, jnp.float32) for x in xs]
  kw = dict(loss_type="robust", beta=0.2, label_smoothing=0.1, rpo_alpha=0.3)
  want_loss, want_metrics = losses.dpo_loss(*j(pc, pr, rc, rr), chosen_lengths=j(nc)[0],
                                            rejected_lengths=j(nr)[0], **kw)
  pad = lambda x, v: np.concatenate([x, np.full(3, v)])
  loss, metrics = losses.dpo_loss(*j(pad(pc, 0.0), pad(pr, 0.0), pad(rc, 7.0), pad(rr, -7.0)),
                                  chosen_lengths=j(pad(nc, 0))[0],
                                  rejected_lengths=j(pad(nr, 0))[0], **kw)
  # Two fp32 programs (6 pairs vs 6 + 3 zero-weight pairs): the formula's bound, twice.
  def reference(pc, pr, rc, rr, nc, nr):
    out = np_dpo_flat("robust", 0.2, 0.1)(pc, pr, rc, rr, nc, nr)
    out["nll_loss"] = -pc.sum() / nc.sum()
    out["loss"] += 0.3 * out["nll_loss"]
    return out

  bound = formula_bound(reference, (pc, pr, rc, rr, nc, nr), DPO_DEPTH, programs=2)
  assert_within(loss, want_loss, bound["loss"], "loss")
  for name in want_metrics:
    assert_within(metrics[name], want_metrics[name], bound[name], name)
