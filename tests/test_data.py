"""data.py and cleaning.py: cleaning on a corpus with planted duplicates, PII and junk; nanoGPT's
shakespeare_char split; the streaming `text` pipeline against a serial reference; downloads with and
without a mirror or network; the SFT / preference readers. Data comes from NANOLAB_DATA_MIRROR (conftest)."""
import gzip
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import requests

from nanolab import cleaning, datasets, downloads, formats
from nanolab.configurator import read_settings
from nanolab.tokenizer import from_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_rng = random.Random(0)
CONTENT = sorted({''.join(_rng.choice('bcdfghklmnprstvwaeiou') for _ in range(_rng.randint(4, 9))) for _ in range(900)})
FUNCTION = ['the', 'a', 'of', 'and', 'to', 'in', 'was', 'it', 'he', 'she', 'with', 'for', 'on', 'that', 'they']


def english_like(rng, n_words):
    """Random prose: ~40% English function words, sentences of 6-14 words, paragraphs of 4 sentences."""
    sentences = []
    while sum(len(s) for s in sentences) < n_words:
        sentences.append([rng.choice(FUNCTION) if rng.random() < 0.4 else rng.choice(CONTENT)
                          for _ in range(rng.randint(6, 14))])
    text = [' '.join(s).capitalize() + '.' for s in sentences]
    return '\n\n'.join(' '.join(text[i:i + 4]) for i in range(0, len(text), 4))


def shingles(text):
    w = re.findall(r'[a-z0-9]+', text.lower())
    return {tuple(w[i:i + 5]) for i in range(len(w) - 4)}


def decode_docs(folder):
    """The documents in folder's train.bin and val.bin: the token stream split at <|endoftext|>."""
    meta = datasets.load_meta(folder)
    tok = from_spec(meta['tokenizer'])
    out = {}
    for split in ('train', 'val'):
        ids = np.fromfile(os.path.join(folder, f'{split}.bin'), dtype=meta['dtype'])
        cuts = np.flatnonzero(ids == tok.eot)
        out[split] = [tok.decode(p.tolist()) for p in np.split(ids, cuts + 1)]
        out[split] = [d.removesuffix('<|endoftext|>') for d in out[split]]
    return meta, out


PII = {  # planted item -> its placeholder
    'ada.lovelace@example.com': '<EMAIL>', 'j_smith+news@mail.co.uk': '<EMAIL>',
    '(555) 123-4567': '<PHONE>', '555-987-6543': '<PHONE>', '+44 20 7946 0958': '<PHONE>', '415.555.0100': '<PHONE>',
    '192.168.1.20': '<IP_ADDRESS>', '10.0.0.255': '<IP_ADDRESS>',
    '4111 1111 1111 1111': '<CARD_NUMBER>', '5500-0000-0000-0004': '<CARD_NUMBER>', '378282246310005': '<CARD_NUMBER>',
}
NOT_PII = '4111 1111 1111 1112'  # 16 digits that fail the Luhn check: an order number, must stay


