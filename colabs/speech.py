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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/mmfusion/mmfusion/blob/main/colabs/speech.ipynb)
#
# # Speech in mmfusion: listen, look at the features, retrieve, explain, answer
#
# Speech is mmfusion's third built-in modality. The spoken shapes (`mmfusion_shapes/spoken`)
# give every rendered scene one spoken caption (its full description) and one spoken
# question, said by eSpeak NG voices: 24 speakers, and the 3 test voices are never heard in
# training. A waveform enters the model as int16 PCM at 16 kHz; the audio tower computes
# log-mel (or MFCC) features *on device*, cuts them into (time, frequency) patches and runs a
# transformer over them (AST-style, `mmfusion/models/audio.py`).
#
# This notebook uses two runs:
# * the **tri-modal** run (`configs/shapes_trimodal.py`): a ViT, a text transformer and the
#   speech tower trained with the contrastive loss on image-text, image-speech and
#   text-speech pairs, so all three share one embedding space (ImageBind-style);
# * the **spoken-VQA** run (`configs/shapes_spoken_vqa.py`): the tri-modal run's image and
#   speech towers fine-tuned with a cross-attention fusion module and a VQA head, answering a
#   spoken question about the image.

# %%
# On Colab: fetch mmfusion and install it with the notebook and speech extras (nothing happens
# elsewhere). The speech extra brings eSpeak NG, which renders the spoken dataset.
import os
import subprocess
import sys

if 'google.colab' in sys.modules and not os.path.isdir('/content/mmfusion'):
  subprocess.run('git clone -q --depth 1 https://github.com/mmfusion/mmfusion /content/mmfusion'
                 ' && pip install -q -e "/content/mmfusion[explore,speech]"', shell=True,
                 check=True)
  sys.path.insert(0, '/content/mmfusion')

# %% tags=["parameters"]
# SMALL: what the tests run (two 20-step runs on the tiny spoken dataset, a few examples).
# Otherwise the README's tri-modal run (about 15 minutes on 2 CPU cores) and a 300-step spoken
# VQA run from it, trained here first if RUNS has none.
SMALL = os.environ.get('MMFUSION_NOTEBOOK_SMALL', '0') == '1'
RUNS = os.environ.get('MMFUSION_RUNS', '')

# %% [markdown]
# ## 1. The runs
# Each run is trained once (the real CLI, in a subprocess, with a live loss plot) and then
# loaded from its workdir. The first run also renders the spoken dataset with eSpeak (about
# 2 minutes and 1.2 GB for the full one; seconds for the tiny one) and caches it.
#
# The spoken-VQA run starts from the tri-modal checkpoint (`init=`): its image and speech
# towers are the tri-modal ones, the fusion module and the VQA head start from scratch. Here
# it trains for 300 steps; the README's figure (accuracy 0.757 on the 1000 spoken test
# questions) comes from the config's default of 900 steps (0.746 at step 300).

# %%
import IPython.display as ipd
import matplotlib.pyplot as plt
import numpy as np

from mmfusion import notebook

RUNS = os.path.abspath(RUNS or os.path.join(notebook.ROOT, 'workdirs'))
trimodal_workdir = os.path.join(RUNS, 'shapes_trimodal_smoke' if SMALL else 'shapes_trimodal')
run = notebook.open_run('shapes_trimodal.py:smoke' if SMALL else 'shapes_trimodal.py',
                        trimodal_workdir)
run

# %%
vqa_workdir = os.path.join(RUNS, 'shapes_spoken_vqa_smoke' if SMALL else 'shapes_spoken_vqa')
run_vqa = notebook.open_run(f'shapes_spoken_vqa.py:smoke,init={trimodal_workdir}' if SMALL else
                            f'shapes_spoken_vqa.py:steps=300,init={trimodal_workdir}', vqa_workdir)
run_vqa

