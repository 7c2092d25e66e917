r"""What the benchmarks that compare saro_jax with TRL like for like share (``side_by_side.py``,
``prefix_dpo.py``): the torch side (one policy, a frozen reference, the start weights), TRL's
trainer driven step by step, the fingerprint of the ids a system feeds, and the fp32 error-model
bound on the first step's figures, the pipe a timed system answers through from a child
process (``PipeChild`` / ``pipe_answers``: ``--split_processes`` in both scripts), the order the
systems run in each timed round (``round_order``), and the line naming the CPU a run measured
(``cpu_identity``; ``goals.py`` prints it too).

How TRL is driven (``TrlStep``): the trainer is built as a user builds it (DPOConfig / SFTConfig
with fp32, ``bf16=False``, or with ``bf16=True``, its mixed precision, when asked; AdamW with the
given learning rate, betas 0.9 / 0.999, eps 1e-8, no weight decay, a constant schedule, clipping
at norm 1); each step is exactly what ``Trainer``'s inner loop does per optimizer step:
``trainer.training_step`` (TRL's ``compute_loss`` + backward), the trainer's ``_clip_grad_norm``,
``optimizer.step()`` (TRL's default ``adamw_torch_fused``), ``lr_scheduler.step()``,
``zero_grad()``. Batches are made by the trainer's own collator (``TrlStep.collate``) from ids the
caller gives, so TRL neither re-tokenizes, truncates nor adds tokens; the callers check the
collated ids. Left out of the timing: the dataloader and Trainer's logging/callback bookkeeping
(both small; this favours TRL). Gradient checkpointing is switched per step (``checkpointing=``),
so one trainer serves both the like-for-like row (off) and TRL's default (on).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Sequence

import numpy as np

U = 2.0 ** -24  # fp32 unit roundoff


# ---- the machine ------------------------------------------------------------------------------

def cpu_identity(cpuinfo: str = "/proc/cpuinfo") -> str:
  """The CPU the run measured, as one line: vendor, model name, family / model numbers, the
  cores this process may run on, and the vector units that decide XLA's and oneDNN's kernels.
  Goal figures are per chip (benchmarks/README.md: the same code met goal 1 on one 2-core AMD
  EPYC and not on another of the same name), so ``goals.py`` and ``side_by_side.py`` name the
  chip they ran on. Linux reads /proc/cpuinfo; elsewhere the platform's processor string."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  try:
    with open(cpuinfo) as f:
      first = f.read().split("\n\n")[0]
  except OSError:
    return f"{platform.processor() or platform.machine()}, {cores} cores"
  fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first.splitlines()
                                               if ":" in line)}
  get = lambda key: fields.get(key, "?")
  flags = set(get("flags").split())
  units = [u for u in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if u in flags]
  return (f"{get('vendor_id')} {get('model name')}, family {get('cpu family')} model "
          f"{get('model')}, {cores} cores, {' '.join(units) or 'no AVX2'}")


# ---- the timed rounds --------------------------------------------------------------------------

def round_order(systems: Sequence, r: int) -> list:
  """The order the systems run in round ``r`` (0-based): the list rotated by ``r``, so over
  ``len(systems)`` rounds each system runs once in each slot (A, B, C / B, C, A / C, A, B).

  Why: with a fixed order a system always runs in the same slot behind the same neighbour, and
  goal 1's runs always put saro_jax first. In an A/A run on a 2-core EPYC (one SRPO program
  compiled twice, 8 rounds; benchmarks/README.md, session 51) the first slot ran 6-13 % slower in
  three of the first four rounds and 3-9 % faster in the last four: the medians agreed, but a
  short run's figure leaned on the slot. A rotation gives every system every slot equally often
  (which system runs just before it still follows the list's cyclic order), and keeps each
  round's figures paired (the per-round ratios)."""
  k = r % len(systems) if systems else 0
  return list(systems[k:]) + list(systems[:k])


# ---- the ids a system feeds -------------------------------------------------------------------

def ids_sha(tokens, targets) -> str:
  """Fingerprint of a [rows, L] token matrix and its [rows, L] target mask (1 = scored token)."""
  h = hashlib.sha256(np.ascontiguousarray(np.asarray(tokens, np.int64)).tobytes())
  h.update(np.ascontiguousarray(np.asarray(targets, np.int64)).tobytes())
  return h.hexdigest()[:16]


