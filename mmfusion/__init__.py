"""mmfusion: multimodal transformers in JAX/Flax (image, text, audio; contrastive + generative).

`mmfusion.load_run(workdir)` opens a trained run for use from Python (mmfusion/api.py); the
package itself imports nothing heavy until then.
"""


def load_run(workdir: str, **kwargs):
  """The run in `workdir`, ready to embed, classify, retrieve and explain: see mmfusion.api."""
  from mmfusion import api
  return api.load_run(workdir, **kwargs)