# %% [markdown]
# ## 2. Listen to the data
# `run.examples('test', n)` reads the first test examples as plain values: images as uint8
# arrays, texts as strings, audio as a list of int16 waveforms (one per example, each its own
# length). `speech` says caption 0 of the scene (its full description); `spoken_question`
# says the question at `spoken_question_index` of the scene's `questions`. The speakers are
# the test split's, never heard in training.

# %%
N = 16 if SMALL else 1000          # test examples read (retrieval below ranks all of them)
test = run.examples('test', n=N)
rate = run.config.data.audio_sample_rate       # 16 kHz
speaker_names = run.source.features['speaker'].names
print(f'{len(test["speech"])} test examples; features: {sorted(test)}')

for i in range(3):
  q = int(test['spoken_question_index'][i])
  fig, ax = plt.subplots(figsize=(1.8, 1.8))
  ax.imshow(test['image'][i])
  ax.axis('off')
  ax.set_title(f'test #{i}', fontsize=8)
  ipd.display(fig)
  plt.close(fig)
  speech, question = test['speech'][i], test['spoken_question'][i]
  print(f'speaker {speaker_names[test["speaker"][i]]}')
  print(f'caption  ({len(speech) / rate:.2f} s): {test["captions"][i][0]}')
  ipd.display(ipd.Audio(speech, rate=rate))
  print(f'question ({len(question) / rate:.2f} s): {test["questions"][i][q]}  '
        f'(answer: {test["answers"][i][q]})')
  ipd.display(ipd.Audio(question, rate=rate))

# %% [markdown]
# ## 3. What the speech tower sees: log-mel spectrograms and MFCCs
# `mmfusion.models.frontend` is the tower's front-end as plain functions: framing (25 ms
# frames every 10 ms), a periodic Hann window, `rfft`, a mel filterbank and a log give the
# log-mel spectrogram; a DCT of it gives MFCCs (equal to `tf.signal`'s, which the tests check).
# The options come from the run's audio tower config exactly as `models/audio.py` builds
# them (every `FrontendOptions` field by its name, defaults where the config is silent), so
# these are the run's own features. In the model each feature is then normalised per
# utterance (zero mean, unit variance over the real frames) — shown in the middle — and the
# tower cuts it into patches of `patch_time` frames x `patch_freq` bins.

# %%
from mmfusion.models import audio as audio_lib
from mmfusion.models import frontend

tower_config = dict(run.config.model.towers.audio)
opts = frontend.FrontendOptions(**{k: tower_config.get(k, default)
                                   for k, default in audio_lib.FRONTEND_OPTIONS.items()})
assert opts == run.model.towers['audio'].frontend     # what the built tower holds
print(opts)
print(f"features: {tower_config['features']}; patches of {tower_config['patch_time']} frames "
      f"({tower_config['patch_time'] * opts.hop_ms:.0f} ms) x {tower_config['patch_freq']} bins")

hop_s = opts.hop_ms / 1000
for i in range(2):
  wave = test['speech'][i].astype(np.float32)[None] / 32768.0      # [1, samples] in [-1, 1]
  log_mel = frontend.log_mel(wave, opts)                            # [1, frames, mel bins]
  mfccs = frontend.mfcc(log_mel, opts.num_mfcc)                     # [1, frames, num_mfcc]
  normalised = frontend.normalize(log_mel, np.ones(log_mel.shape[:2], bool))
  fig, axes = plt.subplots(1, 3, figsize=(14, 2.6))
  notebook.spectrogram(axes[0], np.asarray(log_mel[0]), f'log-mel: {test["captions"][i][0]}',
                       hop_s=hop_s)
  notebook.spectrogram(axes[1], np.asarray(normalised[0]), 'log-mel, normalised per utterance',
                       hop_s=hop_s)
  notebook.spectrogram(axes[2], np.asarray(mfccs[0]), f'{opts.num_mfcc} MFCCs', hop_s=hop_s,
                       ylabel='coefficient')
  for ax in axes:
    ax.title.set_fontsize(8)
  fig.tight_layout()
  ipd.display(fig)
  plt.close(fig)

