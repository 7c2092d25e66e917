"""A stub OpenAI-compatible chat endpoint (``/v1/chat/completions``) for the tests of the HTTP
teacher (tests/test_synthesize.py) and of the mining pipeline with an HTTP teacher
(tests/test_mine.py): each test's handler decides what to answer, ``ChatHandler`` sends it, and
``serving`` runs the server."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading


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


@contextlib.contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler]):
  """(server, base URL) of a local server answering with ``handler`` in a thread; stopped on exit,
  and by itself after 120 s if a test hangs."""
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
  thread.start()
  stopper = threading.Timer(120.0, server.shutdown)
  stopper.daemon = True
  stopper.start()
  try:
    yield server, f"http://127.0.0.1:{server.server_address[1]}/v1"
  finally:
    stopper.cancel()
    server.shutdown()
    server.server_close()
