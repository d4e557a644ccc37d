"""
Datasets: fetch (local mirror first, then the network), clean, tokenize, and write what train.py reads.

    python data.py shakespeare_char                  # nanoGPT's char-level set: 65 chars, 1,003,854 / 111,540 tokens
    python data.py shakespeare                       # the same text, GPT-2 BPE
    python data.py tinystories --vocab_size=4096     # our own BPE learned from the stories (--tokenizer=gpt2: GPT-2's)
    python data.py text --input=docs/,more/*.jsonl --out_name=mine --tokenizer=bpe --jaccard=0.85
    python data.py alpaca                            # also chat, hh_rlhf, dpo_pairs: SFT/preference sets as JSONL
    python data.py tasks                             # the synthetic instruction suite (tasks.py); tasks_base: its base
    python data.py bench --mb=100                    # time the whole `text` pipeline on synthetic text

data_dir/<name>/ holds train.bin and val.bin, each one flat token stream (uint16 below 65,536 tokens, else
uint32; documents joined by <|endoftext|>; np.memmap(path, dtype, mode='r') reads them), and meta.json
(tokenizer spec, vocab_size, dtype, token counts, source, cleaning counts, settings). Files are written
under temp names and renamed, meta.json last, so a crash never leaves a dataset that looks complete; a
second run with the same settings finds meta.json and does nothing.

`text` streams: this process reads ~1 MB chunks of documents; num_proc workers clean them (clean.py steps
1-4), MinHash them and tokenize them with tiktoken's Rust core; this process drops duplicates in corpus
order and appends the tokens to the .bin files. Memory holds a few chunks plus ~2.3 KB of near-dedup index
per document, never the token stream. A document goes to val by a hash of its text, not by its position.
"""
import difflib
import glob
import gzip
import hashlib
import json
import multiprocessing as mp
import os
import re
import sys
import time
from collections import Counter, deque
from datetime import datetime, timezone

import numpy as np

from nanolab import synthetic as tasks
from nanolab.formats import in_val, open_text, read_preferences, read_rows, read_sft
from nanolab.progress import Progress
from nanolab.cleaning import PLACEHOLDERS, Deduper, clean_corpus, clean_doc, doc_key, minhash, report
from nanolab.cleaning import normalize as normalize_text  # `normalize` is the flag below
from nanolab.tokenizer import EOT, BPETokenizer, CharTokenizer, TiktokenTokenizer, from_spec

# -----------------------------------------------------------------------------
data_dir = 'data'             # datasets go to data_dir/<name>/, downloads to data_dir/_downloads/
tokenizer = 'auto'            # auto (char for shakespeare_char, bpe for tinystories, else gpt2) | char | gpt2 | bpe
vocab_size = 4096             # tokenizer=bpe: 256 bytes + merges + 5 special tokens
bpe_train_mb = 2.0            # tokenizer=bpe: MB of train text the merges are learned from (~15 s at 4096)
val_fraction = 0.1            # share held out for validation (by position for shakespeare, as nanoGPT)
seed = 1337                   # salts the per-document train/val hash; seeds the benchmark's text
input = ''                    # text: comma-separated files, directories, globs; .txt .md .jsonl .json (.gz too)
text_field = 'text'           # text: the field of each .jsonl/.json row that holds the document
encoding = 'utf-8'            # text: how the input files are decoded (latin-1, cp1252, utf-16, ...)
on_bad_file = 'error'         # text: a file that does not decode: 'error' (stop, naming it) | 'skip' (counted); binary files are always skipped
doc_split = 'file'            # text: a .txt/.md file is one document | paragraph | line; <|endoftext|> always splits
out_name = 'text'             # text: the dataset folder, data_dir/<out_name>
normalize = True              # cleaning 1 (all cleaning is for text): Unicode NFC, newlines, control chars
quality = True                # cleaning 2: Gopher's quality rules with the thresholds below
min_words = 20                # quality: documents with fewer words are dropped
max_symbol_ratio = 0.1        # quality: max symbols (not letters, digits, spaces, punctuation) per non-space char
max_dup_lines = 0.3           # quality: max share of lines that repeat an earlier line (Gopher: 0.3)
mean_word_len = (3.0, 10.0)   # quality: allowed mean word length in chars (Gopher: 3 to 10)
lang_filter = True            # cleaning 3: English only
min_english = 0.15            # lang_filter: min share of English function words (English prose ~0.45, German ~0.07)
pii = True                    # cleaning 4: emails, phones, IPv4, Luhn-valid cards -> <EMAIL> <PHONE> <IP_ADDRESS> <CARD_NUMBER>
dedup = True                  # cleaning 5: drop exact duplicates (the first copy stays)
near_dedup = True             # cleaning 6: drop near-duplicates (MinHash + LSH over word 5-grams)
jaccard = 0.8                 # near_dedup: 5-gram Jaccard similarity from which a document is a near-duplicate
num_proc = 2                  # worker processes that clean and tokenize
mb = 100.0                    # bench: MB of synthetic text
# -----------------------------------------------------------------------------
from nanolab.configurator import settings_names
CONFIG_KEYS = settings_names(__file__)  # the settings block above, not the constants below
TOKENIZERS, DOC_SPLITS = ('auto', 'char', 'gpt2', 'bpe'), ('file', 'paragraph', 'line')
CLEAN_KEYS = ('normalize', 'quality', 'min_words', 'max_symbol_ratio', 'max_dup_lines', 'mean_word_len',
              'lang_filter', 'min_english', 'pii', 'dedup', 'near_dedup', 'jaccard')
