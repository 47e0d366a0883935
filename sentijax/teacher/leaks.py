"""Flags generated text that contains a SentiBench test sentence (case/whitespace ignored).

Test sentences are indexed by their first `_PREFIX_WORDS` words; a text is scanned word by word
and a candidate is confirmed by a substring test, so a check is linear in the text, not in the
number of test sentences. Sentences shorter than that are matched as whole sentences.
"""
from __future__ import annotations

import logging
import os
import re

from sentijax.data import tasks

log = logging.getLogger("sentijax")

_PREFIX_WORDS = 4
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


class LeakChecker:
  """`hits(text)` -> the test sentences (normalised) found in `text`."""

  def __init__(self, sentences: dict[str, str]):
    self.task_of = sentences  # normalised sentence -> task
    self.by_prefix: dict[tuple[str, ...], list[str]] = {}
    self.short: set[str] = set()
    for s in sentences:
      words = s.split()
      if len(words) >= _PREFIX_WORDS:
        self.by_prefix.setdefault(tuple(words[:_PREFIX_WORDS]), []).append(s)
      elif s:
        self.short.add(s)

  def hits(self, text: str) -> list[str]:
    norm = tasks.normalize_sentence(text)
    words = norm.split()
    found = set()
    for i in range(len(words) - _PREFIX_WORDS + 1):
      for s in self.by_prefix.get(tuple(words[i:i + _PREFIX_WORDS]), ()):
        if s in norm:
          found.add(s)
    for part in _SENTENCE_END.split(text):
      p = tasks.normalize_sentence(part)
      if p in self.short:
        found.add(p)
    return sorted(found)


def from_task_dirs(roots: str, split: str = "test") -> LeakChecker | None:
  """Every `split` sentence of every task under `roots` (comma list); None when absent."""
  existing = [r for r in tasks.parse_names(roots) if os.path.isdir(r)]
  if not existing:
    log.warning("leak check off: no task directory among %r", roots)
    return None
  registry = tasks.discover(existing)
  sentences: dict[str, str] = {}
  for spec in registry.tasks.values():
    if split in spec.splits:
      for ex in tasks.load_examples(spec, split):
        sentences.setdefault(tasks.normalize_sentence(ex.sentence), spec.name)
  return LeakChecker(sentences)