def planted_corpus():
    """(docs in corpus order, expected cleaned distinct docs, planted counts)."""
    rng = random.Random(1)
    distinct = [english_like(rng, rng.randint(150, 250)) for _ in range(300)]
    distinct[7] = distinct[7].replace('.', ' at the cafe\u0301.', 1)  # decomposed é: NFC composes it
    expected = list(distinct)
    expected[7] = expected[7].replace('cafe\u0301', 'caf\u00e9')
    for i, item in enumerate(PII):  # PII in docs 20.., one or two items each, and the non-card number
        j = 20 + i % 8
        distinct[j] += f' You can reach {item} for the rest of it.'
        expected[j] += f' You can reach {PII[item]} for the rest of it.'
    distinct[30] += f' The order {NOT_PII} was on the way.'
    expected[30] += f' The order {NOT_PII} was on the way.'
    exact = [rng.choice(distinct[40:]) for _ in range(60)]
    exact[:10] = [d.replace('\n', '\r\n') + '  \n' for d in exact[:10]]  # identical after normalization
    near = []
    for _ in range(60):
        words = rng.choice(distinct[40:]).split(' ')
        for k in rng.sample(range(len(words)), 2):  # two words of ~200 changed: Jaccard ~0.9
            words[k] = rng.choice(CONTENT)
        near.append(' '.join(words))
    junk = {'symbols': [' '.join(''.join(rng.choice('#$%^&*@~|<>{}[]+=') for _ in range(5)) for _ in range(40))
                        for _ in range(5)],
            'repeated_lines': ['\n'.join(['The same line of the text is here again.'] * 20) for _ in range(5)],
            'too_short': ['Buy now!', 'Click here to read more.', '   ', 'ok'],
            'lang': ['Es war einmal ein kleiner Junge, der in einem Dorf am Rande des Waldes wohnte. Jeden Morgen '
                     'ging er mit seinen Freunden zur Schule, und am Abend las er gern Bücher über ferne Länder.',
                     "Il était une fois une petite fille qui vivait dans un village près de la forêt. Chaque matin, "
                     "elle allait à l'école avec son frère, et le soir elle lisait des livres sur les pays lointains.",
                     ' '.join(''.join(rng.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(rng.randint(3, 9)))
                              for _ in range(80))]}
    # originals first (so the first copy is the original), junk everywhere, copies after their originals
    first = distinct + junk['symbols'] + junk['too_short'][:2]
    rng.shuffle(first)
    rest = exact + near + junk['repeated_lines'] + junk['too_short'][2:] + junk['lang']
    rng.shuffle(rest)
    counts = {'exact': len(exact), 'near': len(near), 'crlf': 10, **{k: len(v) for k, v in junk.items()}}
    return first + rest, near, expected, counts


def test_cleaning_removes_planted_duplicates_pii_and_junk(tmp_path):
    docs, near, expected, planted = planted_corpus()
    originals = [shingles(e) for e in expected[40:]]
    for d in map(shingles, near):  # the near-duplicates really are near: Jaccard well above the 0.8 threshold
        assert 0.85 <= max(len(d & e) / len(d | e) for e in originals) < 1
    path = tmp_path / 'corpus.jsonl'
    path.write_text(''.join(json.dumps({'text': d}) + '\n' for d in docs))
    folder = datasets.prepare('text', data_dir=str(tmp_path), input=str(path), tokenizer='gpt2', num_proc=1)
    meta, out = decode_docs(folder)
    kept = out['train'] + out['val']
    assert len(out['val']) > 0 and meta['dtype'] == 'uint16'
    # every distinct document is kept, cleaned, exactly once; nothing else survives
    assert Counter(kept) == Counter(expected), 'a distinct document was dropped or a duplicate/junk survived'
    surviving_dups = len(kept) - len(expected)
    assert surviving_dups < 0.01 * (planted['exact'] + planted['near'])
    text = '\n'.join(kept)
    for item, placeholder in PII.items():
        assert item not in text
    assert NOT_PII in text  # Luhn-invalid: not a card
    want = Counter(PII.values())
    assert {p: text.count(p) for p in want} == dict(want)
    # the counts in meta.json are the planted ones
    c = meta['cleaning']
    assert c['docs_in'] == len(docs) and c['docs_out'] == len(expected)
    assert c['dedup']['removed'] == planted['exact'] and c['near_dedup']['removed'] == planted['near']
    assert c['quality'] == {'symbols': planted['symbols'], 'repeated_lines': planted['repeated_lines'],
                            'too_short': planted['too_short'] - 1, 'removed': 13}
    assert c['empty'] == {'removed': 1}  # '   ' is empty once normalized
    assert c['lang_filter']['removed'] == planted['lang']
    assert c['normalize']['changed'] == 1 + planted['crlf'] + 1  # é, the CRLF copies, '   ' stripped
    assert c['pii'] == {'docs_changed': 8, 'email': 2, 'phone': 4, 'ip': 2, 'card': 3}


