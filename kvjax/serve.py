"""`kvjax serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

    kvjax serve --model gemma3-270m --cache int4 --port 8000

Endpoints: `POST /v1/completions` and `POST /v1/chat/completions` (streamed as server-sent
events with `"stream": true`, or whole), `GET /v1/models`, `GET /health`, and `GET /metrics`
(Prometheus text: tokens/s over the last 10 s, tokens and requests so far, pages in use,
requests waiting / running, preemptions).

One thread owns the engine (`kvjax.models.engine.Engine`) and steps it while there is work;
HTTP handlers hand it requests and read their tokens from a queue each, so requests join and
leave the running batch at any step. Requests beyond the engine's slots and pages wait in its
queue; beyond `max_waiting` waiting requests the server answers 503 (Retry-After) rather than
grow without bound. A client that disconnects has its request cancelled and its pages freed.

Errors follow the OpenAI shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a
malformed body, an unsupported option or a prompt the engine cannot hold, 404 for an unknown
model, 503 when the queue is full.

Extensions to the OpenAI body: `top_k`, and `prompt` as a list of token ids.
"""

import asyncio
import collections
import concurrent.futures
import itertools
import json
import queue
import threading
import time

import numpy as np


class Overloaded(RuntimeError):
  """The engine's queue holds `max_waiting` requests already."""


# ------------------------------------------------------------------------------ the engine loop


class EngineLoop:
  """Runs an `Engine` on a thread of its own for async callers.

  `await submit(prompt_ids, **settings)` queues a request and returns (request id, an
  asyncio.Queue of `kvjax.models.engine.Event`s: the request's tokens, ending with the finished
  one, or an exception if a step failed); `cancel(id)` stops one, after which nothing more
  arrives on its queue. Everything that touches the engine happens on the loop's thread. A
  failed step fails the requests it held and starts the engine afresh; the thread never dies
  of a request's error (`alive` says whether it runs).
  """

  def __init__(self, engine, *, max_waiting: int = 256, idle_wait: float = 0.05):
    if not isinstance(max_waiting, int) or max_waiting < 0:
      raise ValueError(f"max_waiting must be a non-negative int, got {max_waiting!r}")
    self.engine = engine
    self.max_waiting = max_waiting
    self._idle_wait = idle_wait
    self._commands: queue.Queue = queue.Queue()
    self._streams: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
    self._recent: collections.deque = collections.deque()   # (time, tokens) of recent steps
    self.counters = collections.Counter()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="kvjax-engine", daemon=True)
    self._thread.start()

  async def submit(self, prompt, **settings):
    loop = asyncio.get_running_loop()
    stream: asyncio.Queue = asyncio.Queue()
    done: concurrent.futures.Future = concurrent.futures.Future()
    self._commands.put(("add", (prompt, settings, loop, stream, done)))
    rid = await asyncio.wrap_future(done)
    return rid, stream

  def cancel(self, request_id: int, *, stopped: bool = False) -> None:
    """Stops a request: the client went away, or (stopped=True) its text reached a stop
    string."""
    self._commands.put(("cancel", (request_id, stopped)))

  @property
  def alive(self) -> bool:
    return self._thread.is_alive() and not self._stop.is_set()

  def close(self, timeout: float = 10.0) -> None:
    self._stop.set()
    self._commands.put(("wake", None))
    self._thread.join(timeout)

  def metrics(self) -> dict:
    now = time.perf_counter()
    recent = [(t, n) for t, n in list(self._recent) if now - t <= 10.0]
    m = dict(self.engine.metrics())
    m.update(self.counters)
    m["tokens_per_second"] = sum(n for _, n in recent) / 10.0
    m["max_waiting"] = self.max_waiting
    return m

  def _handle(self, kind, arg) -> None:
    e = self.engine
    if kind == "add":
      prompt, settings, loop, stream, done = arg
      # Requests a free slot will take at the next step do not count as queued.
      if len(e.waiting) - e.slots.count(None) >= self.max_waiting:
        self.counters["requests_rejected"] += 1
        done.set_exception(Overloaded(f"{len(e.waiting)} requests are waiting already; retry"))
        return
      try:
        rid = e.add_request(prompt, **settings)
      except (ValueError, TypeError) as err:
        done.set_exception(err)
        return
      self._streams[rid] = (loop, stream)
      self.counters["requests_total"] += 1
      done.set_result(rid)
    elif kind == "cancel":
      rid, stopped = arg
      if rid in e.requests:
        if e.requests[rid].state != "done":
          e.cancel(rid)
        e.forget(rid)
        self.counters["requests_completed" if stopped else "requests_cancelled"] += 1
      self._streams.pop(rid, None)

  def _run(self) -> None:
    e = self.engine
    while not self._stop.is_set():
      try:
        kind, arg = self._commands.get(timeout=self._idle_wait) if not e.has_work() else \
            self._commands.get_nowait()
      except queue.Empty:
        pass
      else:
        try:
          self._handle(kind, arg)
        except Exception as err:  # never let the thread die: answer the caller instead
          done = arg[-1] if kind == "add" else None
          if done is not None and not done.done():
            done.set_exception(err)
          self.counters["engine_errors"] += 1
        continue  # drain every command before the next step
      if not e.has_work():
        continue
      try:
        events = e.step()
      except Exception as err:  # the engine's state is unknown now: fail what it holds
        for rid, (loop, stream) in list(self._streams.items()):
          loop.call_soon_threadsafe(stream.put_nowait, err)
        self._streams.clear()
        self.counters["engine_errors"] += 1
        e.reset()   # fresh pools: the failed step's donated buffers may be gone
        continue
      now = time.perf_counter()
      self._recent.append((now, len(events)))
      while self._recent and now - self._recent[0][0] > 10.0:
        self._recent.popleft()
      for ev in events:
        target = self._streams.get(ev.request_id)
        if target is None:
          if ev.finished and ev.request_id in e.requests:
            e.forget(ev.request_id)
          continue
        loop, stream = target
        loop.call_soon_threadsafe(stream.put_nowait, ev)
        if ev.finished:
          del self._streams[ev.request_id]
          e.forget(ev.request_id)
          self.counters["requests_completed"] += 1


