"""The teacher-backend contract every teacher job talks to, and the registry of backends.

A backend answers prompts (`stream`), says what else it can give (`capabilities`) and closes.
The jobs (teacher/generate.py, icl_job.py, topk.py) use nothing else: a job that needs a
capability asks `require`, which stops with `MissingCapability` naming the backend, the
capability, what needed it and how to get it.

Capabilities, each with the members a backend that has it provides:
  token_logprobs           `stream(..., logprobs=N)` fills each completion's `top_logprobs`
                           (per generated token, the top-N {token id: logprob})
  prompt_logprobs          `prompt_logprobs(token_ids, k, max_tokens) -> (tops, unmapped)`: the
                           top-k {id: logprob} at every prompt token, teacher-forced (None for
                           the first), thread-safe, `concurrency` calls at once; and
                           `prompt_token_logprobs(token_ids, max_tokens) -> [logprob | None]`:
                           each prompt token's own logprob (on-policy KD's served teacher)
  next_token_distribution  `next_logprobs(prompt) -> np.ndarray [V]`: the exact next-token
                           log-distribution after a prompt
  model                    `cfg`, `params`, `placement`, `batch_size`, `pad_id`: a sentijax model
                           on this host's devices; jobs run its forward themselves (the top-k
                           store's full-vocabulary top-k and sampled draws)

A new backend is one file: a class with the members of `TeacherBackend` (plus those of its
capabilities) and the class methods `from_config(config)` and `answer_settings(config)`; then one
line in `REGISTRY`, and `teacher.backend=<name>` selects it.
"""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from sentijax.sampling import SamplingSettings
from sentijax.teacher.common import Completion

TOKEN_LOGPROBS = "token_logprobs"
PROMPT_LOGPROBS = "prompt_logprobs"
NEXT_TOKEN_DISTRIBUTION = "next_token_distribution"
MODEL = "model"
MEANING = {TOKEN_LOGPROBS: "the top-N logprobs of each generated token",
           PROMPT_LOGPROBS: "each prompt token's logprob and the top-k there (teacher forcing)",
           NEXT_TOKEN_DISTRIBUTION: "the exact next-token distribution over the vocabulary",
           MODEL: "the model itself on this host's devices (full-vocabulary forwards)"}

# teacher.backend -> the backend class, as "module:Class" (imported when chosen).
REGISTRY: dict[str, str | type] = {
    "local": "sentijax.teacher.local:LocalTeacher",
    "openai": "sentijax.teacher.openai_api:OpenAITeacher",
}


@dataclasses.dataclass(frozen=True)
class Capabilities:
  """What a backend gives besides completions; `hints`: for a capability it lacks, how to get
  it (a setting, another backend)."""
  have: frozenset[str] = frozenset()
  hints: Mapping[str, str] = dataclasses.field(default_factory=dict)

  def __contains__(self, capability: str) -> bool:
    return capability in self.have


@runtime_checkable
class TeacherBackend(Protocol):
  """What every teacher job asks of a backend."""
  name: str  # recorded as each record's teacher
  tokenizer: Any  # the teacher's tokenizer; None when the backend has none
  capabilities: Capabilities
  CONFIG_KEYS: Mapping[str, str]  # answer setting -> the config key that sets it

  @property
  def collective(self) -> bool:
    """True when every process answers each item together (a model sharded across hosts)."""

  def stream(self, items: Sequence[Any], s: SamplingSettings, logprobs: int = 0
             ) -> Iterator[tuple[Any, Completion | Exception]]:
    """(item, completion or the exception it failed with) per item (`.id`, `.prompt`), in any
    order; `logprobs` > 0 needs `token_logprobs`."""

  def close(self) -> None:
    """Frees what the backend holds (connections, device memory)."""


class MissingCapability(ValueError):
  """A job needs a capability its teacher backend does not have."""


def require(teacher: TeacherBackend, capability: str, needed_for: str) -> None:
  """MissingCapability unless `teacher` has `capability`."""
  caps = teacher.capabilities
  if capability in caps:
    return
  hint = caps.hints.get(capability)
  raise MissingCapability(
      f"teacher backend {type(teacher).__name__} ({teacher.name!r}) has no {capability!r} "
      f"capability ({MEANING.get(capability, '?')}), needed for {needed_for}; it has "
      f"{sorted(caps.have) or 'none'}" + (f". {hint}" if hint else ""))


def backend_class(name: str) -> type:
  """The class registered as `teacher.backend=name`."""
  if name not in REGISTRY:
    raise ValueError(f"teacher.backend={name!r}: expected one of {sorted(REGISTRY)}")
  entry = REGISTRY[name]
  if isinstance(entry, str):
    module, _, cls = entry.partition(":")
    entry = getattr(importlib.import_module(module), cls)
  return entry


def make(config) -> TeacherBackend:
  """The backend named by `config.teacher.backend`, built from the config."""
  return backend_class(str(config.teacher.backend)).from_config(config)


def answer_settings(config) -> dict:
  """Everything besides the prompt and `config.sampling` that changes a record: the backend,
  `generate.logprobs` and what the backend answers with (its `answer_settings`). Part of every
  record id and kept in meta.settings."""
  name = str(config.teacher.backend)
  return ({"backend": name, "logprobs": int(config.generate.logprobs)}
          | backend_class(name).answer_settings(config))


def config_key(backend: str | None, setting: str) -> str | None:
  """The config key behind a backend's answer setting (None when it names none)."""
  if backend not in REGISTRY:
    return None
  return backend_class(backend).CONFIG_KEYS.get(setting)
