"""The model's generation_config.json, as `generate()` applies it to greedy decoding.

The official harness takes class scores from `generate(..., do_sample=False,
output_scores=True).scores[0]` and extraction answers from greedy `generate`: both come AFTER the
logits processors of the model's generation_config (transformers 4.44). For greedy decoding only
these settings matter:

  * applied: `repetition_penalty` (logits of tokens already in the row -- prompt and generated --
    divided by it when > 0, multiplied when < 0) and `eos_token_id` (an id or a list: every one
    ends a row);
  * refused with an error (they change greedy output and sentijax does not implement them):
    beam search, contrastive search, n-gram blocking, bad words, minimum lengths, forced or
    suppressed tokens, sequence bias, length-decay penalty, renormalisation, guidance, stop
    strings, time limits;
  * ignored: sampling settings (`do_sample`, `temperature`, `top_p`, `top_k`, ...: the harness
    passes do_sample=False), lengths the harness overrides, special token ids other than eos.

    settings = generation.load("/models/Qwen2.5-1.5B-Instruct", mode="auto")
    settings.repetition_penalty, settings.eos_token_ids   # 1.1, (151645, 151643)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os

log = logging.getLogger("sentijax")

FILE = "generation_config.json"
MODES = ("auto", "ignore")

# key -> the value that leaves greedy decoding unchanged (refused when set to anything else).
_REFUSED = {
    "num_beams": 1, "num_beam_groups": 1, "penalty_alpha": None, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "min_length": 0,
    "min_new_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "forced_decoder_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "sequence_bias": None, "exponential_decay_length_penalty": None, "renormalize_logits": False,
    "guidance_scale": None, "encoder_repetition_penalty": 1.0, "diversity_penalty": 0.0,
    "stop_strings": None, "max_time": None, "dola_layers": None, "low_memory": None,
    "watermarking_config": None, "token_healing": False, "num_return_sequences": 1,
}
# Keys with no effect on the harness's greedy calls (sampling-only, overridden, or bookkeeping).
_IGNORED = {
    "do_sample", "temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff",
    "eta_cutoff", "max_length", "max_new_tokens", "bos_token_id", "pad_token_id",
    "decoder_start_token_id", "transformers_version", "_from_model_config", "use_cache",
    "length_penalty", "early_stopping", "output_scores", "output_logits", "output_attentions",
    "output_hidden_states", "return_dict_in_generate", "cache_implementation", "cache_config",
    "assistant_model", "num_assistant_tokens", "num_assistant_tokens_schedule",
    "prompt_lookup_num_tokens", "max_matching_ngram_size", "trust_remote_code",
}


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
  """What greedy decoding and class scores take from the model's generation config.

  Attributes:
    repetition_penalty: 1.0 = none.
    eos_token_ids: ids that end generation; None = the model config's eos and the tokenizer's.
    source: where the settings came from (for logs and errors).
  """
  repetition_penalty: float = 1.0
  eos_token_ids: tuple[int, ...] | None = None
  source: str = "defaults"


def _as_ids(value, where: str) -> tuple[int, ...] | None:
  if value is None:
    return None
  values = value if isinstance(value, list) else [value]
  if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
    raise ValueError(f"{where}: key 'eos_token_id' must be an id or a list of ids, got {value!r}")
  return tuple(values) or None


def from_dict(raw: dict, where: str = FILE) -> GenerationSettings:
  """Validates a generation config dict; raises ValueError naming `where` and the key."""
  if not isinstance(raw, dict):
    raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
  for key, neutral in _REFUSED.items():
    value = raw.get(key, neutral)
    if value != neutral and not (neutral is None and value in ([], {})):
      raise ValueError(
          f"{where}: key '{key}' = {value!r} changes greedy decoding and is not implemented by "
          "sentijax; remove it or set --config.eval.generation_config=ignore (scores will then "
          "differ from transformers generate())")
  unknown = sorted(set(raw) - set(_REFUSED) - _IGNORED - {"repetition_penalty", "eos_token_id"})
  if unknown:
    log.warning("%s: ignoring unknown generation keys %s", where, unknown)
  penalty = raw.get("repetition_penalty", 1.0)
  if penalty is None:
    penalty = 1.0
  if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or penalty <= 0:
    raise ValueError(f"{where}: key 'repetition_penalty' must be a positive number, "
                     f"got {penalty!r}")
  return GenerationSettings(float(penalty), _as_ids(raw.get("eos_token_id"), where), where)


def load(model_dir: str | os.PathLike | None, mode: str = "auto") -> GenerationSettings:
  """Settings for `model_dir`: mode 'auto' reads its generation_config.json (defaults when the
  file is absent, as transformers does), 'ignore' returns the defaults."""
  if mode not in MODES:
    raise ValueError(f"eval.generation_config must be one of {MODES}, got {mode!r}")
  if mode == "ignore" or not model_dir:
    return GenerationSettings()
  path = os.path.join(os.fspath(model_dir), FILE)
  if not os.path.isfile(path):
    return GenerationSettings(source=f"{model_dir} (no {FILE})")
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}"
                     ) from None
  return from_dict(raw, path)
