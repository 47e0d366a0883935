"""generation_config.json (repetition penalty, eos id list) applied exactly as transformers
`generate` applies it: classification scores (`scores[0]`) and greedy extraction."""
import json

import numpy as np
import pytest

import hf_fixtures
from sentijax import models, sampling, sharding
from sentijax.data import sentibench
from sentijax.eval import batching, generation, scorer, settings as settings_lib

torch = pytest.importorskip("torch")

PENALTY = 1.8  # large, so that it flips labels and greedy tokens of the random model
MAX_NEW = 24


@pytest.fixture(scope="module")
def setup(tmp_path_factory, sentibench_dir):
  root = tmp_path_factory.mktemp("genconfig")
  tok, model, cfg, params = hf_fixtures.make_sentibench_model(sentibench_dir, root)
  templates = sentibench.load_templates(sentibench_dir / "protocol.json")
  return dict(root=root, tok=tok, model=model, cfg=cfg, params=params, templates=templates)


def _prompts(sentibench_dir, templates, name, n):
  task = sentibench.load_task(sentibench_dir, name)
  return [p.text for p in sentibench.build_prompts(task, templates, 42, max_examples=n)]


def _write_config(root, **values):
  (root / generation.FILE).write_text(json.dumps(values), encoding="utf-8")
  return generation.load(root, "auto")


def _left_pad_torch(tok, texts):
  seqs = batching.tokenize_prompts(tok, texts)
  width = max(map(len, seqs))
  ids, mask = sampling.left_pad(seqs, width, len(seqs), tok.eos_token_id)
  return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


def test_classification_scores_equal_generate_scores(setup, sentibench_dir):
  s = setup
  settings = _write_config(s["root"], repetition_penalty=PENALTY, eos_token_id=2)
  assert settings.repetition_penalty == PENALTY
  from transformers import GenerationConfig
  gen_cfg = GenerationConfig.from_pretrained(s["root"])
  assert gen_cfg.repetition_penalty == PENALTY
  texts = _prompts(sentibench_dir, s["templates"], "multifaced/tweeteval", 24)
  verbs = s["templates"]["classification"]["verbalizers"]["multifaced/tweeteval"]
  verb_ids = batching.verbalizer_token_ids(s["tok"], verbs)
  ids, mask = _left_pad_torch(s["tok"], texts)
  with torch.no_grad():  # the official call: scores[0] after the generation config's processors
    out = s["model"].generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False,
                              output_scores=True, return_dict_in_generate=True,
                              generation_config=gen_cfg, pad_token_id=s["tok"].eos_token_id)
  ref_NxC = out.scores[0][:, verb_ids].float().numpy()
  spec = settings_lib.ScoringSpec(batch_size=8)
  raw_NxC = scorer.Scorer(s["cfg"], s["tok"], spec=spec).classify(s["params"], texts, verbs)
  ours_NxC = scorer.Scorer(s["cfg"], s["tok"], run=settings_lib.RunSettings(settings),
                           spec=spec).classify(s["params"], texts, verbs)
  # Logits of this model are O(1); fp32 forward differences between torch and XLA ~5e-6 of the
  # largest |logit|: 1e-4 of it holds on any CPU.
  atol = 1e-4 * float(np.abs(ref_NxC).max())
  np.testing.assert_allclose(ours_NxC, ref_NxC, atol=atol, rtol=0)
  top2 = np.sort(ref_NxC, -1)[:, -2:]
  decisive = top2[:, 1] - top2[:, 0] > 2 * atol  # near-ties may flip within rounding
  assert decisive.mean() > 0.9 and (ours_NxC.argmax(-1) == ref_NxC.argmax(-1))[decisive].all()
  # The penalty matters here: scores move, and some labels flip.
  assert np.abs(raw_NxC - ours_NxC).max() > 0.1
  assert (raw_NxC.argmax(-1) != ours_NxC.argmax(-1)).any()


