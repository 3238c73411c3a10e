"""Your own data (`config.data.name = 'files:PATH'`, mmfusion/data/files.py): manifests and folders
of generated images built into TFDS datasets, checked against what the test wrote (counts, pixels,
captions, hashes computed here, a resampled sine's frequency); the bad-input errors; labels-free
evaluation; and one run of the real CLI on configs/own_clip.py."""
import csv
import hashlib
import json
import os
import random
import wave

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cli_runs import cli
from mmfusion import config as config_lib
from mmfusion.data import files
from mmfusion.data import shapes
from mmfusion.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------- helpers


def render(directory, count, size=24, seed=0):
  """`count` PNGs of the embedded renderer under `directory`: [(file name, captions, label,
  pixels)], every caption list unique (the index is in the first caption)."""
  os.makedirs(directory, exist_ok=True)
  out = []
  for i in range(count):
    ex = shapes.render_example(np.random.default_rng([seed, i]), size)
    name = f'img{i:03d}.png'
    with open(os.path.join(directory, name), 'wb') as f:
      f.write(shapes.encode_png(ex['image']))
    captions = [f'{ex["captions"][0]} number {i}', ex['captions'][1]]
    out.append((name, captions, shapes.CLASS_NAMES[ex['label']], ex['image']))
  return out


def write_jsonl(path, rows):
  with open(path, 'w') as f:
    for row in rows:
      f.write((row if isinstance(row, str) else json.dumps(row)) + '\n')
  return str(path)


def data_config(path, data_dir, **files_options):
  config = config_lib.base()
  config.data.name = f'files:{path}'
  config.data.data_dir = str(data_dir)
  config.data.files.update(files_options)
  return config.data


def build(path, data_dir, **files_options):
  return files.get_builder(data_config(path, data_dir, **files_options))


def examples(builder, split):
  return list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))


def first_captions(builder, split):
  return {ex['captions'][0].decode() for ex in examples(builder, split)}


def counts(builder):
  return {name: split.num_examples for name, split in builder.info.splits.items()}


def expected_held_out(keys, fraction):
  """The held-out rule written out: sha256 of the path under the fraction, else the lowest."""
  score = {k: int.from_bytes(hashlib.sha256(k.encode()).digest()[:8], 'big') / 2**64
           for k in keys}
  chosen = {k for k in keys if score[k] < fraction}
  return chosen or {min(keys, key=score.get)}


def write_wav(path, wave_float, rate, width=2, channels=1):
  """A PCM WAV of `wave_float` in [-1, 1] (the same on every channel)."""
  scale = 2 ** (8 * width - 1) - 1
  ints = np.round(np.repeat(wave_float[:, None], channels, axis=1) * scale)
  if width == 1:
    data = (ints + 128).astype(np.uint8).tobytes()
  elif width == 3:                                 # the low three bytes of each int32
    data = ints.astype('<i4').view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
  else:
    data = ints.astype(f'<i{width}').tobytes()
  with wave.open(str(path), 'wb') as f:
    f.setnchannels(channels)
    f.setsampwidth(width)
    f.setframerate(rate)
    f.writeframes(data)


# -------------------------------------------------------------------------------- layouts


