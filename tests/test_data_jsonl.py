"""data/jsonl.py: the one JSON / JSON Lines reader (BOM, UTF-8, line limit, file:line errors) and
its users: training sources accept a BOM in .jsonl and .json files (issue 8 §3.5)."""

import pytest

from saro_jax.data import formats, jsonl, sources

BOM = b"\xef\xbb\xbf"
RW = b'{"prompt": "q", "reasoning": "r", "response": "a"}'


def test_jsonl_lines_with_places_blank_lines_skipped_bom_accepted(tmp_path):
  path = tmp_path / "x.jsonl"
  path.write_bytes(BOM + b'{"a": 1}\n\n  \n[2]\r\n"\xc3\xa9"\n')
  assert list(jsonl.read_jsonl(path)) == [(f"{path}:1", {"a": 1}), (f"{path}:4", [2]),
                                          (f"{path}:5", "\u00e9")]


def test_bom_only_at_the_start_of_the_file(tmp_path):
  path = tmp_path / "x.jsonl"
  path.write_bytes(b'{"a": 1}\n' + BOM + b'{"a": 2}\n')
  with pytest.raises(jsonl.InputError, match=r"x\.jsonl:2: malformed JSON at character 0"):
    list(jsonl.read_jsonl(path))


@pytest.mark.parametrize("data, reason, message", [
    (b'{"a": 1}\n{"a": \n', "malformed_json", r":2: malformed JSON at character 7: Expecting value"),
    (b'{"a": 1}\n"\xff"\n', "invalid_utf8", r":2: invalid UTF-8 at byte 1"),
    (b'{"a": 1}\n"' + b"x" * 40 + b'"\n', "line_too_long", r":2: line longer than max_line_bytes=20"),
])
def test_bad_lines_raise_or_are_yielded_in_place(tmp_path, data, reason, message):
  path = tmp_path / "x.jsonl"
  path.write_bytes(data + b'{"a": 3}\n')
  with pytest.raises(jsonl.InputError, match=message) as info:
    list(jsonl.read_jsonl(path, max_line_bytes=20))
  assert info.value.reason == reason and info.value.where == f"{path}:2"
  got = list(jsonl.read_jsonl(path, max_line_bytes=20, on_error="yield"))
  assert [w for w, _ in got] == [f"{path}:1", f"{path}:2", f"{path}:3"]
  assert isinstance(got[1][1], jsonl.InputError) and got[2][1] == {"a": 3}


def test_json_document_bom_and_errors(tmp_path):
  path = tmp_path / "x.json"
  path.write_bytes(BOM + b'{"a": [1, 2]}')
  assert jsonl.read_json(path) == {"a": [1, 2]}
  path.write_bytes(b'{\n  "a": [1,\n  ]\n}')
  with pytest.raises(jsonl.InputError, match=r"x\.json:3: malformed JSON at column 3"):
    jsonl.read_json(path)


def test_one_error_type_for_every_bad_input():
  assert sources.SourceError is jsonl.InputError
  assert issubclass(formats.RecordError, jsonl.InputError)


@pytest.mark.parametrize("name, content", [
    ("rw.jsonl", RW + b"\n"), ("rw.json", b"[" + RW + b"]"), ("rw_data.json", b'{"data": [' + RW + b"]}")])
def test_training_sources_accept_a_bom(tmp_path, name, content):
  path = tmp_path / name
  path.write_bytes(BOM + content)
  records, stats = sources.load_records(str(path), kind="rw")
  assert stats["kept"] == 1 and records[0]["messages"][-1]["content"].endswith("a")
