"""The Llama-like families (Llama 3.x with RoPE scaling, Mistral's sliding window, Qwen2's q/k/v biases, Qwen3's
q/k norms and wide heads) against transformers: tiny random models built from transformers' own config classes, loaded
through nanolab's one loader, compared on logits, greedy generation, the KV cache, a LoRA step and the export back."""
import json

import pytest
import torch

from nanolab.checkpoint import load_model
from nanolab.generation import generate
from nanolab.hf import config_from_hf
from nanolab.kv_cache import KVCache

transformers = pytest.importorskip('transformers')
transformers.logging.set_verbosity_error()

V = 97
BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=V,
            max_position_embeddings=64, rms_norm_eps=1e-5)
# each family with the quirks it is known by: one KV head, head_dim != hidden/heads, llama3 scaling factors,
# a sliding window shorter than the prompts below (24 tokens), tied and untied embeddings
FAMILIES = {
    'llama3': (transformers.LlamaConfig, dict(num_key_value_heads=1, tie_word_embeddings=True, rope_parameters=dict(
        rope_type='llama3', rope_theta=5e5, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8))),
    'llama_linear': (transformers.LlamaConfig, dict(num_key_value_heads=2, head_dim=24, rope_parameters=dict(
        rope_type='linear', rope_theta=1e4, factor=4.0))),
    'mistral': (transformers.MistralConfig, dict(num_key_value_heads=1, sliding_window=5)),
    'qwen2': (transformers.Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=True)),
    'qwen3': (transformers.Qwen3Config, dict(num_key_value_heads=1, head_dim=32)),
}


def hf_model(name):
    torch.manual_seed(0)
    cls, kw = FAMILIES[name]
    hf = transformers.AutoModelForCausalLM.from_config(cls(**BASE, **kw), attn_implementation='eager')
    with torch.no_grad():  # random norms and biases too, so a mis-mapped one cannot hide behind ones/zeros
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return hf.eval()


@pytest.fixture(scope='module', params=list(FAMILIES))
def pair(request, tmp_path_factory):
    """(family, transformers' model, ours loaded from its save_pretrained directory, that directory)."""
    hf = hf_model(request.param)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    ours, _, _ = load_model(str(d))
    return request.param, hf, ours, d


def test_config_options(pair):
    name, hf, ours, _ = pair
    c = ours.config
    assert c.arch == 'llama' and c.n_kv_head == hf.config.num_key_value_heads
    assert c.head_size == (getattr(hf.config, 'head_dim', None) or 16) and c.qkv_bias == (name == 'qwen2') and c.qk_norm == (name == 'qwen3')
    assert c.sliding_window == (5 if name == 'mistral' else 0)
    assert (c.rope_scaling or {}).get('rope_type') == {'llama3': 'llama3', 'llama_linear': 'linear'}.get(name)


def test_logits_equal_transformers(pair):
    _, hf, ours, _ = pair
    x = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)[0]).abs().max().item() <= 1e-5


def test_greedy_generation_equals_transformers_generate(pair):
    _, hf, ours, _ = pair
    prompt = torch.randint(0, V, (1, 9))
    hf.generation_config.eos_token_id = None  # all 16 tokens: ours does not know the config's end id
    with torch.no_grad():
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False)[0, 9:].tolist()
    got = generate(ours, prompt[0].tolist(), 16, temperature=0)[0]
    nocache = generate(ours, prompt[0].tolist(), 16, temperature=0, use_cache=False)[0]
    assert got.tokens == ref and nocache.tokens == ref


def test_kv_cache_equals_no_cache(pair):
    """Prefill in chunks, then decode, including rows at different lengths: with Mistral's window of 5 the cache
    must forget what the window drops, exactly as the full forward does."""
    _, _, ours, _ = pair
    torch.manual_seed(1)
    x = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        full, _ = ours(x)
        cache = KVCache(ours.config, 2, 24, 'cpu', torch.float32)
        parts = [ours(x[:, :9], step=cache.schedule(chunks=[(0, 9), (1, 9)]))[0],
                 ours(x[:, 9:10], step=cache.schedule(decode=2))[0],
                 ours(x[:, 10:], step=cache.schedule(chunks=[(0, 10), (1, 10)]))[0]]
        assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5
        # two rows of different lengths decoding together: each as it is alone
        cache = KVCache(ours.config, 2, 24, 'cpu', torch.float32)
        a, b = x[:1, :13], x[1:, :6]
        ours(torch.cat([a, b], 1), step=cache.schedule(chunks=[(0, 13), (1, 6)]))
        nxt = torch.randint(0, V, (2, 1))
        dec, _ = ours(nxt, step=cache.schedule(decode=2))
        ref_a, _ = ours(torch.cat([a, nxt[:1]], 1))
        ref_b, _ = ours(torch.cat([b, nxt[1:]], 1))
    assert (dec[0, 0] - ref_a[0, -1]).abs().max() < 1e-5 and (dec[1, 0] - ref_b[0, -1]).abs().max() < 1e-5


