"""generate_icl: ICL builder prompts -> local teacher answers with the exact verbalizer
distribution, a corpus ICLDist reads; rerun adds nothing."""
import importlib.util
import pathlib

import numpy as np
import pytest

from sentijax.teacher import icl_job

torch = pytest.importorskip("torch")
REPO = pathlib.Path(__file__).resolve().parents[2]


def _config(teacher_dir, workdir):
  spec = importlib.util.spec_from_file_location("cfg_gen_icl", REPO / "configs/generate_icl.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.workdir = str(workdir)
  c.model.init = str(teacher_dir)
  c.icl.num_prompts = 6
  c.sampling.max_tokens = 8
  c.generate.leak_check = "off"  # also icl.leak_check: no SentiBench needed
  c.generate.progress = False
  return c


def test_icl_corpus_with_exact_verbalizer_probs(teacher_dir, tmp_path):
  from transformers import LlamaForCausalLM
  from sentijax.data import icl, readers, tokenizer as tok_lib
  from sentijax.train import icldist
  config = _config(teacher_dir, tmp_path)
  summary = icl_job.run(config)
  assert summary["rejected"] == 0 and summary["written"] == summary["items"] >= 4
  records, _ = readers.read_records(tmp_path / "corpus.jsonl")
  tok = tok_lib.load_tokenizer(teacher_dir)
  model = LlamaForCausalLM.from_pretrained(teacher_dir).eval()
  tasks = {"sc/products", "sc/restaurants", "emotion/chat"}
  for r in records:
    assert r.meta["task"] in tasks and r.response.startswith(" ") and r.meta["gold"].strip()
    probs = r.meta["teacher_probs"]
    assert set(probs) <= set(r.meta["verbalizers"]) and 0 < sum(probs.values()) <= 1 + 1e-6
    ids = torch.tensor([tok(r.prompt)["input_ids"]])
    with torch.no_grad():
      ref = torch.softmax(model(ids).logits[0, -1].double(), -1).numpy()
    for v, p in probs.items():
      # fp32 logits agree to ~1e-5 of their size (~10 here): probabilities to ~1e-4 relative.
      np.testing.assert_allclose(p, ref[tok(v, add_special_tokens=False)["input_ids"][0]],
                                 rtol=2e-4)
  assert icl_job.run(config)["written"] == 0  # rerun: nothing new
  config.icl.target, config.icl.teacher_corpus = "teacher_probs", str(tmp_path / "corpus.jsonl")
  spec = icldist.ICLSpec.from_config(config)
  sources, heldout, groups = icldist.resolve_tasks(spec)
  train, val, _ = icldist.teacher_records(spec, sources, heldout,
                                         icl.forbidden_sentences(groups))
  assert len(train) + len(val) == len(records)
