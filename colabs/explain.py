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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/mmfusion/mmfusion/blob/main/colabs/explain.ipynb)
#
# # Heat-maps that point at the right object, measured
#
# Which patches does a model's answer rest on? `run.explain(method, image=..., text=...)`
# reads the attention the model itself sows (Flax `sow`) and its gradient (Flax `perturb`),
# and folds the relevance of each patch back onto the image (or the spectrogram):
#
# | method | what it is |
# |---|---|
# | `rollout` | attention rollout (Abnar & Zuidema 2020): the heads' mean attention, residual as 0.5 I, multiplied through the layers. No gradient: a tower's rollout does not know which phrase you asked about. |
# | `chefer` | gradient-weighted relevance (Chefer, Gur & Wolf 2021): each layer adds E_heads[(grad * A)+] R; through a cross-attention fusion, their bi-modal rule. |
# | `gradcam` | ALBEF's Grad-CAM: a cross-attention map times its positive gradient of the image-text-matching logit, one map per word. |
#
# And then we **measure** them: the renderer of the embedded dataset knows every object's
# pixels, so we can count how often a heat-map's maximum falls on the object a phrase names
# (the pointing game).

# %%
# On Colab: fetch mmfusion and install it with the notebook and speech extras (nothing happens
# elsewhere).
import os
import subprocess
import sys

if 'google.colab' in sys.modules and not os.path.isdir('/content/mmfusion'):
  subprocess.run('git clone -q --depth 1 https://github.com/mmfusion/mmfusion /content/mmfusion'
                 ' && pip install -q -e "/content/mmfusion[explore,speech]"', shell=True, check=True)
  sys.path.insert(0, '/content/mmfusion')

# %% tags=["parameters"]
# SMALL: what the tests run (20-step runs on the tiny datasets, a few scenes). Otherwise the
# README's runs (trained here first if RUNS lacks them: the default CLIP run ~4 min, ALBEF
# ~15 min, the tri-modal speech run ~15 min on 2 CPU cores).
SMALL = os.environ.get('MMFUSION_NOTEBOOK_SMALL', '0') == '1'
RUNS = os.environ.get('MMFUSION_RUNS', '')

# %%
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

from mmfusion import notebook, pointing
from mmfusion.models import frontend

RUNS = os.path.abspath(RUNS or os.path.join(notebook.ROOT, 'workdirs'))


def open_run(config, name):
  """The run `name` in RUNS (its small variant in small mode), trained first if need be."""
  return notebook.open_run(f'{config}:smoke' if SMALL else config,
                           os.path.join(RUNS, f'{name}_smoke' if SMALL else name))


clip = open_run('shapes_clip.py', 'shapes_clip')        # contrastive towers only
albef = open_run('shapes_albef.py', 'shapes_albef')     # + cross-attention fusion, ITM, MLM
clip, albef

# %% [markdown]
# ## Two objects, two phrases
# Test scenes with two objects, rendered again from their seeds (so we also get each object's
# pixel mask). For each object we ask about the phrase "the <colour> <shape>" and explain the
# contrastive similarity of the image with it, by rollout and by relevance.

# %%
scenes = pointing.scenes('test', clip.config.data.builder_config or 'default',
                         limit=3 if SMALL else 4)
