"""The input side, one job per module:

  sources.py     datasets (TFDS builders found or rendered locally), reading, filters, counts
  ops.py         preprocessing ops keyed by modality / target (registry), label and objects
  image.py       the image modality's op        text.py   captions and questions, vocabularies
  training.py    the resumable training stream   evaluation.py   padded evaluation batches
  prefetch.py    threaded prefetch               shapes.py  the embedded dataset
  tokenizer.py   sentencepiece

Importing the package registers the built-in ops.
"""
from mmfusion.data import image as _image  # noqa: F401  (op 'image')
from mmfusion.data import text as _text    # noqa: F401  (ops 'text', 'question')
