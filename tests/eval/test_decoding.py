"""Decode clean-up (transformers 4.44) and the answer stop classes (special tokens, whitespace
bytes): the official answer is what the harness's regex takes from the WHOLE decoded text."""

import pytest

from sentijax.eval import decoding, parsers

# The 4.44 results of `batch_decode(..., skip_special_tokens=True)` with clean-up on.
CLEANUP_CASES = [
    ("[('Ray 's', 'positive')]", "[('Ray's', 'positive')]"),
    ("it is n't good , is it ?", "it isn't good, is it?"),
    ("I 'm sure we 've seen they 're here .", "I'm sure we've seen they're here."),
    ("wow !", "wow!"),
    ("rock ' n roll", "rock'n roll"),
    ("a  ,b", "a ,b"),  # one space removed per match, left to right
    (" .", "."),
    ("no change: 'quoted' words", "no change: 'quoted' words"),
]


@pytest.mark.parametrize("text,want", CLEANUP_CASES)
def test_clean_up_matches_transformers_444(text, want):
  assert decoding.clean_up_tokenization(text) == want


def test_clean_up_equals_transformers_method():
  from transformers import PreTrainedTokenizerBase
  ref = PreTrainedTokenizerBase.clean_up_tokenization
  for text, _ in CLEANUP_CASES:
    assert decoding.clean_up_tokenization(text) == ref(None, text)


class _Tok:
  def __init__(self, **init_kwargs):
    self.init_kwargs = init_kwargs


def test_cleanup_modes():
  assert decoding.cleanup_enabled(_Tok(clean_up_tokenization_spaces=True), "auto")
  assert not decoding.cleanup_enabled(_Tok(clean_up_tokenization_spaces=False), "auto")
  assert decoding.cleanup_enabled(_Tok(), "auto")  # unset: 4.44's default was True
  assert not decoding.cleanup_enabled(_Tok(clean_up_tokenization_spaces=True), "off")
  assert decoding.cleanup_enabled(_Tok(clean_up_tokenization_spaces=False), "on")
  with pytest.raises(ValueError, match="decode_cleanup"):
    decoding.cleanup_enabled(_Tok(), "maybe")


@pytest.fixture(scope="module")
def tok():
  """Byte-level BPE with added special tokens that `all_special_ids` does not list (Llama-3's
  header and reserved tokens are such tokens)."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  backend = Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  backend.train_from_iterator(["[('food', 'positive')]\n", "Label: x\n y"] * 20, trainer=trainer)
  backend.add_special_tokens([AddedToken("<|reserved_0|>", special=True),
                              AddedToken("<|start_header_id|>", special=True)])
  return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def _first_stop(tokens, stops):
  """The sampling loop's rule on a token list: index after the stopping token, or len."""
  hard, soft, blank = set(stops.stop_ids), set(stops.soft_stop_ids), set(stops.blank_ids)
  text = False
  for j, t in enumerate(tokens):
    if t in hard or (t in soft and text):
      return j + 1
    text |= t not in blank
  return len(tokens)


def _official_answer(tok, prompt_ids, gen_ids):
  full = tok.decode(prompt_ids + gen_ids, skip_special_tokens=True)
  matches = parsers.LABEL_PATTERN.findall(full)
  return parsers.strip_code_fences(matches[1])


def test_special_and_whitespace_byte_tokens_are_blank(tok):
  ids = tok.convert_tokens_to_ids
  reserved, header = ids("<|reserved_0|>"), ids("<|start_header_id|>")
  assert reserved not in tok.all_special_ids and header not in tok.all_special_ids
  nbsp_lead, nbsp_tail = ids("Â"), ids("ł")  # the two bytes of U+00A0 (NBSP)
  copyright_tail = ids("©")  # byte 0xA9: also the last byte of U+2029 (E2 80 A9)
  letter = ids("x")
  stops = decoding.stop_tokens(tok, len(tok), [tok.eos_token_id])
  blank = set(stops.blank_ids)
  assert {reserved, header, nbsp_lead, nbsp_tail, ids("Ġ"), ids("Ċ")} <= blank
  assert copyright_tail in blank  # part of U+2029 PARAGRAPH SEPARATOR's encoding: kept safe
  assert letter not in blank and ids("[") not in blank
  assert ids("Ċ") in stops.soft_stop_ids and tok.eos_token_id in stops.stop_ids
  assert reserved not in stops.stop_ids and reserved not in stops.soft_stop_ids


@pytest.mark.parametrize("pieces", [
    ["<|start_header_id|>", "Ċ", "[", "x", "]", "Ċ", "y"],  # special token before the newline
    ["<|reserved_0|>", "Ċ", "x", "Ċ"],
    ["Ġ", "Â", "ł", "Ċ", "x", "Ċ", "y"],  # NBSP split into byte pieces, then a newline
    ["x", "Ċ", "y"],
    ["Ċ", "Ċ", "x", "y", "Ċ"],
])
def test_stop_rule_keeps_the_official_answer(tok, pieces):
  prompt = tok("Sentence: a\nLabel: b\n\nSentence: c\nLabel:", add_special_tokens=False)[
      "input_ids"]
  gen = tok.convert_tokens_to_ids(pieces)
  stops = decoding.stop_tokens(tok, len(tok), [tok.eos_token_id])
  n = _first_stop(gen, stops)
  ours = parsers.extract_answer(decoding.decode(tok, [gen[:n]], cleanup=False)[0])
  want = _official_answer(tok, prompt, gen)
  assert want and ours == want


def test_stop_rule_without_blank_specials_would_cut_the_answer(tok):
  """The case the rule fixes: a special token counted as text ends the answer at its newline."""
  gen = tok.convert_tokens_to_ids(["<|start_header_id|>", "Ċ", "x", "Ċ"])
  stops = decoding.stop_tokens(tok, len(tok), [tok.eos_token_id])
  broken = decoding.StopTokens(stops.stop_ids, stops.soft_stop_ids,
                               [i for i in stops.blank_ids if i != gen[0]])
  assert _first_stop(gen, broken) == 2 and _first_stop(gen, stops) == 4


def test_decode_applies_cleanup(tok):
  gen = tok(" a ,b 's", add_special_tokens=False)["input_ids"]
  assert decoding.decode(tok, [gen], cleanup=True) == [" a,b's"]
  assert decoding.decode(tok, [gen], cleanup=False) == [" a ,b 's"]