def test_export_loads_back_in_transformers(pair, tmp_path):
    name, _, ours, _ = pair
    ours.save_pretrained(str(tmp_path))
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.config.model_type == {'llama3': 'llama', 'llama_linear': 'llama'}.get(name, name)
    x = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        assert (back(x).logits - ours(x)[0]).abs().max().item() <= 1e-5


def test_lora_step_runs_and_trains_only_the_adapters(pair):
    from nanolab.lora import add_lora, lora_layers
    _, _, ours, d = pair
    model, _, _ = load_model(str(d))  # a fresh copy: the fixture's is shared
    model.train()
    add_lora(model, r=4, alpha=8, dropout=0.0, targets='c_attn,c_proj,c_fc')
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert lora_layers(model) and trainable
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    x = torch.randint(0, V, (2, 16))
    losses = []
    for _ in range(3):
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all('lora' in n for n in changed)


@pytest.mark.parametrize('change,error', [
    (dict(model_type='gemma'), "model_type 'gemma'"),
    (dict(rope_parameters=dict(rope_type='yarn', factor=2.0, rope_theta=1e4)), "RoPE scaling 'yarn'"),
    (dict(hidden_act='gelu'), "hidden_act 'gelu'"),
    (dict(mlp_bias=True), 'mlp_bias'),
    (dict(model_type='qwen2', use_sliding_window=True, sliding_window=4,
          layer_types=['full_attention', 'sliding_attention']), 'some layers only'),
    (dict(rope_parameters=dict(rope_type='llama3', factor=8.0, rope_theta=1e4)), 'rope_scaling'),
])
def test_what_the_model_cannot_compute_is_refused_by_name(change, error, tmp_path):
    import json
    hf = transformers.LlamaConfig(**BASE).to_dict()
    hf.update(change)
    with pytest.raises(ValueError, match=error):
        from model import GPTConfig
        GPTConfig(**config_from_hf(hf))
    (tmp_path / 'config.json').write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=error):
        load_model(str(tmp_path))


# -----------------------------------------------------------------------------
# real models' files: sharded weights, the Hugging Face cache, the hub's errors

def test_sharded_safetensors_load_through_their_index(tmp_path):
    hf = hf_model('qwen2')
    hf.save_pretrained(tmp_path, max_shard_size='20KB')
    shards = sorted(p.name for p in tmp_path.glob('*.safetensors'))
    assert len(shards) > 2 and (tmp_path / 'model.safetensors.index.json').exists()
    ours, _, _ = load_model(str(tmp_path))
    x = torch.randint(0, V, (1, 12))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)[0]).abs().max().item() <= 1e-5
    (tmp_path / shards[1]).unlink()  # a download cut short
    with pytest.raises(ValueError, match=f"lacks the weight shards .*{shards[1]}"):
        load_model(str(tmp_path))


def fake_hub_cache(root, repo, hf):
    """The standard cache's layout for one model: models--org--name/{refs/main, snapshots/<rev>/files}."""
    d = root / f"models--{repo.replace('/', '--')}"
    snap = d / 'snapshots' / ('a' * 40)
    hf.save_pretrained(snap)
    (d / 'refs').mkdir(parents=True)
    (d / 'refs' / 'main').write_text('a' * 40)
    (d / 'blobs').mkdir()
    return snap