# --------------------------------------------------------------------------------- chat prompts


def chat_prompt(messages: list[dict], arch: str) -> str:
  """The model family's chat template applied to OpenAI-style messages ({"role", "content"}),
  ending with the assistant's turn opened. Gemma-3 folds a system message into the first user
  turn, as its template does."""
  if not messages:
    raise ValueError("messages must hold at least one message")
  roles = {"system", "user", "assistant"}
  for i, m in enumerate(messages):
    if m.get("role") not in roles or not isinstance(m.get("content"), str):
      raise ValueError(f"messages[{i}] must be {{'role': one of {sorted(roles)}, 'content': str}}")
  if arch == "gemma3":
    msgs = list(messages)
    if msgs[0]["role"] == "system":
      system = msgs.pop(0)["content"]
      if msgs and msgs[0]["role"] == "user":
        msgs[0] = {"role": "user", "content": system + "\n\n" + msgs[0]["content"]}
      else:
        msgs.insert(0, {"role": "user", "content": system})
    turns = "".join(f"<start_of_turn>{'model' if m['role'] == 'assistant' else 'user'}\n"
                    f"{m['content']}<end_of_turn>\n" for m in msgs)
    return turns + "<start_of_turn>model\n"
  if arch == "qwen2":
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"
  if arch == "llama":
    turns = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}"
                    "<|eot_id|>" for m in messages)
    return turns + "<|start_header_id|>assistant<|end_header_id|>\n\n"
  raise ValueError(f"no chat template for architecture {arch!r}")


# ------------------------------------------------------------------------------------- the app


