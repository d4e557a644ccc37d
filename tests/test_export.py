"""export.py against its readers: the GGUF file read back with the `gguf` package (every tensor equals ours, in f32
exactly, in f16 / q8_0 within their rounding; the Llama q/k permutation gives the same attention scores under
llama.cpp's interleaved RoPE as ours under 'rotate half'; the token list spells our vocabulary), the Hugging Face
directory through transformers (same logits), weights-only safetensors through load_model (same logits, no
optimizer state), and the refusals. With a llama.cpp build (NANOLAB_LLAMA_CPP=DIR holding bin/llama-server, as
../shared/tools/build-llama-cpp.sh makes), llama.cpp's tokens and greedy continuations equal ours. CPU, ~10 s."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from nanolab import gguf_export, llama_cpp
from model import GPTConfig
from nanolab.checkpoint import load_model
from test_serve import ROOT, save_run  # tests/ is on sys.path while pytest collects it
from nanolab.tokenizer import CharTokenizer, TiktokenTokenizer, bytes_to_unicode

gguf = pytest.importorskip('gguf')
CHARS = 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ :.,!?\n' + 'é€'  # two chars of 2 and 3 bytes
TEXT = 'Hello there, café! It costs €? No.\nUser: ok'


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """char: GPT-2 blocks, no biases (llama.cpp's gpt2 gets zeros), tied, chars of 1-3 bytes; ascii: the same of
    one-byte chars; bpe: Llama with GQA, untied, GPT-2's BPE."""
    d = tmp_path_factory.mktemp('runs')
    save_run(d / 'char', GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=128, vocab_size=len(CHARS), bias=False),
             CharTokenizer(chars=''.join(sorted(CHARS))))
    save_run(d / 'ascii', GPTConfig(n_layer=1, n_head=4, n_embd=64, block_size=64, vocab_size=len(CHARS) - 2),
             CharTokenizer(chars=''.join(sorted(CHARS[:-2]))))  # no merges at all
    save_run(d / 'bpe', GPTConfig(arch='llama', n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=64,
                                  tie_embeddings=False), TiktokenTokenizer('gpt2'))
    return d


def run_export(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'export.py'), *args], capture_output=True, text=True,
                          cwd=ROOT)


def tensors(path):
    """{name: float32 array in numpy (out, in) order} of a GGUF file, dequantized by the gguf package."""
    from gguf.quants import dequantize
    r = gguf.GGUFReader(path)
    out = {}
    for t in r.tensors:
        a = dequantize(t.data, t.tensor_type).astype(np.float32)
        out[t.name] = a.reshape([int(n) for n in reversed(t.shape)])  # ggml lists dims innermost first
    return r, out


@pytest.mark.parametrize('name, outtype, tol', [('char', 'f32', 0.0), ('char', 'f16', 1e-3), ('char', 'q8_0', 1 / 127),
                                                ('bpe', 'f32', 0.0)])  # subtle: GGUFReader takes 5 s over 50k tokens
def test_gguf_tensors_read_back_equal_ours(runs, tmp_path, name, outtype, tol):
    model, tok, _ = load_model(str(runs / name))
    gguf_export.write_gguf(model, tok, f'{tmp_path}/m.gguf', outtype)  # the CLI's path is tested below
    r, got = tensors(f'{tmp_path}/m.gguf')
    want = dict(gguf_export.gguf_tensors(model))
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        scale = np.abs(w).max() if w.ndim > 1 else 0  # 1-D tensors stay f32 whatever outtype
        assert got[k].shape == w.shape and np.abs(got[k] - w).max() <= tol * scale + 1e-7, k
    # the keys llama.cpp reads, and a token list that spells our vocabulary
    field = lambda key: r.get_field(key).contents()  # noqa: E731
    c = model.config
    arch = field('general.architecture')
    assert arch == c.arch and field(f'{arch}.context_length') == c.block_size and field(f'{arch}.block_count') == 2
    assert field(f'{arch}.attention.head_count_kv') == c.n_kv_head and field('tokenizer.ggml.model') == 'gpt2'
    u2b = {ch: b for b, ch in bytes_to_unicode().items()}
    toks = field('tokenizer.ggml.tokens')
    assert len(toks) == c.vocab_size
    for i in list(range(min(tok.vocab_size, 300))) + [tok.vocab_size - 1]:
        spelled = toks[i].encode() if i in tok.special_tokens.values() else bytes(u2b[ch] for ch in toks[i])
        assert spelled == tok.decode_bytes([i]), i
    if name == 'bpe':  # padding rows past the tokenizer's ids are UNUSED; the chat tokens are CONTROL
        types = field('tokenizer.ggml.token_type')
        assert types[tok.special_tokens['<|end|>']] == gguf.TokenType.CONTROL and types[-1] == gguf.TokenType.UNUSED
        assert field('tokenizer.ggml.eos_token_id') == tok.eot and '<|assistant|>' in field('tokenizer.chat_template')