# %% [markdown]
# ## 4. Speech -> image retrieval
# The spoken captions of the test examples are the queries, the test images the gallery:
# `run.retrieve(..., query_modality='audio', gallery_modality='image')` embeds both with the
# run's evaluation preprocessing (waveforms zero-padded to `audio_max_seconds`, with a mask)
# and ranks the gallery by cosine similarity. Query *i*'s own image is gallery item *i*, so
# R@1 is the fraction of queries whose first hit is their own scene. (Identical descriptions
# of different scenes tie, so even a perfect model stays below 1; the README reports
# speech->image R@1 0.567 on the 1000 test scenes for the full run.)

# %%
images = test['image']
found = run.retrieve(test['speech'], images, k=5, query_modality='audio',
                     gallery_modality='image')
own = np.arange(len(images))
r1 = float(np.mean(found.indices[:, 0] == own))
r5 = float(np.mean((found.indices == own[:, None]).any(axis=1)))
print(f'speech->image over {len(images)} test scenes: R@1 {r1:.3f}, R@5 {r5:.3f} '
      f'(chance R@1 {1 / len(images):.3f})')

grid, titles = [], []
for i in range(4):
  for rank, (j, s) in enumerate(zip(found.indices[i], found.scores[i])):
    grid.append(images[j])
    mark = ' (own)' if j == i else ''
    titles.append(f'"{test["captions"][i][0]}"\n{s:.2f}{mark}' if rank == 0 else f'{s:.2f}{mark}')
notebook.image_grid(grid, titles, cols=5, size=1.9);

# %% [markdown]
# ### Any sentence, spoken
# Strings given where audio is expected are spoken by the test voices (in turn) before they
# are embedded, so `run.embed(audio=[...])` takes any sentence. Since the three modalities
# share one space, the spoken phrase lands next to its written form (the diagonal below) and
# next to the images that show it.

# %%
phrases = ['a red circle', 'a blue square on the left', 'a small green triangle',
           'a large yellow diamond']
z_spoken = run.embed(audio=phrases)
z_written = run.embed(text=phrases)
z_images = run.embed(image=images)
print('cosine similarity, spoken (rows) vs written (columns):')
print(np.round(z_spoken @ z_written.T, 2))

top = np.argsort(-(z_spoken @ z_images.T), axis=1)[:, :5]
grid, titles = [], []
for phrase, row in zip(phrases, top):
  for rank, j in enumerate(row):
    grid.append(images[j])
    titles.append(f'spoken: "{phrase}"' if rank == 0 else '')
notebook.image_grid(grid, titles, cols=5, size=1.9);

# %% [markdown]
# ## 5. Which parts of the utterance matter: a heat-map over the spectrogram
# `run.explain('chefer', audio=waves, image=images)` explains the cosine similarity between
# each spoken caption and its image with Chefer et al.'s gradient-weighted relevance,
# propagated through the speech tower's attention layers. The heat-map is over the tower's
# patches, `[B, time patches, frequency patches]`, stretched to [0, 1] over the clip's real
# patches (padding after the end of the clip gets 0); the tri-modal tower's patches span all
# mel bins, so there is one frequency patch and the map is a function of time. It is drawn
# over the log-mel spectrogram, with its time profile in white. On a trained run the
# relevance rises on the words that tell scenes apart (colours, shapes).

# %%
n_explain = 4
captions = [c[0] for c in test['captions'][:n_explain]]
explanation = run.explain('chefer', audio=test['speech'][:n_explain], image=images[:n_explain])
assert explanation.modality == 'audio', explanation.modality
heat = explanation.heatmap                      # [B, time patches, frequency patches]
stride_time, _ = run.model.towers['audio'].strides
print(f'{explanation.method} / {explanation.target} over {explanation.modality}: heat-map '
      f'{heat.shape}')

