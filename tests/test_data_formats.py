"""formats.py: every accepted record form normalizes exactly; every bad record names file:line and field."""

import json
import pathlib

import pytest

from saro_jax.data import formats

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "data"
WHERE = "data/train.jsonl:7"


def _lines(name):
  return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines()]


def test_rw_chat_messages_kept_and_reasoning_field_rendered():
  chat, with_reasoning = _lines("rw_chat.jsonl")
  record = formats.parse_rw(chat, where=WHERE)
  assert record == {"id": "chat-1", "category": "cyber", "messages": chat["messages"]}
  record = formats.parse_rw(with_reasoning, where=WHERE)
  assert record["id"] == "train.jsonl:7"  # no own id: file basename + line
  assert record["messages"][-1] == {
      "role": "assistant",
      "content": "<think>\nMalware request; policy forbids it.\n</think>\n\nI can't help with that."}


def test_rw_prompt_reasoning_response_with_custom_tags_and_system():
  fields, no_reasoning = _lines("rw_fields.jsonl")
  record = formats.parse_rw(fields, where=WHERE, reasoning_tags=("<reason>", "</reason>"))
  assert record == {"id": "fields-1", "category": "weapons", "messages": [
      {"role": "user", "content": "How do I build an untraceable gun?"},
      {"role": "assistant",
       "content": "<reason>\nWeapons request.\nPolicy: decline.\n</reason>\n\nI can't help with that."}]}
  record = formats.parse_rw(no_reasoning, where=WHERE)
  # Empty reasoning = a plain answer, no empty tag block.
  assert record["messages"] == [{"role": "system", "content": "You are helpful."},
                                {"role": "user", "content": "Shoot a photo at night?"},
                                {"role": "assistant", "content": "Use a tripod."}]


def test_preference_forms_standard_conversational_implicit_process():
  std, conv, implicit, proc = [formats.parse_preference(r, where=WHERE) for r in _lines("prefs.jsonl")]
  assert std == {"id": "std", "kind": "outcome", "category": "fraud",
                 "prompt": [{"role": "user", "content": "How do I forge a note?"}], "prefix": "",
                 "chosen": "I can't help with forgery.", "rejected": "[unsafe compliance]"}
  assert (conv["prompt"], conv["chosen"], conv["rejected"]) == (
      [{"role": "user", "content": "Kill a zombie process?"}], "Signal its parent.", "I can't help.")
  assert (implicit["prompt"], implicit["chosen"], implicit["rejected"]) == (
      [{"role": "user", "content": "Hi"}], "Hello!", "Go away.")
  assert proc["kind"] == "process" and proc["prefix"] == "<think>\nThe user asks for a toxin.\n"
  assert proc["prefix"] + proc["chosen"] == "<think>\nThe user asks for a toxin.\nWait — unsafe.\n</think>\n\nNo."


def test_preference_kind_inferred_from_prefix_and_side_reasoning_rendered():
  raw = {"prompt": "q", "prefix": "<think>\nstep\n", "chosen": "a", "rejected": "b"}
  assert formats.parse_preference(raw, where=WHERE)["kind"] == "process"
  raw = {"prompt": "q", "chosen": "ok", "chosen_reasoning": "fine", "rejected": "no"}
  assert formats.parse_preference(raw, where=WHERE)["chosen"] == "<think>\nfine\n</think>\n\nok"


def test_trajectory_parsed():
  raw = {"prompt": "p", "steps": ["s0", "s1"], "first_unsafe_step": 1, "reflection": "Wait — no.",
         "safe_continuation": [], "safe_answer": "No.", "unsafe_answer": "[unsafe]", "category": "theft"}
  traj = formats.parse_trajectory(raw, where=WHERE)
  assert traj["id"] == "train.jsonl:7" and traj["first_unsafe_step"] == 1 and traj["category"] == "theft"
  assert traj["prompt"] == [{"role": "user", "content": "p"}]


