"""KnowDist analysis perspectives: instruction templates applied to a user text.

A KnowDist teacher is asked to analyse one user text (review, tweet, post) from one perspective;
the student learns to produce the analysis. `knowdist_prompt(text, perspective)` renders the prompt,
`perspective_for(record_id, seed)` picks a perspective deterministically, so a corpus generated or
rebuilt twice gets the same prompt for the same record.

Besides the seven analysis perspectives in `PERSPECTIVES` there is one non-analysis template,
`REWRITE`, for teacher corpora in which the teacher restated the review in its own words (the
Mixtral review sample in ../shared stores both kinds of responses).
"""
import hashlib

POLARITY = "polarity"
ASPECTS = "aspects"
EMOTIONS = "emotions"
INTENT = "intent"
IRONY = "irony"
STANCE = "stance"
INTENSITY = "intensity"
REWRITE = "rewrite"

PERSPECTIVES: tuple[str, ...] = (POLARITY, ASPECTS, EMOTIONS, INTENT, IRONY, STANCE, INTENSITY)

_INSTRUCTIONS: dict[str, str] = {
    POLARITY: (
        "Determine the overall sentiment polarity of the text below (positive, negative, neutral "
        "or mixed). State the polarity first, then explain the reasons for it, quoting the words "
        "and phrases that reveal the author's attitude."
    ),
    ASPECTS: (
        "Identify the opinion targets and aspects the author evaluates in the text below. For "
        "each one, give the target, the aspect, the sentiment expressed about it (positive, "
        "negative or neutral) and a short justification based on the wording."
    ),
    EMOTIONS: (
        "Describe the emotions the author expresses in the text below (for example joy, anger, "
        "sadness, fear, surprise, disgust, trust or anticipation). Name the dominant emotion, "
        "mention any secondary ones, and point to the words that convey them."
    ),
    INTENT: (
        "Explain the author's intent in writing the text below: are they recommending, warning, "
        "complaining, praising, asking for help, venting or informing? Describe the purpose and "
        "who the message seems addressed to."
    ),
    IRONY: (
        "Analyse whether the text below is ironic or sarcastic. Say whether the literal meaning "
        "differs from the intended meaning, identify the cues (exaggeration, contrast, "
        "punctuation, context) and state the sentiment the author actually means."
    ),
    STANCE: (
        "Determine the author's stance in the text below: what position do they take toward the "
        "main subject (in favour, against or neutral)? Explain how the text signals this stance "
        "and whether it is stated explicitly or implied."
    ),
    INTENSITY: (
        "Rate the strength of the sentiment in the text below on a scale from 1 (very weak) to 5 "
        "(very strong) and give its direction (positive or negative). Explain which intensifiers, "
        "hedges, punctuation or word choices raise or lower the intensity."
    ),
    REWRITE: (
        "Rewrite the review below in your own words as a fluent first-person account, keeping "
        "every opinion, its sentiment and its strength unchanged."
    ),
}


def knowdist_prompt(text: str, perspective: str) -> str:
  """The KnowDist instruction for `perspective` applied to `text`."""
  if perspective not in _INSTRUCTIONS:
    raise ValueError(
        f"Unknown KnowDist perspective {perspective!r}; expected one of "
        f"{sorted(_INSTRUCTIONS)}.")
  if not isinstance(text, str) or not text.strip():
    raise ValueError("knowdist_prompt needs a non-empty text.")
  return f"{_INSTRUCTIONS[perspective]}\n\nText: {text.strip()}\n"


def perspective_for(record_id: str, seed: int = 0) -> str:
  """A perspective from `PERSPECTIVES` chosen by a hash of (seed, record_id): stable across runs."""
  digest = hashlib.sha256(f"{seed}:{record_id}".encode("utf-8")).digest()
  return PERSPECTIVES[int.from_bytes(digest[:8], "big") % len(PERSPECTIVES)]


def template_names() -> tuple[str, ...]:
  """Every template name `knowdist_prompt` accepts (the analysis perspectives plus REWRITE)."""
  return tuple(_INSTRUCTIONS)