def test_jsonl_builds_splits_labels_captions_and_pixels(tmp_path, capsys):
  rendered = render(tmp_path / 'pics', 50)
  rows = []
  for i, (name, captions, label, _) in enumerate(rendered):
    row = {'image': f'pics/{name}', 'label': label,
           'split': 'test' if i >= 46 else 'validation' if i >= 40 else 'train'}
    # One, two or three captions: the dataset holds K = 3, shorter lists repeated in turn.
    row.update({'caption': captions[0]} if i % 3 == 0 else {'captions': captions[:2]}
               if i % 3 == 1 else {'captions': captions + ['a third one']})
    rows.append(row)
  builder = build(write_jsonl(tmp_path / 'data.jsonl', rows), tmp_path / 'ds')

  assert counts(builder) == {'train': 40, 'validation': 6, 'test': 4}
  assert builder.info.features['label'].names == sorted({r['label'] for r in rows})
  assert 'speech' not in builder.info.features
  printed = capsys.readouterr().out
  assert 'train 40, validation 6, test 4;' in printed and 'skipped 0 missing' in printed
  by_caption = {r.get('caption') or r['captions'][0]: (i, r) for i, r in enumerate(rows)}
  for ex in examples(builder, 'train') + examples(builder, 'test'):
    i, row = by_caption[ex['captions'][0].decode()]
    own = [row['caption']] if 'caption' in row else row['captions']
    assert [c.decode() for c in ex['captions']] == [own[k % len(own)] for k in range(3)]
    assert builder.info.features['label'].int2str(ex['label']) == row['label']
    np.testing.assert_array_equal(ex['image'], rendered[i][3])      # 24 px: stored as it was


def test_csv_with_several_captions_and_large_images_held_out(tmp_path):
  pics = tmp_path / 'pics'
  rendered = render(pics, 20, size=300)
  with open(tmp_path / 'data.csv', 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['image', 'caption'])
    for name, captions, _, _ in rendered:
      writer.writerow([str(pics / name), '|'.join(captions)])         # absolute paths
  builder = build(tmp_path / 'data.csv', tmp_path / 'ds', max_image_side=100)

  held = expected_held_out([str(pics / n) for n, *_ in rendered], 0.1)
  assert counts(builder) == {'train': 20 - len(held), 'validation': len(held)}
  assert 'label' not in builder.info.features
  validation = examples(builder, 'validation')
  assert {ex['captions'][0].decode() for ex in validation} == {
      captions[0] for name, captions, *_ in rendered if str(pics / name) in held}
  for ex in validation:
    assert ex['image'].shape == (100, 100, 3)                 # the longer side shrunk to 100
    assert [c.decode() for c in ex['captions']][1] in {c[1] for _, c, *_ in rendered}


def test_folder_of_splits_and_labels_with_sidecar_captions(tmp_path):
  root = tmp_path / 'photos'
  layout = {('train', 'red_circle'): 6, ('train', 'blue_square'): 5, ('val', 'red_circle'): 2,
            ('val', 'blue_square'): 2, ('test', 'blue_square'): 3}
  for (split, label), n in layout.items():
    render(root / split / label, n, seed=len(label))
  # Sidecar captions for one image (both spellings), and a file that is neither.
  (root / 'train' / 'red_circle' / 'img000.png.txt').write_text('first caption\n\nsecond one\n')
  (root / 'train' / 'red_circle' / 'img001.txt').write_text('only caption\n')
  (root / 'train' / 'notes.md').write_text('not an image')
  builder = build(root, tmp_path / 'ds')

  assert counts(builder) == {'train': 11, 'validation': 4, 'test': 3}
  assert builder.info.features['label'].names == ['blue square', 'red circle']
  captions = {tuple(c.decode() for c in ex['captions']) for ex in examples(builder, 'train')}
  assert captions == {('first caption', 'second one'), ('only caption', 'only caption'),
                      *[(f'a photo of a {label}.',) * 2 for label in ('red circle', 'blue square')]}
  report = open(builder.report_path).read()
  assert 'empty captions, skipped: 1' in report                    # the blank sidecar line
  assert 'files ignored (neither images nor their .txt / .wav): 1\n  train/notes.md' in report


# -------------------------------------------------------------------- counted and reported


