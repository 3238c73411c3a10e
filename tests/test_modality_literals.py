"""No core module names a modality by hand: outside the image and text modules (their towers and
input ops), the embedded dataset and the config defaults, no string literal of mmfusion/ names
'image', 'text' or 'audio' (or a key built on them, such as 'text_mask' or 'embeddings/audio').

Docstrings and messages (literals with spaces) may mention them; names and keys may not.
"""
import ast
import pathlib
import re

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'mmfusion'
ALLOWED = {
    'models/vit.py',    # the image tower
    'models/text.py',   # the text tower
    'data/image.py',    # the image modality's input op
    'data/text.py',     # the text modality's input ops and vocabularies
    'data/shapes.py',   # the embedded dataset: its features are images and captions
    'models/audio.py',  # the speech tower
    'data/audio.py',    # the audio modality's input ops
    'data/spoken.py',   # the spoken configs of the embedded dataset
    'data/files.py',    # your own data: its features are images, captions and audio,
    'data/manifests.py',    # and so are its manifests' columns
    'config.py',        # the defaults of the default (image-text) experiment
    'pointing.py',      # the pointing game: the embedded dataset's images and their objects
    'import_weights.py',    # public image-text checkpoints (CLIP / SigLIP) as a run
    'weights/readers.py',   # their tensors' names: the image and text towers of those models
}
NAMES_A_MODALITY = re.compile(r'(?<![A-Za-z])(image|text|audio)(?![A-Za-z])')


def docstrings(tree: ast.AST) -> set[int]:
  ids = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      body = node.body
      if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        ids.add(id(body[0].value))
  return ids


def modality_literals(path: pathlib.Path) -> list[str]:
  """'<line>: <literal>' for every non-docstring string literal in `path` without spaces that
  names 'image' or 'text'."""
  tree = ast.parse(path.read_text())
  skip = docstrings(tree)
  return [f'{node.lineno}: {node.value!r}' for node in ast.walk(tree)
          if isinstance(node, ast.Constant) and isinstance(node.value, str)
          and id(node) not in skip and ' ' not in node.value
          and NAMES_A_MODALITY.search(node.value)]


def test_only_the_modality_modules_name_a_modality():
  modules = sorted(PACKAGE.rglob('*.py'))
  assert len(modules) > 30
  found = [f'{path.relative_to(PACKAGE)}:{line}' for path in modules
           if str(path.relative_to(PACKAGE)) not in ALLOWED for line in modality_literals(path)]
  assert not found, '\n'.join(found)


def test_the_scan_sees_keys_and_leaves_prose_alone(tmp_path):
  module = tmp_path / 'example.py'
  module.write_text('"""About the image tower."""\n'
                    "KEY = 'text_mask'\nPATH = 'embeddings/image'\n"
                    "MESSAGE = 'the text tower failed'\nOTHER = 'imagenet'\n"
                    "NAMED = f'{KEY}_image'\n")
  assert [f.split(': ', 1)[1] for f in modality_literals(module)] == [
      "'text_mask'", "'embeddings/image'", "'_image'"]