def pairs_sha(pairs: Iterable[tuple[Sequence[int], Sequence[int], Sequence[int]]]) -> str:
  """Fingerprint of preference pairs as (prompt ids, chosen completion ids, rejected completion
  ids), in order, independent of any padding or row layout: two systems that feed the same
  pairs print the same value whatever their batches' shapes."""
  h = hashlib.sha256()
  for pair in pairs:
    for part in pair:
      ids = np.asarray(part, np.int64)
      h.update(np.int64(ids.size).tobytes())  # lengths too: the split points are part of the ids
      h.update(np.ascontiguousarray(ids).tobytes())
  return h.hexdigest()[:16]


# ---- the like-for-like bound -----------------------------------------------------------------

def gamma(n: int) -> float:
  """Worst-case relative error of an n-term fp32 sum or dot product in any order (Higham 3.4)."""
  return n * U / (1 - n * U)


def typical_growth(n: int) -> float:
  """The random-walk size of an n-term fp32 reduction's relative error."""
  return math.sqrt(n) * U


def forward_depth(hf_config, seq_len: int) -> int:
  """Sum of the reduction lengths on the path to one logit (tests/error_model.py, point 2):
  per layer the two RMS norms (D/2 each), q/k/v (D), q.k (head_dim), RoPE angles, the softmax
  denominator and the weighted sum of values (3 L), the output projection (H head_dim), gate/up
  (D), down (I), ~16 ulp of elementwise functions; then the final norm and the unembedding."""
  d, i = hf_config.hidden_size, hf_config.intermediate_size
  h = hf_config.num_attention_heads
  hd = getattr(hf_config, "head_dim", None) or d // h
  per_layer = d // 2 + d + hd + 3 * seq_len + h * hd + d // 2 + d + i + 16
  return hf_config.num_hidden_layers * per_layer + d // 2 + d


def dpo_bounds(hf_config, *, seq_len: int, completion_tokens: int, beta: float,
               logit_scale: float, growth: Callable[[int], float] = gamma) -> dict[str, float]:
  """Largest |a - b| two correct fp32 programs may show on a DPO first step's loss and mean
  chosen / rejected sequence log-probs, for sequences of at most ``seq_len`` tokens with at most
  ``completion_tokens`` scored tokens (every term below grows with both, so the longest sequence
  and the longest completion of a batch bound all its pairs).

  Error model (worst case, every rounding the same sign; the same model as tests/error_model.py):
  * one program's logit is within gamma(F) * S of the exact one, F = forward_depth, S = the
    largest |logit| (measured on these ids by the torch reference: the logits' scale);
  * a token log-prob = logit[target] - logsumexp(logits): the logsumexp adds a V-term sum, so a
    token log-prob is within gamma(F + V) * 2 S (two terms of size <= S each);
  * a sequence log-prob sums T completion tokens: T * gamma(F + V) * 2 S plus the T-term sum's
    own gamma(T) * T * 2 S, i.e. <= 2 S T gamma(F + V + T); two programs: twice that (E_seq);
    the mean over pairs keeps the bound;
  * the loss -logsigmoid(beta * ((pc - rc) - (pr - rr))) is 1-Lipschitz in its argument, whose
    four log-probs each differ by <= E_seq between programs: |d loss| <= 4 beta E_seq.
  This is loose on a deep model (S ~ 30, F ~ 1.5e5 on SmolLM2: a ~1 % relative bound on the
  log-probs), tight on the tiny one. ``growth=typical_growth`` gives the same formulas with the
  random-walk size sqrt(n) u in place of gamma(n): the typical error, printed beside the bound
  (not asserted: it is an estimate, not a bound)."""
  f = forward_depth(hf_config, seq_len)
  t = completion_tokens
  e_seq = 2 * (2 * logit_scale * t * growth(f + hf_config.vocab_size + t))
  return {"loss": 4 * beta * e_seq, "logps/chosen": e_seq, "logps/rejected": e_seq}


def sft_bounds(hf_config, *, seq_len: int, target_tokens: int, logit_scale: float,
               growth: Callable[[int], float] = gamma) -> dict[str, float]:
  """The same for an SFT loss, the mean over N target tokens of token NLLs: within
  gamma(F + V + N) * 2 S per program, twice that between two."""
  f = forward_depth(hf_config, seq_len)
  return {"loss": 2 * (2 * logit_scale * growth(f + hf_config.vocab_size + target_tokens))}