def test_shakespeare_char_matches_nanogpt(tmp_path, capsys):
    folder = datasets.prepare('shakespeare_char', data_dir=str(tmp_path))
    meta = datasets.load_meta(folder)
    assert (meta['vocab_size'], meta['train_tokens'], meta['val_tokens']) == (65, 1_003_854, 111_540)
    train = np.memmap(os.path.join(folder, 'train.bin'), dtype=np.uint16, mode='r')
    assert len(train) == 1_003_854
    with open(os.path.join(os.environ['NANOLAB_DATA_MIRROR'], 'tinyshakespeare/input.txt')) as f:
        text = f.read()
    assert from_spec(meta['tokenizer']).decode(train[:100].tolist()) == text[:100]
    before = os.stat(os.path.join(folder, 'train.bin')).st_mtime_ns
    capsys.readouterr()
    assert datasets.prepare('shakespeare_char', data_dir=str(tmp_path)) == folder  # the second call: no work
    assert 'up to date' in capsys.readouterr().out
    assert os.stat(os.path.join(folder, 'train.bin')).st_mtime_ns == before


def test_text_pipeline_bpe_parallel_equals_serial(tmp_path, monkeypatch):
    rng = random.Random(2)
    docs = [english_like(rng, rng.randint(40, 120)) for _ in range(60)]
    docs += docs[:5]  # duplicates, for the dedup step
    (tmp_path / 'in').mkdir()
    (tmp_path / 'in' / 'a.jsonl').write_text(''.join(json.dumps({'body': d}) + '\n' for d in docs[:40]))
    (tmp_path / 'in' / 'b.txt').write_text('<|endoftext|>'.join(docs[40:]))  # <|endoftext|> splits documents
    monkeypatch.setattr(datasets, 'CHUNK_CHARS', 3000)  # many chunks, so the workers really share the work
    opts = dict(data_dir=str(tmp_path), input=str(tmp_path / 'in'), text_field='body', tokenizer='bpe',
                vocab_size=300, val_fraction=0.2)
    serial = datasets.prepare('text', out_name='serial', num_proc=1, **opts)
    datasets.prepare('text', out_name='parallel', num_proc=2, **opts)
    for f in ('train.bin', 'val.bin'):
        assert (tmp_path / 'serial' / f).read_bytes() == (tmp_path / 'parallel' / f).read_bytes()
    meta, out = decode_docs(serial)
    assert meta['dtype'] == 'uint16' and meta['vocab_size'] == 300
    assert os.path.getsize(os.path.join(serial, 'train.bin')) == 2 * meta['train_tokens']
    defaults = read_settings(datasets.DATA_SCRIPT)  # data.py's settings
    cfg = {k: defaults[k] for k in datasets.CLEAN_KEYS}
    want = list(cleaning.clean_corpus(docs, cfg, Counter()))
    assert len(want) == 60  # the 5 copies went
    is_val = [formats.in_val(cleaning.doc_key(d), 0.2, defaults['seed']) for d in want]
    assert out['train'] == [d for d, v in zip(want, is_val) if not v]
    assert out['val'] == [d for d, v in zip(want, is_val) if v]


def test_fetch_mirror_checksum_and_offline(tmp_path, monkeypatch):
    mirror = tmp_path / 'mirror'
    (mirror / 'set').mkdir(parents=True)
    (mirror / 'set' / 'a.txt').write_text('hello')
    good = '2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824'  # sha256('hello')
    monkeypatch.setenv('NANOLAB_DATA_MIRROR', str(mirror))
    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise requests.ConnectionError('no network')
    monkeypatch.setattr(requests, 'get', offline)
    monkeypatch.setattr(downloads.time, 'sleep', lambda s: None)
    cache = str(tmp_path / 'cache')
    assert downloads.fetch('set/a.txt', 'https://example.com/a.txt', good, cache_dir=cache) == str(mirror / 'set' / 'a.txt')
    with pytest.raises(ValueError, match='wrong sha256'):
        downloads.fetch('set/a.txt', 'https://example.com/a.txt', '0' * 64, cache_dir=cache)
    assert calls == []  # a mirror hit never touches the network
    with pytest.raises(ValueError) as e:
        downloads.fetch('set/missing.txt', 'https://example.com/missing.txt', cache_dir=cache)
    assert 'NANOLAB_DATA_MIRROR' in str(e.value) and 'set/missing.txt' in str(e.value) and 'internet' in str(e.value)
    assert len(calls) == 3  # retried

    class Response:  # a streamed download, to check the cache copy and the checksum
        headers = {'content-length': '5'}
        def __enter__(self): return self
        def __exit__(self, *a): pass
        def raise_for_status(self): pass
        def iter_content(self, n): yield from (b'hel', b'lo')
    monkeypatch.setattr(requests, 'get', lambda *a, **k: Response())
    with pytest.raises(ValueError, match='sha256'):
        downloads.fetch('set/new.txt', 'https://example.com/new.txt', '0' * 64, cache_dir=cache)
    assert not os.path.exists(os.path.join(cache, 'set/new.txt'))  # a bad download is not kept
    path = downloads.fetch('set/new.txt', 'https://example.com/new.txt', good, cache_dir=cache)
    assert path == os.path.join(cache, 'set/new.txt') and open(path).read() == 'hello'


