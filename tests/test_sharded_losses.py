"""Sharded contrastive losses on 8 emulated CPU devices against float64 numpy references.

The device count is fixed when jax starts, so one subprocess runs this file as a program and
checks every case (meshes, chunk sizes, both losses) in one go, to keep start-up and compile
time low; the pytest test only runs it and reads its verdict.
"""
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from mmfusion import objectives
from mmfusion import sharding
from xla_flags import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AXES = ('data', 'fsdp', 'tensor')
RULES = [('batch', ('data', 'fsdp'))]
GLOBAL_BATCH, DIM = 64, 16
SCALE, BIAS = 10.0, -5.0
TOLERANCE = 1e-5         # float32 computation against float64 references, norm-wise relative


# ------------------------------------------------------------ float64 numpy references


def _log_softmax(z, axis):
  z = z - z.max(axis=axis, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def _chain(g, za, zb, t):
  """d loss / d (za, zb, scale, bias) from g = d loss / d logits, logits = t za zb^T + bias."""
  return t * g @ zb, t * g.T @ za, np.sum(g * (za @ zb.T)), np.sum(g)


def np_softmax(za, zb, t):
  logits = t * za @ zb.T
  n, eye = len(logits), np.eye(len(logits))
  rows, cols = _log_softmax(logits, 1), _log_softmax(logits, 0)
  loss = -(np.trace(rows) + np.trace(cols)) / (2 * n)
  g = (np.exp(rows) - eye + np.exp(cols) - eye) / (2 * n)
  grads = _chain(g, za, zb, t)[:3] + (0.0,)            # CLIP has no bias
  return loss, np.mean(logits.argmax(1) == np.arange(n)), grads


def np_sigmoid(za, zb, t, bias):
  logits = t * za @ zb.T + bias
  n = len(logits)
  signs = 2 * np.eye(n) - 1
  loss = np.sum(np.logaddexp(0.0, -signs * logits)) / n
  g = -signs / (1.0 + np.exp(signs * logits)) / n       # d/dz of -log sigmoid(s z), over n
  return loss, np.mean(logits.argmax(1) == np.arange(n)), _chain(g, za, zb, t)


# ----------------------------------------------------------------- the checks (child)


def _embeddings(seed, modalities=('image', 'text')):
  """Unit vectors, the other modalities noisy copies of the first: batch accuracy well inside
  (0, 1)."""
  rng = np.random.default_rng(seed)
  za = rng.normal(size=(GLOBAL_BATCH, DIM))
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  rest = [za + 1.2 * rng.normal(size=za.shape) for _ in modalities[1:]]
  return tuple(unit(z) for z in [za] + rest)


def _step(name, pairs=(('image', 'text'),), **kwargs):
  """jit(value_and_grad) of a registered objective over `pairs` w.r.t. the embeddings of the
  pairs' modalities (in order of appearance), scale and bias. A fresh jit per case: the
  logical-axis rules the loss reads are not part of jit's cache key."""
  modalities = list(dict.fromkeys(m for pair in pairs for m in pair[:2]))

  def loss_fn(*args):
    *embeddings, scale, bias = args
    outputs = {'embeddings': dict(zip(modalities, embeddings)), 'logit_scale': scale,
               'logit_bias': bias}
    return objectives.REGISTRY[name].fn(outputs, {}, pairs=pairs, **kwargs)
  return jax.jit(jax.value_and_grad(loss_fn, argnums=tuple(range(len(modalities) + 2)),
                                    has_aux=True))


def _weighted(references, weights, owners, num_modalities):
  """The reference of several pairs from each pair's own: loss and gradients the weighted sums
  (a modality's gradient summed over the pairs it is in), batch accuracy the pairs' mean."""
  loss = sum(w * r[0] for r, w in zip(references, weights))
  accuracy = np.mean([r[1] for r in references])
  grads = [0.0] * (num_modalities + 2)
  for (_, _, (ga, gb, gs, gbias)), w, (a, b) in zip(references, weights, owners):
    grads[a] += w * ga
    grads[b] += w * gb
    grads[-2] += w * gs
    grads[-1] += w * gbias
  return loss, accuracy, tuple(grads)


def _relative_error(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


def _run(step, args, collective=None):
  """The step's result on `args`; with `collective`, also asserts that its lowering has one."""
  lowered = step.lower(*args)
  if collective:
    assert collective in lowered.as_text(), f'no {collective} in the lowered step'
  return lowered.compile()(*args)


def _check(label, result, reference, modalities=('image', 'text')):
  (loss, metrics), grads = result
  want_loss, want_accuracy, want_grads = reference
  errors = {'loss': _relative_error(loss, want_loss)}
  names = tuple(modalities) + ('scale', 'bias')
  assert len(grads) == len(want_grads) == len(names), (len(grads), len(want_grads))
  errors.update({f'd_{k}': _relative_error(g, w)
                 for k, g, w in zip(names, grads, want_grads)
                 if k != 'bias' or 'sigmoid' in label})
  assert max(errors.values()) <= TOLERANCE, f'{label}: relative errors {errors}'
  assert metrics['batch_accuracy'] == want_accuracy, (
      f"{label}: batch_accuracy {metrics['batch_accuracy']} != {want_accuracy}")
  assert 0.0 < want_accuracy < 1.0, want_accuracy    # the cases tell right from wrong rows
  print(f'ok  {label:<48} max relative error {max(errors.values()):.1e}, '
        f"accuracy {float(metrics['batch_accuracy']):.3f}", flush=True)


def _cases_on(mesh_shape, za, zb, references, chunk_sizes):
  mesh = jax.make_mesh(mesh_shape, AXES, axis_types=(AxisType.Auto,) * 3)
  batch = NamedSharding(mesh, P(('data', 'fsdp')))
  replicated = NamedSharding(mesh, P())
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    axes = sharding.current_batch_axes()
    assert axes == tuple(a for a, s in zip(AXES[:2], mesh_shape) if s > 1), axes
    args = (jax.device_put(za, batch), jax.device_put(zb, batch),
            jax.device_put(np.float32(SCALE), replicated),
            jax.device_put(np.float32(BIAS), replicated))
    label = f'mesh {dict(zip(AXES, mesh_shape))}'
    _check(f'{label} softmax', _run(_step('softmax_contrastive'), args, 'all_gather'),
           references['softmax'])
    for chunk in chunk_sizes:
      _check(f'{label} sigmoid ring chunk={chunk}',
             _run(_step('sigmoid_contrastive', chunk_size=chunk), args, 'collective_permute'),
             references['sigmoid'])
    _check(f'{label} sigmoid dense', _step('sigmoid_contrastive', impl='dense')(*args),
           references['sigmoid'])


def main():
  assert jax.device_count() == 8, jax.devices()
  za64, zb64 = _embeddings(seed=0)
  references = {'softmax': np_softmax(za64, zb64, SCALE),
                'sigmoid': np_sigmoid(za64, zb64, SCALE, BIAS)}
  za, zb = za64.astype(np.float32), zb64.astype(np.float32)
  # Local blocks: 8 rows on 8 shards, 16 on 4. Chunk 3 divides neither (-> 2, 1 chunk per
  # 2 rows); 5 -> 4 on 16 rows; 1024 is larger than any block (-> the whole block).
  _cases_on((8, 1, 1), za, zb, references, chunk_sizes=(4, 3, 1024))
  _cases_on((1, 8, 1), za, zb, references, chunk_sizes=(3,))
  _cases_on((2, 2, 2), za, zb, references, chunk_sizes=(5, 16))
  _cases_on((4, 2, 1), za, zb, references, chunk_sizes=(8, 3))
  # No mesh: the ring of one, chunks only, against the dense loss and the references.
  scalars = (np.float32(SCALE), np.float32(BIAS))
  for chunk in (7, 64):
    _check(f'one device sigmoid ring chunk={chunk}',
           _step('sigmoid_contrastive', chunk_size=chunk)(za, zb, *scalars),
           references['sigmoid'])
  dense = _step('sigmoid_contrastive', impl='dense')(za, zb, *scalars)
  ring = _step('sigmoid_contrastive', chunk_size=16)(za, zb, *scalars)
  _check('one device sigmoid ring chunk=16', ring, references['sigmoid'])
  assert _relative_error(ring[0][0], dense[0][0]) <= TOLERANCE
  assert all(_relative_error(r, d) <= TOLERANCE for r, d in zip(ring[1], dense[1]))
  assert ring[0][1]['batch_accuracy'] == dense[0][1]['batch_accuracy']
  _check('one device softmax', _step('softmax_contrastive')(za, zb, *scalars),
         references['softmax'])
  _several_pairs()
  print('all cases passed')


def _several_pairs():
  """Three modalities bound by two pairs (one weighted, one between two non-image
  modalities), sharded: the weighted sum of the single-pair references."""
  modalities = ('image', 'text', 'audio')
  pairs = (('image', 'text'), ('text', 'audio', 0.5))
  z64 = _embeddings(seed=1, modalities=modalities)
  owners = [(modalities.index(a), modalities.index(b)) for a, b, *_ in pairs]
  weights = [1.0, 0.5]
  references = {
      'softmax': _weighted([np_softmax(z64[a], z64[b], SCALE) for a, b in owners], weights,
                           owners, len(modalities)),
      'sigmoid': _weighted([np_sigmoid(z64[a], z64[b], SCALE, BIAS) for a, b in owners],
                           weights, owners, len(modalities))}
  mesh = jax.make_mesh((2, 2, 2), AXES, axis_types=(AxisType.Auto,) * 3)
  batch = NamedSharding(mesh, P(('data', 'fsdp')))
  replicated = NamedSharding(mesh, P())
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    args = tuple(jax.device_put(z.astype(np.float32), batch) for z in z64) + (
        jax.device_put(np.float32(SCALE), replicated),
        jax.device_put(np.float32(BIAS), replicated))
    _check('two pairs, mesh 2x2x2, softmax',
           _run(_step('softmax_contrastive', pairs), args, 'all_gather'),
           references['softmax'], modalities)
    _check('two pairs, mesh 2x2x2, sigmoid ring chunk=4',
           _run(_step('sigmoid_contrastive', pairs, chunk_size=4), args, 'collective_permute'),
           references['sigmoid'], modalities)


def test_sharded_losses_equal_the_single_device_reference():
  env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get('PYTHONPATH')])))
  run = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stdout + run.stderr[-5000:]
  assert run.stdout.rstrip().endswith('all cases passed'), run.stdout


if __name__ == '__main__':
  main()
