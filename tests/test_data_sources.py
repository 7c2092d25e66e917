"""sources.py: every source type reads a real fixture; bad input raises with file:line or is counted.

Also checks the bundled data set: counts, categories, template split, placeholders, determinism.
"""

import collections
import json
import logging
import os
import pathlib
import shutil

import grain
import pytest

from saro_jax.data import bundled, formats, sources

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "data"
GOOD = '{"prompt": "q%d", "chosen": "a", "rejected": "b"}\n'


def _ids(ds):
  return [ds[i]["id"] for i in range(len(ds))]


def test_jsonl_json_glob_and_directory():
  ds = sources.open_source(str(FIXTURES / "prefs.jsonl"), kind="preference")
  assert isinstance(ds, grain.MapDataset)
  assert _ids(ds) == ["std", "conv", "implicit", "proc"]
  ds = sources.open_source(str(FIXTURES / "prefs.json"), kind="preference")
  assert _ids(ds) == ["json-0", "prefs.json:1"]  # JSON arrays: where = path:index
  ds = sources.open_source(str(FIXTURES / "rw_*.jsonl"), kind="rw")
  assert _ids(ds) == ["chat-1", "rw_chat.jsonl:2", "fields-1", "rw_fields.jsonl:2"]
  stats = {}
  ds = sources.open_source([str(FIXTURES / "prefs.jsonl"), str(FIXTURES / "prefs.json")],
                           kind="preference", stats=stats)
  assert len(ds) == 6 and stats == {"read": 6, "kept": 6, "skipped": {}}


def test_directory_spec_reads_every_data_file(tmp_path):
  shutil.copy(FIXTURES / "prefs.jsonl", tmp_path / "a.jsonl")
  (tmp_path / "sub").mkdir()
  shutil.copy(FIXTURES / "prefs.json", tmp_path / "sub" / "b.json")
  (tmp_path / "notes.txt").write_text("not data")
  assert len(sources.open_source(str(tmp_path), kind="preference")) == 6


def test_parquet(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  rows = [json.loads(line) for line in (FIXTURES / "rw_chat.jsonl").read_text().splitlines()]
  pq.write_table(pa.Table.from_pylist([{"messages": r["messages"], "category": r.get("category")}
                                       for r in rows]), tmp_path / "rw.parquet")
  ds = sources.open_source(str(tmp_path / "*.parquet"), kind="rw")
  assert _ids(ds) == ["rw.parquet:0", "rw.parquet:1"]
  assert ds[0]["messages"] == rows[0]["messages"] and ds[1]["category"] is None


def test_hf_load_from_disk_dataset_and_dict(tmp_path):
  import datasets
  rows = [json.loads(line) for line in (FIXTURES / "rw_fields.jsonl").read_text().splitlines()][:1]
  datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
  ds = sources.open_source(f"hf:{tmp_path / 'single'}", kind="rw")
  assert _ids(ds) == ["fields-1"] and ds[0]["messages"][0]["content"] == rows[0]["prompt"]
  datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dict"))
  assert len(sources.open_source(f"hf:{tmp_path / 'dict'}:test", kind="rw")) == 1
  with pytest.raises(ValueError, match=r"no split 'train' \(has \['test'\]\)"):
    sources.open_source(f"hf:{tmp_path / 'dict'}", kind="rw")


def test_hf_data_files_directory(tmp_path):
  shutil.copy(FIXTURES / "prefs.json", tmp_path / "train.json")
  ds = sources.open_source(f"hf:{tmp_path}", kind="preference")
  assert [ds[i]["prompt"][0]["content"] for i in range(len(ds))] == ["Q0", "Q1"]


def test_tfds_array_record_without_tensorflow(tmp_path):
  """TFDS builds and reads array_record without TF installed (tfds.data_source is random access)."""
  import tensorflow_datasets as tfds

  class TinySaroPrefs(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      text = tfds.features.Text()
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "id": text, "category": text, "chosen": text, "rejected": text,
          "prompt": tfds.features.Sequence({"role": text, "content": text})}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(3):
        yield i, {"id": f"t{i}", "category": "cyber", "chosen": "Safe é", "rejected": f"bad {i}",
                  "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": f"q{i}"}]}

  TinySaroPrefs(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  ds = sources.open_source("tfds:tiny_saro_prefs:train", kind="preference", tfds_data_dir=str(tmp_path))
  assert sorted(_ids(ds)) == ["t0", "t1", "t2"]
  record = next(ds[i] for i in range(3) if ds[i]["id"] == "t1")
  assert record == {"id": "t1", "kind": "outcome", "category": "cyber", "prefix": "",
                    "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"}],
                    "chosen": "Safe é", "rejected": "bad 1"}


