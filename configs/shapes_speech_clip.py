r"""Speech-image contrastive learning (the SpeechCLIP / FaST-VGS setting): spoken captions and
images only, no text anywhere in training.

The speech tower of configs/shapes_trimodal.py and a ViT learn a shared space from the spoken
shapes (one spoken caption per scene, 18 training speakers). Evaluated on the test split (3
unseen speakers): image <-> speech retrieval, and zero-shot image classification from spoken
class prompts ('a red circle.' said by the test speakers).

  python -m mmfusion.main --config configs/shapes_speech_clip.py \
      --workdir workdirs/shapes_speech_clip

Arguments: `features=log_mel|mfcc`, `steps=`, `smoke`.

Result: not measured at full length yet (the tri-modal runs took this session's CPU time); the
same towers and data reach image->speech R@1 0.525 and zero-shot from spoken prompts 0.959
with text beside them (configs/shapes_trimodal.py). tests/test_speech_end_to_end.py runs it
end to end on the tiny spoken dataset.
"""
from mmfusion import config as mmf_config

shapes_trimodal = mmf_config.load_module('shapes_trimodal.py', next_to=__file__)


def get_config(arg=None):
  arg = mmf_config.parse_arg(arg, features='log_mel', steps=1200, smoke=False)
  config = mmf_config.base()
  config.data.builder_config = 'spoken'
  config.data.inputs = ('image', 'audio', 'label')
  del config.model.towers['text']
  config.model.towers.audio = shapes_trimodal.audio_tower(arg.features)
  pairs = (('image', 'audio', 1.0),)
  config.objectives = {'softmax_contrastive': dict(weight=1.0, pairs=pairs)}
  config.evals = shapes_trimodal.speech_evals(pairs)
  return shapes_trimodal.schedule(config, arg.steps, arg.smoke)
