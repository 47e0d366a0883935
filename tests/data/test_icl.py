"""ICL prompt builder: held-out filter and leak check, determinism, k shrinking, relabelling."""
import collections
import importlib.util
import pathlib
import re

import pytest

from sentijax.data import icl, icl_recipe, sentibench, tasks

_CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "icldist.py"
_loader = importlib.util.spec_from_file_location("icldist_config", _CONFIG)
icldist_config = importlib.util.module_from_spec(_loader)
_loader.loader.exec_module(icldist_config)
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


def _spec(**icl_overrides):
  c = icldist_config.get_config()
  c.icl.update(icl_overrides)
  return c


# ---------------------------------------------------------------------------------------------


def test_no_heldout_sentence_in_any_training_prompt(shared_dir):
  """The real setting: SentiBench train splits of the other tasks + icl_sources, 3 held out."""
  c = _spec(task_dirs=f"{shared_dir / 'sentibench'},{shared_dir / 'icl_sources'}",
            heldout="sc/sst2,multifaced/irony18,absa/atsa_rest16", num_prompts=3000,
            val_prompts=200)
  c.eval.data_dir = str(shared_dir / "sentibench")
  spec = icl_recipe.RecipeSpec.from_config(c)
  sources, heldout, groups = icl_recipe.resolve_tasks(spec)
  assert {t.name for t in heldout} == {"sc/sst2", "multifaced/irony18", "absa/atsa_rest16"}
  assert not {t.name for t in sources} & {t.name for t in heldout}
  forbidden = icl.forbidden_sentences(groups)
  train, val, stats = icl_recipe.gold_records(spec, sources, forbidden, _chars, 512)
  # The filter had work to do: sources share sentences with SentiBench test sets (rest14,
  # opener, imdb ...) and acsa_rest16 is atsa_rest16's sentences, so it is skipped whole.
  # asqp_rest16 holds PTB-tokenised copies of atsa_rest16 sentences (1,262 of 1,264; STACK.md)
  # and atsa/rest14 (SemEval-2014) shares ~900 sentences with it: all dropped.
  drops = stats["dropped_leaks"]
  assert drops["absa/asqp_rest16"] >= 1250 and drops["atsa/rest14"] >= 900, drops
  assert drops["absa/opener"] and stats["found_in"]["absa/asqp_rest16"]["absa/atsa_rest16"] >= 1250
  assert stats["skipped_tasks"] == ["absa/acsa_rest16"]
  assert len(train) == 3000 and len(val) == 200
  # Read the sentences back from the prompt TEXTS (not the builder's bookkeeping).
  seen = [s for r in train + val for s in icl.prompt_sentences(r.prompt)]
  assert len(seen) > 3200
  leaked = [s for s in seen if s in forbidden]
  assert not leaked, leaked[:3]
  # The same without the identity: the asqp_rest16 train sentences are (but 2) PTB copies of a
  # held-out task's sentences, so at most 2 of them may be in a prompt, character for character.
  asqp = {ex.sentence for ex in tasks.load_examples(
      next(t for t in sources if t.name == "absa/asqp_rest16"), "train")}
  assert len(asqp & set(seen)) <= 2
  assert {r.meta["task"] for r in train} == {t.name for t in sources} - {"absa/acsa_rest16"}
  # Without dropping, the build fails naming the task and the sentence.
  strict = icl_recipe.RecipeSpec.from_config(_spec(
      task_dirs=str(shared_dir / "icl_sources"), heldout="", drop_leaks=False))
  strict = icl_recipe.RecipeSpec(**{**strict.__dict__, "sentibench_dir": str(shared_dir / "sentibench")})
  src, _, groups = icl_recipe.resolve_tasks(strict)
  with pytest.raises(icl.LeakError, match=r"task '\w+/\w+': '.+' \(a sentence of held-out/test "
                                          r"data of .*absa/"):
    icl_recipe.gold_records(strict, src, icl.forbidden_sentences(groups), _chars, 512)


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
  with pytest.raises(ValueError, match="icl.target='logits'"):
    icl_recipe.RecipeSpec.from_config(_spec(target="logits"))
  with pytest.raises(ValueError, match="icl.teacher_corpus=''.*teacher_probs"):
    icl_recipe.RecipeSpec.from_config(_spec(target="teacher_probs"))
  with pytest.raises(tasks.TaskError, match="unknown task 'sc/nope'"):
    icl_recipe.resolve_tasks(icl_recipe.RecipeSpec.from_config(_spec(tasks="sc/nope", heldout="")))


