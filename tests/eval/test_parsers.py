"""Tests for sentijax.eval.parsers (answer extraction and tuple parsing)."""
import inspect
import os
import re

import pytest

from sentijax.eval import parsers as P
from sentijax.eval.parsers import INVALID, extract_answer, parse_tuples

ATSA, ACSA, ASQP, OPENER = P.ATSA, P.ACSA, P.ASQP, P.OPENER
# The official extraction regex, written out independently of the module.
OFFICIAL_RE = r"Label:\s*(.*?)(?=\s*(?=Sentence:|\n|$))"


# ----------------------------------------------------------------------------- extract_answer


@pytest.mark.parametrize("gen,expected", [
    (" [('food', 'positive')]\n\nSentence: next one", "[('food', 'positive')]"),
    (" [('food', 'positive')] Sentence: next", "[('food', 'positive')]"),
    ("\n\n  [('food', 'positive')]\nmore", "[('food', 'positive')]"),  # leading blank lines
    (" ```python [('a', 'positive')] ```", "[('a', 'positive')]"),  # inline fences
    (" ```python\n[('a', 'positive')]\n```", ""),  # fence on its own line: official -> ''
    (" positive", "positive"),
    ("", ""),
])
def test_extract_answer(gen, expected):
  assert extract_answer(gen) == expected
  official = re.findall(OFFICIAL_RE, "Label:" + gen, re.DOTALL)[0]
  assert extract_answer(gen) == P.strip_code_fences(official)


def test_extract_answer_from_full_decoded_sequence():
  prompt = ("Do it.\n\nSentence: a\nLabel: [('a', 'positive')]\n\n"
            "Sentence: b\nLabel: []\n\nSentence: c\nLabel:")
  gen = " [('c', 'negative')]\n\nSentence: d\nLabel: x"
  assert extract_answer(prompt + gen, k_shot=2) == "[('c', 'negative')]"
  assert extract_answer(prompt + gen, k_shot=2) == extract_answer(gen)
  assert extract_answer(prompt, k_shot=7) == ""


# ----------------------------------------------------------------------------- atsa


def test_atsa():
  s = "The pizza was great but the wine was bad."
  assert parse_tuples("[('pizza', 'positive'), ('wine', 'negative')]", ATSA, s) == [
      ("pizza", "positive"), ("wine", "negative")]
  assert parse_tuples("```python [(' pizza ', 'positive')] ```", ATSA, s) == [
      ("pizza", "positive")]
  assert parse_tuples("[]", ATSA, s) == []
  # Not in the sentence / bad polarity / upper case (no lower-casing): INVALID predictions.
  assert parse_tuples("[('pasta', 'positive'), ('wine', 'bad'), ('wine', 'Negative')]",
                      ATSA, s) == [INVALID, INVALID, INVALID]
  assert parse_tuples("[('pasta', 'positive')]", ATSA) == [("pasta", "positive")]  # no sentence
  assert parse_tuples("('pizza', 'positive')", ATSA, s) == [("pizza", "positive")]  # bare pair
  assert parse_tuples("['pizza, positive', 'wine | negative', 'wine-neutral']", ATSA, s) == [
      ("pizza", "positive"), ("wine", "negative"), ("wine", "neutral")]
  # Official quirk: ANY list of two strings is read as one (aspect, polarity) pair.
  assert parse_tuples("['pizza, positive', 'wine | negative']", ATSA, s) == [INVALID]
  # 3-level list: official keeps only the LAST inner list.
  assert parse_tuples("[[('pizza', 'positive')], [('wine', 'negative')]]", ATSA, s) == [
      ("wine", "negative")]
  # One item that cannot be unpacked: the raw list is kept (raw tuples compared as is).
  assert parse_tuples("[('pizza', 'positive'), ('wine', 'bad', 'x'), (' wine', 'negative')]",
                      ATSA, s) == [("pizza", "positive"), INVALID, (" wine", "negative")]
  assert parse_tuples("[(1, 'positive')]", ATSA, s) == [INVALID]
  # No recovery for atsa: truncated lists and trailing text give [].
  assert parse_tuples("[('pizza', 'positive'), ('wine', 'neg", ATSA, s) == []
  assert parse_tuples("[('pizza', 'positive')] and that is all", ATSA, s) == []
  assert parse_tuples("positive", ATSA, s) == []
  assert parse_tuples("{'pizza': 'positive'}", ATSA, s) == []


# ----------------------------------------------------------------------------- acsa


def test_acsa():
  good = "[('food quality', 'positive'), ('service general', 'negative')]"
  assert parse_tuples(good, ACSA) == [("food quality", "positive"),
                                      ("service general", "negative")]
  assert parse_tuples("Label: " + good, ACSA) == parse_tuples(good, ACSA)
  assert parse_tuples("[('food quality', 'great')]", ACSA) == [INVALID]
  assert parse_tuples("[('food quality', 'positive', 'x')]", ACSA) == [INVALID]
  # Truncated list: cut after the last ')' and close -- then at most 3 tuples (official quirk).
  trunc = ("[('food quality', 'positive'), ('service general', 'negative'), "
           "('ambience general', 'positive'), ('food prices', 'negative'), ('drinks qual")
  assert parse_tuples(trunc, ACSA) == [("food quality", "positive"),
                                       ("service general", "negative"),
                                       ("ambience general", "positive")]
  assert parse_tuples("[('food quality', 'positive'), ('food quality', 'positive'), ('x", ACSA) \
      == [("food quality", "positive")]  # set semantics in the recovery path
  assert parse_tuples(good + " is my answer.", ACSA) == parse_tuples(good, ACSA)  # extra text
  assert parse_tuples("[('food quality'", ACSA) == []  # nothing closes
  assert parse_tuples("I cannot tell.", ACSA) == []


