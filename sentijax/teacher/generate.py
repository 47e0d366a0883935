"""Teacher corpus jobs: prompts -> teacher completions -> KnowDist records, resumable.

    python -m sentijax.main --config=configs/generate_knowdist.py

Each record's id is a hash of its prompt, the sampling settings and everything else that changes
an answer (`backend.answer_settings`: backend, logprobs and the backend's own, e.g. model,
base_url, endpoint, system prompt; kept in `meta.settings`), so a restarted job skips what
`<workdir>/corpus.jsonl` already holds (append-only, one fsynced line per record via
`ResumableWriter`): nothing duplicated, nothing lost. A rerun with other settings in the same
workdir stops with the differing settings named (`corpus.SettingsMismatch`) instead of mixing two
teachers in one corpus. Items that fail after the backend's retries, or whose answer is blank, go
to `rejects.jsonl` with the error; a rerun tries them again. At the end `summary.json` gives
written/skipped/rejected counts, tokens, seconds, and the records whose response contains a
SentiBench test sentence (`leaks`). The teacher is any `backend.TeacherBackend`.

On N processes (`config.distributed`) the items not yet done are split between the processes,
each writes its own part and process 0 merges them into one corpus.jsonl (sentijax/teacher/
corpus.py); a killed process's part is picked up by the next run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sentijax import distributed
from sentijax.data import prompts as prompts_lib
from sentijax.data.writers import ResumableWriter, write_json_atomic
from sentijax.sampling import SamplingSettings
from sentijax.teacher import backend
from sentijax.teacher import corpus as corpus_lib
from sentijax.teacher import inputs as inputs_lib
from sentijax.teacher import leaks as leaks_lib
from sentijax.teacher.common import Completion, TeacherConfigError, record_key

log = logging.getLogger("sentijax")

_MAX_LISTED = 100


@dataclasses.dataclass(frozen=True)
class Item:
  """One prompt to send: its record id, prompt text and the meta its record carries."""
  id: str
  prompt: str
  meta: dict


def knowdist_items(texts: Sequence[inputs_lib.SourceText], perspectives: Sequence[str],
                   sampling: SamplingSettings, settings: dict | None = None) -> list[Item]:
  """Every text under every perspective (meta.source_id keeps a text's records together);
  ids from `record_key(prompt, sampling, settings)`."""
  items = []
  for t in texts:
    for p in perspectives:
      prompt = prompts_lib.knowdist_prompt(t.text, p)
      items.append(Item(record_key(prompt, sampling, settings), prompt,
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


def _record(item: Item, c: Completion, teacher: str, sampling: SamplingSettings,
            settings: dict | None) -> dict:
  meta = dict(item.meta) | {"teacher": teacher, "sampling": sampling.to_json(),
                            "finish_reason": c.finish_reason,
                            "completion_tokens": c.completion_tokens}
  if settings is not None:
    meta["settings"] = settings
  if c.top_logprobs is not None:
    meta["top_logprobs"] = [{str(k): v for k, v in top.items()} for top in c.top_logprobs]
  return {"id": item.id, "prompt": item.prompt, "response": c.text.strip(), "meta": meta}


class _NoWriter:
  """The writer of a process that answers with the others but does not write (collective)."""

  def write(self, record) -> bool:
    del record
    return True

  def close(self) -> None:
    pass

  def __enter__(self) -> "_NoWriter":
    return self

  def __exit__(self, *exc_info) -> None:
    pass


def _check_ids(items: Sequence[Item], sampling: SamplingSettings,
               settings: dict | None) -> None:
  ids = [i.id for i in items]
  if len(set(ids)) != len(ids):
    raise ValueError("two items share a record id (the same prompt twice?)")
  if settings is not None:
    bad = next((i for i in items if i.id != record_key(i.prompt, sampling, settings)), None)
    if bad is not None:
      raise ValueError(f"item {bad.id!r}: its id is not record_key(prompt, sampling, settings) "
                       "of this run; build the items with the same settings")


def _open(workdir: Path, items: Sequence[Item], sampling: SamplingSettings,
          settings: dict | None, collective: bool) -> tuple[Any, Any, list[Item], int]:
  """(writer, rejects file, the items this process answers, number already done). Every
  process opens (and repairs) its own file first, then all read what every file holds."""
  index, count = distributed.process_index_and_count()
  writes = not collective or index == 0
  records_path, rejects_path = corpus_lib.own_paths(workdir, index, 1 if collective else count)
  writer = ResumableWriter(records_path) if writes else _NoWriter()
  try:
    distributed.barrier("teacher: corpus files opened")
    done = corpus_lib.done_ids(workdir, sampling.to_json(), settings)
    pending = [i for i in items if i.id not in done]
    digest = hashlib.sha256("\n".join([i.id for i in items] + ["--"] + [i.id for i in pending])
                            .encode("utf-8")).hexdigest()
    distributed.check_same_on_all_processes(
        digest, "the teacher items and the records already written")
    # Opened (emptied) only now: a refused run leaves the last run's rejects as they were.
    rejects = open(  # pylint: disable=consider-using-with
        rejects_path if writes else os.devnull, "w", encoding="utf-8")
  except BaseException:
    writer.close()
    raise
  mine = pending if collective else pending[index::count]
  return writer, rejects, mine, len(items) - len(pending)


def generate(items: Sequence[Item], teacher: backend.TeacherBackend, sampling: SamplingSettings,
             workdir: str | os.PathLike, *, logprobs: int = 0, settings: dict | None = None,
             leak_checker: leaks_lib.LeakChecker | None = None,
             progress: bool = True, extra_summary: dict | None = None,
             postprocess: Callable[[Item, Completion, dict], None] | None = None) -> dict:
  """Writes the completions of `items` not yet in <workdir>/corpus.jsonl; returns the summary.

  `settings`: the answer settings the item ids were made with (`backend.answer_settings`; None: ids
  of prompt + sampling only); records keep them in meta.settings, and a corpus made with other
  settings is refused (corpus.SettingsMismatch). On several processes each answers its share of
  the items not yet done and process 0 merges the parts (module docstring).
  `postprocess(item, completion, record)` may edit a record (dict) before it is written.
  """
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  start = time.time()
  _check_ids(items, sampling, settings)
  if logprobs:
    backend.require(teacher, backend.TOKEN_LOGPROBS, f"generate.logprobs={logprobs}")
  collective = teacher.collective
  summary = {"teacher": teacher.name, "sampling": sampling.to_json(), "items": len(items),
             "written": 0, "skipped": 0, "rejected": 0, "completion_tokens": 0,
             "unmapped_logprob_tokens": 0, "finish_reasons": {}, "leaks": {"records": 0, "ids": []}}
  writer, rejects, pending, summary["skipped"] = _open(workdir, items, sampling, settings,
                                                       collective)
  with writer, rejects:
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
      record = _record(item, result, teacher.name, sampling, settings)
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
    summary["corpus_records"] = len(writer) if isinstance(writer, ResumableWriter) else 0
  return _finish(workdir, items, summary, start, collective, extra_summary)


def _finish(workdir: Path, items: Sequence[Item], summary: dict, start: float,
            collective: bool, extra_summary: dict | None) -> dict:
  """Process 0: the processes' parts merged into corpus.jsonl, summary.json written."""
  index, count = distributed.process_index_and_count()
  if count > 1 and not collective:
    corpus_lib.write_part_summary(workdir, index, summary)
  distributed.barrier("teacher: every process done")
  if index != 0:
    log.info("teacher process %d: %d written, %d rejected (process 0 writes the summary)",
             index, summary["written"], summary["rejected"])
    return summary
  if count > 1 and not collective:
    summary = corpus_lib.combine_summaries(workdir, count)
  if (workdir / corpus_lib.PARTS).is_dir():  # this run's parts, or those of a killed run
    summary["corpus_records"] = corpus_lib.merge(workdir, [i.id for i in items])
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
  stored in it). A corpus job whose workdir holds records made with other settings stops here,
  before any model is loaded or file written (corpus.SettingsMismatch).
  """
  workdir = Path(config.workdir)
  sampling = SamplingSettings.from_config(config.sampling) if "sampling" in config else None
  if sampling is not None and "teacher" in config:
    corpus_lib.done_ids(workdir, sampling.to_json(), backend.answer_settings(config))
  workdir.mkdir(parents=True, exist_ok=True)
  write_json_atomic(workdir / "generate_config.json", json.loads(config.to_json()))
  return workdir, sampling, leaks_lib.checker_from_config(config)


def run(config) -> dict:
  """`config.job = "generate_knowdist"`: user texts x perspectives -> teacher analyses."""
  workdir, sampling, checker = start_job(config)
  texts, input_stats = inputs_lib.load_texts(inputs_lib.InputSpec.from_config(config.inputs),
                                             checker)
  settings = backend.answer_settings(config)
  items = knowdist_items(texts, parse_perspectives(config.generate.perspectives), sampling,
                         settings)
  gc = config.generate
  teacher = backend.make(config)
  try:
    return generate(items, teacher, sampling, workdir, logprobs=int(gc.logprobs),
                    settings=settings, leak_checker=checker, progress=bool(gc.progress),
                    extra_summary={"inputs": input_stats})
  finally:
    teacher.close()
