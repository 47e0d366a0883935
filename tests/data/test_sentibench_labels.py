"""SentiBench label sequences: each extraction layout's builder on hand-checked records (the
official harness's order, duplicates and NULL rules)."""
import pytest

from sentijax.data import sentibench as sb
from sentijax.data import sentibench_labels as labels


def test_atsa_tuples_hand_checked():
  rec = {"ID": "x", "sentence": "pizza good, wine ok, pizza again, pasta bad",
         "aspects": [
             {"target": "pasta", "polarity": "negative", "from": "7", "to": "12"},
             {"target": "pizza", "polarity": "positive", "from": "0", "to": "5"},
             {"target": "NULL", "polarity": "positive", "from": "0", "to": "0"},
             {"target": None, "polarity": "negative", "from": None, "to": None},
             {"target": "pizza", "polarity": "positive", "from": "0", "to": "5"},  # dup
             {"target": "wine", "polarity": "neutral", "from": "12", "to": "16"},
             {"target": "pizza", "polarity": "positive", "from": "21", "to": "26"},
         ]}
  # NULL/None dropped; exact (target, polarity, span) duplicate removed; the same pair at
  # another span is kept (official); order = raw (from, to) strings, i.e. LEXICOGRAPHIC:
  # "0" < "12" < "21" < "7".
  assert labels.atsa_tuples(rec) == [("pizza", "positive"), ("wine", "neutral"),
                                 ("pizza", "positive"), ("pasta", "negative")]
  tie = {"sentence": "wine", "aspects": [
      {"target": "wine", "polarity": "neutral", "from": "0", "to": "4"},
      {"target": "wine", "polarity": "positive", "from": "0", "to": "4"}]}
  assert labels.atsa_tuples(tie) == [("wine", "neutral"), ("wine", "positive")]
  with pytest.raises(ValueError, match="not in the sentence"):
    labels.atsa_tuples({"sentence": "abc", "aspects": [
        {"target": "xyz", "polarity": "positive", "from": "0", "to": "3"}]})
  assert sb.label_string(labels.atsa_tuples(tie)) == "[('wine', 'neutral'), ('wine', 'positive')]"
  assert sb.label_string([("chef's table", "positive")]) == "[(\"chef's table\", 'positive')]"


def test_acsa_tuples_hand_checked():
  rec = {"sentence": "s", "aspects": [
      {"target": "NULL", "category": "FOOD#QUALITY", "polarity": "positive"},
      {"target": "x", "category": "SERVICE#GENERAL", "polarity": "negative"},
      {"target": "y", "category": "FOOD#QUALITY", "polarity": "positive"},
      {"target": None, "category": "FOOD#STYLE_OPTIONS", "polarity": "neutral"}]}
  assert labels.acsa_tuples(rec) == [("food quality", "positive"), ("service general", "negative"),
                                 ("food style_options", "neutral")]
  assert labels.acsa_tuples({"sentence": "s", "aspects": []}) == []


def test_asqp_tuples_hand_checked():
  q = lambda a, c, s, o: {"aspect": a, "category": c, "sentiment": s, "opinion": o}
  rec = {"sentence": "s", "quards": [q("Pizza", "food quality", "positive", "great"),
                                     q("NULL", "service general", "negative", "slow "),
                                     q("Pizza", "food quality", "positive", "great")]}
  # (category, aspect, opinion, sentiment): the demo order; values untouched; dup removed.
  assert labels.asqp_tuples(rec) == [("food quality", "Pizza", "great", "positive"),
                                 ("service general", "NULL", "slow ", "negative")]


def test_opener_tuples_hand_checked():
  op = lambda src, tgt, exp, pol: {"Source": [src, []], "Target": [tgt, []],
                                   "Polar_expression": [exp, []], "Polarity": pol}
  rec = {"sentence": "s", "opinions": [
      op([], ["room", "bed"], ["clean"], "Positive"),
      op(["We"], [], ["loved", "really"], "Positive"),
      op([], ["room", "bed"], ["clean"], "Positive"),
      op(["I"], ["staff"], ["rude"], "Negative")]}
  assert labels.opener_tuples(rec) == [("NULL", "room AND bed", "clean", "positive"),
                                   ("We", "NULL", "loved AND really", "positive"),
                                   ("I", "staff", "rude", "negative")]
  assert labels.opener_tuples({"sentence": "s", "opinions": []}) == [("NULL",) * 4]
  assert sb.label_string(labels.opener_tuples({"sentence": "s", "opinions": []})) == (
      "[('NULL', 'NULL', 'NULL', 'NULL')]")
