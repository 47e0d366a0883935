"""Tokenise -> mask -> fit -> pack: records become fixed-length training rows (in memory).

Row schema (`pack_row`; the batches of dataset.py stack rows to [B, seq_len, ...]):

  inputs       int32    [L]     token ids fed to the model (0 on padding)
  targets      int32    [L]     next-token ids: targets[t] is the token after inputs[t] (0 on
                                padding)
  weights      float32  [L]     1.0 where targets[t] is a response token (incl. the final eos /
                                end of turn) and counts in the loss; 0.0 on prompt tokens and
                                padding
  segment_ids  int32    [L]     1..k for the k sequences packed into a row, 0 on padding;
                                attention must stay within a segment (causal AND
                                segment_ids[q] == segment_ids[k])
  positions    int32    [L]     position of each token within its own sequence (restarts at 0 per
                                segment; 0 on padding), for RoPE
  soft_ids     int32    [L, K]  ONLY with soft targets (K = `SoftTargets.width` > 0): K candidate
                                ids for targets[t] ...
  soft_probs   float32  [L, K]  ... and their probabilities (a teacher's distribution, e.g. over
                                the verbalizers' first tokens). All K zero = no soft target at t.
  soft_tail    float32  [L]     ONLY when the SoftTargets name it (an offline top-k store): the
                                teacher's mass outside the K ids
  soft_logp    float32  [L, K]  ONLY when named (a sampled store): the teacher's log-probability
                                of each id at the KD temperature

Stored rows (dataset.py) keep the soft fields only where a soft field is nonzero (for a store:
the loss positions): `soft_pos` int32 [S] and each soft field [S, ...] (`compact_row`), expanded
back to the dense [L, ...] fields when read (`expand_row`).

The loss is sum(weights * CE(logits, targets)) / sum(weights); a soft-target term uses the
positions where soft_probs.sum(-1) > 0.

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
dropped. Both are counted in the stats. Packing is greedy first-fit in corpus order into rows of
seq_len; no sequence is split across rows.
"""
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from sentijax.data.records import DataError, Record
from sentijax.data.spec import DataSpec
from sentijax.data.tokenizer import vocab_fingerprint

logger = logging.getLogger("sentijax")

FIELDS = ("inputs", "targets", "weights", "segment_ids", "positions")
SOFT_FIELDS = ("soft_ids", "soft_probs")
EXTRA_SOFT_FIELDS = ("soft_tail", "soft_logp")  # per position [L] / per entry [L, K]
_FIELD_DTYPES = {"inputs": np.int32, "targets": np.int32, "weights": np.float32,
                 "segment_ids": np.int32, "positions": np.int32, "soft_ids": np.int32,
                 "soft_probs": np.float32, "soft_tail": np.float32, "soft_logp": np.float32,
                 "soft_pos": np.int32}
_TOKENIZE_CHUNK = 1024
_PROB_SUM_SLACK = 1e-4  # fp32 rounding of probabilities that sum to 1


def row_spec(seq_len: int, soft_width: int = 0, extra_fields: Sequence[str] = (),
             compact: bool = False) -> dict[str, tuple[tuple[int | None, ...], Any]]:
  """name -> (shape, dtype) of one packed row; soft fields only when soft_width > 0.
  `compact`: the stored layout (soft fields at `soft_pos` only: first dimension None)."""
  spec = {name: ((seq_len,), _FIELD_DTYPES[name]) for name in FIELDS}
  if soft_width:
    length = None if compact else seq_len
    if compact:
      spec["soft_pos"] = ((None,), _FIELD_DTYPES["soft_pos"])
    for name in SOFT_FIELDS + tuple(f for f in EXTRA_SOFT_FIELDS if f in extra_fields):
      shape = (length,) if name == "soft_tail" else (length, soft_width)
      spec[name] = (shape, _FIELD_DTYPES[name])
  return spec


def empty_row(seq_len: int, soft_width: int = 0, extra_fields: Sequence[str] = ()
              ) -> dict[str, np.ndarray]:
  """An all-padding row (zeros everywhere)."""
  return {name: np.zeros(shape, dtype) for name, (shape, dtype) in
          row_spec(seq_len, soft_width, extra_fields).items()}


def _soft_names(row: dict) -> list[str]:
  return [n for n in SOFT_FIELDS + EXTRA_SOFT_FIELDS if n in row]