CHUNK_CHARS = 1 << 20         # documents go to the workers in chunks of about this many chars
DATASETS = {'shakespeare_char': 'char', 'shakespeare': 'gpt2', 'tinystories': 'bpe', 'text': 'gpt2',
            'tasks_base': 'char'}  # auto tokenizer
JSONL_SETS = {'alpaca': 'sft', 'chat': 'sft', 'hh_rlhf': 'preference', 'dpo_pairs': 'preference', 'tasks': 'sft'}
TASK_SETS = ('tasks', 'tasks_base')  # synthetic, generated by tasks.py: the post-training demonstration

# (relpath in the mirror and the download cache, url, sha256). Where a list has several, the first is the full
# upstream file and the rest are subsets that offline mirrors hold instead: whichever is on disk is used, and
# the first is downloaded when none is. Commit-pinned URLs keep the checksums valid.
GH, LF = 'https://raw.githubusercontent.com/', 'hiyouga/LLaMA-Factory/ff6d4d12eeb035d6ce06805a5733dd7b29f2ac30/data/'
TS = 'https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/'
SOURCES = {
    'shakespeare': [('tinyshakespeare/input.txt', GH + 'karpathy/char-rnn/master/data/tinyshakespeare/input.txt',
                     '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed')],
    # TinyStories (Eldan & Li 2023). Stand-ins: the first train stories, lowercased (the mirror's original-case
    # tinystories_train_head.txt repeats their first 5%, so it is not used), and the first part of valid
    'tinystories_train': [('tinystories/TinyStoriesV2-GPT4-train.txt', TS + 'TinyStoriesV2-GPT4-train.txt', None),
                          ('tinystories/tinystories_train_head_lowercased.txt', None,
                           '30c6f2fac206d82e76b80dbbede28f6b5415c8d8571dde6bfd8226ab41744a2c')],
    'tinystories_val': [('tinystories/TinyStoriesV2-GPT4-valid.txt', TS + 'TinyStoriesV2-GPT4-valid.txt', None),
                        ('tinystories/tinystories_val_subset.txt', None,
                         '5fc1fb0113df62b567fb271806cd645ce8d75f59c58ca0b764c03d3b6ff34ca6')],
    # Stanford Alpaca's 52k rows; the stand-in is 999 Alpaca-format rows
    'alpaca': [('alpaca/alpaca_data.json', GH + 'tatsu-lab/stanford_alpaca/main/alpaca_data.json', None),
               ('alpaca/alpaca_en_demo.json', GH + LF + 'alpaca_en_demo.json',
                'bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318')],
    'chat': [('chat/dummy_conversation.json', GH + 'lm-sys/FastChat/0e6d3e4beaab66f4d3f93db72541a4abab8af28d/data/'
              'dummy_conversation.json', '534c5a1079f2eb61ff96633330ce87c4743f5b6d5b1691b44a65920473540470')],
    # harmless-base/test: the one hh-rlhf split stored upstream as a plain blob (the others are Git LFS)
    'hh_rlhf': [('hh-rlhf/harmless-base/test.jsonl.gz', GH + 'anthropics/hh-rlhf/354e5c3cb8960630860dd5774a6ac2a58313bf4d/'
                 'harmless-base/test.jsonl.gz', 'ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03')],
    # WikiText-2's validation split (Merity et al. 2016): Wikipedia prose with numbers, for tasks_base (tasks.py)
    'wikitext2_valid': [('wikitext-2/valid.txt', GH + 'pytorch/examples/77f55b912142e11fcfdf5b530231fb9c52f181e8/'
                         'word_language_model/data/wikitext-2/valid.txt',
                         'f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8')],
    'dpo_pairs': [('preference/dpo_en_demo.json', GH + LF + 'dpo_en_demo.json',
                   'b949be2421cfa62744afcf1b479f95b299d643d1a4c1c97d1341b314a1aa5cb3')],
}

