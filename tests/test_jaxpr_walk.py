"""Tests for jaxprune._jaxpr, the generic jaxpr interpreter, used CONCRETELY (as calibration
does): evaluating equation by equation equals calling fn, stepping into jit / custom_jvp /
custom_vjp / checkpoint bodies, running scan per iteration, and tracking which values are
views of which parameter leaf to accumulate the Gram matrix of each kernel's inputs."""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune import _jaxpr


def _randn(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


@jax.custom_vjp
def _sin(x):
  return jnp.sin(x)


_sin.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * jnp.cos(x),))


def _model(p, x):
  """jit + custom_jvp (relu) + gelu + custom_vjp + checkpoint + a scan over 3 layers."""
  h = jax.jit(lambda a, w: jax.nn.gelu(a @ w))(x, p["w_in"])

  def layer(c, w):
    c = jax.nn.relu(c @ w)
    return c, jnp.sum(c, axis=1)

  h, per_layer = lax.scan(layer, h, p["w_stack"])
  h = jax.checkpoint(lambda a: _sin(a))(h)
  return h @ p["w_out"], per_layer


def _params():
  return {"w_in": _randn(0, (4, 6)), "w_stack": _randn(1, (3, 6, 6)), "w_out": _randn(2, (6, 2))}


class _Recorder(_jaxpr.Interpreter):
  """Evaluates concretely and records the operand shapes of every dot_general it runs."""

  def __init__(self):
    def dot(interp, eqn, vals):
      interp.dots.append(tuple(np.shape(v) for v in vals))
      return _jaxpr.bind_rule(interp, eqn, vals)

    def scan(interp, eqn, vals):
      return _jaxpr.unroll_scan(interp, eqn, vals, index=lambda x, i: x[i],
                                stack=lambda ys, aval: jnp.stack(ys) if ys else
                                jnp.zeros(aval.shape, aval.dtype))

    super().__init__({lax.dot_general_p: dot, lax.scan_p: scan})
    self.dots = []
    self.seen = set()

  def eqn(self, eqn, vals):
    self.seen.add(eqn.primitive.name)
    return super().eqn(eqn, vals)


def test_concrete_evaluation_equals_fn_and_sees_every_dot():
  p, x = _params(), _randn(3, (5, 4))
  closed = jax.make_jaxpr(_model)(p, x)
  interp = _Recorder()
  got = interp.run_closed(closed, [*jax.tree.leaves(p), x])
  want = jax.tree.leaves(_model(p, x))
  assert len(got) == len(want) == 2
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
  # the input projection, each of the 3 scan steps (one layer slice each), the output projection
  assert interp.dots == [((5, 4), (4, 6))] + [((5, 6), (6, 6))] * 3 + [((5, 6), (6, 2))]
  # call-like primitives were stepped into: the rules saw their inner equations
  assert {"jit", "custom_jvp_call", "custom_vjp_call", "remat2", "scan"} <= interp.seen
  assert {"tanh", "max", "sin"} <= interp.seen  # gelu's, relu's and _sin's bodies


def test_plain_interpreter_is_eval_jaxpr():
  p, x = _params(), _randn(4, (2, 4))
  closed = jax.make_jaxpr(_model)(p, x)
  got = _jaxpr.Interpreter().run_closed(closed, [*jax.tree.leaves(p), x])
  want = jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *jax.tree.leaves(p), x)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)


class _Tagged(NamedTuple):
  array: Any
  leaf: int | None  # the params leaf this value is a view of (a slice, a transpose, a cast)


