"""SentiBench scoring speed: the official procedure (transformers `generate`) vs sentijax.

Both sides score the same prompts (official templates, seed 42, first `--n` items of each of
`--dataset`: one name, a comma list, or `all` = the 12 in order) with the same weights in this
process, each side loading the model once:

  * official: what icl_multifaced.py / fsa.py do -- `AutoTokenizer(padding_side='left')`, pad =
    eos, batches of `--official-batch` in file order; classification takes
    `generate(max_new_tokens=2, do_sample=False, output_scores=True).scores[0]` at the verbalizer
    first tokens, extraction `generate(max_new_tokens=150, do_sample=False)` then
    `batch_decode(skip_special_tokens=True)` (+ transformers 4.44's clean-up when the tokenizer
    config asks for it) and the harness's `Label:` regex;
  * sentijax: `models.load_hf` + `scorer.Scorer.classify` / `.generate` as the sentibench job runs
    them (generation config and clean-up on `auto`), timed cold (first call: compilation, or the
    persistent cache) and warm (same shapes again).

Prints prompts/s, sentijax/official ratios, label (or extracted answer) agreement, and achieved
FLOP/s (real prompt + generated tokens only) against a measured matmul peak of the JAX device.

  python bench/bench_score.py --model /models/SmolLM2-135M-Instruct            # sc/sst2, 200
  python bench/bench_score.py --model DIR --dataset absa/atsa_rest16 --n 64 --batch 16
  python bench/bench_score.py --model DIR --side sentijax   # one side (whole-process timing)
  python bench/bench_score.py --model DIR --dataset all --n 16 --side official   # SentiBench-mini
"""
# pylint: disable=import-outside-toplevel
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LABEL_PATTERN = r"Label:\s*(.*?)(?=\s*(?=Sentence:|\n|$))"  # fsa.py extract_labels_from_text


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", required=True, help="local HF model directory")
  p.add_argument("--dataset", default="sc/sst2", help="a name, a comma list, or all")
  p.add_argument("--n", type=int, default=200, help="first N test items")
  p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "sentibench"))
  p.add_argument("--templates", default="", help="default: <data-dir>/protocol.json")
  p.add_argument("--seed", type=int, default=42)
  p.add_argument("--batch", type=int, default=16, help="sentijax eval.batch_size")
  p.add_argument("--official-batch", type=int, default=0,
                 help="official eval_batch_size (default 4 classification, 16 extraction)")
  p.add_argument("--max-new-tokens", type=int, default=150)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--side", default="both", choices=("both", "official", "sentijax"))
  p.add_argument("--compilation-cache", default="auto",
                 help="sentijax persistent XLA cache: auto | off | DIR")
  p.add_argument("--generation-config", default="auto", choices=("auto", "ignore"))
  p.add_argument("--decode-cleanup", default="auto", choices=("auto", "on", "off"))
  p.add_argument("--no-warm", action="store_true", help="sentijax: skip the second (warm) pass")
  return p.parse_args(argv)


def prompts_for(args, name):
  from sentijax.data import sentibench
  templates = sentibench.load_templates(args.templates or Path(args.data_dir) / "protocol.json")
  task = sentibench.load_task(args.data_dir, name)
  prompts = sentibench.build_prompts(task, templates, args.seed, max_examples=args.n)
  return task, templates, prompts


# --------------------------------------------------------------------------------------------
# The official procedure.


def load_official(args):
  """(tokenizer, model, device, clean-up) as the harness loads them."""
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer
  from sentijax.eval import decoding
  tok = AutoTokenizer.from_pretrained(args.model, padding_side="left")
  tok.pad_token = tok.eos_token
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
  model.to(device).eval()
  return tok, model, device, decoding.cleanup_enabled(tok, args.decode_cleanup)