# ----------------------------------------------------------------------------- asqp


def test_asqp():
  out = ("[('food quality', 'pizza', 'great', 'positive'), "
         "('service general', 'NULL', 'slow', 'negative')]")
  assert parse_tuples(out, ASQP) == [("food quality", "pizza", "great", "positive"),
                                     ("service general", "NULL", "slow", "negative")]
  # Duplicates removed, fields stripped, wrong arity and non-strings dropped.
  messy = ("[('food quality', ' pizza ', 'great', 'positive'), "
           "('food quality', ' pizza ', 'great', 'positive'), ('a', 'b', 'c'), ('a', 1, 'c', 'd')]")
  assert parse_tuples(messy, ASQP) == [("food quality", "pizza", "great", "positive")]
  trunc = ("[('a', 'b', 'c', 'positive'), ('d', 'e', 'f', 'positive'), "
           "('g', 'h', 'i', 'negative'), ('j', 'k', 'l', 'neutral'), ('m', 'n'")
  assert parse_tuples(trunc, ASQP) == [("a", "b", "c", "positive"), ("d", "e", "f", "positive"),
                                       ("g", "h", "i", "negative")]
  assert parse_tuples(out + " Done.", ASQP) == parse_tuples(out, ASQP)[:3]
  # Lists are unhashable for the official `set`: recovery cannot close them -> [].
  assert parse_tuples("[['food quality', 'pizza', 'great', 'positive']]", ASQP) == []
  # The list parses but an item after the last ')' is not a tuple: the official set/tuple step
  # fails after the text variable was replaced, so its recovery raises too -> [] (no recovery).
  assert parse_tuples("[('food quality', 'pizza', 'great', 'positive'), 5]", ASQP) == []
  assert parse_tuples("[('food quality', 'pizza', 'great', 'positive'), None]", ASQP) == []
  assert parse_tuples("[('NULL', 'staff', 'nice', 'positive'), 7]", OPENER) == []
  # A None inside a quad crashes the official parser; here the quad is dropped.
  assert parse_tuples("[('food quality', None, 'great', 'positive')]", ASQP) == []
  # A bare tuple is iterated as strings (official); it can never give a correct quad.
  bare = parse_tuples("('food quality', 'pizza', 'good', 'positive')", ASQP)
  assert ("food quality", "pizza", "good", "positive") not in bare
  assert parse_tuples("```python " + out + " ```", ASQP) == parse_tuples(out, ASQP)


# ----------------------------------------------------------------------------- opener


def test_opener():
  out = "[('NULL', 'The staff', 'friendly', 'positive'), ('We', 'room', 'dirty', 'negative')]"
  assert parse_tuples(out, OPENER) == [("NULL", "The staff", "friendly", "positive"),
                                       ("We", "room", "dirty", "negative")]
  assert parse_tuples("[('NULL', 'NULL', 'NULL', 'NULL')]", OPENER) == [("NULL",) * 4]
  # One wrong-arity item empties the whole prediction (official parse_to_origin).
  assert parse_tuples("[('NULL', 'staff', 'nice', 'positive'), ('a', 'b')]", OPENER) == []
  # Non-string holder/target/expression -> 'NULL'; raw values otherwise kept.
  assert parse_tuples("[(None, 'staff', ' nice', 'Positive')]", OPENER) == [
      ("NULL", "staff", " nice", "Positive")]
  assert parse_tuples("[('a', 'b', 'c', 1)]", OPENER) == [("a", "b", "c", P.INVALID_FIELD)]
  # Truncated: recovered without the cap of 3.
  trunc = ", ".join(f"('NULL', 't{i}', 'e{i}', 'positive')" for i in range(5))
  assert len(parse_tuples("[" + trunc + ", ('NULL', 'x", OPENER)) == 5


# ----------------------------------------------------------------------------- safety


@pytest.mark.parametrize("name", [ATSA, ACSA, ASQP, OPENER])
def test_code_is_never_executed(name, monkeypatch):
  calls = []
  monkeypatch.setattr(os, "system", lambda *a: calls.append(a) or 0)
  for payload in ("__import__('os').system('x')",
                  "[__import__('os').system('x')]",
                  "[('a', 'positive')] + [__import__('os').system('x')]",
                  "[(lambda: 1)(), ('a', 'b', 'c', 'd')]"):
    assert parse_tuples(payload, name) == []
  assert calls == []
  src = inspect.getsource(P).replace("literal_eval", "")
  assert "eval(" not in src and "exec(" not in src


def test_bad_arguments():
  with pytest.raises(ValueError, match="sc/sst2"):
    parse_tuples("[]", "sc/sst2")
  assert parse_tuples(None, ATSA) == []  # type: ignore[arg-type]
  assert parse_tuples("[" * 5000, ACSA) == []  # deeply nested / malformed
