"""Decoding generated tokens as the official harness does: stop classes and text clean-up.

Clean-up: under transformers 4.44 the harness's `batch_decode(..., skip_special_tokens=True)`
applied `clean_up_tokenization` whenever the tokenizer config set `clean_up_tokenization_spaces`
(or left it out: 4.44's default was True). Llama-3 tokenizers set it, so " 's" -> "'s",
" n't" -> "n't", " ," -> ",", " ." -> "." in every answer; transformers 5 ignores the flag for
BPE tokenizers. `cleanup_enabled(tokenizer, "auto")` reproduces 4.44's decision and
`clean_up_tokenization` its exact replacements.

Stop classes (the answer is the text after `Label:`, leading whitespace skipped, up to the first
newline): a token that decodes to nothing under `skip_special_tokens` (every added special token,
listed in `all_special_ids` or not: Llama-3's `<|start_header_id|>` and reserved tokens), a
whitespace-only token, and a byte piece of a split multi-byte whitespace character are BLANK: they
do not start the answer, so a newline after them does not end it.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import sys
from collections.abc import Sequence

MODES = ("auto", "on", "off")

# transformers 4.44 PreTrainedTokenizerBase.clean_up_tokenization, in its order.
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def clean_up_tokenization(text: str) -> str:
  """transformers 4.44 `clean_up_tokenization`: the ten replacements, applied in order."""
  for old, new in _CLEANUP:
    text = text.replace(old, new)
  return text


def cleanup_enabled(tokenizer, mode: str = "auto") -> bool:
  """Whether decoded answers get `clean_up_tokenization` (as transformers 4.44 decoded them).

  mode 'auto': the tokenizer config's `clean_up_tokenization_spaces`, True when the config does
  not set it (the 4.44 default); 'on' / 'off' force it.
  """
  if mode not in MODES:
    raise ValueError(f"eval.decode_cleanup must be one of {MODES}, got {mode!r}")
  if mode != "auto":
    return mode == "on"
  init = getattr(tokenizer, "init_kwargs", None) or {}
  value = init.get("clean_up_tokenization_spaces")
  return True if value is None else bool(value)


def decode(tokenizer, token_lists: Sequence[Sequence[int]], cleanup: bool) -> list[str]:
  """Texts of `token_lists`, special tokens skipped, 4.44 clean-up when `cleanup`."""
  texts = tokenizer.batch_decode([list(t) for t in token_lists], skip_special_tokens=True,
                                 clean_up_tokenization_spaces=False)
  return [clean_up_tokenization(t) for t in texts] if cleanup else list(texts)


# --------------------------------------------------------------------------------------------
# Stop classes.


@dataclasses.dataclass(frozen=True)
class StopTokens:
  """Vocabulary classes for answer stopping (see `sampling` soft stops)."""
  stop_ids: list[int]  # eos ids and tokens with text before a newline: end the answer
  soft_stop_ids: list[int]  # tokens starting with (whitespace and) a newline
  blank_ids: list[int]  # tokens that add no answer text (do not start the answer)


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
  """Inverse of GPT-2's bytes_to_unicode (the byte-level BPE alphabet)."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  chars, n = {}, 0
  for b in range(256):
    if b in printable:
      chars[chr(b)] = b
    else:
      chars[chr(256 + n)] = b
      n += 1
  return chars


@functools.lru_cache(maxsize=1)
def _whitespace_fragments() -> frozenset[bytes]:
  """Every byte substring of two consecutive whitespace characters' UTF-8 (Python's `\\s`)."""
  spaces = [chr(c).encode() for c in range(sys.maxunicode + 1) if chr(c).isspace()]
  out = set()
  for a in spaces:
    for b in spaces:
      pair = a + b
      out.update(pair[i:j] for i in range(len(pair)) for j in range(i + 1, len(pair) + 1))
  return frozenset(out)


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(piece: str) -> bytes | None:
  """Raw bytes of a vocabulary piece (byte-level BPE or `<0xNN>` byte fallback), else None."""
  m = _BYTE_PIECE.fullmatch(piece)
  if m:
    return bytes([int(m.group(1), 16)])
  table = _byte_decoder()
  if piece and all(ch in table for ch in piece):
    return bytes(table[ch] for ch in piece)
  return None


def is_whitespace_fragment(raw: bytes | None) -> bool:
  """True for bytes that only occur inside (split) whitespace characters."""
  return raw is not None and raw in _whitespace_fragments()


def stop_tokens(tokenizer, vocab_size: int, eos_ids: Sequence[int]) -> StopTokens:
  """Classifies the vocabulary by its decoded text (special tokens skipped) for newline stops."""
  eos = sorted({int(i) for i in eos_ids if 0 <= int(i) < vocab_size})
  n = min(len(tokenizer), vocab_size)
  ids = [[i] for i in range(n)]
  texts = tokenizer.batch_decode(ids, skip_special_tokens=True,
                                 clean_up_tokenization_spaces=False)
  eos_set = set(eos)
  stop, soft, blank = list(eos), [], []
  partial = [i for i, t in enumerate(texts) if "\ufffd" in t and i not in eos_set]
  pieces = dict(zip(partial, tokenizer.convert_ids_to_tokens(partial))) if partial else {}
  for i, text in enumerate(texts):
    if i in eos_set:
      continue
    if not text.strip() or (i in pieces and is_whitespace_fragment(token_bytes(pieces[i]))):
      blank.append(i)  # no answer text: special (skipped), whitespace, or whitespace bytes
    head, newline, _ = text.partition("\n")
    if newline:
      (soft if not head.strip() else stop).append(i)
  return StopTokens(sorted(set(stop)), soft, blank)
