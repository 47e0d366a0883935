"""ICL prompt builder: few-shot task prompts of the SentiBench shape for ICLDist.

A prompt is the SentiBench layout (instruction, empty line, k demos, query; `sentibench` prompt
format) built from a source task's train split, with the diversity that keeps a student reading
the demos instead of learning label priors:
  * k drawn uniformly from `shots` (e.g. 0-8), then shrunk until the whole sequence (bos, prompt,
    answer, eos) fits `seq_len` tokens. Demos are dropped from the end; the instruction and the
    demos kept are never cut. A query too long even with k = 0 is skipped (counted).
  * the instruction: the task's own, or one of several paraphrases per task kind written here.
  * verbalizers renamed with probability `rename_prob` (synonyms such as positive -> good, or
    arbitrary words such as positive -> river), every demo and the answer relabelled with the same
    map; the label list in the instruction shuffled (`shuffle_labels`).
  * queries balanced over classes (`balance`); demos never include the query (nor its sentence).
  * deterministic per seed: one `random.Random(seed)` drives every draw, in a fixed order.

The answer (the training target for `gold`) is what a SentiBench demo writes after `Label:`, with
its leading space: ' positive', " [('food', 'positive')]", " against(opinion towards 'X')".

Held-out sentences: `forbidden_sentences` indexes the sentences that must never reach a training
prompt (SentiBench test splits, every split of a held-out task) by their identity
(`identity.sentence_key`: tokenisation, case, unicode and escaping variants are one sentence);
`drop_forbidden` removes source examples that are, or contain, one of them (counted per task it
belongs to), and `check_no_leaks` searches every built prompt's text and raises `LeakError`
naming task and sentence.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from sentijax.data import identity, sentibench
from sentijax.data.tasks import TaskSpec

POLARITY_LABELS = frozenset({"positive", "negative", "neutral", "conflict"})
# Label synonyms for semantic renaming; other labels (and half of the renamings) get words from
# ARBITRARY, which carry no sentiment, so only the demos tell what they mean.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "positive": ("good", "great", "favourable", "pos"),
    "negative": ("bad", "poor", "unfavourable", "neg"),
    "neutral": ("okay", "mixed", "neither", "neu"),
    "conflict": ("conflicted", "both", "torn", "con"),
}
ARBITRARY: tuple[str, ...] = ("apple", "river", "blue", "seven", "north", "silver", "tiger",
                              "paper", "cloud", "stone", "maple", "violet", "ocean", "candle")

# Instruction paraphrases per task kind. Placeholders: {labels} (the label list, renamed and
# shuffled), {polarities} (extraction polarity words), {target} (stance target).
PARAPHRASES: dict[str, tuple[str, ...]] = {
    "polarity": (
        "Decide the sentiment of the text below. Answer with one of: {labels}.",
        "What is the overall opinion expressed in this text? Choose from {labels}.",
        "Classify the sentiment of each sentence. Possible labels: {labels}.",
        "Label the text with its polarity, using exactly one of these words: {labels}.",
        "Here are sentences with their sentiment labels ({labels}). Label the last one the "
        "same way.",
    ),
    "classification": (
        "Classify the text below. Answer with one of: {labels}.",
        "Which label fits the text best? Choose from {labels}.",
        "Assign each sentence one of the following labels: {labels}.",
        "Read the examples, then label the last sentence with exactly one of: {labels}.",
        "Categorise the text. The possible categories are {labels}.",
    ),
    "stance": (
        "What is the author's stance towards {target}? Answer with one of: {labels}.",
        "Decide whether the text is {labels} with respect to {target}.",
        "Label the attitude of each text towards {target}, using one of: {labels}.",
        "Read the examples, then give the stance of the last text towards {target} ({labels}).",
    ),
    "atsa": (
        "Find every aspect term in the sentence and its sentiment ({polarities}). Answer with a "
        "Python list of (aspect term, polarity) tuples, or [] if there is none.",
        "Extract the (aspect, sentiment) pairs from the review sentence; sentiment is one of "
        "{polarities}. Reply with a Python list of tuples.",
        "List the opinion targets mentioned in the text with the polarity towards each "
        "({polarities}) as a Python list of tuples.",
        "Which aspects does the sentence talk about, and how does it feel about each? Write a "
        "list of (aspect, polarity) tuples; polarity is one of {polarities}.",
    ),
    "acsa": (
        "Name the aspect categories the sentence discusses and the sentiment ({polarities}) "
        "towards each, as a Python list of (category, polarity) tuples.",
        "Extract (aspect category, sentiment) pairs from the review sentence; sentiment is one "
        "of {polarities}. Reply with a Python list of tuples.",
        "Which categories of the product or service are judged in this sentence, and how? "
        "Answer with a list of (category, polarity) tuples, polarity in {polarities}.",
    ),
    "asqp": (
        "Extract every sentiment quadruple (aspect category, aspect term, opinion term, "
        "polarity) from the sentence, polarity in {polarities}, as a Python list of tuples.",
        "List the (category, aspect, opinion, sentiment) tuples expressed in the review "
        "sentence; sentiment is one of {polarities}. Write 'NULL' for an implicit aspect.",
        "For each opinion in the sentence give (aspect category, aspect term, opinion words, "
        "polarity) with polarity in {polarities}. Reply with a Python list of tuples.",
    ),
    "opener": (
        "Extract the opinions in the sentence as (holder, target, expression, polarity) tuples, "
        "polarity in {polarities}; 'NULL' for a missing holder or target.",
        "List who expresses which opinion about what: (holder, target, polar expression, "
        "polarity) tuples with polarity in {polarities}, as a Python list.",
        "Write the structured sentiment of the sentence as a Python list of (holder, target, "
        "expression, polarity) tuples; polarity is one of {polarities}.",
    ),
}
_POLARITY_POS = {"atsa": -1, "acsa": -1, "asqp": -1, "opener": -1}
_PROMPT_SENTENCE = re.compile(r"Sentence: (.*?)\nLabel:", re.DOTALL)


class LeakError(ValueError):
  """A held-out sentence is in a training prompt; names the task and the sentence."""


@dataclasses.dataclass(frozen=True)
class Options:
  """How prompts are built (see the module doc)."""
  shots: tuple[int, int] = (0, 8)
  rename_prob: float = 0.5
  shuffle_labels: bool = True
  paraphrase: bool = True
  balance: bool = True
  seed: int = 0

  def __post_init__(self):
    lo, hi = self.shots
    if not 0 <= lo <= hi:
      raise ValueError(f"icl.shots={self.shots}: expected 0 <= min <= max")
    if not 0.0 <= self.rename_prob <= 1.0:
      raise ValueError(f"icl.rename_prob={self.rename_prob}: expected a value in [0, 1]")


def parse_shots(shots: str | int) -> tuple[int, int]:
  """'0-8' -> (0, 8); '4' or 4 -> (4, 4)."""
  text = str(shots).strip()
  try:
    lo, _, hi = text.partition("-")
    pair = (int(lo), int(hi or lo))
  except ValueError:
    raise ValueError(f"icl.shots={shots!r}: expected 'K' or 'MIN-MAX', e.g. '0-8'") from None
  if not 0 <= pair[0] <= pair[1]:
    raise ValueError(f"icl.shots={shots!r}: expected 0 <= MIN <= MAX")
  return pair


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One built training prompt."""
  task: str
  text: str
  answer: str  # with its leading space
  k: int
  instruction: int  # -1 = the task's own instruction, else the paraphrase index
  label_map: Mapping[str, str]  # original -> shown label; {} when not renamed
  query: int  # index of the query in the task's pool
  demos: tuple[int, ...]
  sentences: tuple[str, ...]  # demo sentences then the query sentence
  pieces: tuple[str, ...] = ()  # what `text` joins: instruction, "", the k demos, the query

  def meta(self) -> dict:
    return {"task": self.task, "k": self.k, "instruction": self.instruction,
            "label_map": dict(self.label_map), "query": self.query}


