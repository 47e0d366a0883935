"""Answer extraction and tuple parsing for the SentiBench extraction tasks.

Mirrors `fsa.py` and `parse_utils/{atsa,acsa,asqp,ssa}.py` of the official harness
(HITSZ-HLT/Sentiment-Distillation @ 2810fc2), using `ast.literal_eval` only (the model output is
never executed). The result of `parse_tuples` is what the official scorer counts as predictions:

  * Nothing is lower-cased (the official parsers do not lower-case predictions): polarities must
    be written exactly 'positive' / 'negative' / 'neutral' to be valid.
  * atsa / acsa: a list of 2 strings is wrapped as one tuple; items are unpacked as
    (x, polarity) or split on ',', '-' or '|' when they are strings; both parts stripped; an item
    with a bad polarity (or, for atsa when `sentence` is given, an aspect not in the sentence)
    stays as an `INVALID` prediction (a false positive). If any item cannot be unpacked at all,
    the official code keeps the raw list: raw 2-string tuples are then compared unstripped and
    every other raw item is `INVALID`. atsa keeps only the LAST inner list of a 3-level list.
    atsa has no recovery for unparsable text (-> []).
  * acsa / asqp / opener: if `literal_eval` fails (e.g. a truncated list, or text after the
    list), the text is cut after its last ')' and ']' is appended (just ']' when there is no
    ')'), then parsed again. Official quirk: acsa and asqp then keep at most 3 distinct tuples
    (opener keeps all); acsa returns those recovered tuples without validation. The official
    code takes them from a `set` (hash-seed dependent order); we keep the first 3 in order of
    appearance. asqp / opener recover only when `literal_eval` fails: a list that parses but
    holds an unhashable or non-iterable item gives [] (official).
  * A `None` (or any non-string) inside an asqp tuple, or a non-string opener target /
    expression / polarity, crashes the official parser; here the asqp tuple is dropped and the
    opener field becomes 'NULL' (`INVALID_FIELD` for the polarity).
  * asqp / opener: items are de-duplicated first (official `set`, here order-preserving), so a
    bare tuple is treated as an iterable of strings (never correct, as in the official code).
    asqp keeps stripped 4-tuples of strings and drops the others. opener keeps raw values (the
    sentiment-graph scorer applies the official span matching and `capitalize()` itself): one
    item of the wrong arity empties the whole prediction, non-string holder/target/expression
    become 'NULL' and a non-string polarity becomes `INVALID_FIELD`.
"""
from __future__ import annotations

import ast
import re
from typing import Any

# A prediction that can never equal a gold tuple: counted as a wrong prediction.
INVALID: tuple[str, ...] = ("<invalid>",)
INVALID_FIELD = "<invalid>"

# Official `extract_labels_from_text` pattern; match k_shot of the decoded sequence.
LABEL_PATTERN = re.compile(r"Label:\s*(.*?)(?=\s*(?=Sentence:|\n|$))", re.DOTALL)

ATSA = "absa/atsa_rest16"
ACSA = "absa/acsa_rest16"
ASQP = "absa/asqp_rest16"
OPENER = "absa/opener"

ARITY: dict[str, int] = {ATSA: 2, ACSA: 2, ASQP: 4, OPENER: 4}
_POLARITIES: dict[str, tuple[str, ...]] = {
    ATSA: ("positive", "neutral", "negative", "conflict"),
    ACSA: ("positive", "neutral", "negative"),
}
_SPLIT = re.compile(r",|-|\|")
_RECOVERY_CAP: dict[str, int | None] = {ACSA: 3, ASQP: 3, OPENER: None}


def strip_code_fences(text: str) -> str:
  """Removes ```python and ``` markers (official: plain `str.replace`) and strips."""
  return text.replace("```python", "").replace("```", "").strip()


def extract_answer(generated_text: str, k_shot: int | None = None) -> str:
  """The answer line of a generation, as the official harness extracts it.

  Official: decode prompt + continuation and take match `k_shot` of `LABEL_PATTERN`, i.e. the
  text after the query's 'Label:' (leading whitespace skipped) up to the first newline or
  'Sentence:'. Code-fence markers on that line are then removed. A fence on its own line
  therefore yields '' (as officially: such answers count as wrong).

  Args:
    generated_text: the continuation after the prompt's final 'Label:' (k_shot None), or the
      whole decoded prompt + continuation (k_shot = number of demos in the prompt).
    k_shot: see above.
  """
  if k_shot is None:
    m = LABEL_PATTERN.match("Label:" + generated_text)
    answer = m.group(1) if m else ""
  else:
    matches = LABEL_PATTERN.findall(generated_text)
    answer = matches[k_shot] if len(matches) > k_shot else ""
  return strip_code_fences(answer)


def _preprocess(seq: str, name: str) -> str:
  # Official order: fences, strip, '\n]' / '[\n' joins, last line, ('Label:' for atsa/acsa).
  seq = seq.replace("```python", "").replace("```", "").strip()
  seq = seq.replace("\n]", "]").replace("[\n", "[")
  seq = seq.split("\n")[-1]
  if name in (ATSA, ACSA):
    seq = seq.replace("Label:", "")
  return seq.strip()


def _literal(seq: str) -> Any:
  """ast.literal_eval; raises ValueError on anything it rejects."""
  try:
    return ast.literal_eval(seq)
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
    raise ValueError(str(e)) from None


def _recover_text(seq: str) -> str:
  i = seq.rfind(")")
  return seq[:i + 1] + "]" if i != -1 else seq + "]"


