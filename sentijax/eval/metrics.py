"""SentiBench metrics (pure Python): macro-F1, tuple micro-F1, sentiment-graph F1.

Mirrors the official harness (HITSZ-HLT/Sentiment-Distillation @ 2810fc2):
  * classification: `sklearn.metrics.f1_score(y_true, y_pred, average='macro')` on lower-cased
    gold vs predicted label strings (labels = sorted union of both; zero_division -> 0).
  * atsa / acsa / asqp: `F1Measure` of parse_utils/*.py -- precision = share of predicted
    (example, tuple) entries found in the gold entries, recall = share of gold entries found in
    the predicted ones, each 1 when its list is empty; F1 = 2PR/(P+R) or 0. Lists, not sets:
    duplicates count each time (de-duplication, where official, happens in the parser / label
    builder). With no duplicates this equals set-based micro-F1.
  * opener: `tuple_f1` of the SemEval-2022 task 10 scorer (jerbarnes/semeval22_structured_
    sentiment evaluation/evaluate.py, copied into parse_utils/ssa.py). Predicted strings are
    mapped to spans like the official `parse_to_origin`: the holder (unless exactly 'NULL') and
    each 'AND'-separated part of target / expression are located with `sentence.find` (first
    occurrence; parts not found are dropped), spans become space-token indices as nltk's
    SpaceTokenizer would, and polarity is `capitalize()`d. Quirk kept: a predicted
    ('NULL', 'NULL', 'NULL', 'NULL') is an opinion with empty spans, which never matches and so
    counts as a false positive; gold no-opinion sentences have no tuples.
"""
from __future__ import annotations

from typing import Any, Hashable, Iterator, Mapping, Sequence

_EPS_PR = 0.0000000000000001  # official tuple_precision / tuple_recall denominators
_EPS_F1 = 0.00000000000000001  # official tuple_f1 denominator

CLASSIFICATION = (
    "sc/imdb", "sc/yelp2", "sc/sst2", "sc/twitter", "multifaced/irony18",
    "multifaced/tweeteval", "multifaced/pstance", "multifaced/intimacy",
)
TUPLE_MICRO = ("absa/atsa_rest16", "absa/acsa_rest16", "absa/asqp_rest16")
OPENER = "absa/opener"


# --------------------------------------------------------------------------- classification


def macro_f1(gold: Sequence[Hashable], pred: Sequence[Hashable],
             labels: Sequence[Hashable] | None = None) -> float:
  """Macro-F1 with sklearn `f1_score(average='macro', zero_division=0)` semantics.

  Args:
    gold: true labels.
    pred: predicted labels, same length.
    labels: labels to average over; None = sorted union of gold and pred (so a label that
      only appears in predictions adds an F1 of 0).
  """
  if len(gold) != len(pred):
    raise ValueError(f"macro_f1: {len(gold)} gold labels vs {len(pred)} predictions")
  if labels is None:
    labels = sorted(set(gold) | set(pred))
  if len(labels) == 0:
    return 0.0
  tp = {l: 0 for l in labels}
  n_gold = {l: 0 for l in labels}
  n_pred = {l: 0 for l in labels}
  for g, p in zip(gold, pred):
    if g in n_gold:
      n_gold[g] += 1
    if p in n_pred:
      n_pred[p] += 1
    if g == p and g in tp:
      tp[g] += 1
  total = 0.0
  for l in labels:
    denom = n_gold[l] + n_pred[l]  # = 2tp + fp + fn
    total += 2.0 * tp[l] / denom if denom else 0.0
  return total / len(labels)


# --------------------------------------------------------------------------- tuple micro-F1


