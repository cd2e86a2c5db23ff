"""Passkey retrieval: does a quantized cache answer like the bf16 cache?

A five-digit passkey is hidden at a given depth inside filler text (Pride and
Prejudice) of a given length; the prompt ends by asking for it. Each cache runs
the same prompt (chunked prefill, then greedy decode) and the answer of every
quantized cache is compared with the bf16 cache's: "agreement" means the
number each answer gives (its first run of digits) is the same; whether the
whole greedy continuation is identical is reported too. What matters is
agreement with bf16, not the small model's own accuracy (which is also shown).
"""

from __future__ import annotations

import dataclasses
import pathlib
import random
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import eval as ev
from kvjax.models.runner import Runner

_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
_QUESTION = "\n\nWhat is the pass key? The pass key is"


def build_prompt(tokenizer, filler: str, *, length: int, depth: float, key: str, add_bos: bool):
  """Token ids of a ~`length`-token prompt with the needle at fraction `depth` of the filler."""
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"depth must be in [0, 1], got {depth}")
  needle = tokenizer.encode(_NEEDLE.format(key=key), add_bos=False)
  question = tokenizer.encode(_QUESTION, add_bos=False)
  bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
  budget = length - len(needle) - len(question) - len(bos)
  if budget < 16:
    raise ValueError(f"length {length} is too short for the passkey prompt")
  fill = tokenizer.encode(filler, add_bos=False)
  if len(fill) < budget:
    raise ValueError(f"the filler text has {len(fill)} tokens, fewer than the {budget} needed")
  fill = fill[:budget]
  at = int(round(depth * budget))
  return bos + fill[:at] + needle + fill[at:] + question


def retrieved_number(text: str) -> str | None:
  """The first run of digits in an answer (the passkey it gives), or None."""
  m = re.search(r"\d+", text)
  return m.group(0) if m else None


def first_token_margin(logits) -> float:
  """log p(top-1) - log p(top-2) of one row of logits [V]: how close the greedy choice was."""
  top2 = jax.lax.top_k(jnp.asarray(logits, jnp.float32), 2)[0]
  return float(top2[0] - top2[1])


def greedy_answer(runner, tokens: Sequence[int], spec, *, calibrations, new_tokens: int = 8,
                  chunk: int = 512) -> tuple[list[int], float]:
  """Greedy continuation of `tokens` through the cache described by `spec`, and the first
  token's margin (`first_token_margin`)."""
  model = runner.model
  caches = ev._make_caches(model, spec, len(tokens) + new_tokens + 1, calibrations)
  logits, caches = ev.prefill(runner, tokens, caches, chunk=chunk)
  margin = first_token_margin(logits[0])
  out = [int(jnp.argmax(logits[0]))]
  for _ in range(new_tokens - 1):
    logits, caches = runner(np.asarray([[out[-1]]], np.int32), caches)
    out.append(int(jnp.argmax(logits[0, 0])))
  return out, margin


def run(model_name: str = "gemma3-270m", *, lengths=(2048, 4096), depths=(0.1, 0.5, 0.9),
        specs=None, seed: int = 0, new_tokens: int = 8, out_dir: str = "results/passkey",
        calibration: str | None = None, log=print) -> dict:
  """Passkey prompts of each length and depth, answered greedily through every cache. The
  calibrated caches are made once (the int4 one from `calibration`, an artifact directory, or
  the model's own) and serve every length."""
  from kvjax import corpus
  from kvjax.models import load

  ev.check_out_dir(out_dir)
  ev.check_positive_ints(list(lengths), "--lengths", minimum=16)
  depths = list(depths)
  if not depths or any(not 0.0 <= float(d) <= 1.0 for d in depths):
    raise ValueError(f"--depths must be fractions in [0, 1], got {depths}")
  if calibration is not None:
    from kvjax import calibration as artifact
    artifact.read_manifest(calibration)
  specs = list(specs or [ev.SPEC_CHOICES["bf16"], ev.SPEC_CHOICES["int4-naive"],
                         ev.SPEC_CHOICES["int4"]])
  if specs[0].quant is not None:
    specs.insert(0, ev.SPEC_CHOICES["bf16"])
  if any(s.key8_auto for s in specs):
    raise ValueError("kvjax passkey needs explicit layers for 8-bit keys (e.g. int4+k8@2,3,4,10); "
                     "'+k8@auto' layers are chosen by kvjax eval, which prints them")
  if calibration is not None:
    specs = [dataclasses.replace(s, calibration=str(calibration)) if s.name == "int4" else s
             for s in specs]
  model, tok = load(model_name)
  specs = [s.resolve_layers(model.config) for s in specs]
  model = ev.with_layers_for(model, specs)
  runner = Runner(model, attention_impl="xla")
  cal_ids = (tok.encode(corpus.calibration_text(), add_bos=model.config.add_bos)
             if any(s.calibrate and s.calibration is None for s in specs) else None)
  calibrations = ev.calibrations_for(model, specs, tokenizer=tok, ids=cal_ids, progress=False,
                                     log=log)
  filler = corpus.eval_text()
  rng = random.Random(seed)
  rows = []
  for length in lengths:
    for depth in depths:
      key = f"{rng.randrange(10000, 99999)}"
      prompt = build_prompt(tok, filler, length=length, depth=depth, key=key,
                            add_bos=model.config.add_bos)
      answers, margins = {}, {}
      for s in specs:
        ids, margins[s.name] = greedy_answer(runner, prompt, s, calibrations=calibrations,
                                             new_tokens=new_tokens)
        answers[s.name] = tok.decode(ids)
      ref = answers[specs[0].name]
      for s in specs:
        text = answers[s.name]
        row = {"model": model_name, "length": length, "depth": depth, "key": key,
               "cache": s.name, "answer": text, "retrieved": retrieved_number(text),
               "agrees_with_bf16": retrieved_number(text) == retrieved_number(ref),
               "same_text_as_bf16": text == ref,
               "contains_key": bool(re.search(re.escape(key), text)),
               "first_token_margin": margins[s.name]}
        rows.append(row)
        log(f"{length:>6} depth {depth:4.2f} {s.name:<11} agree={row['agrees_with_bf16']!s:<5} "
            f"same text={row['same_text_as_bf16']!s:<5} correct={row['contains_key']!s:<5} "
            f"margin {margins[s.name]:5.2f}  {text!r}")
  summary = {}
  for s in specs:
    rs = [r for r in rows if r["cache"] == s.name]
    summary[s.name] = {"agreement_with_bf16": float(np.mean([r["agrees_with_bf16"] for r in rs])),
                       "same_text_as_bf16": float(np.mean([r["same_text_as_bf16"] for r in rs])),
                       "accuracy": float(np.mean([r["contains_key"] for r in rs]))}
    log(f"{s.name:<11} answer agreement with bf16 {summary[s.name]['agreement_with_bf16']:.2f}  "
        f"identical {new_tokens}-token continuation "
        f"{summary[s.name]['same_text_as_bf16']:.2f}  passkey accuracy "
        f"{summary[s.name]['accuracy']:.2f}")
  doc = {"meta": {"model": model_name, "lengths": list(lengths), "depths": list(depths),
                  "new_tokens": new_tokens,
                  "agreement": "the first number of each answer equals the bf16 cache's",
                  "first_token_margin": "logit of the first answer token minus the runner-up's "
                                        "(a log-probability gap; small = a near tie)"},
         "summary": summary, "rows": rows}
  out = pathlib.Path(out_dir)
  ev.write_results(out / "passkey.json", doc, log=log)
  log(f"wrote {out / 'passkey.json'}")
  return doc
