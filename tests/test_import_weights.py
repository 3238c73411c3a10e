"""Public weights imported (mmfusion/weights, python -m mmfusion.import_weights) against the
reference implementations, offline: Hugging Face `CLIPModel` / `SiglipModel` built with random
weights from small configs are saved, imported (directly, and re-exported in OpenAI / open_clip
and big_vision layouts by the helpers here), and their image and text embeddings compared to
mmfusion's: max abs diff <= 1e-5 in float32. The tokenizers are compared id for id. A fine-tuning
run starts from an imported workdir through init_from; bad checkpoints fail naming the tensor.

torch and transformers come with the [test] extra; the module is skipped, saying so, without
them.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='the parity references need torch ([test] extra)')
transformers = pytest.importorskip('transformers',
                                   reason='the parity references need transformers ([test] extra)')
os.environ.setdefault('HF_HUB_OFFLINE', '1')

from cli_runs import ROOT  # noqa: E402
from mmfusion import api  # noqa: E402
from mmfusion import checkpoint as ckpt  # noqa: E402
from mmfusion import import_weights  # noqa: E402
from mmfusion.data import tokenizer as tokenizer_lib  # noqa: E402
from mmfusion.models import model as model_lib  # noqa: E402
from mmfusion.weights import layout  # noqa: E402
from mmfusion.weights.tensors import WeightsError  # noqa: E402

TOL = 1e-5
TEXTS = ['a red circle', 'a small blue square on the left', 'two green triangles',
         'a big yellow circle to the right of a red square and more words than fit']
WIDTH, HEADS, MLP, DEPTH, PATCH, IMAGE, MAX_LEN, EMBED = 32, 2, 64, 2, 8, 32, 16, 24


# ------------------------------------------------------------------------------ references

def _bytes_to_unicode():
  """GPT-2 / CLIP byte -> printable unicode character table (the standard construction)."""
  keep = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
          + list(range(ord('®'), ord('ÿ') + 1)))
  chars, extra = list(keep), 0
  for b in range(256):
    if b not in keep:
      keep.append(b)
      chars.append(256 + extra)
      extra += 1
  return dict(zip(keep, map(chr, chars)))


@pytest.fixture(scope='module')
def clip_tokenizer_dir(tmp_path_factory):
  """A small CLIP BPE (every byte, a few merges, the two special tokens) saved by transformers'
  CLIPTokenizerFast, which writes tokenizer.json."""
  directory = tmp_path_factory.mktemp('clip_tok')
  symbols = list(_bytes_to_unicode().values())
  merges = ['r e', 'e d</w>', 'c i', 'ci r', 'c l', 'l e</w>', 's q', 'a r', 'b l', 'bl u']
  vocab = symbols + [s + '</w>' for s in symbols] + [m.replace(' ', '') for m in merges]
  vocab += ['<|startoftext|>', '<|endoftext|>']
  (directory / 'vocab.json').write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
  (directory / 'merges.txt').write_text('#version: 0.2\n' + '\n'.join(merges) + '\n')
  tok = transformers.CLIPTokenizerFast(str(directory / 'vocab.json'),
                                       str(directory / 'merges.txt'))
  tok.save_pretrained(str(directory))
  return directory, tok


def _randomise(model, seed):
  """Every parameter drawn again at a scale where non-linearities, norms and biases all matter
  (the default init leaves many at zero or one)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      scale = 0.5 if p.ndim <= 1 else 1.0 / np.sqrt(p.shape[-1])
      p.copy_(torch.randn(p.shape, generator=gen) * scale + (1.0 if 'norm' in name and
                                                            name.endswith('weight') else 0.0))
  return model.eval()


@pytest.fixture(scope='module')
def hf_clip(tmp_path_factory, clip_tokenizer_dir):
  tok_dir, tok = clip_tokenizer_dir
  text = dict(vocab_size=len(tok), hidden_size=WIDTH, intermediate_size=MLP,
              num_hidden_layers=DEPTH, num_attention_heads=HEADS, max_position_embeddings=MAX_LEN,
              hidden_act='quick_gelu', bos_token_id=tok.bos_token_id,
              eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
  vision = dict(hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=DEPTH,
                num_attention_heads=HEADS, image_size=IMAGE, patch_size=PATCH,
                hidden_act='quick_gelu')
  config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=EMBED)
  model = _randomise(transformers.CLIPModel(config), 0)
  directory = tmp_path_factory.mktemp('hf_clip')
  model.save_pretrained(str(directory), safe_serialization=True)
  tok.save_pretrained(str(directory))
  return directory, model, tok