# ---------------------------------------------------------------------------------------------
# Held-out families and the SentiBench directory the leak check needs.


def _resolve(data_dir=None, **icl_overrides):
  c = _spec(**icl_overrides)
  c.eval.data_dir = data_dir or c.eval.data_dir
  return icl_recipe.resolve_tasks(icl_recipe.RecipeSpec.from_config(c))


def test_heldout_families_remove_every_matching_task(tmp_path):
  demo = {"leak_check": "off", "tasks": "all", "data_dir": str(tmp_path / "no-sentibench")}
  cases = {"sc/*": {"sc/movies", "sc/products", "sc/restaurants"},
           "layout:atsa": {"atsa/cafe"},
           "layout:classification": {"sc/movies", "sc/products", "sc/restaurants",
                                     "emotion/chat"}}
  all_tasks = {"sc/movies", "sc/products", "sc/restaurants", "emotion/chat", "atsa/cafe"}
  for heldout, want in cases.items():
    sources, held, groups = _resolve(heldout=heldout, **demo)
    assert {t.name for t in held} == want, heldout
    assert {t.name for t in sources} == all_tasks - want, heldout
    assert set(groups) == want  # leak_check off: only the held-out tasks' sentences
    n = sum(len(tasks.load_examples(t, s)) for t in held for s in t.splits)
    assert sum(map(len, groups.values())) == n  # every split of every match
  with pytest.raises(ValueError, match="no source tasks left"):
    _resolve(heldout="layout:classification,atsa/cafe", **demo)
  with pytest.raises(tasks.TaskError, match="unknown layout 'nope'"):
    _resolve(heldout="layout:nope", **demo)
  with pytest.raises(tasks.TaskError, match=r"icl.heldout entry 'xx/\*' matches no task; "
                                            r"registered: .*sc/movies"):
    _resolve(heldout="xx/*", **demo)


def test_heldout_task_type_spans_every_task_dir(shared_dir):
  """'layout:atsa' holds out every ATSA task: SentiBench's and icl_sources' alike; 'atsa/*' is a
  glob on names (icl_sources' atsa/ dir only)."""
  dirs = f"{shared_dir / 'sentibench'},{shared_dir / 'icl_sources'}"
  base = {"task_dirs": dirs, "data_dir": str(shared_dir / "sentibench")}
  sources, held, groups = _resolve(heldout="layout:atsa", **base)
  want = {"absa/atsa_rest16", "atsa/laptop14", "atsa/rest14"}
  assert {t.name for t in held} == want and not want & {t.name for t in sources}
  assert {"absa/asqp_rest16", "acsa/laptop16", "sc/sst2"} <= {t.name for t in sources}
  rest14 = next(t for t in held if t.name == "atsa/rest14")
  assert len(groups["atsa/rest14"]) == sum(len(tasks.load_examples(rest14, s))
                                           for s in ("train", "dev", "test"))
  assert len(groups["sc/sst2"]) == len(tasks.load_examples(
      next(t for t in sources if t.name == "sc/sst2"), "test"))  # SentiBench test split
  _, held, _ = _resolve(heldout="atsa/*", **base)
  assert {t.name for t in held} == {"atsa/laptop14", "atsa/rest14"}


def test_missing_sentibench_dir_stops_unless_leak_check_is_off(tmp_path, caplog):
  nowhere = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError, match=r"eval.data_dir='.*nowhere'.*not found.*--config"
                                              r".eval.data_dir.*--config.icl.leak_check=off"):
    _resolve(heldout="sc/movies", data_dir=str(nowhere))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="holds no SentiBench dataset"):
    _resolve(heldout="sc/movies", data_dir=str(tmp_path / "empty"))
  with pytest.raises(ValueError, match="icl.leak_check='maybe'"):
    _resolve(heldout="sc/movies", leak_check="maybe")
  caplog.set_level("INFO", logger="sentijax")
  sources, held, groups = _resolve(heldout="sc/movies,sc/sst2", data_dir=str(nowhere),
                                   leak_check="off")
  assert "icl.leak_check=off: SentiBench test sentences are NOT kept out" in caplog.text
  assert "held-out task sc/sst2 not scored" in caplog.text
  assert [t.name for t in held] == ["sc/movies"] and set(groups) == {"sc/movies"}