# -----------------------------------------------------------------------------
# download

def _sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()

def fetch(relpath: str, url: str, sha256: str = None, also=(), cache_dir: str = None) -> str:
    """The local path of a dataset file: $NANOLAB_DATA_MIRROR/relpath, else cache_dir/relpath (default
    data_dir/_downloads), else downloaded there from url: streamed, with progress, a timeout, 3 tries and
    the sha256 check. also: (relpath, sha256) stand-ins accepted when found on disk."""
    mirror, cache_dir = os.environ.get('NANOLAB_DATA_MIRROR'), cache_dir or os.path.join(data_dir, '_downloads')
    for rel, sha in [(relpath, sha256), *also]:
        for path in [os.path.join(root, rel) for root in (mirror, cache_dir) if root]:
            if os.path.isfile(path):
                if sha and _sha256(path) != sha:
                    raise ValueError(f'{path} has the wrong sha256 (expected {sha}): it is damaged or another '
                                     'version; delete it (or fix the mirror) and run again')
                return path
    offline = f"set NANOLAB_DATA_MIRROR to a directory holding {' or '.join([relpath, *(r for r, _ in also)])}, " \
              'or connect to the internet'
    import requests  # here: code never needs the network at import time (SPEC)
    path = os.path.join(cache_dir, relpath)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for attempt in range(3):
        try:
            with requests.get(url, stream=True, timeout=30) as r, open(path + '.part', 'wb') as f:
                r.raise_for_status()
                total, done, h, t0 = int(r.headers.get('content-length') or 0), 0, hashlib.sha256(), time.time()
                for block in r.iter_content(1 << 20):
                    f.write(block)
                    h.update(block)
                    done += len(block)
                    print(f'\rdownloading {relpath}: {done / 1e6:.1f}/{total / 1e6:.1f} MB, '
                          f'{done / 1e6 / max(1e-3, time.time() - t0):.1f} MB/s', end='', file=sys.stderr)
            print(file=sys.stderr)
            break
        except requests.HTTPError as e:  # the server answered: trying again won't help
            raise ValueError(f'downloading {url} failed ({e}); {offline}') from None
        except requests.RequestException as e:
            if attempt == 2:
                raise ValueError(f'cannot download {url} ({type(e).__name__}); {offline}') from None
            time.sleep(2 ** attempt)  # back off 1 s, then 2 s: a flaky connection often recovers
    if sha256 and h.hexdigest() != sha256:
        os.remove(path + '.part')
        raise ValueError(f'{url} arrived with sha256 {h.hexdigest()}, expected {sha256}: the upstream file changed '
                         f'or the transfer broke; run again, or put a good copy at {path}')
    os.replace(path + '.part', path)
    return path

def _fetch_source(key, cache_dir):
    """fetch() for SOURCES[key] -> (local path, the relpath it stands for)."""
    (rel, url, sha), *others = SOURCES[key]
    path = fetch(rel, url, sha, [(r, s) for r, _, s in others], cache_dir)
    return path, next(r for r, _, _ in SOURCES[key] if path.endswith(r))

# -----------------------------------------------------------------------------
# reading documents

def _split_stream(lines, how):
    """Documents from a text file's lines: the whole file, paragraphs or lines; <|endoftext|> always ends one."""
    buf = []
    for line in lines:
        while EOT in line:
            head, line = line.split(EOT, 1)
            yield ''.join(buf) + head
            buf = []
        buf.append(line)
        if how == 'line' or (how == 'paragraph' and not line.strip()):
            yield ''.join(buf)
            buf = []
    yield ''.join(buf)

def _input_files(spec):
    items = [s.strip() for s in (spec if isinstance(spec, (list, tuple)) else spec.split(',')) if s.strip()]
    if not items:
        raise ValueError('`text` needs --input: files, directories or globs, comma-separated, e.g. --input=corpus/,x/*.jsonl')
    files = []
    for item in map(os.path.expanduser, items):
        if os.path.isdir(item):
            exts = ('.txt', '.md', '.text', '.jsonl', '.json')
            found = [os.path.join(d, f) for d, _, fs in os.walk(item) for f in fs if f.removesuffix('.gz').endswith(exts)]
        else:
            found = [p for p in glob.glob(item, recursive=True) if os.path.isfile(p)]
        if not found:
            raise ValueError(f'--input {item!r} matches no files; give existing files, directories or globs')
        files += sorted(found)
    return list(dict.fromkeys(files))

