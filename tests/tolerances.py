"""Float comparisons scaled to the magnitudes compared (fp32 results differ across x86-64 CPUs)."""
import jax
import numpy as np

RTOL = 1e-5  # ~100 fp32 ulps: reduction-order noise of sums of many terms, nothing more


def assert_trees_close(got, want, rtol=RTOL):
  """Leafwise |got - want| <= rtol * (|want| + max|want leaf|).

  The absolute floor scales with the largest element of the leaf: an element that cancels to ~0
  (a sum of terms of both signs) keeps the rounding error of the terms it summed, not of its value.
  """
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
    w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
    np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * float(np.abs(w).max()),
                               err_msg=jax.tree_util.keystr(path))


def assert_close(got, want, rel=RTOL, what=""):
  """max |got - want| <= rel * max |want|: a tolerance that scales with the values compared."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  err, scale = np.abs(got - want).max(), np.abs(want).max()
  assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel:g} x max |value| {scale:.3g}"
