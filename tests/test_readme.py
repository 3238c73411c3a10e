"""The README's commands stay true: CI runs the README's test command verbatim, and every
config the README names exists and loads."""
import os
import re

from mmfusion import config as mmf_config
from mmfusion.models import fusion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
  with open(os.path.join(ROOT, 'README.md')) as f:
    return f.read()


def test_ci_runs_the_readme_test_command():
  with open(os.path.join(ROOT, '.ci', 'run')) as f:
    ci_commands = [l.strip() for l in f if l.strip() and not l.startswith(('#', 'set ', 'cd '))]
  readme_commands = [l.strip() for l in _readme().splitlines() if l.startswith('python3 -m venv')]
  assert len(readme_commands) == 2
  assert ci_commands == [readme_commands[1]]
  assert 'pytest' in readme_commands[1] and 'mmfusion.main' in readme_commands[0]


def test_every_config_the_readme_names_loads():
  names = set(re.findall(r'configs/([\w/]+)\.py', _readme()))
  assert {'shapes_clip', 'shapes_siglip', 'shapes_finetune_cls', 'fusion/early'} <= names
  for name in names:
    path = os.path.join(ROOT, 'configs', f'{name}.py')
    try:
      config = mmf_config.load_file(path)
      assert config.is_locked
    except FileNotFoundError as e:
      # A config built on another run's output (an imported workdir) loads once that exists;
      # without it, it must say what to make.
      assert 'mmfusion.import_weights' in str(e), (name, e)
    # Its docstring says how it is run: a training command, or the benchmark that uses it.
    with open(path) as f:
      assert re.search(rf'python -m (mmfusion\.main|benchmarks\.\w+) --config configs/{name}\.py',
                       f.read()), name


def test_one_config_per_fusion_strategy():
  """configs/fusion/<strategy>.py is configs/shapes_vqa.py with that strategy, fresh fusion."""
  strategies = sorted(fusion.STRATEGIES)
  files = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, 'configs', 'fusion'))
                 if f.endswith('.py'))
  assert files == strategies
  for strategy in strategies:
    config = mmf_config.load_file(os.path.join(ROOT, 'configs', 'fusion', f'{strategy}.py'),
                                  'steps=40')
    reference = mmf_config.load_file(os.path.join(ROOT, 'configs', 'shapes_vqa.py'),
                                     f'strategy={strategy},fusion=fresh,steps=40')
    assert config.model.fusion.strategy == strategy
    assert config.to_dict() == reference.to_dict()
    assert 'fusion' in config.init_from.skip