def compact_row(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The stored layout of a packed row: soft fields only at the positions where one is nonzero
  (`soft_pos`); rows without soft fields unchanged."""
  names = _soft_names(row)
  if not names:
    return row
  used = np.zeros(len(row["inputs"]), bool)
  for name in names:
    used |= row[name].reshape(len(used), -1).any(-1)
  pos = np.flatnonzero(used).astype(np.int32)
  return {k: v for k, v in row.items() if k not in names} | {"soft_pos": pos} | {
      name: row[name][pos] for name in names}


def expand_row(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Inverse of `compact_row`: the dense [L, ...] soft fields."""
  if "soft_pos" not in row:
    return row
  seq_len, pos = len(row["inputs"]), row["soft_pos"]
  out = {k: v for k, v in row.items() if k != "soft_pos"}
  for name in _soft_names(row):
    dense = np.zeros((seq_len,) + row[name].shape[1:], _FIELD_DTYPES[name])
    dense[pos] = row[name]
    out[name] = dense
  return out


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


# --------------------------------------------------------------------------- packing


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
  """Greedy first-fit bin packing in order: each item goes to the first row with room.

  A max-segment-tree over remaining row capacities makes each placement O(log n).
  """
  if any(length > capacity or length <= 0 for length in lengths):
    raise ValueError(f"Every length must be in [1, {capacity}].")
  size = 1
  while size < max(len(lengths), 1):
    size *= 2
  tree = [capacity] * (2 * size)
  rows: list[list[int]] = []
  for item, length in enumerate(lengths):
    node = 1
    while node < size:
      node = 2 * node if tree[2 * node] >= length else 2 * node + 1
    row = node - size
    tree[node] -= length
    node //= 2
    while node:
      tree[node] = max(tree[2 * node], tree[2 * node + 1])
      node //= 2
    if row == len(rows):
      rows.append([])
    rows[row].append(item)
  return rows


def pack_row(sequences: Sequence[TokenizedSequence], seq_len: int, soft_width: int = 0,
             extra_fields: Sequence[str] = ()) -> dict[str, np.ndarray]:
  """One packed row (see the module docstring) from sequences with total n - 1 <= seq_len."""
  row = empty_row(seq_len, soft_width, extra_fields)
  offset = 0
  for segment, sequence in enumerate(sequences, start=1):
    if sequence.soft_width != soft_width:
      raise ValueError(f"A sequence has soft targets of width {sequence.soft_width}; the row "
                       f"expects width {soft_width}.")
    length = len(sequence.tokens) - 1
    end = offset + length
    if end > seq_len:
      raise ValueError(f"Sequences of total length {end} do not fit seq_len={seq_len}.")
    row["inputs"][offset:end] = sequence.tokens[:-1]
    row["targets"][offset:end] = sequence.tokens[1:]
    row["weights"][offset:end] = sequence.loss_mask[1:]
    row["segment_ids"][offset:end] = segment
    row["positions"][offset:end] = np.arange(length)
    if soft_width:  # aligned with targets: the distribution for tokens[t] sits at t - 1
      for name in _soft_names(row):
        value = getattr(sequence, name)
        if value is None:
          raise ValueError(f"A sequence has no {name}; the row expects it.")
        row[name][offset:end] = value[1:]
    offset = end
  return row


@dataclasses.dataclass
class PackedRows:
  """Fitted sequences and their first-fit assignment to rows; `iter_rows()` builds the rows.

  With soft targets, `with_soft(i)` gives fitted sequence i with its soft targets (fn runs
  then, row by row); iterating the rows adds "num_soft_targets" to `stats`.
  """
  sequences: list[TokenizedSequence]
  rows: list[list[int]]
  seq_len: int
  soft_width: int
  stats: dict
  with_soft: Callable[[int], TokenizedSequence] | None = None
  extra_fields: tuple[str, ...] = ()

  def iter_rows(self) -> Iterator[dict[str, np.ndarray]]:
    soft_positions = 0
    for row in self.rows:
      get = self.with_soft or self.sequences.__getitem__
      out = pack_row([get(i) for i in row], self.seq_len, self.soft_width, self.extra_fields)
      if self.soft_width:
        soft_positions += int((out["soft_probs"].sum(-1) > 0).sum())
      yield out
    if self.soft_width:
      self.stats["num_soft_targets"] = soft_positions


def pack_records(records: Sequence[Record], tokenizer: Any, spec: DataSpec,
                 soft_targets: SoftTargets | None = None, show_progress: bool = True
                 ) -> PackedRows:
  """Tokenise -> mask -> (soft targets) -> fit to `spec.seq_len` -> first-fit rows, with stats."""
  if not records:
    raise DataError("No records to pack.")
  raw, token_stats = tokenize_records(records, tokenizer, spec.chat_template, show_progress)
  counts = {"kept": 0, "truncated_prompt": 0, "truncated_response": 0, "dropped_too_long": 0,
            "dropped_empty_response": 0}
  sequences, sources = [], []
  for i, sequence in enumerate(raw):
    fitted, outcome = fit_sequence(sequence, spec.seq_len, spec.truncation,
                                   tokenizer.bos_token_id)
    counts[outcome] += 1
    if fitted is not None:
      sequences.append(fitted)
      sources.append(i)
  if not sequences:
    raise DataError(f"All {len(records)} records were dropped ({counts}); raise data.seq_len or "
                    "use data.truncation='left_prompt'.")
  rows = first_fit([len(s.tokens) - 1 for s in sequences], spec.seq_len)
  num_tokens = sum(len(s.tokens) - 1 for s in sequences)
  stats = token_stats | counts | {
      "records_in": len(records), "records_used": len(sequences), "num_rows": len(rows),
      "num_tokens": num_tokens, "seq_len": spec.seq_len, "truncation": spec.truncation,
      "num_loss_tokens": int(sum(int(s.loss_mask[1:].sum()) for s in sequences)),
      "fill_ratio": num_tokens / (len(rows) * spec.seq_len)}
  if soft_targets is None:
    return PackedRows(sequences, rows, spec.seq_len, 0, stats)

  def with_soft(i: int) -> TokenizedSequence:  # the same fit, now with the soft targets
    j = sources[i]
    return fit_sequence(soft_targets.attach(records[j], raw[j]), spec.seq_len, spec.truncation,
                        tokenizer.bos_token_id)[0]

  stats |= {"soft_width": soft_targets.width, "soft_key": soft_targets.key,
            "soft_fields": list(SOFT_FIELDS + soft_targets.extra_fields)}
  return PackedRows(sequences, rows, spec.seq_len, soft_targets.width, stats, with_soft,
                    soft_targets.extra_fields)