def task_kind(spec: TaskSpec) -> str:
  """Paraphrase family: polarity | classification | stance | atsa | acsa | asqp | opener."""
  if spec.layout == "pstance":
    return "stance"
  if spec.layout == "classification":
    return "polarity" if set(spec.labels) <= POLARITY_LABELS else "classification"
  return spec.layout


def _relabel(example: sentibench.Example, spec: TaskSpec, label_map: Mapping[str, str]) -> str:
  """The example's label text under `label_map` (SentiBench demo form)."""
  if spec.kind == "classification":
    return label_map.get(example.gold, example.gold)
  pos = _POLARITY_POS[spec.layout]
  tuples = []
  for t in example.gold:
    t = list(t)
    t[pos] = label_map.get(t[pos], t[pos])
    tuples.append(tuple(t))
  return sentibench.label_string(tuples)


def _polarities(pool: Sequence[sentibench.Example], spec: TaskSpec) -> list[str]:
  pos = _POLARITY_POS[spec.layout]
  seen = {t[pos] for ex in pool for t in ex.gold if t and isinstance(t[pos], str)}
  return sorted(seen) or ["positive", "negative", "neutral"]


@dataclasses.dataclass
class _Source:
  spec: TaskSpec
  pool: list[sentibench.Example]  # demo pool
  queries: list[int]  # indices into pool usable as queries
  by_label: dict[str, list[int]]
  label_set: list[str]  # classification labels, or the polarity words of extraction tasks