class _Detokenizer:
  """Text of a growing token list, handed out in pieces; a piece never ends inside a UTF-8
  character (a trailing U+FFFD waits for the next token) and stops before a stop string."""

  def __init__(self, tokenizer, stop: list[str]):
    self.tokenizer, self.stop = tokenizer, stop
    self.tokens: list[int] = []
    self.sent = 0
    self.stopped = False

  def add(self, token: int, final: bool) -> str:
    self.tokens.append(token)
    text = self.tokenizer.decode(self.tokens)
    for s in self.stop:
      at = text.find(s)
      if at >= 0:
        text, self.stopped, final = text[:at], True, True
    if not final:
      # hold back what a stop string could still complete, and a partial character
      keep = max((len(s) - 1 for s in self.stop), default=0)
      end = len(text) - keep
      while end > self.sent and text[end - 1] == "\ufffd":
        end -= 1
      text = text[:max(end, self.sent)]
    piece = text[self.sent:]
    self.sent = len(text)
    return piece


def create_app(loop: EngineLoop, tokenizer, *, model_name: str):
  """The FastAPI application serving `loop`'s engine as `model_name`."""
  from fastapi import FastAPI, Request
  from fastapi.exceptions import RequestValidationError
  from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
  from pydantic import BaseModel, ConfigDict, Field

  engine = loop.engine
  cfg = engine.model.config
  app = FastAPI(title="kvjax", version="0.1.0")
  ids = itertools.count()

  class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=0, lt=2**32)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)

  class CompletionBody(_Body):
    prompt: str | list[int]

  class ChatMessage(BaseModel):
    role: str
    content: str

  class ChatBody(_Body):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(default=None, ge=1)

  def error(status: int, message: str, kind: str, param: str | None = None, code=None,
            headers=None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": code}}, status_code=status, headers=headers)

  @app.exception_handler(RequestValidationError)
  async def _invalid(request, exc):
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}",
                 "invalid_request_error", param=where or None)

  async def run(request: Request, body: _Body, prompt_ids: list[int], kind: str):
    if body.model != model_name:
      return error(404, f"model {body.model!r} does not exist; this server serves "
                   f"{model_name!r}", "invalid_request_error", "model", "model_not_found")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if any(not s for s in stop) or len(stop) > 4:
      return error(400, "stop must be up to 4 non-empty strings", "invalid_request_error",
                   "stop")
    room = engine.max_seq_len - len(prompt_ids)
    if room < 1:
      return error(400, f"the prompt has {len(prompt_ids)} tokens; this server holds "
                   f"{engine.max_seq_len} per request, completion included",
                   "invalid_request_error", "prompt", "context_length_exceeded")
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
    max_tokens = max_tokens or min(16 if kind == "text_completion" else room, room)
    settings = dict(max_new_tokens=max_tokens, temperature=body.temperature,
                    top_k=body.top_k if body.temperature > 0 else None,
                    top_p=body.top_p if body.top_p < 1 and body.temperature > 0 else None,
                    seed=body.seed if body.seed is not None else int(np.random.randint(2**31)))
    try:
      rid, stream = await loop.submit(prompt_ids, **settings)
    except Overloaded as err:
      return error(503, str(err), "server_overloaded", headers={"Retry-After": "1"})
    except (ValueError, TypeError) as err:
      text = str(err)
      param = ("prompt" if "prompt" in text or "max_seq_len" in text
               else "max_tokens" if "max_new_tokens" in text else None)
      return error(400, text, "invalid_request_error", param)
    created = int(time.time())
    name = ("cmpl-" if kind == "text_completion" else "chatcmpl-") + str(next(ids))
    detok = _Detokenizer(tokenizer, stop)
    usage = lambda: {"prompt_tokens": len(prompt_ids), "completion_tokens": len(detok.tokens),
                     "total_tokens": len(prompt_ids) + len(detok.tokens)}

    async def events():
      """(text piece, finish reason or None) until the request ends."""
      while True:
        ev = await stream.get()
        if isinstance(ev, Exception):
          raise ev
        piece = detok.add(ev.token, ev.finished)
        if detok.stopped and not ev.finished:
          loop.cancel(rid, stopped=True)
          yield piece, "stop"
          return
        if ev.finished:
          yield piece, "stop" if detok.stopped else ev.reason
          return
        yield piece, None

    def choice(piece, reason, chunk):
      if kind == "text_completion":
        return {"index": 0, "text": piece, "logprobs": None, "finish_reason": reason}
      if chunk:
        return {"index": 0, "delta": {"content": piece} if piece else {},
                "finish_reason": reason}
      return {"index": 0, "message": {"role": "assistant", "content": piece},
              "finish_reason": reason}

    obj = kind if kind == "text_completion" else "chat.completion"
    if body.stream:
      async def sse():
        finished = False
        try:
          if kind != "text_completion":
            first = {"id": name, "object": "chat.completion.chunk", "created": created,
                     "model": model_name, "choices": [{"index": 0, "delta": {"role": "assistant"},
                                                       "finish_reason": None}]}
            yield f"data: {json.dumps(first)}\n\n"
          async for piece, reason in events():
            if not piece and reason is None:
              continue
            data = {"id": name, "object": obj + (".chunk" if obj != "text_completion" else ""),
                    "created": created, "model": model_name,
                    "choices": [choice(piece, reason, True)]}
            if reason is not None:
              data["usage"] = usage()
              finished = True
            yield f"data: {json.dumps(data)}\n\n"
          yield "data: [DONE]\n\n"
        except Exception as err:  # a failure mid-stream: say so in the stream
          finished = True
          loop.cancel(rid)
          yield f"data: {json.dumps({'error': {'message': str(err), 'type': 'server_error'}})}\n\n"
        finally:
          if not finished:
            loop.cancel(rid)   # the client went away
      return StreamingResponse(sse(), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache"})

    text, reason = [], None
    gen = events()
    try:
      while True:
        task = asyncio.ensure_future(gen.__anext__())
        while not task.done():
          await asyncio.wait([task], timeout=0.5)
          if not task.done() and await request.is_disconnected():
            task.cancel()
            loop.cancel(rid)
            return error(499, "client closed the request", "cancelled")
        try:
          piece, reason = task.result()
        except StopAsyncIteration:
          break
        text.append(piece)
    except Exception as err:
      loop.cancel(rid)
      return error(500, str(err), "server_error")
    return {"id": name, "object": obj, "created": created, "model": model_name,
            "choices": [choice("".join(text), reason, False)], "usage": usage()}

  @app.post("/v1/completions")
  async def completions(body: CompletionBody, request: Request):
    if isinstance(body.prompt, str):
      from kvjax.models.generate import encode
      prompt_ids = encode(tokenizer, body.prompt, cfg)
    else:
      prompt_ids = list(body.prompt)
    return await run(request, body, prompt_ids, "text_completion")

  @app.post("/v1/chat/completions")
  async def chat(body: ChatBody, request: Request):
    try:
      text = chat_prompt([m.model_dump() for m in body.messages], cfg.arch)
    except ValueError as err:
      return error(400, str(err), "invalid_request_error", "messages")
    from kvjax.models.generate import encode
    return await run(request, body, encode(tokenizer, text, cfg), "chat")

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                        "owned_by": "kvjax"}]}

  @app.get("/health")
  async def health():
    if not loop.alive:
      return JSONResponse({"status": "engine stopped"}, status_code=503)
    return {"status": "ok"}

  @app.get("/metrics")
  async def metrics():
    m = loop.metrics()
    lines = []
    counters = {"tokens_generated", "prefill_tokens", "preemptions", "steps", "decode_steps",
                "requests_total", "requests_completed", "requests_cancelled",
                "requests_rejected", "engine_errors"}
    for key, value in sorted(m.items()):
      if isinstance(value, (int, float)):
        kind = "counter" if key in counters else "gauge"
        lines.append(f"# TYPE kvjax_{key} {kind}\nkvjax_{key} {value}")
    lines.append(f"# TYPE kvjax_cache_bytes gauge\nkvjax_cache_bytes {engine.cache_bytes()}")
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

  return app


