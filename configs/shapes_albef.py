r"""ALBEF-style pretraining: image-text contrastive (ITC) + image-text matching with hard
negatives (ITM) + masked language modelling conditioned on the image (MLM).

A bidirectional text tower (cls pooling) feeds both the contrastive loss and a cross-attention
fusion module (text queries image tokens) shared by the ITM head (one hard negative text per
image and one hard negative image per text, drawn from the contrastive similarities) and the
MLM head (15% of the text tokens masked 80/10/10). Retrieval is evaluated with the contrastive
score alone and re-ranked by the ITM head over the top 8 candidates.

  python -m mmfusion.main --config configs/shapes_albef.py --workdir workdirs/shapes_albef

Argument: `configs/shapes_albef.py:smoke` runs 20 steps on the tiny dataset.

RESULTS
"""
from mmfusion import config as mmf_config


def get_config(arg=None):
  arg = mmf_config.parse_arg(arg, smoke=False)
  config = mmf_config.base()
  config.model.text.update(causal=False, pool='cls')
  config.model.fusion.update(strategy='cross_attention', query='text', context='image',
                             depth=2, start_layer=0)
  config.model.heads.update(itm=True, mlm=True)
  config.objectives = {
      'softmax_contrastive': dict(weight=1.0),
      'itm': dict(weight=1.0),
      'mlm': dict(weight=1.0),
  }
  config.evals.retrieval.rerank_k = 8
  if arg.smoke:
    mmf_config.smoke(config)
  return mmf_config.lock(config)
