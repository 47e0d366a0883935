"""KnowDist perspectives: templates, deterministic choice."""
import collections

import pytest

from sentijax.data import prompts

REQUIRED = ("polarity", "aspects", "emotions", "intent", "irony", "stance", "intensity")
# Words each instruction must use, so the teacher is asked for that perspective (hand-written).
CUES = {"polarity": ("sentiment polarity", "positive, negative, neutral or mixed"),
        "aspects": ("opinion targets", "aspect"),
        "emotions": ("emotions", "dominant emotion"),
        "intent": ("intent", "recommending", "complaining"),
        "irony": ("ironic or sarcastic", "literal meaning"),
        "stance": ("stance", "in favour, against or neutral"),
        "intensity": ("1 (very weak) to 5", "intensifiers"),
        "rewrite": ("Rewrite the review", "own words")}


def test_at_least_seven_required_perspectives():
  assert prompts.PERSPECTIVES == REQUIRED
  assert prompts.REWRITE == "rewrite" and prompts.REWRITE not in prompts.PERSPECTIVES
  assert prompts.template_names() == REQUIRED + ("rewrite",)


def test_polarity_prompt_exact():
  """The full rendering, written out: a template change silently changes every corpus prompt."""
  assert prompts.knowdist_prompt("  Great pasta, slow service. \n", "polarity") == (
      "Determine the overall sentiment polarity of the text below (positive, negative, neutral "
      "or mixed). State the polarity first, then explain the reasons for it, quoting the words "
      "and phrases that reveal the author's attitude.\n"
      "\n"
      "Text: Great pasta, slow service.\n")


@pytest.mark.parametrize("perspective", sorted(CUES))
def test_prompt_layout_and_cues(perspective):
  text = "The battery died after two days. Great job, really."
  prompt = prompts.knowdist_prompt(text, perspective)
  instruction, sep, rest = prompt.partition("\n\nText: ")
  assert sep and rest == text + "\n"  # instruction, blank line, the text, final newline
  assert text not in instruction and "\n" not in instruction and len(instruction) > 80
  for cue in CUES[perspective]:
    assert cue in instruction, (perspective, cue)


def test_instructions_all_differ():
  text = "Fine."
  rendered = [prompts.knowdist_prompt(text, p) for p in prompts.template_names()]
  assert len(set(rendered)) == len(rendered) == 8


def test_text_is_inserted_verbatim():
  """Braces and %-signs are text, not format fields; inner whitespace and newlines are kept."""
  text = "I {really} liked it, 100% {0} %s\n\nsecond  paragraph"
  assert prompts.knowdist_prompt(f"  {text}  ", "stance").endswith(f"\n\nText: {text}\n")


def test_unknown_perspective_and_empty_text_raise():
  with pytest.raises(ValueError, match="Unknown KnowDist perspective 'mood'"):
    prompts.knowdist_prompt("fine", "mood")
  with pytest.raises(ValueError, match="non-empty"):
    prompts.knowdist_prompt("   ", "polarity")
  with pytest.raises(ValueError, match="non-empty"):
    prompts.knowdist_prompt(None, "polarity")  # type: ignore[arg-type]


# sha256(f"{seed}:{record_id}"), first 8 bytes big-endian, mod 7 -> PERSPECTIVES (the stored
# choice for existing corpora: changing the rule reassigns every record's prompt).
EXPECTED_SEED0 = ["irony", "aspects", "polarity", "emotions", "intent", "intent", "polarity",
                  "intensity"]
EXPECTED_SEED1 = ["intensity", "aspects", "emotions", "emotions", "emotions", "irony",
                  "intensity", "emotions"]


def test_perspective_for_is_pinned():
  """Literal values: also rules out Python's salted hash() (another process, another choice)."""
  ids = [f"rec-{i}" for i in range(8)]
  assert [prompts.perspective_for(i, seed=0) for i in ids] == EXPECTED_SEED0
  assert [prompts.perspective_for(i, seed=1) for i in ids] == EXPECTED_SEED1
  assert [prompts.perspective_for(i) for i in ids] == EXPECTED_SEED0  # seed defaults to 0


def test_perspective_for_is_spread():
  ids = [f"rec-{i}" for i in range(700)]
  counts = collections.Counter(prompts.perspective_for(i, seed=0) for i in ids)
  assert set(counts) == set(prompts.PERSPECTIVES)
  # Uniform would give 100 each (sd ~9.3): 50 is > 5 sd away.
  assert min(counts.values()) > 50
