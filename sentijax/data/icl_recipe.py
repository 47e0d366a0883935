"""The ICL data recipe: task registry -> held-out filter (tasks and sentences) -> records.

Shared by ICLDist training (train/icldist.py: `gold` records, or a teacher corpus for `teacher` /
`teacher_probs`) and the teacher job that writes that corpus (teacher/icl_job.py: the same gold
prompts, sent to a teacher), so both build the same prompts. `config.icl` is read once into
`RecipeSpec`.

    spec = icl_recipe.RecipeSpec.from_config(config)
    sources, heldout, groups = icl_recipe.resolve_tasks(spec)
    train, val, stats = icl_recipe.gold_records(spec, sources, icl.forbidden_sentences(groups),
                                                icl_recipe.length_fn(tokenizer), seq_len)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from sentijax import atomic
from sentijax.data import icl, identity, readers, records, sentibench, sequences, tasks

log = logging.getLogger("sentijax")
TARGETS = ("gold", "teacher", "teacher_probs", "on_policy")
LEAK_CHECK = ("on", "off")
DEMO_TASKS = Path(__file__).resolve().parent.parent / "assets" / "icl_demo"


@dataclasses.dataclass(frozen=True)
class RecipeSpec:
  """The data side of `config.icl` (and the eval key it needs), read and checked once; the
  loss side (icl.alpha / temperature / tail) is train/icldist.py's."""
  task_dirs: tuple[str, ...]
  tasks: str
  heldout: tuple[str, ...]
  options: icl.Options
  num_prompts: int
  val_prompts: int
  val_fraction: float
  target: str
  teacher_corpus: str
  soft_width: int
  drop_leaks: bool
  mix_corpus: str
  mix_fraction: float
  sentibench_dir: str
  leak_check: str
  student_shots: int = 0  # on_policy: the student's demos (the teacher's first ones)

  @classmethod
  def from_config(cls, config) -> "RecipeSpec":
    c = config.icl
    heldout = tasks.parse_names(c.heldout or config.eval.during_training)
    spec = cls(
        task_dirs=tuple(tasks.parse_names(c.task_dirs)) or (str(DEMO_TASKS),),
        tasks=str(c.tasks), heldout=tuple(heldout),
        options=icl.Options(shots=icl.parse_shots(c.shots), rename_prob=float(c.rename_prob),
                            shuffle_labels=bool(c.shuffle_labels), paraphrase=bool(c.paraphrase),
                            balance=bool(c.balance), seed=int(config.seed) + int(c.seed)),
        num_prompts=int(c.num_prompts), val_prompts=int(c.val_prompts),
        val_fraction=float(c.val_fraction), target=str(c.target),
        teacher_corpus=str(c.teacher_corpus),
        soft_width=int(c.soft_width), drop_leaks=bool(c.drop_leaks),
        mix_corpus=str(c.mix_corpus), mix_fraction=float(c.mix_fraction),
        sentibench_dir=str(config.eval.data_dir), leak_check=str(c.leak_check),
        student_shots=int(c.student_shots))
    lo = spec.options.shots[0]
    checks = (("target", spec.target in TARGETS, f"expected one of {TARGETS}"),
              ("leak_check", spec.leak_check in LEAK_CHECK, f"expected one of {LEAK_CHECK}"),
              ("num_prompts", spec.num_prompts > 0, "must be > 0"),
              ("val_prompts", spec.val_prompts >= 0, "must be >= 0"),
              ("val_fraction", 0 <= spec.val_fraction < 1, "must be in [0, 1)"),
              ("soft_width", spec.soft_width > 0, "must be > 0"),
              ("mix_fraction", spec.mix_fraction >= 0, "must be >= 0"),
              ("teacher_corpus", spec.target in ("gold", "on_policy") or spec.teacher_corpus,
               f"required for icl.target={spec.target!r}"),
              ("student_shots", spec.target != "on_policy" or 0 <= spec.student_shots <= lo,
               f"the student's demos must be in 0..{lo} (the fewest of icl.shots={c.shots!r}: "
               f"the teacher's k-shot prompt, of which the student sees the first "
               f"student_shots demos), e.g. --config.icl.student_shots=0"))
    for key, ok, why in checks:
      if not ok:
        raise ValueError(f"icl.{key}={getattr(spec, key)!r}: {why}")
    return spec


