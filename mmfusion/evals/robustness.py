"""Robustness: zero-shot accuracy of an image modality, clean and under L-inf attacks on the
pixels (in [0, 1], before normalisation), at each radius of `eps` (1/255 units).

Two attacks per radius: PGD-`steps` (cross-entropy of the zero-shot logits, random start, step
eps/4), and with `strong` a stronger one for final numbers: `strong_steps` steps from
`restarts` random starts on each of two losses, cross-entropy and the margin loss of
Carlini & Wagner (max_{j != y} z_j - z_y), reported as the worst case per image over all of
them and PGD-`steps`. An image counts as broken as soon as any iterate is misclassified.
The class prompts are embedded clean, once, as the zero-shot evaluator does.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmfusion import adversarial
from mmfusion import config as config_lib
from mmfusion.evals import common
from mmfusion.evals.zeroshot import ZeroShot


class Robustness(ZeroShot):
  """Yields clean_accuracy, pgd<steps>_eps<e> accuracy per radius (and strong_eps<e>), and
  num_examples. Options: those of zeroshot, eps (radii in 1/255), steps, strong, strong_steps,
  restarts."""
  TYPE = 'robustness'
  OPTIONS = {**ZeroShot.OPTIONS, 'eps': (1.0, 2.0, 4.0, 8.0), 'steps': 10, 'strong': False,
             'strong_steps': 100, 'restarts': 2, 'seed': 0}

  @classmethod
  def check_options(cls, name, options, config):
    options = super().check_options(name, options, config)
    eps = options['eps']
    if (isinstance(eps, (str, bytes)) or not hasattr(eps, '__len__') or not eps
            or not all(isinstance(e, (int, float)) and e > 0 for e in eps)):
      raise ValueError(f'config.evals.{name}.eps = {eps!r}: a non-empty tuple of radii > 0 '
                       '(in 1/255 units).')
    for key in ('steps', 'strong_steps', 'restarts'):
      common.check_positive_int(name, key, options[key])
    if dict(config.model.towers[options['modality']]).get('type') != 'vit':
      raise ValueError(f"config.evals.{name}.modality = {options['modality']!r}: the attacks "
                       'perturb pixels, so it must be an image tower (vit).')
    return options

  def __init__(self, name: str, **kwargs: Any):
    super().__init__(name, **kwargs)
    mean, std = config_lib.image_normalization(self.config)
    self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    self._attack = self.jit(self._attack_fn)

  def _logits(self, params, x01, classes):
    entries = {self.modality: (x01 - self.mean) / self.std}
    out = self.model.apply({'params': params}, entries, train=False)
    return out['logit_scale'] * out['embeddings'][self.modality] @ classes.T

  def _attack_fn(self, params, image, label, classes, batch_index):
    """Clean correctness and, per radius, robust correctness under PGD (and the strong set)."""
    x01 = image * self.std + self.mean
    num_classes = classes.shape[0]
    wrong = lambda x: jnp.argmax(self._logits(params, x, classes), -1) != label

    def ce(x):
      logits = self._logits(params, x, classes)
      return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), label[:, None], 1))

    def margin(x):
      logits = self._logits(params, x, classes)
      true = jnp.take_along_axis(logits, label[:, None], 1)[:, 0]
      other = jnp.max(jnp.where(jax.nn.one_hot(label, num_classes, dtype=bool), -jnp.inf,
                                logits), -1)
      return jnp.sum(other - true)

    key = jax.random.fold_in(jax.random.key(self.options['seed']), batch_index)
    out = {'clean': ~wrong(x01)}
    for i, eps in enumerate(self.options['eps']):
      radius = eps / 255.0
      k = jax.random.fold_in(key, i)
      _, fooled = adversarial.pgd_linf(ce, x01, radius, radius / 4, self.options['steps'], k,
                                       failed=wrong)
      out[f'pgd_{i}'] = ~fooled
      if self.options['strong']:
        for r in range(self.options['restarts']):
          for j, loss in enumerate((ce, margin)):
            _, more = adversarial.pgd_linf(
                loss, x01, radius, radius / 8, self.options['strong_steps'],
                jax.random.fold_in(k, 1 + 2 * r + j), failed=wrong)
            fooled = fooled | more
        out[f'strong_{i}'] = ~fooled
    return out

  def run(self, params: common.Params) -> Iterator[tuple[str, float]]:
    names, classes = self.dataset_classes(params)
    classes = self.replicate(classes)
    counter = iter(range(1 << 30))     # each batch its own random starts
    rows, num_examples = self.checked_rows(lambda batch: {
        **self._attack(params, batch[self.modality], batch['label'], classes,
                       np.int32(next(counter))),
        'label': batch['label']}, len(names))
    yield 'clean_accuracy', float(np.mean(rows['clean']))
    steps = self.options['steps']
    for i, eps in enumerate(self.options['eps']):
      tag = f'{eps:g}'
      yield f'pgd{steps}_eps{tag}', float(np.mean(rows[f'pgd_{i}']))
      if self.options['strong']:
        yield f'strong_eps{tag}', float(np.mean(rows[f'strong_{i}']))
    yield 'num_examples', float(num_examples)
