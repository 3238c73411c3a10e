"""What the notebooks in colabs/ share: training a run from a notebook (the real CLI in a
subprocess) with a live loss plot, image grids, heat-map overlays and spectrogram plots; and
running notebooks headless: `python -m mmfusion.notebook colabs/explain.ipynb [--small]`.

Needs matplotlib (the `explore` extra; running headless: nbclient and ipykernel, the test
extra). Nothing here is used by training or evaluation.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_metrics(workdir: str) -> list[dict[str, float]]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except ValueError:      # a line being written
        break
  return rows


def trained(config: str, workdir: str, *overrides: str, **train_kwargs: Any) -> str:
  """`workdir`, after training `config` into it with `train` unless a run there has already
  finished (wrote final_metrics.json); a run stopped before its end is resumed."""
  if not os.path.exists(os.path.join(workdir, 'final_metrics.json')):
    train(config, workdir, *overrides, **train_kwargs)
  return workdir


def open_run(config: str, workdir: str, *overrides: str, **train_kwargs: Any):
  """`mmfusion.load_run` of `trained(config, workdir, ...)`: the notebooks' first cell."""
  import mmfusion
  return mmfusion.load_run(trained(config, workdir, *overrides, **train_kwargs))


def train(config: str, workdir: str, *overrides: str, live_plot: bool = True,
          metric: str = 'loss', refresh_s: float = 2.0) -> dict[str, float]:
  """Runs `python -m mmfusion.main --config configs/<config> --workdir <workdir> <overrides>`
  (resuming if the workdir has a checkpoint) and returns its final metrics. With live_plot,
  the training `metric` is redrawn from the run's metrics.jsonl while it trains."""
  config_path = config if os.path.isabs(config) else os.path.join(ROOT, 'configs', config)
  cmd = [sys.executable, '-m', 'mmfusion.main', f'--config={config_path}',
         f'--workdir={workdir}', *overrides]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PYTHONUNBUFFERED='1')
  log_path = os.path.join(os.path.abspath(workdir) + '.log')
  os.makedirs(os.path.dirname(log_path) or '.', exist_ok=True)
  start = time.time()
  with open(log_path, 'w') as log:
    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    while process.poll() is None:
      time.sleep(refresh_s)
      if live_plot:
        _draw_live(read_metrics(workdir), metric, f'{config} — {time.time() - start:.0f} s')
  with open(log_path) as f:
    output = f.read()
  if process.returncode:
    tail = '\n'.join(l for l in output.splitlines() if '\r' not in l)[-3000:]
    raise RuntimeError(f'training failed (exit {process.returncode}); log {log_path}:\n{tail}')
  if live_plot:
    _draw_live(read_metrics(workdir), metric, f'{config} — done in {time.time() - start:.0f} s')
  final = os.path.join(workdir, 'final_metrics.json')
  return json.load(open(final)) if os.path.exists(final) else {}


def _draw_live(rows: list[dict[str, float]], metric: str, title: str) -> None:
  import matplotlib.pyplot as plt
  from IPython import display
  points = [(r['step'], r[metric]) for r in rows if metric in r and 'step' in r]
  display.clear_output(wait=True)
  fig, ax = plt.subplots(figsize=(5, 3))
  if points:
    ax.plot(*zip(*points))
  ax.set(xlabel='step', ylabel=metric, title=title)
  display.display(fig)
  plt.close(fig)


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str] | None = None, *,
               cols: int = 8, size: float = 1.6, path: str | None = None):
  """A grid of images (uint8 or [0, 1] floats) with optional titles; saved to `path` if given."""
  import matplotlib.pyplot as plt
  rows = max(1, -(-len(images) // cols))
  fig, axes = plt.subplots(rows, cols, figsize=(cols * size, rows * size * 1.15), squeeze=False)
  for i, ax in enumerate(axes.flat):
    ax.axis('off')
    if i < len(images):
      ax.imshow(images[i])
      if titles is not None:
        ax.set_title(titles[i], fontsize=7)
  fig.tight_layout()
  if path:
    fig.savefig(path, dpi=110, bbox_inches='tight')
  return fig


def overlay(ax, image: np.ndarray, heatmap: np.ndarray, title: str = '', alpha: float = 0.5):
  """The image with a heat-map [rows, cols] stretched over it (nearest patches, no smoothing:
  what the model resolves)."""
  h, w = image.shape[:2]
  ax.imshow(image)
  ax.imshow(heatmap, cmap='jet', alpha=alpha, extent=(0, w, h, 0), interpolation='nearest',
            vmin=0, vmax=max(float(heatmap.max()), 1e-6))
  ax.set_title(title, fontsize=8)
  ax.axis('off')


def spectrogram(ax, features: np.ndarray, title: str = '', *, hop_s: float = 0.01,
                ylabel: str = 'mel bin') -> None:
  """Features [frames, bins] (log-mel or MFCC) as an image, time along x in seconds."""
  frames, bins = features.shape
  ax.imshow(features.T, origin='lower', aspect='auto', cmap='magma',
            extent=(0, frames * hop_s, 0, bins))
  ax.set(xlabel='seconds', ylabel=ylabel, title=title)


def markdown_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for row in rows:
    lines.append('| ' + ' | '.join(f'{v:.3f}' if isinstance(v, float) else str(v)
                                   for v in row) + ' |')
  return '\n'.join(lines)


def execute(path: str, out: str | None = None, *, small: bool = False,
            timeout_s: int = 3600) -> float:
  """Runs a notebook (.ipynb) headless to the end in a fresh kernel, from its own folder;
  writes the executed copy to `out` if given. Returns the wall time in seconds. Needs
  nbclient and ipykernel (the test extra)."""
  import nbclient
  import nbformat
  notebook = nbformat.read(path, as_version=4)
  if small:
    os.environ['MMFUSION_NOTEBOOK_SMALL'] = '1'
  start = time.time()
  client = nbclient.NotebookClient(
      notebook, timeout=timeout_s, kernel_name='python3',
      resources={'metadata': {'path': os.path.dirname(os.path.abspath(path))}})
  try:
    client.execute()
  finally:
    if out:
      nbformat.write(notebook, out)
  return time.time() - start


def main(argv: Sequence[str] | None = None) -> int:
  import argparse
  parser = argparse.ArgumentParser(
      prog='python -m mmfusion.notebook',
      description='Run notebooks of colabs/ headless (full mode unless --small).')
  parser.add_argument('notebooks', nargs='+', help='e.g. colabs/quickstart.ipynb')
  parser.add_argument('--small', action='store_true', help='small mode, as the tests run them')
  parser.add_argument('--out', default='', help='a folder for the executed copies')
  args = parser.parse_args(argv)
  import nbclient.exceptions
  for path in args.notebooks:
    out = os.path.join(args.out, os.path.basename(path)) if args.out else None
    if out:
      os.makedirs(args.out, exist_ok=True)
    try:
      seconds = execute(path, out, small=args.small)
    except (nbclient.exceptions.CellExecutionError, FileNotFoundError) as e:
      print(f'{path}: failed: {str(e).strip().splitlines()[-1]}', file=sys.stderr)
      return 1
    print(f'{path}: ran to the end in {seconds:.0f} s' + (f' -> {out}' if out else ''),
          flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