@pytest.fixture(scope='module')
def spm_model(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('spm') / 'spiece.model')
  corpus = [t for _ in range(20) for t in TEXTS] + ['red green blue yellow circle square']
  return tokenizer_lib.train_tokenizer(corpus, path, vocab_size=64)


@pytest.fixture(scope='module')
def hf_siglip(tmp_path_factory, spm_model):
  vocab = tokenizer_lib.Tokenizer(spm_model).vocab_size
  text = dict(vocab_size=vocab, hidden_size=WIDTH, intermediate_size=MLP,
              num_hidden_layers=DEPTH, num_attention_heads=HEADS, max_position_embeddings=MAX_LEN,
              pad_token_id=1, bos_token_id=2, eos_token_id=3, projection_size=WIDTH)
  vision = dict(hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=DEPTH,
                num_attention_heads=HEADS, image_size=IMAGE, patch_size=PATCH)
  config = transformers.SiglipConfig(text_config=text, vision_config=vision)
  model = _randomise(transformers.SiglipModel(config), 1)
  directory = tmp_path_factory.mktemp('hf_siglip')
  model.save_pretrained(str(directory), safe_serialization=True)
  (directory / 'spiece.model').write_bytes(open(spm_model, 'rb').read())
  return directory, model


# ------------------------------------------------------------- re-exports in other layouts

def _state(model):
  return {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}


def openai_state_dict(clip):
  """A Hugging Face CLIPModel's weights under OpenAI's / open_clip's names."""
  s, out = _state(clip), {}

  def blocks(src, dst):
    i = 0
    while f'{src}.{i}.layer_norm1.weight' in s:
      a, b = f'{src}.{i}.', f'{dst}.{i}.'
      for p in ('weight', 'bias'):
        out[b + 'attn.in_proj_' + p] = np.concatenate(
            [s[a + f'self_attn.{n}_proj.{p}'] for n in 'qkv'])
        out[b + f'attn.out_proj.{p}'] = s[a + f'self_attn.out_proj.{p}']
        out[b + f'ln_1.{p}'], out[b + f'ln_2.{p}'] = s[a + f'layer_norm1.{p}'], s[a + f'layer_norm2.{p}']
        out[b + f'mlp.c_fc.{p}'], out[b + f'mlp.c_proj.{p}'] = s[a + f'mlp.fc1.{p}'], s[a + f'mlp.fc2.{p}']
      i += 1

  ve = 'vision_model.embeddings.'
  out['visual.conv1.weight'] = s[ve + 'patch_embedding.weight']
  out['visual.class_embedding'] = s[ve + 'class_embedding']
  out['visual.positional_embedding'] = s[ve + 'position_embedding.weight']
  blocks('vision_model.encoder.layers', 'visual.transformer.resblocks')
  for p in ('weight', 'bias'):
    out[f'visual.ln_pre.{p}'] = s[f'vision_model.pre_layrnorm.{p}']
    out[f'visual.ln_post.{p}'] = s[f'vision_model.post_layernorm.{p}']
    out[f'ln_final.{p}'] = s[f'text_model.final_layer_norm.{p}']
  out['visual.proj'] = s['visual_projection.weight'].T.copy()
  out['token_embedding.weight'] = s['text_model.embeddings.token_embedding.weight']
  out['positional_embedding'] = s['text_model.embeddings.position_embedding.weight']
  blocks('text_model.encoder.layers', 'transformer.resblocks')
  out['text_projection'] = s['text_projection.weight'].T.copy()
  out['logit_scale'] = s['logit_scale']
  return out


