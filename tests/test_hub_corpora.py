"""Hub corpora (nanolab/hub_corpora.py), offline: tiny corpora written here in the Hub's formats (parquet, JSON lines,
.json.gz) into a mirror of our own. Slices against the source rows decoded back, WikiText's rows joined into articles,
a preparation killed half-way resumed to the same bytes as an uninterrupted one, 2 workers against 1, the errors
without a copy or the network, train.py's refusal to stream, and the disk check."""
import contextlib
import gzip
import json
import os
import random
import runpy
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest

from nanolab import datasets, hub_corpora
from nanolab.cleaning import doc_key
from nanolab.formats import in_val
from nanolab.tokenizer import from_spec
from test_data import decode_docs as decode  # tests/ is on sys.path while pytest collects it

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = 'the a of and to in was it he she cat dog ran far home big small tree sun moon café naïve 東京'.split()


def docs(n, seed=0):
    """n documents of random words (some non-ASCII), 10 to 120 words each, some over several lines."""
    rng = random.Random(seed)
    return [' '.join(rng.choice(WORDS) + ('\n' if rng.random() < 0.05 else '') for _ in range(rng.randint(10, 120)))
            for _ in range(n)]


def shards(mirror, name, files):
    """Write {filename: rows} as the Hub would hold name's shards, under mirror/hub/<repo>/<config>/."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    folder = os.path.join(mirror, 'hub', hub_corpora.CORPORA[name].repo, hub_corpora.CORPORA[name].config or 'default')
    os.makedirs(folder, exist_ok=True)
    for filename, rows in files.items():
        path = os.path.join(folder, filename)
        if filename.endswith('.parquet'):  # with another column, as the Hub's have (url, id, score, ...)
            pq.write_table(pa.table({'text': rows, 'id': [str(i) for i in range(len(rows))]}), path)
        else:
            with (gzip.open(path, 'wt', encoding='utf-8') if path.endswith('.gz') else open(path, 'w')) as f:
                f.writelines(json.dumps({'text': r, 'url': 'x'}) + '\n' for r in rows)


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """An empty mirror of this test's own; chunks of ~2,000 chars, so a tiny corpus makes many of them."""
    monkeypatch.setenv('NANOLAB_DATA_MIRROR', str(tmp_path / 'mirror'))
    monkeypatch.setattr(hub_corpora, 'CHUNK_CHARS', 2000)
    return str(tmp_path / 'mirror')


@contextlib.contextmanager
def stopped_after(monkeypatch, k):
    """A Ctrl-C in the preparation when it has written and recorded k chunks, as the next one's tokens are on disk."""
    save, calls = hub_corpora._save, []

    def interrupted(folder, state):
        calls.append(1)
        if len(calls) > k:
            raise KeyboardInterrupt
        save(folder, state)
    monkeypatch.setattr(hub_corpora, '_save', interrupted)
    yield
    monkeypatch.setattr(hub_corpora, '_save', save)


def bins(folder):
    return [open(os.path.join(folder, f'{s}.bin'), 'rb').read() for s in ('train', 'val')]


def test_slices_from_the_mirror_decode_back_to_the_source_rows(mirror, tmp_path):
    """fineweb_edu (train only, two parquet shards): --max_docs=300 takes the first 300 rows, each where the
    per-document hash sends it. c4 (train JSONL, validation under c4's own .json.gz name): --max_tokens=3000 takes
    from each split its share (val_fraction 0.1 of it) up to the first document at or past it."""
    rows = docs(400)
    shards(mirror, 'fineweb_edu', {'train-00000-of-00002.parquet': rows[:250],
                                   'train-00001-of-00002.parquet': rows[250:]})
    meta, out = decode(datasets.prepare('fineweb_edu', data_dir=str(tmp_path / 'data'), max_docs=300, num_proc=1))
    val = [in_val(doc_key(d), 0.1, 1337) for d in rows[:300]]
    assert out['train'] == [d for d, v in zip(rows, val) if not v] and out['val'] == [d for d, v in zip(rows, val) if v]
    assert meta['dtype'] == 'uint16' and meta['tokenizer'] == {'kind': 'tiktoken', 'name': 'gpt2'}
    assert meta['settings']['max_docs'] == 300 and meta['train_tokens'] + meta['val_tokens'] > 0

    train, valid = docs(200, seed=1), docs(100, seed=2)
    shards(mirror, 'c4', {'c4-train.00000-of-00001.json': train, 'c4-validation.00000-of-00001.json.gz': valid})
    folder = datasets.prepare('c4', data_dir=str(tmp_path / 'data'), max_tokens=3000, num_proc=1)
    meta, out = decode(folder)
    tok = from_spec(meta['tokenizer'])
    for split, source, cap in (('train', train, 2700), ('val', valid, 300)):
        k = len(out[split])
        assert out[split] == source[:k]
        tokens = lambda m: sum(len(tok.encode(d)) for d in source[:m]) + m - 1  # noqa: E731 (+ the separators)
        assert meta[f'{split}_tokens'] == tokens(k) and tokens(k) >= cap > tokens(k - 1)
    assert not os.path.exists(os.path.join(folder, hub_corpora.STATE)) and sorted(os.listdir(folder)) == \
        ['meta.json', 'train.bin', 'val.bin']


