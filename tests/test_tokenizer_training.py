"""tokenizer_training.py (`python data.py tokenizer`) against references: every byte of a multilingual text round
trips; transformers loads the directory with our ids; a dataset made with --tokenizer=tokenizers/NAME holds the
tokens of its cleaned text; the GGUF export reads back (and llama.cpp tokenizes alike, given a build); our own
BPE learns the same merges as `tokenizers` on text whose pair counts never tie (a naive BPE, recounting every
pair at every step, finds where they first tie); bad input gets one line. Vocabularies of 600: a few s each."""
import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import regex
import torch

from model import GPT, GPTConfig
from nanolab import datasets, gguf_export, gguf_import, llama_cpp, tokenizer_training
from nanolab.cleaning import clean_corpus
from nanolab.downloads import fetch_source
from nanolab.tokenizer import EOT, GPT2_SPLIT_PATTERN, BPETokenizer, HFTokenizer, bytes_to_unicode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# accents (composed and combining), CJK, Hangul, RTL, emoji (skin tone, ZWJ family, flags), control chars, a BOM,
# zero-width and bidi marks, U+FFFD, CRLF, tabs and whitespace runs, and text that looks like special tokens
MIXED = ("Café naïve Ærø, cafe\u0301 — 日本語のテキスト, 中文分词, 한국어, مرحبا بالعالم, Привет мир!\n"
         "emoji 🙂 👍🏽 👨\u200d👩\u200d👧\u200d👦 🏳️\u200d🌈 🇫🇷; ctrl \x00\x01\x07\x1b[31m\x7f\x9f end"
         "\ufeff\u200b\u202eabc\u202c\ufffd\r\n\ttabs\t\t and  spaces   \n\n\n  trailing <|endoftext|> <|end|> "
         "0x1F 3.14159 I'll we've ")
MSGS = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'What is 2+2?'},
        {'role': 'assistant', 'content': 'It is 4.'}]


def stories(tmp, n):
    """The first n chars of the TinyStories train text (the mirror's subset offline)."""
    path, _ = fetch_source('tinystories_train', str(tmp))
    with open(path, encoding='utf-8') as f:
        return f.read(n)


def data_py(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'data.py'), *args], cwd=cwd, capture_output=True,
                          text=True)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """tokenizers/small: a 600-token BPE trained by the command on a .txt of stories and a .jsonl of mixed rows."""
    d = tmp_path_factory.mktemp('tok')
    (d / 'corpus').mkdir()
    (d / 'corpus' / 'stories.txt').write_text(stories(d, 300_000), encoding='utf-8')
    (d / 'corpus' / 'rows.jsonl').write_text(''.join(json.dumps({'text': MIXED * 3}) + '\n' for _ in range(20)))
    p = data_py('tokenizer', f'--input={d / "corpus"}', '--vocab_size=600', '--out_name=small', cwd=d)
    assert p.returncode == 0, p.stderr
    assert 'tokenizers/small: 600 tokens (bpe)' in p.stdout
    return d


def test_safe_cuts_keep_gpt2s_chunks():
    """A long document goes to the trainer in pieces cut at SAFE_CUT: the pieces' chunks are the whole text's."""
    texts = [MIXED, MIXED.replace(' ', '\n'), 'a  b\n\n c \u00a0d\te\r\nf.\x1c\x1c g\u3000h ' * 3, '  x', 'x  ', '\n']
    for text in texts:
        cuts = [m.start() for m in tokenizer_training.SAFE_CUT.finditer(text)]
        pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        assert len(pieces) > 1 or text in ('  x', '\n')
        assert [c for p in pieces for c in regex.findall(GPT2_SPLIT_PATTERN, p)] == \
            regex.findall(GPT2_SPLIT_PATTERN, text), repr(text)


