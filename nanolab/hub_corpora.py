"""
Named corpora from the Hugging Face Hub, streamed through the `datasets` library into the same
train.bin / val.bin / meta.json as every token dataset (datasets.py), whole or a slice:

    python data.py openwebtext --max_tokens=100000000  # ~100M GPT-2 tokens: 200 MB of .bin
    python data.py fineweb_edu --max_docs=100000       # also wikitext103, c4, tinystories

Where a corpus comes from: $NANOLAB_DATA_MIRROR/hub/<repo id>/<config or default>/ first, a copy
of the Hub's shards (parquet or JSON lines, named by split like train-00000-of-00001.parquet or
c4-validation.00000-of-00008.json.gz); else the Hub itself, streamed (nothing is downloaded whole).
tinystories reads its text files (downloads.py, the mirror's tinystories/) when they are on disk,
as before, and the Hub only when they are not. Named sets are used as published (no cleaning);
--tokenizer applies as for any dataset (auto: GPT-2's BPE; our own for tinystories).

Resumable: the tokens are appended to the .bin.tmp files a chunk of documents at a time; after
each chunk the files are fsynced, and then resume.json records where each split's stream is (rows
read, and the `datasets` stream's own state_dict) and how many tokens each file holds. The same
command after a Ctrl-C, a kill -9 or a dropped connection truncates the files to what resume.json
records, seeks the stream there (load_state_dict: the shards already read are not read again) and
goes on, so the result is byte-identical to an uninterrupted run. meta.json comes last
(datasets._finish): a partial dataset never looks complete. Changed settings start over.

Safety: the trainers never start streaming one of these by themselves (train.py stops with the
data.py command: prepare_first), and a preparation that would not fit on the disk is refused
before it writes anything.
"""
import glob
import hashlib
import json
import math
import os
import re
import shutil
from collections import Counter, deque
from dataclasses import dataclass

import numpy as np

from nanolab.downloads import SOURCES
from nanolab.files import remove_stale, write_json
from nanolab.formats import in_val
from nanolab.progress import Progress


@dataclass(frozen=True)
class Corpus:
    repo: str            # the Hub's dataset id
    config: str | None   # its configuration (None: the default one)
    splits: tuple        # the Hub splits read; train alone: val by a per-document hash (in_val)
    docs: float          # approximate full size in documents, train split
    tokens: float        # approximate full size in GPT-2 tokens, all splits


# Full sizes are approximate (from the datasets' cards and papers, not counted here): they size
# the disk check and the progress line when no --max_tokens is given. WikiText-103 (Merity et al.
# 2016): 103M words in 28,475 train articles (~0.12B GPT-2 tokens is our estimate); OpenWebText
# (Gokaslan & Cohen 2019): 8.0M documents, 9.0B GPT-2 tokens (nanoGPT's count); C4 (Raffel et al.
# 2020): 365M documents, ~156B tokens (T5's tokenizer); FineWeb-Edu's sample-10BT: 10B GPT-2
# tokens, ~9.7M documents; TinyStories (Eldan & Li 2023): 2.1M stories (~0.5B tokens, estimated).
CORPORA = {
    'wikitext103': Corpus('Salesforce/wikitext', 'wikitext-103-raw-v1', ('train', 'validation'),
                          28_475, 0.12e9),
    'openwebtext': Corpus('Skylion007/openwebtext', None, ('train',), 8.0e6, 9.0e9),
    'c4': Corpus('allenai/c4', 'en', ('train', 'validation'), 365e6, 156e9),
    'fineweb_edu': Corpus('HuggingFaceFW/fineweb-edu', 'sample-10BT', ('train',), 9.7e6, 10e9),
    'tinystories': Corpus('roneneldan/TinyStories', None, ('train', 'validation'), 2.1e6, 0.5e9),
}
STATE = 'resume.json'      # a stopped preparation's progress, beside its .bin.tmp files
CHUNK_CHARS = 1 << 20      # a flushed chunk of documents: about this many chars (2 fsyncs, 1 state)
SHARD_EXTS = ('.parquet', '.jsonl', '.json', '.jsonl.gz', '.json.gz')
TITLE = re.compile(r' = [^=].* = \n')  # a WikiText article's first line; a section's: ' = = x = = '


def from_hub(name: str, cache_dir: str) -> bool:
    """Whether preparing NAME reads Hub shards (the Hub's, or a local copy of them): every corpus
    here, tinystories only when its text files are in neither the mirror nor cache_dir."""
    if name != 'tinystories':
        return name in CORPORA
    roots = [r for r in (os.environ.get('NANOLAB_DATA_MIRROR'), cache_dir) if r]
    return not all(any(os.path.isfile(os.path.join(root, rel)) for root in roots
                       for rel, _, _ in SOURCES[key])
                   for key in ('tinystories_train', 'tinystories_val'))