def big_vision_arrays(siglip, scanned=False):
  """A Hugging Face SiglipModel's weights as a big_vision SigLIP .npz tree."""
  s, out = _state(siglip), {}
  heads, width = HEADS, WIDTH

  def attention(dst, q, k, v, o):
    for name, (w, b) in zip(('query', 'key', 'value'), (q, k, v)):
      out[f'{dst}{name}/kernel'] = w.T.reshape(width, heads, width // heads)
      out[f'{dst}{name}/bias'] = b.reshape(heads, width // heads)
    out[f'{dst}out/kernel'] = o[0].T.reshape(heads, width // heads, width)
    out[f'{dst}out/bias'] = o[1]

  def mlp(dst, src):
    for dense, fc in (('Dense_0', 'fc1'), ('Dense_1', 'fc2')):
      out[f'{dst}{dense}/kernel'] = s[f'{src}{fc}.weight'].T.copy()
      out[f'{dst}{dense}/bias'] = s[f'{src}{fc}.bias']

  def norm(dst, src):
    out[dst + '/scale'], out[dst + '/bias'] = s[src + '.weight'], s[src + '.bias']

  def encoder(src, dst):
    for i in range(DEPTH):
      a, b = f'{src}.{i}.', f'{dst}encoderblock_{i}/'
      lin = lambda n: (s[a + f'self_attn.{n}_proj.weight'], s[a + f'self_attn.{n}_proj.bias'])
      attention(b + 'MultiHeadDotProductAttention_0/', lin('q'), lin('k'), lin('v'), lin('out'))
      norm(b + 'LayerNorm_0', a + 'layer_norm1')
      norm(b + 'LayerNorm_1', a + 'layer_norm2')
      mlp(b + 'MlpBlock_0/', a + 'mlp.')

  ve = 'vision_model.embeddings.'
  out['img/embedding/kernel'] = s[ve + 'patch_embedding.weight'].transpose(2, 3, 1, 0)
  out['img/embedding/bias'] = s[ve + 'patch_embedding.bias']
  out['img/pos_embedding'] = s[ve + 'position_embedding.weight'][None]
  encoder('vision_model.encoder.layers', 'img/Transformer/')
  norm('img/Transformer/encoder_norm', 'vision_model.post_layernorm')
  h = 'vision_model.head.'
  out['img/MAPHead_0/probe'] = s[h + 'probe']
  qkv_w = np.split(s[h + 'attention.in_proj_weight'], 3)
  qkv_b = np.split(s[h + 'attention.in_proj_bias'], 3)
  attention('img/MAPHead_0/MultiHeadDotProductAttention_0/', *zip(qkv_w, qkv_b),
            (s[h + 'attention.out_proj.weight'], s[h + 'attention.out_proj.bias']))
  norm('img/MAPHead_0/LayerNorm_0', h + 'layernorm')
  mlp('img/MAPHead_0/MlpBlock_0/', h + 'mlp.')
  out['img/head/kernel'] = np.eye(width, dtype=np.float32)       # SigLIP HF has no image head
  out['img/head/bias'] = np.zeros(width, np.float32)
  out['txt/Embed_0/embedding'] = s['text_model.embeddings.token_embedding.weight']
  out['txt/pos_embedding'] = s['text_model.embeddings.position_embedding.weight'][None]
  encoder('text_model.encoder.layers', 'txt/Encoder_0/')
  norm('txt/Encoder_0/encoder_norm', 'text_model.final_layer_norm')
  out['txt/head/kernel'] = s['text_model.head.weight'].T.copy()
  out['txt/head/bias'] = s['text_model.head.bias']
  out['t'], out['b'] = s['logit_scale'], s['logit_bias']
  if scanned:
    for tower in ('img/Transformer/', 'txt/Encoder_0/'):
      names = {k.split('/', 3)[-1] for k in out if k.startswith(tower + 'encoderblock_0/')}
      for name in names:
        out[f'{tower}encoderblock/{name}'] = np.stack(
            [out.pop(f'{tower}encoderblock_{i}/{name}') for i in range(DEPTH)])
  return {f'params/{k}': v for k, v in out.items()}


# ---------------------------------------------------------------------------------- helpers

def _mmfusion(workdir):
  """(model, params, config, tokenizer) of an imported workdir, read the way load_run does."""
  step_dir = api.step_dir(str(workdir))
  config = api.load_config(step_dir)
  tok = tokenizer_lib.load(config.tokenizer.model,
                           pad_id=None if config.tokenizer.pad_id < 0 else config.tokenizer.pad_id,
                           attend_padding=config.tokenizer.attend_padding)
  model = model_lib.build(config.model, tok.vocab_size)
  return model, ckpt.load_params(step_dir), config, tok


def _embed(model, params, modality, inputs, mask=None):
  out = model.apply({'params': params}, modality, inputs, mask,
                    method=lambda m, *a: m.encode(*a))
  return np.asarray(out.embedding)


def _pixels(seed=0, n=3):
  return np.random.default_rng(seed).uniform(-2, 2, (n, IMAGE, IMAGE, 3)).astype(np.float32)


def _to_torch_images(x_nhwc):
  return torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


# ------------------------------------------------------------------------------------ tests

def test_clip_tokenizer_json_matches_transformers_id_for_id(clip_tokenizer_dir):
  directory, reference = clip_tokenizer_dir
  ours = tokenizer_lib.load(str(directory / 'tokenizer.json'))
  ids, mask = ours.encode(TEXTS, MAX_LEN)
  ref = reference(TEXTS, padding='max_length', max_length=MAX_LEN, truncation=True)
  np.testing.assert_array_equal(mask, np.asarray(ref['attention_mask'], bool))
  np.testing.assert_array_equal(np.where(mask, ids, 0),
                                np.where(mask, np.asarray(ref['input_ids']), 0))
  assert ids[0, 0] == reference.bos_token_id and ours.eos_id == reference.eos_token_id
  assert ids[-1, -1] == ours.eos_id                       # the truncated text keeps its end
  assert ours.decode(ids)[0] == 'a red circle'


def test_hf_clip_embeddings_equal_the_reference(hf_clip, tmp_path):
  directory, reference, tok = hf_clip
  import_weights.run_import('hf', str(directory), str(tmp_path / 'w'))
  model, params, config, ours = _mmfusion(tmp_path / 'w')
  assert config.model.towers.image.activation == 'quick_gelu'
  pixels = _pixels()
  with torch.no_grad():
    want_image = reference.get_image_features(pixel_values=_to_torch_images(pixels))
    ref = tok(TEXTS, padding='max_length', max_length=MAX_LEN, truncation=True,
              return_tensors='pt')
    want_text = reference.get_text_features(**ref)
  ids, mask = ours.encode(TEXTS, config.tokenizer.max_len)
  got_image = _embed(model, params, 'image', pixels)
  got_text = _embed(model, params, 'text', ids, mask)
  assert _max_diff(got_image, getattr(want_image, 'pooler_output', want_image)) <= TOL
  assert _max_diff(got_text, getattr(want_text, 'pooler_output', want_text)) <= TOL
  assert float(np.exp(params['logit_scale'])) == pytest.approx(
      float(reference.logit_scale.detach().exp()), rel=1e-6)


def _siglip_reference(reference, pixels, ids):
  with torch.no_grad():
    image = reference.get_image_features(pixel_values=_to_torch_images(pixels))
    text = reference.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)))
  return (getattr(image, 'pooler_output', image).numpy(),
          getattr(text, 'pooler_output', text).numpy())


