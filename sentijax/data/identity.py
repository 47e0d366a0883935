"""One sentence identity for every held-out and leak check.

`sentence_key(text)` is the same for two copies of a sentence that differ only in how they were
tokenised or escaped -- PTB splits ("ca n't" / "can't", "it 's", "do n't", "gon na") and tokens
(-LRB- -RRB- -LSB- -RSB- -LCB- -RCB-, `` ''), spacing around punctuation, case, unicode form
(NFKC), accents, HTML entities (&amp; &quot; &#39;, also PTB-split ones such as "& eacute ;"):
the folded text reduced to its letters and digits. Digit runs that the text keeps apart stay
apart ('1.5' vs '15': one '.' between them). Text with no letter or digit (emoji only) has the
empty key, which is never indexed and matches nothing.

    sentence_key("You ca n't go wrong here .") == sentence_key("You Can't Go Wrong Here.")

As a key has no spaces, finding a sentence inside a longer text is a substring test on keys:
`SentenceIndex.find` looks up each word start of the text's key in an index of key prefixes
(linear in the text) and accepts a match that also ends on a word end of the text. Keys shorter
than `min_scan_chars` (such as 'Yum!' or 'Not bad.') would turn up inside many unrelated texts,
so they only match a whole candidate sentence (`candidate_sentences`: the text, its lines, the
value after a 'Field:' label, its sentences and quoted spans).
"""
from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Iterable, Mapping

MIN_SCAN_CHARS = 32  # key characters (~6-7 words) a sentence needs to be searched as a substring
DESCRIPTION = ("sentence_key: HTML entities (split ones rejoined) unescaped, NFKC, PTB bracket "
               "tokens dropped, case-folded, accents dropped, letters and digits kept (digit runs "
               f"kept apart); substring search for keys >= {MIN_SCAN_CHARS} chars on word "
               "boundaries, shorter keys as whole candidate sentences")

_PTB_BRACKET = re.compile(r"-(?:LRB|RRB|LSB|RSB|LCB|RCB)-", re.IGNORECASE)
_SPLIT_ENTITY = re.compile(r"&\s*(#\s*\d+|#\s*[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*)\s*;")
_WORD = re.compile(r"[^\W_]+")  # a run of letters and digits
_FIELD = re.compile(r"^\s*[A-Za-z][\w ()/#-]{0,30}:\s*")  # "Sentence: ", "Text 2: "
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_QUOTED = re.compile(r'"([^"\n]+)"|\u201c([^\u201d\n]+)\u201d|\u00ab([^\u00bb\n]+)\u00bb'
                     r"|``(.+?)''|(?<!\w)'([^'\n]+)'(?!\w)|\u2018([^\u2019\n]+)\u2019")


def fold(text: str) -> str:
  """`text` with entities unescaped, NFKC, PTB brackets as spaces, case-folded, no accents."""
  if "&" in text:
    text = _SPLIT_ENTITY.sub(lambda m: "&" + re.sub(r"\s+", "", m.group(1)) + ";", text)
    for _ in range(3):  # double-escaped text: "&amp;quot;" -> "&quot;" -> '"'
      unescaped = html.unescape(text)
      if unescaped == text:
        break
      text = unescaped
  if not text.isascii():
    text = unicodedata.normalize("NFKC", text)
  text = _PTB_BRACKET.sub(" ", text).casefold()
  if text.isascii():
    return text
  return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def key_with_bounds(text: str) -> tuple[str, list[int], set[int]]:
  """(key, offsets in the key where a word of `text` starts, offsets where one ends)."""
  parts: list[str] = []
  starts: list[int] = []
  ends: set[int] = set()
  n = 0
  for m in _WORD.finditer(fold(text)):
    word = m.group()
    if parts and parts[-1][-1].isdigit() and word[0].isdigit():
      parts.append(".")
      n += 1
    starts.append(n)
    parts.append(word)
    n += len(word)
    ends.add(n)
  return "".join(parts), starts, ends


def sentence_key(text: str) -> str:
  """The identity of a sentence (see the module doc); "" when it has no letter or digit."""
  return key_with_bounds(text)[0]


def candidate_sentences(text: str) -> list[str]:
  """Spans of `text` that may be a whole sentence: the text, each line, a line's value after a
  'Field:' label, the sentences of each value and the quoted spans."""
  out = [text]
  for line in text.splitlines():
    m = _FIELD.match(line)
    value = line[m.end():] if m else line
    out += [line, value] + _SENTENCE_END.split(value)
  out += [g for m in _QUOTED.finditer(text) for g in m.groups() if g]
  return out


class SentenceIndex:
  """Sentences by identity, each with the groups (tasks) it belongs to.

  `sentence in index` and `groups(sentence)` test identity; `find(text)` finds indexed
  sentences inside a longer text (see the module doc).
  """

  def __init__(self, groups: Mapping[str, Iterable[str]] | None = None,
               min_scan_chars: int = MIN_SCAN_CHARS):
    self.min_scan_chars = min_scan_chars
    self.groups_of: dict[str, list[str]] = {}  # key -> groups, first seen first
    self.text_of: dict[str, str] = {}  # key -> the first sentence seen with it
    self._by_prefix: dict[str, list[str]] = {}
    for group, sentences in (groups or {}).items():
      for s in sentences:
        self.add(s, group)

  def add(self, sentence: str, group: str) -> bool:
    """Indexes `sentence` under `group`; False when its key is empty (nothing to match)."""
    key = sentence_key(sentence)
    if not key:
      return False
    groups = self.groups_of.setdefault(key, [])
    if not groups:
      self.text_of[key] = sentence
      if len(key) >= self.min_scan_chars:
        self._by_prefix.setdefault(key[:self.min_scan_chars], []).append(key)
    if group not in groups:
      groups.append(group)
    return True

  def __len__(self) -> int:
    return len(self.groups_of)

  def __contains__(self, sentence: str) -> bool:
    return bool(self.groups(sentence))

  def groups(self, sentence: str) -> tuple[str, ...]:
    """The groups of the sentence with the identity of `sentence` (() when not indexed)."""
    key = sentence_key(sentence)
    return tuple(self.groups_of.get(key, ())) if key else ()

  def find(self, text: str, candidates: Iterable[str] | None = None) -> list[str]:
    """Keys of the indexed sentences inside `text` (sorted): a long one anywhere on word
    boundaries, any one equal to a candidate (default `candidate_sentences(text)`)."""
    found = set()
    if self._by_prefix:
      key, starts, ends = key_with_bounds(text)
      width = self.min_scan_chars
      for i in starts:
        for k in self._by_prefix.get(key[i:i + width], ()):
          if i + len(k) in ends and key.startswith(k, i):
            found.add(k)
    for c in candidate_sentences(text) if candidates is None else candidates:
      k = sentence_key(c)
      if k in self.groups_of:
        found.add(k)
    return sorted(found)