def _usable_files(files, cfg):
    """The input files that are text in cfg's encoding -> (files, {'binary': [paths], 'undecodable': [paths]}).
    A file with a NUL byte in its first 8 KB is binary (an image, a PDF, an archive): skipped, counted. A file that
    does not decode is an error that names it and both ways out (--encoding, --on_bad_file=skip), or skipped and
    counted with on_bad_file=skip. One streaming pass per file, before anything is written."""
    good, skipped = [], {'binary': [], 'undecodable': []}
    for path in files:
        with (gzip.open(path, 'rb') if path.endswith('.gz') else open(path, 'rb')) as f:
            head = f.read(8192)
        if b'\0' in head and not cfg['encoding'].lower().replace('-', '').startswith('utf16'):
            skipped['binary'].append(path)
            continue
        try:
            with open_text(path, cfg['encoding']) as f:
                while f.read(1 << 20):
                    pass
        except UnicodeDecodeError as e:
            if cfg['on_bad_file'] == 'skip':
                skipped['undecodable'].append(path)
                continue
            raise ValueError(f"{path} is not {cfg['encoding']} text (byte 0x{e.object[e.start]:02x} at offset "
                             f"{e.start}: {e.reason}); give its encoding with --encoding=latin-1 (or cp1252, ...), "
                             "or leave such files out with --on_bad_file=skip") from None
        good.append(path)
    for why, paths in skipped.items():
        if paths:
            print(f"skipped {len(paths)} {why} file(s): {', '.join(paths[:5])}{' ...' if len(paths) > 5 else ''}")
    if not good:
        raise ValueError(f"no input file is usable text ({len(skipped['binary'])} binary, "
                         f"{len(skipped['undecodable'])} not {cfg['encoding']}); check --input and --encoding")
    return good, skipped

def _read_docs(files, cfg):
    """Every document of the input files in order; empty fragments between separators are skipped."""
    for path in files:
        if path.removesuffix('.gz').endswith(('.jsonl', '.json')):
            for where, row in read_rows(path, cfg['encoding']):
                text = row if isinstance(row, str) else row.get(cfg['text_field']) if isinstance(row, dict) else None
                if not isinstance(text, str):
                    raise ValueError(f"{where}: no text field {cfg['text_field']!r} (the row has "
                                     f"{sorted(row) if isinstance(row, dict) else type(row).__name__}); set --text_field")
                yield text
        else:
            with open_text(path, cfg['encoding']) as f:
                yield from (d for d in _split_stream(f, cfg['doc_split']) if d.strip())

def _stories(path, rel, lower):
    """TinyStories documents. Upstream, <|endoftext|> separates stories. The lowercased stand-in puts one
    newline between stories (blank lines inside them). The val stand-in has no reliable separator, so it
    is one document (an <|endoftext|> at every blank line would be wrong far more often than none); it is
    lowercased when the train text is, as val must match train."""
    if rel.endswith('lowercased.txt'):  # 4 MB: read whole
        with open(path, encoding='utf-8') as f:
            yield from (d for d in re.split(r'(?<!\n)\n(?!\n)', f.read()) if d.strip())
        return
    with open_text(path) as f:
        for d in _split_stream(f, 'file'):
            if d.strip():
                yield d.strip('\n').lower() if lower else d.strip('\n')

# -----------------------------------------------------------------------------
# cleaning + tokenization, in parallel

_W = {}  # a worker's state, set once by _init_worker

def _init_worker(spec, clean_cfg, dtype):
    tok = from_spec(spec)
    if tok.kind == 'bpe':
        tok.to_tiktoken()  # our merges as a tiktoken Encoding: its Rust core encodes from here on
    _W.update(tok=tok, cfg=clean_cfg, dtype=dtype, dd=Deduper(clean_cfg))

def _work(docs):
    """One chunk: cleaning steps 1-4, the dedup keys and signatures, and the tokens of what is left."""
    cfg, tok, dd = _W['cfg'], _W['tok'], _W['dd']
    stats = Counter(docs_in=len(docs), chars_in=sum(map(len, docs)))
    texts = [t for t in (clean_doc(d, cfg, stats) for d in docs) if t is not None]
    sigs = minhash(texts) if dd.near and texts else None
    bands = dd.band_keys(sigs) if sigs is not None else None
    tokens = [np.array(tok.encode(t), _W['dtype']) for t in texts]
    return [doc_key(t) for t in texts], sigs, bands, tokens, stats

def _chunks(docs):
    chunk, size = [], 0
    for d in docs:
        chunk.append(d)
        size += len(d)
        if size >= CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk

def _pipeline(chunks, num_proc, init_args):
    """_work over chunks, results in order. subtle: Pool.imap would read the whole input ahead into its
    queue; here at most 2 chunks per worker are in flight, so memory stays flat."""
    if num_proc <= 1:
        _init_worker(*init_args)
        yield from map(_work, chunks)
        return
    with mp.get_context('fork' if 'fork' in mp.get_all_start_methods() else 'spawn').Pool(
            num_proc, _init_worker, init_args) as pool:
        pending = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_work, (chunk,)))
            if len(pending) > 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

