"""The public Python API over a trained run: `run = mmfusion.load_run(workdir)`.

A `Run` holds a workdir's config, tokenizer, model and parameters (restored onto the local
devices) and answers plain inputs — numpy or PIL images, strings, waveforms — with the input ops
of the run's own evaluation path (`mmfusion/data/ops.py` `from_raw`: the same resize, normalisation,
tokenizer and padding), in batches of one fixed size, so every function compiles once per input
shape and a split embedded here gives the evaluators' numbers exactly:

  run.embed(image=..., text=..., audio=...)     unit embeddings per modality
  run.zeroshot(images, class_names, prompts=)   CLIP's prompt-ensembled zero-shot classifier
  run.retrieve(query, gallery, k)               top-k of a gallery, and the whole score matrix
  run.match(images, texts)                      image-text matching probability (ITM head)
  run.classify(images)                          a fine-tuned classification head's predictions
  run.caption(images)                           captions (caption head; greedy or beam search)
  run.answer(images, questions)                 VQA answers (vqa head; written or spoken)
  run.explain(...)                              heat-maps (mmfusion/explain.py)
  run.examples(split, n)                        raw examples of the run's dataset, to try it on
  run.evaluate(names=None)                      the run's own evaluators on this checkpoint
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os

# TensorFlow only reads the dataset here; keep its start-up chatter out of notebooks.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmfusion import checkpoint as ckpt_lib
from mmfusion import config as config_lib
from mmfusion import sharding
from mmfusion.data import sources
from mmfusion.evals import common
from mmfusion.evals import zeroshot as zeroshot_lib
from mmfusion.models import decoder as decoder_lib
from mmfusion.models import model as model_lib
from mmfusion.models import towers as towers_lib

DEFAULT_TEMPLATES = ('a {}.',)


class RunError(ValueError):
  """A workdir that cannot be loaded, an input it cannot take, or a method its heads lack."""


@dataclasses.dataclass
class ZeroShotResult:
  """Predictions of zeroshot() (scores: cosine similarities) or classify() (probabilities)."""
  predictions: np.ndarray      # [N] int: index into class_names
  scores: np.ndarray           # [N, C] float32
  class_names: list[str]

  @property
  def labels(self) -> list[str]:
    return [self.class_names[i] for i in self.predictions]


@dataclasses.dataclass
class Retrieved:
  indices: np.ndarray          # [Q, k] gallery indices, best first
  scores: np.ndarray           # [Q, k] their cosine similarities
  similarity: np.ndarray       # [Q, G] every query against every gallery item


def _as_tuples(value: Any) -> Any:
  """JSON lists back to the tuples configs hold (a checkpoint's config went through JSON)."""
  if isinstance(value, dict):
    return {k: _as_tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_as_tuples(v) for v in value)
  return value


def step_dir(workdir: str, step: int | None = None) -> str:
  """The step directory of `workdir`'s newest checkpoint (or of `step`); RunError if none."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if not os.path.isdir(workdir):
    raise RunError(f'load_run: {workdir} does not exist.')
  root = os.path.join(workdir, ckpt_lib.CHECKPOINT_SUBDIR)
  steps = sorted(int(d) for d in (os.listdir(root) if os.path.isdir(root) else ())
                 if d.isdigit() and os.path.isdir(os.path.join(root, d, 'state')))
  if not steps:
    raise RunError(f'load_run: {workdir} has no checkpoint (no {ckpt_lib.CHECKPOINT_SUBDIR}/<step>/'
                   'state): train a run there first, e.g. python -m mmfusion.main --config '
                   f'configs/shapes_clip.py --workdir {workdir}')
  if step is not None and step not in steps:
    raise RunError(f'load_run: {workdir} has no checkpoint of step {step}; it has {steps}.')
  return os.path.join(root, str(steps[-1] if step is None else step))


def load_config(step_dir: str) -> ml_collections.ConfigDict:
  """The resolved config a checkpoint was written with (its 'meta' item), locked."""
  path = os.path.join(step_dir, 'meta', 'metadata')
  try:
    with open(path) as f:
      saved = json.load(f)['config']
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise RunError(f'load_run: {path} holds no readable config ({e}).') from None
  return config_lib.lock(ml_collections.ConfigDict(_as_tuples(saved)))


def load_run(workdir: str, *, step: int | None = None, data_dir: str | None = None,
             batch_size: int | None = None) -> Run:
  """The run in `workdir` at its newest checkpoint (or `step`), on this machine's devices.

  data_dir: where its dataset lives when not where it was trained (the tokenizer and the class
  names come from it). batch_size: rows per forward pass; default: its evaluators' (so that
  every forward pass has the shapes of theirs), else 256.
  """
  found = step_dir(workdir, step)
  config = load_config(found)
  if data_dir is not None:
    config.data.data_dir = data_dir
  if batch_size is None:
    batch_size = max((int(e.get('batch_size', 256)) for e in config.evals.values()), default=256)
  return Run(config, ckpt_lib.load_params(found), workdir=os.path.abspath(workdir),
             step=int(os.path.basename(found)), batch_size=batch_size)


class Run:
  """A trained model with its preprocessing; see the module docstring for the methods."""

  def __init__(self, config: ml_collections.ConfigDict, params: Mapping[str, Any], *,
               workdir: str = '', step: int = 0, batch_size: int = 256):
    self.config, self.workdir, self.step = config, workdir, step
    self.batch_size = common.check_positive_int('load_run', 'batch_size', batch_size)
    self.source = sources.Source(config)
    vocab = self.source.tokenizer.vocab_size if model_lib.reads_tokens(config.model) else 0
    self.vocab_size = vocab
    self.model = model_lib.build(config.model, vocab)
    self.mesh = sharding.make_mesh({'data': -1}, devices=jax.local_devices())
    self.params = sharding.replicate(jax.tree.map(jnp.asarray, dict(params)), self.mesh)
    self._jitted: dict[Any, Callable[..., Any]] = {}

  def __repr__(self) -> str:
    return (f'Run({self.workdir!r}, step {self.step}: towers {self.modalities}, heads '
            f'{sorted(self.config.model.heads)})')

  # -- what the run has -------------------------------------------------------------------

  @functools.cached_property
  def sowing_model(self) -> model_lib.MultimodalModel:
    """The same model built to sow its attention weights, for explain() (same params; remat
    off, which changes no maths)."""
    config = self.config.model.to_dict()
    config['remat'] = 'none'
    return model_lib.build(config, self.vocab_size, sow_attention=True)

  @property
  def modalities(self) -> list[str]:
    return sorted(self.config.model.towers)

  @property
  def tokenizer(self):
    return self.source.tokenizer

  def has_head(self, head: str) -> bool:
    return head in self.config.model.heads

  def require_head(self, head: str, method: str) -> None:
    if not self.has_head(head):
      raise RunError(f'{method}() needs the model\'s {head!r} head; this run has heads '
                     f'{sorted(self.config.model.heads) or "none"} (see configs/ for a config '
                     'that trains one).')

  def check_modality(self, modality: str, what: str) -> None:
    if modality not in self.config.model.towers:
      raise RunError(f'{what}: this run has no {modality!r} tower; it has {self.modalities}.')

  # -- inputs -----------------------------------------------------------------------------

  def inputs(self, modality: str, values: Any) -> dict[str, np.ndarray]:
    """Plain values -> batch entries, by the modality's input op (the evaluation path's)."""
    self.check_modality(modality, 'inputs')
    if values is None or (hasattr(values, '__len__') and len(values) == 0):
      raise RunError(f'{modality}: the list of inputs is empty.')
    if isinstance(values, str):
      values = [values]
    try:
      return self.source.op(modality, check=False).from_raw(values)
    except (ValueError, TypeError) as e:
      raise RunError(f'{modality}: {e}') from None

  def replicate(self, tree: Any) -> Any:
    return sharding.replicate(tree, self.mesh)

  def jit(self, key: Any, fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn jitted once per key (and per input shape), run on the local devices."""
    if key not in self._jitted:
      self._jitted[key] = jax.jit(fn)
    return self._jitted[key]

  def batched(self, key: Any, fn: Callable[..., Any], entries: Mapping[str, np.ndarray]):
    """fn(params, chunk) over fixed-size chunks of entries (the last padded by repeating its
    final row); outputs concatenated on the host, padding dropped."""
    jitted = self.jit(key, fn)
    n = len(next(iter(entries.values())))
    size = min(self.batch_size, n)
    outs = []
    for start in range(0, n, size):
      stop = min(start + size, n)
      chunk = {k: np.pad(v[start:stop], [(0, size - (stop - start))] + [(0, 0)] * (v.ndim - 1),
                         mode='edge') for k, v in entries.items()}
      outs.append((jitted(self.params, self.replicate(chunk)), stop - start))
    host = sharding.to_host([o for o, _ in outs])
    return jax.tree.map(lambda *parts: np.concatenate(
        [np.asarray(p)[:k] for p, (_, k) in zip(parts, outs)]), *host)

  # -- contrastive ------------------------------------------------------------------------

  def embed_entries(self, modality: str, entries: Mapping[str, np.ndarray]) -> np.ndarray:
    """Batch entries of one modality -> [N, D] float32 unit embeddings."""
    return self.batched(('embed', modality), lambda params, batch: self.model.apply(
        {'params': params}, batch, train=False)['embeddings'][modality], entries)

  def embed(self, **inputs: Any) -> dict[str, np.ndarray] | np.ndarray:
    """embed(image=[...]) -> [N, D]; several modalities -> {modality: [N_m, D]}. Unit vectors
    in the shared space, float32."""
    if not inputs:
      raise RunError(f'embed() needs inputs of at least one modality of {self.modalities}.')
    out = {m: self.embed_entries(m, self.inputs(m, v)) for m, v in inputs.items()}
    return next(iter(out.values())) if len(out) == 1 else out

  def reads_tokens(self, modality: str) -> bool:
    """Whether the modality's tower reads token ids (its plain inputs are strings)."""
    return towers_lib.tower_type(modality, self.config.model.towers[modality]).takes_tokens

  def zeroshot_modalities(self) -> tuple[str, str]:
    """(classified, prompts): the run's zero-shot evaluator's, else the first modality whose
    tower does not read tokens and the first that does."""
    for cfg in self.config.evals.values():
      if cfg.get('type') == 'zeroshot':
        return cfg['modality'], cfg['prompts']
    plain = [m for m in self.modalities if not self.reads_tokens(m)]
    tokens = [m for m in self.modalities if self.reads_tokens(m)]
    if not plain or not tokens:
      raise RunError(f'zeroshot: say modality= and prompt_modality= (this run has '
                     f'{self.modalities}).')
    return plain[0], tokens[0]

  def class_embeddings(self, class_names: Sequence[str], templates: Sequence[str],
                       modality: str) -> np.ndarray:
    """[C, D]: each class's prompts embedded and ensembled as the zero-shot evaluator does."""
    if not len(class_names):
      raise RunError('zeroshot: class_names is empty.')
    templates = (templates,) if isinstance(templates, str) else tuple(templates)
    for t in templates:
      if not isinstance(t, str) or t.count('{}') != 1:
        raise RunError(f"zeroshot: each prompt template needs exactly one '{{}}'; got {t!r}.")
    prompts = [t.format(c) for c in class_names for t in templates]
    emb = self.embed_entries(modality, self.inputs(modality, prompts))
    return zeroshot_lib.ensemble(emb, len(class_names), len(templates))

  def zeroshot(self, inputs: Any, class_names: Sequence[str], *,
               prompts: Sequence[str] = DEFAULT_TEMPLATES, modality: str | None = None,
               prompt_modality: str | None = None) -> ZeroShotResult:
    """Each input's nearest class, the class prompts written with each template of `prompts`
    ('a photo of a {}.') and ensembled. Modalities default to `zeroshot_modalities()`; a
    speech prompt modality speaks the prompts."""
    default = self.zeroshot_modalities() if modality is None or prompt_modality is None else ()
    modality = modality or default[0]
    prompt_modality = prompt_modality or default[1]
    classes = self.class_embeddings(class_names, prompts, prompt_modality)
    emb = self.embed_entries(modality, self.inputs(modality, inputs))
    scores = emb.astype(np.float32) @ classes.T
    return ZeroShotResult(np.argmax(scores, axis=1), scores, list(class_names))

  def retrieve(self, query: Any, gallery: Any, k: int = 5, *, query_modality: str | None = None,
               gallery_modality: str | None = None) -> Retrieved:
    """The k gallery items nearest each query. Modalities are guessed unless given: strings
    go to the tower that reads tokens, anything else to the one that does not."""
    qm = query_modality or _guess_modality(self, query)
    gm = gallery_modality or _guess_modality(self, gallery)
    zq = self.embed_entries(qm, self.inputs(qm, query))
    zg = self.embed_entries(gm, self.inputs(gm, gallery))
    sim = zq @ zg.T
    k = max(1, min(int(k), sim.shape[1]))
    top = np.argsort(-sim, axis=1, kind='stable')[:, :k]
    return Retrieved(top, np.take_along_axis(sim, top, axis=1), sim)

  # -- fused heads ------------------------------------------------------------------------

  def _encoded(self, params, batch, modalities):
    return {m: self.model.apply({'params': params}, m, batch[m], batch.get(f'{m}_mask'),
                                method=type(self.model).encode) for m in modalities}

  def match(self, first: Any, second: Any) -> np.ndarray:
    """[N] probability that item i of `first` matches item i of `second` (the ITM head on
    aligned pairs), in the order of config.model.heads.itm.pair: match(images, texts) for
    every config here."""
    self.require_head('itm', 'match')
    pair = tuple(self.config.model.heads.itm.pair)
    values = dict(zip(pair, (first, second)))
    entries = {}
    for m, v in values.items():
      entries.update(self.inputs(m, v))
    if len({len(v) for v in entries.values()}) != 1:
      raise RunError(f'match: give as many images as texts (pairs); got '
                     f'{ {m: len(v) for m, v in values.items()} }.')

    def fn(params, batch):
      logits = self.model.apply({'params': params}, 'itm', self._encoded(params, batch, pair),
                                method=type(self.model).fused_logits)
      return jax.nn.softmax(logits, axis=-1)[:, 1]
    return self.batched(('match',), fn, entries)

  def evaluate(self, names: Sequence[str] | None = None) -> dict[str, float]:
    """The run's own evaluators (config.evals, or the ones named) on this checkpoint:
    '<evaluator>/<metric>' -> value, as the trainer logs them."""
    from mmfusion import evals
    names = list(self.config.evals) if names is None else list(names)
    unknown = [n for n in names if n not in self.config.evals]
    if unknown:
      raise RunError(f'evaluate: {unknown} are not evaluators of this run; it has '
                     f'{sorted(self.config.evals)}.')
    rules = sharding.rules_from_config(self.config.sharding)
    results = {}
    for name in names:
      evaluator = evals.build(name, self.config.evals[name], model=self.model,
                              config=self.config, source=self.source, mesh=self.mesh,
                              rules=rules)
      results.update({f'{name}/{metric}': float(value)
                      for metric, value in evaluator.run(self.params)})
    return results

  def classify(self, inputs: Any) -> ZeroShotResult:
    """The classification head's predictions over the dataset's class names (a fine-tuned
    classifier; `zeroshot` needs no head)."""
    self.require_head('classification', 'classify')
    modality = self.config.model.heads.classification.input
    names = self.source.class_names()

    def fn(params, batch):
      out = self.model.apply({'params': params}, batch, train=False)
      return jax.nn.softmax(out['classification']['logits'], axis=-1)
    probs = self.batched(('classify',), fn, self.inputs(modality, inputs))
    return ZeroShotResult(np.argmax(probs, axis=1), probs, names)

  def caption(self, images: Any, *, decode: str = 'greedy', beam_size: int = 4,
              length_penalty: float = 0.6) -> list[str]:
    """Captions of the caption head's context modality (greedy or beam search)."""
    self.require_head('caption', 'caption')
    if decode not in ('greedy', 'beam'):
      raise RunError(f"caption: decode must be 'greedy' or 'beam', got {decode!r}.")
    context = self.config.model.heads.caption.context
    head = self.model.heads['caption']

    def fn(params, batch):
      enc = self._encoded(params, batch, (context,))[context]
      dec, dec_params = head.decoder, params['caption']['decoder']
      if decode == 'greedy':
        return decoder_lib.greedy_decode(dec, dec_params, enc.tokens, enc.mask,
                                         max_len=dec.max_len)
      return decoder_lib.beam_search(dec, dec_params, enc.tokens, enc.mask, max_len=dec.max_len,
                                     beam_size=beam_size, length_penalty=length_penalty)[0]
    ids = self.batched(('caption', decode, beam_size, length_penalty), fn,
                        self.inputs(context, images))
    return self.tokenizer.decode(ids)

  def answer(self, contexts: Any, questions: Any) -> list[str]:
    """VQA: one answer per (context, question) pair, from the train split's answer vocabulary.
    Questions are strings (spoken by the test voices when the run hears its questions) or
    waveforms."""
    self.require_head('vqa', 'answer')
    head = self.config.model.heads.vqa
    context, question = head.context, head.question
    entries = {**self.inputs(context, contexts), **self.inputs(question, questions)}
    if len({len(v) for v in entries.values()}) != 1:
      raise RunError('answer: give one question per context (pairs); got '
                     f'{len(entries[context])} and {len(entries[question])}.')

    def fn(params, batch):
      logits = self.model.apply({'params': params}, 'vqa',
                                self._encoded(params, batch, (context, question)),
                                method=type(self.model).fused_logits)
      return jnp.argmax(logits, axis=-1)
    answers = self.source.answers
    return [answers[i] for i in self.batched(('answer',), fn, entries)]

  # -- heat-maps ---------------------------------------------------------------------------

  def explain(self, method: str = 'chefer', **kwargs: Any):
    """Heat-maps over one modality's patches: see mmfusion.explain.explain."""
    from mmfusion import explain as explain_lib
    return explain_lib.explain(self, method, **kwargs)

  # -- data --------------------------------------------------------------------------------

  def examples(self, split: str = 'test', n: int | None = None,
               keep_if: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The first n examples of a split as plain values: images uint8 [N, H, W, 3], captions
    (lists of str), and every scalar feature (label, num_objects, ...)."""
    from mmfusion.data import examples as examples_lib
    return examples_lib.read(self.source, split, n, keep_if)


def _guess_modality(run: Run, values: Any) -> str:
  """Strings: the one tower that reads tokens; anything else: the one that does not."""
  first = values if isinstance(values, str) else next(iter(values), None)
  strings = isinstance(first, str)
  found = [m for m in run.modalities if run.reads_tokens(m) == strings]
  if len(found) != 1:
    raise RunError('retrieve: say which modality the query and the gallery are in '
                   f'(query_modality=, gallery_modality=; this run has {run.modalities}).')
  return found[0]
