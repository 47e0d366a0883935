"""SentiBench classification scoring: parity with an independent transformers reference."""
import json
import pathlib

import numpy as np
import pytest

import hf_fixtures
from sentijax import models, sharding
from sentijax.data import sentibench
from sentijax.eval import batching, generation, scorer, settings

torch = pytest.importorskip("torch")

DATASETS = ("sc/sst2", "multifaced/tweeteval")
N_ITEMS = 200


def reference_scores(model, tok, protocol: dict, name: str, texts: list[str]) -> np.ndarray:
  """The protocol in plain transformers: left pad with eos, last-position verbalizer logits."""
  verb_ids = [tok(v, add_special_tokens=False).input_ids[0]
              for v in protocol["classification"]["verbalizers"][name]]
  out = []
  for start in range(0, len(texts), 50):
    enc = [tok(t).input_ids for t in texts[start:start + 50]]
    width = max(map(len, enc))
    ids = torch.full((len(enc), width), tok.eos_token_id, dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for i, e in enumerate(enc):
      ids[i, width - len(e):] = torch.tensor(e)
      mask[i, width - len(e):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
      logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    out.append(logits[:, -1, verb_ids].float().numpy())
  return np.concatenate(out)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, sentibench_dir):
  root = tmp_path_factory.mktemp("scorer")
  tok, model, cfg, params = hf_fixtures.make_sentibench_model(sentibench_dir, root)
  protocol_path = sentibench_dir / "protocol.json"
  protocol = json.loads(protocol_path.read_text(encoding="utf-8-sig"))
  for name in DATASETS:
    ids = batching.verbalizer_token_ids(tok, protocol["classification"]["verbalizers"][name])
    assert len(set(ids)) == len(ids), f"{name}: verbalizer first tokens collide: {ids}"
  pred_dir = root / "predictions"
  spec = settings.ScoringSpec(str(sentibench_dir), (42,), max_examples=N_ITEMS, batch_size=16)
  session = scorer.Scorer(cfg, tok, spec=spec, templates=sentibench.load_templates(protocol_path))
  results = session.score(params, list(DATASETS), predictions_dir=pred_dir)
  return dict(root=root, tok=tok, model=model, cfg=cfg, params=params, protocol=protocol,
              protocol_path=protocol_path, results=results, pred_dir=pred_dir, session=session)


def _rows(pred_dir: pathlib.Path, name: str, seed: int) -> list[dict]:
  path = pred_dir / f"{name.replace('/', '_')}_{seed}.jsonl"
  return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _assert_scores_close(got_NxC, want_NxC) -> float:
  """fp32 logits of two implementations / shardings over ~500-token prompts: they differ by ~5e-6
  of the largest |logit| (~1 here); 1e-4 of it stays clear of that on any CPU, while a mask,
  position or RoPE mistake moves logits by >1e-2. Returns the absolute tolerance used."""
  atol = 1e-4 * float(np.abs(want_NxC).max())
  np.testing.assert_allclose(got_NxC, want_NxC, rtol=0, atol=atol)
  return atol


def _assert_same_choices(got, want, want_NxC, atol):
  """Same predicted label wherever the top two scores are further apart than 2 x atol (near-ties
  may flip within rounding); nearly all items must be that decisive for the check to mean much."""
  top2 = np.sort(want_NxC, -1)[:, -2:]
  decisive = top2[:, 1] - top2[:, 0] > 2 * atol
  assert decisive.mean() > 0.9, decisive.mean()
  assert [g for g, d in zip(got, decisive) if d] == [w for w, d in zip(want, decisive) if d]


@pytest.mark.parametrize("name", DATASETS)
def test_classification_matches_transformers(setup, sentibench_dir, name):
  s = setup
  task = sentibench.load_task(sentibench_dir, name)
  templates = sentibench.load_templates(s["protocol_path"])
  prompts = sentibench.build_prompts(task, templates, 42, max_examples=N_ITEMS)
  ref_NxC = reference_scores(s["model"], s["tok"], s["protocol"], name, [p.text for p in prompts])
  rows = _rows(s["pred_dir"], name, 42)
  assert [r["index"] for r in rows] == list(range(N_ITEMS))
  ours_NxC = np.asarray([r["scores"] for r in rows])
  atol = _assert_scores_close(ours_NxC, ref_NxC)
  labels = [v.strip() for v in s["protocol"]["classification"]["verbalizers"][name]]
  _assert_same_choices([r["prediction"] for r in rows], [labels[j] for j in ref_NxC.argmax(-1)],
                       ref_NxC, atol)
  assert len({r["prediction"] for r in rows}) > 1  # the random model is not constant
  golds = [t.gold for t in task.test[:N_ITEMS]]
  assert [r["gold"] for r in rows] == golds
  from sklearn.metrics import f1_score
  want = 100 * f1_score(golds, [r["prediction"] for r in rows], average="macro")
  assert s["results"]["datasets"][name]["seeds"]["42"] == pytest.approx(want, abs=1e-9)


def test_results_schema(setup):
  r = setup["results"]
  assert set(r) == {"datasets", "average", "aggregation", "settings"}
  assert list(r["datasets"]) == list(DATASETS)
  for name, entry in r["datasets"].items():
    assert set(entry) == {"seeds", "mean"} and list(entry["seeds"]) == ["42"]
    assert entry["mean"] == entry["seeds"]["42"] and 0 <= entry["mean"] <= 100
  assert r["average"] == pytest.approx(np.mean([e["mean"] for e in r["datasets"].values()]))
  json.dumps(r)
  for name in DATASETS:
    for row in _rows(setup["pred_dir"], name, 42):
      assert set(row) == {"index", "gold", "prediction", "scores"}


def test_sharded_scoring_matches_single_device(setup, sentibench_dir):
  s = setup
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  from sentijax import config as config_lib
  cfg, params = models.load_hf(s["root"], dtype="float32", mesh=mesh,
                               rules=config_lib.base().sharding_rules)
  n = 40
  pred_dir = s["root"] / "sharded"
  session = scorer.Scorer(cfg, s["tok"], sharding.Placement(mesh),
                          spec=settings.ScoringSpec(str(sentibench_dir), max_examples=n),
                          templates=s["session"].templates)
  results = session.score(params, "sc/sst2,multifaced/tweeteval", 42, predictions_dir=pred_dir)
  assert list(results["datasets"]) == list(DATASETS)
  for name in DATASETS:
    sharded, single = _rows(pred_dir, name, 42), _rows(s["pred_dir"], name, 42)[:n]
    single_NxC = np.asarray([r["scores"] for r in single])
    atol = _assert_scores_close(np.asarray([r["scores"] for r in sharded]), single_NxC)
    _assert_same_choices([r["prediction"] for r in sharded], [r["prediction"] for r in single],
                         single_NxC, atol)


def test_batch_shapes_do_not_change_scores(setup, sentibench_dir):
  """Least padding (many shapes) and one shape for everything give the same scores; the shapes
  compiled for one call are reused by the next."""
  prompts = sentibench.build_prompts(sentibench.load_task(sentibench_dir, "sc/sst2"),
                                     setup["protocol"], 42, max_examples=40)
  texts = [p.text for p in prompts]
  verbalizers = setup["protocol"]["classification"]["verbalizers"]["sc/sst2"]
  run = lambda cost, compiled: scorer.Scorer(
      setup["cfg"], setup["tok"], run=settings.RunSettings(compile_cost=cost),
      compiled=compiled).classify(setup["params"], texts, verbalizers)
  fine, coarse = {}, {}
  fine_NxC = run(0.0, fine)
  coarse_NxC = run(1e12, coarse)
  (program,) = coarse  # one program: the forward after sst2's instruction (64 prefix slots)
  assert program == "forward+prefix64" and list(fine) == [program]
  assert len(coarse[program]) == 1 and len(fine[program]) > 1, (fine, coarse)
  atol = _assert_scores_close(coarse_NxC, fine_NxC)
  _assert_same_choices(list(np.argmax(coarse_NxC, -1)), list(np.argmax(fine_NxC, -1)), fine_NxC,
                       atol)
  again = {k: set(v) for k, v in coarse.items()}
  run(1e12, again)
  assert again == coarse  # nothing new to compile


def test_shared_prefix_matches_whole_prompts(setup, sentibench_dir):
  """The instruction run once (its keys/values in front of every batch) scores as the whole
  prompts do, with and without a repetition penalty (a verbalizer id planted in the instruction
  must count as seen). Sharded scoring runs the prefix path in
  test_sharded_scoring_matches_single_device."""
  name = "multifaced/tweeteval"
  prompts = sentibench.build_prompts(sentibench.load_task(sentibench_dir, name),
                                     setup["protocol"], 52, max_examples=24)
  verbalizers = setup["protocol"]["classification"]["verbalizers"][name]
  verb_ids = batching.verbalizer_token_ids(setup["tok"], verbalizers)
  whole_seqs = batching.tokenize_prompts(setup["tok"], [p.text for p in prompts])
  # Plant the verbalizer that fewest prompts hold in the instruction: its first token is then in
  # the prefix, and some rows hold it nowhere else.
  c = int(np.argmin([sum(v in s for s in whole_seqs) for v in verb_ids]))
  texts = [f"Answer:{verbalizers[c]} or another label.\n{p.text}" for p in prompts]
  shared, suffixes, program = batching.split_prefix(
      setup["cfg"], setup["params"], batching.tokenize_prompts(setup["tok"], texts), "forward")
  assert shared is not None and program == f"forward+prefix{shared.slots}"
  prefix_ids = np.asarray(shared.ids_S)[:int(shared.length)]
  only_in_prefix = np.asarray([verb_ids[c] not in s for s in suffixes])
  assert verb_ids[c] in prefix_ids and only_in_prefix.sum() >= 3, only_in_prefix
  scores = {}
  for penalty in (1.0, 1.3):
    run = lambda on: scorer.Scorer(
        setup["cfg"], setup["tok"], spec=settings.ScoringSpec(batch_size=8),
        run=settings.RunSettings(generation.GenerationSettings(penalty), shared_prefix=on)
    ).classify(setup["params"], texts, verbalizers)
    whole_NxC, prefixed_NxC = scores[penalty] = run(False), run(True)
    atol = _assert_scores_close(prefixed_NxC, whole_NxC)
    _assert_same_choices(list(np.argmax(prefixed_NxC, -1)), list(np.argmax(whole_NxC, -1)),
                         whole_NxC, atol)
  # The penalty reached the verbalizer also where only the prefix holds it: column c is
  # transformers' penalty of the unpenalised score.
  raw_N, got_N = scores[1.0][1][only_in_prefix, c], scores[1.3][1][only_in_prefix, c]
  np.testing.assert_allclose(got_N, np.where(raw_N < 0, raw_N * 1.3, raw_N / 1.3), rtol=1e-5)