def _ordered_unique(obj: Any) -> list[Any]:
  """`set(obj)` in order of first appearance (TypeError like `set` for bad input)."""
  out: dict[Any, None] = {}
  for x in obj:
    out.setdefault(x, None)
  return list(out)


def _unique_tuples(seq: str) -> list[tuple[Any, ...]]:
  """Official `[tuple(item) for item in set(ast.literal_eval(seq))]`; ValueError/TypeError."""
  return [tuple(x) for x in _ordered_unique(_literal(seq))]


def _recover(seq: str, cap: int | None) -> list[tuple[Any, ...]]:
  """Official truncation recovery: cut after the last ')', close with ']', parse again."""
  try:
    items = _unique_tuples(_recover_text(seq))
  except (ValueError, TypeError):
    return []
  return items[:cap] if cap is not None else items


def _set_path(seq: str, cap_on_recovery: int | None) -> list[tuple[Any, ...]]:
  """Official asqp/ssa parsing: literal_eval -> set -> tuples, else truncation recovery.

  Recovery runs only when `literal_eval` itself fails: officially a list that parses but whose
  items are unhashable or not iterable (e.g. `[('a', 'b', 'c', 'd'), 5]`) has already replaced
  the text variable, so the recovery's `.rfind` raises and the prediction is [].
  """
  try:
    parsed = _literal(seq)
  except ValueError:
    return _recover(seq, cap_on_recovery)
  try:
    return [tuple(x) for x in _ordered_unique(parsed)]
  except TypeError:
    return []


def _pair_or_invalid(item: Any, arity: int) -> tuple[str, ...]:
  """A raw item compared as is (official fallback): a tuple of strings or INVALID."""
  if (isinstance(item, tuple) and len(item) == arity and all(isinstance(x, str) for x in item)):
    return item
  return INVALID


class _Unpack(Exception):
  """An item the official `parse_seq` raises on (it then keeps the raw list)."""


def _parse_pair(item: Any, name: str, sentence: str | None) -> tuple[str, ...]:
  if isinstance(item, (tuple, list)):
    if len(item) != 2:
      raise _Unpack()
    first, polarity = item
  elif isinstance(item, str):
    parts = _SPLIT.split(item)
    if len(parts) != 2:
      raise _Unpack()
    first, polarity = parts
  else:
    raise _Unpack()
  if not isinstance(first, str) or not isinstance(polarity, str):
    raise _Unpack()
  first, polarity = first.strip(), polarity.strip()
  if name == ATSA and sentence is not None and first not in sentence:
    return INVALID
  if polarity not in _POLARITIES[name]:
    return INVALID
  return (first, polarity)


def _parse_pairs(seq: str, name: str, sentence: str | None) -> list[tuple[str, ...]]:
  try:
    parsed = _literal(seq)
  except ValueError:
    if name == ATSA:
      return []
    # Official acsa recovery returns these unvalidated; only exact 2-string tuples can match.
    return [_pair_or_invalid(t, 2) for t in _recover(seq, _RECOVERY_CAP[ACSA])]
  if not isinstance(parsed, (list, tuple)):
    return []
  if len(parsed) == 2 and isinstance(parsed[0], str):
    parsed = [parsed]
  if name == ATSA:  # official: a 3-level list keeps only its last inner list
    try:
      if (len(parsed) > 0 and len(parsed[0]) > 0 and isinstance(parsed[0][0], (list, tuple))):
        parsed = parsed[-1]
    except (TypeError, KeyError, IndexError):
      return []
  try:
    return [_parse_pair(x, name, sentence) for x in parsed if x]
  except (_Unpack, TypeError):  # official keeps the raw (unvalidated) list
    try:
      raw = list(parsed)
    except TypeError:
      raw = []
    return [_pair_or_invalid(x, 2) for x in raw]


def _parse_quads(seq: str, name: str) -> list[tuple[str, ...]]:
  items = _set_path(seq, _RECOVERY_CAP[name])
  if name == ASQP:
    out = []
    for t in items:
      if len(t) == 4 and all(isinstance(x, str) for x in t):
        out.append(tuple(x.strip() for x in t))
    return out
  # opener: official parse_to_origin on the raw de-duplicated tuples.
  if any(len(t) != 4 for t in items):
    return []
  out = []
  for holder, target, expression, polarity in items:
    out.append((holder if isinstance(holder, str) else "NULL",
                target if isinstance(target, str) else "NULL",
                expression if isinstance(expression, str) else "NULL",
                polarity if isinstance(polarity, str) else INVALID_FIELD))
  return out


def parse_tuples(text: str, name: str, sentence: str | None = None) -> list[tuple[str, ...]]:
  """Parses a model answer into the predicted tuples of extraction dataset `name`.

  Args:
    text: the answer (from `extract_answer`, or a raw continuation: the official
      preprocessing -- fence removal, last line -- is applied again here).
    name: 'absa/atsa_rest16' | 'absa/acsa_rest16' | 'absa/asqp_rest16' | 'absa/opener'.
    sentence: the input sentence; for atsa, aspects not found in it become INVALID (official).

  Returns:
    Predicted tuples (possibly containing `INVALID`, which counts as a wrong prediction);
    [] for malformed output. Never evaluates code.
  """
  if name not in ARITY:
    raise ValueError(f"no tuple parser for dataset {name!r}; known: {', '.join(ARITY)}")
  if not isinstance(text, str):
    return []
  seq = _preprocess(text, name)
  if name in (ATSA, ACSA):
    return _parse_pairs(seq, name, sentence)
  return _parse_quads(seq, name)
