"""Teacher corpus jobs: prompts -> teacher completions -> KnowDist records, resumable.

    python -m sentijax.main --config=configs/generate_knowdist.py

Each record's id is a hash of its prompt and the sampling settings (`common.record_key`), so a
restarted job skips what `<workdir>/corpus.jsonl` already holds (append-only, one fsynced line
per record via `ResumableWriter`): nothing duplicated, nothing lost. Items that fail after the
backend's retries, or whose answer is blank, go to `rejects.jsonl` with the error; a rerun tries
them again. At the end `summary.json` gives written/skipped/rejected counts, tokens, seconds, and
the records whose response contains a SentiBench test sentence (`leaks`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sentijax.data import prompts as prompts_lib
from sentijax.data.writers import ResumableWriter, write_json_atomic
from sentijax.teacher import inputs as inputs_lib
from sentijax.teacher import leaks as leaks_lib
from sentijax.teacher.common import Completion, Sampling, TeacherConfigError, record_key

log = logging.getLogger("sentijax")

_MAX_LISTED = 100


@dataclasses.dataclass(frozen=True)
class Item:
  """One prompt to send: its record id, prompt text and the meta its record carries."""
  id: str
  prompt: str
  meta: dict


def knowdist_items(texts: Sequence[inputs_lib.SourceText], perspectives: Sequence[str],
                   sampling: Sampling) -> list[Item]:
  """Every text under every perspective (meta.source_id keeps a text's records together)."""
  items = []
  for t in texts:
    for p in perspectives:
      prompt = prompts_lib.knowdist_prompt(t.text, p)
      items.append(Item(record_key(prompt, sampling), prompt,
                        {"source_id": t.id, "perspective": p, "task": "knowdist"}))
  return items


def parse_perspectives(value: str) -> list[str]:
  names = (list(prompts_lib.PERSPECTIVES) if value.strip() == "all"
           else [v.strip() for v in value.split(",") if v.strip()])
  unknown = [n for n in names if n not in prompts_lib.template_names()]
  if unknown or not names:
    raise ValueError(f"generate.perspectives: unknown {unknown}; choose from "
                     f"{list(prompts_lib.template_names())} or 'all'")
  return names


def make_teacher(config) -> Any:
  """The backend named by `config.teacher.backend` (local | openai)."""
  tc = config.teacher
  if tc.backend == "local":
    from sentijax import serve  # pylint: disable=import-outside-toplevel
    return serve.load_teacher(config)
  if tc.backend == "openai":
    from sentijax.teacher.openai_api import OpenAITeacher  # pylint: disable=import-outside-toplevel
    tokenizer = None
    if tc.tokenizer:
      from sentijax.data import tokenizer as tok_lib  # pylint: disable=import-outside-toplevel
      tokenizer = tok_lib.load_tokenizer(tc.tokenizer)
    return OpenAITeacher(tc.base_url, tc.model, endpoint=tc.endpoint, api_key_env=tc.api_key_env,
                         concurrency=tc.concurrency, timeout_s=tc.timeout_s,
                         max_retries=tc.max_retries, backoff_s=tc.backoff_s,
                         max_backoff_s=tc.max_backoff_s, tokenizer=tokenizer,
                         system_prompt=tc.system_prompt,
                         max_retry_after_s=float(tc.max_retry_after_s))
  raise ValueError(f"teacher.backend must be 'local' or 'openai', got {tc.backend!r}")


def _record(item: Item, c: Completion, teacher: str, sampling: Sampling) -> dict:
  meta = dict(item.meta) | {"teacher": teacher, "sampling": sampling.to_json(),
                            "finish_reason": c.finish_reason,
                            "completion_tokens": c.completion_tokens}
  if c.top_logprobs is not None:
    meta["top_logprobs"] = [{str(k): v for k, v in top.items()} for top in c.top_logprobs]
  return {"id": item.id, "prompt": item.prompt, "response": c.text.strip(), "meta": meta}


def generate(items: Sequence[Item], teacher: Any, sampling: Sampling, workdir: str | os.PathLike,
             *, logprobs: int = 0, leak_checker: leaks_lib.LeakChecker | None = None,
             progress: bool = True, extra_summary: dict | None = None,
             postprocess: Callable[[Item, Completion, dict], None] | None = None) -> dict:
  """Writes the completions of `items` not yet in <workdir>/corpus.jsonl; returns the summary.

  `postprocess(item, completion, record)` may edit a record (dict) before it is written.
  """
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  start = time.time()
  ids = [i.id for i in items]
  if len(set(ids)) != len(ids):
    raise ValueError("two items share a record id (the same prompt twice?)")
  summary = {"teacher": teacher.name, "sampling": sampling.to_json(), "items": len(items),
             "written": 0, "skipped": 0, "rejected": 0, "completion_tokens": 0,
             "unmapped_logprob_tokens": 0, "finish_reasons": {}, "leaks": {"records": 0, "ids": []}}
  with ResumableWriter(workdir / "corpus.jsonl") as writer, \
       open(workdir / "rejects.jsonl", "w", encoding="utf-8") as rejects:
    pending = list(writer.pending(items))
    summary["skipped"] = len(items) - len(pending)
    bar = tqdm(total=len(pending), unit="rec", desc="teacher", disable=not progress)
    for item, result in teacher.stream(pending, sampling, logprobs):
      bar.update(1)
      if isinstance(result, TeacherConfigError):
        bar.close()
        raise TeacherConfigError(f"{result}; stopped after {summary['written']} new records "
                                 "(the corpus so far is kept; fix the setting and rerun)")
      if isinstance(result, Completion) and not result.text.strip():
        result = ValueError(f"blank response (finish_reason={result.finish_reason})")
      if isinstance(result, Exception):
        rejects.write(json.dumps({"id": item.id, "prompt": item.prompt, "meta": item.meta,
                                  "error": f"{type(result).__name__}: {result}"}) + "\n")
        rejects.flush()
        os.fsync(rejects.fileno())
        summary["rejected"] += 1
        continue
      record = _record(item, result, teacher.name, sampling)
      if postprocess is not None:
        postprocess(item, result, record)
      if writer.write(record):
        summary["written"] += 1
        summary["completion_tokens"] += result.completion_tokens
        summary["unmapped_logprob_tokens"] += result.unmapped
        reasons = summary["finish_reasons"]
        reasons[result.finish_reason] = reasons.get(result.finish_reason, 0) + 1
        hits = leak_checker.hits(record["response"]) if leak_checker else []
        if hits:
          summary["leaks"]["records"] += 1
          if len(summary["leaks"]["ids"]) < _MAX_LISTED:
            summary["leaks"]["ids"].append({"id": item.id, "sentences": hits[:5]})
    bar.close()
    summary["corpus_records"] = len(writer)
  summary["seconds"] = round(time.time() - start, 3)
  if summary["leaks"]["records"]:
    log.warning("%d generated records contain SentiBench test sentences (summary.json: leaks)",
                summary["leaks"]["records"])
  if summary["unmapped_logprob_tokens"]:
    log.warning("%d logprob token strings were not single tokens of the tokenizer (dropped)",
                summary["unmapped_logprob_tokens"])
  summary |= extra_summary or {}
  write_json_atomic(workdir / "summary.json", summary)
  log.info("teacher: %d written, %d already there, %d rejected, %d tokens in %.1f s",
           summary["written"], summary["skipped"], summary["rejected"],
           summary["completion_tokens"], summary["seconds"])
  return summary


def start_job(config):
  """Shared start of the teacher jobs: (workdir, sampling or None when the config has no
  `sampling` section, leak checker or None).

  Creates the workdir and records the config (the API key is read from the environment, never
  stored in it).
  """
  workdir = Path(config.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  write_json_atomic(workdir / "generate_config.json", json.loads(config.to_json()))
  return workdir, Sampling.from_config(config.sampling) if "sampling" in config else None, (
      leaks_lib.checker_from_config(config))


def run(config) -> dict:
  """`config.job = "generate_knowdist"`: user texts x perspectives -> teacher analyses."""
  workdir, sampling, checker = start_job(config)
  texts, input_stats = inputs_lib.load_texts(inputs_lib.InputSpec.from_config(config.inputs),
                                             checker)
  items = knowdist_items(texts, parse_perspectives(config.generate.perspectives), sampling)
  gc = config.generate
  teacher = make_teacher(config)
  try:
    return generate(items, teacher, sampling, workdir, logprobs=int(gc.logprobs),
                    leak_checker=checker, progress=bool(gc.progress),
                    extra_summary={"inputs": input_stats})
  finally:
    teacher.close()
