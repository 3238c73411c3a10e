"""The schema every experiment config starts from, and its validation.

`base()` holds every key the code reads, with defaults; `configs/<name>.py` changes values
and returns `lock(config)`. Locked dicts refuse unknown keys, so a typo fails loudly.
"""
from __future__ import annotations

import importlib.util
import os

import ml_collections

ConfigDict = ml_collections.ConfigDict


def base() -> ConfigDict:
  c = ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 256                      # global, over all hosts and devices

  c.data = ConfigDict(dict(
      name='mmfusion_shapes',             # any TFDS dataset with image/captions features
      builder_config='',                  # '' -> the builder's default config
      data_dir='',                        # '' -> $MMFUSION_DATA_DIR or ~/.cache/mmfusion/datasets
      train_split='train',
      inputs=('image', 'text', 'text_mask', 'label'),  # batch keys the model and losses see
      image_size=32,                      # pixels after resize
      shuffle_buffer=10_000,              # only when a host's split does not fit in memory
      augment=True,                       # light colour jitter; geometry is left alone
      prefetch=2,                         # batches kept ready on device
  ))
  c.tokenizer = ConfigDict(dict(
      model='',                           # path to a sentencepiece .model; '' -> train from captions
      vocab_size=256,                     # when training one
      max_len=16,                         # tokens per text, EOS included
  ))

  c.model = ConfigDict(dict(
      embed_dim=96,                       # shared embedding space
      dtype='float32',                    # compute dtype
      param_dtype='float32',
      # A variant such as 'S/16' (ViT naming) overrides width/depth/mlp_dim/num_heads
      # (and patch_size); '' uses the explicit sizes.
      image=dict(variant='', patch_size=8, width=96, depth=3, mlp_dim=384,
                 num_heads=4, pool='gap', dropout=0.0),
      text=dict(variant='', width=96, depth=2, mlp_dim=384, num_heads=4,
                causal=True, pool='eos', dropout=0.0),
      temperature_init=1 / 0.07,          # CLIP; SigLIP uses 10
      temperature_max=100.0,              # CLIP's clamp
      bias_init=0.0,                      # SigLIP uses -10
      head=dict(num_classes=0, input='image'),   # 0 -> no classification head
      # Fused image-text features (models/fusion.py): strategy '' (none) | 'cross_attention' |
      # 'co_attention' | 'early' | 'bottleneck' | 'weighted_sum' | 'late'. query/context: who
      # cross-attends to whom (cross_attention); start_layer: the first fusion layer with
      # cross-attention (cross_attention) or bottleneck exchange (bottleneck); gate: 'weights'
      # | 'gates' (weighted_sum).
      fusion=dict(strategy='', width=96, depth=2, num_heads=4, mlp_dim=384, query='text',
                  context='image', start_layer=0, num_bottleneck=4, gate='weights',
                  dropout=0.0),
      # Heads on the fused features: image-text match, masked LM, VQA over vocab_answers
      # answers (-1: the dataset's answer vocabulary). late_combine: how 'late' fusion mixes
      # its per-modality logits ('mean' | 'learned').
      heads=dict(itm=False, mlm=False, vqa_answers=0, late_combine='learned'),
      # Caption decoder (CoCa-style), cross-attending to the image tokens; depth 0 -> none.
      # max_len: the longest caption it writes (tokens, EOS included).
      decoder=dict(depth=0, width=96, mlp_dim=384, num_heads=4, dropout=0.0, max_len=16),
      # Speed and memory; none changes the maths. attention: 'auto' = cuDNN flash attention on
      # GPU in 16-bit, XLA elsewhere | 'xla' | 'cudnn' | 'explicit'. remat: 'none' | 'full' |
      # 'save_dots' | 'named' (keeps the activations named in remat_save, see models/layers.py).
      # scan_layers: one nn.scan over each tower's blocks (compile time independent of depth;
      # params get a leading 'layers' axis, and init_from converts either layout).
      attention='auto',
      remat='none',
      remat_save=('qkv', 'attention'),
      scan_layers=False,
  ))

  # name -> dict(weight=..., **kwargs); each name is registered in mmfusion/objectives.py.
  c.objectives = ConfigDict({'softmax_contrastive': dict(weight=1.0)})

  c.optim = ConfigDict(dict(
      lr=1e-3, warmup_steps=100, end_lr_ratio=0.0,
      weight_decay=0.1, b1=0.9, b2=0.98, eps=1e-6, clip_norm=1.0,
  ))

  # name -> dict(type=..., every=..., **kwargs); types are registered in mmfusion/evals.
  c.evals = ConfigDict({
      'zeroshot': dict(type='zeroshot', every=250, split='test', batch_size=256,
                       keep_if={'num_objects': 1},
                       templates=('a {}.', 'a picture of a {}.', 'there is a {}.')),
      'retrieval': dict(type='retrieval', every=500, split='validation', batch_size=256,
                        keep_if={}),
  })

  c.log_every = 50
  c.checkpoint = ConfigDict(dict(every=100, max_to_keep=2, async_save=True))
  c.init_from = ConfigDict(dict(
      path='',                            # a checkpoint dir or a workdir; '' -> from scratch
      load='',                            # sub-tree of the saved params, e.g. 'image'; '' -> all
      into='',                            # sub-tree of the new params it goes to; '' -> same
      skip=(),                            # new param sub-trees left at their init, e.g. ('head',)
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


def load_file(path: str, *args: str | None, next_to: str | None = None) -> ConfigDict:
  """What `--config path:arg` loads: the config file's `get_config(arg)`.

  Several `args` join with commas, a later name overriding an earlier one; `next_to=__file__`
  reads a relative `path` from the calling file's folder. A config that is another config with
  fixed arguments (`configs/fusion/*.py`) builds on it this way, so the two cannot drift apart.
  """
  if next_to is not None:
    path = os.path.join(os.path.dirname(os.path.abspath(next_to)), path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path} does not exist.')
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f'mmfusion_config_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
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
