"""
The Data tab's endpoints, which server.py routes beside page_api.py's: the prepared datasets under
the server's data directory (server.jobs.data_dir), and uploads of a text or JSONL file for
`data.py text` to prepare as a job.

    GET  /v1/datasets                 every folder with a meta.json: name, kind, tokenizer, counts
    GET  /v1/datasets/{name}?k=3&seed=0  its meta fields, a histogram of document lengths (tokens,
         over the first HIST_TOKENS of train.bin) and k random decoded samples of train and val
    POST /v1/uploads?name=FILE        the raw body (at most UPLOAD_BYTES, arriving at UPLOAD_RATE or
         faster) -> <data_dir>/_uploads/FILE
"""
import json
import os
import random
import re
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np

from nanolab.datasets import load_meta
from nanolab.files import inside, replacing
from nanolab.httpd import ApiError
from nanolab.tokenizer import EOT, from_spec

HIST_TOKENS = 4_000_000      # the histogram reads at most this many tokens of train.bin
SAMPLE_TOKENS = 160          # tokens per decoded sample
SAMPLE_CHARS = 1200          # characters per JSONL sample row
JSONL_BYTES = 8 << 20        # a JSONL set's samples come from its first 8 MB
UPLOAD_BYTES = 64 << 20      # the largest upload
UPLOAD_RATE = 256 << 10      # bytes/s: the slowest upload body waited for (64 MiB: 256 s)
UPLOAD_NAME = re.compile(r'[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}\.(txt|md|jsonl|json)')
META_FIELDS = ('name', 'format', 'vocab_size', 'dtype', 'train_tokens', 'val_tokens',
               'train_rows', 'val_rows', 'skipped', 'source', 'cleaning', 'created')

_TOKENIZERS = {}  # json of a tokenizer spec -> the tokenizer (a BPE's merges take a while)


def _tokenizer(spec):
    key = json.dumps(spec, sort_keys=True)
    if key not in _TOKENIZERS:
        if len(_TOKENIZERS) > 8:
            _TOKENIZERS.clear()
        _TOKENIZERS[key] = from_spec(spec)
    return _TOKENIZERS[key]


def _load(folder):
    """load_meta, and a ValueError for a meta.json that is not an object."""
    meta = load_meta(folder)
    if not isinstance(meta, dict):
        raise ValueError(f'{folder}/meta.json is not an object; prepare the dataset again')
    return meta


def _folder(h, raw):
    """The dataset folder named raw (a path segment, %-escaped), directly under the data dir."""
    root, name = h.server.jobs.data_dir, unquote(raw or '')
    full = os.path.realpath(os.path.join(root, name))
    if not name or name.startswith(('.', '_')) or '/' in name or '\\' in name or '\0' in name \
            or os.path.dirname(full) != root or not inside(full, [root]):
        raise ApiError(400, f"{name[:60]!r} is not a dataset name: a folder directly under the "
                       "data directory (--data_dir)", 'name', 'invalid_path')
    if not os.path.isfile(os.path.join(full, 'meta.json')):
        raise ApiError(404, f"no dataset {name[:60]!r} (no meta.json in it); GET /v1/datasets "
                       "lists them", 'name', 'not_found')
    try:
        return full, _load(full)
    except ValueError as e:  # unreadable meta.json, or its .bin/.jsonl files gone
        raise ApiError(400, str(e), 'name', 'damaged_dataset') from None


def _summary(name, meta):
    tok = meta.get('tokenizer') or {}
    return {'name': name, 'format': meta.get('format', 'tokens'),
            'tokenizer': tok.get('kind') if isinstance(tok, dict) else None,
            'tokenizer_name': tok.get('name') if isinstance(tok, dict) else None,
            'vocab_size': meta.get('vocab_size'),
            **{k: meta[k] for k in ('train_tokens', 'val_tokens', 'train_rows', 'val_rows')
               if k in meta}}


def _datasets(h, body):
    root, data, skipped = h.server.jobs.data_dir, [], []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        full = os.path.join(root, name)
        if name.startswith(('.', '_')) or not os.path.isfile(os.path.join(full, 'meta.json')):
            continue
        try:
            data.append(_summary(name, _load(full)))
        except (ValueError, AttributeError):  # AttributeError: a meta.json field of the wrong type
            skipped.append(name)
    h.send_json(200, {'object': 'list', 'data': data, 'skipped': skipped,
                      'upload_bytes': UPLOAD_BYTES})


def _histogram(ids, eot):
    """Document lengths in tokens (documents end at eot; the last one at the end of ids, maybe cut)
    in power-of-two bins: counts[i] documents have [2^i, 2^(i+1)) tokens."""
    ends = np.flatnonzero(ids == eot) if eot is not None else np.array([], dtype=np.int64)
    starts = np.concatenate([[0], ends + 1])
    lengths = np.concatenate([ends, [len(ids)]]) - starts
    lengths = lengths[lengths > 0]
    counts = np.bincount(np.log2(lengths).astype(np.int64)) if len(lengths) else np.zeros(0)
    return {'documents': int(len(lengths)), 'counts': counts.tolist(),
            'bins': [[1 << i, (1 << (i + 1)) - 1] for i in range(len(counts))],
            'mean': float(lengths.mean()) if len(lengths) else 0.0}


def _decode(tok, ids):
    """ids as text, each end of a document written on a line of its own as <|endoftext|>."""
    if tok.eot is None:
        return tok.decode(ids)
    cuts = [-1, *(i for i, t in enumerate(ids) if t == tok.eot), len(ids)]
    return f'\n{EOT}\n'.join(tok.decode(ids[a + 1:b]) for a, b in zip(cuts, cuts[1:]))


