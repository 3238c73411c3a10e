"""The schema every experiment config starts from, and its validation.

`base()` holds every key the code reads, with defaults; `configs/<name>.py` changes values
and returns `lock(config)`. Locked dicts refuse unknown keys, so a typo fails loudly.
`validate(config)` checks everything a config says before any data or compute, naming the key;
`resolve(config, source)` fills in the values that come from the data (-1 class counts).
"""
from __future__ import annotations

import importlib.util
import math
import os
from typing import Any

import ml_collections

ConfigDict = ml_collections.ConfigDict


def base() -> ConfigDict:
  c = ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 256                      # global, over all hosts and devices
  # Gradient accumulation: the towers run in this many micro-batches of batch_size / k, the
  # loss on the whole batch (mmfusion/accumulate.py): the same step as one batch, less memory.
  c.accum_steps = 1

  c.data = ConfigDict(dict(
      name='mmfusion_shapes',             # a TFDS dataset (rendered locally, or prepared)
      builder_config='',                  # '' -> the builder's default config
      data_dir='',                        # '' -> $MMFUSION_DATA_DIR or ~/.cache/mmfusion/datasets
      train_split='train',
      # The input ops (mmfusion/data/ops.py registry) whose entries make the batch: a modality
      # ('image', 'text', ...) brings `<m>` (and `<m>_mask`); 'label', 'question' (with
      # 'question_mask' and 'answer') are targets.
      inputs=('image', 'text', 'label'),
      image_size=32,                      # pixels after resize
      # Pixels in [0, 1] become (x - mean) / std per channel: [-1, 1] by default; imported
      # weights bring their own (OpenAI CLIP's ImageNet-like statistics).
      image_mean=(0.5, 0.5, 0.5),
      image_std=(0.5, 0.5, 0.5),
      # Audio inputs (ops 'audio', 'spoken_question'): waveforms at this rate, zero-padded to
      # this length (a longer clip is refused); the audio tower's sample_rate must match.
      audio_sample_rate=16_000,
      audio_max_seconds=3.5,
      shuffle_buffer=10_000,              # only when a host's split does not fit in memory
      augment=True,                       # light colour jitter; geometry is left alone
      prefetch=2,                         # batches kept ready on device
      # name='files:PATH' (your own manifest or folder, data/files.py) is built once with these:
      # images shrunk to at most max_image_side px on their longer side; captions cut after
      # max_caption_chars; without a validation split, validation_fraction of train held out;
      # the build stops when more than max_bad_fraction of the images are missing or unreadable.
      files=dict(max_image_side=256, max_caption_chars=300, validation_fraction=0.1,
                 max_bad_fraction=0.2),
      # A train split smaller than batch_size: train on the largest batch that fits, with a
      # warning, instead of failing (configs/own_clip.py).
      fit_batch_size=False,
  ))
  c.tokenizer = ConfigDict(dict(
      # A sentencepiece .model or a Hugging Face tokenizer.json; '' -> train one from captions.
      model='',
      vocab_size=256,                     # when training one
      max_len=16,                         # tokens per text, EOS included
      # For weights trained with other conventions (set by mmfusion.import_weights): the id
      # padding holds (-1: the model's pad id, or 0), and a mask that is True on padding too.
      pad_id=-1,
      attend_padding=False,
  ))

  c.model = ConfigDict(dict(
      embed_dim=96,                       # shared embedding space
      dtype='float32',                    # compute dtype
      param_dtype='float32',
      # One tower per modality: dict(type=<a type of models/towers.py's registry>, its options).
      # A `variant` such as 'S/16' (ViT naming) overrides width/depth/mlp_dim/num_heads (and
      # patch_size); '' uses the explicit sizes.
      towers=dict(
          image=dict(type='vit', variant='', patch_size=8, width=96, depth=3, mlp_dim=384,
                     num_heads=4, pool='gap', dropout=0.0),
          text=dict(type='text', variant='', width=96, depth=2, mlp_dim=384, num_heads=4,
                    causal=True, pool='eos', dropout=0.0),
      ),
      temperature_init=1 / 0.07,          # CLIP; SigLIP uses 10
      temperature_max=100.0,              # CLIP's clamp
      bias_init=0.0,                      # SigLIP uses -10
      # Fused features (models/fusion.py): strategy '' (none) | 'cross_attention' | 'co_attention'
      # | 'early' | 'bottleneck' | 'weighted_sum' | 'late', and that strategy's own keys
      # (fusion.OPTIONS), e.g. dict(strategy='cross_attention', query='text', context='image').
      fusion=dict(strategy=''),
      # Task heads by name (models/heads.py): classification, itm, mlm, vqa, caption, e.g.
      # heads.itm = dict(pair=('image', 'text')); each has its own keys (heads.OPTIONS).
      heads=dict(),
      # Speed and memory; none changes the maths. attention: 'auto' = cuDNN flash attention on
      # GPU in 16-bit, XLA elsewhere | 'xla' | 'cudnn' | 'explicit'. remat: 'none' | 'full' |
      # 'save_dots' | 'named' (keeps the activations named in remat_save, see models/layers.py).
      # scan_layers: one nn.scan over each tower's blocks (compile time independent of depth;
      # params get a leading 'layers' axis, and init_from converts either layout).
      attention='auto',
      remat='none',
      remat_save=('qkv', 'attention'),
      scan_layers=False,
      # Parameter-efficient fine-tuning. type='lora': low-rank adapters (rank, scale
      # alpha / rank) on the projections named in `targets` ('qkv', 'attn_out', 'mlp') of every
      # transformer stack; only the adapters and the top-level sub-trees named in `train` (e.g.
      # a new head) learn, the rest is frozen. `python -m mmfusion.peft` merges them for export.
      peft=dict(type='', rank=8, alpha=16.0, targets=('qkv', 'attn_out', 'mlp'), train=()),
      # 'int8': quantised training and inference of every transformer stack's projections with
      # Google's AQT (int8 weights and activations in the forward pass, float gradients; the
      # [quantize] extra). For int8 storage of a trained run see `python -m mmfusion.quantize`.
      quantize='',
  ))

  # name -> dict(weight=..., **kwargs); each name is registered in mmfusion/objectives/.
  # Contrastive objectives bind `pairs` of modalities, each (a, b) or (a, b, weight).
  c.objectives = ConfigDict({
      'softmax_contrastive': dict(weight=1.0, pairs=(('image', 'text'),)),
  })

  c.optim = ConfigDict(dict(
      lr=1e-3, warmup_steps=100, end_lr_ratio=0.0,
      weight_decay=0.1, b1=0.9, b2=0.98, eps=1e-6, clip_norm=1.0,
  ))

  # name -> dict(type=..., every=..., **kwargs); types are registered in mmfusion/evals.
  c.evals = ConfigDict({
      'zeroshot': dict(type='zeroshot', every=250, split='test', batch_size=256,
                       keep_if={'num_objects': 1}, modality='image', prompts='text',
                       templates=('a {}.', 'a picture of a {}.', 'there is a {}.')),
      'retrieval': dict(type='retrieval', every=500, split='validation', batch_size=256,
                        keep_if={}, pair=('image', 'text')),
  })

  # Adversarial training (mmfusion/adversarial.py): type '' (off) | 'pgd' (pixel-space L-inf
  # PGD on image towers, TeCoA-style; eps and step_size in 1/255 units) | 'freelb' (ascent on
  # the token / patch embeddings of `modalities`, FreeLB; kl_weight > 0 adds VILLA's KL term).
  # clean_weight (pgd): the share of the loss taken on the clean images.
  c.adversarial = ConfigDict(dict(type='', eps=4.0, step_size=1.0, steps=3,
                                  modalities=('image',), kl_weight=0.0, clean_weight=0.0))

  # A step whose loss, gradients or update are not finite (NaN / Inf): 'stop' ends the run at the
  # next log or checkpoint step, naming the step, the non-finite losses and the last checkpoint
  # (all checkpoints are from before it); 'skip' drops that step's update and counts it.
  c.train = ConfigDict(dict(nonfinite='stop'))

  c.log_every = 50
  c.checkpoint = ConfigDict(dict(every=100, max_to_keep=2, async_save=True))
  c.init_from = ConfigDict(dict(
      path='',                            # a checkpoint dir or a workdir; '' -> from scratch
      load='',                            # sub-tree of the saved params, e.g. 'image'; '' -> all
      into='',                            # sub-tree of the new params it goes to; '' -> same
      skip=(),                            # new param sub-trees left at their init, e.g. ('vqa',)
  ))
  c.freeze = ()                           # top-level param sub-trees not trained, e.g. ('image',)
  # The device mesh: axis sizes within a granule (a TPU slice, or one process/host on GPU and
  # CPU), and across granules (mesh_dcn: multi-slice TPU, multi-node GPU); each axis's size is
  # the product of both, and one -1 per dict takes what is left. See mmfusion/sharding.py.
  c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.mesh_dcn = ConfigDict(dict(data=1, fsdp=1, tensor=1))
  c.sharding = ConfigDict(dict(
      # Logical axis -> mesh axes: 'data_parallel' | 'fsdp' | 'fsdp_tensor'. Axes of size 1
      # shard nothing, so the default is plain data parallelism on the default mesh.
      preset='fsdp_tensor',
      rules=(),                           # overrides: ((logical axis, mesh axes | None), ...)
      # With fsdp > 1 the run refuses to start when parameters of at least min_bytes holding
      # more than this fraction of the parameter bytes are not split over 'fsdp'.
      max_replicated_fraction=0.05,
      min_bytes=4096,
      allow_replicated=False,
  ))
  return c