def mirror_dir(name):
    """Where a local copy of NAME's shards is looked for."""
    c = CORPORA[name]
    return os.path.join(os.environ.get('NANOLAB_DATA_MIRROR') or '$NANOLAB_DATA_MIRROR', 'hub',
                        c.repo, c.config or 'default')


def _offline_error(name, why):
    c, env = CORPORA[name], os.environ
    files = ' (or its text files tinystories/TinyStoriesV2-GPT4-{train,valid}.txt)' \
        if name == 'tinystories' else ''
    return ValueError(
        f"{name}: no local copy at {mirror_dir(name)}{files} and the Hub is out of reach ({why}); "
        f"put the shards of {c.repo} ({c.config or 'default'}: parquet or JSONL, named like "
        "train-00000-of-00001.parquet) there, NANOLAB_DATA_MIRROR="
        f"{env.get('NANOLAB_DATA_MIRROR', '(unset)')}, or connect to the internet with offline "
        f"mode off (now HF_DATASETS_OFFLINE={env.get('HF_DATASETS_OFFLINE', '(unset)')}, "
        f"HF_HUB_OFFLINE={env.get('HF_HUB_OFFLINE', '(unset)')})")


def _shards(folder, split):
    """One split's files in a local copy, and the `datasets` builder that reads them: the shards
    under folder with the split's name as a word of theirs, all parquet or all JSON lines."""
    files = sorted(p for p in glob.glob(os.path.join(folder, '**', '*'), recursive=True)
                   if p.endswith(SHARD_EXTS)
                   and re.search(rf'(^|[-._]){split}[-._]', os.path.basename(p)))
    kinds = {'parquet' if p.endswith('.parquet') else 'json' for p in files}
    if len(kinds) != 1:
        raise ValueError(f'{folder}: {"no" if not files else "mixed parquet and JSON"} shards of '
                         f'the {split} split; name them like {split}-00000-of-00001.parquet '
                         f'(or .jsonl), one format per split')
    return files, kinds.pop()


def _rows(name, split, start=None):
    """(where, text) for each row of a Hub split, from the local copy, else the Hub; `where` is
    the position after that row: {'rows': rows read, 'hf': the stream's state_dict()}, and
    `start` one of those to go on from (the library seeks there: no shard is read again).
    Offline without a copy, or the Hub out of reach: one clear error."""
    import datasets  # heavy: only when a Hub corpus is prepared
    c, local, env = CORPORA[name], mirror_dir(name), os.environ
    rows = start['rows'] if start else 0
    try:
        if os.path.isdir(local):
            files, builder = _shards(local, split)
            ds = datasets.load_dataset(builder, data_files=files, split='train', streaming=True)
        elif any(env.get(k, '').upper() in ('1', 'ON', 'YES', 'TRUE')
                 for k in ('HF_DATASETS_OFFLINE', 'HF_HUB_OFFLINE')):
            raise _offline_error(name, 'offline mode is on')
        else:
            ds = datasets.load_dataset(c.repo, c.config, split=split, streaming=True)
        ds = ds.select_columns(['text'])
        if start:
            ds.load_state_dict(start['hf'])
        for row in ds:
            rows += 1
            yield {'rows': rows, 'hf': ds.state_dict()}, row['text']
    except ConnectionError as e:  # what `datasets` raises for an unreachable Hub
        raise _offline_error(name, f'{type(e).__name__}: {e}') from None


def documents(name, split, start=None):
    """(where, document) for each document of a Hub split, `where` being the position after it
    (_rows). A row is a document, except in WikiText, whose rows are the lines of its articles
    ('' for a blank one): an article runs from its title line to the next title."""
    rows = _rows(name, split, start)
    if name != 'wikitext103':
        yield from rows
        return
    lines, end = [], start
    for where, line in rows:
        if TITLE.fullmatch(line) and ''.join(lines).strip():
            yield end, ''.join(lines).strip('\n')
            lines = []
        lines.append(line or '\n')
        end = where
    if ''.join(lines).strip():
        yield end, ''.join(lines).strip('\n')