def test_unreadable_and_missing_files_are_counted_listed_and_skipped(tmp_path, capsys):
  rendered = render(tmp_path, 50)
  bad = {0: 'missing', 7: 'not an image', 21: 'half a png', 33: 'empty', 48: 'missing'}
  for i, kind in bad.items():
    path = tmp_path / rendered[i][0]
    data = path.read_bytes()
    if kind == 'missing':
      path.unlink()
    else:
      path.write_bytes({'not an image': b'hello, world', 'half a png': data[:len(data) // 2],
                        'empty': b''}[kind])
  manifest = write_jsonl(tmp_path / 'data.jsonl',
                         [{'image': n, 'caption': c[0]} for n, c, *_ in rendered])
  builder = build(manifest, tmp_path / 'ds')

  assert sum(counts(builder).values()) == 45
  kept = first_captions(builder, 'train') | first_captions(builder, 'validation')
  assert kept == {c[0] for i, (_, c, *_) in enumerate(rendered) if i not in bad}
  printed = capsys.readouterr().out
  report_path = printed.split('Report: ')[1].split()[0]
  assert 'skipped 5 missing or unreadable files' in printed
  report = open(report_path).read()
  assert 'missing or unreadable files, skipped: 5 of 50 images (10.0%' in report
  for i, kind in bad.items():
    line = next(l for l in report.splitlines() if rendered[i][0] in l)
    assert line.startswith(f'  line {i + 1}: ')
    assert {'missing': 'missing', 'not an image': 'not a PNG', 'empty': 'empty file',
            'half a png': 'does not decode'}[kind] in line


def test_too_many_bad_files_stop_the_build_with_one_error(tmp_path):
  rendered = render(tmp_path, 20)
  for name, *_ in rendered[:5]:
    os.remove(tmp_path / name)
  manifest = write_jsonl(tmp_path / 'data.jsonl',
                         [{'image': n, 'caption': c[0]} for n, c, *_ in rendered])
  with pytest.raises(ValueError, match=r'5 of 20 images \(25%\) have a missing or unreadable '
                                       r'file.*max_bad_fraction = 20%.*listed in \S+report.txt'
                     ) as error:
    build(manifest, tmp_path / 'ds')
  report = error.value.args[0].split('listed in ')[1].split('. ')[0]
  assert sum(': missing' in line for line in open(report)) == 5
  assert not os.path.exists(os.path.join(os.path.dirname(report), '1.0.0'))
  # A looser limit builds it.
  assert sum(counts(build(manifest, tmp_path / 'ds', max_bad_fraction=0.3)).values()) == 15


def test_empty_and_overlong_captions_are_counted(tmp_path, capsys):
  rendered = render(tmp_path, 10)
  rows = [{'image': n, 'captions': [c[0], c[1]]} for n, c, *_ in rendered]
  rows[1]['captions'] = ['', rendered[1][1][0]]               # one empty caption
  rows[2]['captions'] = ['  ', None]                          # none left: the image is skipped
  rows[3]['captions'] = ['x' * 500, 'y' * 40]                 # one cut to 300
  builder = build(write_jsonl(tmp_path / 'data.jsonl', rows), tmp_path / 'ds',
                  validation_fraction=0.0)
  assert counts(builder) == {'train': 9}
  lengths = {len(c) for ex in examples(builder, 'train') for c in ex['captions']}
  assert max(lengths) == 300
  printed = capsys.readouterr().out
  assert ('skipped 0 missing or unreadable files, 3 empty captions, 1 images without a caption; '
          'truncated 1 captions to 300 characters') in printed


def test_held_out_split_is_deterministic_and_disjoint(tmp_path):
  rendered = render(tmp_path / 'pics', 40)
  rows = [{'image': f'pics/{n}', 'caption': c[0]} for n, c, *_ in rendered]
  shuffled = random.Random(0).sample(rows, len(rows))
  a = build(write_jsonl(tmp_path / 'a.jsonl', rows), tmp_path / 'ds', validation_fraction=0.25)
  b = build(write_jsonl(tmp_path / 'b.jsonl', shuffled), tmp_path / 'ds',
            validation_fraction=0.25)
  assert a.builder_config.name != b.builder_config.name
  held = expected_held_out([r['image'] for r in rows], 0.25)
  expected = {r['caption'] for r in rows if r['image'] in held}
  assert first_captions(a, 'validation') == first_captions(b, 'validation') == expected
  assert not first_captions(a, 'train') & expected
  assert len(first_captions(a, 'train')) == 40 - len(held)


def test_built_once_then_rebuilt_when_what_it_reads_changes(tmp_path, capsys):
  rendered = render(tmp_path, 12)
  rows = [{'image': n, 'caption': c[0]} for n, c, *_ in rendered]
  manifest = write_jsonl(tmp_path / 'data.jsonl', rows)
  first = build(manifest, tmp_path / 'ds')
  info = os.path.join(first.data_dir, 'dataset_info.json')
  built_at = os.stat(info).st_mtime_ns
  assert 'Built own_files/data-' in capsys.readouterr().out

  again = build(manifest, tmp_path / 'ds')
  assert again.data_dir == first.data_dir and os.stat(info).st_mtime_ns == built_at
  assert 'built earlier' in capsys.readouterr().out

  def cache_path():
    config = config_lib.base()
    config.data.name, config.data.data_dir = f'files:{manifest}', str(tmp_path / 'ds')
    return sources.Source(config).cache_path('v256.model')

  same = cache_path()
  write_jsonl(manifest, rows[:-1])                         # the manifest changes
  edited = build(manifest, tmp_path / 'ds')
  assert 'Built own_files/data-' in capsys.readouterr().out
  assert edited.data_dir != first.data_dir and counts(edited)['train'] + counts(
      edited)['validation'] == 11
  # The tokenizer cache is named after the build.
  assert cache_path() != same
  stat = os.stat(tmp_path / rendered[0][0])                # a file it names changes
  os.utime(tmp_path / rendered[0][0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  assert build(manifest, tmp_path / 'ds').data_dir not in (first.data_dir, edited.data_dir)


# ------------------------------------------------------------------------------------ audio


def test_audio_rows_come_out_at_the_configured_rate(tmp_path):
  rendered = render(tmp_path, 6)
  sources_ = [(8000, 2, 1, 0.5), (22050, 2, 2, 0.25), (16000, 1, 1, 0.3), (44100, 3, 1, 0.2),
              (16000, 4, 2, 0.4), (11025, 2, 1, 0.6)]     # rate, bytes per sample, channels, s
  rows = []
  for (name, captions, *_), (rate, width, channels, seconds) in zip(rendered, sources_):
    t = np.arange(int(rate * seconds)) / rate
    write_wav(tmp_path / f'{name}.wav', 0.5 * np.sin(2 * np.pi * 440 * t), rate, width, channels)
    rows.append({'image': name, 'caption': captions[0], 'audio': f'{name}.wav'})
  config = data_config(write_jsonl(tmp_path / 'data.jsonl', rows), tmp_path / 'ds',
                       validation_fraction=0.0)
  config.audio_sample_rate = 16000
  builder = files.get_builder(config)
  assert builder.info.features['speech'].sample_rate == 16000
  by_caption = {r['caption']: spec for r, spec in zip(rows, sources_)}
  for ex in examples(builder, 'train'):
    rate, _, _, seconds = by_caption[ex['captions'][0].decode()]
    clip = ex['speech'].astype(np.float64) / 32768
    assert abs(len(clip) - 16000 * int(rate * seconds) / rate) <= 1
    spectrum = np.abs(np.fft.rfft(clip * np.hanning(len(clip))))
    peak_hz = np.argmax(spectrum) * 16000 / len(clip)
    assert abs(peak_hz - 440) < 16000 / len(clip), (rate, peak_hz)
    assert 0.45 < np.max(np.abs(clip[len(clip) // 4:-len(clip) // 4])) < 0.55
  longest = builder.info.metadata['longest_clip_seconds']['train']['speech']
  assert longest == pytest.approx(0.6, abs=1e-3)


# ------------------------------------------------------------------------- bad input, clearly


def _bad_inputs(tmp_path):
  (tmp_path / 'a.png').write_bytes(shapes.encode_png(np.zeros((4, 4, 3), np.uint8)))
  (tmp_path / 'empty_folder').mkdir()
  (tmp_path / 'empty_folder' / 'readme.md').write_text('no images here')
  split_folder = tmp_path / 'split_folder'
  (split_folder / 'train').mkdir(parents=True)
  (split_folder / 'train' / 'a.png').write_bytes((tmp_path / 'a.png').read_bytes())
  (split_folder / 'holdout').mkdir()
  return [
      ('nowhere.jsonl', FileNotFoundError, r'nowhere.jsonl does not exist'),
      ('', ValueError, r"names no data.*configs/own_clip.py:data=PATH"),
      (write_jsonl(tmp_path / 'empty.jsonl', []), ValueError, r'empty.jsonl has no rows'),
      (write_jsonl(tmp_path / 'broken.jsonl', ['{"image": "a.png", "caption": "x"}', '',
                                               '{"image": "a.png" "caption": "y"}']),
       ValueError, r'broken.jsonl, line 3: not valid JSON'),
      (write_jsonl(tmp_path / 'noimage.jsonl', [{'caption': 'x', 'label': 'y'}]),
       ValueError, r"line 1: no image.*\['image', 'file_name'\]"),
      (write_jsonl(tmp_path / 'split.jsonl', [{'image': 'a.png', 'caption': 'x',
                                               'split': 'training'}]),
       ValueError, r"line 1: unknown split 'training'"),
      (write_jsonl(tmp_path / 'labels.jsonl', [{'image': 'a.png', 'caption': 'x', 'label': 'a'},
                                               {'image': 'a.png', 'caption': 'y', 'label': 'b'}]),
       ValueError, r"line 1 and line 2 name the same image 'a.png' with different labels"),
      (write_jsonl(tmp_path / 'some.jsonl', [{'image': 'a.png', 'caption': 'x', 'label': 'a'},
                                             {'image': 'b.png', 'caption': 'y'}]),
       ValueError, r"1 rows have a label but 1 do not \(first: \['line 2'\]\)"),
      (write_jsonl(tmp_path / 'nocaption.jsonl', [{'image': 'a.png', 'caption': ' '}]),
       ValueError, r'none of its 1 images has a caption'),
      (str(tmp_path / 'header.csv'), ValueError, r"no image column: the header has \['path', "
                                                 r"'caption'\]"),
      (str(tmp_path / 'data.txt'), ValueError, r'a manifest is a .jsonl, .ndjson, .csv, .tsv'),
      (str(tmp_path / 'empty_folder'), ValueError, r'empty_folder holds no images'),
      (str(split_folder), ValueError, r"\['holdout'\] lie beside them"),
  ]


def test_bad_input_gets_one_clear_error(tmp_path):
  (tmp_path / 'header.csv').write_text('path,caption\na.png,x\n')
  (tmp_path / 'data.txt').write_text('a.png\n')
  for path, error, message in _bad_inputs(tmp_path):
    with pytest.raises(error, match=message):
      build(path, tmp_path / 'ds')
  with pytest.raises(ValueError, match=r'validation_fraction = 1.5 is out of range'):
    build(tmp_path / 'header.csv', tmp_path / 'ds', validation_fraction=1.5)


# ------------------------------------------------------------------ labels and the batch size


def _own_config(manifest, data_dir):
  config = config_lib.load_file(os.path.join(ROOT, 'configs', 'own_clip.py'), f'data={manifest}')
  config.unlock()
  config.data.data_dir = str(data_dir)
  return config


def test_no_labels_leaves_zeroshot_out_and_the_batch_fits_the_data(tmp_path, capsys):
  rendered = render(tmp_path, 30)
  plain = write_jsonl(tmp_path / 'plain.jsonl', [{'image': n, 'caption': c[0]}
                                                 for n, c, *_ in rendered])
  labelled = write_jsonl(tmp_path / 'labelled.jsonl', [
      {'image': n, 'caption': c[0], 'label': label} for n, c, label, _ in rendered])

  config = _own_config(plain, tmp_path / 'ds')
  source = sources.Source(config)
  resolved = config_lib.resolve(config, source)
  assert sorted(resolved.evals) == ['retrieval']
  printed = capsys.readouterr().out
  assert "config.evals.zeroshot (type 'zeroshot') is left out" in printed
  train = source.num_examples('train')
  assert train < 30 and resolved.batch_size == source.config.batch_size == train
  assert f'has {train} examples, fewer than config.batch_size = 128' in printed
  assert resolved.data.name == f'files:{tmp_path / "plain.jsonl"}'

  with_labels = config_lib.resolve(_own_config(labelled, tmp_path / 'ds'),
                                   sources.Source(_own_config(labelled, tmp_path / 'ds')))
  assert sorted(with_labels.evals) == ['retrieval', 'zeroshot']
  # The fitted batch still splits evenly: here into 4 accumulation steps.
  accumulated = _own_config(plain, tmp_path / 'ds')
  accumulated.accum_steps = 4
  assert train % 4 and config_lib.resolve(
      accumulated, sources.Source(accumulated)).batch_size == train // 4 * 4
  # The embedded runs keep their batch: fitting is off in the base config.
  unfitted = _own_config(plain, tmp_path / 'ds')
  unfitted.data.fit_batch_size = False
  assert config_lib.resolve(unfitted, sources.Source(unfitted)).batch_size == 128
  # What cannot work without labels still fails, naming the cause.
  head = _own_config(plain, tmp_path / 'ds')
  head.model.heads = {'classification': dict(input='image', num_classes=-1)}
  with pytest.raises(ValueError, match=r'no ClassLabel feature "label"'):
    config_lib.resolve(head, sources.Source(head))
  with pytest.raises(ValueError, match=r"inputs has 'label'.*\['label'\]"):
    sources.Source(head).op('label')


def test_the_ahead_of_time_command_builds_and_prints_the_report(tmp_path, capsys):
  rendered = render(tmp_path, 8)
  manifest = write_jsonl(tmp_path / 'data.jsonl', [{'image': n, 'caption': c[0]}
                                                   for n, c, *_ in rendered])
  files.main([manifest, '--data_dir', str(tmp_path / 'ds')])
  printed = capsys.readouterr().out
  assert 'Built own_files/data-' in printed and 'missing or unreadable files, skipped: 0 of 8' \
      in printed
  with pytest.raises(SystemExit, match=r'mmfusion: .*missing.jsonl does not exist'):
    files.main([str(tmp_path / 'missing.jsonl')])


# ----------------------------------------------------------------------- the CLI, end to end


def test_own_clip_trains_from_a_folder_with_the_real_cli(tmp_path):
  for label in ('red_things', 'blue_things'):
    render(tmp_path / 'photos' / label, 12, seed=len(label))
  workdir = tmp_path / 'run'
  # A few steps of one-block towers at 32 px: what is tested is the way in, not the learning.
  result = cli(f'own_clip.py:data={tmp_path / "photos"}', workdir, tmp_path / 'ds',
               '--config.total_steps=6', '--config.log_every=3', '--config.checkpoint.every=0',
               '--config.data.image_size=32', '--config.model.towers.image.depth=1',
               '--config.model.towers.text.depth=1')
  assert result.returncode == 0, result.stdout + result.stderr
  output = result.stdout + result.stderr
  assert 'Built own_files/photos-' in output and 'train ' in output
  assert os.path.isdir(workdir / 'checkpoints' / '6')
  with open(workdir / 'metrics.jsonl') as f:
    steps = [json.loads(line)['step'] for line in f]
  assert 6 in steps
  with open(workdir / 'final_metrics.json') as f:
    final = json.load(f)
  assert final['step'] == 6 and final['zeroshot/num_examples'] >= 1
  assert 0 <= final['retrieval/i2t_r1'] <= 1