@pytest.mark.parametrize('kind', ['bpe', 'unigram'])
def test_every_byte_round_trips(trained, tmp_path, kind):
    if kind == 'bpe':
        tok = HFTokenizer(str(trained / 'tokenizers' / 'small'))
        assert 'training.json' not in tok.files  # the training record stays out of specs and exports
    else:
        tk = tokenizer_training.train([stories(tmp_path, 100_000), MIXED], 600, 'unigram')
        tok = HFTokenizer('', files=tokenizer_training.hf_files(tk))
    # the 256 bytes each have a token, the special tokens follow the learned vocabulary
    assert {tok.decode_bytes([i]) for i in range(tok.vocab_size - 5)} >= {bytes([b]) for b in range(256)}
    assert tok.vocab_size == 600 and tok.eot == 595 and tok.special_tokens['<|end|>'] == 599
    for text in [MIXED, MIXED[::-1], ''.join(map(chr, range(1, 0x250))), '']:
        ids = tok.encode(text)
        assert tok.decode(ids) == text and b''.join(tok.decode_bytes([i]) for i in ids) == text.encode('utf-8')
        assert EOT not in [tok.decode([i]) for i in ids]  # typed special tokens stay text
    if kind == 'bpe':
        # data.py's workers encode through tiktoken (HFTokenizer.to_tiktoken): the same ids as `tokenizers`
        fast = HFTokenizer(tok.name)
        assert fast.to_tiktoken() is not None
        for text in [MIXED, stories(tmp_path, 20_000)]:
            assert fast.encode(text) == tok.encode(text)
        # a tokenizers BPE whose special tokens come first is not GPT-2's layout: it keeps `tokenizers`
        j = json.loads(tok.files['tokenizer.json'])
        j['model']['vocab'] = {t: (i + 5) % 600 for t, i in j['model']['vocab'].items()}
        assert HFTokenizer('', files={'tokenizer.json': json.dumps(j)}).to_tiktoken() is None


def test_transformers_loads_it_with_our_ids(trained):
    from transformers import AutoTokenizer
    folder = str(trained / 'tokenizers' / 'small')
    hf, ours = AutoTokenizer.from_pretrained(folder), HFTokenizer(folder)
    text = MIXED.replace('<|endoftext|> <|end|>', '')  # transformers finds special tokens in text; we do not
    assert hf.encode(text, add_special_tokens=False) == ours.encode(text)
    assert hf.decode(ours.encode(text)) == text and hf.eos_token_id == ours.eot
    theirs = hf.apply_chat_template(MSGS, tokenize=True, return_dict=True)['input_ids']
    assert theirs == ours.render_chat(MSGS)[0] and ours.special_tokens['<|assistant|>'] in theirs


def test_a_dataset_in_the_trained_tokenizer(trained, tmp_path):
    """python data.py text --tokenizer=tokenizers/small: train.bin decodes to the cleaned documents, joined by
    <|endoftext|>; the workers' fast path (tiktoken) gives the tokenizer's own ids."""
    text = stories(tmp_path, 60_000)
    docs = [d for d in text.split('\n\n') if len(d.split()) > 30][:40]
    docs[1] = docs[1].replace('e', 'e\u0301', 3) + ' Mail me: jo@example.com.'  # cleaning: NFC, <EMAIL>
    docs.append(docs[2])  # an exact duplicate, dropped
    with open(tmp_path / 'in.jsonl', 'w', encoding='utf-8') as f:
        f.writelines(json.dumps({'text': d}) + '\n' for d in docs)
    opts = dict(data_dir=str(tmp_path / 'data'), input=str(tmp_path / 'in.jsonl'), val_fraction=0.0, num_proc=2,
                tokenizer=str(trained / 'tokenizers' / 'small'))
    folder = datasets.prepare('text', **opts)
    meta = datasets.load_meta(folder)
    tok = HFTokenizer(opts['tokenizer'])
    assert meta['tokenizer'] == tok.spec() and meta['vocab_size'] == 600 and meta['dtype'] == 'uint16'
    cfg = datasets._config(opts)
    cleaned = list(clean_corpus(docs, {k: cfg[k] for k in datasets.CLEAN_KEYS}, Counter()))
    assert len(cleaned) == len(docs) - 1 and '<EMAIL>' in cleaned[1] and 'é' in cleaned[1]
    train = np.fromfile(os.path.join(folder, 'train.bin'), dtype=np.uint16).tolist()
    assert tok.decode(train) == EOT.join(cleaned)
    assert train == sum(([tok.eot] * (i > 0) + tok.encode(d) for i, d in enumerate(cleaned)), [])
    assert datasets.prepare('text', **opts) == folder  # up to date: same settings, same tokenizer files


