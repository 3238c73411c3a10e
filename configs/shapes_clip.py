r"""Default run: CLIP-style pretraining (softmax contrastive) on the embedded shapes dataset.

A ViT (32 px, patch 4) and a causal text transformer learn a shared embedding from
rendered images of coloured shapes and their captions. Everything is local: the first run
renders the dataset and trains the sentencepiece tokenizer (cached in the data dir).

  python -m mmfusion.main --config configs/shapes_clip.py --workdir workdirs/shapes_clip

Argument: `configs/shapes_clip.py:smoke` runs 20 steps on the tiny dataset.

Result: RESULT_PLACEHOLDER
"""
from mmfusion import config as mmf_config


def get_config(arg=None):
  arg = mmf_config.parse_arg(arg, smoke=False)
  config = mmf_config.base()
  config.objectives = {'softmax_contrastive': dict(weight=1.0)}
  if arg.smoke:
    mmf_config.smoke(config)
  return mmf_config.lock(config)
