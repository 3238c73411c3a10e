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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/mmfusion/mmfusion/blob/main/colabs/fusion.ipynb)
#
# # Fusion strategies side by side: train, ask, and look at what they attend to
#
# A fused model answers a question about an image by mixing the two towers' outputs in a
# fusion module. mmfusion has six (`mmfusion/models/fusion.py`, one `Fusion` module, the
# strategy set by `config.model.fusion.strategy`):
#
# | strategy | after | how image and question meet |
# |---|---|---|
# | `cross_attention` | ALBEF | the question stream (with a cls token) cross-attends to the image tokens in every layer |
# | `co_attention` | ViLBERT | two streams, each cross-attending to the other in every layer |
# | `early` | ViLT | one stream over `[cls; image tokens; question tokens]` + modality-type embeddings |
# | `bottleneck` | MBT | a stream per modality; they exchange information only through a few shared latent tokens |
# | `weighted_sum` | | the two pooled vectors, mixed by learned softmax weights |
# | `late` | | no fused features: a classifier per modality, their logits mixed by learned weights |
#
# This notebook fine-tunes each strategy for VQA from the *same* pretrained ALBEF towers with
# its fusion module at init (the README's "Fusion strategies compared" protocol), compares
# their accuracy per question type, asks them the same questions, and plots what each one looks
# at when it answers.

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
# SMALL: what the tests run (20-step runs on the tiny dataset: ALBEF towers, then the
# cross_attention strategy, a few examples). Otherwise the README's ALBEF
# run (about 15 minutes on 2 CPU cores) and all six strategies, 200 steps each (a few minutes
# each), trained here first where RUNS has none.
SMALL = os.environ.get('MMFUSION_NOTEBOOK_SMALL', '0') == '1'
RUNS = os.environ.get('MMFUSION_RUNS', '')

# %% [markdown]
# ## 1. The towers, and one VQA run per strategy
# The towers come from ALBEF pretraining (`configs/shapes_albef.py`: contrastive + image-text
# matching + masked language modelling). Every strategy then fine-tunes them on VQA with
# `configs/shapes_vqa.py:strategy=S,fusion=fresh`: same towers, same data, same seed, same
# steps; `fusion=fresh` starts even `cross_attention` (which ALBEF itself pretrained) at init,
# so that no strategy starts ahead. The answer is classification over the train split's answer
# vocabulary (colours, shapes, sizes, counts, yes / no).

# %%
import json

import IPython.display as ipd
import jax
import matplotlib.pyplot as plt
import numpy as np

import mmfusion
from mmfusion import notebook
from mmfusion.models import fusion as fusion_lib
from mmfusion.models import model as model_lib

RUNS = os.path.abspath(RUNS or os.path.join(notebook.ROOT, 'workdirs'))
albef_workdir = os.path.join(RUNS, 'shapes_albef_smoke' if SMALL else 'shapes_albef')
notebook.open_run('shapes_albef.py:smoke' if SMALL else 'shapes_albef.py', albef_workdir)

# %% [markdown]
# Each strategy's run is trained once (the real CLI in a subprocess, a live loss plot) and
# reused afterwards. In full mode the six runs take 200 steps of 256 questions each; the
# README's table (and `configs/fusion/<strategy>.py`) uses 600, so expect lower numbers
# here, in about the same order. Small mode trains one strategy for 20 steps on the tiny
# dataset: it shows the mechanics, and its accuracy is noise around the blind baseline.

# %%
STRATEGIES = ('cross_attention',) if SMALL else fusion_lib.STRATEGIES
workdirs, metrics = {}, {}
for s in STRATEGIES:
  steps = 'smoke' if SMALL else 'steps=200'
  workdirs[s] = notebook.trained(
      f'shapes_vqa.py:strategy={s},fusion=fresh,{steps},init={albef_workdir}',
      os.path.join(RUNS, f'fusion_smoke_{s}' if SMALL else f'fusion_200_{s}'))
  with open(os.path.join(workdirs[s], 'final_metrics.json')) as f:
    metrics[s] = json.load(f)