@pytest.mark.parametrize('source', ['hf', 'big_vision', 'big_vision_scanned'])
def test_siglip_embeddings_equal_the_reference(source, hf_siglip, spm_model, tmp_path):
  directory, reference = hf_siglip
  if source == 'hf':
    import_weights.run_import('hf', str(directory), str(tmp_path / 'w'))
  else:
    npz = tmp_path / 'siglip.npz'
    np.savez(npz, **big_vision_arrays(reference, scanned=source.endswith('scanned')))
    import_weights.run_import('big_vision', str(npz), str(tmp_path / 'w'), tokenizer=spm_model)
  model, params, config, ours = _mmfusion(tmp_path / 'w')
  assert config.model.towers.image.pool == 'map' and config.tokenizer.attend_padding
  ids, mask = ours.encode(TEXTS, config.tokenizer.max_len)
  assert mask.all() and ids[0, -1] == ours.pad_id == 1            # padded as SigLIP trains
  pixels = _pixels(1)
  want_image, want_text = _siglip_reference(reference, pixels, ids)
  assert _max_diff(_embed(model, params, 'image', pixels), want_image) <= TOL
  assert _max_diff(_embed(model, params, 'text', ids, mask), want_text) <= TOL
  assert float(params['logit_bias']) == pytest.approx(float(reference.logit_bias.detach()), rel=1e-6)