def _write_bins(folder, tok, sources, cfg, clean_cfg, total_chars):
    """Stream [(split, docs)] into folder/{train,val}.bin.tmp; split None sends each document where in_val
    says. Returns the token counts and the cleaning counts. Progress (chars read of about total_chars, the input's
    size), rate and ETA go to stderr as it goes."""
    dtype = np.uint16 if tok.vocab_size < 65536 else np.uint32
    eot = [np.array([tok.eot], dtype)] if tok.eot is not None else []
    files = {s: open(os.path.join(folder, f'{s}.bin.tmp'), 'wb') for s in ('train', 'val')}
    n, stats, dd = Counter(train=0, val=0), Counter(), Deduper(clean_cfg)
    shown = Progress(max(1, total_chars), 'cleaning + tokenizing', 'chars')
    with files['train'], files['val']:
        for split, docs in sources:
            for keys, sigs, bands, tokens, st in _pipeline(_chunks(docs), cfg['num_proc'], (tok.spec(), clean_cfg, dtype)):
                stats.update(st)
                out = {'train': [], 'val': []}
                for i, (key, ids) in enumerate(zip(keys, tokens)):
                    # cleaning 5-6 here, in corpus order, so the output does not depend on num_proc
                    if verdict := dd.check(key, *((sigs[i], bands[i]) if sigs is not None else ())):
                        stats[f'{verdict}.removed'] += 1
                        continue
                    s = split or ('val' if in_val(key, cfg['val_fraction'], cfg['seed']) else 'train')
                    out[s] += (eot if n[s] or out[s] else []) + [ids]  # <|endoftext|> between documents
                    stats['docs_out'] += 1
                for s, parts in out.items():  # one write per chunk and split
                    if parts:
                        np.concatenate(parts).tofile(files[s])
                        n[s] += sum(map(len, parts))
                shown.update(min(stats['chars_in'], shown.total - 1), f"{stats['docs_in']:,} docs")
    shown.update(shown.total, f"{stats['docs_in']:,} docs")  # the input's size was an estimate of its chars
    return n, stats

# -----------------------------------------------------------------------------
# the datasets

def _config(overrides):
    cfg = {k: globals()[k] for k in CONFIG_KEYS}
    for k in overrides:
        if k not in cfg:
            raise ValueError(f'unknown setting {k!r}; did you mean {difflib.get_close_matches(k, cfg)}? '
                             f'Settings: {", ".join(cfg)}')
    cfg.update(overrides)
    if cfg['on_bad_file'] not in ('error', 'skip'):
        raise ValueError(f"on_bad_file={cfg['on_bad_file']!r} is 'error' or 'skip'")
    if cfg['tokenizer'] not in TOKENIZERS or cfg['doc_split'] not in DOC_SPLITS:
        raise ValueError(f"tokenizer={cfg['tokenizer']!r}, doc_split={cfg['doc_split']!r}: tokenizer is one of "
                         f'{TOKENIZERS}, doc_split one of {DOC_SPLITS}')
    if not (0 <= cfg['val_fraction'] < 1 and 0 < cfg['jaccard'] <= 1):
        raise ValueError(f"val_fraction={cfg['val_fraction']} must be in [0, 1) and jaccard={cfg['jaccard']} in (0, 1]")
    return cfg

def load_meta(folder: str) -> dict:
    """meta.json of a prepared dataset; when it is missing, an error that gives the command that makes it."""
    name = os.path.basename(os.path.normpath(folder))
    how = f'`python data.py {name}`' if name in DATASETS or name in JSONL_SETS else \
        f'`python data.py text --input=... --out_name={name}` (or `python data.py NAME` for {", ".join(DATASETS)})'
    try:
        with open(os.path.join(folder, 'meta.json'), encoding='utf-8') as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise ValueError(f'no dataset at {folder} (no meta.json); create it with {how}') from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f'{folder}/meta.json is unreadable ({e}); delete {folder} and run {how} again') from None
    files = ('train.bin', 'val.bin') if 'train_tokens' in meta else ('train.jsonl', 'val.jsonl')
    if missing := [s for s in files if not os.path.isfile(os.path.join(folder, s))]:
        raise ValueError(f'{folder} lacks {", ".join(missing)}; create it again with {how}')
    return meta

def _up_to_date(folder, settings):
    try:
        return load_meta(folder).get('settings') == json.loads(json.dumps(settings))  # tuples -> lists
    except ValueError:
        return False

