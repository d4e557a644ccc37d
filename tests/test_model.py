"""model.py against its references: Hugging Face transformers (logits, both directions), the no-cache
forward (KV cache, padding), and hand counts. Tiny random models, CPU, a few seconds."""
import os
import sys
from dataclasses import asdict

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GPT, GPTConfig
from nanolab.checkpoint import load_checkpoint, load_model, model_from_checkpoint, save_checkpoint
from nanolab.device import resolve_device, resolve_dtype
from nanolab.interpret import activation_flow, logit_lens
from nanolab.kv_cache import KVCache

transformers = pytest.importorskip('transformers')
transformers.logging.set_verbosity_error()


def tiny(arch='gpt2', **kw):
    kw = dict(dict(arch=arch, n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=96), **kw)
    return GPT(GPTConfig(**kw)).eval()


def hf_tiny(arch, tie):
    torch.manual_seed(0)
    if arch == 'gpt2':
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=96, n_positions=32,
                                      tie_word_embeddings=tie, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
        hf = transformers.GPT2LMHeadModel(cfg)
    else:  # grouped-query attention: 4 query heads share 2 key/value heads
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, vocab_size=96, max_position_embeddings=32,
                                       tie_word_embeddings=tie, rope_theta=5e5, rms_norm_eps=1e-5)
        hf = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # random norms and biases too, so a mis-mapped one cannot hide behind ones/zeros
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return hf.eval()


@pytest.mark.parametrize('arch,tie', [('gpt2', True), ('gpt2', False), ('llama', True), ('llama', False)])
def test_hf_parity_both_directions(arch, tie, tmp_path):
    x = torch.randint(0, 96, (2, 17))
    hf = hf_tiny(arch, tie)
    hf.save_pretrained(tmp_path / 'hf')
    ours = GPT.from_pretrained(str(tmp_path / 'hf')).eval()
    assert ours.config.tie_embeddings == tie
    assert (ours.config.n_kv_head == 2) == (arch == 'llama')
    with torch.no_grad():
        ref = hf(x).logits
        got, _ = ours(x)
    assert (ref - got).abs().max().item() <= 1e-4
    # and back: our export loads in transformers with the same logits
    ours.save_pretrained(str(tmp_path / 'ours'))
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'ours').eval()
    with torch.no_grad():
        assert (hf2(x).logits - got).abs().max().item() <= 1e-4


@pytest.mark.parametrize('arch', ['gpt2', 'llama'])
def test_scratch_model_exports_to_hf(arch, tmp_path):
    # a model we trained (here: random) with our own choices (bias=False gpt2, untied llama) survives export
    torch.manual_seed(1)
    m = tiny(arch, bias=False, n_kv_head=2 if arch == 'llama' else 0, tie_embeddings=arch == 'gpt2')
    m.save_pretrained(str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 96, (3, 20))
    with torch.no_grad():
        assert (hf(x).logits - m(x)[0]).abs().max().item() <= 1e-4


def each_row(cache, B, T):
    """The KV-cache step that appends T tokens to each of slots 0..B-1: prompt chunks, or one decode token each."""
    return cache.schedule(chunks=[(b, T) for b in range(B)]) if T > 1 else cache.schedule(decode=B)


