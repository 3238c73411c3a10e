"""The spoken shapes: speech engine determinism, speaker-disjoint splits, the dataset's features
and metadata, the audio input ops and their errors, and an offline ASR check that the audio says
what its text says (pocketsphinx with a grammar of the dataset's language)."""
import os

import numpy as np
import pytest
import tensorflow as tf

from mmfusion import config as mmf_config
from mmfusion.data import ops
from mmfusion.data import shapes
from mmfusion.data import sources
from mmfusion.data import tts

pytest.importorskip('espeakng_loader', reason="the speech engine comes with the [speech] extra")


def spoken_config(data_dir, **data):
  config = mmf_config.base()
  config.data.update(builder_config='spoken_tiny', data_dir=str(data_dir), **data)
  return config


@pytest.fixture(scope='module')
def spoken_source(tmp_path_factory):
  return sources.Source(spoken_config(tmp_path_factory.mktemp('data')))


# ------------------------------------------------------------------------------ the engine


def test_the_same_utterances_give_the_same_audio_on_any_number_of_workers(monkeypatch):
  monkeypatch.setattr(tts, 'CHUNK', 4)     # several chunks, so several worker processes
  utterances = [tts.Utterance(f'a {c} circle on the left', s, seed=s)
                for s, c in enumerate(shapes.COLOURS * 2)]
  first = list(tts.synthesize(utterances, workers=2))
  again = list(tts.synthesize(utterances, workers=1))
  assert len(first) == len(utterances)
  for a, b in zip(first, again):
    assert a.dtype == np.int16 and a.ndim == 1
    np.testing.assert_array_equal(a, b)
  # The seed moves the rate, level and noise; the speaker moves the voice.
  other_seed = next(tts.synthesize([tts.Utterance(utterances[0].text, 0, seed=99)]))
  assert len(other_seed) != len(first[0]) or not np.array_equal(other_seed, first[0])


def test_clips_are_16khz_speech_of_plausible_length_and_level():
  clip, = tts.synthesize([tts.Utterance('a large red circle left of a small blue square', 3, 1)])
  seconds = len(clip) / tts.SAMPLE_RATE
  assert 1.0 < seconds < 4.0, seconds
  peak = np.abs(clip.astype(np.float32)).max() / 32768
  assert 0.25 < peak < 0.9
  # Speech energy sits below 4 kHz; FFT resampling from 22.05 kHz leaves nothing above 8 kHz.
  spectrum = np.abs(np.fft.rfft(clip.astype(np.float64)))
  freqs = np.fft.rfftfreq(len(clip), 1 / tts.SAMPLE_RATE)
  assert spectrum[freqs < 4000].sum() > 4 * spectrum[freqs >= 4000].sum()


def test_resample_is_exact_for_a_band_limited_tone():
  t_in = np.arange(22050) / 22050
  tone = np.sin(2 * np.pi * 441 * t_in)
  out = tts.resample(tone, 22050, 16000)
  t_out = np.arange(16000) / 16000
  np.testing.assert_allclose(out, np.sin(2 * np.pi * 441 * t_out), atol=1e-9)


def test_split_speakers_are_disjoint_and_cover_every_speaker():
  splits = {name: set(ids) for name, ids in tts.SPLIT_SPEAKERS.items()}
  assert splits['train'].isdisjoint(splits['test'])
  assert splits['train'].isdisjoint(splits['validation'])
  assert splits['validation'].isdisjoint(splits['test'])
  assert set().union(*splits.values()) == set(range(len(tts.SPEAKERS)))
  assert len({s.name for s in tts.SPEAKERS}) == len(tts.SPEAKERS)


# ------------------------------------------------------------------------------ the dataset


def test_spoken_dataset_features_speakers_and_metadata(spoken_source):
  builder = spoken_source.builder
  speakers = {}
  for split in ('train', 'validation', 'test'):
    ds = builder.as_dataset(split=split, shuffle_files=False)
    seen, longest = set(), 0.0
    for ex in ds.as_numpy_iterator():
      seen.add(int(ex['speaker']))
      assert ex['speech'].dtype == np.int16 and ex['spoken_question'].dtype == np.int16
      assert ex['speech_text'].decode() in [c.decode() for c in ex['captions']]
      assert 0 <= ex['spoken_question_index'] < shapes.NUM_QUESTIONS
      longest = max(longest, len(ex['speech']) / tts.SAMPLE_RATE)
    speakers[split] = seen
    assert seen <= set(tts.SPLIT_SPEAKERS[split]), (split, seen)
    recorded = builder.info.metadata['longest_clip_seconds'][split]['speech']
    assert recorded == pytest.approx(longest)
  assert speakers['train'].isdisjoint(speakers['test'] | speakers['validation'])
  assert len(speakers['train']) >= 10       # 256 scenes over 18 training voices
  assert builder.info.features['speech'].sample_rate == tts.SAMPLE_RATE


