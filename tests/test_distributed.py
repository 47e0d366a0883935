"""distributed.barrier / check_same_on_all_processes through the coordination client (a fake
one standing in for 2 processes here; the real one runs in tests/teacher/
test_multiprocess_generate.py)."""
import threading

import jax
import pytest

from sentijax import distributed


class FakeClient:
  """The key-value store and barrier of jax's coordination client, shared by 2 threads."""

  def __init__(self):
    self.store, self.cond, self.barriers = {}, threading.Condition(), []

  def key_value_set(self, key, value):
    with self.cond:
      self.store[key] = value
      self.cond.notify_all()

  def blocking_key_value_get(self, key, timeout_ms):
    with self.cond:
      assert self.cond.wait_for(lambda: key in self.store, timeout_ms / 1000), key
      return self.store[key]

  def wait_at_barrier(self, barrier_id, timeout_in_ms):
    self.barriers.append((barrier_id, timeout_in_ms))


class PerThreadCalls:
  """distributed._calls as each process has it: its own count of calls per name."""

  def __init__(self, local):
    self.local = local

  def get(self, key, default):
    return self.local.calls.get(key, default)

  def __setitem__(self, key, value):
    self.local.calls[key] = value

  def __getitem__(self, key):
    return self.local.calls[key]


@pytest.fixture
def two_processes(monkeypatch):
  """Process index per thread (0 or 1), 2 processes, one fake client."""
  local = threading.local()
  client = FakeClient()
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: local.index)
  monkeypatch.setattr(distributed, "_client", lambda: client)
  monkeypatch.setattr(distributed, "_calls", PerThreadCalls(local))

  def run(fn_by_process):
    results = {}

    def body(i):
      local.index, local.calls = i, {}
      try:
        results[i] = fn_by_process(i)
      except Exception as e:  # pylint: disable=broad-except
        results[i] = e
    threads = [threading.Thread(target=body, args=(i,)) for i in range(2)]
    for t in threads:
      t.start()
    for t in threads:
      t.join(10)
    assert len(results) == 2, "a process is still waiting"
    return results, client
  return run


def test_same_values_pass_and_differing_ones_name_the_groups(two_processes):
  results, _ = two_processes(lambda i: distributed.check_same_on_all_processes("ids", "items"))
  assert results == {0: None, 1: None}
  results, _ = two_processes(lambda i: distributed.check_same_on_all_processes(f"ids{i}", "items"))
  for e in results.values():
    assert isinstance(e, distributed.DistributedConfigError)
    assert "processes disagree on items: process groups [[0], [1]]" in str(e)


def test_barrier_waits_through_the_client_with_a_long_timeout(two_processes):
  _, client = two_processes(lambda i: distributed.barrier("done"))
  assert len({b for b, _ in client.barriers}) == 1 and len(client.barriers) == 2
  assert all(t >= 24 * 3600 * 1000 for _, t in client.barriers)  # hours of uneven work


def test_one_process_needs_no_client(monkeypatch):
  monkeypatch.setattr(distributed, "_client", lambda: pytest.fail("no client on 1 process"))
  distributed.barrier("x")
  distributed.check_same_on_all_processes("a", "b")
  assert distributed.process_index_and_count() == (0, 1)