runs = {s: mmfusion.load_run(w) for s, w in workdirs.items()}

# %% [markdown]
# Accuracy on the test questions, overall and by question type (`vqa/accuracy_q<i>`: the
# dataset asks the same five kinds of question of every image, in this order), and the size of
# what each strategy adds on top of the towers: the fusion module and the VQA head.

# %%
# The five questions of every scene, in order (mmfusion/data/shapes.py, _questions).
QUESTION_TYPES = ('colour', 'shape', 'count', 'yes / no', 'size')


def num_params(tree) -> int:
  return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


rows = []
for s, run in runs.items():
  m = metrics[s]
  get = lambda key: m.get(f'vqa/{key}', '—')
  added = num_params(run.params['fusion']) + num_params(run.params['vqa'])
  rows.append([f'`{s}`', get('accuracy'), *(get(f'accuracy_q{i}') for i in range(5)),
               get('majority_baseline'), f'{added / 1000:.0f} k', m.get('step', '—')])
ipd.display(ipd.Markdown(notebook.markdown_table(
    rows, ['strategy', 'accuracy', *QUESTION_TYPES, 'blind baseline', 'fusion + head params',
           'steps'])))

# %% [markdown]
# The blind baseline answers each question type with its most frequent test answer, never
# looking at the image: the bar every strategy has to clear. In the README's 600-step runs the
# token strategies that let the question *select* image tokens (`cross_attention`,
# `co_attention`) lead, and only `co_attention` gets the yes / no questions (which need a
# named object found in the image) off chance. The pooled-vector strategies (`weighted_sum`,
# `late`) add about 20 k parameters instead of 240-620 k and train in half the time, but each
# tower's single pooled vector has to carry everything the answer needs.
#
# ## 2. The same questions, every strategy
# A few test scenes, a few of their questions, and each strategy's answer
# (`run.answer(images, questions)`: the run's own preprocessing and its VQA head; ✓ = right).

# %%
first = next(iter(runs.values()))
num_images = 3 if SMALL else 4
test = first.examples('test', n=num_images)
# Which of each scene's five questions to ask (indices into QUESTION_TYPES).
picks = [(0, 1, 3), (2, 3, 4), (0, 3, 4), (1, 2, 3)][:num_images]
images, questions, truths, labels = [], [], [], []
for k, chosen in enumerate(picks):
  for i in chosen:
    images.append(test['image'][k])
    questions.append(test['questions'][k][i])
    truths.append(test['answers'][k][i])
    labels.append(f'scene {k}')
answers = {s: run.answer(np.stack(images), questions) for s, run in runs.items()}

notebook.image_grid(test['image'], [f'scene {k}' for k in range(num_images)],
                    cols=num_images, size=1.8);

# %%
rows = [[label, q, t, *(a[j] + (' ✓' if a[j] == t else '') for a in answers.values())]
        for j, (label, q, t) in enumerate(zip(labels, questions, truths))]
rows.append(['', '**right**', '', *(f'{sum(x == t for x, t in zip(a, truths))} / {len(truths)}'
                                    for a in answers.values())])
ipd.display(ipd.Markdown(notebook.markdown_table(
    rows, ['scene', 'question', 'answer', *(f'`{s}`' for s in runs)])))

# %% [markdown]
# ## 3. What each strategy looks at
# The attention weights of the fusion modules, for one scene and one question. Building the
# run's model with `sow_attention=True` (`mmfusion.models.model.build`) gives the same model
# (same params) that also records every attention's weights `[batch, heads, queries, keys]`
# into the `intermediates` collection; it runs the explicit attention implementation, since
# the fused kernels never materialise the weights. We apply only the towers and the fusion
# module (`MultimodalModel.encode`, then `.fuse`), with `mutable=['intermediates']`.