# --------------------------------------------------------------------------- tasks


def _sentibench(spec: RecipeSpec, templates) -> tasks.Registry:
  """SentiBench's tasks (`eval.data_dir`). Its test sentences are kept out of training, so with
  `icl.leak_check=on` a missing or empty directory stops the job."""
  where = f"eval.data_dir={spec.sentibench_dir!r} ({os.path.abspath(spec.sentibench_dir)})"
  sb = (tasks.discover(spec.sentibench_dir, templates) if os.path.isdir(spec.sentibench_dir)
        else tasks.Registry({}))
  if spec.leak_check == "off":
    log.warning("icl.leak_check=off: SentiBench test sentences are NOT kept out of training "
                "(%s%s); only the held-out tasks' own sentences are", where,
                "" if sb.tasks else ", not found")
    return sb
  if not any(t.sentibench and "test" in t.splits for t in sb.tasks.values()):
    why = "holds no SentiBench dataset" if os.path.isdir(spec.sentibench_dir) else "not found"
    raise FileNotFoundError(
        f"{where}: {why}. ICLDist keeps every SentiBench test sentence out of training "
        "(icl.leak_check=on) and cannot check that without it: set --config.eval.data_dir to "
        "the SentiBench directory (e.g. ../shared/sentibench), or --config.icl.leak_check=off "
        "to train without this check (held-out SentiBench tasks are then not scored)")
  return sb


def resolve_tasks(spec: RecipeSpec) -> tuple[list[tasks.TaskSpec], list[tasks.TaskSpec],
                                          dict[str, list[str]]]:
  """(source tasks, held-out tasks, forbidden sentences {task: sentences}).

  `icl.heldout` entries are task names or families ('atsa/*' a glob on names, 'layout:atsa'
  every task of that layout), matched in `task_dirs` and SentiBench (`eval.data_dir`); every
  match leaves the sources and is scored. Forbidden: every split of every held-out task and,
  with `icl.leak_check=on`, the test split of every SentiBench dataset.
  """
  templates = sentibench.load_templates(None)
  registry = tasks.discover(spec.task_dirs, templates)
  selected = registry.select(spec.tasks)  # unknown names fail first
  sb = _sentibench(spec, templates)
  known = {**sb.tasks, **registry.tasks}  # a task_dirs task wins a name clash
  held: dict[str, tasks.TaskSpec] = {}
  for entry in spec.heldout:
    names = tasks.match(entry, known)
    if not names and entry in sentibench.LAYOUT and not sb.tasks:
      log.info("held-out task %s not scored: eval.data_dir=%s does not exist", entry,
               spec.sentibench_dir)
    elif not names:
      what = (f"icl.heldout entry {entry!r} matches no task" if tasks.is_family(entry)
              else f"unknown task {entry!r} in icl.heldout")
      raise tasks.TaskError(f"{what}; registered: {', '.join(sorted(known))}")
    elif tasks.is_family(entry):
      log.info("icl.heldout %s: %s", entry, ", ".join(names))
    held.update((n, known[n]) for n in names if n not in held)
  sources = [t for t in selected if t.name not in held]
  if not sources:
    raise ValueError(f"no source tasks left: icl.tasks={spec.tasks!r} minus icl.heldout="
                     f"{','.join(spec.heldout)!r} (registered: {', '.join(registry.names())})")
  groups: dict[str, list[str]] = {}
  for t in held.values():
    groups[t.name] = [ex.sentence for split in t.splits for ex in tasks.load_examples(t, split)]
  if spec.leak_check == "on":
    for t in sb.tasks.values():
      if t.name not in held and "test" in t.splits:
        groups[t.name] = [ex.sentence for ex in tasks.load_examples(t, "test")]
  return sources, list(held.values()), groups


# --------------------------------------------------------------------------- records


def gold_records(spec: RecipeSpec, sources: list[tasks.TaskSpec], forbidden: identity.SentenceIndex,
                 length: icl.LengthFn, seq_len: int
                 ) -> tuple[list[records.Record], list[records.Record], dict]:
  """ICL prompts with gold answers: (train, val, stats); `length` counts the tokens of a
  (prompt, answer) sequence (`sequences.sequence_length_fn`): prompts shrink to fit `seq_len`."""
  train, val, stats = gold_prompts(spec, sources, forbidden, length, seq_len)
  return icl.to_records(train, "icl"), icl.to_records(val, "icl-val"), stats


