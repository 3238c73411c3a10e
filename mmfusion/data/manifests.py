"""Your own data read, for data/files.py (whose docstring describes the formats): a JSONL or CSV
manifest, or a folder of images, into checked rows of image, captions, label, audio and split,
with one clear error per malformed input; captions cleaned, and what the cleaning drops or cuts
counted. Nothing is decoded here.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
from typing import Any

SPLITS = ('train', 'validation', 'test')
_SPLIT_ALIASES = {'val': 'validation', 'valid': 'validation', 'dev': 'validation'}
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.gif', '.bmp', '.webp')
IMAGE_KEYS = ('image', 'file_name')               # the first a manifest has names the image
CAPTION_KEYS = ('caption', 'captions', 'text')    # every one a manifest has adds captions
CAPTION_SEPARATOR = '|'                           # between a CSV cell's captions
LABEL_CAPTION = 'a photo of a {}.'                # a folder image's caption without a sidecar


@dataclasses.dataclass
class Row:
  """One image and what goes with it; paths absolute."""
  origin: str              # where it was read: 'line 7' of a manifest, or the image's path
  key: str                 # the image path as written (manifest) or relative (folder)
  image: str
  captions: list[str]
  label: str | None = None
  audio: str | None = None
  split: str = 'train'


@dataclasses.dataclass
class Table:
  """A manifest or folder read and its captions cleaned: the rows that have a caption, and what
  the cleaning counted (origins, one entry per caption or row)."""
  source: str                      # the manifest or folder, absolute
  rows: list[Row]
  content_digest: str              # sha256 of the manifest's bytes, or of the folder's
                                   # file list with sizes and times
  empty_captions: list[str] = dataclasses.field(default_factory=list)
  uncaptioned: list[str] = dataclasses.field(default_factory=list)
  truncated: list[str] = dataclasses.field(default_factory=list)
  ignored: list[str] = dataclasses.field(default_factory=list)    # folder files not read

  @property
  def label_names(self) -> list[str]:
    return sorted({r.label for r in self.rows if r.label is not None})

  @property
  def has_audio(self) -> bool:
    return any(r.audio for r in self.rows)

  @property
  def num_captions(self) -> int:
    return max(len(r.captions) for r in self.rows)


def read_table(path: str, max_caption_chars: int) -> Table:
  """The manifest or folder at `path` (absolute) read, checked and its captions cleaned."""
  if os.path.isdir(path):
    rows, listing, ignored = _folder_rows(path)
    content = '\n'.join(listing).encode()
  else:
    content = _read_bytes(path)
    rows, ignored = _manifest_rows(path, content), []
  rows = _merged(rows, path)
  for field in ('label', 'audio'):
    _check_all_or_none(rows, field, path)
  table = Table(source=path, rows=[], content_digest=hashlib.sha256(content).hexdigest(),
                ignored=ignored)
  table.rows = [r for r in rows if _clean_captions(r, max_caption_chars, table)]
  if not table.rows:
    raise ValueError(f'{path}: none of its {len(rows)} images has a caption '
                     f'({len(table.empty_captions)} empty captions).')
  return table


def _read_bytes(path: str) -> bytes:
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: config.data.name = files:PATH needs a '
                            'JSONL or CSV manifest, or a folder of images.')
  with open(path, 'rb') as f:
    return f.read()


def _manifest_rows(path: str, content: bytes) -> list[Row]:
  kinds = {'.jsonl': _jsonl_rows, '.ndjson': _jsonl_rows, '.csv': _csv_rows, '.tsv': _csv_rows}
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in kinds:
    raise ValueError(f'{path}: a manifest is a {", ".join(kinds)} file, or PATH is a folder '
                     'of images.')
  rows = kinds[suffix](path, _utf8(content, path))
  if not rows:
    raise ValueError(f'{path} has no rows.')
  return rows


def _utf8(content: bytes, path: str) -> str:
  try:
    return content.decode('utf-8-sig')
  except UnicodeDecodeError as e:
    raise ValueError(f'{path} is not UTF-8 text ({e.reason} at byte {e.start}).') from None


def _split_name(value: Any, origin: str) -> str:
  name = str(value).strip().lower() if value is not None else ''
  name = _SPLIT_ALIASES.get(name, name) or 'train'
  if name not in SPLITS:
    raise ValueError(f'{origin}: unknown split {value!r}; use one of {", ".join(SPLITS)} '
                     f'(or {", ".join(_SPLIT_ALIASES)} for validation), or leave it out '
                     '(train).')
  return name


def _resolve(path: str, directory: str) -> str:
  return os.path.normpath(os.path.join(directory, os.path.expanduser(path)))


def _text(value: Any) -> str | None:
  """A label or path cell: None, '' and whitespace are 'not given'."""
  if value is None:
    return None
  value = str(value).strip()
  return value or None


def _row(fields: dict[str, Any], origin: str, directory: str, where: str) -> Row:
  """A manifest row (a JSON object, or a CSV row as a dict) -> Row, captions still raw."""
  image_key = next((k for k in IMAGE_KEYS if k in fields), None)
  if image_key is None:
    raise ValueError(f'{where}, {origin}: no image: name it with one of {list(IMAGE_KEYS)}; the '
                     f'row has {sorted(fields)}.')
  image = fields[image_key]
  if not isinstance(image, str) or not image.strip():
    raise ValueError(f'{where}, {origin}: "{image_key}" must be a path, got {image!r}.')
  captions = []
  for key in CAPTION_KEYS:
    value = fields.get(key)
    if value is None:
      continue
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) or v is None for v in values):
      raise ValueError(f'{where}, {origin}: "{key}" must be a string or a list of strings, '
                       f'got {value!r}.')
    captions += ['' if v is None else v for v in values]
  audio = _text(fields.get('audio'))
  return Row(origin=origin, key=image.strip(), image=_resolve(image.strip(), directory),
             captions=captions, label=_text(fields.get('label')),
             audio=audio and _resolve(audio, directory),
             split=_split_name(fields.get('split'), f'{where}, {origin}'))


def _jsonl_rows(path: str, text: str) -> list[Row]:
  rows = []
  for number, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    try:
      fields = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}, line {number}: not valid JSON ({e.msg} at column {e.colno}).'
                       ) from None
    if not isinstance(fields, dict):
      raise ValueError(f'{path}, line {number}: a row must be a JSON object '
                       f'{{"image": ..., "caption": ...}}, got {type(fields).__name__}.')
    rows.append(_row(fields, f'line {number}', os.path.dirname(path), path))
  return rows


def _csv_rows(path: str, text: str) -> list[Row]:
  reader = csv.DictReader(text.splitlines(), delimiter='\t' if path.endswith('.tsv') else ',')
  header = [h.strip() for h in reader.fieldnames or []]
  if not header:
    raise ValueError(f'{path} is empty: it needs a header line naming its columns.')
  reader.fieldnames = header
  if not any(k in header for k in IMAGE_KEYS):
    raise ValueError(f'{path}: no image column: the header has {header}; name the column of '
                     f'image paths one of {list(IMAGE_KEYS)}.')
  rows = []
  try:
    for fields in reader:
      origin = f'line {reader.line_num}'
      if None in fields:
        raise ValueError(f'{path}, {origin}: more fields than the header has columns '
                         f'({len(header)}).')
      for key in CAPTION_KEYS:
        if fields.get(key) is not None:
          fields[key] = fields[key].split(CAPTION_SEPARATOR)
      rows.append(_row(fields, origin, os.path.dirname(path), path))
  except csv.Error as e:
    raise ValueError(f'{path}, line {reader.line_num}: not valid CSV ({e}).') from None
  return rows


def _is_split_layout(names: list[str]) -> bool:
  return any(n.lower() in SPLITS or n.lower() in _SPLIT_ALIASES for n in names)


def _visible(names: list[str]) -> list[str]:
  return sorted(n for n in names if not n.startswith('.'))


def _folder_rows(root: str) -> tuple[list[Row], list[str], list[str]]:
  """(rows, the files walked with their sizes and times, the files neither read nor sidecars)."""
  top = _visible(os.listdir(root))
  dirs = [n for n in top if os.path.isdir(os.path.join(root, n))]
  rows, listing, ignored = [], [], []
  if _is_split_layout(dirs):
    strays = [n for n in dirs if _split_name_or_none(n) is None]
    strays += [n for n in top if n.lower().endswith(IMAGE_SUFFIXES)]
    if strays:
      raise ValueError(f'{root}: folders named after splits ({", ".join(SPLITS)}) hold the '
                       f'images, but {strays} lie beside them; move them into one.')
    parts = [(os.path.join(root, d), _split_name(d, f'{root}/{d}')) for d in dirs]
    ignored = [n for n in top if n not in dirs]
  else:
    parts = [(root, 'train')]
  for directory, split in parts:
    found, walked, skipped = _images_under(directory, root)
    listing += walked
    ignored += skipped
    labelled = {os.path.dirname(os.path.relpath(p, directory)) != '' for p in found}
    if len(labelled) > 1:
      raise ValueError(f'{directory}: some images sit in label folders and some do not; put '
                       'every image in a folder named after its label, or none.')
    for path in found:
      relative = os.path.relpath(path, root)
      label_dir = os.path.relpath(path, directory).split(os.sep)[0] if labelled == {True} else None
      label = label_dir.replace('_', ' ') if label_dir else None
      rows.append(Row(origin=relative, key=relative, image=path,
                      captions=_sidecar_captions(path, label), label=label,
                      audio=_sidecar(path, '.wav'), split=split))
  if not rows:
    raise ValueError(f'{root} holds no images ({", ".join(IMAGE_SUFFIXES)}); the layout is '
                     '<split>/<label>/<image> or <label>/<image> (module doc of '
                     'mmfusion/data/files.py).')
  return rows, listing, ignored


def _split_name_or_none(name: str) -> str | None:
  try:
    return _split_name(name, name)
  except ValueError:
    return None


def _images_under(directory: str, root: str) -> tuple[list[str], list[str], list[str]]:
  """(image paths, 'path size mtime' of every file, files that are neither images nor the
  sidecars of one), all under `directory`, sorted."""
  images, listing, others = [], [], []
  for parent, dirs, names in os.walk(directory):
    dirs[:] = _visible(dirs)
    for name in _visible(names):
      path = os.path.join(parent, name)
      stat = os.stat(path)
      listing.append(f'{os.path.relpath(path, root)} {stat.st_size} {stat.st_mtime_ns}')
      (images if name.lower().endswith(IMAGE_SUFFIXES) else others).append(path)
  stems = {os.path.splitext(p)[0] for p in images} | set(images)
  sidecars = {p for p in others if os.path.splitext(p)[0] in stems
              and p.lower().endswith(('.txt', '.wav'))}
  return images, listing, [os.path.relpath(p, root) for p in others if p not in sidecars]


def _sidecar(image: str, suffix: str) -> str | None:
  """`cat.png` + '.txt' -> `cat.png.txt` if it exists, else `cat.txt` if it exists."""
  for path in (image + suffix, os.path.splitext(image)[0] + suffix):
    if os.path.isfile(path):
      return path
  return None


def _sidecar_captions(image: str, label: str | None) -> list[str]:
  path = _sidecar(image, '.txt')
  if path is not None:
    return _utf8(_read_bytes(path), path).splitlines()
  return [LABEL_CAPTION.format(label)] if label else []


def _merged(rows: list[Row], where: str) -> list[Row]:
  """Rows naming the same image -> one row with all their captions; they must agree on the
  rest."""
  by_image: dict[str, Row] = {}
  for row in rows:
    first = by_image.get(row.image)
    if first is None:
      by_image[row.image] = dataclasses.replace(row, captions=list(row.captions))
      continue
    for field in ('label', 'split', 'audio'):
      if getattr(first, field) != getattr(row, field):
        raise ValueError(f'{where}: {first.origin} and {row.origin} name the same image '
                         f'{row.key!r} with different {field}s ({getattr(first, field)!r}, '
                         f'{getattr(row, field)!r}).')
    first.captions += row.captions
    first.origin = f'{first.origin}, {row.origin.removeprefix("line ")}'
  return list(by_image.values())


def _check_all_or_none(rows: list[Row], field: str, where: str) -> None:
  """Labels and clips: every row has one, or none does (a dataset feature is all or nothing)."""
  without = [r.origin for r in rows if getattr(r, field) is None]
  if 0 < len(without) < len(rows):
    raise ValueError(f'{where}: {len(rows) - len(without)} rows have a {field} but '
                     f'{len(without)} do not (first: {without[:5]}); give every row one, '
                     'or none.')


def _clean_captions(row: Row, max_chars: int, table: Table) -> bool:
  """Drops the row's empty captions and cuts long ones, counting both in `table`; False when
  no caption is left (counted too)."""
  kept = []
  for caption in row.captions:
    caption = ' '.join(caption.split())          # newlines and runs of spaces
    if not caption:
      table.empty_captions.append(row.origin)
      continue
    if len(caption) > max_chars:
      table.truncated.append(row.origin)
      caption = caption[:max_chars].rstrip()
    kept.append(caption)
  row.captions = kept
  if not kept:
    table.uncaptioned.append(row.origin)
  return bool(kept)