def test_spoken_scenes_are_the_written_scenes(spoken_source):
  """Speaking a config never moves its scenes: the same captions as the renderer's."""
  ds = spoken_source.builder.as_dataset(split='validation', shuffle_files=False)
  stored = sorted(tuple(c.decode() for c in ex['captions']) for ex in ds.as_numpy_iterator())
  rendered = sorted(tuple(shapes.render_example(np.random.default_rng([0, 1, i]), 64)['captions'])
                    for i in range(64))     # TFDS stores a split in its own (hashed) order
  assert stored == rendered


def test_rendering_twice_gives_identical_records(spoken_source, tmp_path):
  again = sources.Source(spoken_config(tmp_path))
  for split in ('test',):
    a = list(spoken_source.builder.as_dataset(split=split, shuffle_files=False)
             .map(lambda ex: ex['speech']).as_numpy_iterator())
    b = list(again.builder.as_dataset(split=split, shuffle_files=False)
             .map(lambda ex: ex['speech']).as_numpy_iterator())
    assert len(a) == len(b) == 64
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------------------ the input ops


def test_audio_op_pads_and_masks(spoken_source):
  op = spoken_source.op('audio')
  assert op.spec(4) == {'audio': ((4, 56000), np.float32), 'audio_mask': ((4, 56000), np.bool_)}
  ex = next(iter(spoken_source.read('test', ['speech'])))
  fields = op.decode(op.standardize(ex))
  n = int(tf.shape(ex['speech'])[0])
  wave, mask = fields['audio'].numpy(), fields['audio_mask'].numpy()
  np.testing.assert_array_equal(mask, np.arange(56000) < n)
  np.testing.assert_allclose(wave[:n], ex['speech'].numpy() / 32768.0)
  assert not wave[n:].any()


def test_spoken_question_op_answers_like_the_written_one(spoken_source):
  op = spoken_source.op('spoken_question')
  ex = next(iter(spoken_source.read('test', op.features())))
  fields = op.standardize(ex)
  index = int(ex['spoken_question_index'])
  answer = ex['answers'].numpy()[index].decode()
  assert int(fields['answer']) == spoken_source.answers.index(answer)
  batch = {k: tf.expand_dims(v, 0) for k, v in op.decode({**fields}).items()}
  batch['answer'] = tf.reshape(fields['answer'], [1])
  evaluated = op.eval(batch)
  assert evaluated['question'].shape == (1, 1, op.num_samples)
  assert evaluated['answer'].shape == (1, 1)


def test_audio_from_raw_takes_waveforms_and_speaks_strings(spoken_source):
  op = spoken_source.op('audio')
  out = op.from_raw([np.ones(100, np.int16) * 16384, np.full(50, 0.25, np.float32)])
  assert out['audio'].shape == (2, op.num_samples)
  np.testing.assert_allclose(out['audio'][0, :100], 0.5)
  assert out['audio_mask'].sum(axis=1).tolist() == [100, 50]
  spoken = op.from_raw(['a red circle.', 'a blue square.'])
  assert spoken['audio_mask'].sum(axis=1).min() > 0.5 * tts.SAMPLE_RATE
  again = op.from_raw(['a red circle.', 'a blue square.'])
  np.testing.assert_array_equal(spoken['audio'], again['audio'])
  with pytest.raises(ValueError, match='longer than config.data.audio_max_seconds'):
    op.from_raw([np.zeros(op.num_samples + 1, np.float32)])


def test_a_clip_longer_than_the_maximum_is_refused_before_reading(spoken_source):
  source = sources.Source(spoken_config(spoken_source.data_dir, audio_max_seconds=1.0))
  with pytest.raises(ValueError, match=r"split '\w+' has clips of up to [\d.]+ s, longer than "
                                       r'config.data.audio_max_seconds = 1.0'):
    ops.build(source, ['audio'])


def test_a_sample_rate_other_than_the_datasets_is_refused(spoken_source):
  source = sources.Source(spoken_config(spoken_source.data_dir, audio_sample_rate=8000))
  with pytest.raises(ValueError, match='sampled at 16000 Hz, but config.data.audio_sample_rate '
                                       '= 8000'):
    ops.build(source, ['spoken_question'])


def test_the_tower_must_hear_the_datas_sample_rate():
  config = mmf_config.base()
  config.data.inputs = ('image', 'audio')
  config.model.towers.audio = dict(type='ast', sample_rate=22050, fft_size=1024)
  config.objectives = {'softmax_contrastive': dict(weight=1.0, pairs=(('image', 'audio'),))}
  config.evals = {}
  with pytest.raises(ValueError, match=r'towers.audio.sample_rate = 22050, but the audio inputs '
                                       r'are at config.data.audio_sample_rate = 16000'):
    mmf_config.validate(config)