def student_records(spec: RecipeSpec, prompts: list[icl.Prompt], forbidden: identity.SentenceIndex,
                    prefix: str) -> list[records.Record]:
  """Per prompt, the student's record of context distillation (icl.target=on_policy): the same
  instruction, label map and query with its first `icl.student_shots` demos, the gold answer;
  held-out checked like every prompt."""
  join = sentibench.load_templates(None)["prompt_format"]["join"]
  out = []
  for i, p in enumerate(prompts):
    text, sentences = icl.fewer_shots(p, spec.student_shots, join)
    icl.check_no_leaks([(p.task, text, sentences)], forbidden)
    meta = p.meta() | {"k": min(spec.student_shots, p.k), "teacher_k": p.k}
    out.append(records.Record(id=f"{prefix}-{i}", prompt=text, response=p.answer, meta=meta))
  return out


def gold_prompts(spec: RecipeSpec, sources: list[tasks.TaskSpec], forbidden: identity.SentenceIndex,
                 length: icl.LengthFn, seq_len: int
                 ) -> tuple[list[icl.Prompt], list[icl.Prompt], dict]:
  """The prompts of `gold_records`, leak-checked: (train, val, stats)."""
  train_srcs, val_srcs = [], []
  stats = {"source_examples": {}, "dropped_leaks": {}, "found_in": {}}
  for t in sources:
    full = tasks.load_examples(t, "train")
    pool, found = icl.drop_forbidden(full, forbidden)
    dropped = len(full) - len(pool)
    stats["source_examples"][t.name] = len(full)
    if dropped:
      stats["dropped_leaks"][t.name] = dropped
      stats["found_in"][t.name] = found
      if not spec.drop_leaks:
        icl.check_no_leaks([(t.name, ex.sentence, (ex.sentence,)) for ex in full], forbidden)
    if len(pool) < 2:  # e.g. acsa_rest16 when atsa_rest16 (the same sentences) is held out
      log.info("source task %s skipped: %d of its train sentences are held-out/test sentences",
               t.name, dropped)
      stats.setdefault("skipped_tasks", []).append(t.name)
      continue
    is_val = icl.val_split(pool, spec.val_fraction, t.name)
    train_pool = [ex for ex, v in zip(pool, is_val) if not v]
    val_pool = [ex for ex, v in zip(pool, is_val) if v]
    train_srcs.append((t, train_pool, range(len(train_pool))))
    if val_pool:
      val_srcs.append((t, train_pool + val_pool,
                       range(len(train_pool), len(train_pool) + len(val_pool))))
  if not train_srcs:
    raise ValueError("every source task lost its train sentences to the held-out filter "
                     f"({stats['dropped_leaks']})")
  fmt = sentibench.load_templates(None)["prompt_format"]
  train, stats["train"] = icl.build_prompts(train_srcs, spec.num_prompts, spec.options, length,
                                            seq_len + 1, fmt)
  val: list[icl.Prompt] = []
  if spec.val_prompts and val_srcs:
    val_opts = dataclasses.replace(spec.options, seed=spec.options.seed + 1)
    val, stats["val"] = icl.build_prompts(val_srcs, spec.val_prompts, val_opts, length,
                                          seq_len + 1, fmt)
  icl.check_no_leaks([(p.task, p.text, p.sentences) for p in train + val], forbidden)
  stats["prompts_checked"] = len(train) + len(val)
  return train, val, stats


