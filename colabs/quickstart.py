# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/mmfusion/mmfusion/blob/main/colabs/quickstart.ipynb)
#
# # mmfusion quickstart: load a run, embed, classify zero-shot, retrieve
#
# `mmfusion.load_run(workdir)` opens any trained run: its config, tokenizer, model and
# parameters. Its methods take plain inputs (numpy / PIL images, strings, waveforms) and
# preprocess them with the run's own evaluation code, so what you see here is what the
# evaluators measure.

# %%
# On Colab: fetch mmfusion and install it with the notebook extras (nothing happens elsewhere).
import os
import subprocess
import sys

if 'google.colab' in sys.modules and not os.path.isdir('/content/mmfusion'):
  subprocess.run('git clone -q --depth 1 https://github.com/mmfusion/mmfusion /content/mmfusion'
                 ' && pip install -q -e "/content/mmfusion[explore]"', shell=True, check=True)
  sys.path.insert(0, '/content/mmfusion')

# %% tags=["parameters"]
# SMALL: what the tests run (a 20-step run on the tiny dataset, a few examples). Otherwise the
# README's default run, trained here first (about 4 minutes on 2 CPU cores) if RUNS has none.
SMALL = os.environ.get('MMFUSION_NOTEBOOK_SMALL', '0') == '1'
RUNS = os.environ.get('MMFUSION_RUNS', '')

# %%
import numpy as np

import mmfusion
from mmfusion import notebook

RUNS = os.path.abspath(RUNS or os.path.join(notebook.ROOT, 'workdirs'))
# Trained here first (the real CLI, a live loss plot) unless the run has finished already.
workdir = notebook.trained('shapes_clip.py:smoke' if SMALL else 'shapes_clip.py',
                           os.path.join(RUNS, 'shapes_clip_smoke' if SMALL else 'shapes_clip'))
run = mmfusion.load_run(workdir)
run

# %% [markdown]
# ## The data
# The embedded dataset: rendered scenes of one or two coloured shapes, five captions each.

# %%
test = run.examples('test', n=16)
notebook.image_grid(test['image'], [c[0] for c in test['captions']], cols=8, size=1.8);

# %% [markdown]
# ## Embeddings
# Unit vectors in one shared space, one per input; cosine similarity is a dot product.

# %%
z_image = run.embed(image=test['image'][:4])
z_text = run.embed(text=[c[0] for c in test['captions'][:4]])
print(z_image.shape, z_text.shape)
print(np.round(z_image @ z_text.T, 2))   # the diagonal: each image with its own caption

# %% [markdown]
# ## Zero-shot classification
# Each class name written into prompt templates, embedded and averaged (CLIP's prompt
# ensemble); every image takes its nearest class. On the single-object test images, with the
# templates the run's own evaluator uses, this is the run's `zeroshot/accuracy` exactly.

# %%
single = run.examples('test', n=64 if SMALL else None, keep_if={'num_objects': 1})
templates = tuple(run.config.evals.zeroshot.templates)
result = run.zeroshot(single['image'], run.source.class_names(), prompts=templates)
accuracy = float(np.mean(result.predictions == single['label']))
print(f'zero-shot accuracy on {len(single["label"])} single-object test images: {accuracy:.3f}')
notebook.image_grid(single['image'][:8], result.labels[:8], cols=8, size=1.8);

# %% [markdown]
# ## Retrieval: a text query against a gallery of images
# The five nearest test images for each query (the gallery is the whole test split).

# %%
gallery = run.examples('test', n=64 if SMALL else None)
queries = ['a red circle', 'a blue square on the left', 'a small green triangle',
           'a yellow diamond above a purple cross']
found = run.retrieve(queries, list(gallery['image']), k=5)
images, titles = [], []
for query, indices, scores in zip(queries, found.indices, found.scores):
  for rank, (i, s) in enumerate(zip(indices, scores)):
    images.append(gallery['image'][i])
    titles.append(f'{query}\n{s:.2f}' if rank == 0 else f'{s:.2f}')
figure = notebook.image_grid(images, titles, cols=5, size=1.9,
                             path=None if SMALL else os.path.join(notebook.ROOT, 'docs',
                                                                  'retrieval_gallery.png'))

# %% [markdown]
# Next: `explain.ipynb` (heat-maps), `speech.ipynb`, `finetune.ipynb`, `fusion.ipynb`.
