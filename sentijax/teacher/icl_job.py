"""`config.job = "generate_icl"`: ICL prompts from the builder -> teacher answers (+ the
verbalizer distribution when the backend gives logprobs), an ICLDist teacher corpus.

Prompts are built exactly as ICLDist's gold records (`icl_recipe.gold_records`: task registry,
held-out tasks and SentiBench test sentences filtered, k shrunk to fit `data.seq_len` under the
teacher's tokenizer), sent raw (no chat template). Each record keeps `meta.task` (what
`icl.target=teacher|teacher_probs` select by), `meta.gold` (the gold answer) and
`meta.verbalizers` (the labels shown in the prompt, renamed ones included); its response is the
teacher's answer with the leading space of a SentiBench answer. With `generate.logprobs=N`,
classification records get `meta.teacher_probs = {verbalizer: p}`: the teacher's probability of
each verbalizer's first token at the first answer position (verbalizers absent from the top N get
none; a first token shared by several verbalizers counts once, for the first). Records with none
(extraction tasks; no verbalizer in the top N) train on CE only under icl.target=teacher_probs,
counted in its data_stats.json.

    python -m sentijax.main --config=configs/generate_icl.py
"""
from __future__ import annotations

import logging
import math

from sentijax.data import icl, icl_recipe
from sentijax.sampling import SamplingSettings
from sentijax.teacher import backend
from sentijax.teacher import generate as gen
from sentijax.teacher.common import Completion, record_key

log = logging.getLogger("sentijax")


def build_items(config, tokenizer, sampling: SamplingSettings
                ) -> tuple[list[gen.Item], dict]:
  """ICL prompts as generation items (train and val prompts of the source tasks)."""
  spec = icl_recipe.RecipeSpec.from_config(config)
  sources, _, groups = icl_recipe.resolve_tasks(spec)
  forbidden = icl.forbidden_sentences(groups)
  train, val, stats = icl_recipe.gold_records(spec, sources, forbidden,
                                              icl_recipe.length_fn(tokenizer),
                                              int(config.data.seq_len))
  labels = {t.name: t.labels for t in sources}
  settings = backend.answer_settings(config)  # part of every record id
  items = []
  for r in train + val:
    label_map = r.meta.get("label_map") or {}
    shown = [" " + label_map.get(label, label) for label in labels[r.meta["task"]]]
    meta = dict(r.meta) | {"source_id": r.id, "gold": r.response, "verbalizers": shown}
    items.append(gen.Item(record_key(r.prompt, sampling, settings), r.prompt, meta))
  unique = {i.id: i for i in items}  # the same prompt drawn twice is asked once
  return list(unique.values()), stats


def verbalizer_probs(tokenizer, next_logprobs=None):
  """postprocess: the answer with a leading space; meta.teacher_probs from the first answer
  position: the top-N logprobs of the completion, or the exact distribution `next_logprobs`
  when the backend has one (`next_token_distribution`: the local teacher)."""
  def fn(item: gen.Item, c: Completion, record: dict) -> None:
    record["response"] = " " + c.text.strip()
    record["meta"].pop("top_logprobs", None)  # kept small: only the verbalizer distribution
    if not item.meta["verbalizers"]:
      return
    if next_logprobs is not None:
      logp_V = next_logprobs(item.prompt)
      first = lambda i: float(logp_V[i])  # noqa: E731
    elif c.top_logprobs:
      first = c.top_logprobs[0].get
    else:
      return
    probs, used = {}, set()
    for v in item.meta["verbalizers"]:
      ids = tokenizer(v, add_special_tokens=False)["input_ids"]
      if ids and first(ids[0]) is not None and ids[0] not in used:
        used.add(ids[0])
        probs[v] = math.exp(first(ids[0]))
    if probs:
      record["meta"]["teacher_probs"] = probs
  return fn


def run(config) -> dict:
  workdir, sampling, checker = gen.start_job(config)
  teacher = backend.make(config)
  try:
    logprobs = int(config.generate.logprobs)
    exact = backend.NEXT_TOKEN_DISTRIBUTION in teacher.capabilities  # no per-token top-N needed
    if logprobs and not exact:
      backend.require(teacher, backend.TOKEN_LOGPROBS,
                      f"generate.logprobs={logprobs} (the verbalizer distribution)")
    if logprobs and teacher.tokenizer is None:
      raise ValueError("generate.logprobs needs the teacher's tokenizer: set teacher.tokenizer")
    items, stats = build_items(config, teacher.tokenizer, sampling)
    gc = config.generate
    summary = gen.generate(items, teacher, sampling, workdir, logprobs=0 if exact else logprobs,
                           settings=backend.answer_settings(config),
                           leak_checker=checker, progress=bool(gc.progress),
                           extra_summary={"icl": stats},
                           postprocess=verbalizer_probs(
                               teacher.tokenizer, teacher.next_logprobs if exact else None)
                           if teacher.tokenizer and logprobs else None)
  finally:
    teacher.close()
  return summary