def teacher_records(spec: RecipeSpec, sources: list[tasks.TaskSpec], heldout: list[tasks.TaskSpec],
                    forbidden: identity.SentenceIndex
                    ) -> tuple[list[records.Record], list[records.Record], dict]:
  """Records of `icl.teacher_corpus` for the source tasks: (train, val, stats)."""
  recs, read_stats = readers.read_corpus(spec.teacher_corpus)
  names = {t.name for t in sources}
  held = {t.name for t in heldout} | set(spec.heldout)
  kept, stats = [], {"corpus": read_stats.to_dict(), "heldout": 0, "not_source": 0,
                     "source_examples": {}, "dropped_leaks": {}, "found_in": {}}
  for r in recs:
    task = r.meta.get("task")
    if not isinstance(task, str) or not task:
      raise ValueError(f"{spec.teacher_corpus}: record {r.id!r}: meta.task (the task name) is "
                       "missing")
    if task in held:
      stats["heldout"] += 1
      continue
    if task not in names:
      stats["not_source"] += 1
      continue
    stats["source_examples"][task] = stats["source_examples"].get(task, 0) + 1
    # Prompt of any layout (its SentiBench-layout sentences when it has them) and response.
    text = f"{r.prompt}\n\n{r.response}"
    candidates = ((icl.prompt_sentences(r.prompt) or identity.candidate_sentences(r.prompt))
                  + identity.candidate_sentences(r.response))
    keys = forbidden.find(text, candidates)
    if keys and spec.drop_leaks:
      stats["dropped_leaks"][task] = stats["dropped_leaks"].get(task, 0) + 1
      found = stats["found_in"].setdefault(task, {})
      for group in dict.fromkeys(g for k in keys for g in forbidden.groups_of[k]):
        found[group] = found.get(group, 0) + 1
      continue
    icl.check_no_leaks([(task, text, candidates)], forbidden)
    kept.append(r)
  if not kept:
    raise ValueError(f"{spec.teacher_corpus}: no records of the source tasks {sorted(names)} "
                     f"({stats})")
  if spec.target == "teacher_probs":
    stats |= _count_distributions(kept, spec)
  train, val = records.split_train_val(kept, spec.val_fraction)
  return train, val, stats


def teacher_probs(record: records.Record, spec: RecipeSpec) -> dict[str, float] | None:
  """meta.teacher_probs checked, or None when the record has none (CE only)."""
  probs = record.meta.get("teacher_probs")
  if probs is None:  # an extraction task, or no verbalizer in the server's top-N logprobs
    return None
  where = f"{spec.teacher_corpus}: record {record.id!r}: meta.teacher_probs"
  if not isinstance(probs, dict) or not probs:
    raise ValueError(f"{where} must be a non-empty object {{verbalizer: probability}} (or "
                     "absent: the record then trains on CE only)")
  if len(probs) > spec.soft_width:
    raise ValueError(f"{where} has {len(probs)} verbalizers; icl.soft_width={spec.soft_width}")
  if not all(isinstance(v, (int, float)) and v >= 0 for v in probs.values()) or \
      sum(probs.values()) > 1 + 1e-3:
    raise ValueError(f"{where} must map strings to probabilities >= 0 summing to <= 1")
  return probs


def _count_distributions(kept: list[records.Record], spec: RecipeSpec) -> dict:
  """Checks every distribution; counts the records without one (they train on CE only)."""
  missing: dict[str, int] = {}
  for r in kept:
    if teacher_probs(r, spec) is None:
      missing[r.meta["task"]] = missing.get(r.meta["task"], 0) + 1
  n = sum(missing.values())
  if n == len(kept):
    raise ValueError(f"{spec.teacher_corpus}: none of its {n} records of the source tasks has "
                     "meta.teacher_probs (extraction tasks have none; a teacher corpus needs "
                     "generate.logprobs > 0): use icl.target=teacher")
  if n:
    log.warning("ICLDist teacher_probs: %d of %d records have no verbalizer distribution and "
                "train on CE only (%s)", n, len(kept),
                ", ".join(f"{t}: {c}" for t, c in sorted(missing.items())))
  return {"no_distribution": n, "no_distribution_per_task": dict(sorted(missing.items()))}


def soft_targets(spec: RecipeSpec, tok) -> sequences.SoftTargets:
  """The teacher's distribution over the verbalizers' first tokens, at the first answer token."""
  def fn(record: records.Record, seq: sequences.TokenizedSequence):
    probs = teacher_probs(record, spec)
    if probs is None:  # no distribution (counted) or a mixed-in KnowDist record: CE only
      return None
    by_id: dict[int, float] = {}
    for verbalizer, p in probs.items():
      ids = tok(verbalizer, add_special_tokens=False)["input_ids"]
      if not ids:
        raise ValueError(f"record {record.id!r}: verbalizer {verbalizer!r} tokenises to nothing")
      by_id[int(ids[0])] = by_id.get(int(ids[0]), 0.0) + float(p)  # shared first tokens add up
    return sequences.soft_targets_at(len(seq.tokens), spec.soft_width,
                                   sequences.first_response_index(seq), list(by_id),
                                   list(by_id.values()))
  return sequences.SoftTargets(spec.soft_width, fn, "icl-teacher-probs-v1")


