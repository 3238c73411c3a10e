r"""VQA on the embedded shapes dataset, through any fusion strategy, fine-tuned from the default
run's towers.

The image and the question run through the towers of `configs/shapes_clip.py`'s checkpoint,
a fusion module (the strategy is the config argument) fuses them, and a head classifies
over the answer vocabulary (every answer of the train split: colours, shapes, sizes, counts,
yes / no). One question per image per epoch, drawn at random from its five.

  python -m mmfusion.main --config configs/shapes_clip.py --workdir workdirs/shapes_clip
  python -m mmfusion.main --config configs/shapes_vqa.py:strategy=cross_attention --workdir workdirs/vqa_cross_attention

Arguments (comma-separated): `strategy=` cross_attention (default) | co_attention | early |
bottleneck | weighted_sum | late; `init=PATH` (default workdirs/shapes_clip); `scratch`
(no pretrained towers); `steps=` (default 600); `smoke` (a few steps on the tiny dataset).

RESULTS
"""
from mmfusion import config as mmf_config

STRATEGIES = ('cross_attention', 'co_attention', 'early', 'bottleneck', 'weighted_sum', 'late')


def get_config(arg=None):
  arg = mmf_config.parse_arg(arg, strategy='cross_attention', init='workdirs/shapes_clip',
                             scratch=False, steps=600, smoke=False)
  if arg.strategy not in STRATEGIES:
    raise ValueError(f'config argument strategy={arg.strategy!r}; known: {STRATEGIES}.')
  config = mmf_config.base()
  config.data.inputs = ('image', 'question', 'question_mask', 'answer')
  config.model.fusion.update(strategy=arg.strategy, depth=2, start_layer=0)
  config.model.heads.vqa_answers = -1          # -1: the train split's answer vocabulary
  config.objectives = {'vqa': dict(weight=1.0)}
  config.total_steps = arg.steps
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 50
  config.evals = {
      'vqa': dict(type='vqa', every=200, split='test', batch_size=256, keep_if={}),
  }
  config.checkpoint.every = 200
  if not arg.scratch:
    config.init_from.path = arg.init
    # The towers (and temperature) come from the CLIP run; fusion and head start at init.
    config.init_from.skip = ('fusion', 'vqa_head')
  if arg.smoke:
    mmf_config.smoke(config)
  return mmf_config.lock(config)