def write(path, rows, jsonl=True):
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows) if jsonl else json.dumps(rows))
    return str(path)


def test_read_sft_formats(tmp_path):
    alpaca = write(tmp_path / 'a.json', [{'instruction': 'Add.', 'input': '2 and 3', 'output': '5'},
                                         {'instruction': 'Hi', 'input': '', 'output': 'Hello'},
                                         {'instruction': 'Empty', 'input': '', 'output': '  '}], jsonl=False)
    counts = Counter()
    assert formats.read_sft(alpaca, counts) == [
        {'messages': [{'role': 'user', 'content': 'Add.\n\n2 and 3'}, {'role': 'assistant', 'content': '5'}]},
        {'messages': [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'}]}]
    assert counts['skipped_empty'] == 1
    share = write(tmp_path / 's.jsonl', [{'conversations': [{'from': 'system', 'value': 'Be brief.'},
                                                            {'from': 'human', 'value': 'Hi'}, {'from': 'gpt', 'value': 'Yo'}]}])
    msgs = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Yo'}]
    assert formats.read_sft(share) == [{'messages': msgs}]
    assert formats.read_sft(write(tmp_path / 'm.jsonl', [{'messages': msgs}])) == [{'messages': msgs}]  # normalized: as is
    bad = tmp_path / 'bad.jsonl'
    bad.write_text(json.dumps({'messages': msgs}) + '\n{"messages": [\n')
    with pytest.raises(ValueError, match=r'bad.jsonl row 2: invalid JSON'):
        formats.read_sft(str(bad))
    with pytest.raises(ValueError, match=r'x.jsonl row 1: an SFT row needs'):
        formats.read_sft(write(tmp_path / 'x.jsonl', [{'question': 'q', 'answer': 'a'}]))
    with pytest.raises(ValueError, match=r'r.jsonl row 1: .*"role"'):
        formats.read_sft(write(tmp_path / 'r.jsonl', [{'messages': [{'role': 'robot', 'content': 'x'}]}]))


def test_read_preferences_formats(tmp_path):
    hh = tmp_path / 'hh.jsonl.gz'
    with gzip.open(hh, 'wt') as f:
        f.write(json.dumps({'chosen': '\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Joke?\n\nAssistant: A good one.',
                            'rejected': '\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Joke?\n\nAssistant: No.'}) + '\n')
        f.write(json.dumps({'chosen': '\n\nHuman: Hi\n\nAssistant: Same', 'rejected': '\n\nHuman: Hi\n\nAssistant: Same'}) + '\n')
    counts = Counter()
    rows = formats.read_preferences(str(hh), counts)
    assert rows == [{'prompt': [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'},
                                {'role': 'user', 'content': 'Joke?'}], 'chosen': 'A good one.', 'rejected': 'No.'}]
    assert counts == {'skipped_identical': 1}
    pair = write(tmp_path / 'p.json', [{'conversations': [{'from': 'human', 'value': 'Q'}],
                                        'chosen': {'from': 'gpt', 'value': 'good'}, 'rejected': {'from': 'gpt', 'value': 'bad'}}], jsonl=False)
    plain = write(tmp_path / 'plain.jsonl', [{'prompt': 'Q', 'chosen': 'good', 'rejected': 'bad'},
                                             {'prompt': 'Q', 'chosen': '', 'rejected': 'bad'}])
    want = [{'prompt': [{'role': 'user', 'content': 'Q'}], 'chosen': 'good', 'rejected': 'bad'}]
    assert formats.read_preferences(pair) == want
    counts = Counter()
    assert formats.read_preferences(plain, counts) == want and counts == {'skipped_empty': 1}
    assert formats.read_preferences(write(tmp_path / 'n.jsonl', want)) == want  # normalized: as is
    with pytest.raises(ValueError, match=r'q.jsonl row 2: a preference row needs "chosen" and "rejected"'):
        formats.read_preferences(write(tmp_path / 'q.jsonl', [want[0], {'prompt': 'Q', 'chosen': 'a'}]))


def test_sft_and_preference_sets_from_the_mirror(tmp_path):
    for name, fmt, total in (('alpaca', 'sft', 999), ('chat', 'sft', 500), ('dpo_pairs', 'preference', 300),
                             ('hh_rlhf', 'preference', 2312 - 9)):
        folder = datasets.prepare(name, data_dir=str(tmp_path))
        meta = datasets.load_meta(folder)
        assert meta['format'] == fmt and meta['train_rows'] + meta['val_rows'] == total and meta['val_rows'] > 0
        row = json.loads(open(os.path.join(folder, 'val.jsonl')).readline())
        assert set(row) == ({'messages'} if fmt == 'sft' else {'prompt', 'chosen', 'rejected'})
        reread = formats.read_sft if fmt == 'sft' else formats.read_preferences  # the output reads back unchanged
        assert reread(os.path.join(folder, 'val.jsonl'))[0] == row


def test_missing_dataset_and_cli_errors(tmp_path):
    with pytest.raises(ValueError, match='python data.py shakespeare_char'):
        datasets.load_meta(str(tmp_path / 'shakespeare_char'))
    with pytest.raises(ValueError, match=r'unknown dataset .*shakespeare_char'):
        datasets.prepare('shakespear_char', data_dir=str(tmp_path))
    r = subprocess.run([sys.executable, 'data.py', 'text', f'--data_dir={tmp_path}'], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith('error: `text` needs --input') and 'Traceback' not in r.stderr


def test_bench_times_the_pipeline_and_each_step(tmp_path):
    """`python data.py bench` on a tiny text: the whole pipeline's MB/s, then a row per step (cleaning, dedup,
    tokenizing with GPT-2's BPE and a trained 32k one, each beside Hugging Face `tokenizers`, whose ids agree)."""
    r = subprocess.run([sys.executable, 'data.py', 'bench', '--mb=0.3', '--num_proc=1', f'--data_dir={tmp_path}'],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert re.search(r'^bench: 0.3\d* MB in [\d.]+ s = [\d.]+ MB/s', r.stdout, re.M), r.stdout
    rows = dict(re.findall(r'^  (\S.*?) +[\d.]+ +([\d.]+)$', r.stdout, re.M))
    steps = ['1) normalize', '2) quality', '3) lang_filter', '4) pii', '1-4) together, as clean_doc',
             '5-6) minhash + LSH bands', '5-6) dedup: keys, index, checks', 'a worker: clean_doc, minhash, gpt2']
    steps += [f'{t}: {how}' for t in ('gpt2', '32k BPE') for how in ('tiktoken, as the workers', 'tokenizers (reference)')]
    assert all(float(rows[s]) > 0 for s in steps), r.stdout
    assert 'other ids' not in r.stdout


def test_bad_files_are_named_skipped_on_request_and_counted(tmp_path):
    """A folder with a Latin-1 file and a binary one: the default stops, naming the file and both ways out, and
    writes nothing; --on_bad_file=skip leaves it out and counts it in meta.json; --encoding=latin-1 reads it (its
    'é' in the vocabulary); a binary file is skipped and counted either way."""
    corpus = tmp_path / 'corpus'
    corpus.mkdir()
    words = 'the quick brown fox jumps over a lazy dog and runs far away from home'.split()
    for i in range(4):
        (corpus / f'doc{i}.txt').write_text('\n\n'.join(' '.join(words[(i + j) % len(words):] + words) for j in range(30)))
    (corpus / 'cafe.txt').write_bytes(('Le café ' + ' '.join(words * 3)).encode('latin-1'))
    (corpus / 'scan.txt').write_bytes(b'%PDF-1.4\x00\x01\x02' + bytes(range(256)) * 4)
    opts = dict(data_dir=str(tmp_path / 'data'), input=str(corpus), tokenizer='char', doc_split='paragraph',
                num_proc=1, quality=False, lang_filter=False, near_dedup=False)
    with pytest.raises(ValueError, match=r"cafe.txt is not utf-8 text \(byte 0xe9.*--encoding=latin-1.*--on_bad_file=skip"):
        datasets.prepare('text', **opts)
    assert not (tmp_path / 'data' / 'text' / 'meta.json').exists()
    (tmp_path / 'data' / 'text' / 'val.jsonl.tmp').write_bytes(b'\0' * 64)  # as a killed preparation leaves it
    meta = json.load(open(os.path.join(datasets.prepare('text', on_bad_file='skip', **opts), 'meta.json')))
    assert not list((tmp_path / 'data' / 'text').glob('*.tmp'))
    assert meta['source']['skipped_files'] == {'binary': 1, 'undecodable': 1} and meta['source']['files'] == 4
    assert 'é' not in meta['tokenizer']['chars']
    meta = json.load(open(os.path.join(datasets.prepare('text', encoding='latin-1', **opts), 'meta.json')))
    assert meta['source']['skipped_files'] == {'binary': 1, 'undecodable': 0} and 'é' in meta['tokenizer']['chars']


def test_a_preparation_that_fails_after_writing_leaves_no_temp_files(tmp_path):
    """Every document dropped by cleaning: the train split gets no tokens, and the error comes after both .bin.tmp
    files were written: they go (they were left behind, a corpus' worth of tokens)."""
    corpus = tmp_path / 'corpus'
    corpus.mkdir()
    for i in range(60):
        (corpus / f'{i}.txt').write_text(f'a short note {i} about a fox')  # under min_words
    with pytest.raises(ValueError, match='the train split got no tokens'):
        datasets.prepare('text', data_dir=str(tmp_path / 'data'), input=str(corpus), tokenizer='char', num_proc=1,
                         lang_filter=False, near_dedup=False)
    assert os.listdir(tmp_path / 'data' / 'text') == []


def test_one_text_file_is_a_corpus(tmp_path, capsys):
    """nanoGPT's first corpus, one input.txt, with default settings: too few documents to hold whole ones out, so val
    is the last 10% of the token stream by position (nanoGPT's prepare.py), the summary says so, and train + val
    is the whole file's tokens in order."""
    corpus = tmp_path / 'corpus'
    corpus.mkdir()
    text = open(os.path.join(os.environ['NANOLAB_DATA_MIRROR'], 'tinyshakespeare', 'input.txt')).read()[:200_000]
    (corpus / 'input.txt').write_text(text)
    folder = datasets.prepare('text', data_dir=str(tmp_path / 'data'), input=str(corpus), num_proc=1)
    meta = datasets.load_meta(folder)
    assert meta['source']['val'] == 'by position' and 'by position' in capsys.readouterr().out
    train, val = (np.fromfile(os.path.join(folder, f'{s}.bin'), np.uint16) for s in ('train', 'val'))
    assert len(val) == meta['val_tokens'] and abs(len(val) / (len(train) + len(val)) - 0.1) < 0.001
    assert from_spec(meta['tokenizer']).decode(np.concatenate([train, val]).tolist()) == cleaning.normalize(text)


def test_a_lone_surrogate_in_json_is_replaced_not_a_crash(tmp_path):
    """JSON may escape half a UTF-16 pair ("\\ud800"), which json.loads keeps as a lone surrogate that UTF-8 cannot
    hold: the document keeps going with U+FFFD in its place (it crashed the pipeline in hashing before)."""
    rows = [json.dumps({'text': f'document {i} says hello to everyone in the whole wide world today'})
            for i in range(60)] + ['{"text": "a broken \\ud800 pair in a document of many words, said twice over"}']
    (tmp_path / 'c.jsonl').write_text('\n'.join(rows))
    folder = datasets.prepare('text', data_dir=str(tmp_path / 'data'), input=str(tmp_path / 'c.jsonl'),
                              num_proc=1, quality=False, lang_filter=False, near_dedup=False)
    meta = datasets.load_meta(folder)
    tok = from_spec(meta['tokenizer'])
    text = ''.join(tok.decode(np.fromfile(os.path.join(folder, f'{s}.bin'), np.uint16).tolist())
                   for s in ('train', 'val'))
    assert 'a broken \ufffd pair' in text, text[text.find('broken') - 20:][:60]
