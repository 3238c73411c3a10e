"""Public CLIP / SigLIP weights read into mmfusion's parameter layout.

  tensors.py    the source checkpoint's named arrays, each taken once: what is left is reported
  layout.py     one transformer stack, a ViT and a text tower in mmfusion's param names, from
                PyTorch (Linear: y = x W^T + b) or Flax (big_vision) pieces; position-embedding
                resampling
  readers.py    OpenAI / open_clip state dicts, Hugging Face CLIP / SigLIP, big_vision SigLIP
                .npz -> `Imported` (towers config, params, logit scale / bias, preprocessing)

`python -m mmfusion.import_weights` (mmfusion/import_weights.py) writes an `Imported` as a
workdir that `load_run`, `init_from` and the trainer read.
"""