def _caps(name, cfg):
    """[(output split or None, Hub split, token cap, document cap)]: a train-only corpus's one
    stream takes the whole budget (and in_val splits it); with a published validation split, val's
    share of the budget is val_fraction."""
    if cfg['max_tokens'] < 0 or cfg['max_docs'] < 0:
        raise ValueError(f"max_tokens={cfg['max_tokens']}, max_docs={cfg['max_docs']}: a cap is "
                         "a count of tokens or documents, or 0 for all of them")
    splits, vf, caps = CORPORA[name].splits, cfg['val_fraction'], (cfg['max_tokens'],
                                                                   cfg['max_docs'])
    if len(splits) == 1:
        return [(None, splits[0], *(cap or math.inf for cap in caps))]
    val = [max(1, round(cap * vf)) if cap and vf else 0 for cap in caps]  # val's share of a cap
    return [('train', splits[0], *(cap - v if cap else math.inf for cap, v in zip(caps, val))),
            ('val', splits[1], *(v if cap else math.inf for cap, v in zip(caps, val)))]


def sources(name, cfg, kind):
    """[(split, docs)] for datasets.prepare's tokenizer step (char reads the vocabulary of the
    slice, bpe its first MBs of train text): each stream's documents up to its document cap, and
    for char, whose tokens are chars, up to its token cap."""
    def docs(split, cap_tokens, cap_docs):
        chars = 0
        for i, (_, d) in enumerate(documents(name, split)):
            if i >= cap_docs or (kind == 'char' and chars >= cap_tokens):
                return
            chars += len(d)
            yield d
    return [(s, lambda split=split, t=t, d=d: docs(split, t, d))
            for s, split, t, d in _caps(name, cfg)]


def describe(name):
    """meta.json's source of a Hub corpus."""
    c, local = CORPORA[name], mirror_dir(name)
    return {'hub': c.repo, 'config': c.config, 'splits': list(c.splits),
            'local_copy': local if os.path.isdir(local) else None}


def _round(x, up=False):
    """x to 2 significant digits, for a suggested --max_tokens."""
    step = 10 ** max(0, int(math.log10(max(x, 1))) - 1)
    return int((math.ceil if up else math.floor)(x / step) * step)


def _expected_tokens(name, cfg):
    """About how many tokens a preparation writes: its cap, else the corpus's full size (a local
    copy's: a token per byte of its files at most, as text takes ~4 bytes a GPT-2 token and the
    shards' compression less than 4x)."""
    c, local = CORPORA[name], mirror_dir(name)
    full = min(c.tokens, sum(os.path.getsize(p) for p in glob.glob(os.path.join(local, '**', '*'),
                                                                   recursive=True)
                             if os.path.isfile(p)) if os.path.isdir(local) else math.inf)
    return min(cfg['max_tokens'] or math.inf, full,
               cfg['max_docs'] * c.tokens / c.docs if cfg['max_docs'] else math.inf)


def prepare_first(name: str, run_tokens: float) -> str:
    """train.py's one-line refusal to stream NAME itself: the data.py command that prepares it,
    sliced to what the run reads (run_tokens) where that is less than the whole corpus."""
    c = CORPORA[name]
    cmd = f'python data.py {name}' + (f' --max_tokens={_round(run_tokens, up=True)}'
                                      if run_tokens < c.tokens else '')
    size = f'~{c.tokens / 1e9:.3g}B tokens, ~{c.tokens * 2 / 1e9:.3g} GB of .bin in all'
    return (f'{name} is read from the Hugging Face Hub ({size}) and train.py does not start '
            f'that by itself; prepare it first: `{cmd}`' +
            (' (what this run reads: max_iters x tokens per iteration)'
             if run_tokens < c.tokens else ''))


def _check_disk(folder, name, cfg, itemsize, written):
    tokens = _expected_tokens(name, cfg)
    need, free = tokens * itemsize - written, shutil.disk_usage(folder).free
    if need > free:
        raise ValueError(f'{name}: ~{tokens:,.0f} tokens x {itemsize} bytes = '
                         f'~{need / 1e9:.2f} GB more of .bin files, but {folder} has only '
                         f'{free / 1e9:.2f} GB free; free some space, or take a slice with '
                         f'--max_tokens={_round(0.9 * free / itemsize)}')


