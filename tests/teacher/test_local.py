"""Local teacher: greedy parity with transformers generate, seeded sampling independent of
batches, stop strings, min tokens, logprobs."""
import math

import pytest

from sentijax.sampling import SamplingSettings

torch = pytest.importorskip("torch")

PROMPTS = ["The pasta was great", "Terrible service, never again.", "ok", "I loved the movie",
           "The battery died after two days and support ignored me", "Fine.", "Nice staff",
           "Awful noise all night"]
KEYS = [f"k{i}" for i in range(len(PROMPTS))]


def test_greedy_matches_transformers_generate(local_teacher, teacher_dir):
  from transformers import LlamaForCausalLM
  model = LlamaForCausalLM.from_pretrained(teacher_dir).eval()
  tok = local_teacher.tokenizer
  got = local_teacher.generate_ids([local_teacher.encode(p) for p in PROMPTS], KEYS,
                                   SamplingSettings(max_tokens=8))
  distinct = set()
  for prompt, (new, _) in zip(PROMPTS, got):
    ids = torch.tensor([local_teacher.encode(prompt)])
    with torch.no_grad():
      ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=8, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    assert new == ref, prompt
    distinct.add(tuple(new))
  assert len(distinct) > 1  # the parity is not between constant outputs


def test_seeded_sampling_independent_of_batch(local_teacher):
  s = SamplingSettings(temperature=1.0, top_p=0.9, top_k=50, max_tokens=8, seed=3)
  seqs = [local_teacher.encode(p) for p in PROMPTS]
  batched = local_teacher.generate_ids(seqs, KEYS, s)
  local_teacher.batch_size = 1
  try:
    single = local_teacher.generate_ids(seqs[::-1], KEYS[::-1], s)[::-1]
  finally:
    local_teacher.batch_size = 4
  assert batched == single
  greedy = local_teacher.generate_ids(seqs, KEYS, SamplingSettings(max_tokens=8))
  assert batched != greedy
  other_seed = local_teacher.generate_ids(seqs, KEYS, SamplingSettings(
      temperature=1.0, max_tokens=8, top_p=0.9, top_k=50, seed=4))
  assert other_seed != batched


def test_top_k_one_is_greedy_and_min_tokens(local_teacher):
  seqs = [local_teacher.encode(p) for p in PROMPTS[:4]]
  greedy = local_teacher.generate_ids(seqs, KEYS[:4], SamplingSettings(max_tokens=8))
  top1 = local_teacher.generate_ids(seqs, KEYS[:4], SamplingSettings(temperature=5.0, top_k=1,
                                                                     max_tokens=8))
  assert greedy == top1
  eos = local_teacher.tokenizer.eos_token_id
  out = local_teacher.generate_ids(seqs, KEYS[:4], SamplingSettings(max_tokens=8, min_tokens=8))
  for new, _ in out:
    assert len(new) == 8 and eos not in new[:7]


def test_stop_strings_and_logprobs(local_teacher):
  [full] = local_teacher.generate([PROMPTS[0]], KEYS[:1], SamplingSettings(max_tokens=8,
                                                                           min_tokens=8))
  assert full.finish_reason == "length" and len(full.text) > 3
  stop = full.text[2:4]
  [cut] = local_teacher.generate([PROMPTS[0]], KEYS[:1], SamplingSettings(
      max_tokens=8, min_tokens=8, stop=(stop,)))
  assert cut.text == full.text[:full.text.find(stop)] and cut.finish_reason == "stop"
  # A stop string inside one token ends decoding at that token, not at max_tokens.
  piece = next(p for p in (local_teacher.tokenizer.decode([t]) for t in full.token_ids[3:])
               if p.strip())
  [early] = local_teacher.generate([PROMPTS[0]], KEYS[:1], SamplingSettings(
      max_tokens=8, min_tokens=8, stop=(piece,)))
  assert early.text == full.text[:full.text.find(piece)] and early.finish_reason == "stop"
  assert early.completion_tokens < 8 and early.completion_tokens == len(early.token_ids)
  [c] = local_teacher.generate([PROMPTS[0]], KEYS[:1], SamplingSettings(max_tokens=8, min_tokens=8),
                               logprobs=3)
  assert len(c.top_logprobs) == len(c.token_ids) == 8
  for tok, top in zip(c.token_ids, c.top_logprobs):
    assert len(top) == 3 and tok == max(top, key=top.get)  # greedy picks the argmax
    assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-5
