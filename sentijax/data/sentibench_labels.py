"""SentiBench gold label sequences, one builder per extraction layout, as the official harness
builds them (HITSZ-HLT/Sentiment-Distillation @ 2810fc2, `fsa.py`); `data/sentibench.py` picks
the builder by a dataset's layout.

  * Extraction demo labels are `str(list_of_tuples)` (Python list repr).
  * atsa: (aspect, polarity) for aspects whose target is not NULL/None; duplicates are removed
    on (target, polarity, (from, to)) -- so the same pair at two different spans stays twice --
    then sorted by the raw (from, to) values. In the data these are strings, so the official
    "span order" is LEXICOGRAPHIC ('104' < '43'); reproduced as is. The official tie order
    (same span, different polarity) comes from `set` iteration (hash-seed dependent); we keep
    first-occurrence order for ties.
  * acsa: (category.lower().replace('#', ' '), polarity), first occurrence kept.
  * asqp: (category, aspect, opinion, sentiment) -- the demo order, which differs from the order
    named in the official instruction; values as in the data (no strip / lower-casing).
  * opener: (holder, target, expression, polarity.lower()); multi-span fields joined with
    ' AND ', empty holder/target -> 'NULL', first occurrence kept, and
    [('NULL', 'NULL', 'NULL', 'NULL')] when the sentence has no opinion.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

NULL = "NULL"
NO_OPINION: tuple[str, str, str, str] = (NULL, NULL, NULL, NULL)


def classification_label(record: Mapping[str, Any]) -> str:
  """Gold / demo label of a classification record: `label.lower()` (official)."""
  return record["label"].lower()


def _span_key(aspect: Mapping[str, Any]) -> tuple[Any, Any]:
  # Official: (ifnt0(from), ifnt0(to)) on the raw JSON values (strings in SemEval data).
  b, e = aspect.get("from"), aspect.get("to")
  return (0 if b is None else b, 0 if e is None else e)


def atsa_tuples(record: Mapping[str, Any]) -> list[tuple[str, str]]:
  """(aspect term, polarity) tuples of an ABSA record, official order (see module doc).

  Generic over SemEval-style records with `sentence` and `aspects[]` (`target`, `polarity`,
  `from`, `to`); targets None/'NULL' are dropped.

  Raises:
    ValueError: if a target is not a substring of the sentence (an assertion in the official
      code).
  """
  sentence = record["sentence"]
  seen: dict[tuple[str, str, tuple[Any, Any]], None] = {}
  for aspect in record["aspects"]:
    term = aspect.get("target")
    if term in (NULL, None):
      continue
    if term not in sentence:
      raise ValueError(f"record {record.get('ID', '?')!r}: aspect target {term!r} "
                       "is not in the sentence")
    seen.setdefault((term, aspect["polarity"], _span_key(aspect)), None)
  items = list(seen)
  try:
    items.sort(key=lambda it: it[2])  # stable: ties keep first-occurrence order
  except TypeError:  # mixed None/str offsets (official would crash): numeric order
    items.sort(key=lambda it: tuple(int(x) for x in it[2]))
  return [(term, pol) for term, pol, _ in items]


def _unique(tuples: Iterable[tuple]) -> list[tuple]:
  """The tuples in first-occurrence order, duplicates dropped."""
  return list(dict.fromkeys(tuples))


def acsa_tuples(record: Mapping[str, Any]) -> list[tuple[str, str]]:
  """(category lower-cased with '#' -> ' ', polarity) tuples, first occurrence kept."""
  return _unique((a["category"].lower().replace("#", " "), a["polarity"])
                 for a in record["aspects"])


def asqp_tuples(record: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
  """(category, aspect, opinion, sentiment) tuples from `quards`, first occurrence kept."""
  return _unique((q["category"], q["aspect"], q["opinion"], q["sentiment"])
                 for q in record["quards"])


def opener_tuples(record: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
  """(holder, target, expression, polarity) tuples of a structured-sentiment record."""
  out: list[tuple[str, str, str, str]] = []
  for op in record["opinions"]:
    holder = " AND ".join(op["Source"][0]) if op["Source"][0] else NULL
    target = " AND ".join(op["Target"][0]) if op["Target"][0] else NULL
    expression = " AND ".join(op["Polar_expression"][0])
    quad = (holder, target, expression, op["Polarity"].lower())
    if quad not in out:
      out.append(quad)
  if not record["opinions"]:
    out.append(NO_OPINION)
  return out


BUILDERS = {"atsa": atsa_tuples, "acsa": acsa_tuples, "asqp": asqp_tuples,
            "opener": opener_tuples}