class _Gram(_jaxpr.Interpreter):
  """Calibration-style: accumulates X^T X of the inputs of every kernel, per params leaf."""

  VIEWS = (lax.transpose_p, lax.convert_element_type_p, lax.reshape_p, lax.squeeze_p,
           lax.dynamic_slice_p, lax.slice_p)

  def __init__(self):
    rules = {p: self.view for p in self.VIEWS}
    rules[lax.dot_general_p] = self.dot
    rules[lax.scan_p] = self.scan
    super().__init__(rules, default=self.evaluate)
    self.gram: dict[int, jax.Array] = {}

  def literal(self, value):
    return _Tagged(value, None)

  def const(self, value):
    return _Tagged(value, None)

  @staticmethod
  def evaluate(interp, eqn, vals):
    return [_Tagged(o, None) for o in _jaxpr.bind(eqn, [v.array for v in vals])]

  @staticmethod
  def view(interp, eqn, vals):
    outs = _jaxpr.bind(eqn, [v.array for v in vals])
    return [_Tagged(o, vals[0].leaf) for o in outs]

  @staticmethod
  def dot(interp, eqn, vals):
    x, w = vals
    (lc, _), (lb, _) = eqn.params["dimension_numbers"]
    if w.leaf is not None and not lb:
      feats = np.moveaxis(np.asarray(x.array), list(lc), range(-len(lc), 0))
      feats = feats.reshape(-1, int(np.prod([x.array.shape[a] for a in lc])))
      interp.gram[w.leaf] = interp.gram.get(w.leaf, 0) + feats.T @ feats
    return interp.evaluate(interp, eqn, vals)

  @staticmethod
  def scan(interp, eqn, vals):
    def index(v, i):
      return _Tagged(v.array[i], v.leaf)  # a layer's slice of a stacked kernel is still that leaf

    def stack(ys, aval):
      return _Tagged(jnp.stack([y.array for y in ys]) if ys else jnp.zeros(aval.shape, aval.dtype),
                     None)

    return _jaxpr.unroll_scan(interp, eqn, vals, index=index, stack=stack)


def test_leaf_tracking_gram_matrices():
  p, x = _params(), _randn(5, (7, 4))
  closed = jax.make_jaxpr(_model)(p, x)
  names = [k[0].key for k, _ in jax.tree_util.tree_flatten_with_path(p)[0]]
  assert names == ["w_in", "w_out", "w_stack"]  # dicts flatten in sorted key order
  interp = _Gram()
  leaves = [_Tagged(v, i) for i, v in enumerate(jax.tree.leaves(p))]
  out, _ = interp.run_closed(closed, [*leaves, _Tagged(x, None)])
  np.testing.assert_allclose(np.asarray(out.array), np.asarray(_model(p, x)[0]), rtol=1e-5,
                             atol=1e-5)
  # reference: the inputs of each kernel, computed by hand
  h = jax.nn.gelu(x @ p["w_in"])
  stack_gram = 0
  for w in p["w_stack"]:
    stack_gram = stack_gram + h.T @ h
    h = jax.nn.relu(h @ w)
  h = jnp.sin(h)
  want = {0: x.T @ x, 1: h.T @ h, 2: stack_gram}
  assert set(interp.gram) == set(want)
  for k, g in want.items():
    np.testing.assert_allclose(interp.gram[k], np.asarray(g), rtol=1e-4, atol=1e-4)


def test_while_and_cond_helpers():
  def fn(x, k):
    x = lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] @ c[1]), (0, x))[1]
    return lax.switch(k, [jnp.sin, jnp.cos, lambda a: a @ a], x)

  x = _randn(6, (3, 3)) / 3
  closed = jax.make_jaxpr(fn)(x, 0)
  calls = []

  def dot(interp, eqn, vals):
    calls.append("dot")
    return _jaxpr.bind_rule(interp, eqn, vals)

  rules = {
      lax.dot_general_p: dot,
      lax.while_p: lambda i, e, v: _jaxpr.unroll_while(i, e, v, truth=bool),
      lax.cond_p: lambda i, e, v: _jaxpr.select_branch(i, e, v, index=int),
  }
  for k in (0, 1, 2, 7):  # 7: clamped to the last branch, as lax.switch does
    calls.clear()
    got = _jaxpr.Interpreter(rules).run_closed(closed, [x, jnp.int32(k)])[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(fn(x, k)), rtol=1e-5, atol=1e-6)
    assert calls == ["dot"] * (3 + (k >= 2))  # 3 loop steps, + the taken branch's own dot
