"""Sentence identity: real PTB-tokenised copies in SentiBench, hand-written variant pairs that are
one sentence and near pairs that are not, and finding sentences inside longer text."""
import json

import pytest

from sentijax.data import identity
from sentijax.data.identity import sentence_key

# Pairs written by hand: the same sentence as two sources write it.
SAME = [
    ("You ca n't go wrong here .", "You Can't Go Wrong Here."),  # STACK.md's example
    ("I do n't think so", "I don't think so"),
    ("It 's great and they 're friendly , we 've been twice", "It's great and they're friendly, "
     "we've been twice"),
    ("I 'm sure I 'd go , but I wo n't", "I'm sure I'd go, but I won't"),
    ("We 're gon na love it", "we're gonna love it"),
    ("The lobster -LRB- special -RRB- was ok", "The lobster (special) was ok"),
    ("A -LSB- sic -RSB- note -LCB- x -RCB-", "A [sic] note {x}"),
    ("He said `` wow '' loudly", 'He said "wow" loudly'),
    ("He said \u201cwow\u201d loudly", "He said 'wow' loudly"),
    ("It\u2019s fine", "It's fine"),
    ("Great food!!!", "great food ."),
    ("Wait . . . what ?", "Wait... what?"),
    ("good -- really good", "good \u2014 really good"),
    ("\uff27\uff2f\uff2f\uff24 \ufb01sh", "good fish"),  # full-width letters, fi ligature (NFKC)
    ("caf\u00e9 cr\u00e8me", "cafe creme"),
    ("cafe\u0301", "caf\u00e9"),  # combining accent vs precomposed
    ("Fish &amp; chips &quot;rock&quot; &#39;n&#x27; roll", "Fish & chips \"rock\" 'n' roll"),
    ("For my entr & eacute ; e , I chose fish", "For my entr&eacute;e, I chose fish"),
    ("Fish &amp;amp; chips", "Fish & chips"),  # escaped twice
    ("half 1\\/2 price", "half 1/2 price"),  # PTB escapes the slash
    ("open 5 - 10 pm", "open 5-10 pm"),
    ("\u00a0 spaced\tout \n text ", "spaced out text"),
]
# Near pairs that are different sentences.
DIFFERENT = [
    ("The food was good.", "The food was not good."),
    ("I loved it.", "I love it."),
    ("I can go", "I can't go"),
    ("Waited 1.5 hours", "Waited 15 hours"),
    ("Rated 5/10", "Rated 510"),
    ("The staff was rude.", "The staff was rude to us."),
    ("Best pizza in town", "Best pasta in town"),
]


def _sentences(path):
  with open(path, encoding="utf-8-sig") as f:
    return [r["sentence"] for r in json.load(f)]


def test_asqp_rest16_sentences_are_ptb_copies_of_atsa_rest16(sentibench_dir):
  """STACK.md: 1,262 of asqp_rest16's 1,264 train sentences are PTB-tokenised copies of
  atsa_rest16 sentences. Two files of the data set; the identity must pair them up."""
  asqp = _sentences(sentibench_dir / "absa/asqp_rest16/train.json")
  atsa = _sentences(sentibench_dir / "absa/atsa_rest16/train.json") + _sentences(
      sentibench_dir / "absa/atsa_rest16/test.json")
  assert len(asqp) == 1264
  assert sum(" n't " in s or " 's " in s for s in asqp) > 100  # the copies are PTB-tokenised
  raw = set(atsa)
  assert sum(s in raw for s in asqp) < 50  # so the strings themselves hardly ever agree
  atsa_keys = {sentence_key(s) for s in atsa}
  matched = sum(sentence_key(s) in atsa_keys for s in asqp)
  assert matched >= 1250, matched
  # Not by collapsing sentences together: keys stay nearly as many as distinct sentences.
  assert len(atsa_keys) >= 0.97 * len(raw)
  sst2 = _sentences(sentibench_dir / "sc/sst2/test.json")
  assert sum(sentence_key(s) in atsa_keys for s in sst2) == 0  # another data set: no pairs


@pytest.mark.parametrize("a,b", SAME)
def test_variants_are_one_sentence(a, b):
  assert sentence_key(a) == sentence_key(b) != ""


@pytest.mark.parametrize("a,b", DIFFERENT)
def test_near_pairs_stay_different(a, b):
  assert sentence_key(a) != sentence_key(b)


def test_text_without_letters_matches_nothing():
  assert sentence_key("!!! :-)") == sentence_key("\U0001F600") == ""
  index = identity.SentenceIndex({"t": ["\U0001F600", "Fine food."]})
  assert len(index) == 1 and "?!" not in index and "FINE FOOD" in index
  assert index.find("\U0001F600 ... ") == []


LONG = "The staff forgot our order twice and never apologised ."  # 46 key characters
SHORT = "Not bad ."  # 6 key characters: found only as a whole sentence


def test_find_inside_longer_text():
  index = identity.SentenceIndex({"sc/x": [LONG], "sc/y": [SHORT]})
  assert index.groups("not BAD!") == ("sc/y",)
  # Quoted, re-cased, detokenised, inside other text: found.
  assert index.find('Review says "The staff forgot our order twice and never apologised." '
                    "So: negative.") == [sentence_key(LONG)]
  assert index.find("1. THE STAFF FORGOT OUR ORDER TWICE AND NEVER APOLOGISED!2. ok") == [
      sentence_key(LONG)]
  # Glued to another word at either end: a different text, not found.
  assert index.find("Ahthe staff forgot our order twice and never apologised.") == []
  assert index.find("The staff forgot our order twice and never apologisedly") == []
  # A short sentence only as a whole line, sentence, field value or quoted span.
  for text in ("Answer: positive.\nNot bad!", "Verdict: Not bad.", "Fine. Not bad. Really.",
               "He wrote 'not bad' twice."):
    assert index.find(text) == [sentence_key(SHORT)], text
  for text in ("It was not bad at all.", "Not badly made."):
    assert index.find(text) == [], text
  # Explicit candidates replace the default ones; the long scan still runs.
  assert index.find("Sentence: Not bad.\nLabel: x", ["something else"]) == []
  assert index.find(f"Sentence: {LONG}\nLabel: x", []) == [sentence_key(LONG)]


def test_candidate_sentences_of_other_layouts():
  text = ("Text: Great pasta. Slow service!\nAnswer: positive\n"
          "Review 2: \u201cNot bad\u201d")
  got = identity.candidate_sentences(text)
  for want in ("Great pasta.", "Slow service!", "positive", "\u201cNot bad\u201d", "Not bad"):
    assert want in got, want
