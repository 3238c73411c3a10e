"""Tokenizer: training determinism, encode/decode conventions, tf_encode, bad files."""
import numpy as np
import pytest
import sentencepiece as spm
import tensorflow as tf

from mmfusion import vocab
from mmfusion.data import shapes
from mmfusion.data import tokenizer as tokenizer_lib


def captions(num: int = 200) -> list[str]:
  texts = []
  for i in range(num):
    texts += shapes.render_example(np.random.default_rng([7, 0, i]), 16)['captions']
  return texts


@pytest.fixture(scope='module')
def corpus() -> list[str]:
  return captions()


@pytest.fixture(scope='module')
def tok(corpus, tmp_path_factory) -> tokenizer_lib.Tokenizer:
  path = str(tmp_path_factory.mktemp('tok') / 'captions.model')
  return tokenizer_lib.Tokenizer(tokenizer_lib.train_tokenizer(corpus, path, vocab_size=128))


def test_training_is_deterministic_and_atomic(corpus, tmp_path):
  a = tokenizer_lib.train_tokenizer(corpus, str(tmp_path / 'a.model'), 128)
  b = tokenizer_lib.train_tokenizer(corpus, str(tmp_path / 'sub' / 'b.model'), 128)
  assert open(a, 'rb').read() == open(b, 'rb').read()
  assert sorted(p.name for p in tmp_path.rglob('*') if p.is_file()) == ['a.model', 'b.model']


def test_conventions(tok):
  assert (tok.pad_id, tok.eos_id) == (tokenizer_lib.PAD_ID, tokenizer_lib.EOS_ID) == (0, 3)
  assert 10 < tok.vocab_size <= 128
  # The ids the models use (mmfusion.vocab) are the ones the tokenizer trains with.
  assert ((tokenizer_lib.PAD_ID, tokenizer_lib.UNK_ID, tokenizer_lib.BOS_ID,
           tokenizer_lib.EOS_ID) == (vocab.PAD_ID, vocab.UNK_ID, vocab.BOS_ID, vocab.EOS_ID))
  processor = spm.SentencePieceProcessor(model_file=tok.model_path)
  assert (processor.unk_id(), processor.bos_id()) == (vocab.UNK_ID, vocab.BOS_ID)
  assert min(processor.piece_to_id(p) for p in ['▁a', '▁red']) >= vocab.FIRST_NORMAL_ID


def test_round_trip(tok, corpus):
  ids, mask = tok.encode(corpus, max_len=32)
  assert ids.dtype == np.int32 and mask.dtype == np.bool_ and ids.shape == (len(corpus), 32)
  assert tok.decode(ids) == corpus


def test_eos_padding_and_mask(tok):
  texts = ['a red circle', 'a small blue square left of a large green cross', '']
  ids, mask = tok.encode(texts, max_len=20)
  lengths = mask.sum(axis=1)
  for row, n in zip(range(len(texts)), lengths):
    assert mask[row, :n].all() and not mask[row, n:].any()     # a prefix of True
    assert ids[row, n - 1] == tok.eos_id                        # pooled position is EOS
    assert (ids[row, n:] == tok.pad_id).all()
    assert tok.eos_id not in ids[row, :n - 1]
  assert lengths[2] == 1                                        # empty text: just EOS
  # Word-level pieces: 'a red circle' is 3 pieces + EOS.
  assert lengths[0] == 4


def test_truncation_keeps_eos_last(tok):
  text = 'a small blue square left of a large green cross'
  full_ids, full_mask = tok.encode([text], max_len=40)
  n = int(full_mask.sum())
  ids, mask = tok.encode([text], max_len=5)
  assert mask.all()
  np.testing.assert_array_equal(ids[0, :4], full_ids[0, :4])
  assert ids[0, 4] == tok.eos_id and n > 5
  assert tok.decode(ids) == ['a small blue square']
  ids, mask = tok.encode([text], max_len=1)
  assert ids.tolist() == [[tok.eos_id]] and mask.all()


def test_decode_single_row_and_stops_at_eos(tok):
  ids, _ = tok.encode(['a red circle'], max_len=8)
  row = ids[0].copy()
  n = int((row != tok.pad_id).sum())
  row[n:] = ids[0, 0]          # garbage after EOS is ignored
  assert tok.decode(row) == ['a red circle']


def test_tf_encode_matches_encode_any_shape(tok, corpus):
  texts = np.array(corpus[:6]).reshape(2, 3)
  ids, mask = tok.tf_encode(tf.constant(texts), max_len=16)
  assert ids.shape == (2, 3, 16) and ids.dtype == tf.int32 and mask.dtype == tf.bool
  ref_ids, ref_mask = tok.encode(corpus[:6], max_len=16)
  np.testing.assert_array_equal(ids.numpy().reshape(6, 16), ref_ids)
  np.testing.assert_array_equal(mask.numpy().reshape(6, 16), ref_mask)

  ds = tf.data.Dataset.from_tensor_slices(corpus[:8]).batch(4)
  ds = ds.map(lambda t: tok.tf_encode(t, max_len=16))
  assert ds.element_spec[0].shape.as_list() == [None, 16]
  got = np.concatenate([i for i, _ in ds.as_numpy_iterator()])
  np.testing.assert_array_equal(got, tok.encode(corpus[:8], 16)[0])


def test_model_without_pad_piece(corpus, tmp_path):
  prefix = str(tmp_path / 'nopad')
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus), model_prefix=prefix, vocab_size=100, model_type='bpe',
      pad_id=-1, unk_id=0, bos_id=1, eos_id=2, hard_vocab_limit=False, num_threads=1,
      minloglevel=2)
  tok = tokenizer_lib.Tokenizer(prefix + '.model')
  assert tok.pad_id == 0 and tok.eos_id == 2
  ids, mask = tok.encode(['a red circle', 'a small blue square left of a green cross'], 16)
  assert (ids[~mask] == 0).all()
  assert tok.decode(ids) == ['a red circle', 'a small blue square left of a green cross']


def test_missing_and_unreadable_model_name_the_path(tmp_path):
  missing = str(tmp_path / 'missing.model')
  with pytest.raises(FileNotFoundError, match='missing.model'):
    tokenizer_lib.Tokenizer(missing)
  garbage = tmp_path / 'garbage.model'
  garbage.write_bytes(b'not a model')
  with pytest.raises(ValueError, match='garbage.model'):
    tokenizer_lib.Tokenizer(str(garbage))
  with pytest.raises(ValueError, match=r'\.model'):
    tokenizer_lib.train_tokenizer(['a b'], str(tmp_path / 'x.spm'), 16)
