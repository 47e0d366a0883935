"""`sentijax.serve` answers: a call's engine events turned into the OpenAI response objects, whole
(`complete`) or as server-sent-event chunks (`stream`); the streamed pieces join to the whole
answer. Logprobs in the legacy completions shape or the chat shape, token strings or
`token_id:N`."""
from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from typing import Any

from sentijax.serve_events import Delta, Failed, Finished, PromptScores
from sentijax.serve_requests import APIError, Call


class Answers:
  """Answers for a model named `model_name` (its `tokenizer` decodes token strings); a call
  unanswered after `request_timeout_s` gets 504."""

  def __init__(self, tokenizer: Any, model_name: str, request_timeout_s: float):
    self.tokenizer, self.model_name = tokenizer, model_name
    self.request_timeout_s = request_timeout_s

  def _token(self, token_id: int, as_id: bool = False) -> str:
    return f"token_id:{token_id}" if as_id else self.tokenizer.decode([token_id])

  def events(self, call: Call) -> Iterator[Any]:
    """The call's engine events until every choice finished; 504 past the deadline."""
    req = call.request
    todo = req.n if req.generate else 0
    scores = req.score_prompt
    try:
      while todo or scores:
        try:
          ev = req.events.get(timeout=max(call.deadline - time.monotonic(), 0.0))
        except queue.Empty:
          raise APIError(504, f"the request took longer than {self.request_timeout_s} s "
                         f"(serve.request_timeout_s)", code="timeout") from None
        if isinstance(ev, Failed):
          raise APIError(500, f"{type(ev.error).__name__}: {ev.error}")
        todo -= isinstance(ev, Finished)
        scores = scores and not isinstance(ev, PromptScores)
        yield ev
    finally:
      req.cancelled.set()  # done, timed out or the client left: the rows are freed

  def _completion_logprobs(self, token_ids, chosen, top_logprobs, call: Call,
                           offset: int = 0) -> dict:
    """The legacy logprobs object; `chosen` / `top_logprobs` entries may be None (echoed first
    prompt token)."""
    tokens = [self._token(t, call.as_ids) for t in token_ids]
    offsets = []
    for t in tokens:
      offsets.append(offset)
      offset += len(t)
    tops = []
    for top in top_logprobs:  # ids that decode alike (byte pieces) keep the best logprob
      if top is None:
        tops.append(None)
        continue
      pieces: dict[str, float] = {}
      for t, lp in list(top.items())[:call.top_n]:
        pieces.setdefault(self._token(t, call.as_ids), lp)
      tops.append(pieces)
    return {"tokens": tokens, "token_logprobs": list(chosen), "text_offset": offsets,
            "top_logprobs": tops}

  def _chat_logprobs(self, token_ids, chosen, top_logprobs, call: Call) -> dict:
    def entry(t, lp):
      s = self._token(t)
      return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
    return {"content": [entry(t, lp) | {"top_logprobs": [
        entry(a, b) for a, b in list(top.items())[:call.top_n]]}
                        for t, lp, top in zip(token_ids, chosen, top_logprobs)]}

  def _usage(self, call: Call, completion_tokens: int) -> dict:
    n = len(call.request.prompt_ids)
    return {"prompt_tokens": n, "completion_tokens": completion_tokens,
            "total_tokens": n + completion_tokens}

  def _envelope(self, call: Call, chunk: bool) -> dict:
    kind = ("chat.completion" if call.chat else "text_completion") + (
        ".chunk" if chunk and call.chat else "")
    return {"id": call.id, "object": kind, "created": call.created, "model": self.model_name}

  def complete(self, call: Call) -> dict:
    """The non-streamed answer (the streamed pieces joined)."""
    req = call.request
    texts = {i: "" for i in range(req.n if req.generate else 1)}
    ids = {i: [] for i in texts}
    chosen = {i: [] for i in texts}
    tops = {i: [] for i in texts}
    finish = {i: "length" for i in texts}
    used = 0
    for ev in self.events(call):
      if isinstance(ev, PromptScores):
        for i in texts:
          ids[i] = list(req.prompt_ids) + ids[i]
          chosen[i], tops[i] = ev.token_logprobs + chosen[i], ev.top_logprobs + tops[i]
      elif isinstance(ev, Delta):
        texts[ev.index] += ev.text
        ids[ev.index] += ev.token_ids
        if ev.token_logprobs is not None:
          chosen[ev.index] += ev.token_logprobs
          tops[ev.index] += ev.top_logprobs
      elif isinstance(ev, Finished):
        finish[ev.index] = ev.reason
        used += ev.completion_tokens
    choices = []
    for i, text in texts.items():
      choice: dict[str, Any] = {"index": i, "finish_reason": finish[i]}
      if call.chat:
        choice["message"] = {"role": "assistant", "content": text}
        choice["logprobs"] = (self._chat_logprobs(ids[i], chosen[i], tops[i], call)
                              if req.logprobs and ids[i] else None)
      else:
        choice["text"] = (call.echo_text or "") + text
        choice["logprobs"] = (self._completion_logprobs(ids[i], chosen[i], tops[i], call)
                              if req.logprobs and ids[i] else None)
      choices.append(choice)
    return self._envelope(call, False) | {"choices": choices, "usage": self._usage(call, used)}

  def stream(self, call: Call) -> Iterator[dict]:
    """The streamed answer: chunk objects (each sent as `data: <json>`)."""
    req, used = call.request, 0
    usage = {"usage": None} if call.include_usage else {}
    offsets = {i: 0 for i in range(req.n)}

    def chunk(index: int, text: str, logprobs=None, finish=None, first=False) -> dict:
      c: dict[str, Any] = {"index": index, "logprobs": logprobs, "finish_reason": finish}
      if call.chat:
        c["delta"] = ({"role": "assistant", "content": text} if first else
                      {"content": text} if text or finish is None else {})
      else:
        c["text"] = text
      return self._envelope(call, True) | {"choices": [c]} | usage

    if call.chat:
      for i in range(req.n):
        yield chunk(i, "", first=True)
    for ev in self.events(call):
      if isinstance(ev, PromptScores):
        lp = self._completion_logprobs(req.prompt_ids, ev.token_logprobs, ev.top_logprobs, call)
        for i in range(req.n):
          yield chunk(i, call.echo_text or "", lp if req.logprobs else None)
          offsets[i] += len(call.echo_text or "")
      elif isinstance(ev, Delta):
        if call.echo_text is not None and not req.score_prompt and offsets[ev.index] == 0:
          yield chunk(ev.index, call.echo_text)
          offsets[ev.index] += len(call.echo_text)
        lp = None
        if ev.token_logprobs is not None:
          lp = (self._chat_logprobs(ev.token_ids, ev.token_logprobs, ev.top_logprobs, call)
                if call.chat else self._completion_logprobs(
                    ev.token_ids, ev.token_logprobs, ev.top_logprobs, call, offsets[ev.index]))
        offsets[ev.index] += len(ev.text)
        yield chunk(ev.index, ev.text, lp)
      elif isinstance(ev, Finished):
        used += ev.completion_tokens
        yield chunk(ev.index, "", finish=ev.reason)
    if call.include_usage:
      yield self._envelope(call, True) | {"choices": [], "usage": self._usage(call, used)}