# %%
scene = first.examples('test', n=1, keep_if={'num_objects': 2})
image, question = scene['image'][0], scene['questions'][0][0]   # 'what colour is the <shape>'
CONTEXT, QUESTION = (first.config.model.heads.vqa[k] for k in ('context', 'question'))


def fuse_and_record(run, image, question):
  """The fusion module's outputs for one (image, question) pair, and everything the model
  recorded on the way (its 'intermediates' collection, as numpy)."""
  model = model_lib.build(run.config.model, run.vocab_size, sow_attention=True)
  batch = {**run.inputs(CONTEXT, [image]), **run.inputs(QUESTION, [question])}

  def fuse(module, batch):
    return module.fuse({m: module.encode(m, batch[m], batch.get(f'{m}_mask'))
                        for m in (CONTEXT, QUESTION)})

  fused, state = model.apply({'params': run.params}, batch, method=fuse,
                             mutable=['intermediates'])
  return fused, jax.tree.map(np.asarray, state['intermediates'])


fused, recorded = fuse_and_record(runs[STRATEGIES[0]], image, question)
print(f'{STRATEGIES[0]}: recorded', jax.tree.map(np.shape, recorded['fusion']))
print('towers record their own self-attention too:', sorted(recorded))

# %% [markdown]
# Each value is a tuple (`sow` appends one entry per call), `[1, heads, queries, keys]`. Which
# rows and columns to read follows from the fused sequence layouts (the `Fusion` docstring);
# modalities always come in sorted name order, so `image` before `text`:
#
# * `cross_attention`: `layer_<i>/cross_attn` — queries `[cls; question tokens]`, keys the
#   image tokens. We read the **cls row**: the token whose output the VQA head classifies.
# * `co_attention`: `<question>_layer_<i>/cross_attn` — the question stream
#   `[cls_q; question tokens]` attending to the image stream `[cls_i; image tokens]`; the cls
#   row, without the image's own cls key.
# * `early`: `layer_<i>/self_attn` over `[cls; image tokens; question tokens]`; the cls row,
#   over the image part. Its title says which share of the cls token's attention goes to the
#   image at all (the rest goes to the question and to itself).
# * `bottleneck`: `<image>_layer_<i>/self_attn` over `[cls_i; image tokens; bottleneck tokens]`;
#   the rows of the bottleneck tokens (averaged), over the image tokens: what the image stream
#   writes into the bottleneck, the only thing the question stream ever sees of the image.
# * `weighted_sum`: `modality_weights` `[1, modalities]`, the softmax weights of the pooled
#   vectors (no attention).
# * `late`: no fusion module to record; the VQA head's learned mix of the per-modality logits,
#   softmax of `params['vqa']['classifier']['combine_logits']`, if it has one.
#
# Every map is the mean over heads, folded to the image's patch grid (`image_size / patch_size`
# a side: 32 / 8 = 4 x 4) and stretched over the image with `notebook.overlay` (each map scaled
# to its own maximum; its title gives the peak and the mean weight per patch, so a flat map
# reads as flat). One column per fusion layer.

# %%
def patch_grid(run) -> int:
  return run.config.data.image_size // run.config.model.towers[CONTEXT].patch_size