def _source(spec: TaskSpec, pool: Sequence[sentibench.Example], queries: Sequence[int]
            ) -> _Source:
  pool = list(pool)
  if spec.kind == "classification":
    label_set = list(spec.labels)
    by_label: dict[str, list[int]] = {}
    for i in queries:
      by_label.setdefault(pool[i].gold, []).append(i)
  else:
    label_set, by_label = _polarities(pool, spec), {}
  return _Source(spec, pool, list(queries), by_label, label_set)


def _label_map(rng: random.Random, labels: Sequence[str], rename_prob: float) -> dict[str, str]:
  if not labels or rng.random() >= rename_prob:
    return {}
  if rng.random() < 0.5 and all(label in SYNONYMS for label in labels):
    shown = [SYNONYMS[label][rng.randrange(len(SYNONYMS[label]))] for label in labels]
    if len(set(shown)) == len(shown):
      return dict(zip(labels, shown))
  return dict(zip(labels, rng.sample(ARBITRARY, len(labels))))


def _instruction(rng: random.Random, src: _Source, opts: Options, label_map: Mapping[str, str],
                 target: str | None) -> tuple[int, str]:
  """(-1 | paraphrase index, text). Renamed labels always use a paraphrase (the task's own
  instruction names the original labels)."""
  spec = src.spec
  choices = list(range(len(PARAPHRASES[task_kind(spec)]))) if opts.paraphrase or label_map else []
  if not label_map:
    choices = [-1] + choices
  idx = choices[rng.randrange(len(choices))]
  shown = [label_map.get(x, x) for x in src.label_set]
  if opts.shuffle_labels:
    rng.shuffle(shown)
  if idx == -1:
    text = spec.instruction
    if spec.layout == "pstance":
      text = text % target
    return idx, text
  template = PARAPHRASES[task_kind(spec)][idx]
  return idx, template.format(labels=", ".join(shown), polarities=", ".join(shown),
                              target=target)


def _format_demo(fmt: Mapping[str, str], spec: TaskSpec, ex: sentibench.Example, label: str
                 ) -> str:
  if spec.layout == "pstance":
    return fmt["pstance_demo"].format(sentence=ex.sentence, label=label, target=ex.target)
  return fmt["demo"].format(sentence=ex.sentence, label=label)


LengthFn = Callable[[str, str], int]  # (prompt, answer) -> tokens of the training sequence


def build_prompts(sources: Sequence[tuple[TaskSpec, Sequence[sentibench.Example],
                                          Sequence[int]]],
                  num_prompts: int, opts: Options, length_fn: LengthFn, max_tokens: int,
                  prompt_format: Mapping[str, str] | None = None) -> tuple[list[Prompt], dict]:
  """Builds `num_prompts` prompts spread uniformly over the source tasks.

  Args:
    sources: (task, demo pool, indices of the pool usable as queries) per task.
    num_prompts: prompts to build.
    opts: see `Options`.
    length_fn: tokens of the full training sequence (bos + prompt + answer + eos) of a prompt.
    max_tokens: the most tokens a sequence may have (data.seq_len + 1).
    prompt_format: the `prompt_format` of SentiBench templates (None = the package default).

  Returns:
    (prompts, stats) where stats counts k shrinks, skipped queries and prompts per task.
  """
  fmt = prompt_format or sentibench.load_templates(None)["prompt_format"]
  srcs = [_source(*s) for s in sources]
  for src in srcs:
    if not src.queries:
      raise ValueError(f"task {src.spec.name!r}: no examples left to use as queries")
  rng = random.Random(opts.seed)
  stats = {"shrunk": 0, "skipped_too_long": 0, "per_task": {s.spec.name: 0 for s in srcs},
           "renamed": 0, "k_hist": {}}
  prompts: list[Prompt] = []
  attempts = 0
  while len(prompts) < num_prompts:
    attempts += 1
    if attempts > 20 * num_prompts + 100:
      raise ValueError(f"only {len(prompts)} of {num_prompts} prompts fit data.seq_len="
                       f"{max_tokens - 1}; raise data.seq_len")
    src = srcs[rng.randrange(len(srcs))]
    spec = src.spec
    if opts.balance and src.by_label:
      label = sorted(src.by_label)[rng.randrange(len(src.by_label))]
      q = src.by_label[label][rng.randrange(len(src.by_label[label]))]
    else:
      q = src.queries[rng.randrange(len(src.queries))]
    query = src.pool[q]
    k = rng.randint(*opts.shots)
    q_key = identity.sentence_key(query.sentence) or query.sentence
    others = [i for i in rng.sample(range(len(src.pool)), min(len(src.pool), k + 8))
              if i != q and (identity.sentence_key(src.pool[i].sentence)
                             or src.pool[i].sentence) != q_key][:k]
    label_map = _label_map(rng, src.label_set, opts.rename_prob)
    idx, instruction = _instruction(rng, src, opts, label_map, query.target)
    demos = [_format_demo(fmt, spec, src.pool[i], _relabel(src.pool[i], spec, label_map))
             for i in others]
    answer = " " + _relabel(query, spec, label_map)
    if spec.layout == "pstance":
      answer += f"(opinion towards '{query.target}')"
    query_text = fmt["query"].format(sentence=query.sentence)
    drawn = len(demos)
    while True:
      text = fmt["join"].join([instruction, "", *demos, query_text])
      n_tokens = length_fn(text, answer)
      if n_tokens <= max_tokens or not demos:
        break
      demos.pop()
    if n_tokens > max_tokens:
      stats["skipped_too_long"] += 1
      continue
    stats["shrunk"] += int(len(demos) < drawn)
    used = others[:len(demos)]
    prompts.append(Prompt(spec.name, text, answer, len(used), idx, label_map, q, tuple(used),
                          tuple(src.pool[i].sentence for i in used) + (query.sentence,),
                          (instruction, "", *demos, query_text)))
    stats["per_task"][spec.name] += 1
    stats["renamed"] += int(bool(label_map))
    stats["k_hist"][len(used)] = stats["k_hist"].get(len(used), 0) + 1
  stats["k_hist"] = {str(k): v for k, v in sorted(stats["k_hist"].items())}
  return prompts, stats