# ------------------------------------------------------------------------------------------ CLI


CACHES = ("int4", "int4-srft", "bf16")


def build_engine(model, cache: str, *, num_pages: int, page_size: int, max_slots: int,
                 max_seq_len: int | None, prefill_chunk: int, tokenizer=None,
                 calibration=None):
  """The engine for `kvjax serve --cache`: int4 (calibrated: `calibration`, or the model's
  own, computed on first use), int4-srft (uncalibrated) or bf16."""
  import jax.numpy as jnp
  import kvjax
  from kvjax.models.engine import Engine
  kw = dict(num_pages=num_pages, page_size=page_size, max_slots=max_slots,
            max_seq_len=max_seq_len, prefill_chunk=prefill_chunk)
  if cache == "int4":
    if calibration is None:
      from kvjax.models import calibrated
      calibration = calibrated.auto(model, tokenizer)
    return Engine(model, calibration=calibration, **kw)
  if cache == "int4-srft":
    return Engine(model, calibration=False, quant=kvjax.QuantConfig(), **kw)
  if cache == "bf16":
    return Engine(model, calibration=False, cache_dtype=jnp.bfloat16, **kw)
  raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")


def add_arguments(p) -> None:
  p.add_argument("--model", default="gemma3-270m",
                 help="named offline checkpoint, a Hugging Face directory or a .gguf file")
  p.add_argument("--cache", default="int4", choices=CACHES)
  p.add_argument("--calibration", default=None, metavar="DIR",
                 help="calibration artifact of the int4 cache (default: the model's own)")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                 help="weight dtype")
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--num-pages", type=int, default=2048, help="pages per layer's pool")
  p.add_argument("--page-size", type=int, default=32,
                 help="tokens per page (a multiple of 32: TPU decode reads pages in place)")
  p.add_argument("--max-slots", type=int, default=16, help="requests decoding at once")
  p.add_argument("--max-seq-len", type=int, default=4096)
  p.add_argument("--prefill-chunk", type=int, default=512)
  p.add_argument("--max-waiting", type=int, default=256,
                 help="queued requests beyond which the server answers 503")
  p.add_argument("--served-name", default=None, help="model name clients use (default: --model)")


