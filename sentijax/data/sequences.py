"""Records -> tokenised sequences (`TokenizedSequence`), fitted to a row length; the soft-target
contract. `data/packing.py` packs the fitted sequences into training rows.

Soft-target contract. `TokenizedSequence.soft_ids` / `.soft_probs` ([n, K], optional) are aligned
with `tokens`: row t is the distribution for tokens[t] (like loss_mask[t]); row 0 is never used
(no position predicts the first token). Packing shifts them with the tokens, so in a packed row
soft_*[p] belongs to targets[p] (p = offset + t - 1 for tokens[t]); truncation drops the same
token positions from them. A distribution with fewer than K entries is padded with id 0, prob 0.
`SoftTargets(width, fn, key, extra_fields)`, given to `pack_records` / `dataset.build_train_val`,
attaches them: `fn(record, sequence)` returns ([n, K] ids, [n, K] probs), a dict of the soft
fields (with `extra_fields`), or None (no soft target for that record: zeros); `key` names fn's
logic and settings and joins the cache key. fn runs when a row holding the record is built (one
record at a time: all records' soft targets are never in memory together). `soft_targets_at`
builds the arrays for one distribution at one token (e.g. the first response token,
`first_response_index`). Probabilities must be finite, >= 0, and sum to <= 1 per position (a
top-K truncation may leave mass out). Without soft targets rows and batches carry only the five
fields above.

Per record: with `chat_template=True` and a tokenizer that has one, the conversation
[user: prompt (or record.messages), assistant: response] is rendered with the chat template: the
prompt rendering with add_generation_prompt=True, then the template's own text before the
assistant's content (prompt too: e.g. Qwen3's empty think block), then the response string as it
is (a template that trims content would otherwise turn " positive" into "positive", a token
SentiBench never scores), then the end of turn; the loss covers the response and the end of turn.
Each piece is tokenised on its own, as the student sees the prompt at generation time (stats
count the rare templates that render the prompt differently once answered, or rewrite the
content). Otherwise raw: [bos] + tok(prompt) + tok(response) + [eos], loss on the response tokens
and eos. `sequence_length_fn` gives the token count of a (prompt, response) by the same code.
A sequence of n tokens becomes one example of n - 1 positions (inputs = tokens[:-1], targets =
tokens[1:], weights = loss_mask[1:]), so a sequence fits a row when n - 1 <= seq_len.

Pre-tokenised records (`Record.tokens`, e.g. from the offline top-k store): their token ids and
loss mask are used as they are (the teacher's ids: re-tokenising text could shift positions);
they must come from the same vocabulary as `tokenizer` (`tokenizer.vocab_fingerprint`, when the
record names one) and hold ids below len(tokenizer), else a DataError names the record and its
source file. Records without tokens in the same list are tokenised as above.

Truncation (`spec.truncation`): `left_prompt` drops prompt tokens from the left (after bos) and
then the response's tail; `drop` skips over-long records. Records with no loss token left are
dropped. Both are counted in the stats.
"""
import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from sentijax.data.records import DataError, Record
from sentijax.data.tokenizer import vocab_fingerprint

logger = logging.getLogger("sentijax")

SOFT_FIELDS = ("soft_ids", "soft_probs")
EXTRA_SOFT_FIELDS = ("soft_tail", "soft_logp")  # per position [L] / per entry [L, K]
_TOKENIZE_CHUNK = 1024
_PROB_SUM_SLACK = 1e-4  # fp32 rounding of probabilities that sum to 1