def test_gguf_export_reads_back(trained, tmp_path):
    """A tiny Llama in the trained tokenizer: the GGUF file's tokenizer (rebuilt by transformers' GGUF converter)
    encodes as ours; with a llama.cpp build ($NANOLAB_LLAMA_CPP), llama.cpp's tokens and greedy path are ours."""
    tok = HFTokenizer(str(trained / 'tokenizers' / 'small'))
    torch.manual_seed(0)
    model = GPT(GPTConfig(arch='llama', n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=tok.vocab_size))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)  # sharp weights: greedy margins dwarf float noise
    gguf_export.write_gguf(model, tok, str(tmp_path / 'm.gguf'))
    config, tensors, files = gguf_import.read_gguf(str(tmp_path / 'm.gguf'))
    back = HFTokenizer('', files=files)
    assert config['vocab_size'] == 600 and back.eot == tok.eot
    text = MIXED.replace('<|endoftext|> <|end|>', '')
    assert back.encode(text) == tok.encode(text) and back.decode(tok.encode(text)) == text
    build = llama_cpp.build_dir()
    if not os.path.exists(os.path.join(build, 'bin', 'llama-server')):
        pytest.skip('set NANOLAB_LLAMA_CPP to a llama.cpp build for its half of the check')
    r = llama_cpp.check_llama_cpp(str(tmp_path / 'm.gguf'), model, tok, build, 'Once upon a time, café 日本 🙂',
                                  n=16)
    assert r['tokenize_equal'] and r['agree'] == r['n'] == 16, r


def naive_merges(text, n):
    """Textbook BPE on GPT-2's chunks, every pair recounted at every step -> the byte-pair merges learned before
    the first step whose top count is tied (at most n)."""
    words = Counter(tuple(bytes([b]) for b in c.encode('utf-8')) for c in regex.findall(GPT2_SPLIT_PATTERN, text))
    merges = []
    while len(merges) < n:
        pairs = Counter()
        for w, k in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += k
        (top, count), (_, runner_up) = pairs.most_common(2)
        if count == runner_up:
            break
        merges.append(top)
        new = Counter()
        for w, k in words.items():
            out, i = [], 0
            while i < len(w):
                joined = i + 1 < len(w) and (w[i], w[i + 1]) == top
                out.append(w[i] + w[i + 1] if joined else w[i])
                i += 2 if joined else 1
            new[tuple(out)] += k
        words = new
    return merges


def test_our_bpe_learns_the_merges_of_tokenizers(tmp_path):
    """On 1 MB of stories up to their first tied pair count (~100 merges offline), bpe_training.py, the naive BPE
    and `tokenizers` (configured as tokenizer_training.train does) learn the same merges, in the same order. After
    a tie they may part: ours takes the smallest byte ids, `tokenizers` its own, which number bytes differently."""
    text = stories(tmp_path, 1_000_000)
    expected = naive_merges(text, 300)
    assert len(expected) >= 40  # enough merges to compare: multi-level, space-prefixed, across words
    vocab_size = 256 + len(expected) + len(tokenizer_training.SPECIALS)
    ours = BPETokenizer.train(text, vocab_size)
    assert [(ours.vocab[a], ours.vocab[b]) for a, b in ours.merges] == expected
    tk = tokenizer_training.train([text], vocab_size)
    u2b = {c: b for b, c in bytes_to_unicode().items()}
    theirs = [tuple(bytes(u2b[c] for c in s) for s in m) for m in json.loads(tk.to_str())['model']['merges']]
    assert theirs == expected
    assert tk.get_vocab_size() == ours.vocab_size and tk.token_to_id(EOT) == ours.eot
    assert tokenizer_training.train([text], vocab_size).to_str() == tk.to_str()  # deterministic


def test_bad_input_gets_one_line(trained, tmp_path):
    small, corpus = f'--input={trained / "corpus"}', str(trained / 'corpus')
    (tmp_path / 'empty.txt').write_text('\n \n')
    cases = [(['--kind=wordpiece', small], "kind='wordpiece'"),
             (['--vocab_size=200', small], 'vocab_size=200 is too small: raise it to at least 261'),
             ([f'--input={tmp_path / "empty.txt"}'], 'holds no text to learn from'),
             ([small, '--out_name=small', '--vocab_size=700'], 'tokenizers/small already holds a tokenizer'),
             (['--input=', '--out_name=x'], '`tokenizer` needs --input')]
    for args, message in cases:
        p = data_py('tokenizer', *args, cwd=trained)
        assert p.returncode == 1 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    p = data_py('tokenizer', small, '--out_name=small', '--vocab_size=600', cwd=trained)  # the same: kept
    assert p.returncode == 0 and 'up to date' in p.stdout
    p = data_py('text', f'--input={corpus}', '--tokenizer=tokenizers/nope', f'--data_dir={tmp_path}', cwd=trained)
    assert p.returncode == 1 and "no tokenizer.json there" in p.stderr and 'data.py tokenizer' in p.stderr, p.stderr
    with pytest.raises(ValueError, match='give more text'):  # more merges than the text holds
        tokenizer_training.train(['ab ab abc'], 300)
    assert not os.path.exists(trained / 'tokenizers' / 'x') and os.listdir(trained / 'tokenizers') == ['small']
