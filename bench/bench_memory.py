"""Per-device memory of params + optimizer state under fsdp = 1, 2, 4, 8 (8 fake CPU devices).

For each fsdp size (data = 8 / fsdp, tensor = 1, the base config's sharding rules) it builds the
abstract train state (fp32 params + AdamW moments, `train.state.abstract_state`) and reports:

- `state/dev`: bytes of params + optimizer state one device holds (from the arrays' shard
  shapes, `sharding.bytes_per_device`);
- `args/dev`, `temp/dev`: the compiled train step's `memory_analysis()` (state + batch arguments,
  XLA temporaries) for one device, from `jit(step).lower(abstract state, batch).compile()`: a
  forward + CE loss + backward + AdamW update, state donated, activations constrained by the
  logical rules (`sharding.logical_context`). Nothing runs: shapes only, any preset fits;

and the ratio of each to fsdp=1. The goal: state/dev <= 1.2 / fsdp of fsdp=1.

  python bench/bench_memory.py                           # llama-3.2-1b, batch 8 x 512: ~2 min
  python bench/bench_memory.py --preset tiny --seq 64    # seconds
  python bench/bench_memory.py --no-compile --preset llama-3.1-70b   # shard sizes only
"""
from __future__ import annotations

import argparse
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from sentijax import config as config_lib  # noqa: E402
from sentijax import models, sharding  # noqa: E402
from sentijax.train import state as state_lib  # noqa: E402


def _train_step(model_cfg, tx):
  def step(state, tokens_BxT):
    def loss_fn(params):
      logits = models.forward(model_cfg, params, tokens_BxT[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens_BxT[:, 1:]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), loss
  return step


def measure(model_cfg, fsdp: int, batch: int, seq: int, compile_step: bool) -> dict:
  c = config_lib.base()
  mesh = sharding.make_mesh({"data": 8 // fsdp, "fsdp": fsdp, "tensor": 1})
  tx = state_lib.make_optimizer(c.train)
  target, state_sh = state_lib.abstract_state(model_cfg, tx, mesh, c.sharding_rules)
  out = {"fsdp": fsdp, "state": sharding.bytes_per_device(target),
         "params": sharding.bytes_per_device(target.params)}
  if compile_step:
    batch_sh = sharding.batch_sharding(mesh, c.sharding_rules)
    tokens = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32, sharding=batch_sh)
    with sharding.logical_context(mesh, c.sharding_rules):
      step = jax.jit(_train_step(model_cfg, tx), donate_argnums=0,
                     out_shardings=(state_sh, sharding.replicated(mesh)))
      analysis = step.lower(target, tokens).compile().memory_analysis()
    out.update(args=analysis.argument_size_in_bytes, temp=analysis.temp_size_in_bytes)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="llama-3.2-1b")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--remat", action="store_true", help="rematerialise layers (less temp memory)")
  p.add_argument("--no-compile", dest="compile", action="store_false",
                 help="shard sizes only (no XLA compile)")
  args = p.parse_args()
  model_cfg = models.presets.get(args.preset).replace(remat=args.remat)
  print(f"{args.preset}: {model_cfg.num_params / 1e9:.3f}B params, batch {args.batch} x "
        f"{args.seq}, {jax.device_count()} {jax.devices()[0].platform} devices")
  mib = lambda b: f"{b / 2**20:10.2f}"  # noqa: E731
  rows = [measure(model_cfg, f, args.batch, args.seq, args.compile) for f in (1, 2, 4, 8)]
  base = rows[0]
  cols = ["state"] + (["args", "temp"] if args.compile else [])
  print("fsdp " + "".join(f"{c + '/dev MiB':>15} {'ratio':>6}" for c in cols) + "  goal 1.2/N")
  for r in rows:
    cells = "".join(f"{mib(r[c]):>15} {r[c] / base[c]:6.3f}" for c in cols)
    ok = "ok" if r["state"] <= 1.2 / r["fsdp"] * base["state"] else "MISSED"
    print(f"{r['fsdp']:>4} {cells}  {1.2 / r['fsdp']:.3f} {ok}")


if __name__ == "__main__":
  main()