def _start(folder):
    os.makedirs(folder, exist_ok=True)
    if os.path.exists(os.path.join(folder, 'meta.json')):  # subtle: an old meta must not describe new files
        os.remove(os.path.join(folder, 'meta.json'))

def _finish(folder, meta, names):
    """Rename the .tmp files into place, then write meta.json last."""
    for s in names:
        os.replace(os.path.join(folder, s + '.tmp'), os.path.join(folder, s))
    meta['created'] = datetime.now(timezone.utc).isoformat(timespec='seconds')
    with open(os.path.join(folder, 'meta.json.tmp'), 'w', encoding='utf-8') as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)
    os.replace(os.path.join(folder, 'meta.json.tmp'), os.path.join(folder, 'meta.json'))

def prepare(name: str, data_dir: str = 'data', **overrides) -> str:
    """Create data_dir/<name> (data_dir/<out_name> for `text`) unless it exists with the same settings;
    return its path. overrides: any of the settings above (python data.py --help lists them)."""
    cfg = _config({**overrides, 'data_dir': data_dir})
    if name in TASK_SETS:
        return _prepare_tasks(name, cfg)
    if name in JSONL_SETS:
        return _prepare_jsonl(name, cfg)
    if name not in DATASETS:
        names = [*DATASETS, *JSONL_SETS]
        raise ValueError(f'unknown dataset {name!r}; did you mean {difflib.get_close_matches(name, names)}? Choose '
                         f'one of {", ".join(names)} (`text` with --input=... for your own corpus)')
    kind = DATASETS[name] if cfg['tokenizer'] == 'auto' else cfg['tokenizer']
    if name == 'shakespeare_char' and kind != 'char':
        raise ValueError(f'shakespeare_char is char-level; for tokenizer={kind} prepare `shakespeare --tokenizer={kind}`')
    folder, cache = os.path.join(data_dir, cfg['out_name'] if name == 'text' else name), os.path.join(data_dir, '_downloads')
    clean_cfg = {k: cfg[k] if name == 'text' else False for k in CLEAN_KEYS}  # named sets are used as published
    settings = {'name': name, 'tokenizer': kind, 'val_fraction': cfg['val_fraction'],
                **({'vocab_size': cfg['vocab_size'], 'bpe_train_mb': cfg['bpe_train_mb']} if kind == 'bpe' else {})}
    if name == 'text':
        files = _input_files(cfg['input'])
        stat = [(p, os.path.getsize(p), os.path.getmtime(p)) for p in files]  # an edited input means a new dataset
        settings.update({k: cfg[k] for k in ('text_field', 'doc_split', 'seed', 'encoding', 'on_bad_file', *CLEAN_KEYS)},
                        inputs=hashlib.sha256(json.dumps(stat).encode()).hexdigest())
    if _up_to_date(folder, settings):
        print(f'{folder} is up to date (same settings); delete it to prepare it again')
        return folder
    _start(folder)

    # 1) each split's documents, as functions: char and bpe read them once more for the vocabulary
    if name in ('shakespeare_char', 'shakespeare'):
        path, rel = _fetch_source('shakespeare', cache)
        with open(path, encoding='utf-8') as f:
            text = f.read()
        k = int(len(text) * (1 - cfg['val_fraction']))  # nanoGPT: first 90% train, last 10% val, by position
        sources, source = [('train', lambda: [text[:k]]), ('val', lambda: [text[k:]])], {'files': [rel]}
        total_chars = len(text)
    elif name == 'tinystories':
        (tpath, trel), (vpath, vrel) = _fetch_source('tinystories_train', cache), _fetch_source('tinystories_val', cache)
        lower = trel.endswith('lowercased.txt')
        sources = [('train', lambda: _stories(tpath, trel, lower)), ('val', lambda: _stories(vpath, vrel, lower))]
        source = {'files': [trel, vrel], 'lowercased': lower}
        total_chars = os.path.getsize(tpath) + os.path.getsize(vpath)
    else:
        files, skipped = _usable_files(files, cfg)
        sources = [(None, lambda: _read_docs(files, cfg))]
        source = {'input': cfg['input'], 'files': len(files), 'bytes': sum(s for p, s, _ in stat if p in files),
                  'encoding': cfg['encoding'], 'skipped_files': {k: len(v) for k, v in skipped.items()},
                  'skipped': sorted(p for v in skipped.values() for p in v)[:100]}
        total_chars = source['bytes']  # about its chars: exact for ASCII, compressed for .gz

    # 2) the tokenizer: the char vocabulary of all the (normalized) text, or a BPE learned from train text
    if kind == 'char':
        chars = set(''.join(PLACEHOLDERS.values())) if clean_cfg['pii'] else set()
        for _, docs in sources:
            for d in docs():
                chars.update(normalize_text(d) if clean_cfg['normalize'] else d)
        tok = CharTokenizer(chars=''.join(sorted(chars)))
    elif kind == 'gpt2':
        tok = TiktokenTokenizer('gpt2')
    else:
        (split, docs), sample, size = sources[0], [], 0
        for d in clean_corpus(docs(), clean_cfg, Counter()):  # the cleaned text, without val documents
            if size < cfg['bpe_train_mb'] * 1e6 and (split or not in_val(doc_key(d), cfg['val_fraction'], cfg['seed'])):
                sample.append(d)
                size += len(d)
            elif size >= cfg['bpe_train_mb'] * 1e6:
                break
        print(f"training a {cfg['vocab_size']}-token BPE on {min(size / 1e6, cfg['bpe_train_mb']):.1f}M chars ...")
        tok = BPETokenizer.train('\n\n'.join(sample)[:int(cfg['bpe_train_mb'] * 1e6)], cfg['vocab_size'])

    # 3) clean + tokenize + write; both splits must get something
    n, stats = _write_bins(folder, tok, [(s, docs()) for s, docs in sources], cfg, clean_cfg, total_chars)
    for s in ('train', 'val'):
        if n[s] == 0 and (s == 'train' or cfg['val_fraction'] > 0):
            raise ValueError(f"{folder}: the {s} split got no tokens ({stats['docs_out']} documents kept, val_fraction="
                             f"{cfg['val_fraction']}); give more documents, or cut files into more with "
                             '--doc_split=paragraph or --doc_split=line')
    meta = {'name': name, 'tokenizer': tok.spec(), 'vocab_size': tok.vocab_size,
            'dtype': 'uint16' if tok.vocab_size < 65536 else 'uint32',
            'train_tokens': n['train'], 'val_tokens': n['val'], 'source': source, 'settings': settings}
    if name == 'text':
        meta['cleaning'] = report(stats, clean_cfg)
    _finish(folder, meta, ('train.bin', 'val.bin'))
    print(f"{folder}: {n['train']:,} train + {n['val']:,} val tokens, vocab {tok.vocab_size} ({tok.kind})")
    return folder