def run_official(args, loaded, task, templates, texts):
  import torch
  from sentijax.data import sentibench
  from sentijax.eval import decoding
  tok, model, device, cleanup = loaded
  t0 = time.perf_counter()
  k_shot = templates["k_shot"]
  bs = args.official_batch or (4 if task.kind == "classification" else 16)
  out, gen_tokens = [], 0
  if task.kind == "classification":
    verbs = sentibench.verbalizers(templates, task.name)
    verb_ids = [tok(v, add_special_tokens=False)["input_ids"][0] for v in verbs]
  with torch.no_grad():
    for start in range(0, len(texts), bs):
      enc = tok(texts[start:start + bs], return_tensors="pt", padding=True).to(device)
      if task.kind == "classification":
        res = model.generate(enc["input_ids"], attention_mask=enc["attention_mask"],
                             max_new_tokens=2, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
        out += [verbs[j].strip() for j in res.scores[0][:, verb_ids].argmax(-1).cpu().tolist()]
      else:
        ids = model.generate(enc["input_ids"], attention_mask=enc["attention_mask"],
                             max_new_tokens=args.max_new_tokens, num_beams=1,
                             num_return_sequences=1, do_sample=False)
        gen_tokens += int((ids.shape[1] - enc["input_ids"].shape[1]) * ids.shape[0])
        texts_b = tok.batch_decode(ids, skip_special_tokens=True)
        if cleanup:
          texts_b = [decoding.clean_up_tokenization(t) for t in texts_b]
        for t in texts_b:
          matches = re.findall(LABEL_PATTERN, t, re.DOTALL)
          out.append(matches[k_shot].replace("```python", "").replace("```", "").strip()
                     if len(matches) > k_shot else "")
  if device == "cuda":
    torch.cuda.synchronize()
  return out, time.perf_counter() - t0, gen_tokens


# --------------------------------------------------------------------------------------------
# sentijax.


def load_sentijax(args):
  """(cfg, params, tokenizer, generation settings, clean-up, cache dir) as the job loads them."""
  from sentijax import models
  from sentijax.data import tokenizer as tokenizer_lib
  from sentijax.eval import decoding, generation, job
  cache = job.setup_compilation_cache(args.compilation_cache)
  settings = generation.load(args.model, args.generation_config)
  cfg, params = models.load_hf(args.model, dtype=args.dtype, compute_dtype=args.dtype)
  tok = tokenizer_lib.load_tokenizer(args.model)
  return cfg, params, tok, settings, decoding.cleanup_enabled(tok, args.decode_cleanup), cache


def run_sentijax(args, loaded, task, templates, texts, compiled):
  """(predictions, first-pass seconds, warm-pass seconds or None); `compiled` is shared across
  datasets as in the sentibench job."""
  from sentijax.data import sentibench
  from sentijax.eval import parsers, scorer, settings
  cfg, params, tok, generation, cleanup, _ = loaded
  session = scorer.Scorer(cfg, tok, run=settings.RunSettings(generation, cleanup),
                          spec=settings.ScoringSpec(batch_size=args.batch,
                                                    max_new_tokens=args.max_new_tokens),
                          compiled=compiled)

  def once():
    if task.kind == "classification":
      verbs = sentibench.verbalizers(templates, task.name)
      scores = session.classify(params, texts, verbs)
      return [verbs[j].strip() for j in scores.argmax(-1)]
    return [parsers.extract_answer(o) for o in session.generate(params, texts)]

  t1 = time.perf_counter()
  preds = once()
  cold_s = time.perf_counter() - t1
  warm_s = None
  if not args.no_warm:
    t2 = time.perf_counter()
    once()
    warm_s = time.perf_counter() - t2
  return preds, cold_s, warm_s


def matmul_peak_flops(dtype: str, n: int = 2048, iters: int = 5) -> float:
  """Measured FLOP/s of an n x n x n jitted matmul on the default JAX device (best of iters)."""
  import jax
  import jax.numpy as jnp
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(iters):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def useful_flops(cfg, prompt_lens, gen_tokens_per_row: int, with_lm_head_each: bool) -> float:
  """Forward FLOPs over real tokens: weight matmuls, causal attention, the LM head at the last
  prompt position (plus at every generated token for extraction)."""
  e, f, l = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  h, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  per_tok = 2 * l * (e * d * (2 * h + 2 * k) + 3 * e * f)
  head = 2 * e * cfg.vocab_size
  total = 0.0
  for t in prompt_lens:
    n = t + gen_tokens_per_row
    total += per_tok * n + 2 * l * h * d * n * n + head * (1 + (gen_tokens_per_row
                                                               if with_lm_head_each else 0))
  return total


def main(argv=None):
  from sentijax.eval import settings as settings_lib
  args = parse_args(argv)
  names = settings_lib.parse_datasets(args.dataset)
  print(f"{','.join(names)}: first {args.n} items each, seed {args.seed}, {args.dtype}, model "
        f"{args.model}; host {os.cpu_count()} CPUs")
  both = args.side == "both"
  off_total = ours_total = ours_warm = 0.0
  agree_total = items_total = 0
  off_loaded = ours_loaded = None
  if args.side in ("both", "official"):
    t0 = time.perf_counter()
    off_loaded = load_official(args)
    off_total = time.perf_counter() - t0
    print(f"official: load {off_total:.1f} s")
  if args.side in ("both", "sentijax"):
    import jax
    t0 = time.perf_counter()
    ours_loaded = load_sentijax(args)
    ours_total = ours_warm = time.perf_counter() - t0
    cfg, _, tok, settings, cleanup, cache = ours_loaded
    print(f"sentijax ({jax.default_backend()} ({jax.devices()[0].device_kind}), batch "
          f"{args.batch}, cache {cache or 'off'}, repetition_penalty "
          f"{settings.repetition_penalty:g}, clean-up {cleanup}): load {ours_total:.1f} s")
  compiled: dict = {}
  flops = warm_cls_s = 0.0  # classification warm passes: real prompt FLOPs and seconds
  for name in names:
    task, templates, prompts = prompts_for(args, name)
    texts = [p.text for p in prompts]
    line = f"{name} ({len(texts)} prompts, {task.kind}):"
    official = ours = None
    if off_loaded is not None:
      official, off_s, _ = run_official(args, off_loaded, task, templates, texts)
      off_total += off_s
      line += (f" official {off_s:.1f} s (batch "
               f"{args.official_batch or (4 if task.kind == 'classification' else 16)})")
    if ours_loaded is not None:
      ours, cold_s, warm_s = run_sentijax(args, ours_loaded, task, templates, texts, compiled)
      ours_total += cold_s
      line += f" sentijax first pass {cold_s:.1f} s"
      if warm_s is not None:
        ours_warm += warm_s
        line += f", warm {warm_s:.1f} s"
        if task.kind == "classification":
          flops += useful_flops(cfg, [len(s) for s in tok(texts)["input_ids"]], 0, False)
          warm_cls_s += warm_s
    if both:
      agree = sum(a == b for a, b in zip(official, ours))
      agree_total += agree
      items_total += len(texts)
      line += (f"; {off_s / cold_s:.2f}x; agreement {agree}/{len(texts)} "
               f"{'labels' if task.kind == 'classification' else 'extracted answers'}")
    print(line)
    if both:
      for i, (a, b) in enumerate(zip(official, ours)):
        if a != b:
          print(f"  item {i}: official {a!r} vs sentijax {b!r}")
          break
  if off_loaded is not None:
    print(f"official total: {off_total:.1f} s incl. load")
  if ours_loaded is not None:
    print(f"sentijax total: {ours_total:.1f} s incl. load and compilation"
          + (f"; {ours_warm:.1f} s compiled (warm passes)" if not args.no_warm else ""))
    if flops:
      peak, rate = matmul_peak_flops(args.dtype), flops / warm_cls_s
      print(f"  classification: {rate / 1e9:.1f} GFLOP/s of whole-prompt work (warm; the "
            f"shared prefix runs once, so this can exceed the device) vs a measured matmul "
            f"peak of {peak / 1e9:.1f} GFLOP/s")
  if both:
    print(f"ratio sentijax/official: {off_total / ours_total:.2f}x incl. load and compilation"
          + (f", {off_total / ours_warm:.2f}x compiled" if not args.no_warm else ""))
    print(f"agreement: {agree_total}/{items_total} ({100 * agree_total / items_total:.1f}%)")


if __name__ == "__main__":
  main()