images = np.stack([s['image'] for s in scenes for _ in range(2)])
phrases = [pointing.phrase(s['objects'][i]) for s in scenes for i in range(2)]
maps = {m: clip.explain(m, image=images, text=phrases) for m in ('rollout', 'chefer')}
fig, axes = plt.subplots(3, len(phrases), figsize=(1.9 * len(phrases), 6))
for j, phrase in enumerate(phrases):
  axes[0, j].imshow(images[j])
  axes[0, j].contour(scenes[j // 2]['masks'][j % 2], levels=[0.5], colors='white')
  axes[0, j].set_title(phrase, fontsize=8)
  axes[0, j].axis('off')
  for row, method in enumerate(maps, start=1):
    notebook.overlay(axes[row, j], images[j], maps[method].heatmap[j], method)
fig.suptitle('contrastive similarity of the image with the phrase (white: the named object)')
fig.tight_layout()
if not SMALL:
  fig.savefig(os.path.join(notebook.ROOT, 'docs', 'heatmaps.png'), dpi=110, bbox_inches='tight')

# %% [markdown]
# Rollout draws the same map for both phrases: without a gradient it only shows where the
# tower attends. Relevance moves with the phrase.
#
# ## Per word: Grad-CAM on ALBEF's cross-attention
# ALBEF fuses the text with the image by cross-attention and scores the pair with an
# image-text-matching head. Grad-CAM weighs a cross-attention map by its positive gradient
# of the ITM logit; each text token's row is a map of its own. As in ALBEF it reads a layer
# below the top one (in the top layer only the fused summary token reaches the ITM head).

# %%
def named(obj):
  article = 'an' if obj['colour'][0] in 'aeiou' else 'a'
  return f"{article} {obj['colour']} {obj['shape']}"


caption = [f"{named(scenes[0]['objects'][0])} and {named(scenes[0]['objects'][1])}"]
cam = albef.explain('gradcam', image=scenes[0]['image'][None], text=caption)
ids, _ = albef.tokenizer.encode(caption, albef.config.tokenizer.max_len)
words = albef.tokenizer.pieces(ids[0][cam.query_mask[0]])
print(f'{caption[0]!r}: match probability',
      float(albef.match(scenes[0]['image'][None], caption)[0]))
fig, axes = plt.subplots(1, len(words) + 1, figsize=(1.6 * (len(words) + 1), 2))
notebook.overlay(axes[0], scenes[0]['image'], cam.heatmap[0], 'all words')
for ax, word, heat in zip(axes[1:], words, cam.per_token[0][cam.query_mask[0]]):
  notebook.overlay(ax, scenes[0]['image'], heat, word)
fig.tight_layout()

# %% [markdown]
# ## The pointing game
# Every two-object test scene, once per object, phrase "the <colour> <shape>". A hit: the
# heat-map's highest patch belongs to the named object (each patch belongs to the object that
# covers most of it). Chance is the named object's share of the patches; the centre prior
# always points at the middle. (`python -m mmfusion.pointing --workdir ...` does the same
# from the command line.)

# %%
rows = []
for name, run in (('CLIP (default run)', clip), ('ALBEF', albef)):
  result = pointing.play(run, 'test', limit=8 if SMALL else None)
  rows += [(name, method, rate) for method, rate in result['rates'].items()]
display(Markdown(f"{result['trials']} trials per run, {result['grid'][0]}x{result['grid'][1]} "
                 'patches\n\n' + notebook.markdown_table(rows, ('run', 'heat-map', 'hit rate'))))

# %% [markdown]
# ## Speech: which part of the clip?
# The same relevance through the speech tower of the tri-modal run: the similarity of a spoken
# caption with its image, over the spectrogram's (time, frequency) patches, and summed over
# frequency: the moments of the clip that matter.

# %%
speech = open_run('shapes_trimodal.py', 'shapes_trimodal')
spoken = speech.examples('test', n=2)
waves = [w.astype(np.float32) / 32768 for w in spoken['speech']]
relevance = speech.explain('chefer', audio=waves, image=spoken['image'])
tower = speech.model.towers['audio']                 # its front-end options and patch sizes
hop_s = tower.frontend.hop_ms / 1000
patch_s = tower.strides[0] * hop_s                    # one time patch, in seconds
fig, axes = plt.subplots(len(waves), 3, figsize=(12, 2.6 * len(waves)), squeeze=False,
                         gridspec_kw=dict(width_ratios=[1, 4, 4]))
for i, wave in enumerate(waves):
  axes[i, 0].imshow(spoken['image'][i])
  axes[i, 0].axis('off')
  seconds = len(wave) / speech.config.data.audio_sample_rate
  features = np.asarray(frontend.features(wave[None], tower.frontend))[0]
  notebook.spectrogram(axes[i, 1], features, spoken['captions'][i][0], hop_s=hop_s)
  heat = relevance.heatmap[i]                         # [time patches, frequency patches]
  axes[i, 1].imshow(heat.T, origin='lower', aspect='auto', cmap='jet', alpha=0.35,
                    extent=(0, patch_s * heat.shape[0], 0, features.shape[-1]))
  axes[i, 1].set_xlim(0, seconds)
  profile = heat.sum(axis=1)
  axes[i, 2].bar(np.arange(len(profile)) * patch_s, profile, width=patch_s, align='edge')
  axes[i, 2].set(xlim=(0, seconds), xlabel='seconds', title='relevance over time')
fig.tight_layout()