def test_a_pair_naming_a_modality_the_batch_lacks_is_refused():
  config = mmf_config.base()
  config.model.towers.audio = dict(type='ast')
  config.objectives = {'softmax_contrastive': dict(weight=1.0, pairs=(('image', 'audio'),))}
  with pytest.raises(ValueError, match="binds 'audio', which the batch lacks"):
    mmf_config.validate(config)


def test_an_unknown_tower_type_is_refused():
  config = mmf_config.base()
  config.model.towers.audio = dict(type='wav2vec')
  with pytest.raises(ValueError, match="towers.audio.type = 'wav2vec': unknown tower type"):
    mmf_config.validate(config)


# ------------------------------------------------------------------------------ the ASR check

_GRAMMAR = """#JSGF V1.0;
grammar shapes;
public <s> = <caption> | <question>;
<art> = a | an | the | one;
<size> = small | little | large | big;
<colour> = red | orange | yellow | green | blue | purple;
<shape> = circle | square | triangle | diamond | cross;
<obj> = <art> [<size>] <colour> <shape>;
<rel> = left of | right of | above | below;
<loc> = in the top left | at the top | in the top right | on the left | in the centre |
        on the right | in the bottom left | at the bottom | in the bottom right;
<caption> = [there is] <obj> [<loc>] [(<rel> | and) <obj> [<loc>]] | a picture of <obj> |
            <obj> on a plain background | the <colour> <shape> is <loc> |
            two shapes <obj> and <obj>;
<question> = what colour is the <shape> | what shape is the <colour> object |
             how many shapes are there | is there <obj> | is the <shape> <rel> the <shape> |
             what size is the <colour> <shape>;
"""


def word_errors(reference: list[str], hypothesis: list[str]) -> int:
  """Levenshtein distance over words (substitutions, insertions, deletions)."""
  row = list(range(len(hypothesis) + 1))
  for i, ref_word in enumerate(reference, 1):
    prev, row[0] = row[0], i
    for j, hyp_word in enumerate(hypothesis, 1):
      prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ref_word != hyp_word))
  return row[-1]


def test_word_errors_by_hand():
  assert word_errors('a red circle'.split(), 'a red circle'.split()) == 0
  assert word_errors('a red circle'.split(), 'a blue circle'.split()) == 1
  assert word_errors('a red circle'.split(), 'a circle'.split()) == 1
  assert word_errors('a circle'.split(), 'a big red circle'.split()) == 2


def test_an_offline_recogniser_hears_the_captions_and_questions(tmp_path):
  """120 utterances (captions and questions of 60 test scenes, 5 of each of the 24 voices):
  pocketsphinx's US-English model with a grammar of the dataset's language gets >= 80% of the
  words right."""
  pocketsphinx = pytest.importorskip('pocketsphinx', reason='the ASR check needs pocketsphinx')
  grammar = tmp_path / 'shapes.jsgf'
  grammar.write_text(_GRAMMAR)
  model = pocketsphinx.get_model_path()
  decoder = pocketsphinx.Decoder(hmm=os.path.join(model, 'en-us', 'en-us'),
                                 dict=os.path.join(model, 'en-us', 'cmudict-en-us.dict'),
                                 jsgf=str(grammar), samprate=tts.SAMPLE_RATE, logfn=os.devnull)
  scenes = [shapes.render_example(np.random.default_rng([0, 2, i]), 32) for i in range(60)]
  texts = ([s['captions'][i % 5] for i, s in enumerate(scenes)]
           + [s['questions'][i % 5] for i, s in enumerate(scenes)])
  utterances = [tts.Utterance(t, i % len(tts.SPEAKERS), i) for i, t in enumerate(texts)]
  errors = words = 0
  per_speaker = np.zeros((len(tts.SPEAKERS), 2))
  for utterance, clip in zip(utterances, tts.synthesize(utterances)):
    decoder.start_utt()
    decoder.process_raw(clip.tobytes(), full_utt=True)
    decoder.end_utt()
    heard = decoder.hyp().hypstr.split() if decoder.hyp() else []
    said = utterance.text.split()
    e = word_errors(said, heard)
    errors, words = errors + e, words + len(said)
    per_speaker[utterance.speaker] += (e, len(said))
  accuracy = 1 - errors / words
  assert accuracy >= 0.8, (accuracy, per_speaker)
  # No voice is unintelligible: every speaker gets at least half of its words understood.
  assert (1 - per_speaker[:, 0] / per_speaker[:, 1]).min() >= 0.5, per_speaker