@dataclasses.dataclass(frozen=True)
class TokenizedSequence:
  """One tokenised record before packing; soft_* (optional) are aligned with `tokens`."""
  tokens: np.ndarray  # int32 [n]
  loss_mask: np.ndarray  # int32 [n], 1 on response tokens
  soft_ids: np.ndarray | None = None  # int32 [n, K]
  soft_probs: np.ndarray | None = None  # float32 [n, K], 0 where absent
  soft_tail: np.ndarray | None = None  # float32 [n] (EXTRA_SOFT_FIELDS)
  soft_logp: np.ndarray | None = None  # float32 [n, K]

  @property
  def soft_width(self) -> int:
    return 0 if self.soft_ids is None else int(self.soft_ids.shape[1])

  def keep(self, mask: np.ndarray) -> "TokenizedSequence":
    """The sequence with only the token positions where `mask` is True."""
    return TokenizedSequence(*(None if x is None else x[mask] for x in (
        self.tokens, self.loss_mask, self.soft_ids, self.soft_probs, self.soft_tail,
        self.soft_logp)))


SoftTargetFn = Callable[[Record, TokenizedSequence], "tuple[np.ndarray, np.ndarray] | None"]


@dataclasses.dataclass(frozen=True)
class SoftTargets:
  """Per-token soft targets for `pack_records`: width K, the function, and its cache-key part."""
  width: int
  fn: SoftTargetFn
  key: str
  extra_fields: tuple[str, ...] = ()  # of EXTRA_SOFT_FIELDS, in the dict fn returns

  def __post_init__(self):
    if self.width <= 0:
      raise DataError(f"SoftTargets.width must be > 0, got {self.width}.")
    if not self.key:
      raise DataError("SoftTargets.key must name the soft-target logic (it joins the cache key).")
    if not set(self.extra_fields) <= set(EXTRA_SOFT_FIELDS):
      raise DataError(f"SoftTargets.extra_fields={self.extra_fields}: expected a subset of "
                      f"{EXTRA_SOFT_FIELDS}.")

  def attach(self, record: Record, sequence: TokenizedSequence) -> TokenizedSequence:
    """`sequence` with fn's soft targets (zeros when fn returns None), checked."""
    n, k = len(sequence.tokens), self.width
    out = self.fn(record, sequence)
    extra = {"soft_tail": np.zeros(n, np.float32), "soft_logp": np.zeros((n, k), np.float32)}
    extra = {name: extra[name] for name in self.extra_fields}
    if out is None:
      ids, probs = np.zeros((n, k), np.int32), np.zeros((n, k), np.float32)
    else:
      if isinstance(out, dict):
        extra = self._check_extra(record, out, n)
        out = (out["soft_ids"], out["soft_probs"])
      ids, probs = np.asarray(out[0]), np.asarray(out[1])
      where = f"soft targets of record {record.id!r}"
      if ids.shape != (n, k) or probs.shape != (n, k):
        raise DataError(f"{where}: shapes {ids.shape} / {probs.shape}, expected ({n}, {k}) "
                        "(tokens x SoftTargets.width).")
      if not np.issubdtype(ids.dtype, np.integer) or (ids < 0).any():
        raise DataError(f"{where}: soft_ids must be non-negative integers.")
      probs = probs.astype(np.float32)
      if not np.isfinite(probs).all() or (probs < 0).any():
        raise DataError(f"{where}: soft_probs must be finite and >= 0.")
      if (probs.sum(-1) > 1 + _PROB_SUM_SLACK).any():
        raise DataError(f"{where}: soft_probs sum to more than 1 at a position.")
      ids = ids.astype(np.int32)
    return dataclasses.replace(sequence, soft_ids=ids, soft_probs=probs, **extra)

  def _check_extra(self, record: Record, out: dict, n: int) -> dict[str, np.ndarray]:
    where = f"soft targets of record {record.id!r}"
    missing = [f for f in SOFT_FIELDS + self.extra_fields if f not in out]
    if missing:
      raise DataError(f"{where}: fields {missing} missing (SoftTargets.extra_fields="
                      f"{self.extra_fields}).")
    extra = {}
    for name in self.extra_fields:
      value = np.asarray(out[name], np.float32)
      shape = (n,) if name == "soft_tail" else (n, self.width)
      if value.shape != shape or not np.isfinite(value).all():
        raise DataError(f"{where}: {name} must be finite of shape {shape}, got {value.shape}.")
      if name == "soft_tail" and ((value < 0) | (value > 1 + _PROB_SUM_SLACK)).any():
        raise DataError(f"{where}: soft_tail must be a probability in [0, 1].")
      if name == "soft_logp" and (value > _PROB_SUM_SLACK).any():
        raise DataError(f"{where}: soft_logp must be log-probabilities (<= 0).")
      extra[name] = value
    return extra


