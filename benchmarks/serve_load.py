"""Load test for `kvjax serve`: bounded concurrent streaming clients on localhost.

    python benchmarks/serve_load.py --start "--model gemma3-270m --cache int4" \\
        [--clients 16] [--requests 64] [--max-tokens 32] [--prompt-chars 400 2000]
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model gemma3-270m

Sends `--requests` completion requests (streamed, greedy) with prompts cut from the evaluation
book at random offsets and lengths, at most `--clients` in flight at once. Each stream must end
with a finish reason and `[DONE]`; a request answered 503 (queue full) is retried after its
Retry-After. Reports per request the time to first token and the total time, and overall the
completed / failed counts, generated tokens per second, and the server's /metrics before and
after (pages in use must return to where they started). Writes JSON and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import shlex
import statistics
import subprocess
import sys
import time


def _metrics(text: str) -> dict:
  out = {}
  for line in text.splitlines():
    if line and not line.startswith("#"):
      name, value = line.split()
      out[name.removeprefix("kvjax_")] = float(value)
  return out


async def _one(client, model, prompt, max_tokens, timeout):
  body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
          "stream": True}
  t0 = time.perf_counter()
  first = None
  pieces, reason, done, tokens = [], None, False, 0
  while True:
    async with client.stream("POST", "/v1/completions", json=body, timeout=timeout) as r:
      if r.status_code == 503:
        await asyncio.sleep(float(r.headers.get("retry-after", "1")))
        continue
      if r.status_code != 200:
        return dict(ok=False, status=r.status_code, error=(await r.aread()).decode()[:200])
      async for line in r.aiter_lines():
        if not line.startswith("data: "):
          continue
        if line == "data: [DONE]":
          done = True
          continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
          return dict(ok=False, status=200, error=chunk["error"]["message"])
        if first is None:
          first = time.perf_counter() - t0
        pieces.append(chunk["choices"][0]["text"])
        reason = chunk["choices"][0]["finish_reason"] or reason
        if chunk.get("usage"):
          tokens = chunk["usage"]["completion_tokens"]
      break
  ok = done and reason in ("stop", "length")
  return dict(ok=ok, status=200, ttft=first, total=time.perf_counter() - t0, tokens=tokens,
              reason=reason, text="".join(pieces))


async def run(url, model, prompts, *, clients, max_tokens, timeout):
  import httpx
  limits = httpx.Limits(max_connections=clients)
  async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
    before = _metrics((await client.get("/metrics")).text)
    gate = asyncio.Semaphore(clients)
    finished = 0

    async def bounded(p):
      nonlocal finished
      async with gate:
        result = await _one(client, model, p, max_tokens, timeout)
      finished += 1
      print(f"\r{finished}/{len(prompts)} requests", end="", file=sys.stderr, flush=True)
      return result

    t0 = time.perf_counter()
    results = await asyncio.gather(*(bounded(p) for p in prompts))
    wall = time.perf_counter() - t0
    print(file=sys.stderr)
    await asyncio.sleep(0.5)
    after = _metrics((await client.get("/metrics")).text)
  return results, wall, before, after


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--url", default="http://127.0.0.1:8000")
  p.add_argument("--model", default=None, help="served model name (default: the server's)")
  p.add_argument("--start", default=None, metavar="ARGS",
                 help="start `kvjax serve ARGS` first (and stop it at the end)")
  p.add_argument("--clients", type=int, default=16)
  p.add_argument("--requests", type=int, default=64)
  p.add_argument("--max-tokens", type=int, default=32)
  p.add_argument("--prompt-chars", type=int, nargs=2, default=[400, 2000])
  p.add_argument("--timeout", type=float, default=600.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="results/serve_load.json")
  a = p.parse_args(argv)
  if a.clients < 1 or a.requests < 1 or a.max_tokens < 1:
    raise SystemExit("--clients, --requests and --max-tokens must be positive")
  lo, hi = a.prompt_chars
  if not 1 <= lo <= hi:
    raise SystemExit("--prompt-chars needs 1 <= MIN <= MAX")
  import httpx
  import numpy as np
  from kvjax import corpus

  server = None
  if a.start:
    port = a.url.rsplit(":", 1)[-1].strip("/")
    server = subprocess.Popen([sys.executable, "-m", "kvjax", "serve", "--port", port,
                               *shlex.split(a.start)])
  try:
    deadline = time.time() + 1800
    while True:
      try:
        if httpx.get(a.url + "/health", timeout=5).status_code == 200:
          break
      except httpx.HTTPError:
        pass
      if server is not None and server.poll() is not None:
        raise SystemExit(f"kvjax serve exited with {server.returncode}")
      if time.time() > deadline:
        raise SystemExit(f"no server answered at {a.url}")
      time.sleep(2)
    model = a.model or httpx.get(a.url + "/v1/models").json()["data"][0]["id"]
    text = corpus.eval_text()
    rng = np.random.default_rng(a.seed)
    prompts = []
    for _ in range(a.requests):
      n = int(rng.integers(lo, hi + 1))
      start = int(rng.integers(0, len(text) - n))
      prompts.append(text[start:start + n])
    results, wall, before, after = asyncio.run(run(a.url, model, prompts, clients=a.clients,
                                                   max_tokens=a.max_tokens,
                                                   timeout=a.timeout))
  finally:
    if server is not None:
      server.terminate()
      server.wait(30)

  good = [r for r in results if r["ok"]]
  ttft = [r["ttft"] for r in good if r["ttft"] is not None]
  total = [r["total"] for r in good]
  q = lambda xs, f: statistics.quantiles(xs, n=20)[f] if len(xs) >= 2 else (xs[0] if xs else 0)
  summary = dict(
      url=a.url, model=model, clients=a.clients, requests=a.requests, max_tokens=a.max_tokens,
      completed=len(good), failed=len(results) - len(good),
      failures=[{k: r.get(k) for k in ("status", "error")} for r in results if not r["ok"]][:10],
      wall_s=wall, tokens=sum(r["tokens"] for r in good),
      tokens_per_s=sum(r["tokens"] for r in good) / wall,
      ttft_s=dict(median=statistics.median(ttft) if ttft else 0.0, p95=q(ttft, 18)),
      latency_s=dict(median=statistics.median(total) if total else 0.0, p95=q(total, 18)),
      pages_in_use_before=before.get("pages_in_use", -1),
      pages_in_use_after=after.get("pages_in_use", -1),
      metrics_after=after)
  print(f"| requests | clients | completed | failed | tokens/s | TTFT median / p95 (s) | "
        f"latency median / p95 (s) | pages in use before / after |\n|---|---|---|---|---|---|---|---|\n"
        f"| {a.requests} | {a.clients} | {summary['completed']} | {summary['failed']} | "
        f"{summary['tokens_per_s']:.1f} | {summary['ttft_s']['median']:.2f} / "
        f"{summary['ttft_s']['p95']:.2f} | {summary['latency_s']['median']:.2f} / "
        f"{summary['latency_s']['p95']:.2f} | {summary['pages_in_use_before']:.0f} / "
        f"{summary['pages_in_use_after']:.0f} |")
  out = pathlib.Path(a.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(summary, indent=1))
  return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
  sys.exit(main())
