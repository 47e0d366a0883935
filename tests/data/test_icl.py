"""ICL prompt builder (icl.py): leak check, determinism, k shrinking, relabelling, balance."""
import collections
import re

import pytest

from sentijax.data import icl, icl_recipe, sentibench, tasks

FMT = sentibench.load_templates(None)["prompt_format"]


def _chars(prompt: str, answer: str) -> int:
  """A stand-in token count (~4 characters per token) for tests without a tokenizer."""
  return (len(prompt) + len(answer)) // 4 + 2


def _demo_sources(names=("sc/restaurants", "sc/products", "emotion/chat", "atsa/cafe")):
  reg = tasks.discover(str(icl_recipe.DEMO_TASKS))
  out = []
  for n in names:
    pool = tasks.load_examples(reg.get(n), "train")
    out.append((reg.get(n), pool, range(len(pool))))
  return out


# ---------------------------------------------------------------------------------------------


def test_check_no_leaks_names_task_and_sentence():
  forbidden = icl.forbidden_sentences({"sc/sst2": ["A  Fine  Film ."]})
  icl.check_no_leaks([("t", "Sentence: another film", ["another film"])], forbidden)
  with pytest.raises(icl.LeakError, match=r"task 't': 'A  Fine  Film \.'.*sc/sst2"):
    icl.check_no_leaks([("t", "x", ["ok", "a fine film."])], forbidden)
  text = "Inst\n\nSentence: one\ntwo\nLabel: x\n\nSentence: three\nLabel:"
  assert icl.prompt_sentences(text) == ["one\ntwo", "three"]


def test_deterministic_per_seed_and_varied_across_seeds():
  srcs = _demo_sources()
  a, _ = icl.build_prompts(srcs, 300, icl.Options(seed=1), _chars, 400, FMT)
  b, _ = icl.build_prompts(srcs, 300, icl.Options(seed=1), _chars, 400, FMT)
  c, _ = icl.build_prompts(srcs, 300, icl.Options(seed=2), _chars, 400, FMT)
  assert [p.text for p in a] == [p.text for p in b]
  assert [p.answer for p in a] == [p.answer for p in b]
  assert sum(p.text != q.text for p, q in zip(a, c)) > 250
  for attr in ("k", "instruction", "demos", "query"):
    assert [getattr(p, attr) for p in a] != [getattr(p, attr) for p in c], attr
  # Every k in 0-8 and every instruction choice of a kind is used.
  assert {p.k for p in a} == set(range(9))
  polarity = {p.instruction for p in a if p.task == "sc/restaurants"}
  assert polarity == set(range(-1, len(icl.PARAPHRASES["polarity"])))


def test_k_shrinks_to_fit_and_nothing_is_cut():
  srcs = _demo_sources()
  pools = {s.name: (s, pool) for s, pool, _ in srcs}
  max_tokens = 70  # ~280 characters: 8 demos never fit, 0-2 usually do
  prompts, stats = icl.build_prompts(srcs, 200, icl.Options(seed=3, shots=(8, 8)), _chars,
                                     max_tokens, FMT)
  assert stats["shrunk"] == 200 - stats["k_hist"].get("8", 0) and stats["shrunk"] > 150
  for p in prompts:
    assert _chars(p.text, p.answer) <= max_tokens
    spec, pool = pools[p.task]
    # Rebuild the demos and the query from the recorded indices: the text is exactly
    # instruction, "", whole demos, query -- nothing cut.
    inv = {} if not p.label_map else p.label_map
    blocks = []
    for i in p.demos:
      ex = pool[i]
      label = (inv.get(ex.gold, ex.gold) if spec.kind == "classification" else
               sentibench.label_string([t[:-1] + (inv.get(t[-1], t[-1]),) for t in ex.gold]))
      blocks.append(FMT["demo"].format(sentence=ex.sentence, label=label))
    query = FMT["query"].format(sentence=pool[p.query].sentence)
    instruction = p.text.split("\n\n", 1)[0]
    assert p.text == FMT["join"].join([instruction, "", *blocks, query])
    if p.instruction == -1:
      assert instruction == spec.instruction
    else:
      assert "{" not in instruction and len(instruction) > 40