def first_response_index(sequence: TokenizedSequence) -> int:
  """Index into `tokens` of the first loss (response) token."""
  if not sequence.loss_mask.any():
    raise DataError("The sequence has no response token.")
  return int(np.argmax(sequence.loss_mask))


def soft_targets_at(num_tokens: int, width: int, index: int, ids: Sequence[int],
                    probs: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  """([n, K] ids, [n, K] probs): one distribution (<= K entries) at token `index`, 0 elsewhere."""
  if len(ids) != len(probs) or len(ids) > width:
    raise DataError(f"soft_targets_at: {len(ids)} ids and {len(probs)} probs for width {width}.")
  soft_ids = np.zeros((num_tokens, width), np.int32)
  soft_probs = np.zeros((num_tokens, width), np.float32)
  soft_ids[index, :len(ids)] = ids
  soft_probs[index, :len(probs)] = probs
  return soft_ids, soft_probs


# --------------------------------------------------------------------------- tokenisation


def _has_chat_template(tokenizer: Any) -> bool:
  return bool(getattr(tokenizer, "chat_template", None))


def uses_chat_template(tokenizer: Any, chat_template: bool) -> bool:
  """Whether records are rendered with the tokenizer's chat template."""
  return bool(chat_template and _has_chat_template(tokenizer))


def _encode_batch(tokenizer: Any, texts: list[str]) -> list[list[int]]:
  if not texts:
    return []
  return list(tokenizer(texts, add_special_tokens=False)["input_ids"])


# Stands in for the assistant's content when locating it in the template's rendering: no
# whitespace at its ends (templates that trim content keep it whole), nothing a template parses.
_CONTENT_MARK = "@@sentijax-response-7d1c@@"


def _render(tokenizer: Any, record: Record, answer: str | None) -> str:
  """The conversation rendered with the generation prompt (answer None) or answered."""
  conversation = record.messages or [{"role": "user", "content": record.prompt}]
  if answer is None:
    return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
  return tokenizer.apply_chat_template(
      conversation + [{"role": "assistant", "content": answer}], tokenize=False)


def _chat_segments(tokenizer: Any, record: Record) -> tuple[list[tuple[str, int]] | None,
                                                           tuple[str, str], str]:
  """How a chat-templated record is tokenised: (segments, (prompt, full) renderings, outcome).

  segments: [(text, loss bit)], each text tokenised on its own, or None when the template
  renders the prompt differently once answered (then the common token prefix of the two
  renderings marks the boundary). The template's own text before the assistant's content (e.g.
  Qwen3's empty think block, which its non-thinking generation prompt already holds) is prompt;
  the content is the record's response string as it is, so a template that trims content does
  not turn the answer " positive" into "positive" (SentiBench and the soft targets score the
  first token of " positive"); the end of turn is response. A template that rewrites the content
  beyond whitespace (outcome "rewritten") keeps its own rendering, all of it response.
  """
  prompt_text = _render(tokenizer, record, None)
  full_text = _render(tokenizer, record, record.response)
  if not full_text.startswith(prompt_text):
    return None, (prompt_text, full_text), "fallback"
  tail = full_text[len(prompt_text):]
  marked = _render(tokenizer, record, _CONTENT_MARK)
  parts = marked[len(prompt_text):].split(_CONTENT_MARK)
  if marked.startswith(prompt_text) and len(parts) == 2:
    pre, post = parts
    rendered = tail[len(pre):len(tail) - len(post)]
    if (tail.startswith(pre) and tail.endswith(post) and len(tail) >= len(pre) + len(post)
        and rendered.strip() == record.response.strip()):
      return ([(prompt_text, 0), (pre, 0), (record.response, 1), (post, 1)],
              (prompt_text, full_text), "split")
  return [(prompt_text, 0), (tail, 1)], (prompt_text, full_text), "rewritten"


def _common_prefix_sequence(p_ids: list[int], t_ids: list[int]) -> tuple[list[int], list[int]]:
  boundary = 0
  while boundary < min(len(p_ids), len(t_ids)) and p_ids[boundary] == t_ids[boundary]:
    boundary += 1
  return t_ids, [0] * boundary + [1] * (len(t_ids) - boundary)


def _chat_pairs(tokenizer: Any, records: Sequence[Record], stats: dict
                ) -> list[tuple[list[int], list[int]]]:
  """(tokens, loss mask) of chat-templated records; texts tokenised in one batch."""
  plans = [_chat_segments(tokenizer, r) for r in records]
  texts: list[str] = []
  for segments, rendered, outcome in plans:
    texts.extend([t for t, _ in segments] if segments is not None else list(rendered))
    if outcome == "fallback":
      stats["chat_boundary_fallback"] += 1
    elif outcome == "rewritten":
      stats["chat_content_rewritten"] += 1
  ids = iter(_encode_batch(tokenizer, texts))
  pairs = []
  for segments, _, _ in plans:
    if segments is None:
      pairs.append(_common_prefix_sequence(next(ids), next(ids)))
      continue
    tokens, mask = [], []
    for _, bit in segments:
      piece = next(ids)
      tokens += piece
      mask += [bit] * len(piece)
    pairs.append((tokens, mask))
  return pairs


def _raw_pairs(tokenizer: Any, records: Sequence[Record]) -> list[tuple[list[int], list[int]]]:
  """[bos] + prompt + response + [eos]: loss on the response and eos."""
  bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
  eos_id = tokenizer.eos_token_id
  return [(bos + p_ids + r_ids + [eos_id], [0] * (len(bos) + len(p_ids)) + [1] * (len(r_ids) + 1))
          for p_ids, r_ids in zip(_encode_batch(tokenizer, [r.prompt for r in records]),
                                  _encode_batch(tokenizer, [r.response for r in records]))]


def sequence_length_fn(tokenizer: Any, chat_template: bool) -> Callable[[str, str], int]:
  """(prompt, response) -> the number of tokens `tokenize_records` makes of that record (the
  same code), for builders that must fit prompts to `data.seq_len` before packing."""
  use_chat = uses_chat_template(tokenizer, chat_template)
  if not use_chat and tokenizer.eos_token_id is None:
    raise DataError("The tokenizer has no eos token; the raw format needs one to end responses.")

  def length(prompt: str, response: str) -> int:
    record = [Record(id="", prompt=prompt, response=response)]
    if use_chat:
      return len(_chat_pairs(tokenizer, record, {"chat_boundary_fallback": 0,
                                                 "chat_content_rewritten": 0})[0][0])
    return len(_raw_pairs(tokenizer, record)[0][0])
  return length


def pretokenized_sequence(record: Record, tokenizer: Any, vocab: str) -> TokenizedSequence:
  """The record's own token ids and loss mask, checked against `tokenizer` (vocab fingerprint
  `vocab`); DataError naming the record and its source."""
  t = record.tokens
  where = f"{t.source + ': ' if t.source else ''}record {record.id!r}"
  if t.vocab and t.vocab != vocab:
    raise DataError(
        f"{where}: its token ids come from another vocabulary (fingerprint {t.vocab[:16]}) than "
        f"the student's tokenizer {getattr(tokenizer, 'name_or_path', '')!r} ({vocab[:16]}); "
        "train with the tokenizer that made them (model.tokenizer) or rebuild them with this one.")
  if len(t.ids) < 2 or t.ids.shape != t.loss_mask.shape:
    raise DataError(f"{where}: token_ids and loss_mask need the same length >= 2.")
  if int(t.ids.max()) >= len(tokenizer) or int(t.ids.min()) < 0:
    raise DataError(f"{where}: token id {int(t.ids.max())} is outside the tokenizer's "
                    f"{len(tokenizer)} ids.")
  return TokenizedSequence(t.ids.astype(np.int32), t.loss_mask.astype(np.int32))


def tokenize_records(records: Sequence[Record], tokenizer: Any, chat_template: bool,
                     show_progress: bool = True) -> tuple[list[TokenizedSequence], dict]:
  """Tokenises every record into (tokens, loss_mask) (pre-tokenised records: their own, checked);
  returns the sequences and stats."""
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  use_chat = uses_chat_template(tokenizer, chat_template)
  if chat_template and not use_chat:
    logger.warning("data.chat_template=True but the tokenizer has no chat template: using the "
                   "raw [bos] prompt response [eos] format.")
  if not use_chat and tokenizer.eos_token_id is None:
    raise DataError("The tokenizer has no eos token; the raw format needs one to end responses.")
  stats = {"mode": "chat" if use_chat else "raw", "chat_boundary_fallback": 0,
           "chat_content_rewritten": 0, "pretokenized": 0}
  sequences: list[TokenizedSequence] = []
  vocab = (vocab_fingerprint(tokenizer) if any(r.tokens is not None for r in records) else "")
  progress = tqdm(total=len(records), desc="Tokenising", unit="rec", disable=not show_progress)
  for start in range(0, len(records), _TOKENIZE_CHUNK):
    given = {i: pretokenized_sequence(r, tokenizer, vocab)
             for i, r in enumerate(records[start:start + _TOKENIZE_CHUNK]) if r.tokens is not None}
    stats["pretokenized"] += len(given)
    chunk = [r for r in records[start:start + _TOKENIZE_CHUNK] if r.tokens is None]
    pairs = _chat_pairs(tokenizer, chunk, stats) if use_chat else _raw_pairs(tokenizer, chunk)
    made = iter(TokenizedSequence(np.asarray(tokens, np.int32), np.asarray(mask, np.int32))
                for tokens, mask in pairs)
    n = len(chunk) + len(given)
    sequences.extend(given[i] if i in given else next(made) for i in range(n))
    progress.update(n)
  progress.close()
  return sequences, stats


def fit_sequence(sequence: TokenizedSequence, seq_len: int, truncation: str, bos_id: int | None
                 ) -> tuple[TokenizedSequence | None, str]:
  """Fits a sequence to n - 1 <= seq_len. Returns (sequence or None, what happened)."""
  max_tokens = seq_len + 1
  tokens, mask = sequence.tokens, sequence.loss_mask
  outcome = "kept"
  if len(tokens) > max_tokens:
    if truncation == "drop":
      return None, "dropped_too_long"
    excess = len(tokens) - max_tokens
    num_prompt = int(np.argmax(mask)) if mask.any() else len(mask)
    keep_head = 1 if num_prompt and bos_id is not None and tokens[0] == bos_id else 0
    drop = min(excess, num_prompt - keep_head)
    keep = np.ones(len(tokens), bool)
    keep[keep_head:keep_head + drop] = False
    excess -= drop
    if excess:
      keep[len(tokens) - excess:] = False
      outcome = "truncated_response"
    else:
      outcome = "truncated_prompt"
    sequence = sequence.keep(keep)
  if len(sequence.tokens) < 2 or not sequence.loss_mask[1:].any():
    return None, "dropped_empty_response"
  return sequence, outcome