def _write_jsonl(folder, split, lines):
    """folder/<split>.jsonl.tmp, one JSON text per line (_finish renames it into place)."""
    with open(os.path.join(folder, f'{split}.jsonl.tmp'), 'w', encoding='utf-8') as f:
        f.writelines(line + '\n' for line in lines)

def _prepare_tasks(name, cfg):
    """data_dir/tasks (tasks.rows: SFT rows and preference pairs) or data_dir/tasks_base (the base model's text)."""
    folder, seed = os.path.join(cfg['data_dir'], name), cfg['seed']
    settings = tasks.settings(name, seed, cfg['val_fraction'])
    if _up_to_date(folder, settings):
        print(f'{folder} is up to date (same settings); delete it to prepare it again')
        return folder
    _start(folder)
    if name == 'tasks':
        files = tasks.rows(seed)
        for s, rows in files.items():
            _write_jsonl(folder, s, [json.dumps(r) for r in rows])
        meta = {'name': name, 'format': 'sft', **{f'{s}_rows': len(r) for s, r in files.items()}, 'settings': settings}
        _finish(folder, meta, [s + '.jsonl' for s in files])
        print(f"{folder}: {', '.join(f'{len(r)} {s}' for s, r in files.items())} rows")
        return folder
    # tasks_base: tasks.BASE_SOURCES, char-level over their characters and tasks.ALPHABET, each 90% train / 10% val
    # by position
    texts, rels = [], []
    for key in tasks.BASE_SOURCES:
        path, rel = _fetch_source(key, os.path.join(cfg['data_dir'], '_downloads'))
        with open(path, encoding='utf-8') as f:
            texts.append(f.read())
        rels.append(rel)
    tok = CharTokenizer(chars=''.join(sorted(set(''.join(texts)) | set(tasks.ALPHABET))))
    cut = [int(len(t) * (1 - cfg['val_fraction'])) for t in texts]
    n = {}
    for split, parts in (('train', [t[:k] for t, k in zip(texts, cut)]), ('val', [t[k:] for t, k in zip(texts, cut)])):
        ids = tok.encode('\n\n'.join(parts))
        np.array(ids, dtype=np.uint16).tofile(os.path.join(folder, f'{split}.bin.tmp'))
        n[split] = len(ids)
    meta = {'name': name, 'tokenizer': tok.spec(), 'vocab_size': tok.vocab_size, 'dtype': 'uint16',
            'train_tokens': n['train'], 'val_tokens': n['val'], 'source': {'files': rels}, 'settings': settings}
    _finish(folder, meta, ('train.bin', 'val.bin'))
    print(f"{folder}: {n['train']:,} train + {n['val']:,} val tokens, vocab {tok.vocab_size} (char)")
    return folder