def _bad_file(tmp_path):
  path = tmp_path / "mixed.jsonl"
  path.write_bytes(
      (GOOD % 1).encode()
      + b'{"prompt": "q2", "chosen": \n'                                          # 2 malformed JSON
      + b'{"prompt": "q\xff", "chosen": "a", "rejected": "b"}\n'                  # 3 invalid UTF-8
      + b'{"prompt": "' + b"x" * 300 + b'", "chosen": "a", "rejected": "b"}\n'  # 4 too long
      + b"\n"                                                                     # 5 blank: ignored
      + b'{"prompt": "q6", "chosen": "same", "rejected": "same"}\n'              # 6 invalid record
      + b'{"id": "dup", "prompt": "q7", "chosen": "a", "rejected": "b"}\n'
      + b'{"id": "dup", "prompt": "q8", "chosen": "a", "rejected": "b"}\n'       # 8 duplicate id
      + (GOOD % 9).encode())
  return str(path)


BAD_LINES = {
    "malformed_json": (b'{"prompt": "q2", "chosen": ', sources.SourceError, r"malformed JSON at character 28: Expecting value"),
    "invalid_utf8": (b'{"prompt": "q\xff", "chosen": "a", "rejected": "b"}', sources.SourceError,
                     r"invalid UTF-8 at byte 13"),
    "line_too_long": (b'{"prompt": "' + b"x" * 300 + b'", "chosen": "a", "rejected": "b"}',
                      sources.SourceError, r"line longer than max_line_bytes=200"),
    "invalid_record": (b'{"prompt": "q6", "chosen": "same", "rejected": "same"}', formats.RecordError,
                       r"field 'rejected': is identical to 'chosen'"),
    "duplicate_id": (b'{"prompt": "q8", "chosen": "a", "rejected": "b", "id": "one.jsonl:1"}',
                     sources.SourceError, r"field 'id': duplicate id 'one.jsonl:1' \(first at .*one.jsonl:1\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_input_raises_naming_file_and_line(tmp_path, case):
  line, error, pattern = BAD_LINES[case]
  path = tmp_path / "one.jsonl"
  path.write_bytes((GOOD % 1).encode() + line + b"\n" + (GOOD % 3).encode())
  with pytest.raises(error, match=rf"one\.jsonl:2: {pattern}"):
    sources.open_source(str(path), kind="preference", max_line_bytes=200)


def test_first_bad_line_is_reported_exactly(tmp_path):
  with pytest.raises(sources.SourceError, match=r"mixed\.jsonl:2: malformed JSON at character 28"):
    sources.open_source(_bad_file(tmp_path), kind="preference", max_line_bytes=200)


def test_skip_mode_counts_each_reason_and_logs(tmp_path, caplog):
  stats = {}
  with caplog.at_level(logging.WARNING, logger="saro_jax.data.sources"):
    ds = sources.open_source(_bad_file(tmp_path), kind="preference", on_error="skip",
                             max_line_bytes=200, stats=stats)
  assert [ds[i]["prompt"][0]["content"] for i in range(len(ds))] == ["q1", "q7", "q9"]
  assert stats == {"read": 8, "kept": 3, "skipped": {"duplicate_id": 1, "invalid:rejected": 1,
                                                     "invalid_utf8": 1, "line_too_long": 1,
                                                     "malformed_json": 1}}
  assert "kept 3 of 8 records" in caplog.text and "'line_too_long': 1" in caplog.text


def test_unusable_specs_fail_clearly(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such file"):
    sources.open_source(str(tmp_path / "missing.jsonl"), kind="rw")
  (tmp_path / "x.csv").write_text("a,b")
  with pytest.raises(ValueError, match="unknown file type"):
    sources.open_source(str(tmp_path / "x.csv"), kind="rw")
  (tmp_path / "bad.json").write_text('{"data": 3}')
  with pytest.raises(sources.SourceError, match="must hold a list"):
    sources.open_source(str(tmp_path / "bad.json"), kind="rw")
  (tmp_path / "only_bad.jsonl").write_text("{}\n")
  with pytest.raises(ValueError, match="no valid records"):
    sources.open_source(str(tmp_path / "only_bad.jsonl"), kind="rw", on_error="skip")
  with pytest.raises(ValueError, match="kind must be one of"):
    sources.open_source(str(FIXTURES / "prefs.jsonl"), kind="dpo")
  with pytest.raises(FileNotFoundError, match="no bundled data named 'nope'"):
    sources.open_source("bundled:nope", kind="rw")


# ------------------------------------------------------------------------------ bundled data

@pytest.fixture(scope="module")
def bundled_records():
  return {name: sources.load_records(f"bundled:{name}", kind=kind)[0] for name, kind in [
      ("rw_train", "rw"), ("rw_eval", "rw"), ("pairs_train", "preference"), ("pairs_eval", "preference"),
      ("trajectories_train", "trajectory"), ("trajectories_eval", "trajectory")]}


def _raw(name):
  with open(bundled.path(name), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_bundled_counts_and_categories(bundled_records):
  assert len(bundled_records["rw_train"]) >= 600
  kinds = collections.Counter(p["kind"] for p in bundled_records["pairs_train"])
  assert kinds["outcome"] >= 400 and kinds["process"] >= 400, kinds
  harm = {r["category"] for r in bundled_records["rw_train"]} - {"general"}
  assert len(harm) >= 10, harm
  labels = collections.Counter(r["label"] for r in _raw("rw_train"))
  assert all(labels[k] >= 40 for k in ("harmful", "jailbreak", "benign", "borderline")), labels
  wrappers = {r["template"] for r in _raw("rw_train") if r["label"] == "jailbreak"}
  assert len(wrappers) >= 5, wrappers
  prompts = collections.Counter(r["label"] for r in _raw("eval_prompts"))
  assert set(prompts) == {"harmful", "jailbreak", "benign", "borderline"}, prompts
  total = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(bundled.DIR) for f in files)
  assert total < 5 * 2**20, total


def test_bundled_split_by_template_and_placeholders_only():
  train = {r["template"] for name in ("rw_train", "pairs_train", "trajectories_train") for r in _raw(name)}
  evals = {r["template"] for name in ("rw_eval", "pairs_eval", "trajectories_eval", "eval_prompts")
           for r in _raw(name)}
  assert train and evals and not train & evals, train & evals
  for name in ("pairs_train", "pairs_eval"):
    for pair in _raw(name):
      if pair["label"] in ("harmful", "jailbreak"):
        answer = (pair["prefix"] + pair["rejected"]).split("</think>\n\n")[1]
        assert answer.startswith("[unsafe compliance: would describe") and answer.endswith("non-actionable]")
  process_ids = {p["id"].rsplit(":", 1)[0] for p in _raw("pairs_train") if p["kind"] == "process"}
  assert process_ids == {t["id"] for t in _raw("trajectories_train")}


def test_bundled_tokenizer_chatml_and_reasoning_tags():
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(bundled.path("tokenizer"))
  assert 2000 <= len(tok) <= 2100 and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
  for special in ("<|im_start|>", "<|im_end|>", "<think>", "</think>"):
    assert len(tok.encode(special, add_special_tokens=False)) == 1, special
  text = tok.apply_chat_template([{"role": "user", "content": "Hi"},
                                  {"role": "assistant", "content": "<think>\nok\n</think>\n\nHello"}],
                                 tokenize=False)
  assert text == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
                  "<think>\nok\n</think>\n\nHello<|im_end|>\n")
  assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
  # Trained on the bundled text: its words compress well.
  sample = _raw("rw_train")[0]["reasoning"]
  assert len(tok.encode(sample, add_special_tokens=False)) < len(sample) / 3
