"""`kvjax serve` on localhost: a tiny random Llama with a byte tokenizer behind the real server
(FastAPI + uvicorn on a thread, the engine on its own).

Checks: 64 concurrent streaming clients over bounded time, more than the engine's slots (the
rest queue): each stream's text is exactly what kvjax.generate gives its prompt alone, and
nothing is left behind (no pages in use, no request records). A malformed body, a missing
field, an over-long prompt, an unknown model, n > 1 each get their HTTP error; a client that
disconnects mid-stream has its request cancelled and its pages freed; the server keeps serving
after each. The openai client reads both endpoints, streamed and not.
"""

import asyncio
import json
import socket
import threading
import time

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

import jax.numpy as jnp
from flax import nnx

from kvjax import serve
from kvjax.models import LlamaForCausalLM, ModelConfig
from kvjax.models.engine import Engine
from kvjax.models.generate import encode, generate_tokens
from kvjax.models.tokenizer import Tokenizer

NAME = "tiny-llama"


class _Bytes:
  """Token i + 3 is byte i; 0 pad, 1 BOS, 2 EOS; ids past 258 decode to nothing."""

  def encode(self, text):
    return [b + 3 for b in text.encode("utf-8")]

  def decode(self, ids, *, skip_special_tokens):
    return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", errors="replace")

  def token_to_id(self, token):
    return None

  def id_to_token(self, i):
    return str(i)


@pytest.fixture(scope="module")
def server():
  model = LlamaForCausalLM(ModelConfig.llama_tiny(), rngs=nnx.Rngs(0))
  tokenizer = Tokenizer(_Bytes(), bos_id=1, eos_ids=(2,), pad_id=0, vocab_size=512,
                        add_bos=True, name="bytes")
  engine = Engine(model, num_pages=96, page_size=16, max_slots=8, max_seq_len=256,
                  prefill_chunk=64, cache_dtype=jnp.bfloat16)
  loop = serve.EngineLoop(engine, max_waiting=128)
  app = serve.create_app(loop, tokenizer, model_name=NAME)
  sock = socket.socket()
  sock.bind(("127.0.0.1", 0))
  port = sock.getsockname()[1]
  sock.close()
  srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
  thread = threading.Thread(target=srv.run, daemon=True)
  thread.start()
  deadline = time.time() + 30
  while not srv.started and time.time() < deadline:
    time.sleep(0.05)
  assert srv.started
  yield dict(url=f"http://127.0.0.1:{port}", model=model, tokenizer=tokenizer, engine=engine,
             loop=loop)
  srv.should_exit = True
  thread.join(10)
  loop.close()


def alone(s, prompt, max_tokens):
  """The text and token count kvjax.generate gives `prompt` alone, with the engine's view."""
  e = s["engine"]
  ids = encode(s["tokenizer"], prompt, s["model"].config)
  out = generate_tokens(s["model"], [ids], max_new_tokens=max_tokens, max_len=e.view_len,
                        prefill_chunk=e.prefill_chunk, cache_dtype=jnp.bfloat16)[0]
  return s["tokenizer"].decode([t for t in out if t not in e.eos]), len(out)


def wait_idle(s, timeout=30):
  deadline = time.time() + timeout
  while time.time() < deadline:
    m = s["loop"].metrics()
    if (m["pages_in_use"] == 0 and m["waiting"] == 0 and not s["engine"].requests
        and not s["loop"]._streams):
      return m
    time.sleep(0.05)
  raise AssertionError(f"server did not go idle: {s['loop'].metrics()}")


def test_64_concurrent_streams_match_generate_alone(server):
  rng = np.random.default_rng(0)
  prompts = [f"request {i}: " + "".join(chr(c) for c in rng.integers(97, 123, rng.integers(3, 40)))
             for i in range(64)]
  lengths = rng.integers(4, 25, 64).tolist()

  async def one(client, prompt, n):
    body = {"model": NAME, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True}
    pieces, reasons, done = [], [], False
    async with client.stream("POST", "/v1/completions", json=body) as r:
      assert r.status_code == 200, await r.aread()
      async for line in r.aiter_lines():
        if not line.startswith("data: "):
          continue
        if line == "data: [DONE]":
          done = True
          continue
        chunk = json.loads(line[6:])
        pieces.append(chunk["choices"][0]["text"])
        reasons.append(chunk["choices"][0]["finish_reason"])
        usage = chunk.get("usage")
    return "".join(pieces), reasons, done, usage

  async def main():
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=server["url"], timeout=120, limits=limits) as client:
      return await asyncio.wait_for(
          asyncio.gather(*(one(client, p, n) for p, n in zip(prompts, lengths))), 300)

  results = asyncio.run(main())
  assert server["loop"].metrics()["requests_total"] >= 64
  for (text, reasons, done, usage), p, n in zip(results, prompts, lengths):
    want, count = alone(server, p, n)
    assert done and reasons[-1] in ("stop", "length") and all(r is None for r in reasons[:-1])
    assert text == want, p
    assert usage["completion_tokens"] == count
  m = wait_idle(server)
  assert m["requests_completed"] >= 64


