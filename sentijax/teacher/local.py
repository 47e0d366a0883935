"""Local teacher: a sentijax model sampled with `sampling.decode` (the scorer's KV-cache loop);
a `backend.TeacherBackend` with every model-side capability (token logprobs, the exact next-token
distribution, the model itself for the top-k job).

Each row carries its own PRNG key, derived from its record key (`common.row_seed`), and every
sampling step folds the step index into it: a row samples the same text whatever batch it lands
in, so resumed and re-batched runs agree. Shapes are bucketed (one compile per bucket); greedy
rows match transformers `generate`. Stop strings end decoding at the first token whose text
contains one (`stop_string_ids`); the text is cut at the string.

    teacher = LocalTeacher(cfg, params, tokenizer, batch_size=8)
    [c.text for c in teacher.generate(["Hello"], ["key-0"], SamplingSettings(max_tokens=32))]
"""
from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sentijax import models, sampling, sharding
from sentijax.data import records
from sentijax.data import tokenizer as tokenizer_lib
from sentijax.models import factory
from sentijax.sampling import SamplingSettings
from sentijax.teacher import backend
from sentijax.teacher.common import Completion, cut_at_stop, row_seed

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("cfg", "top_n"))
def token_logprobs(cfg, params, ids_BxT, mask_BxT, *, top_n: int):
  """log p(token t+1 | ...t) and the top_n (logprob, id) at every position of right-padded rows
  (the server's prompt scores too)."""
  logits_BxTxV = models.forward(cfg, params, ids_BxT, segment_ids_BxT=mask_BxT,
                                positions_BxT=models.default_positions(mask_BxT))
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  chosen_BxT = jnp.take_along_axis(logp_BxTxV[:, :-1], ids_BxT[:, 1:, None], axis=-1)[..., 0]
  top_lp, top_id = jax.lax.top_k(logp_BxTxV[:, :-1], max(top_n, 1))
  return chosen_BxT, top_lp, top_id


@functools.partial(jax.jit, static_argnames=("cfg",))
def _last_logprobs(cfg, params, ids_BxT, mask_BxT):
  """log-softmax of the next-token logits after each left-padded row: [B, V]."""
  logits_Bx1xV, _ = models.forward_with_cache(
      cfg, params, ids_BxT, models.default_positions(mask_BxT), mask_BxT,
      models.init_cache(cfg, ids_BxT.shape[0], ids_BxT.shape[1]), last_only=True)
  return jax.nn.log_softmax(logits_Bx1xV[:, 0].astype(jnp.float32), axis=-1)