@pytest.mark.parametrize('arch', ['gpt2', 'llama'])
def test_kv_cache_matches_full_forward(arch):
    torch.manual_seed(0)
    m = tiny(arch, n_kv_head=2 if arch == 'llama' else 0)
    x = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        full, _ = m(x)
        cache = KVCache(m.config, 2, 24, 'cpu', torch.float32)
        parts = [m(x[:, :9], step=each_row(cache, 2, 9))[0], m(x[:, 9:10], step=each_row(cache, 2, 1))[0],
                 m(x[:, 10:], step=each_row(cache, 2, 10))[0]]
    assert cache.lengths == [20, 20]
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize('arch', ['gpt2', 'llama'])
def test_rows_of_different_lengths_equal_each_row_alone(arch):
    # prompts of different lengths share one cache and one forward: each row must give exactly what it gives alone
    torch.manual_seed(0)
    m = tiny(arch, n_kv_head=2 if arch == 'llama' else 0)
    a, b = torch.randint(0, 96, (1, 12)), torch.randint(0, 96, (1, 7))
    nxt, last = torch.randint(0, 96, (2, 3)), torch.randint(0, 96, (2, 1))
    with torch.no_grad():
        cache = KVCache(m.config, 3, 8, 'cpu', torch.float32)
        step = cache.schedule(chunks=[(0, 12), (1, 7)])  # two prompt chunks in one flat row of 19 tokens
        lp, _ = m(torch.cat([a, b], 1), step=step)
        ls, _ = m(nxt, step=each_row(cache, 2, 3))  # 3 more tokens for slots 0 and 1, which hold 12 and 7
        step = cache.schedule(decode=3, real=[True, True, False])  # one token each; slot 2 holds no row: throwaway
        ld, _ = m(torch.cat([last, torch.zeros(1, 1, dtype=torch.long)]).view(1, 3), step=step)
        ref_a, _ = m(torch.cat([a, nxt[:1], last[:1]], 1))
        ref_b, _ = m(torch.cat([b, nxt[1:], last[1:]], 1))
    assert cache.lengths == [16, 11, 0] and cache.max_len >= 16  # it grew (doubling) as the rows needed
    assert torch.isfinite(lp).all() and torch.isfinite(ld).all()
    assert (lp[0, :12] - ref_a[0, :12]).abs().max() < 1e-5 and (ls[0] - ref_a[0, 12:15]).abs().max() < 1e-5
    assert (lp[0, 12:] - ref_b[0, :7]).abs().max() < 1e-5 and (ls[1] - ref_b[0, 7:10]).abs().max() < 1e-5
    assert (ld[0, 0] - ref_a[0, 15]).abs().max() < 1e-5 and (ld[0, 1] - ref_b[0, 10]).abs().max() < 1e-5
    # a fork: slot 2 takes slot 1's first 9 tokens and continues differently, as row b alone would
    with torch.no_grad():
        cache.copy([1], [2], n=9)
        lf, _ = m(nxt[:1, 1:], step=cache.schedule(chunks=[(2, 2)]))
        ref_f, _ = m(torch.cat([b, nxt[1:, :2], nxt[:1, 1:]], 1))
    assert cache.lengths[2] == 11 and (lf[0] - ref_f[0, 9:]).abs().max() < 1e-5


def test_attention_weights_path():
    torch.manual_seed(0)
    m = tiny('llama', n_kv_head=2)
    x = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        logits, trace = m.trace(x)
        atts = trace['att']
        ref, _ = m(x)
    assert (logits - ref).abs().max() < 1e-5  # the explicit path computes the same function as SDPA
    assert len(atts) == 2 and atts[0].shape == (2, 4, 10, 10)
    assert torch.allclose(atts[0].sum(-1), torch.ones(2, 4, 10))
    assert atts[1].triu(1).abs().max() == 0  # causal: nothing attends to the future


