"""The input side, one job per module:

  sources.py     datasets (TFDS builders found or rendered locally), reading, filters, counts
  ops.py         preprocessing ops keyed by modality / target (registry), label and objects
  image.py       the image modality's op        text.py   captions and questions, vocabularies
  audio.py       the audio modality's ops (spoken captions, spoken questions)
  training.py    the resumable training stream   evaluation.py   padded evaluation batches
  prefetch.py    threaded prefetch               shapes.py  the embedded dataset
  spoken.py      its spoken configs              tts.py     text to speech (eSpeak NG)
  files.py       your own images and captions (config.data.name = 'files:PATH'), built once
                 into a TFDS dataset             manifests.py  its JSONL / CSV / folder reading
  tokenizer.py   sentencepiece                   tf_lazy.py  TensorFlow / TFDS, imported at first use

Importing the package registers the built-in ops.
"""
from mmfusion.data import audio as _audio  # noqa: F401  (ops 'audio', 'spoken_question')
from mmfusion.data import image as _image  # noqa: F401  (op 'image')
from mmfusion.data import text as _text    # noqa: F401  (ops 'text', 'question')
