"""Safety evaluation: labelled prompt sets -> generations -> judges -> metrics -> the run report.

  prompts.py   readers (our JSONL, XSTest, AdvBench, WildJailbreak; files or HF datasets)
  judges.py    refusal phrases (crude), a classifier model run by saro_jax, an OpenAI-compatible
               endpoint; make_judge builds one from the `eval` section (saro_jax.config.EvalConfig)
  metrics.py   ASR, refusal, over-refusal, lengths; overall, per category, per set
  report.py    report.md + PNG plots across stages (start -> RW -> SRPO)
  evaluation.py  load -> generate -> judge -> score -> report (the `evaluate` stage and the pipeline call it)
"""

from saro_jax.evaluate.judges import (ClassifierJudge, HttpJudge, JudgeError, JudgeInput,
                                      RefusalPhraseJudge, Verdict)
from saro_jax.evaluate.metrics import compute_metrics
from saro_jax.evaluate.prompts import EvalPrompt, PromptError, read_prompts
from saro_jax.evaluate.report import write_report

__all__ = ["ClassifierJudge", "EvalPrompt", "HttpJudge", "JudgeError", "JudgeInput", "PromptError",
           "RefusalPhraseJudge", "Verdict", "compute_metrics", "read_prompts", "write_report"]