def check_figures(name: str, figures: dict, ref_name: str, ref: dict,
                  bounds: dict[str, float] | None,
                  typical: dict[str, float] | None) -> tuple[bool, list[str]]:
  """``figures`` against ``ref`` within ``bounds``: (all within, one printable line per key).
  ``bounds`` None (a bf16 run, where no hard bound is useful at this depth: side_by_side.py's
  docstring): every figure of ``ref`` printed beside ours with the relative difference, not
  checked (True)."""
  if bounds is None:
    return True, [f"  {key:15s} {name:15s} vs {ref_name}: {figures[key]:.6g} vs {want:.6g}, "
                  f"relative {abs(figures[key] - want) / max(abs(want), 1e-30):.2e}"
                  for key, want in ref.items()]
  ok, lines = True, []
  for key, bound in bounds.items():
    err = abs(figures[key] - ref[key])
    good = err <= bound
    ok &= good
    lines.append(f"  {key:15s} {name:15s} vs {ref_name}: |diff| {err:.3e}  bound {bound:.3e}  "
                 f"(typical {typical[key]:.1e})  {'ok' if good else 'BROKEN'}")
  return ok, lines


# ---- a system in a child process ---------------------------------------------------------------

class PipeChild:
  """A child process that answers one JSON command per stdin line with one JSON line on its
  stdout (its side: ``pipe_answers``). ``first`` is the line it writes once it is ready."""

  def __init__(self, cmd: Sequence[str], env: dict, what: str):
    self.proc = subprocess.Popen(list(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True, env=env)
    self.what = what
    self.first = self.read()

  def read(self):
    line = self.proc.stdout.readline()
    if not line:
      raise SystemExit(f"the {self.what} child process died (exit {self.proc.wait()}); its "
                       "stderr is above")
    return json.loads(line)

  def ask(self, **cmd):
    self.proc.stdin.write(json.dumps(cmd) + "\n")
    self.proc.stdin.flush()
    return self.read()

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
      self.proc.stdin.close()
      self.proc.wait(timeout=120)


def pipe_answers() -> Callable[[object], None]:
  """In a ``PipeChild``: sends the libraries' prints to stderr from now on and returns the
  function that writes one JSON answer line on the real stdout."""
  out = os.fdopen(os.dup(1), "w")
  os.dup2(2, 1)

  def answer(value) -> None:
    out.write(json.dumps(value) + "\n")
    out.flush()

  return answer


# ---- the torch side ---------------------------------------------------------------------------

class TorchSide:
  """The torch policy (shared by every torch system of a run), the frozen reference (DPO), the
  start weights and the tokenizer, all from one HF directory.

  ``perturb``: scale the policy's final norm by 1 + perturb, a deliberate weight bug the
  like-for-like check must catch (the reference stays exact)."""

  def __init__(self, directory: str, *, reference: bool, perturb: float = 0.0):
    import torch
    import transformers
    self.torch = torch
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    self.policy = load()
    if perturb:
      with torch.no_grad():
        self.policy.model.norm.weight.mul_(1.0 + perturb)
    self.start = {k: v.detach().clone() for k, v in self.policy.state_dict().items()}
    self.ref = load().eval() if reference else None
    if self.ref is not None:
      self.ref.requires_grad_(False)
    self.tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    if self.tokenizer.pad_token is None:
      self.tokenizer.pad_token = self.tokenizer.eos_token

  def restore(self) -> None:
    with self.torch.no_grad():
      self.policy.load_state_dict(self.start)
    self.policy.zero_grad(set_to_none=True)

  def max_logit(self, sequences) -> float:
    """The logits' scale S of the error model: max |logit| of the start weights on these ids
    (an iterable of 1-D id sequences, unpadded; a [rows, L] tensor iterates over its rows)."""
    torch = self.torch
    model = self.ref if self.ref is not None else self.policy
    with torch.no_grad():
      scale = 0.0
      for row in sequences:  # one row at a time: no [B, L, V] logits for the whole batch
        row = torch.as_tensor(np.asarray(row, np.int64))
        scale = max(scale, float(model(input_ids=row[None]).logits.abs().max()))
    return scale


# ---- TRL ----------------------------------------------------------------------------------------

class TrlStep:
  """TRL's DPOTrainer (``stage="dpo"``: sigmoid loss, a live reference ``side.ref``) or
  SFTTrainer (``"sft"``: needs ``train_dataset``) on ``side.policy``, stepped as ``Trainer``'s
  inner loop steps it (module docstring)."""

  def __init__(self, stage: str, side: TorchSide, *, batch_size: int, lr: float, seed: int,
               beta: float = 0.1, train_dataset=None, bf16: bool = False):
    import datasets
    import trl

    self.stage, self.side, self.torch = stage, side, side.torch
    common = dict(output_dir=tempfile.mkdtemp(prefix="saro_trl_"),
                  per_device_train_batch_size=batch_size, learning_rate=lr,
                  lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
                  adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, bf16=bf16, fp16=False,
                  use_cpu=True, report_to=[], save_strategy="no", logging_steps=10_000, seed=seed,
                  gradient_checkpointing=False, disable_tqdm=True)
    if stage == "dpo":
      config = trl.DPOConfig(**common, beta=beta, loss_type=["sigmoid"], max_length=None,
                             precompute_ref_log_probs=False)
      # The trainer needs a train_dataset to be built; the steps feed collated ids instead.
      placeholder = datasets.Dataset.from_dict({"prompt": ["a"], "chosen": [" b"],
                                                "rejected": [" c"]})
      trainer = trl.DPOTrainer(model=side.policy, ref_model=side.ref, args=config,
                               train_dataset=placeholder, processing_class=side.tokenizer)
    elif stage == "sft":
      config = trl.SFTConfig(**common, max_length=None, packing=False, padding_free=False,
                             dataset_kwargs={"skip_prepare_dataset": True})
      trainer = trl.SFTTrainer(model=side.policy, args=config, train_dataset=train_dataset,
                               processing_class=side.tokenizer)
    else:
      raise ValueError(f"stage must be 'dpo' or 'sft', got {stage!r}")
    trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
    trainer.current_gradient_accumulation_steps = 1
    self.trainer, self.model, self.config = trainer, trainer.model, config
    self.note = f"TRL {trl.__version__}, {config.optim}" + (", bf16 autocast" if bf16 else "")
    self._gc_kwargs = dict(config.activation_checkpointing_kwargs or {})

  def collate(self, examples: list[dict]) -> dict:
    """The trainer's own collator on ``examples`` (DPO: ``prompt_ids`` / ``chosen_ids`` /
    ``rejected_ids`` lists; SFT: the train dataset's rows)."""
    return self.trainer.data_collator(examples)

  def _set_checkpointing(self, on: bool) -> None:
    model = self.model
    if on and not model.is_gradient_checkpointing:
      model.activation_checkpointing_enable(activation_checkpointing_kwargs=self._gc_kwargs or None)
    elif not on and model.is_gradient_checkpointing:
      model.activation_checkpointing_disable()

  def step(self, inputs: dict, *, checkpointing: bool) -> float:
    """One optimizer step on the collated ``inputs``; returns the loss."""
    trainer, model = self.trainer, self.model
    self._set_checkpointing(checkpointing)
    batch = dict(inputs)  # training_step may pop keys
    n_items = (trainer._get_num_items_in_batch([batch], trainer.args.device)
               if self.stage == "sft" else None)
    loss = trainer.training_step(model, batch, n_items)
    if trainer.args.max_grad_norm > 0:
      trainer._clip_grad_norm(model)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    model.zero_grad()
    return float(loss)

  def first(self, inputs: dict, *, checkpointing: bool) -> dict[str, float]:
    """The start weights restored, one step: its loss and (DPO) the policy's mean chosen /
    rejected sequence log-probs as TRL logged them, or (SFT) the target token count."""
    self.side.restore()
    loss = self.step(inputs, checkpointing=checkpointing)
    if self.stage == "sft":
      return {"loss": loss, "target_tokens": float((inputs["labels"][:, 1:] != -100).sum())}
    metrics = self.trainer._metrics["train"]
    return {"loss": loss, "logps/chosen": metrics["logps/chosen"][-1],
            "logps/rejected": metrics["logps/rejected"][-1]}

  def dpo_pairs(self, inputs: dict) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) ids as the collated DPO ``inputs`` hold them (rows 0..n-1
    chosen, n..2n-1 rejected; attention_mask marks real tokens, completion_mask the scored ones)."""
    ids = inputs["input_ids"].numpy()
    real = inputs["attention_mask"].numpy().astype(bool)
    scored = inputs["completion_mask"].numpy().astype(bool)
    n = ids.shape[0] // 2
    out = []
    for i in range(n):
      parts = []
      for row in (i, n + i):
        tokens, m = ids[row][real[row]], scored[row][real[row]]
        parts.append((tokens[~m].tolist(), tokens[m].tolist()))
      (prompt_c, chosen), (prompt_r, rejected) = parts
      if prompt_c != prompt_r:
        raise ValueError(f"TRL's collated pair {i}: chosen and rejected prompts differ")
      out.append((prompt_c, chosen, rejected))
    return out