def _dataset(h, body):
    """One dataset: its meta fields, and the histogram and samples the page draws; k (0-10) and
    seed pick the samples, the same ones for the same seed."""
    folder, meta = _folder(h, h.path_id)
    k, seed = body.get('k', '3'), body.get('seed', '0')
    if not (k.isascii() and k.isdigit() and int(k) <= 10 and seed.isascii() and seed.isdigit()
            and len(seed) <= 12):
        raise ApiError(400, "'k' must be 0 to 10 and 'seed' a whole number", 'k', 'invalid_value')
    rng, k = random.Random(int(seed)), int(k)
    out = {**{f: meta[f] for f in META_FIELDS if f in meta}, **_summary(meta.get('name'), meta),
           'name': os.path.basename(folder), 'samples': {}}
    if 'train_tokens' not in meta:  # a JSONL set: k random rows of each split's first 8 MB
        for split in ('train', 'val'):
            with open(os.path.join(folder, f'{split}.jsonl'), encoding='utf-8',
                      errors='replace') as f:
                rows = f.read(JSONL_BYTES).splitlines()[:-1 if f.read(1) else None]
            out['samples'][split] = [r[:SAMPLE_CHARS] for r in rng.sample(rows, min(k, len(rows)))]
        return h.send_json(200, out)
    try:
        tok = _tokenizer(meta['tokenizer'])
        dtype = np.dtype(meta.get('dtype', 'uint16'))
    except (ValueError, TypeError, KeyError) as e:
        raise ApiError(400, f"{folder}: its tokenizer cannot be loaded ({e})", 'name',
                       'damaged_dataset') from None
    try:
        _tokens(out, folder, tok, dtype, k, rng)
    # a torn .bin (not whole tokens), ids past the vocabulary
    except (ValueError, KeyError, IndexError, OverflowError) as e:
        raise ApiError(400, f"{folder}: its token files do not read ({e}); prepare it again", 'name',
                       'damaged_dataset') from None
    h.send_json(200, out)


def _tokens(out, folder, tok, dtype, k, rng):
    """out['histogram'] of train.bin's first HIST_TOKENS, and k decoded samples of each split."""
    bins = {s: np.memmap(os.path.join(folder, f'{s}.bin'), dtype, mode='r')
            if os.path.getsize(os.path.join(folder, f'{s}.bin')) else np.zeros(0, dtype)
            for s in ('train', 'val')}
    prefix = np.asarray(bins['train'][:HIST_TOKENS])
    out['histogram'] = {**_histogram(prefix, tok.eot), 'tokens_read': int(len(prefix)),
                        'limit': HIST_TOKENS, 'eot': tok.eot}
    for split, ids in bins.items():
        picks = []
        for _ in range(k if len(ids) else 0):
            i = rng.randrange(max(1, len(ids) - SAMPLE_TOKENS))
            picks.append({'offset': i, 'text': _decode(tok, ids[i:i + SAMPLE_TOKENS].tolist())})
        out['samples'][split] = picks


def _upload(h, body):
    """The raw body, a text or JSONL file of at most UPLOAD_BYTES, as <data_dir>/_uploads/NAME
    (written whole or not at all) -> {path, name, bytes}, the path to give `data.py text --input`.
    Content-Type application/octet-stream: a cross-site page cannot send that without asking."""
    name = parse_qs(urlsplit(h.path).query).get('name', [''])[-1]
    if not UPLOAD_NAME.fullmatch(name) or '..' in name:
        raise ApiError(400, f"upload name {name[:60]!r}: letters, digits, '-', '_' and '.', "
                       "ending in .txt, .md, .jsonl or .json", 'name', 'invalid_value')
    if 'Transfer-Encoding' in h.headers:
        raise ApiError(400, "send the file with a Content-Length header", None, 'bad_length')
    n = h.content_length()
    if n > UPLOAD_BYTES:  # before reading any of it
        raise ApiError(413, f"the file has {n} bytes, over the {UPLOAD_BYTES} byte upload limit",
                       None, 'request_too_large')
    ctype = h.headers.get('Content-Type', '').split(';')[0].strip().lower()
    if ctype != 'application/octet-stream':
        raise ApiError(415, "send the file with 'Content-Type: application/octet-stream'", None,
                       'unsupported_media_type')
    # subtle: the request's deadline (read_timeout, 10 s) would cut 64 MiB over Wi-Fi or from
    # another machine; the body gets time for its size at UPLOAD_RATE, so a client trickling
    # bytes is still cut (slowloris), only later
    h.server.deadline(h.connection, h.server.read_timeout + n / UPLOAD_RATE)
    path = os.path.join(h.server.jobs.data_dir, '_uploads', name)
    with replacing(path) as tmp, open(tmp, 'wb') as f:
        left = n
        while left:
            part = h.rfile.read(min(left, 1 << 20))
            if not part:
                raise ApiError(400, f'the body ended {left} bytes early', None, 'bad_length')
            f.write(part)
            left -= len(part)
        h.body_read = True
    h.server.deadline(h.connection, None)
    h.send_json(200, {'name': name, 'path': path, 'bytes': n})


ROUTES = {'/v1/datasets': ('GET', _datasets), '/v1/datasets/{id}': ('GET', _dataset),
          '/v1/uploads': ('POST', _upload)}
