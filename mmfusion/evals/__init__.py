"""Evaluators by type: zero-shot classification, retrieval recall@k (optionally ITM re-ranked),
head classification, VQA accuracy, captioning (BLEU-4 and attribute accuracy), robustness
(zero-shot accuracy under pixel-space attacks).

`build(name, config.evals[name], ...)` checks the entry and returns an object whose
`run(params)` yields (metric_name, float) pairs; the trainer logs them as f'{name}/{metric}'.
"""
from __future__ import annotations

from typing import Any

from mmfusion.evals import common
from mmfusion.evals.captioning import Captioning
from mmfusion.evals.classification import Classification
from mmfusion.evals.retrieval import Retrieval
from mmfusion.evals.robustness import Robustness
from mmfusion.evals.vqa import VQA
from mmfusion.evals.zeroshot import ZeroShot

Evaluator = common.Evaluator

REGISTRY: dict[str, type[common.Evaluator]] = {
    'zeroshot': ZeroShot,
    'retrieval': Retrieval,
    'classification': Classification,
    'vqa': VQA,
    'captioning': Captioning,
    'robustness': Robustness,
}


def _entry(name: str, eval_cfg: Any) -> tuple[type[common.Evaluator], dict[str, Any]]:
  """(evaluator class, its options) of `config.evals[name]`; `type` and `every` checked."""
  options = common.to_plain(eval_cfg)
  if not isinstance(options, dict):
    raise ValueError(f'config.evals.{name} must be a dict(type=..., every=..., ...), '
                     f'got {eval_cfg!r}.')
  options = dict(options)
  known = ', '.join(sorted(REGISTRY))
  if 'type' not in options:
    raise ValueError(f'config.evals.{name} has no "type"; known types: {known}.')
  kind = options.pop('type')
  if kind not in REGISTRY:
    raise ValueError(f'config.evals.{name}: unknown type {kind!r}; known types: {known}.')
  every = options.pop('every', 0)
  if isinstance(every, bool) or not isinstance(every, int) or every < 0:
    raise ValueError(f'config.evals.{name}: every must be an int >= 0 (0 = never), '
                     f'got {every!r}.')
  return REGISTRY[kind], options


def reads_labels(name: str, eval_cfg: Any) -> bool:
  """Whether `config.evals[name]` scores against the dataset's labels (zero-shot,
  classification, robustness), which a dataset without labels cannot give it."""
  return _entry(name, eval_cfg)[0].READS_LABELS


def check(name: str, eval_cfg: Any, config: Any) -> None:
  """Checks `config.evals[name]` against the config without building anything."""
  cls, options = _entry(name, eval_cfg)
  cls.check_options(name, options, config)


def build(name: str, eval_cfg: Any, *, model: Any, config: Any, source: Any,
          mesh: Any = None, rules: Any = None) -> common.Evaluator:
  """The evaluator for `config.evals[name]`; bad types, keys or values fail here, naming them.

  `type` picks the class and `every` (steps between runs, 0 = never during training) is the
  trainer's; every other key goes to the evaluator, which rejects the ones it does not take.
  `source` is the run's dataset (data.sources.Source). `mesh` / `rules`: the run's, so
  evaluation runs where the params live (default: a data-parallel mesh over every device).
  """
  cls, options = _entry(name, eval_cfg)
  return cls(name, model=model, config=config, source=source, mesh=mesh, rules=rules, **options)