def test_greedy_extraction_equals_generate(setup, sentibench_dir):
  s = setup
  tok, model = s["tok"], s["model"]
  texts = _prompts(sentibench_dir, s["templates"], "absa/atsa_rest16", 8)
  seqs = batching.tokenize_prompts(tok, texts)
  # A second eos id the model emits mid-answer, so the eos LIST decides where rows end.
  with torch.no_grad():
    probe = model.generate(torch.tensor([seqs[0]]), max_new_tokens=MAX_NEW, do_sample=False,
                           repetition_penalty=PENALTY, pad_token_id=tok.eos_token_id)
  second_eos = int(probe[0, len(seqs[0]) + 3])
  settings = _write_config(s["root"], repetition_penalty=PENALTY,
                           eos_token_id=[tok.eos_token_id, second_eos], do_sample=False,
                           temperature=0.7, top_p=0.9)
  assert settings.eos_token_ids == (tok.eos_token_id, second_eos)
  from transformers import GenerationConfig
  gen_cfg = GenerationConfig.from_pretrained(s["root"])
  refs = []
  with torch.no_grad():  # one row per call: no padding, so nothing but real tokens is penalised
    for seq in seqs:
      out = model.generate(torch.tensor([seq]), max_new_tokens=MAX_NEW, do_sample=False,
                           generation_config=gen_cfg, pad_token_id=tok.eos_token_id)
      refs.append(out[0, len(seq):].tolist())
  eos = batching.eos_ids_of(tok, s["cfg"], settings)
  assert set(eos) == {tok.eos_token_id, second_eos}
  width = max(map(len, seqs))
  ids, mask = sampling.left_pad(seqs, width, len(seqs), tok.eos_token_id)
  greedy = sampling.SamplingSettings(max_tokens=MAX_NEW,
                                     repetition_penalty=settings.repetition_penalty)
  stops = sampling.Stops(eos, tok.eos_token_id)
  out = sampling.decode(s["cfg"], s["params"], ids, mask, greedy, stops)
  ours = [row[:n].tolist() for row, n in zip(out.tokens_BxN, out.lengths_B)]
  assert ours == refs
  # The instruction as a shared prefix (run once; rows hold the rest): the same tokens, the
  # penalty counting the prefix's tokens too.
  shared, suffixes, _ = batching.split_prefix(s["cfg"], s["params"], seqs, "decode")
  assert shared is not None and int(shared.length) >= 16
  ids, mask = sampling.left_pad(suffixes, max(map(len, suffixes)), len(seqs), tok.eos_token_id)
  out = sampling.decode(s["cfg"], s["params"], ids, mask, greedy, stops, shared=shared)
  assert [row[:n].tolist() for row, n in zip(out.tokens_BxN, out.lengths_B)] == refs
  assert any(len(r) < MAX_NEW and r[-1] == second_eos for r in refs)
  plain = sampling.decode(s["cfg"], s["params"], ids, mask,
                          sampling.SamplingSettings(max_tokens=MAX_NEW), stops)
  assert [row[:n].tolist() for row, n in zip(plain.tokens_BxN, plain.lengths_B)] != refs


def test_refused_and_ignored_keys(tmp_path):
  assert generation.load(tmp_path, "auto") == generation.GenerationSettings(
      source=f"{tmp_path} (no {generation.FILE})")
  path = tmp_path / generation.FILE
  path.write_text(json.dumps({"no_repeat_ngram_size": 3}), encoding="utf-8")
  with pytest.raises(ValueError, match=r"generation_config.json: key 'no_repeat_ngram_size'"):
    generation.load(tmp_path, "auto")
  assert generation.load(tmp_path, "ignore").repetition_penalty == 1.0
  path.write_text(json.dumps({"num_beams": 4}), encoding="utf-8")
  with pytest.raises(ValueError, match="num_beams"):
    generation.load(tmp_path, "auto")
  path.write_text(json.dumps({"repetition_penalty": -1}), encoding="utf-8")
  with pytest.raises(ValueError, match="repetition_penalty"):
    generation.load(tmp_path, "auto")
  path.write_text('{"eos_token_id": [1,\n', encoding="utf-8")
  with pytest.raises(ValueError, match="malformed JSON at line 2"):
    generation.load(tmp_path, "auto")
  # Sampling settings do not touch greedy decoding; a lone eos id becomes a 1-tuple.
  path.write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9,
                              "num_beams": 1, "eos_token_id": 7}), encoding="utf-8")
  assert generation.load(tmp_path, "auto").eos_token_ids == (7,)
  with pytest.raises(ValueError, match="auto"):
    generation.load(tmp_path, "sometimes")


def test_training_hooks_apply_the_generation_config(setup, sentibench_dir, tmp_path):
  """Scoring during training (KnowDist and ICLDist hooks) applies the model.init directory's
  generation config as the sentibench job does."""
  from sentijax import config as config_lib
  from sentijax.data import tasks
  from sentijax.eval import hooks
  s = setup
  settings = _write_config(s["root"], repetition_penalty=PENALTY, eos_token_id=2)
  config = config_lib.base()
  config.model.init = str(s["root"])
  config.workdir = str(tmp_path)
  config.eval.data_dir = str(sentibench_dir)
  config.eval.templates = str(sentibench_dir / "protocol.json")
  config.eval.during_training = "multifaced/tweeteval"
  config.eval.seeds, config.eval.max_examples = "42", 24
  run = settings_lib.RunSettings.from_config(config, s["tok"])
  assert run.generation.repetition_penalty == PENALTY
  mesh = sharding.make_mesh(config.mesh)  # the hooks score on the config's mesh
  cfg, params = models.load_hf(s["root"], dtype="float32", mesh=mesh,
                               rules=config.sharding_rules)
  spec = settings_lib.ScoringSpec(str(sentibench_dir), (42,), max_examples=24)
  score = lambda gen: scorer.Scorer(
      cfg, s["tok"], sharding.Placement(mesh), settings_lib.RunSettings(gen), spec,
      s["templates"]).score(params, ["multifaced/tweeteval"])["average"]
  want, raw = score(settings), score(generation.GenerationSettings())
  assert want != raw  # the penalty changes this score
  got = hooks.ScoringHook(config, cfg, s["tok"], config.eval.during_training)(0, params)
  assert got["sentibench/average"] == pytest.approx(want, abs=1e-9)
  task = tasks.make_spec(sentibench_dir, "multifaced/tweeteval", s["templates"])
  got = hooks.ScoringHook(config, cfg, s["tok"], [task])(1, params)
  assert got["sentibench/average"] == pytest.approx(want, abs=1e-9)