def test_wikitext_rows_are_joined_into_articles(mirror, tmp_path, monkeypatch):
    """WikiText's rows are the lines of its articles ('' for a blank one); an article starts at its ' = Title = ' line,
    so sections (' = = x = = ') stay in it."""
    def article(title, paras):
        return ['', f' = {title} = \n', ''] + [row for p in paras for row in (f' {p} \n', '')] + \
            [' = = Section = = \n', '', ' More text . \n']
    arts = [article('Valkyria', ['First para .', 'Second , with = signs = .']), article('Tower', ['Tall .']),
            article('Moon', ['Round .'])]
    shards(mirror, 'wikitext103', {'train-00000-of-00001.parquet': arts[0] + arts[1],
                                   'validation-00000-of-00001.parquet': arts[2]})
    folder = datasets.prepare('wikitext103', data_dir=str(tmp_path / 'data'), num_proc=1)
    _, out = decode(folder)
    joined = lambda rows: ''.join(r or '\n' for r in rows).strip('\n')  # noqa: E731
    assert out == {'train': [joined(arts[0]), joined(arts[1])], 'val': [joined(arts[2])]}
    assert out['train'][1] == ' = Tower = \n\n Tall . \n\n = = Section = = \n\n More text . '
    # an article a chunk, stopped after the first: the rerun goes on at the second's title row
    monkeypatch.setattr(hub_corpora, 'CHUNK_CHARS', 1)
    with stopped_after(monkeypatch, 1), pytest.raises(KeyboardInterrupt):
        datasets.prepare('wikitext103', data_dir=str(tmp_path / 'again'), num_proc=1)
    state = json.load(open(tmp_path / 'again' / 'wikitext103' / hub_corpora.STATE))
    assert state['streams'][0]['at']['rows'] == len(arts[0]) + 1  # and the blank row before the next title
    assert state['n']['train'] > 0
    assert bins(datasets.prepare('wikitext103', data_dir=str(tmp_path / 'again'), num_proc=1)) == bins(folder)


KILL = """
import os, signal, sys
from nanolab import datasets, hub_corpora
hub_corpora.CHUNK_CHARS, save, calls = 2000, hub_corpora._save, []
def killed(folder, state):  # kill -9 after the 4th chunk's tokens are on disk, before its state is
    calls.append(1)
    if len(calls) == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    save(folder, state)
hub_corpora._save = killed
datasets.prepare('openwebtext', data_dir=sys.argv[1], max_tokens=int(sys.argv[2]), num_proc=1)
"""


def test_a_stopped_preparation_resumes_to_the_same_bytes(mirror, tmp_path, monkeypatch, capsys):
    """openwebtext from 3 parquet shards, sliced by --max_tokens. A process killed with SIGKILL between a chunk's
    write and its state leaves .bin.tmp files longer than resume.json says and no meta.json (not a dataset); a Ctrl-C
    a few chunks later in this process keeps them too. Each run with the same settings goes on from there, and the
    result is byte-identical to an uninterrupted run."""
    rows = docs(300)
    shards(mirror, 'openwebtext', {f'train-0000{i}-of-00003.parquet': rows[100 * i:100 * (i + 1)] for i in range(3)})
    whole = datasets.prepare('openwebtext', data_dir=str(tmp_path / 'whole'), max_tokens=15000, num_proc=1)
    data = str(tmp_path / 'data')
    r = subprocess.run([sys.executable, '-c', KILL, data, '15000'], cwd=ROOT, capture_output=True, text=True)
    folder = os.path.join(data, 'openwebtext')
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    state = json.load(open(os.path.join(folder, hub_corpora.STATE)))
    assert not os.path.exists(os.path.join(folder, 'meta.json')) and state['streams'][0]['at']['rows'] > 0
    assert os.path.getsize(os.path.join(folder, 'train.bin.tmp')) > 2 * state['n']['train'] > 0  # the 4th chunk
    with pytest.raises(ValueError, match='no dataset'):
        datasets.load_meta(folder)

    resuming = 'resuming a stopped preparation at {:,} tokens'
    capsys.readouterr()
    with stopped_after(monkeypatch, 2), pytest.raises(KeyboardInterrupt):
        datasets.prepare('openwebtext', data_dir=data, max_tokens=15000, num_proc=1)
    assert resuming.format(sum(state['n'].values())) in capsys.readouterr().out
    later = json.load(open(os.path.join(folder, hub_corpora.STATE)))
    assert later['streams'][0]['at']['rows'] > state['streams'][0]['at']['rows']
    assert os.path.exists(os.path.join(folder, 'train.bin.tmp'))
    shutil.copytree(data, tmp_path / 'other')
    assert bins(datasets.prepare('openwebtext', data_dir=data, max_tokens=15000, num_proc=1)) == bins(whole)
    assert resuming.format(sum(later['n'].values())) in capsys.readouterr().out
    # other settings start over (the old state does not match): the same bytes as a fresh run
    whole = datasets.prepare('openwebtext', data_dir=str(tmp_path / 'whole'), max_tokens=9000, num_proc=1)
    other = datasets.prepare('openwebtext', data_dir=str(tmp_path / 'other'), max_tokens=9000, num_proc=1)
    assert bins(other) == bins(whole) and 'resuming' not in capsys.readouterr().out