def fewer_shots(prompt: Prompt, shots: int, join: str) -> tuple[str, tuple[str, ...]]:
  """(text, sentences) of `prompt` with only its first min(shots, k) demos: the same
  instruction, label map and query (context distillation's student prompt); `join` is the
  prompt format's."""
  if not prompt.pieces:
    raise ValueError(f"prompt of task {prompt.task!r} has no pieces (built before fewer_shots)")
  n = min(int(shots), prompt.k)
  return (join.join(prompt.pieces[:2 + n] + prompt.pieces[-1:]),
          prompt.sentences[:n] + prompt.sentences[-1:])


# --------------------------------------------------------------------------- held-out sentences


def forbidden_sentences(groups: Mapping[str, Iterable[str]]) -> identity.SentenceIndex:
  """The sentences of {task: sentences} indexed by identity, each with the tasks it belongs to."""
  return identity.SentenceIndex(groups)


def drop_forbidden(pool: Sequence[sentibench.Example], forbidden: identity.SentenceIndex
                   ) -> tuple[list[sentibench.Example], dict[str, int]]:
  """(examples whose sentence neither is nor contains a forbidden one, {forbidden task: examples
  of `pool` carrying one of its sentences}); dropped = len(pool) - len(kept)."""
  kept, found = [], {}
  for ex in pool:
    keys = forbidden.find(ex.sentence, (ex.sentence,))
    if not keys:
      kept.append(ex)
      continue
    for group in dict.fromkeys(g for k in keys for g in forbidden.groups_of[k]):
      found[group] = found.get(group, 0) + 1
  return kept, found


def prompt_sentences(text: str) -> list[str]:
  """The demo and query sentences of a prompt in the SentiBench layout."""
  return _PROMPT_SENTENCE.findall(text)


def check_no_leaks(items: Iterable[tuple[str, str, Sequence[str] | None]],
                   forbidden: identity.SentenceIndex) -> None:
  """Raises LeakError for the first (task, prompt text, its sentences) item holding a forbidden
  sentence: inside the text, or equal to one of the sentences (None: to any candidate sentence
  of the text, for prompts of any layout)."""
  for task, text, sentences in items:
    keys = forbidden.find(text, sentences)
    if keys:
      k = keys[0]
      raise LeakError(f"held-out sentence in a training prompt of task {task!r}: "
                      f"{forbidden.text_of[k]!r} (a sentence of held-out/test data of "
                      f"{', '.join(forbidden.groups_of[k])})")


def val_split(pool: Sequence[sentibench.Example], fraction: float, salt: str) -> list[bool]:
  """Per example: True = val query (hash of the sentence identity; stable, order-free)."""
  def unit(s: str) -> float:
    h = hashlib.sha256(f"{salt}:{identity.sentence_key(s) or s}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64
  return [unit(ex.sentence) < fraction for ex in pool]


def to_records(prompts: Sequence[Prompt], prefix: str) -> list[Any]:
  """KnowDist-format records (prompt, answer as response, meta naming the task)."""
  from sentijax.data.records import Record  # pylint: disable=import-outside-toplevel
  return [Record(id=f"{prefix}-{i}", prompt=p.text, response=p.answer, meta=p.meta())
          for i, p in enumerate(prompts)]
