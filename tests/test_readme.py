"""The README's commands stay true: CI runs the README's test command verbatim, and every
config the README names exists and loads."""
import os
import re

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
  import importlib.util
  names = set(re.findall(r'configs/(\w+)\.py', _readme()))
  assert {'shapes_clip', 'shapes_siglip', 'shapes_finetune_cls'} <= names
  for name in names:
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    assert config.is_locked
    # Its docstring says how it is run: a training command, or the benchmark that uses it.
    assert re.search(r'python -m (mmfusion\.main|benchmarks\.\w+) --config configs/', module.__doc__)