def interleaved_rope(x, theta):
    """RoFormer's rotation as llama.cpp applies it: dims (2i, 2i+1) turn by pos * theta^(-2i/hs). x: (T, nh, hs)."""
    T, _, hs = x.shape
    ang = torch.arange(T)[:, None].float() * theta ** (-torch.arange(0, hs, 2).float() / hs)  # (T, hs/2)
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


def test_gguf_llama_qk_permutation_gives_our_attention_scores(runs):
    """Our q/k use 'rotate half'; llama.cpp rotates adjacent pairs. With the permuted rows, its q.k equal ours."""
    from model import apply_rope, rope_tables
    model, _, _ = load_model(str(runs / 'bpe'))
    c, t = model.config, dict(gguf_export.gguf_tensors(model))
    x = torch.randn(10, c.n_embd)
    q, k, _ = (x @ model.transformer.h[0].attn.c_attn.weight.T).split([c.n_embd, c.n_kv_head * c.head_size, c.n_kv_head * c.head_size], -1)
    cos, sin = (a[:10] for a in rope_tables(c))
    ours_q = apply_rope(q.view(1, 10, c.n_head, -1).transpose(1, 2), cos, sin)[0]  # (nh, T, hs)
    ours_k = apply_rope(k.view(1, 10, c.n_kv_head, -1).transpose(1, 2), cos, sin)[0]
    their_q = interleaved_rope((x @ torch.from_numpy(t['blk.0.attn_q.weight']).T).view(10, c.n_head, -1), c.rope_theta)
    their_k = interleaved_rope((x @ torch.from_numpy(t['blk.0.attn_k.weight']).T).view(10, c.n_kv_head, -1), c.rope_theta)
    g = c.n_head // c.n_kv_head
    ours = ours_q @ ours_k.repeat_interleave(g, 0).transpose(1, 2)
    theirs = their_q.transpose(0, 1) @ their_k.transpose(0, 1).repeat_interleave(g, 0).transpose(1, 2)
    assert torch.allclose(ours, theirs, atol=1e-4) and not torch.allclose(ours, ours_q @ ours_q.transpose(1, 2))