def _resume(folder, key, itemsize):
    """The state of a stopped preparation with this key, its .bin.tmp files cut to what it
    records; else a fresh state, and no files."""
    path = os.path.join(folder, STATE)
    bins = {s: os.path.join(folder, f'{s}.bin.tmp') for s in ('train', 'val')}
    remove_stale(folder)  # the temp file of a resume.json that a kill -9 cut short
    try:
        with open(path, encoding='utf-8') as f:
            state = json.load(f)
        if state['key'] == key and all(os.path.getsize(bins[s]) >= n * itemsize
                                       for s, n in state['n'].items()):
            for s, n in state['n'].items():
                os.truncate(bins[s], n * itemsize)  # a chunk written after the last state goes
            print(f"{folder}: resuming a stopped preparation at {sum(state['n'].values()):,} "
                  'tokens')
            return state
    except (OSError, ValueError, KeyError):
        pass
    for p in (path, *bins.values()):
        if os.path.exists(p):
            os.remove(p)
    return {'key': key, 'n': {'train': 0, 'val': 0}, 'streams': None}


def _chunks(docs, ends):
    """Lists of documents of about CHUNK_CHARS chars; `ends` gets the position after each."""
    chunk, size = [], 0
    for where, d in docs:
        chunk.append(d)
        size += len(d)
        if size >= CHUNK_CHARS:
            ends.append(where)
            yield chunk
            chunk, size = [], 0
    if chunk:
        ends.append(where)
        yield chunk


def write_bins(folder, name, tok, cfg, settings, tokenize):
    """Stream NAME's documents into folder/{train,val}.bin.tmp, resuming a stopped run with the
    same settings (the module docstring says how). tokenize(chunks, dtype) is datasets._pipeline
    over the workers: per chunk of documents, (keys, sigs, bands, tokens, stats), in order.
    Returns the token counts per split and the counts for the caller's checks."""
    dtype = np.uint16 if tok.vocab_size < 65536 else np.uint32
    itemsize, eot = np.dtype(dtype).itemsize, \
        [np.array([tok.eot], dtype)] if tok.eot is not None else []
    spec = hashlib.sha256(json.dumps(tok.spec(), sort_keys=True).encode()).hexdigest()
    key = json.loads(json.dumps({'settings': settings, 'tokenizer': spec,
                                 'source': describe(name)}))
    caps = _caps(name, cfg)
    state = _resume(folder, key, itemsize)
    state['streams'] = state['streams'] or [{'at': None, 'docs': 0, 'tokens': 0, 'done': False}
                                            for _ in caps]
    n = Counter(state['n'])
    base = sum(n.values())
    _check_disk(folder, name, cfg, itemsize, base * itemsize)
    shown = Progress(max(1, int(_expected_tokens(name, cfg)) - base), f'{name}: tokenizing',
                     'tokens')
    docs = lambda: f"{sum(x['docs'] for x in state['streams']):,} docs"  # noqa: E731
    files = {s: open(os.path.join(folder, f'{s}.bin.tmp'), 'ab') for s in ('train', 'val')}
    with files['train'], files['val']:
        for (split, hub_split, cap_tokens, cap_docs), st in zip(caps, state['streams']):
            if st['done']:
                continue
            ends = deque()  # the position after each chunk in flight, in order
            work = tokenize(_chunks(documents(name, hub_split, st['at']), ends), dtype)
            for keys, _, _, tokens, _ in work:
                # 1) this chunk's documents, up to the first one past a cap
                out = {'train': [], 'val': []}
                for key, ids in zip(keys, tokens):
                    if st['tokens'] >= cap_tokens or st['docs'] >= cap_docs:
                        st['done'] = True
                        break
                    s = split or ('val' if in_val(key, cfg['val_fraction'], cfg['seed'])
                                  else 'train')
                    part = (eot if n[s] or out[s] else []) + [ids]  # <|endoftext|> between docs
                    out[s] += part
                    st['tokens'] += sum(map(len, part))
                    st['docs'] += 1
                # 2) the tokens on disk (fsynced), and only then the state that counts them
                for s, parts in out.items():
                    if parts:
                        np.concatenate(parts).tofile(files[s])
                        n[s] += sum(map(len, parts))
                    files[s].flush()
                    os.fsync(files[s].fileno())
                st['at'], state['n'] = ends.popleft(), dict(n)
                _save(folder, state)
                shown.update(min(shown.total - 1, sum(n.values()) - base), docs())
                if st['done']:
                    break
            work.close()  # stops the workers that a cap left busy
            st['done'] = True  # at a cap, or the split's end
            _save(folder, state)
    shown.total = max(1, sum(n.values()) - base)  # the real count, not the estimate
    shown.update(shown.total, docs())
    os.remove(os.path.join(folder, STATE))  # datasets._finish renames the files, writes meta.json
    return n, Counter(docs_out=sum(x['docs'] for x in state['streams']))


def _save(folder, state):
    """resume.json, atomically (write_json: a temp file, fsynced, renamed)."""
    write_json(os.path.join(folder, STATE), state)