class LocalTeacher:
  """Batched sampling from a sentijax model (params already placed by `placement` when given)."""

  # answer setting -> the config key that sets it (a corpus settings mismatch names it)
  CONFIG_KEYS = {"model": "model.init / model.preset", "tokenizer": "model.tokenizer",
                 "dtype": "model.dtype", "init_layers": "model.init_layers", "seed": "seed",
                 "chat_template": "teacher.chat_template"}
  capabilities = backend.Capabilities(frozenset({
      backend.TOKEN_LOGPROBS, backend.NEXT_TOKEN_DISTRIBUTION, backend.MODEL}))

  def __init__(self, cfg: models.ModelConfig, params: Any, tokenizer: Any, *,
               batch_size: int = 8, placement: sharding.Placement | None = None,
               chat_template: bool = False, stop_ids: Sequence[int] = (), name: str = "local"):
    self.cfg, self.params, self.tokenizer = cfg, params, tokenizer
    self.batch_size, self.placement = int(batch_size), placement or sharding.Placement()
    self.chat_template, self.name = chat_template, name
    ids = set(stop_ids) | {tokenizer.eos_token_id}
    self.stop_ids = sorted(i for i in ids if i is not None)
    self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
    self._stop_cache: dict[tuple[str, ...], list[int]] = {}

  @classmethod
  def from_config(cls, config) -> "LocalTeacher":
    """From `config.model` (HF dir in model.init, else the preset + tokenizer) through
    `models.factory`, placed on `config.mesh` (fsdp=0: sharded when big)."""
    cfg = factory.model_config(config)
    demo = records.demo_corpus_path().read_text(encoding="utf-8").splitlines()
    tok = factory.tokenizer(config, cfg, lambda: [
        t for line in demo for t in (json.loads(line)["prompt"], json.loads(line)["response"])])
    placement = sharding.Placement(sharding.make_mesh(config.mesh, model_cfg=cfg),
                                   sharding.rules_from_config(config.sharding_rules))
    params = factory.param_initializer(config, cfg)(placement.mesh, placement.rules)
    return cls(cfg, params, tok, batch_size=int(config.teacher.batch_size), placement=placement,
               chat_template=bool(config.teacher.chat_template),
               name=config.model.init or f"preset:{config.model.preset}")

  @staticmethod
  def answer_settings(config) -> dict:
    """What besides the prompt and sampling changes an answer: the model, its dtype and
    tokenizer, the chat template (a preset's random weights: the seed)."""
    m = config.model
    settings = {"model": str(m.init) or f"preset:{m.preset}", "dtype": str(m.dtype),
                "tokenizer": str(m.tokenizer),
                "chat_template": bool(config.teacher.chat_template)}
    if not m.init:
      settings["seed"] = int(config.seed)
    elif m.get("init_layers"):
      settings["init_layers"] = str(m.init_layers)
    return settings

  @property
  def collective(self) -> bool:
    """True when the mesh spans processes: every process answers each item together."""
    mesh = self.placement.mesh
    return mesh is not None and jax.process_count() > 1 and any(
        d.process_index != jax.process_index() for d in mesh.devices.flat)

  def encode(self, prompt: str | list[dict] | list[int], chat: bool | None = None) -> list[int]:
    """Prompt ids: a chat message list (or a string with chat=True) through the chat template;
    token ids pass as they are."""
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
      return list(prompt)
    chat = self.chat_template if chat is None else chat
    if isinstance(prompt, list) or chat:
      messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
      text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=True)
      return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(self.tokenizer(prompt)["input_ids"])

  def stop_string_ids(self, stop: Sequence[str]) -> list[int]:
    """Tokens whose own text contains a stop string: decoding ends right there (the text is
    then cut at the string). A stop string split over several tokens is still cut afterwards."""
    stop = tuple(x for x in stop if x)
    if not stop:
      return []
    if stop not in self._stop_cache:
      self._stop_cache[stop] = tokenizer_lib.ids_containing(self.tokenizer, stop,
                                                            self.cfg.vocab_size)
    return self._stop_cache[stop]

  def generate_ids(self, seqs: Sequence[Sequence[int]], keys: Sequence[str],
                   s: SamplingSettings) -> list[tuple[list[int], bool]]:
    """Per prompt: (new token ids up to and including the token that ended it, whether an
    end-of-text token (`stop_ids`) ended it)."""
    out = []
    stops = sampling.Stops(self.stop_ids, self.pad_id, end_ids=sorted(
        set(self.stop_string_ids(s.stop)) - set(self.stop_ids)))
    for start in range(0, len(seqs), self.batch_size):
      chunk, chunk_keys = seqs[start:start + self.batch_size], keys[start:start + self.batch_size]
      length = sampling.bucket_length(max(len(q) for q in chunk))
      ids_BxT, mask_BxT = sampling.left_pad(chunk, length, len(chunk), self.pad_id)
      result = sampling.decode(
          self.cfg, self.params, ids_BxT, mask_BxT, s, stops,
          keys_B=sampling.keys_from_seeds([row_seed(k, s.seed) for k in chunk_keys]),
          placement=self.placement)
      for r in range(len(chunk)):
        new = [int(x) for x in result.tokens_BxN[r, :result.lengths_B[r]]]
        out.append((new, bool(new) and new[-1] in self.stop_ids))
    return out

  def logprobs(self, prompt_ids: Sequence[int], new_ids: Sequence[int], top_n: int
               ) -> tuple[list[float], list[dict[int, float]]]:
    """The model's (untempered) logprob of each new token and the top_n alternatives."""
    seq = list(prompt_ids) + list(new_ids)
    length = sampling.bucket_length(len(seq))
    ids_BxT = np.full((1, length), self.pad_id, np.int32)
    mask_BxT = np.zeros((1, length), np.int32)
    ids_BxT[0, :len(seq)], mask_BxT[0, :len(seq)] = seq, 1
    chosen, top_lp, top_id = (sharding.to_host(x) for x in token_logprobs(
        self.cfg, self.params, jnp.asarray(ids_BxT), jnp.asarray(mask_BxT), top_n=top_n))
    span = range(len(prompt_ids) - 1, len(seq) - 1)
    return ([float(chosen[0, i]) for i in span],
            [{int(t): float(lp) for t, lp in zip(top_id[0, i, :top_n], top_lp[0, i, :top_n])}
             for i in span])

  def next_logprobs(self, prompt: str | list) -> np.ndarray:
    """The full next-token log-distribution [V] after `prompt` (exact verbalizer scores)."""
    seq = self.encode(prompt)
    ids_BxT, mask_BxT = sampling.left_pad([seq], sampling.bucket_length(len(seq)), 1, self.pad_id)
    return sharding.to_host(_last_logprobs(self.cfg, self.params, jnp.asarray(ids_BxT),
                                           jnp.asarray(mask_BxT)))[0]

  def generate(self, prompts: Sequence[str | list], keys: Sequence[str], s: SamplingSettings,
               logprobs: int = 0) -> list[Completion]:
    """Completions of `prompts` (text, finish_reason 'stop' | 'length', token ids)."""
    seqs = [self.encode(p) for p in prompts]
    results = []
    for seq, (new, stopped) in zip(seqs, self.generate_ids(seqs, keys, s)):
      body = new[:-1] if stopped else new
      text, cut = cut_at_stop(self.tokenizer.decode(body, skip_special_tokens=True), s.stop)
      chosen, top = self.logprobs(seq, body, logprobs) if logprobs and body else (None, None)
      results.append(Completion(text=text, finish_reason="stop" if stopped or cut else "length",
                                completion_tokens=len(new), token_ids=body,
                                token_logprobs=chosen, top_logprobs=top))
    return results

  def stream(self, items: Sequence[Any], s: SamplingSettings, logprobs: int = 0
             ) -> Iterator[tuple[Any, Completion | Exception]]:
    """(item, completion) per item with `.prompt` and `.id`, one batch at a time."""
    for start in range(0, len(items), self.batch_size):
      chunk = items[start:start + self.batch_size]
      for item, c in zip(chunk, self.generate([i.prompt for i in chunk], [i.id for i in chunk],
                                              s, logprobs)):
        yield item, c

  def close(self) -> None:
    pass
