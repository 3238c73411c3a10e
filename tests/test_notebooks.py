"""The notebooks in colabs/: each .ipynb is the jupytext pairing of its .py (outputs stripped),
opens with an 'Open in Colab' badge and a Colab install cell, and runs headless to the end in
small mode (a parameters cell reads MMFUSION_NOTEBOOK_SMALL), training the small runs it needs
into one directory that the notebooks of this module share."""
import glob
import os

import pytest
import shared_runs
from cli_runs import ROOT

jupytext = pytest.importorskip('jupytext', reason='the test extra (jupytext) is not installed')
nbclient = pytest.importorskip('nbclient', reason='the test extra (nbclient) is not installed')
import nbformat

COLABS = os.path.join(ROOT, 'colabs')
NOTEBOOKS = ('quickstart', 'explain', 'finetune', 'speech', 'fusion')


def _sources(notebook):
  return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_ipynb_is_the_pairing_of_its_percent_file_without_outputs(name):
  paired = jupytext.read(os.path.join(COLABS, f'{name}.py'))
  stored = nbformat.read(os.path.join(COLABS, f'{name}.ipynb'), as_version=4)
  assert _sources(stored) == _sources(paired), (
      f'colabs/{name}.ipynb is out of date: run `jupytext --sync colabs/{name}.py`')
  for cell in stored.cells:
    if cell.cell_type == 'code':
      assert not cell.outputs and cell.execution_count is None, f'{name}: outputs in git'
  first = stored.cells[0]
  assert first.cell_type == 'markdown' and 'colab-badge.svg' in first.source
  assert f'colabs/{name}.ipynb' in first.source
  assert "'google.colab' in sys.modules" in stored.cells[1].source
  assert any('parameters' in c.metadata.get('tags', ()) for c in stored.cells)


def test_every_notebook_is_listed():
  found = sorted(os.path.splitext(os.path.basename(p))[0]
                 for p in glob.glob(os.path.join(COLABS, '*.py')))
  assert found == sorted(NOTEBOOKS)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Where the notebooks' small runs go, shared by this module's notebooks (the first that
  needs a run trains it), and the dataset directory they read. The CLIP, ALBEF, tri-modal
  and spoken-VQA runs are the session's (tests/shared_runs.py), linked under the names the
  notebooks look for; the notebooks train the rest (fine-tuning and VQA on the tiny default
  dataset, which no shared run renders)."""
  runs_dir = tmp_path_factory.mktemp('runs')
  links = {'shapes_clip_smoke': 'clip', 'shapes_albef_smoke': 'albef',
           'shapes_trimodal_smoke': 'trimodal', 'shapes_spoken_vqa_smoke': 'spoken_vqa'}
  shared = shared_runs.workdirs(*links.values())
  for name, run in links.items():
    os.symlink(shared[run], runs_dir / name)
  return runs_dir, shared_runs.data_dir()


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_runs_headless_in_small_mode(name, runs, monkeypatch):
  from mmfusion import notebook as notebook_lib
  runs_dir, data_dir = runs
  monkeypatch.setenv('MMFUSION_NOTEBOOK_SMALL', '1')
  monkeypatch.setenv('MMFUSION_RUNS', str(runs_dir))
  monkeypatch.setenv('MMFUSION_DATA_DIR', str(data_dir))
  monkeypatch.setenv('MPLBACKEND', 'Agg')
  executed = runs_dir / f'{name}.ipynb'
  notebook_lib.execute(os.path.join(COLABS, f'{name}.ipynb'), str(executed), small=True,
                       timeout_s=600)
  cells = nbformat.read(str(executed), as_version=4).cells
  errors = [o for c in cells if c.cell_type == 'code' for o in c.outputs
            if o.output_type == 'error']
  assert not errors
  assert all(c.execution_count for c in cells if c.cell_type == 'code')