def tuple_prf(gold_lists: Sequence[Sequence[Hashable]], pred_lists: Sequence[Sequence[Hashable]],
              per_example_sets: bool = False) -> tuple[float, float, float]:
  """(precision, recall, F1) over (example, tuple) entries, official `F1Measure` semantics.

  Args:
    gold_lists: gold tuples per example.
    pred_lists: predicted tuples per example (same length).
    per_example_sets: de-duplicate each example's tuples first (plain set micro-F1; then
      empty gold and pred give 0 like sklearn instead of the official 1).
  """
  if len(gold_lists) != len(pred_lists):
    raise ValueError(f"tuple F1: {len(gold_lists)} gold examples vs {len(pred_lists)} predicted")
  n_pred = n_gold = tp_pred = tp_gold = 0
  for gold, pred in zip(gold_lists, pred_lists):
    gold = list(gold)
    pred = list(pred)
    if per_example_sets:
      gold, pred = list(dict.fromkeys(gold)), list(dict.fromkeys(pred))
    gset, pset = set(gold), set(pred)
    n_gold += len(gold)
    n_pred += len(pred)
    tp_pred += sum(p in gset for p in pred)
    tp_gold += sum(g in pset for g in gold)
  if per_example_sets:
    precision = tp_pred / n_pred if n_pred else 0.0
    recall = tp_gold / n_gold if n_gold else 0.0
  else:
    precision = tp_pred / n_pred if n_pred else 1.0
    recall = tp_gold / n_gold if n_gold else 1.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return precision, recall, f1


def micro_f1_tuples(gold_lists: Sequence[Sequence[Hashable]],
                    pred_lists: Sequence[Sequence[Hashable]],
                    per_example_sets: bool = False) -> float:
  """Micro-F1 over (example, tuple) exact matches (official `F1Measure`); see `tuple_prf`."""
  return tuple_prf(gold_lists, pred_lists, per_example_sets)[2]


# --------------------------------------------------------------------------- sentiment graph

_Graph = tuple[frozenset, frozenset, frozenset, str]


def space_token_spans(text: str) -> list[tuple[int, int]]:
  """nltk `SpaceTokenizer().span_tokenize` (string_span_tokenize(text, ' '))."""
  spans = []
  left = 0
  while True:
    right = text.find(" ", left)
    if right == -1:
      if left != len(text):
        spans.append((left, len(text)))
      return spans
    if right != 0:
      spans.append((left, right))
    left = right + 1


def char_offsets_to_token_ids(char_offsets: Sequence[str],
                              token_offsets: Sequence[tuple[int, int]]) -> frozenset:
  """Official `convert_char_offsets_to_token_idxs` ('b:e' strings -> token index set)."""
  ids = []
  for char_offset in char_offsets:
    b_s, e_s = char_offset.split(":")
    bidx, eidx = int(b_s), int(e_s)
    intoken = False
    for i, (b, e) in enumerate(token_offsets):
      if b == bidx:
        intoken = True
      if intoken:
        ids.append(i)
      if e == eidx:
        intoken = False
  return frozenset(ids)