def _prepare_jsonl(name, cfg):
    folder, settings = os.path.join(cfg['data_dir'], name), {'name': name, 'val_fraction': cfg['val_fraction'], 'seed': cfg['seed']}
    if _up_to_date(folder, settings):
        print(f'{folder} is up to date (same settings); delete it to prepare it again')
        return folder
    path, rel = _fetch_source(name, os.path.join(cfg['data_dir'], '_downloads'))
    counts = Counter()
    lines = [json.dumps(r, ensure_ascii=False) for r in (read_sft if JSONL_SETS[name] == 'sft' else read_preferences)(path, counts)]
    val = [in_val(doc_key(line), cfg['val_fraction'], cfg['seed']) for line in lines]
    _start(folder)
    for s, want in (('train', False), ('val', True)):
        _write_jsonl(folder, s, [line for line, v in zip(lines, val) if v == want])
    meta = {'name': name, 'format': JSONL_SETS[name], 'train_rows': val.count(False), 'val_rows': val.count(True),
            'skipped': dict(counts), 'source': {'files': [rel]}, 'settings': settings}
    _finish(folder, meta, ('train.jsonl', 'val.jsonl'))
    print(f"{folder}: {meta['train_rows']} train + {meta['val_rows']} val rows ({meta['format']}), skipped {dict(counts)}")
    return folder

# -----------------------------------------------------------------------------

def bench(cfg):
    """The whole `text` pipeline (cleaning + GPT-2 tokenization) on cfg['mb'] MB of synthetic documents."""
    import tempfile
    rng = np.random.default_rng(cfg['seed'])
    paras = []  # 1) paragraphs of real English: TinyStories from the mirror (or the network)
    for key in ('tinystories_val', 'tinystories_train'):
        with open_text(_fetch_source(key, os.path.join(cfg['data_dir'], '_downloads'))[0]) as f:
            paras += [p.split() for p in f.read(20_000_000).split('\n\n') if len(p.split()) > 20]
    vocab = np.array(sorted({w for p in paras[:5000] for w in p}), dtype=object)
    # 2) documents of 3-6 paragraphs with 15% of their words swapped, so they stay distinct (5-gram Jaccard
    #    ~0.2 between two that share paragraphs), and 2% of them twice, for dedup to find
    with tempfile.TemporaryDirectory() as tmp:
        path, size = os.path.join(tmp, 'bench.jsonl'), 0
        with open(path, 'w', encoding='utf-8') as f:
            while size < cfg['mb'] * 1e6:
                words = np.array([w for i in rng.integers(0, len(paras), rng.integers(3, 7)) for w in paras[i]], object)
                swap = rng.random(len(words)) < 0.15
                words[swap] = vocab[rng.integers(0, len(vocab), swap.sum())]
                line = json.dumps({'text': ' '.join(words)}) + '\n'
                size += f.write(line * (2 if rng.random() < 0.02 else 1))
        size = os.path.getsize(path)
        print(f"bench: {size / 1e6:.0f} MB of JSONL, num_proc={cfg['num_proc']}: cleaning + gpt2 tokenization ...")
        t0 = time.time()  # 3) the timed part: everything prepare('text') does
        prepare('text', **{**{k: cfg[k] for k in CONFIG_KEYS}, 'data_dir': tmp, 'input': path, 'tokenizer': 'gpt2'})
        dt = time.time() - t0
    print(f'bench: {size / 1e6:.0f} MB in {dt:.1f} s = {size / 1e6 / dt:.2f} MB/s; 1 GB would take {1e3 / (size / 1e6 / dt) / 60:.1f} min')

def main(argv):
    from nanolab.configurator import configure
    name, rest = (argv[0], argv[1:]) if argv and not argv[0].startswith('-') and not argv[0].endswith('.py') else (None, argv)
    if '--help' in rest or '-h' in rest:
        print(__doc__.split('\n\n')[1] + '\n')  # the commands, then configure() lists the settings
    config = configure(globals(), argv=rest, choices={'tokenizer': TOKENIZERS, 'doc_split': DOC_SPLITS,
                                                      'on_bad_file': ('error', 'skip')})
    if name is None:
        raise ValueError(f'name a dataset: python data.py NAME [--key=value ...] with NAME one of '
                         f'{", ".join([*DATASETS, *JSONL_SETS, "bench"])}')
    if name == 'bench':
        return bench(config)
    prepare(name, **config)

if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except ValueError as e:  # bad input: one line naming the problem and the fix, exit 1, no traceback
        raise SystemExit(f'error: {e}')
