"""The reply half of a stub OpenAI-compatible chat endpoint (``/v1/chat/completions``), for the
tests of the HTTP teacher (tests/test_synthesize.py) and of the mining pipeline with an HTTP teacher
(tests/test_mine.py). Each test's handler decides what to answer; this sends it."""

from __future__ import annotations

import http.server
import json


class ChatHandler(http.server.BaseHTTPRequestHandler):

  def send_chat_reply(self, text: str) -> None:
    """A 200 with one assistant message of ``text``, as an OpenAI-compatible server sends it."""
    data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
    self.send_response(200)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def log_message(self, *args):  # quiet: no line per request on stderr
    pass