def opinions_from_strings(sentence: str,
                          tuples: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
  """Official `parse_to_origin`: string tuples -> opinion dicts with char offsets."""
  if len(tuples) == 0:
    return []
  opinions = []
  for t in tuples:
    if len(t) != 4:
      return []
    holder, target, expression, sentiment = t
    holder = holder if isinstance(holder, str) else "NULL"
    target = target if isinstance(target, str) else "NULL"
    expression = expression if isinstance(expression, str) else "NULL"
    op: dict[str, Any] = {}
    begin = -1 if holder == "NULL" else sentence.find(holder)
    op["Source"] = [[], []] if begin == -1 else [[holder], [f"{begin}:{begin + len(holder)}"]]
    for key, text in (("Target", target), ("Polar_expression", expression)):
      op[key] = [[], []]
      for part in text.split("AND"):
        part = part.strip()
        begin = sentence.find(part)
        if begin != -1:
          op[key][0].append(part)
          op[key][1].append(f"{begin}:{begin + len(part)}")
    op["Polarity"] = sentiment.capitalize() if isinstance(sentiment, str) else str(sentiment)
    opinions.append(op)
  return opinions


def opinions_to_graphs(sentence: str, opinions: Sequence[Mapping[str, Any]]) -> list[_Graph]:
  """Official `convert_opinion_to_tuple`: opinions -> (holder, target, exp, polarity) id sets."""
  tokens = space_token_spans(sentence)
  return [(char_offsets_to_token_ids(o["Source"][1], tokens),
           char_offsets_to_token_ids(o["Target"][1], tokens),
           char_offsets_to_token_ids(o["Polar_expression"][1], tokens),
           o["Polarity"]) for o in opinions]


def _word_graphs(tuples: Sequence[Sequence[Any]], is_gold: bool) -> list[_Graph]:
  """Sentence-free fallback: each field -> its set of whitespace words ('NULL' -> empty)."""
  if any(len(t) != 4 for t in tuples):
    return []
  out = []
  for t in tuples:
    if is_gold and tuple(t) == ("NULL", "NULL", "NULL", "NULL"):
      continue
    fields = []
    for f in t[:3]:
      words = [] if (not isinstance(f, str) or f == "NULL") else [
          w for part in f.split(" AND ") for w in part.split()]
      fields.append(frozenset(words))
    pol = t[3].capitalize() if isinstance(t[3], str) else str(t[3])
    out.append((fields[0], fields[1], fields[2], pol))
  return out


def _fill(s: frozenset) -> frozenset:
  return s if len(s) else frozenset(["_"])


def _matches(t1: _Graph, t2: _Graph) -> bool:
  return bool(_fill(t1[0]) & _fill(t2[0]) and _fill(t1[1]) & _fill(t2[1]) and t1[2] & t2[2])


def _in_list(t: _Graph, others: Sequence[_Graph]) -> bool:
  """Official `sent_tuples_in_list` with keep_polarity=True."""
  return any(_matches(t, o) and t[3] == o[3] for o in others)


def _weighted(t: _Graph, others: Sequence[_Graph]) -> float:
  """Official `weighted_score`: best mean span overlap, normalised by `t` (polarity ignored)."""
  h1, t1, e1 = _fill(t[0]), _fill(t[1]), t[2]
  best = 0.0
  for o in others:
    h2, t2, e2 = _fill(o[0]), _fill(o[1]), o[2]
    if h2 & h1 and t2 & t1 and e2 & e1:
      overlap = (len(h2 & h1) / len(h1) + len(t2 & t1) / len(t1) + len(e2 & e1) / len(e1)) / 3
      best = max(best, overlap)
  return best


def graph_prf(gold_graphs: Sequence[Sequence[_Graph]],
              pred_graphs: Sequence[Sequence[_Graph]]) -> tuple[float, float, float]:
  """Official weighted `tuple_f1` on per-sentence graph tuples: (precision, recall, F1)."""
  if len(gold_graphs) != len(pred_graphs):
    raise ValueError(f"sentiment-graph F1: {len(gold_graphs)} gold sentences vs "
                     f"{len(pred_graphs)} predicted")
  w_p = n_p = w_r = n_r = 0.0
  for gold, pred in zip(gold_graphs, pred_graphs):
    for t in pred:
      n_p += 1
      if _in_list(t, gold):
        w_p += _weighted(t, gold)
    for t in gold:
      n_r += 1
      if _in_list(t, pred):
        w_r += _weighted(t, pred)
  precision = w_p / (n_p + _EPS_PR)
  recall = w_r / (n_r + _EPS_PR)
  return precision, recall, 2 * (precision * recall) / (precision + recall + _EPS_F1)


def _graphs(lists: Sequence[Sequence[Sequence[Any]]], sentences: Sequence[str] | None,
            is_gold: bool) -> Iterator[list[_Graph]]:
  for i, tuples in enumerate(lists):
    if sentences is None:
      yield _word_graphs(tuples, is_gold)
      continue
    if is_gold:  # a gold no-opinion sentence has no opinions in the source data
      tuples = [t for t in tuples if tuple(t) != ("NULL", "NULL", "NULL", "NULL")]
    yield opinions_to_graphs(sentences[i], opinions_from_strings(sentences[i], tuples))


def sentiment_graph_f1(gold_lists: Sequence[Sequence[Sequence[Any]]],
                       pred_lists: Sequence[Sequence[Sequence[Any]]],
                       sentences: Sequence[str] | None = None,
                       gold_opinions: Sequence[Sequence[Mapping[str, Any]]] | None = None
                       ) -> float:
  """Weighted sentiment-graph F1 (SemEval-2022 task 10) on (holder, target, exp, pol) strings.

  Args:
    gold_lists: gold string tuples per sentence (a ('NULL',)*4 gold tuple means no opinion).
    pred_lists: predicted string tuples per sentence (from `parse_tuples`).
    sentences: the input sentences. With them, strings are located in the sentence and
      compared as space-token index sets exactly as the official harness does; without them,
      fields are compared as sets of whitespace words (an approximation).
    gold_opinions: the raw gold `opinions` (char offsets) per sentence; needs `sentences`.
      Official gold comes from these offsets; without them gold strings are located with
      `find` like predictions (differs only when a gold span is not the first occurrence).

  Returns:
    F1 in [0, 1].
  """
  if len(gold_lists) != len(pred_lists):
    raise ValueError(f"sentiment-graph F1: {len(gold_lists)} gold sentences vs "
                     f"{len(pred_lists)} predicted")
  if sentences is not None and len(sentences) != len(pred_lists):
    raise ValueError(f"sentiment-graph F1: {len(sentences)} sentences vs "
                     f"{len(pred_lists)} predictions")
  if gold_opinions is not None:
    if sentences is None:
      raise ValueError("sentiment-graph F1: gold_opinions needs sentences")
    gold = [opinions_to_graphs(s, ops) for s, ops in zip(sentences, gold_opinions)]
  else:
    gold = list(_graphs(gold_lists, sentences, True))
  pred = list(_graphs(pred_lists, sentences, False))
  return graph_prf(gold, pred)[2]


# --------------------------------------------------------------------------- dispatch


METRICS = ("macro_f1", "micro_f1", "graph_f1")


def metric_of(name: str) -> str:
  """The metric of a SentiBench dataset (ValueError for other names)."""
  if name in CLASSIFICATION:
    return "macro_f1"
  if name in TUPLE_MICRO:
    return "micro_f1"
  if name == OPENER:
    return "graph_f1"
  raise ValueError(f"unknown SentiBench dataset {name!r}; for another task pass metric= "
                   f"(one of {', '.join(METRICS)}; sentijax.data.tasks.TaskSpec.metric)")


def score_dataset(name: str, golds: Sequence[Any], preds: Sequence[Any], *,
                  sentences: Sequence[str] | None = None,
                  gold_opinions: Sequence[Sequence[Mapping[str, Any]]] | None = None,
                  metric: str | None = None) -> float:
  """The SentiBench score (x100) of one dataset run, or of any registered task given `metric`.

  Args:
    name: dataset name, e.g. 'sc/sst2' or 'absa/opener' (any name when `metric` is given).
    metric: 'macro_f1' | 'micro_f1' | 'graph_f1'; None = the SentiBench dataset's.
    golds: gold labels (strings) or gold tuple lists, one per test item.
    preds: predicted labels or tuple lists, same length.
    sentences, gold_opinions: opener only, see `sentiment_graph_f1` (pass both -- from
      `Example.sentence` and `Example.raw['opinions']` -- for the exact official score).
  """
  metric = metric_of(name) if metric is None else metric
  if metric not in METRICS:
    raise ValueError(f"{name}: unknown metric {metric!r}; known: {', '.join(METRICS)}")
  if len(golds) != len(preds):
    raise ValueError(f"{name}: {len(golds)} gold items vs {len(preds)} predictions")
  if metric == "macro_f1":
    return 100.0 * macro_f1([str(g).lower() for g in golds], list(preds))
  if metric == "micro_f1":
    return 100.0 * micro_f1_tuples(golds, preds)
  return 100.0 * sentiment_graph_f1(golds, preds, sentences, gold_opinions)