@pytest.mark.parametrize('fmt', ['safetensors', 'pt'])
def test_openai_layout_embeddings_equal_the_reference(fmt, hf_clip, clip_tokenizer_dir, tmp_path):
  directory, reference, tok = hf_clip
  state = openai_state_dict(reference)
  path = tmp_path / f'clip.{fmt}'
  if fmt == 'pt':
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
  else:
    from safetensors.numpy import save_file
    save_file(state, str(path))
  # Width 32 / 64 rounds to no heads: OpenAI's rule does not hold for this small model.
  import_weights.run_import('openai', str(path), str(tmp_path / 'w'),
                            tokenizer=str(directory / 'tokenizer.json'),
                            image_heads=HEADS, text_heads=HEADS)
  model, params, config, ours = _mmfusion(tmp_path / 'w')
  pixels = _pixels(2)
  ids, mask = ours.encode(TEXTS, config.tokenizer.max_len)
  with torch.no_grad():
    want_image = reference.get_image_features(pixel_values=_to_torch_images(pixels))
    want_text = reference.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)),
                                            attention_mask=torch.from_numpy(mask.astype(np.int64)))
  assert _max_diff(_embed(model, params, 'image', pixels),
                   getattr(want_image, 'pooler_output', want_image)) <= TOL
  assert _max_diff(_embed(model, params, 'text', ids, mask),
                   getattr(want_text, 'pooler_output', want_text)) <= TOL


def test_open_clip_model_embeddings_equal_after_import(tmp_path, clip_tokenizer_dir):
  open_clip = pytest.importorskip('open_clip', reason='open_clip does not import here')
  model = open_clip.model.CLIP(
      EMBED, vision_cfg=dict(layers=DEPTH, width=WIDTH, head_width=WIDTH // HEADS,
                             mlp_ratio=MLP / WIDTH, patch_size=PATCH, image_size=IMAGE),
      text_cfg=dict(context_length=MAX_LEN, vocab_size=len(clip_tokenizer_dir[1]), width=WIDTH,
                    heads=HEADS, layers=DEPTH))
  model = _randomise(model, 2)
  path = tmp_path / 'open_clip.pt'
  torch.save(model.state_dict(), path)
  import_weights.run_import('open_clip', str(path), str(tmp_path / 'w'),
                            tokenizer=str(clip_tokenizer_dir[0] / 'tokenizer.json'),
                            image_heads=HEADS, text_heads=HEADS)
  ours, params, config, tok = _mmfusion(tmp_path / 'w')
  pixels = _pixels(3)
  ids, mask = tok.encode(TEXTS, MAX_LEN)
  with torch.no_grad():
    want_image = model.encode_image(_to_torch_images(pixels)).numpy()
    want_text = model.encode_text(torch.from_numpy(np.where(mask, ids, 0).astype(np.int64)))
  assert _max_diff(_embed(ours, params, 'image', pixels), want_image) <= TOL
  assert _max_diff(_embed(ours, params, 'text', ids, mask), want_text.numpy()) <= TOL


def test_position_embeddings_resample_bilinearly_with_corners_aligned():
  rng = np.random.default_rng(0)
  pos = rng.normal(size=(16, 5)).astype(np.float32)              # a 4 x 4 grid
  assert layout.resample_posemb(pos, 4) is pos
  out = layout.resample_posemb(pos, 7).reshape(7, 7, 5)
  grid = pos.reshape(4, 4, 5)
  # Hand-computed bilinear interpolation at the output points mapped onto the input grid.
  coords = np.arange(7) * 3 / 6
  lo = np.minimum(np.floor(coords).astype(int), 2)
  frac = coords - lo
  rows = grid[lo] * (1 - frac)[:, None, None] + grid[lo + 1] * frac[:, None, None]
  want = rows[:, lo] * (1 - frac)[None, :, None] + rows[:, lo + 1] * frac[None, :, None]
  np.testing.assert_allclose(out, want, atol=1e-5)
  np.testing.assert_allclose(out[[0, 0, -1, -1], [0, -1, 0, -1]], grid[[0, 0, -1, -1], [0, -1, 0, -1]],
                             atol=1e-6)


def test_import_at_another_resolution_embeds_there(hf_clip, tmp_path):
  directory, _, _ = hf_clip
  import_weights.run_import('hf', str(directory), str(tmp_path / 'w'), image_size=48)
  model, params, config, _ = _mmfusion(tmp_path / 'w')
  assert config.data.image_size == 48 and params['image']['pos_embedding'].shape == (36, WIDTH)
  assert _embed(model, params, 'image', np.zeros((2, 48, 48, 3), np.float32)).shape == (2, EMBED)


