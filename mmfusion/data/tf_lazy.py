"""TensorFlow and TensorFlow Datasets, imported at their first use rather than with the module
that names them: the input ops' shapes and specs (what the model is built and the train step
compiled against) then import without them, so the train-step benchmark runs where TensorFlow
is not installed (the device image), on in-memory batches. Reading a dataset imports both.

`from mmfusion.data.tf_lazy import tf, tfds` and use them as the modules. On first import,
TensorFlow is kept off the accelerators: tf.data needs only CPUs, and a TensorFlow that grabs a
GPU / TPU takes its memory from JAX.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Callable


def _hide_accelerators(tf_module: ModuleType) -> None:
  for kind in ('GPU', 'TPU'):
    try:
      tf_module.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):   # already initialised, or no such device type
      pass


class _Lazy:
  """A module imported when one of its attributes is first read."""

  def __init__(self, name: str, on_import: Callable[[ModuleType], None] | None = None):
    self._name, self._on_import, self._module = name, on_import, None

  def load(self) -> ModuleType:
    if self._module is None:
      module = importlib.import_module(self._name)
      if self._on_import is not None:
        self._on_import(module)
      self._module = module
    return self._module

  def __getattr__(self, attr: str) -> Any:
    if attr.startswith('_'):
      raise AttributeError(attr)
    return getattr(self.load(), attr)


tf = _Lazy('tensorflow', _hide_accelerators)
tfds = _Lazy('tensorflow_datasets', lambda _: tf.load())
