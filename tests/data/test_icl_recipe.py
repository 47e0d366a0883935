"""The ICL data recipe (icl_recipe.py): tasks -> held-out filter (families, every task dir, the
SentiBench directory the leak check needs) -> gold records without a forbidden sentence; bad
settings named."""
import importlib.util
import pathlib

import pytest

from sentijax.data import icl, icl_recipe, tasks

_CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "icldist.py"
_loader = importlib.util.spec_from_file_location("icldist_config", _CONFIG)
icldist_config = importlib.util.module_from_spec(_loader)
_loader.loader.exec_module(icldist_config)


def _chars(prompt: str, answer: str) -> int:
  """A stand-in token count (~4 characters per token) for tests without a tokenizer."""
  return (len(prompt) + len(answer)) // 4 + 2


def _spec(**icl_overrides):
  c = icldist_config.get_config()
  c.icl.update(icl_overrides)
  return c


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
  strict = icl_recipe.RecipeSpec(**{**strict.__dict__,
                                    "sentibench_dir": str(shared_dir / "sentibench")})
  src, _, groups = icl_recipe.resolve_tasks(strict)
  with pytest.raises(icl.LeakError, match=r"task '\w+/\w+': '.+' \(a sentence of held-out/test "
                                          r"data of .*absa/"):
    icl_recipe.gold_records(strict, src, icl.forbidden_sentences(groups), _chars, 512)


def test_bad_recipe_settings_name_the_key():
  with pytest.raises(ValueError, match="icl.target='logits'"):
    icl_recipe.RecipeSpec.from_config(_spec(target="logits"))
  with pytest.raises(ValueError, match="icl.teacher_corpus=''.*teacher_probs"):
    icl_recipe.RecipeSpec.from_config(_spec(target="teacher_probs"))
  with pytest.raises(tasks.TaskError, match="unknown task 'sc/nope'"):
    icl_recipe.resolve_tasks(icl_recipe.RecipeSpec.from_config(_spec(tasks="sc/nope",
                                                                     heldout="")))


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