def lock(config: ConfigDict) -> ConfigDict:
  config.lock()
  return config


def image_normalization(config: ConfigDict) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) per channel that pixels in [0, 1] are normalised with (configs saved before
  the keys existed: [-1, 1])."""
  return (tuple(config.data.get('image_mean', (0.5,) * 3)),
          tuple(config.data.get('image_std', (0.5,) * 3)))


def parse_arg(arg: str | None, **defaults):
  """Config-file argument `'smoke,steps=300'` -> ConfigDict(smoke=True, steps=300, ...).

  Only the names in `defaults` are allowed; values take the type of their default.
  """
  out = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    name, _, value = item.partition('=')
    if name not in defaults:
      raise ValueError(f'config argument {name!r} is unknown; known: {sorted(defaults)}.')
    default = defaults[name]
    if not value:
      if not isinstance(default, bool):
        raise ValueError(f'config argument {name!r} needs a value ({name}=...).')
      out[name] = True
    elif isinstance(default, bool):
      out[name] = value.lower() in ('1', 'true', 'yes')
    else:
      out[name] = type(default)(value)
  return ConfigDict(out)


def load_module(path: str, next_to: str | None = None):
  """A config file as a module (for configs that share parts with another, e.g. its towers)."""
  if next_to is not None:
    path = os.path.join(os.path.dirname(os.path.abspath(next_to)), path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path} does not exist.')
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f'mmfusion_config_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_file(path: str, *args: str | None, next_to: str | None = None) -> ConfigDict:
  """What `--config path:arg` loads: the config file's `get_config(arg)`.

  Several `args` join with commas, a later name overriding an earlier one; `next_to=__file__`
  reads a relative `path` from the calling file's folder. A config that is another config with
  fixed arguments (`configs/fusion/*.py`) builds on it this way, so the two cannot drift apart.
  """
  module = load_module(path, next_to=next_to)
  arg = ','.join(a for a in args if a)
  return module.get_config(arg) if arg else module.get_config()


def smoke(config: ConfigDict) -> ConfigDict:
  """A few steps on the tiny dataset: checks a config end to end in about a minute."""
  config.data.builder_config = 'tiny'
  config.total_steps = 20
  config.batch_size = 32
  config.log_every = 5
  config.checkpoint.every = 10
  config.optim.warmup_steps = 5
  for name in config.evals:
    config.evals[name].every = 0
    config.evals[name].batch_size = 32
  return config


# ----------------------------------------------------------------------------- validation


def _need(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(message)


def validate(config: ConfigDict, num_devices: int | None = None, num_granules: int = 1) -> None:
  """Every check that needs neither data nor compute; the first failure raises ValueError (or
  FileNotFoundError for a missing init_from path) naming the config key. `num_devices`: check the
  mesh and the batch split against that many devices (in `num_granules` granules)."""
  import jax  # noqa: PLC0415  (config files import this module; keep that light)
  from mmfusion import checkpoint, evals, nonfinite, objectives
  from mmfusion.data import ops
  from mmfusion.models import fusion as fusion_lib
  from mmfusion.models import heads as heads_lib
  from mmfusion.models import model as model_lib
  from mmfusion.models import towers as towers_lib

  _need(config.total_steps > 0, f'config.total_steps = {config.total_steps}: must be > 0.')
  _need(config.batch_size > 0, f'config.batch_size = {config.batch_size}: must be > 0.')
  _need(config.batch_size % jax.process_count() == 0,
        f'config.batch_size = {config.batch_size} must divide evenly over '
        f'{jax.process_count()} processes.')
  k = config.accum_steps
  _need(isinstance(k, int) and not isinstance(k, bool) and k >= 1
        and config.batch_size % max(k, 1) == 0,
        f'config.accum_steps = {k!r}: must be an integer >= 1 that divides config.batch_size '
        f'({config.batch_size}).')
  if 'adversarial' in config:
    from mmfusion import adversarial  # noqa: PLC0415
    adversarial.validate(config.adversarial, config.model.towers, config.accum_steps)
  _need(config.data.image_size > 0,
        f'config.data.image_size = {config.data.image_size}: must be > 0.')
  for key in ('image_mean', 'image_std'):
    value = tuple(config.data[key])
    _need(len(value) == 3 and all(isinstance(v, (int, float)) for v in value),
          f'config.data.{key} = {value}: give one number per colour channel (3).')
  _need(all(v > 0 for v in config.data.image_std),
        f'config.data.image_std = {tuple(config.data.image_std)}: must be > 0.')
  _need(config.data.audio_sample_rate > 0 and config.data.audio_max_seconds > 0,
        f'config.data.audio_sample_rate = {config.data.audio_sample_rate} and '
        f'audio_max_seconds = {config.data.audio_max_seconds}: must be > 0.')
  _need(config.tokenizer.max_len >= 2, f'config.tokenizer.max_len = {config.tokenizer.max_len}: '
        'must be >= 2 (one token and EOS).')
  _need(config.log_every > 0, f'config.log_every = {config.log_every}: must be > 0.')
  _need(config.checkpoint.every >= 0, 'config.checkpoint.every must be >= 0 (0: only at the end).')
  _need(config.optim.lr > 0, f'config.optim.lr = {config.optim.lr}: must be > 0.')
  mode = config.get('train', {}).get('nonfinite', 'stop')
  _need(mode in nonfinite.MODES,
        f'config.train.nonfinite = {mode!r}: must be one of {nonfinite.MODES}.')
  if num_devices is not None:
    dp, batch_axes, shape = _data_parallel(config, num_devices, num_granules)
    _need(config.batch_size % dp == 0,
          f'config.batch_size = {config.batch_size} must be divisible by the data-parallel size '
          f'{dp} (the batch is split over mesh axes {batch_axes} of sizes {shape}).')
    _need(config.batch_size // k % dp == 0,
          f'config.accum_steps = {k}: each micro-batch of {config.batch_size // k} must be '
          f'divisible by the data-parallel size {dp} (mesh axes {batch_axes} of sizes {shape}).')

  inputs = tuple(config.data.inputs)
  unknown = [i for i in inputs if i not in ops.REGISTRY]
  _need(not unknown, f'config.data.inputs names {unknown}; known inputs: {sorted(ops.REGISTRY)}.')

  # The model: every tower, the fusion and every head built (with placeholder sizes where the
  # data decides them), which checks their keys and values.
  model_lib.build(_with_placeholders(config.model), vocab_size=max(config.tokenizer.vocab_size, 8))
  towers = set(config.model.towers)
  for m, tower_config in config.model.towers.items():
    # A tower that computes its own features from waveforms must hear them at the data's rate.
    rate = towers_lib.options(m, tower_config).get('sample_rate')
    _need(rate is None or rate == config.data.audio_sample_rate,
          f'config.model.towers.{m}.sample_rate = {rate}, but the audio inputs are at '
          f'config.data.audio_sample_rate = {config.data.audio_sample_rate}.')
  heads = heads_lib.options(config.model.heads)
  brings = _batch_modalities(inputs, towers, heads)

  objectives.check_config(config.objectives)
  for name, cfg in config.objectives.items():
    for path in objectives.needs(name, cfg)[0]:
      if path.startswith('embeddings/'):
        m = path.split('/', 1)[1]
        _need(m in towers, f'config.objectives.{name} binds {m!r}, which has no tower in '
              f'config.model.towers (it has {sorted(towers)}).')
        _need(m in brings, f'config.objectives.{name} binds {m!r}, which the batch lacks: '
              f'config.data.inputs = {inputs} brings {sorted(brings)}.')

  fusion = fusion_lib.options(config.model.fusion)
  if fusion:
    for key in ('query', 'context') if fusion['strategy'] == 'cross_attention' else ():
      _need(fusion[key] in brings,
            f'config.model.fusion.{key} = {fusion[key]!r} names a modality the batch lacks: '
            f'config.data.inputs = {inputs} brings {sorted(brings)}.')
    _need(len(brings) >= 2,
          f"config.model.fusion.strategy = {fusion['strategy']!r} fuses modalities, but "
          f'config.data.inputs = {inputs} brings only {sorted(brings)}.')
  if 'caption' in heads:
    _need(heads['caption']['max_len'] >= config.tokenizer.max_len,
          f"config.model.heads.caption.max_len = {heads['caption']['max_len']} must be >= "
          f'config.tokenizer.max_len = {config.tokenizer.max_len} (the texts it learns from).')

  for name, cfg in config.evals.items():
    evals.check(name, cfg, config)
  if config.init_from.path:
    checkpoint.find_step_dir(config.init_from.path)   # fails early with the path in the message


def _batch_modalities(inputs, towers, heads) -> set[str]:
  """The modalities a training batch brings to the model: its inputs that have a tower, and
  the modality that reads the VQA question."""
  brings = {i for i in inputs if i in towers}
  if {'question', 'spoken_question'} & set(inputs) and 'vqa' in heads:
    brings.add(heads['vqa']['question'])
  return brings


def _with_placeholders(model_config: ConfigDict) -> dict[str, Any]:
  """config.model with the counts that come from the data (-1) set to 2, for checking."""
  model = model_config.to_dict()
  for head, key in (('classification', 'num_classes'), ('vqa', 'answers')):
    if head in model['heads'] and model['heads'][head].get(key, -1) == -1:
      model['heads'][head][key] = 2
  return model


def resolve(config: ConfigDict, source: Any) -> ConfigDict:
  """A locked copy with the values that come from the data filled in: -1 classes of the
  classification head (the dataset's labels) and -1 answers of the VQA head (the train split's
  answer vocabulary); evaluators that score labels left out, with a message, when the dataset
  has none; with config.data.fit_batch_size, a batch that a small train split fills; a 'files:'
  path made absolute. `source` reads the resolved config from then on (its training batches
  follow the batch size)."""
  config = ConfigDict(config.to_dict())
  heads = config.model.heads
  if 'classification' in heads and heads.classification.get('num_classes', -1) == -1:
    heads.classification.num_classes = len(source.class_names())
  if 'vqa' in heads and heads.vqa.get('answers', -1) == -1:
    heads.vqa.answers = len(source.answers)
  if not source.has_labels():
    _leave_out_label_evals(config, source.where)
  if config.data.get('fit_batch_size', False):
    _fit_batch_size(config, source)
  if config.data.name.startswith('files:'):
    from mmfusion.data import files   # noqa: PLC0415  (TensorFlow; the trainer has it loaded)
    # The saved config (config.json, checkpoints) then finds the data from any directory.
    config.data.name = files.absolute_name(config.data.name)
  source.config = config = lock(config)
  return config


def _say(message: str) -> None:
  import jax  # noqa: PLC0415
  if jax.process_index() == 0:
    print(f'[mmfusion] {message}', flush=True)


def _leave_out_label_evals(config: ConfigDict, dataset: str) -> None:
  """Zero-shot and classification score predictions against labels: on a dataset without any
  they have nothing to score, so they are left out instead of failing after training. (A
  classification head or a 'label' input still fails: neither can be fed without labels.)"""
  from mmfusion import evals  # noqa: PLC0415
  for name in [n for n in config.evals if evals.reads_labels(n, config.evals[n])]:
    _say(f'config.evals.{name} (type {config.evals[name].get("type")!r}) is left out: dataset '
         f'{dataset} has no labels (a ClassLabel "label" feature) to score it against.')
    del config.evals[name]


def _data_parallel(config: ConfigDict, num_devices: int, num_granules: int
                   ) -> tuple[int, tuple[str, ...], dict[str, int]]:
  """(data-parallel size, the mesh axes the batch is split over, the mesh's axis sizes) of
  config.mesh / config.sharding on `num_devices` devices."""
  from mmfusion import sharding  # noqa: PLC0415
  shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(
      config.mesh, num_devices, config.mesh_dcn, num_granules)))
  batch_axes = sharding.logical_axes_of(('batch',), sharding.rules_from_config(config.sharding))
  return math.prod(shape[a] for a in batch_axes), batch_axes, shape


def _fit_batch_size(config: ConfigDict, source: Any) -> None:
  """A train split smaller than config.batch_size: the largest batch it fills, in whole
  multiples of what a batch is split over (the data-parallel devices times accum_steps, and the
  processes), with a warning."""
  import jax  # noqa: PLC0415
  from mmfusion import sharding  # noqa: PLC0415
  processes = jax.process_count()
  try:
    num = source.num_examples(config.data.train_split)
  except (KeyError, ValueError):
    return                 # no such split: the training stream names it (data/training.py)
  available = num // processes * processes    # each process reads an equal part of it
  if available >= config.batch_size:
    return
  dp, _, _ = _data_parallel(config, jax.device_count(), sharding.granules()[0])
  multiple = math.lcm(dp * config.accum_steps, processes)
  fitted = available // multiple * multiple
  _need(fitted > 0, f'config.data.train_split = {config.data.train_split!r} of dataset '
        f'{source.where} has {num} examples, fewer than the smallest batch: {multiple} '
        '(one per data-parallel device and accumulation step, and per process).')
  _say(f'warning: the train split of {source.where} has {num} examples, fewer than '
       f'config.batch_size = {config.batch_size}: training on batches of {fitted} instead '
       '(config.data.fit_batch_size).')
  config.batch_size = fitted
