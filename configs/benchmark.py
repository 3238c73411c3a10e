r"""Benchmark shapes: the CLIP models that `benchmarks/train_step.py` times against open_clip.

  python -m benchmarks.train_step --config configs/benchmark.py:tiny        # CPU
  python -m benchmarks.train_step --config configs/benchmark.py:b16         # GPU, bf16

tiny: image 64 px, patch 8, width 256, 6 layers, 4 heads; text context 32, vocab 8192,
  width 256, 6 layers, 4 heads; embed 256; batch 128; float32.
b16: CLIP ViT-B/16 at 224 px (width 768, 12 layers, 12 heads) with CLIP's text tower
  (context 77, vocab 49408, width 512, 12 layers, 8 heads); embed 512; batch 256;
  bfloat16 compute, float32 params and optimizer state.
Both pool the image with a cls token and the text at EOS under causal attention, as
open_clip's CLIP does. They are ordinary experiment configs: with `data.image_size` and the
tokenizer they also train on the shapes dataset (the tokenizer is then trained to
`tokenizer.vocab_size`, which a few thousand captions cannot fill for b16).

Without an argument it is `tiny`. Further arguments (comma-separated) change the speed features without changing the maths:
  depth=N        layers of both towers (for compile-time scaling)
  scan           nn.scan over layers          remat=full|save_dots|named
  dtype=float32|bfloat16                       attention=auto|xla|cudnn|explicit
  batch=N
Results: benchmarks/RESULTS.md.
"""
from mmfusion import config as mmf_config

SHAPES = {
    'tiny': dict(
        image_size=64, patch_size=8, image=(256, 6, 1024, 4),
        max_len=32, vocab_size=8192, text=(256, 6, 1024, 4),
        embed_dim=256, batch=128, dtype='float32'),
    'b16': dict(
        image_size=224, patch_size=16, image=(768, 12, 3072, 12),
        max_len=77, vocab_size=49408, text=(512, 12, 2048, 8),
        embed_dim=512, batch=256, dtype='bfloat16'),
}


def get_config(arg=None):
  arg = mmf_config.parse_arg(arg, tiny=False, b16=False, depth=0, scan=False, remat='none',
                             dtype='', attention='auto', batch=0)
  if arg.tiny and arg.b16:
    raise ValueError("configs/benchmark.py takes one of 'tiny' (the default) or 'b16', not both")
  shapes = SHAPES['b16' if arg.b16 else 'tiny']
  config = mmf_config.base()
  config.batch_size = arg.batch or shapes['batch']
  config.data.image_size = shapes['image_size']
  config.data.inputs = ('image', 'text')
  config.tokenizer.vocab_size = shapes['vocab_size']
  config.tokenizer.max_len = shapes['max_len']

  model = config.model
  model.embed_dim = shapes['embed_dim']
  model.dtype = arg.dtype or shapes['dtype']
  for tower, sizes in (('image', shapes['image']), ('text', shapes['text'])):
    width, depth, mlp_dim, num_heads = sizes
    model.towers[tower].update(variant='', width=width, depth=arg.depth or depth,
                               mlp_dim=mlp_dim, num_heads=num_heads)
  model.towers.image.patch_size = shapes['patch_size']
  model.towers.image.pool = 'cls'
  model.towers.text.update(causal=True, pool='eos')
  model.scan_layers = arg.scan
  model.remat = arg.remat
  model.attention = arg.attention

  config.objectives = {'softmax_contrastive': dict(weight=1.0, pairs=(('image', 'text'),))}
  config.evals = {}
  return mmf_config.lock(config)