def test_two_workers_write_the_same_bytes_as_one(mirror, tmp_path):
    shards(mirror, 'c4', {'train-00000-of-00001.jsonl': docs(300), 'validation-00000-of-00001.jsonl': docs(40, 3)})
    one = datasets.prepare('c4', data_dir=str(tmp_path / 'one'), num_proc=1)
    two = datasets.prepare('c4', data_dir=str(tmp_path / 'two'), num_proc=2)
    assert bins(one) == bins(two) and len(bins(one)[0]) > 10 * hub_corpora.CHUNK_CHARS // 4


def test_offline_without_a_copy_is_one_clear_error(mirror, tmp_path, monkeypatch):
    """Offline mode on, or the Hub out of reach (`datasets` raises ConnectionError): one line naming the dataset, the
    copy it looked for, NANOLAB_DATA_MIRROR and HF_DATASETS_OFFLINE; nothing is left behind."""
    import datasets as hf_datasets
    want = (r"openwebtext: no local copy at .*mirror/hub/Skylion007/openwebtext/default and the Hub is out of reach "
            r"\({}.*NANOLAB_DATA_MIRROR=.*mirror.*HF_DATASETS_OFFLINE=")
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    with pytest.raises(ValueError, match=want.format('offline mode is on')) as e:
        datasets.prepare('openwebtext', data_dir=str(tmp_path / 'data'), max_docs=10)
    assert '\n' not in str(e.value) and os.listdir(tmp_path / 'data' / 'openwebtext') == []

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Skylion007/openwebtext' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.delenv('HF_DATASETS_OFFLINE')
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    monkeypatch.setattr(hf_datasets, 'load_dataset', unreachable)
    with pytest.raises(ValueError, match=want.format("ConnectionError: Couldn't reach")):
        datasets.prepare('openwebtext', data_dir=str(tmp_path / 'data'), max_docs=10)


def test_train_py_never_streams_a_hub_corpus_itself(mirror, tmp_path, monkeypatch):
    """A missing Hub corpus stops train.py with one line giving data.py's command, sliced to what the run reads; it
    reads nothing. tinystories is one only when its text files are on neither the mirror nor the cache."""
    shards(mirror, 'c4', {'train-00000-of-00001.jsonl': docs(5)})  # a copy there: still not prepared by train.py
    monkeypatch.setattr(sys, 'argv', ['train.py', '--dataset=c4', f'--data_dir={tmp_path}', f'--out_dir={tmp_path}/out',
                                      '--max_iters=100', '--batch_size=4', '--block_size=64',
                                      '--gradient_accumulation_steps=2', '--device=cpu', '--compile=False'])
    with pytest.raises(SystemExit, match=r'^error: c4 is read from the Hugging Face Hub .*train.py does not start '
                                         r'that by itself; prepare it first: `python data.py c4 --max_tokens=52000`'):
        runpy.run_path(os.path.join(ROOT, 'train.py'), run_name='__main__')
    assert not os.path.exists(tmp_path / 'c4')
    assert hub_corpora.from_hub('tinystories', str(tmp_path / '_downloads'))
    monkeypatch.setenv('NANOLAB_DATA_MIRROR', os.path.join(ROOT, '..', 'shared', 'data'))
    assert not hub_corpora.from_hub('tinystories', str(tmp_path / '_downloads'))


def test_a_corpus_that_does_not_fit_on_the_disk_is_refused(mirror, tmp_path, monkeypatch):
    """No copy and no --max_tokens: the corpus's full size (~9.0B GPT-2 tokens for OpenWebText, 2 bytes each) against
    the free space; refused with the numbers and a slice that fits, before anything is read or written."""
    import datasets as hf_datasets
    monkeypatch.delenv('HF_DATASETS_OFFLINE', raising=False)
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    load = hf_datasets.load_dataset
    monkeypatch.setattr(hf_datasets, 'load_dataset', lambda *a, **k: pytest.fail('the Hub was read'))
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: SimpleNamespace(total=100e9, used=95e9, free=5e9))
    with pytest.raises(ValueError, match=r'openwebtext: ~9,000,000,000 tokens x 2 bytes = ~18.00 GB more of \.bin '
                                         r'files, but .* has only 5.00 GB free; .*--max_tokens=2200000000'):
        datasets.prepare('openwebtext', data_dir=str(tmp_path / 'data'))
    assert os.listdir(tmp_path / 'data' / 'openwebtext') == []
    shards(mirror, 'openwebtext', {'train-00000-of-00001.jsonl': docs(60)})  # a local copy: its size counts
    monkeypatch.setattr(hf_datasets, 'load_dataset', load)
    assert datasets.load_meta(datasets.prepare('openwebtext', data_dir=str(tmp_path / 'data')))['val_tokens'] > 0