USER = {"role": "user", "content": "q"}
BOT = {"role": "assistant", "content": "a"}
RW_BAD = [
    ({"category": "x"}, "messages", "is missing"),
    ({"messages": "hi"}, "messages", "expected a list of messages, got str"),
    ({"messages": [USER, {"role": "robot", "content": "a"}]}, "messages[1].role", "must be one of"),
    ({"messages": [USER, BOT, USER]}, "messages[2].role", "last turn must be 'assistant'"),
    ({"messages": [BOT]}, "messages", "no user turn"),
    ({"messages": [USER, {"role": "assistant", "content": "  "}]}, "messages[1].content", "is empty"),
    ({"messages": [USER, {"role": "assistant", "content": 3}]}, "messages[1].content", "expected a string"),
    ({"messages": [USER, {"role": "system", "content": "s"}, BOT]}, "messages[1].role", "system message"),
    ({"prompt": 5, "reasoning": "r", "response": "a"}, "prompt", "expected a string or a list of messages, got int"),
    ({"prompt": "q", "response": "a"}, "reasoning", "is missing"),
    ({"prompt": "q", "reasoning": "r", "response": ""}, "response", "is empty"),
    ({"prompt": "q", "reasoning": "r", "response": "a", "category": 3}, "category", "expected a string"),
    ({"id": [1], "messages": [USER, BOT]}, "id", "expected a string or integer"),
    ([1, 2], "<record>", "expected a JSON object"),
    # Issue 8 §3.2: a tag inside a rendered field would put a second tag in the turn.
    ({"prompt": "p", "reasoning": "thinking </think> injected answer", "response": "r"},
     "reasoning", "contains the reasoning tag '</think>'"),
    ({"prompt": "p", "reasoning": "a <think> b", "response": "r"}, "reasoning", "'<think>'"),
    ({"prompt": "p", "reasoning": "r", "response": "<think>again"}, "response", "'<think>'"),
    ({"prompt": "p", "reasoning": "", "response": "r </think>"}, "response", "'</think>'"),
    ({"messages": [USER, BOT], "reasoning": "x </think>"}, "reasoning", "'</think>'"),
    ({"messages": [USER, {"role": "assistant", "content": "</think> a"}], "reasoning": "x"},
     "messages[1].content", "'</think>'"),
    ({"messages": [USER, {"role": "assistant", "content": "<think>\nr\n</think>\n</think> a"}]},
     "messages[1].content", "at most one"),
    ({"messages": [USER, {"role": "assistant", "content": "</think> a <think>"}]},
     "messages[1].content", "in that order"),
]
PREF_BAD = [
    ({"prompt": "q", "chosen": "a"}, "rejected", "is missing"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "chosen", "is empty"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "rejected", "identical"),
    ({"prompt": "q", "chosen": 1, "rejected": "b"}, "chosen", "expected a string or a list of messages, got int"),
    ({"prompt": "q", "chosen": "a", "rejected": {"x": 1}}, "rejected", "expected a string or a list of messages, got dict"),
    ({"prompt": [BOT], "chosen": "a", "rejected": "b"}, "prompt[0].role", "must be 'user'"),
    ({"prompt": "q", "chosen": [BOT, BOT], "rejected": "b"}, "chosen", "exactly one assistant message"),
    ({"chosen": "a", "rejected": "b"}, "prompt", "cannot be implicit"),
    ({"chosen": [USER, BOT], "rejected": [{"role": "user", "content": "other"}, BOT]}, "prompt", "share no"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "kind": "step"}, "kind", "must be one of"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "kind": "outcome", "prefix": "x"}, "prefix", "no shared"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "prefix": 3}, "prefix", "expected a string"),
    ({"prompt": "q", "chosen": "a", "chosen_reasoning": "x </think>", "rejected": "b"},
     "chosen_reasoning", "'</think>'"),
    ({"prompt": "q", "chosen": "<think>a", "chosen_reasoning": "x", "rejected": "b"}, "chosen", "'<think>'"),
    ({"prompt": "q", "chosen": "a", "rejected": "<think>\nx\n</think>\n\n</think>"}, "rejected", "at most one"),
    ({"prompt": "q", "prefix": "<think>\ns\n", "chosen": "t\n</think>\n\na", "rejected": "<think>u"},
     "prefix+rejected", "at most one"),
    ({"prompt": "q", "prefix": "s\n", "chosen": "t\n</think>\n\na", "rejected": "u"},
     "prefix+chosen", "has 0 '<think>' and 1 '</think>'"),
]
TRAJ = {"prompt": "p", "steps": ["s0", "s1"], "first_unsafe_step": 1, "reflection": "Wait",
        "safe_continuation": [], "safe_answer": "No.", "unsafe_answer": "[unsafe]"}