def test_relabelled_demos_match_the_answer_and_demos_exclude_the_query():
  srcs = _demo_sources()
  pools = {s.name: (s, pool) for s, pool, _ in srcs}
  prompts, stats = icl.build_prompts(srcs, 400, icl.Options(seed=5, rename_prob=0.6), _chars,
                                     600, FMT)
  assert 180 < stats["renamed"] < 300
  renamed = [p for p in prompts if p.label_map]
  for p in prompts:
    spec, pool = pools[p.task]
    assert p.query not in p.demos
    assert pool[p.query].sentence not in icl.forbidden_sentences(
        {"demos": [pool[i].sentence for i in p.demos]})
    shown = re.findall(r"\nLabel: (.*)\n", p.text)
    assert len(shown) == p.k
    m = p.label_map
    for i, label in zip(p.demos, shown):
      gold = pool[i].gold
      if spec.kind == "classification":
        assert label == m.get(gold, gold)
      else:
        assert label == sentibench.label_string([t[:-1] + (m.get(t[-1], t[-1]),) for t in gold])
    gold = pool[p.query].gold
    if spec.kind == "classification":
      assert p.answer == " " + m.get(gold, gold)
      if m:  # the instruction lists exactly the shown labels, never the original ones
        listed = set(re.findall(r"\w[\w-]*", p.text.split("\n\n", 1)[0]))
        assert set(m.values()) <= listed
        assert not (set(m) - set(m.values())) & listed
    else:
      assert p.answer == " " + sentibench.label_string(
          [t[:-1] + (m.get(t[-1], t[-1]),) for t in gold])
  assert {p.task for p in renamed} == set(pools)
  arbitrary = [p for p in renamed if set(p.label_map.values()) <= set(icl.ARBITRARY)]
  assert 0 < len(arbitrary) < len(renamed)  # both synonym and arbitrary renaming happen


def test_queries_are_balanced_over_classes():
  srcs = _demo_sources(("sc/products",))
  pool = srcs[0][1]
  # Make the pool unbalanced: 3/4 of the negatives dropped.
  neg = [i for i, ex in enumerate(pool) if ex.gold == "negative"]
  keep = [ex for i, ex in enumerate(pool) if ex.gold != "negative" or i in neg[:len(neg) // 4]]
  srcs = [(srcs[0][0], keep, range(len(keep)))]
  prompts, _ = icl.build_prompts(srcs, 600, icl.Options(seed=0, rename_prob=0.0), _chars, 400,
                                 FMT)
  counts = collections.Counter(keep[p.query].gold for p in prompts)
  # 600 draws of 3 equally likely classes: each count ~ Binomial(600, 1/3), sd ~11.5; +-50 is
  # > 4 sd, while unbalanced sampling would give negatives ~1/9 of the pool (~67).
  assert all(abs(n - 200) < 50 for n in counts.values()), counts
  unbalanced, _ = icl.build_prompts(srcs, 600, icl.Options(seed=0, balance=False), _chars, 400,
                                    FMT)
  assert collections.Counter(keep[p.query].gold for p in unbalanced)["negative"] < 120


def test_bad_options():
  assert icl.parse_shots("0-8") == (0, 8) and icl.parse_shots(4) == (4, 4)
  for bad in ("8-0", "x", "-1"):
    with pytest.raises(ValueError, match="icl.shots"):
      icl.parse_shots(bad)
  with pytest.raises(ValueError, match="icl.rename_prob"):
    icl.Options(rename_prob=1.5)
  srcs = _demo_sources(("sc/restaurants",))
  with pytest.raises(ValueError, match="prompts fit data.seq_len=4"):
    icl.build_prompts(srcs, 10, icl.Options(), _chars, 5, FMT)