for i in range(n_explain):
  wave = test['speech'][i].astype(np.float32)[None] / 32768.0
  log_mel = np.asarray(frontend.log_mel(wave, opts)[0])
  seconds = len(test['speech'][i]) / rate
  num_time = heat.shape[1]
  span = num_time * stride_time * hop_s        # seconds the patches cover (clip + padding)
  fig, axes = plt.subplots(1, 2, figsize=(12, 2.4), gridspec_kw=dict(width_ratios=[1, 5]))
  axes[0].imshow(images[i])
  axes[0].axis('off')
  notebook.spectrogram(axes[1], log_mel, f'"{captions[i]}"', hop_s=hop_s)
  axes[1].imshow(heat[i].T, origin='lower', aspect='auto', cmap='jet', alpha=0.35,
                 interpolation='nearest', extent=(0, span, 0, opts.num_mel_bins), vmin=0, vmax=1)
  profile = heat[i].sum(axis=-1)
  twin = axes[1].twinx()
  twin.step(np.arange(num_time + 1) * stride_time * hop_s, np.append(profile, profile[-1]),
            where='post', color='white', linewidth=1.5)
  twin.set(ylim=(0, max(float(profile.max()), 1e-6) * 1.05), ylabel='relevance')
  axes[1].set_xlim(0, seconds)
  axes[1].title.set_fontsize(9)
  fig.tight_layout()
  ipd.display(fig)
  plt.close(fig)

# %% [markdown]
# ## 6. Spoken VQA
# `run_vqa.answer(images, questions)` fuses each image with a question and classifies over
# the training split's answer vocabulary. The questions here are the dataset's spoken ones
# (waveforms, said by the test voices); the true answer is `answers[spoken_question_index]`.

# %%
vqa_test = run_vqa.examples('test', n=N)
index = vqa_test['spoken_question_index']
question_text = [qs[q] for qs, q in zip(vqa_test['questions'], index)]
truth = [a[q] for a, q in zip(vqa_test['answers'], index)]
predicted = run_vqa.answer(vqa_test['image'], vqa_test['spoken_question'])
correct = np.array([p == t for p, t in zip(predicted, truth)])
print(f'accuracy on {len(correct)} spoken test questions: {correct.mean():.3f}')
shown = 12
ipd.display(ipd.Markdown(notebook.markdown_table(
    [(i, question_text[i], predicted[i], truth[i], '✓' if correct[i] else '✗')
     for i in range(shown)], ('#', 'question (spoken)', 'predicted', 'true', ''))))
notebook.image_grid(vqa_test['image'][:shown], [f'#{i}' for i in range(shown)], cols=12,
                    size=1.2);

# %% [markdown]
# Plain strings work as questions too: they are spoken by the test voices first. Here the
# same written questions, re-spoken (a different utterance of the same words), and a few
# questions of our own about the first image.

# %%
respoken = run_vqa.answer(vqa_test['image'][:shown], question_text[:shown])
agree = np.mean([a == b for a, b in zip(respoken, predicted[:shown])])
right = np.mean([a == t for a, t in zip(respoken, truth[:shown])])
print(f're-spoken questions: accuracy {right:.3f} on {shown}; same answer as for the '
      f'dataset\'s audio on {agree:.3f}')

first = vqa_test['objects'][0][0]        # the first image's first object: {'shape': ..., ...}
own_questions = [f'what colour is the {first["shape"]}',
                 f'what size is the {first["colour"]} {first["shape"]}',
                 'how many shapes are there', 'is there a purple cross']
answers = run_vqa.answer([vqa_test['image'][0]] * len(own_questions), own_questions)
print(f'image #0: {vqa_test["captions"][0][0]}')
for q, a in zip(own_questions, answers):
  print(f'  {q:30s} -> {a}')

# %% [markdown]
# Next: `fusion.ipynb` (every fusion strategy, missing modalities), `explain.ipynb` (image
# heat-maps), `finetune.ipynb`.