@pytest.mark.parametrize('arch', ['gpt2', 'llama'])
def test_trace_logit_lens_and_activation_flow_against_hf(arch, tmp_path):
    """GPT.trace's residual stream and attention weights against transformers' hidden_states and attentions (eager
    attention), the logit lens's last layer against the model's own logits, the flow's norms by hand."""
    hf = hf_tiny(arch, True)
    hf.config._attn_implementation = 'eager'  # SDPA returns no attention weights
    hf.save_pretrained(tmp_path / 'hf')
    ours = GPT.from_pretrained(str(tmp_path / 'hf')).eval()
    x = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        out = hf(x, output_hidden_states=True, output_attentions=True)
        logits, trace = ours.trace(x)
    L = ours.config.n_layer
    assert len(trace['resid']) == L and trace['resid'][0].shape == (2, 9, 64)
    for i in range(L - 1):  # HF's last hidden state is after the final norm; the others are each block's output
        torch.testing.assert_close(trace['resid'][i], out.hidden_states[i + 1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(trace['embed'], out.hidden_states[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(trace['att'], out.attentions):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    lens = logit_lens(ours, trace)
    assert lens.shape == (L, 2, 9, 96)
    torch.testing.assert_close(lens[-1], torch.log_softmax(out.logits, -1), atol=1e-4, rtol=1e-4)
    assert torch.equal(lens[-1].argmax(-1), logits.argmax(-1))
    flow = activation_flow(trace)
    assert flow['resid'].shape == flow['attn'].shape == flow['mlp'].shape == (L, 2, 9)
    torch.testing.assert_close(flow['resid'][0], out.hidden_states[1].norm(dim=-1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(flow['attn'][0] + 0, trace['attn_out'][0].norm(dim=-1))
    p = out.attentions[1][1, 2, 5, :6]  # layer 1, row 1, head 2, position 5: attends to positions 0..5
    assert abs(flow['entropy'][1, 1, 2, 5] - -(p * p.log()).sum()) < 1e-5
    assert flow['entropy'][:, :, :, 0].abs().max() < 1e-6  # position 0 attends only to itself: zero entropy


def test_counts_against_hf_and_by_hand():
    hf = hf_tiny('gpt2', True)
    m = tiny('gpt2')
    assert m.num_params(non_embedding=False) == hf.num_parameters()
    assert m.num_params() == hf.num_parameters() - 96 * 64 - 32 * 64  # minus token and position tables
    N = m.num_params(non_embedding=False) - 32 * 64
    assert m.flops_per_token(T=32) == 6 * N + 12 * 2 * 64 * 32
    assert m.estimate_mfu(tokens_per_sec=1000, peak_flops=1e12, T=32) == pytest.approx(m.flops_per_token(32) * 1000 / 1e12)
    llama = tiny('llama', n_kv_head=2, tie_embeddings=False, ffn_hidden=96)
    assert llama.num_params(non_embedding=False) == hf_tiny('llama', False).num_parameters()
    assert llama.num_params(non_embedding=False) - llama.num_params() == 96 * 64  # untied head is kept


def test_checkpoint_roundtrip_and_errors(tmp_path):
    m = tiny('llama', n_kv_head=2)
    path = str(tmp_path / 'run' / 'ckpt.pt')
    save_checkpoint({'model_args': asdict(m.config), 'model': m.state_dict(), 'iter_num': 7}, path)
    assert os.listdir(tmp_path / 'run') == ['ckpt.pt']  # no temp file left behind
    m2 = model_from_checkpoint(load_checkpoint(str(tmp_path / 'run')))
    x = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        assert torch.equal(m(x)[0], m2.eval()(x)[0])
    # a failed save leaves the previous checkpoint intact
    with pytest.raises(Exception):
        save_checkpoint({'model_args': asdict(m.config), 'model': m.state_dict(), 'bad': lambda: 0}, path)
    assert load_checkpoint(path)['iter_num'] == 7
    # compiled-model keys are refused on save
    with pytest.raises(ValueError, match='uncompiled'):
        save_checkpoint({'model_args': {}, 'model': {'_orig_mod.x': torch.zeros(1)}}, str(tmp_path / 'c.pt'))
    # missing, corrupt, mismatched
    with pytest.raises(ValueError, match='no checkpoint'):
        load_checkpoint(str(tmp_path / 'nowhere'))
    (tmp_path / 'bad.pt').write_bytes(open(path, 'rb').read()[:1000])
    with pytest.raises(ValueError, match='corrupt or truncated'):
        load_checkpoint(str(tmp_path / 'bad.pt'))
    ckpt = load_checkpoint(path)
    ckpt['model_args']['n_embd'] = 128
    with pytest.raises(ValueError, match='do not match'):
        model_from_checkpoint(ckpt)
    ckpt = load_checkpoint(path)
    del ckpt['model']['transformer.ln_f.weight']
    with pytest.raises(ValueError, match='ln_f'):
        model_from_checkpoint(ckpt)


def test_load_model_sources(tmp_path):
    m = tiny('gpt2')
    save_checkpoint({'model_args': asdict(m.config), 'model': m.state_dict()}, str(tmp_path / 'out' / 'ckpt.pt'))
    m.save_pretrained(str(tmp_path / 'hf'))
    x = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        ref = m(x)[0]
        for src in ['out', 'out/ckpt.pt', 'hf']:
            got, tok, _ = load_model(str(tmp_path / src))
            assert not got.training and torch.allclose(got(x)[0], ref, atol=1e-5)
    with pytest.raises(ValueError, match='does not exist'):
        load_model(str(tmp_path / 'out-typo'))
    os.makedirs(tmp_path / 'empty')
    with pytest.raises(ValueError, match='neither ckpt.pt'):
        load_model(str(tmp_path / 'empty'))


def test_bad_config_and_device():
    with pytest.raises(ValueError, match='arch'):
        GPTConfig(arch='mamba')
    with pytest.raises(ValueError, match='n_kv_head'):
        GPTConfig(arch='llama', n_head=4, n_kv_head=3, n_embd=64)
    with pytest.raises(ValueError, match='llama'):
        GPTConfig(arch='gpt2', n_head=4, n_kv_head=2, n_embd=64)
    m = tiny('gpt2')
    with pytest.raises(ValueError, match='block_size'):
        m(torch.zeros(1, 33, dtype=torch.long))
    assert resolve_device('cpu') == 'cpu' and resolve_dtype('auto', 'cpu') == torch.float32
    with pytest.raises(ValueError, match='dtype'):
        resolve_dtype('fp8', 'cpu')
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='CUDA is not available'):
            resolve_device('cuda')


def test_write_atomic_keeps_the_old_file_on_a_crash_and_two_writers_never_mix(tmp_path):
    import threading
    from nanolab.files import write_atomic
    path = str(tmp_path / 'f.bin')
    write_atomic(path, lambda f: f.write(b'old'))

    def crash(f):
        f.write(b'half')
        raise OSError('disk full (simulated)')
    with pytest.raises(OSError, match='disk full'):
        write_atomic(path, crash)
    assert open(path, 'rb').read() == b'old' and os.listdir(tmp_path) == ['f.bin']  # no temp file left behind
    blobs = [bytes([65 + i]) * 200_000 for i in range(4)]
    halves = lambda b: lambda f: [f.write(b[:100_000]), f.write(b[100_000:])]  # two writes: room to interleave
    threads = [threading.Thread(target=write_atomic, args=(path, halves(b))) for b in blobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert open(path, 'rb').read() in blobs and os.listdir(tmp_path) == ['f.bin']  # one writer's whole file


def test_sinusoidal_positions_by_hand_and_through_the_cache(tmp_path):
    """positions='sinusoidal': the table is Vaswani et al.'s formula, nothing is learned for it, the KV cache path
    equals the full forward, and Hugging Face export refuses it (neither HF arch has it)."""
    import math
    from model import sinusoid_table
    cfg = GPTConfig(arch='gpt2', n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=50, positions='sinusoidal')
    tab = sinusoid_table(cfg)
    for p, i in ((0, 0), (3, 2), (15, 7)):
        assert abs(tab[p, 2 * i] - math.sin(p / 10000 ** (2 * i / 32))) < 1e-6
        assert abs(tab[p, 2 * i + 1] - math.cos(p / 10000 ** (2 * i / 32))) < 1e-6
    torch.manual_seed(0)
    m = GPT(cfg).eval()
    learned = GPT(GPTConfig(arch='gpt2', n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=50))
    assert m.num_params(non_embedding=False) == learned.num_params(non_embedding=False) - 16 * 32  # no wpe
    assert 'sinusoids' not in m.state_dict()  # a fixed table, not a weight
    x = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        full, _ = m(x)
        cache = KVCache(m.config, 2, 16, 'cpu', torch.float32)
        first, _ = m(x[:, :7], step=each_row(cache, 2, 7))
        rest = [m(x[:, t:t + 1], step=each_row(cache, 2, 1))[0] for t in range(7, 12)]
    torch.testing.assert_close(torch.cat([first] + rest, 1), full, atol=1e-5, rtol=1e-5)
    llama = GPT(GPTConfig(arch='llama', n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20, positions='sinusoidal'))
    assert llama(torch.zeros(1, 8, dtype=torch.long))[0].shape == (1, 8, 20)
    with pytest.raises(ValueError, match="no positions='sinusoidal'"):
        m.save_pretrained(str(tmp_path / 'hf'))
    assert not (tmp_path / 'hf').exists()
    with pytest.raises(ValueError, match='unknown positions'):
        GPTConfig(positions='alibi')


def test_grouped_query_attention_takes_the_fast_paths_with_the_same_result():
    """model.attention (keys and values expanded where SDPA's enable_gqa would fall to the math kernel) and the
    KV cache's grouped decode (query heads as query positions of their shared head) equal the reference: each
    query head attending over its key/value head, explicitly, with and without a mask."""
    import math
    import torch.nn.functional as F
    from model import attention, expand_kv
    torch.manual_seed(0)
    B, nh, nkv, T, hs = 3, 8, 2, 7, 16
    q, k, v = torch.randn(B, nh, T, hs), torch.randn(B, nkv, T, hs), torch.randn(B, nkv, T, hs)
    kk, vv = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)

    def reference(q, mask):
        att = (q @ kk.transpose(-2, -1)) / math.sqrt(hs)
        return att.masked_fill(~mask, float('-inf')).softmax(-1) @ vv
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    ragged = torch.rand(B, 1, T, T) > 0.3
    ragged[..., 0] = True  # every query sees at least one key
    ek, ev = expand_kv(k, v, nh)  # what CUDA takes when flash cannot: the plain kernels over expanded heads
    for mask, causal_flag, want in [(None, True, reference(q, causal)), (ragged, False, reference(q, ragged))]:
        assert torch.allclose(attention(q, k, v, mask, causal_flag), want, atol=1e-5)
        assert torch.allclose(F.scaled_dot_product_attention(q, ek, ev, attn_mask=mask, is_causal=causal_flag), want,
                              atol=1e-5)
    # one decode token per row, each with its own visible length: the grouped form the KV cache uses
    qd = torch.randn(B, nh, 1, hs)
    lens = torch.tensor([3, 7, 5])
    mask = (torch.arange(T)[None, :] < lens[:, None]).view(B, 1, 1, T)
    grouped = F.scaled_dot_product_attention(qd.reshape(B, nkv, nh // nkv, hs), k, v, attn_mask=mask)
    assert torch.allclose(grouped.reshape(B, nh, 1, hs), reference(qd, mask), atol=1e-5)