def test_hf_export_loads_in_transformers_with_our_logits(runs, tmp_path):
    """A char-level GPT-2 of ASCII chars: transformers' logits and tokens equal ours; its model card goes along."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    ascii_chars = ''.join(sorted(CHARS[:-2]))
    save_run(tmp_path / 'run', GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=128, vocab_size=len(ascii_chars)),
             CharTokenizer(chars=ascii_chars))
    (tmp_path / 'run' / 'README.md').write_text('# the model card\n')
    p = run_export(f'--init_from={tmp_path / "run"}', '--format=hf')  # --out: inside the run
    assert p.returncode == 0, p.stderr
    out = tmp_path / 'run' / 'hf'
    config = json.load(open(out / 'config.json'))
    assert config['n_ctx'] == config['n_positions'] == 128  # the key llama.cpp's converter reads (KeyError before)
    assert (out / 'README.md').read_text() == '# the model card\n'
    model, tok, _ = load_model(str(tmp_path / 'run'))
    ids = torch.tensor([tok.encode('Hello there, you')])
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.allclose(theirs(ids).logits, model(ids)[0], atol=1e-4)
    assert AutoTokenizer.from_pretrained(out).encode('Hello there, you', add_special_tokens=False) == ids[0].tolist()
    # an existing --out is kept unless --overwrite=True
    p = run_export(f'--init_from={tmp_path / "run"}', '--format=hf')
    assert p.returncode == 1 and '--overwrite=True' in p.stderr and (out / 'config.json').exists()
    # a char vocabulary with chars of several bytes ('é', '€'): its tokenizer exports too, and transformers and our
    # loader both read the text back (an HF directory without it encoded 'Reverse kfeo' to [] before)
    p = run_export(f'--init_from={runs / "char"}', '--format=hf', f'--out={tmp_path}/hf2')
    assert p.returncode == 0, p.stderr
    model, tok, _ = load_model(str(runs / 'char'))
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / 'hf2')
    assert hf_tok.encode(TEXT, add_special_tokens=False) == tok.encode(TEXT) and hf_tok.decode(tok.encode(TEXT)) == TEXT
    back, tok2, _ = load_model(str(tmp_path / 'hf2'))
    ids = torch.tensor([tok.encode(TEXT)])
    assert tok2.encode(TEXT) == ids[0].tolist() and torch.allclose(back(ids)[0], model(ids)[0], atol=1e-5)


def test_safetensors_is_weights_only_and_loads_back(runs, tmp_path):
    p = run_export(f'--init_from={runs / "bpe"}', '--format=safetensors', '--outtype=bf16', f'--out={tmp_path}/w.safetensors')
    assert p.returncode == 0, p.stderr
    model, tok, _ = load_model(str(runs / 'bpe'))
    back, tok2, ckpt = load_model(str(tmp_path / 'w.safetensors'))
    assert tok2.spec() == tok.spec() and 'optimizer' not in ckpt
    ids = torch.tensor([tok.encode('Hello there')])
    with torch.no_grad():  # the weights rounded to bf16, as stored (the RoPE tables are not weights)
        for w in model.parameters():
            w.copy_(w.to(torch.bfloat16))
    want = model(ids)[0]
    assert torch.allclose(back(ids)[0], want, atol=1e-5)
    n = sum(v.numel() for k, v in model.state_dict().items())
    assert os.path.getsize(tmp_path / 'w.safetensors') < 2 * n + 20_000  # 2 bytes a weight, plus the header


def test_export_refuses(runs, tmp_path):
    # 1) a tokenizer with ids the embedding has no rows for: GPT-2's BPE + chat tokens on a 50257-row model
    save_run(tmp_path / 'small', GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50257),
             TiktokenTokenizer('gpt2'))
    for fmt in ('gguf', 'hf'):
        p = run_export(f'--init_from={tmp_path / "small"}', f'--format={fmt}', f'--out={tmp_path}/x')
        assert p.returncode == 1 and 'beyond the model' in p.stderr and not os.path.exists(tmp_path / 'x'), p.stderr
    # 2) q8_0 is a GGUF format; sinusoidal positions are in neither architecture; a typo is a config error
    p = run_export(f'--init_from={runs / "char"}', '--format=hf', '--outtype=q8_0', f'--out={tmp_path}/y')
    assert p.returncode == 1 and 'GGUF block format' in p.stderr
    save_run(tmp_path / 'sin', GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=len(CHARS),
                                         positions='sinusoidal'), CharTokenizer(chars=''.join(sorted(CHARS))))
    p = run_export(f'--init_from={tmp_path / "sin"}', '--format=gguf', f'--out={tmp_path}/z.gguf')
    assert p.returncode == 1 and "positions='sinusoidal'" in p.stderr
    # 3) q/k/v biases are Hugging Face's qwen2, whose tokenizer transformers 5 always builds as Qwen2Tokenizer:
    #    GPT-2's BPE would tokenize differently there (' 123': 3 ids, not 1), so the export is refused
    save_run(tmp_path / 'q2', GPTConfig(arch='llama', n_layer=1, n_head=2, n_embd=32, block_size=16,
                                        vocab_size=50304, qkv_bias=True), TiktokenTokenizer('gpt2'))
    p = run_export(f'--init_from={tmp_path / "q2"}', '--format=hf', f'--out={tmp_path}/q2hf')
    assert p.returncode == 1 and 'Qwen2Tokenizer' in p.stderr and not os.path.exists(tmp_path / 'q2hf'), p.stderr


LLAMA_CPP = llama_cpp.build_dir()  # $NANOLAB_LLAMA_CPP


@pytest.mark.skipif(not os.path.exists(os.path.join(LLAMA_CPP, 'bin', 'llama-server')),
                    reason='set NANOLAB_LLAMA_CPP to a llama.cpp build (bash ../shared/tools/build-llama-cpp.sh DIR)')
@pytest.mark.parametrize('name', ['char', 'ascii', 'bpe'])
def test_llama_cpp_tokens_and_greedy_equal_ours(runs, tmp_path, name):
    model, tok, _ = load_model(str(runs / name))
    gguf_export.write_gguf(model, tok, f'{tmp_path}/m.gguf')
    text = {'char': TEXT, 'ascii': 'Hello there, you!\nUser: ok', 'bpe': 'The café costs 3€; ok? ' * 2}[name]
    r = llama_cpp.check_llama_cpp(f'{tmp_path}/m.gguf', model, tok, LLAMA_CPP, text, n=24)
    assert r['tokenize_equal'] and r['agree'] == 24, r
