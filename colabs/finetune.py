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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/mmfusion/mmfusion/blob/main/colabs/finetune.ipynb)
#
# # Fine-tune from a checkpoint, with the towers trained or frozen
#
# A classifier over the dataset's 30 colour-shape classes, its image tower loaded from the
# default CLIP run (`config.init_from`), trained three ways with the same budget:
# every parameter, the image tower frozen (a linear probe: `config.freeze=('image',)`), and
# from scratch. Training runs the real command line in a subprocess; the loss is redrawn
# while it trains.

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
# SMALL: what the tests run (20-step runs on the tiny dataset). Otherwise the README's default
# run (trained here first if RUNS lacks it, ~4 min on 2 CPU cores) and 300 fine-tuning steps
# per variant (about a minute each).
SMALL = os.environ.get('MMFUSION_NOTEBOOK_SMALL', '0') == '1'
RUNS = os.environ.get('MMFUSION_RUNS', '')

# %%
import matplotlib.pyplot as plt
from IPython.display import Markdown, display

import mmfusion
from mmfusion import notebook

RUNS = os.path.abspath(RUNS or os.path.join(notebook.ROOT, 'workdirs'))
suffix = '_smoke' if SMALL else ''
pretrained = notebook.trained('shapes_clip.py:smoke' if SMALL else 'shapes_clip.py',
                              os.path.join(RUNS, f'shapes_clip{suffix}'))

# %% [markdown]
# ## Every parameter trained
# `configs/shapes_finetune_cls.py` loads the image tower (`init_from.load='image'`), puts a
# zero-initialised linear head on its pooled vector and trains everything.

# %%
smoke = ',smoke' if SMALL else ''
variants = {
    'full fine-tune': (f'shapes_finetune_cls.py:init={pretrained}{smoke}', ()),
    'frozen image tower': (f'shapes_finetune_cls.py:init={pretrained}{smoke}',
                           ("--config.freeze=('image',)",)),
    'from scratch': (f'shapes_finetune_cls.py:scratch{smoke}', ()),
}
finals, workdirs = {}, {}
name = 'full fine-tune'
workdirs[name] = os.path.join(RUNS, f'finetune_full{suffix}')
finals[name] = notebook.train(variants[name][0], workdirs[name], *variants[name][1])

# %% [markdown]
# ## The image tower frozen
# Only the classification head learns (`optax.multi_transform` keeps the frozen sub-tree's
# update at zero): what the pretrained features alone are worth. (Full mode only, like the
# run from scratch below: small mode, what the tests run, trains one variant.)

# %%
if not SMALL:
  name = 'frozen image tower'
  workdirs[name] = os.path.join(RUNS, 'finetune_frozen')
  finals[name] = notebook.train(variants[name][0], workdirs[name], *variants[name][1])

# %% [markdown]
# ## From scratch, for reference (full mode only: it is the slowest to learn anything)

# %%
if not SMALL:
  name = 'from scratch'
  workdirs[name] = os.path.join(RUNS, 'finetune_scratch')
  finals[name] = notebook.train(variants[name][0], workdirs[name], *variants[name][1])

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
for name, workdir in workdirs.items():
  rows = [r for r in notebook.read_metrics(workdir) if 'loss' in r]
  ax.plot([r['step'] for r in rows], [r['loss'] for r in rows], label=name)
ax.set(xlabel='step', ylabel='training loss', yscale='log')
ax.legend()
table = [(name, final.get('classification/accuracy', float('nan')),
          final.get('classification_all/accuracy', float('nan')))
         for name, final in finals.items()]
display(Markdown(notebook.markdown_table(
    table, ('start', 'test accuracy, single-object images', 'test accuracy, all images'))))

# %% [markdown]
# ## The fine-tuned classifier on a few test images

# %%
run = mmfusion.load_run(workdirs['full fine-tune'])
test = run.examples('test', n=8, keep_if={'num_objects': 1})
result = run.classify(test['image'])
titles = [f'{p}\n({run.source.class_names()[t]})' if p != run.source.class_names()[t] else p
          for p, t in zip(result.labels, test['label'])]
notebook.image_grid(test['image'], titles, cols=8, size=1.8);
