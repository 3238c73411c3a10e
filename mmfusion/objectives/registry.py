"""The objective registry: name -> a loss function and what it needs from the model and batch."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

Metrics = dict[str, jax.Array]
# kwargs of the objective's config -> (model output paths such as 'embeddings/image', batch keys)
Needs = Callable[..., tuple[tuple[str, ...], tuple[str, ...]]]


@dataclasses.dataclass(frozen=True)
class Objective:
  fn: Callable[..., tuple[jax.Array, Metrics]]
  needs: Needs
  head: str = ''                       # the config setting that makes the model produce them


REGISTRY: dict[str, Objective] = {}


def register(name: str, *, needs: Needs | None = None, outputs: tuple[str, ...] = (),
             batch: tuple[str, ...] = (), head: str = ''):
  """Decorator: `fn(outputs, batch, **kwargs) -> (loss, metrics)` becomes objective `name`.

  `needs(**kwargs)` derives what it reads from its arguments (e.g. the modalities of its
  `pairs`); objectives that always read the same give `outputs` / `batch` instead. `head` is
  the config setting that gives the model those outputs, named in the error when missing.
  """
  def fixed(**_: Any):
    return tuple(outputs), tuple(batch)

  def wrap(fn):
    REGISTRY[name] = Objective(fn, needs or fixed, head)
    return fn
  return wrap
