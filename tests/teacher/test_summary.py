"""generate(): blank answers and backend errors go to rejects, leaks are flagged, summary counts
(a scripted backend: no model, no server)."""
import json

from sentijax.sampling import SamplingSettings
from sentijax.teacher import backend, generate, inputs, leaks
from sentijax.teacher.common import Completion, TeacherError

LEAK = "the staff forgot our order twice and never apologised ."


class ScriptedTeacher:
  """Answers by the text id: t0 quotes a test sentence, t1 answers blank, t2 fails."""
  name, tokenizer, collective, CONFIG_KEYS = "scripted", None, False, {}
  capabilities = backend.Capabilities()

  def stream(self, items, sampling, logprobs=0):
    del sampling, logprobs
    for item in items:
      source = item.meta["source_id"]
      if source == "t2":
        yield item, TeacherError("gave up after 6 attempts: HTTP 503")
      elif source == "t1":
        yield item, Completion(text="  \n", finish_reason="stop", completion_tokens=2)
      else:
        text = f"Negative. Quote: {LEAK.upper()}" if source == "t0" else "Positive overall."
        yield item, Completion(text=text, finish_reason="stop", completion_tokens=5)

  def close(self):
    pass


def test_rejects_leaks_and_summary(tmp_path):
  texts = [inputs.SourceText(f"t{i}", f"text number {i}") for i in range(4)]
  s = SamplingSettings(max_tokens=5)
  items = generate.knowdist_items(texts, ["polarity", "intent"], s)
  checker = leaks.LeakChecker({LEAK: "sc/x"})
  summary = generate.generate(items, ScriptedTeacher(), s, tmp_path, leak_checker=checker,
                              progress=False)
  assert (summary["written"], summary["rejected"], summary["skipped"]) == (4, 4, 0)
  assert summary["completion_tokens"] == 20 and summary["finish_reasons"] == {"stop": 4}
  assert summary["leaks"]["records"] == 2
  assert {x["sentences"][0] for x in summary["leaks"]["ids"]} == {LEAK}
  assert json.loads((tmp_path / "summary.json").read_text())["written"] == 4
  rejects = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
  assert sorted(r["meta"]["source_id"] for r in rejects) == ["t1", "t1", "t2", "t2"]
  assert any("blank response" in r["error"] for r in rejects)
  assert any("HTTP 503" in r["error"] for r in rejects)
  again = generate.generate(items, ScriptedTeacher(), s, tmp_path, progress=False)
  assert (again["written"], again["skipped"], again["rejected"]) == (0, 4, 4)  # rejects retried