def test_errors_and_the_server_keeps_serving(server):
  with httpx.Client(base_url=server["url"], timeout=60) as c:
    r = c.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = c.post("/v1/completions", json={"model": NAME})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = c.post("/v1/completions", json={"model": NAME, "prompt": "x", "temperature": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = c.post("/v1/completions", json={"model": NAME, "prompt": "x" * 240, "max_tokens": 30})
    assert r.status_code == 400 and "max_seq_len" in r.json()["error"]["message"]
    r = c.post("/v1/completions", json={"model": "gpt-5", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = c.post("/v1/completions", json={"model": NAME, "prompt": "x", "n": 2})
    assert r.status_code == 400
    r = c.post("/v1/chat/completions", json={"model": NAME, "messages": []})
    assert r.status_code == 400
    r = c.post("/v1/completions", json={"model": NAME, "prompt": "x", "seed": 2**40})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
    r = c.post("/v1/completions", json={"model": NAME, "prompt": "x" * 260})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = c.post("/v1/completions", json={"model": NAME, "prompt": "hello", "max_tokens": 5,
                                        "temperature": 0})
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == alone(server, "hello", 5)[0]
    assert "kvjax_pages_in_use" in c.get("/metrics").text
    assert c.get("/health").json() == {"status": "ok"}
  wait_idle(server)


def test_disconnect_mid_stream_cancels(server):
  before = server["loop"].metrics().get("requests_cancelled", 0)
  with httpx.Client(base_url=server["url"], timeout=60) as c:
    body = {"model": NAME, "prompt": "a long one", "max_tokens": 200, "temperature": 0,
            "stream": True, "stop": None}
    with c.stream("POST", "/v1/completions", json=body) as r:
      seen = 0
      for line in r.iter_lines():
        seen += line.startswith("data: ")
        if seen >= 2:
          break
    m = wait_idle(server)
    assert m["requests_cancelled"] == before + 1
    r = c.post("/v1/completions", json={"model": NAME, "prompt": "after", "max_tokens": 3,
                                        "temperature": 0})
    assert r.status_code == 200


class _BusyEngine:
  """An engine stand-in with every slot taken and `queued` requests waiting."""

  def __init__(self, queued):
    self.waiting, self.slots, self.added = [None] * queued, ["busy"] * 4, 0

  def add_request(self, prompt, **settings):
    self.added += 1
    return 1000 + self.added


@pytest.mark.parametrize("queued,max_waiting,rejected", [(3, 3, True), (2, 3, False)])
def test_queue_bound(queued, max_waiting, rejected):
  """Beyond max_waiting queued requests (free slots do not count) the loop refuses with
  Overloaded, which the app answers with 503 and Retry-After."""
  import collections
  import concurrent.futures
  loop = serve.EngineLoop.__new__(serve.EngineLoop)   # the handler alone, no thread
  loop.engine, loop.max_waiting = _BusyEngine(queued), max_waiting
  loop.counters, loop._streams = collections.Counter(), {}

  async def main():
    done = concurrent.futures.Future()
    loop._handle("add", ([3, 4], dict(max_new_tokens=1), asyncio.get_running_loop(),
                         asyncio.Queue(), done))
    if rejected:
      with pytest.raises(serve.Overloaded):
        done.result()
      assert loop.counters["requests_rejected"] == 1
    else:
      assert done.result() == 1001

  asyncio.run(main())


def test_openai_client_and_stop_strings(server):
  openai = pytest.importorskip("openai")
  client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused")
  # "q": the seeded tiny model's continuation holds printable two-character runs to stop at
  out = client.completions.create(model=NAME, prompt="q", max_tokens=12, temperature=0)
  want = alone(server, "q", 12)[0]
  assert out.choices[0].text == want
  ascii_pairs = [want[i:i + 2] for i in range(1, len(want) - 1)
                 if want[i:i + 2].isascii() and want[i:i + 2].isprintable()]
  assert ascii_pairs, repr(want)
  stop = ascii_pairs[0]
  out = client.completions.create(model=NAME, prompt="q", max_tokens=12, temperature=0,
                                  stop=[stop])
  assert out.choices[0].text == want[:want.find(stop)]
  assert out.choices[0].finish_reason == "stop"
  pieces, reasons = [], []
  for chunk in client.completions.create(model=NAME, prompt="q", max_tokens=12,
                                         temperature=0, stop=stop, stream=True):
    pieces.append(chunk.choices[0].text)
    reasons.append(chunk.choices[0].finish_reason)
  assert "".join(pieces) == want[:want.find(stop)] and reasons[-1] == "stop"
  pieces = []
  for chunk in client.chat.completions.create(
      model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0,
      stream=True):
    pieces.append(chunk.choices[0].delta.content or "")
  prompt = serve.chat_prompt([{"role": "user", "content": "hi"}], "llama")
  assert "".join(pieces) == alone(server, prompt, 5)[0]
  assert [m.id for m in client.models.list().data] == [NAME]
  wait_idle(server)