TRAJ_BAD = [
    ({**TRAJ, "first_unsafe_step": 2}, "first_unsafe_step", "must index into steps"),
    ({**TRAJ, "first_unsafe_step": True}, "first_unsafe_step", "expected an integer"),
    ({**TRAJ, "steps": []}, "steps", "empty list"),
    ({**TRAJ, "steps": ["s0", ""]}, "steps[1]", "non-empty string"),
    ({**TRAJ, "unsafe_answer": "No."}, "unsafe_answer", "identical"),
    ({k: v for k, v in TRAJ.items() if k != "reflection"}, "reflection", "is missing"),
    ({**TRAJ, "steps": ["s0", "s1 </think> answer"]}, "steps[1]", "'</think>'"),
    ({**TRAJ, "safe_continuation": ["<think>"]}, "safe_continuation[0]", "'<think>'"),
    ({**TRAJ, "reflection": "Wait </think>"}, "reflection", "'</think>'"),
    ({**TRAJ, "safe_answer": "</think> No."}, "safe_answer", "'</think>'"),
    ({**TRAJ, "unsafe_answer": "<think>"}, "unsafe_answer", "'<think>'"),
]


@pytest.mark.parametrize("parse, raw, field, problem",
                         [(formats.parse_rw, *case) for case in RW_BAD]
                         + [(formats.parse_preference, *case) for case in PREF_BAD]
                         + [(formats.parse_trajectory, *case) for case in TRAJ_BAD])
def test_bad_record_names_file_line_and_field(parse, raw, field, problem):
  with pytest.raises(formats.RecordError) as info:
    parse(raw, where=WHERE)
  message = str(info.value)
  assert message.startswith(f"{WHERE}: field '{field}': "), message
  assert problem in message
  assert info.value.field == field and info.value.where == WHERE
  assert isinstance(info.value, ValueError)


def test_tags_are_the_configured_ones():
  """The check follows data.reasoning_tags: default tags are plain text under custom tags."""
  raw = {"prompt": "p", "reasoning": "about </think> in html", "response": "r"}
  record = formats.parse_rw(raw, where=WHERE, reasoning_tags=("<reason>", "</reason>"))
  assert record["messages"][-1]["content"].count("</reason>") == 1
  with pytest.raises(formats.RecordError, match="'</reason>'"):
    formats.parse_rw({**raw, "reasoning": "x </reason>"}, where=WHERE,
                     reasoning_tags=("<reason>", "</reason>"))


def test_well_formed_reasoning_blocks_still_accepted():
  raw = {"messages": [USER, {"role": "assistant", "content": "<think>\nr\n</think>\n\na"}]}
  assert formats.parse_rw(raw, where=WHERE)["messages"][-1]["content"].count("</think>") == 1
  pair = {"prompt": "q", "prefix": "<think>\ns\n", "chosen": "t\n</think>\n\na",
          "rejected": "u\n</think>\n\nb"}
  assert formats.parse_preference(pair, where=WHERE)["kind"] == "process"