def test_bad_checkpoints_fail_naming_the_tensor(hf_clip, clip_tokenizer_dir, spm_model, tmp_path):
  from safetensors.numpy import save_file
  directory, reference, _ = hf_clip
  tok_json = str(directory / 'tokenizer.json')
  state = openai_state_dict(reference)
  save_file({**state, 'visual.extra_head.weight': np.zeros((2, 2), np.float32)},
            str(tmp_path / 'extra.safetensors'))
  with pytest.raises(WeightsError, match='visual.extra_head.weight'):
    import_weights.run_import('openai', str(tmp_path / 'extra.safetensors'), str(tmp_path / 'a'),
                              tokenizer=tok_json, image_heads=HEADS, text_heads=HEADS)
  del state['visual.ln_post.bias']
  save_file(state, str(tmp_path / 'missing.safetensors'))
  with pytest.raises(WeightsError, match='visual.ln_post.bias'):
    import_weights.run_import('openai', str(tmp_path / 'missing.safetensors'), str(tmp_path / 'b'),
                              tokenizer=tok_json, image_heads=HEADS, text_heads=HEADS)
  with pytest.raises(WeightsError, match='32 wide: 0 heads do not divide it; give --image_heads'):
    import_weights.run_import('openai', str(tmp_path / 'missing.safetensors'), str(tmp_path / 'g'),
                              tokenizer=tok_json)
  with pytest.raises(WeightsError, match='carries no tokenizer: give --tokenizer'):
    import_weights.run_import('openai', str(tmp_path / 'extra.safetensors'), str(tmp_path / 'c'))
  with pytest.raises(WeightsError, match='not the tokenizer of these weights'):
    import_weights.run_import('hf', str(directory), str(tmp_path / 'd'), tokenizer=spm_model)
  import_weights.run_import('hf', str(directory), str(tmp_path / 'e'))
  with pytest.raises(WeightsError, match='already holds checkpoints'):
    import_weights.run_import('hf', str(directory), str(tmp_path / 'e'))
  # The command line: one line, no traceback.
  done = subprocess.run([sys.executable, '-m', 'mmfusion.import_weights', '--source=hf',
                         f'--checkpoint={tmp_path}/nowhere', f'--workdir={tmp_path}/f'],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 1 and 'Traceback' not in done.stderr, done.stderr
  assert 'config.json' in done.stderr


def test_load_run_embeds_and_a_finetune_starts_from_an_imported_workdir(hf_clip, tmp_path):
  directory, reference, tok = hf_clip
  workdir = tmp_path / 'imported'
  import_weights.run_import('hf', str(directory), str(workdir))
  run = api.load_run(str(workdir))
  # load_run's own preprocessing (OpenAI's mean / std) on uint8 images, against the reference
  # on the same normalised pixels.
  images = np.random.default_rng(4).integers(0, 256, (2, IMAGE, IMAGE, 3), dtype=np.uint8)
  mean, std = np.array(run.config.data.image_mean), np.array(run.config.data.image_std)
  with torch.no_grad():
    want = reference.get_image_features(
        pixel_values=_to_torch_images(((images / 255.0 - mean) / std).astype(np.float32)))
  want = getattr(want, 'pooler_output', want).numpy()
  want /= np.linalg.norm(want, axis=-1, keepdims=True)
  assert _max_diff(run.embed(image=images), want) <= 1e-5
  # Fine-tuning through init_from, on the tiny embedded dataset (rendered here).
  env = dict(os.environ, MMFUSION_DATA_DIR=str(tmp_path / 'data'), TF_CPP_MIN_LOG_LEVEL='2')
  done = subprocess.run(
      [sys.executable, '-m', 'mmfusion.main',
       f'--config={ROOT}/configs/finetune_imported.py:workdir={workdir},smoke',
       f'--workdir={tmp_path}/ft', '--config.total_steps=4', '--config.checkpoint.every=4'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert f'from {workdir}' in done.stdout, done.stdout[-3000:]
  final = json.load(open(tmp_path / 'ft' / 'final_metrics.json'))
  assert final['step'] == 4