def test_a_cached_hub_model_opens_offline_and_is_listed(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from nanolab.hf import cached_models
    cache = tmp_path / 'hub'
    fake_hub_cache(cache, 'tiny-org/tiny-qwen3', hf_model('qwen3'))
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    model, _, _ = load_model('tiny-org/tiny-qwen3')
    assert model.config.qk_norm
    listed = cached_models()
    assert [(e['name'], e['kind'], e['arch']) for e in listed] == [('tiny-org/tiny-qwen3', 'hub', 'qwen3')]


def test_hub_errors_name_the_fix(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants, errors
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    with pytest.raises(ValueError, match=f"not in the Hugging Face cache \\({tmp_path}\\) and HF_HUB_OFFLINE=1"):
        load_model('meta-llama/Llama-3.2-1B')
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    real = huggingface_hub.snapshot_download

    def gated(name, **kw):  # what the hub answers for a gated model without a token
        if kw.get('local_files_only'):
            return real(name, **kw)
        import httpx
        raise errors.GatedRepoError('401 gated', response=httpx.Response(
            401, request=httpx.Request('GET', f'https://huggingface.co/{name}')))
    monkeypatch.setattr(huggingface_hub, 'snapshot_download', gated)
    with pytest.raises(ValueError, match='gated model.*HF_TOKEN'):
        load_model('meta-llama/Llama-3.2-1B')


@pytest.mark.parametrize('has_bf16', [True, False])
def test_auto_dtype_keeps_a_bf16_model_in_bf16_where_the_cpu_computes_it(has_bf16, tmp_path, monkeypatch):
    from nanolab import device
    monkeypatch.setattr(device, 'cpu_has_bf16', lambda: has_bf16)
    hf = hf_model('llama3')
    hf.to(torch.bfloat16).save_pretrained(tmp_path / 'bf16')
    hf.float().save_pretrained(tmp_path / 'fp32')
    bf, _, _ = load_model(str(tmp_path / 'bf16'), 'cpu', 'auto')
    fp, _, _ = load_model(str(tmp_path / 'fp32'), 'cpu', 'auto')
    assert bf.lm_head.weight.dtype == (torch.bfloat16 if has_bf16 else torch.float32)
    assert fp.lm_head.weight.dtype == torch.float32
    # bf16 weights held as stored: the same bits as transformers' bf16 tensors
    if has_bf16:
        assert torch.equal(bf.transformer.wte.weight, hf.to(torch.bfloat16).model.embed_tokens.weight)
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_model(str(tmp_path / 'fp32'), 'cpu', 'float8')


def test_safetensors_are_mapped_copy_on_write_and_checked(tmp_path):
    """A weight kept as stored is a view of its file (no copy, as llama.cpp maps GGUF), a write to it never reaches the
    file, quantizing gives the replaced weights' pages back without touching what the model still reads, and a
    crafted header is a ValueError naming the file."""
    import copy
    import hashlib
    import struct

    from nanolab.quantize import for_inference
    hf = hf_model('mistral')  # untied: lm_head is kept as stored
    hf.save_pretrained(tmp_path)
    f = tmp_path / 'model.safetensors'
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    model, _, _ = load_model(str(tmp_path))
    w = model.lm_head.weight
    from nanolab import mapped as files
    maps = [(torch.frombuffer(m, dtype=torch.uint8, count=1).data_ptr(), len(m)) for m in (r() for r, _ in files._MAPS)
            if m is not None]
    assert torch.equal(w, hf.lm_head.weight) and any(b <= w.data_ptr() < b + n for b, n in maps)  # in the file
    with torch.no_grad():
        w.mul_(2)  # copy-on-write: this process's page only
    assert hashlib.sha256(f.read_bytes()).hexdigest() == digest
    assert torch.equal(load_model(str(tmp_path))[0].lm_head.weight, hf.lm_head.weight)
    # quantized in place on the mapped weights (their pages released) == quantized from an in-memory copy
    mapped, _, _ = load_model(str(tmp_path))
    reference = copy.deepcopy(mapped)
    x = list(range(1, 20))
    for q in ('int8', 'int4'):
        a = generate(for_inference(copy.deepcopy(reference), q), x, 12, temperature=0)[0].tokens
        b = generate(for_inference(load_model(str(tmp_path))[0], q), x, 12, temperature=0)[0].tokens
        assert a == b
    # crafted headers: a length past the file, an extent past the data, an unknown dtype
    raw = f.read_bytes()
    n = struct.unpack('<Q', raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != '__metadata__')
    for bad in (struct.pack('<Q', 1 << 40) + raw[8:],
                _with_header(raw, n, {**header, name: {**header[name], 'data_offsets': [0, 1 << 40]}}),
                _with_header(raw, n, {**header, name: {**header[name], 'dtype': 'F128'}})):
        f.write_bytes(bad)
        with pytest.raises(ValueError, match='model.safetensors'):
            load_model(str(tmp_path))


def _with_header(raw, n, header):
    import struct
    text = json.dumps(header).encode()
    text += b' ' * (-len(text) % 8)
    return struct.pack('<Q', len(text)) + text + raw[8 + n:]