def run_from_args(a) -> None:
  try:
    import fastapi  # noqa: F401
    import uvicorn
  except ImportError as err:
    raise RuntimeError("kvjax serve needs FastAPI and uvicorn: pip install 'kvjax[serve]'") \
        from err
  for name in ("num_pages", "page_size", "max_slots", "max_seq_len", "prefill_chunk"):
    if getattr(a, name) < 1:
      raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(a, name)}")
  if not 0 < a.port < 65536:
    raise ValueError(f"--port must be in 1..65535, got {a.port}")
  import jax.numpy as jnp
  import kvjax.models
  model, tokenizer = kvjax.models.load(a.model, dtype=getattr(jnp, a.dtype))
  if tokenizer is None:
    raise ValueError(f"{a.model} has no tokenizer files; the server needs one")
  engine = build_engine(model, a.cache, num_pages=a.num_pages, page_size=a.page_size,
                        max_slots=a.max_slots, max_seq_len=a.max_seq_len,
                        prefill_chunk=a.prefill_chunk, tokenizer=tokenizer,
                        calibration=a.calibration)
  loop = EngineLoop(engine, max_waiting=a.max_waiting)
  name = a.served_name or str(a.model)
  app = create_app(loop, tokenizer, model_name=name)
  print(f"kvjax serve: {name} ({a.cache} cache, {engine.cache_bytes() / 2**20:.0f} MiB of "
        f"pages) on http://{a.host}:{a.port}/v1", flush=True)
  try:
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")
  finally:
    loop.close()
