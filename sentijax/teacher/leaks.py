"""The SentiBench test sentences a teacher job must not feed or keep (`generate.leak_check`).

Sentences are matched by `identity.sentence_key` (tokenisation, case, unicode, escaping and
quoting ignored): a test sentence quoted inside a response or an input text is found. A check
that cannot run (a missing directory, one holding no test split) stops the job; only
`generate.leak_check=off` turns it off, with a warning.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from sentijax.data import identity, tasks

log = logging.getLogger("sentijax")

MODES = ("on", "off")


class LeakChecker(identity.SentenceIndex):
  """`hits(text)` -> the test sentences (as first read) found in `text`."""

  def __init__(self, sentences: Mapping[str, str]):
    super().__init__()
    for sentence, task in sentences.items():
      self.add(sentence, task)

  @property
  def task_of(self) -> dict[str, str]:
    """Sentence (as first read) -> its first task."""
    return {self.text_of[k]: groups[0] for k, groups in self.groups_of.items()}

  def hits(self, text: str) -> list[str]:
    return [self.text_of[k] for k in self.find(text)]


def from_task_dirs(roots: str, split: str = "test",
                   setting: str = "generate.leak_check_dirs") -> LeakChecker:
  """Every `split` sentence of every task under `roots` (comma list, read from `setting`).

  Raises FileNotFoundError naming the path and the settings to fix when a root is missing or
  the roots hold no `split` sentence.
  """
  names = tasks.parse_names(roots)
  missing = [r for r in names if not os.path.isdir(r)]
  fix = (f"set {setting} to the SentiBench directory (e.g. ../shared/sentibench), or "
         "generate.leak_check=off to run without the check")
  if not names or missing:
    what = "not found: " + ", ".join(os.path.abspath(m) for m in missing) if missing else "empty"
    raise FileNotFoundError(f"{setting}={roots!r}: {what}; the leak check needs the SentiBench "
                            f"{split} sentences: {fix}")
  checker = LeakChecker({})
  for spec in tasks.discover(names).tasks.values():
    if split in spec.splits:
      for ex in tasks.load_examples(spec, split):
        checker.add(ex.sentence, spec.name)
  if not len(checker):
    raise FileNotFoundError(f"{setting}={roots!r}: no task with a {split} split below it; {fix}")
  return checker


def checker_from_config(config) -> LeakChecker | None:
  """The teacher jobs' checker (`generate.leak_check`, `generate.leak_check_dirs`); None, with a
  warning, when `generate.leak_check=off`."""
  gc = config.generate
  mode = str(gc.leak_check)
  if mode not in MODES:
    raise ValueError(f"generate.leak_check={mode!r}: expected one of {MODES}")
  if mode == "off":
    log.warning("generate.leak_check=off: inputs and responses are NOT checked for SentiBench "
                "test sentences")
    return None
  checker = from_task_dirs(str(gc.leak_check_dirs))
  log.info("leak check: %d test sentences from %s", len(checker), gc.leak_check_dirs)
  return checker
