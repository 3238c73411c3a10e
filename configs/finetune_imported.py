r"""Contrastive fine-tuning of imported public weights on the embedded shapes dataset.

  python -m mmfusion.import_weights --source hf --checkpoint DIR --workdir workdirs/imported
  python -m mmfusion.main --config configs/finetune_imported.py:workdir=workdirs/imported \
      --workdir workdirs/imported_ft

The run is the imported one (its towers, tokenizer, image size and normalisation, logit scale
and bias, contrastive objective), started from its checkpoint through `init_from`, with a
fine-tuning schedule: a small learning rate, short warmup. Override anything with --config.*.

Arguments: `workdir=PATH` (the output of mmfusion.import_weights; default workdirs/imported),
`steps=`, `smoke` (20 steps on the tiny dataset).
"""
import json
import os

from mmfusion import config as mmf_config


def imported_config(workdir: str) -> mmf_config.ConfigDict:
  """The config mmfusion.import_weights wrote into `workdir` (its newest checkpoint's)."""
  root = os.path.join(workdir, 'checkpoints')
  steps = sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []
  if not steps:
    raise FileNotFoundError(f'configs/finetune_imported.py: {workdir} holds no checkpoint; '
                            'make it with python -m mmfusion.import_weights.')
  with open(os.path.join(root, str(steps[-1]), 'meta', 'metadata')) as f:
    return mmf_config.ConfigDict(json.load(f)['config'])


def get_config(arg=None):
  arg = mmf_config.parse_arg(arg, workdir='workdirs/imported', steps=500, smoke=False)
  config = mmf_config.base()
  saved = imported_config(arg.workdir)
  config.model = saved.model
  config.objectives = saved.objectives
  config.tokenizer = saved.tokenizer
  for key in ('image_size', 'image_mean', 'image_std'):
    config.data[key] = tuple(saved.data[key]) if key != 'image_size' else saved.data[key]
  config.init_from.path = os.path.abspath(arg.workdir)
  config.total_steps = arg.steps
  config.optim.lr = 1e-5
  config.optim.warmup_steps = 50
  config.optim.weight_decay = 0.0
  if arg.smoke:
    mmf_config.smoke(config)
  return mmf_config.lock(config)