def looks_at(run, fused, recorded):
  """('maps', [(title, [side, side])] per layer) | ('bars', names, weights) | ('text', str)."""
  strategy, side = run.config.model.fusion.strategy, patch_grid(run)
  fusion_rec = recorded.get('fusion', {})
  layers = run.model.fusion.stack.depth
  fold = lambda w_k: w_k.reshape(side, side)
  maps = []
  for i in range(layers):
    if strategy == 'cross_attention':
      block = fusion_rec[f'layer_{i}']
      if 'cross_attn' not in block:     # a layer before start_layer: self-attention only
        continue
      w_qk = block['cross_attn']['attention_weights'][0][0].mean(0)
      maps.append((f'layer {i}: cls → image', fold(w_qk[0])))
    elif strategy == 'co_attention':
      w_qk = fusion_rec[f'{QUESTION}_layer_{i}']['cross_attn']['attention_weights'][0][0].mean(0)
      maps.append((f'layer {i}: {QUESTION} cls → image\n(image cls: {w_qk[0, 0]:.0%})',
                   fold(w_qk[0, 1:])))
    elif strategy == 'early':
      w_qk = fusion_rec[f'layer_{i}']['self_attn']['attention_weights'][0][0].mean(0)
      names = sorted(fused['tokens_by_modality'])
      start = 1 + sum(fused['tokens_by_modality'][m].shape[1]
                      for m in names[:names.index(CONTEXT)])
      part = w_qk[0, start:start + side * side]
      maps.append((f'layer {i}: cls → image\n({part.sum():.0%} on the image)', fold(part)))
    elif strategy == 'bottleneck':
      w_qk = fusion_rec[f'{CONTEXT}_layer_{i}']['self_attn']['attention_weights'][0][0].mean(0)
      n = 1 + side * side                 # cls_i and the image tokens; the bottleneck follows
      if w_qk.shape[0] == n:              # a layer before start_layer: no bottleneck yet
        continue
      maps.append((f'layer {i}: bottleneck → image', fold(w_qk[n:, 1:n].mean(0))))
  if maps:
    return 'maps', maps
  if strategy == 'weighted_sum':
    return 'bars', sorted(fused['pooled_by_modality']), fusion_rec['modality_weights'][0][0]
  if strategy == 'late':
    combine = run.params['vqa']['classifier'].get('combine_logits')
    if combine is not None:
      return 'bars', sorted(fused['pooled_by_modality']), np.asarray(jax.nn.softmax(combine))
    return 'text', 'late fusion (combine=mean):\nno attention, no learned mix'
  return 'text', f'{strategy}: nothing recorded'


views = {}
for s, run in runs.items():
  fused, recorded = fuse_and_record(run, image, question)
  views[s] = looks_at(run, fused, recorded), run.answer([image], [question])[0]

cols = 1 + max(len(v[1]) if v[0] == 'maps' else 1 for v, _ in views.values())
fig, axes = plt.subplots(len(views), cols, figsize=(2.4 * cols, 2.8 * len(views)),
                         squeeze=False)
for row, (s, (view, answer)) in zip(axes, views.items()):
  for ax in row:
    ax.axis('off')
  row[0].imshow(image)
  row[0].set_title(f'{s}\nanswers: {answer}', fontsize=8)
  if view[0] == 'maps':
    for ax, (title, heat) in zip(row[1:], view[1]):
      notebook.overlay(ax, image, heat, f'{title}\npeak {heat.max():.2f}, mean {heat.mean():.2f}')
  elif view[0] == 'bars':
    ax = row[1]
    ax.axis('on')
    bars = ax.bar(view[1], view[2], color=['tab:orange', 'tab:blue'][:len(view[1])])
    ax.bar_label(bars, fmt='%.2f', fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title('learned modality weights' if s == 'weighted_sum' else 'logit mix', fontsize=8)
  else:
    row[1].text(0, 0.5, view[1], fontsize=8, va='center')
fig.suptitle(f'"{question}" (answer: {scene["answers"][0][0]})', fontsize=9)
fig.tight_layout();

# %% [markdown]
# Reading the maps: a strategy that answers "what colour is the <shape>" by finding the shape
# should put its weight on that shape's patches (the scene has two shapes). A 20-step small-mode
# run has barely moved from init, so its maps are close to uniform; the full-mode runs show the
# question selecting image tokens in `cross_attention` and `co_attention`. Attention weights say
# where a token reads from, not what the answer rests on: `explain.ipynb` computes gradient-based
# relevance (`run.explain`) for that.
#
# Next: `explain.ipynb` (heat-maps), `speech.ipynb` (spoken questions), `finetune.ipynb`.
