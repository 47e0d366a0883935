"""Tokenizers: load a local HF tokenizer dir, or train a small byte-level BPE one.

`train_tokenizer` is for students trained from scratch (model presets) when no pretrained
tokenizer is given. It saves a normal HF tokenizer dir (tokenizer.json, tokenizer_config.json,
chat_template.jinja) that `AutoTokenizer.from_pretrained(dir, local_files_only=True)` loads.

`transformers` is imported inside the functions: it pulls in torch when installed (slow).
"""
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
START_HEADER_TOKEN = "<|start_header_id|>"
END_HEADER_TOKEN = "<|end_header_id|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, START_HEADER_TOKEN, END_HEADER_TOKEN)

# Llama-3-style headers; every turn ends with the eos token, so raw and chat-formatted students
# both stop generating at `eos_token_id`.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(path: str | os.PathLike) -> Any:
  """`AutoTokenizer.from_pretrained(path, local_files_only=True)` with a clear error if absent."""
  path = Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"Tokenizer directory not found: {path}. Set model.tokenizer (or "
                            "model.init) to a local HF model/tokenizer directory.")
  present = [name for name in _TOKENIZER_FILES if (path / name).is_file()]
  if not present:
    raise FileNotFoundError(
        f"{path} has no tokenizer files (expected one of {list(_TOKENIZER_FILES)}; found "
        f"{sorted(p.name for p in path.iterdir())[:20]}). Copy the tokenizer files of the model "
        "there or train one with sentijax.data.tokenizer.train_tokenizer.")
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike) -> Any:
  """Trains a byte-level BPE tokenizer on `texts` and saves it to `out_dir` (deterministic).

  Special tokens (ids 0..4): bos `<|begin_of_text|>`, eos `<|end_of_text|>`, pad `<|pad|>` and the
  chat header tokens; `CHAT_TEMPLATE` is attached. Returns the `PreTrainedTokenizerFast`.
  """
  # pylint: disable=import-outside-toplevel
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast
  # pylint: enable=import-outside-toplevel
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  min_size = len(alphabet) + len(SPECIAL_TOKENS)
  if vocab_size < min_size:
    raise ValueError(f"vocab_size={vocab_size} is below the byte alphabet plus special tokens "
                     f"({min_size}).")
  texts = [t for t in texts if isinstance(t, str) and t]
  if not texts:
    raise ValueError("train_tokenizer needs at least one non-empty text.")
  backend = Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=alphabet, show_progress=False)
  backend.train_from_iterator(texts, trainer=trainer, length=len(texts))
  # Like Llama's tokenizer: plain `tokenizer(text)` starts with BOS (add_special_tokens=False
  # leaves it out, as the packing pipeline does).
  bos_id = backend.token_to_id(BOS_TOKEN)
  backend.post_processor = processors.TemplateProcessing(
      single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos_id)])
  tokenizer = PreTrainedTokenizerFast(
      tokenizer_object=backend, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
      additional_special_tokens=[START_HEADER_TOKEN, END_HEADER_TOKEN])
  tokenizer.chat_template = CHAT_TEMPLATE
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  tokenizer.save_pretrained(str(out_dir))
  return tokenizer


def tokenizer_fingerprint(tokenizer: Any) -> str:
  """sha256 over what determines token ids: vocab/merges/normalisation, specials, chat template."""
  digest = hashlib.sha256()
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is not None:
    digest.update(backend.to_str().encode("utf-8"))
  else:
    digest.update(repr(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
  for value in (type(tokenizer).__name__, tokenizer.bos_token, tokenizer.eos_token,
                tokenizer.pad_token, getattr(tokenizer, "chat_template", None)):
    digest.update(b"\x00" + repr(value).encode("utf-8"))
  return digest.hexdigest()


def vocab_fingerprint(tokenizer: Any) -> str:
  """sha256 of the id <-> token table (added tokens included): equal for two tokenizers exactly
  when the same ids mean the same tokens, whatever their chat templates or normalisers."""
  table = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
  return hashlib.sha256(json.dumps(table, ensure_ascii=False).encode("utf-8")).hexdigest()


def ids_containing(tokenizer: Any, strings: Iterable[str], limit: int | None = None) -> list[int]:
  """Ids (< `limit`, e.g. the model's embedding rows) whose own decoded text contains one of
  `strings`: sampling that token is where a stop string appears, so decoding ends there (the
  text is cut at the string afterwards; a string split over several tokens is cut then too)."""
  strings = tuple(x for x in strings if x)
  if not strings:
    return []
  n = len(tokenizer) if limit is None else min(len(tokenizer), limit)
  pieces = tokenizer.batch_decode([[i] for i in range(n)])
  return [i for i, piece in enumerate(pieces) if any(x in piece for x in strings)]