def mix_records(spec: RecipeSpec, n_train: int) -> list[records.Record]:
  """`icl.mix_fraction` x n_train records of `icl.mix_corpus` (KnowDist-style), or none."""
  if not spec.mix_corpus or spec.mix_fraction <= 0:
    return []
  recs, _ = readers.read_corpus(spec.mix_corpus)
  return recs[:int(round(spec.mix_fraction * n_train))]


# --------------------------------------------------------------------------- audit


def heldout_audit(spec: RecipeSpec, heldout: list[tasks.TaskSpec], groups: dict[str, list[str]],
                  forbidden: identity.SentenceIndex, stats: dict) -> dict:
  """What the held-out filter did (`<workdir>/heldout_audit.json`): per forbidden task, its
  sentences and the source examples (gold: train sentences; teacher: records) carrying one, per
  source task; per source task, its examples and how many were dropped; the settings."""
  held = {t.name for t in heldout}
  found_in = stats.get("found_in", {})
  per_task = {}
  for name, sentences in groups.items():
    found = {src: f[name] for src, f in sorted(found_in.items()) if f.get(name)}
    per_task[name] = {"role": "held out (every split)" if name in held else "SentiBench test",
                      "sentences": len(sentences), "found_in": found,
                      "dropped": sum(found.values())}
  sources = {name: {"examples": n, "dropped": stats["dropped_leaks"].get(name, 0)}
             for name, n in stats["source_examples"].items()}
  return {
      "settings": {"leak_check": spec.leak_check, "sentibench_dir": spec.sentibench_dir,
                   "sentibench_dir_found": os.path.isdir(spec.sentibench_dir),
                   "heldout": list(spec.heldout), "task_dirs": list(spec.task_dirs),
                   "tasks": spec.tasks, "target": spec.target, "drop_leaks": spec.drop_leaks,
                   "identity": identity.DESCRIPTION},
      "heldout_tasks": sorted(held),
      "forbidden": per_task,
      "sources": sources,
      "totals": {"forbidden_tasks": len(groups), "forbidden_sentences": len(forbidden),
                 "source_examples": sum(v["examples"] for v in sources.values()),
                 "dropped": sum(v["dropped"] for v in sources.values()),
                 "skipped_tasks": stats.get("skipped_tasks", []),
                 "prompts_checked": stats.get("prompts_checked", 0)},
  }


def log_audit(audit: dict) -> None:
  for name, a in audit["forbidden"].items():
    if a["role"].startswith("held out") or a["dropped"]:
      log.info("held-out filter: %s (%s, %d sentences): %s", name, a["role"], a["sentences"],
               ", ".join(f"{n} in {src}" for src, n in a["found_in"].items()) or "in no source")
  t = audit["totals"]
  log.info("held-out filter: %d forbidden sentences of %d tasks; %d of %d source examples "
           "dropped%s (heldout_audit.json)", t["forbidden_sentences"], t["forbidden_tasks"],
           t["dropped"], t["source_examples"],
           f"; skipped: {', '.join(t['skipped_tasks'])}" if t["skipped_tasks"] else "")


def write_prompts(path: Path, parts: dict[str, list[records.Record]]) -> None:
  """The records trained on, one JSON line each (prompt, response, meta with its split)."""
  with atomic.atomic_open(path) as f:
    for split, recs in parts.items():
      for r in recs:
        f.write(json.dumps({"id": r.id, "prompt": r.prompt, "response": r.response,
                            "meta": dict(r.meta) | {"split": split}}, ensure_ascii=False) + "\n")


def length_fn(tokenizer: Any | None) -> icl.LengthFn:
  """Tokens of a (prompt, answer) sequence rendered raw (no chat template), as the teacher job
  sends its prompts; without a tokenizer (a remote teacher) ~3 characters per token."""
  if tokenizer is None:
    return lambda prompt, answer: (len(prompt) + len(answer)) // 3 + 2
  return sequences.sequence_length_fn(tokenizer, False)
