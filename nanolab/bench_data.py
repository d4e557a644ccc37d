"""
`python data.py bench`: how fast the `text` pipeline prepares a corpus (datasets.prepare:
cleaning.py's steps and tokenization in num_proc worker processes), whole and step by step, on
synthetic English.

    python data.py bench --mb=100               # ~1.5 min on 2 cores: the pipeline, then each step
    python data.py bench --mb=2 --num_proc=1    # a quick look

The text: documents of 3-6 TinyStories paragraphs with 15% of their words swapped, so they stay
distinct (5-gram Jaccard ~0.2 between two that share paragraphs), and 2% of them twice, for dedup to
find. First the whole pipeline runs on `mb` MB of it as JSONL. Then each step runs alone in this
process on the first STEP_MB MB: MB/s on one core. Tokenizing is timed as the workers do it
(tiktoken's Rust core, into an array), with GPT-2's BPE and with a 32k byte-level BPE trained here,
each beside the reference: a plain Hugging Face `tokenizers` encode_batch of the same text, on one
thread like the rest.
"""
import json
import os
import random
import tempfile
import time
from collections import Counter

import numpy as np

from nanolab import cleaning, datasets, tokenizer_training
from nanolab.downloads import fetch_source
from nanolab.formats import open_text
from nanolab.tokenizer import HFTokenizer, TiktokenTokenizer

STEP_MB = 10       # MB of the text each step is timed on
BPE_VOCAB = 32000  # the trained BPE's vocabulary
BPE_TRAIN_MB = 4   # MB it learns from: the first documents, 5% of their words given a typo (the
# bench text's vocabulary is TinyStories', which holds ~14k merges; typos make it hold 32k)


def documents(seed, downloads):
    """Endless (text, copies): the bench's documents, the same for the same seed."""
    rng = np.random.default_rng(seed)
    paras = []  # paragraphs of real English: TinyStories from the mirror (or the network)
    for key in ('tinystories_val', 'tinystories_train'):
        with open_text(fetch_source(key, downloads)[0]) as f:
            paras += [p.split() for p in f.read(20_000_000).split('\n\n') if len(p.split()) > 20]
    vocab = np.array(sorted({w for p in paras[:5000] for w in p}), dtype=object)
    while True:
        words = np.array([w for i in rng.integers(0, len(paras), rng.integers(3, 7))
                          for w in paras[i]], object)
        swap = rng.random(len(words)) < 0.15
        words[swap] = vocab[rng.integers(0, len(vocab), swap.sum())]
        yield ' '.join(words), 2 if rng.random() < 0.02 else 1


def _timed(fn, repeats=2):
    """fn's best time in seconds."""
    best = float('inf')
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _one_thread(tk, texts):
    """`tokenizers`' encode_batch on one thread (its default is every core)."""
    before = os.environ.get('TOKENIZERS_PARALLELISM')
    os.environ['TOKENIZERS_PARALLELISM'] = 'false'
    try:
        return tk.encode_batch(texts, add_special_tokens=False)
    finally:
        if before is None:
            del os.environ['TOKENIZERS_PARALLELISM']
        else:
            os.environ['TOKENIZERS_PARALLELISM'] = before


def _first(texts, mb):
    """The first texts, up to about mb MB of chars."""
    out, chars = [], 0
    for text in texts:
        if chars >= mb * 1e6:
            break
        out.append(text)
        chars += len(text)
    return out


def run(cfg: dict):
    """Write the bench text, time datasets.prepare('text') on it, then each step; print both."""
    mb, num_proc = cfg['mb'], cfg['num_proc']
    docs = documents(cfg['seed'], os.path.join(cfg['data_dir'], '_downloads'))
    head, head_chars = [], 0  # the first documents, for the steps and the BPE
    with tempfile.TemporaryDirectory() as tmp:
        # 1) the whole pipeline: everything prepare('text') does, with GPT-2's tokenizer
        path, size = os.path.join(tmp, 'bench.jsonl'), 0
        with open(path, 'w', encoding='utf-8') as f:
            while size < mb * 1e6:
                text, copies = next(docs)
                size += f.write((json.dumps({'text': text}) + '\n') * copies)
                if head_chars < max(STEP_MB, BPE_TRAIN_MB) * 1e6:
                    head += [text] * copies
                    head_chars += len(text) * copies
        size = os.path.getsize(path) / 1e6
        print(f'bench: {size:.3g} MB of JSONL, num_proc={num_proc}: cleaning + gpt2 '
              'tokenization ...')
        t0 = time.time()
        datasets.prepare('text', **{**cfg, 'data_dir': tmp, 'input': path, 'tokenizer': 'gpt2'})
        dt = time.time() - t0
    print(f'bench: {size:.3g} MB in {dt:.1f} s = {size / dt:.2f} MB/s; '
          f'1 GB would take {1e3 / (size / dt) / 60:.1f} min')

    # 2) the text for the steps, and the tokenizers: GPT-2's as the workers run it (tiktoken) and
    #    as Hugging Face files (hf.py's export), and a BPE learned from typo'd text
    while head_chars < BPE_TRAIN_MB * 1e6:  # a short bench: more of the same documents
        text, copies = next(docs)
        head += [text] * copies
        head_chars += len(text) * copies
    sample = _first(head, min(mb, STEP_MB))
    sample_mb = sum(map(len, sample)) / 1e6
    from nanolab.hf import save_tokenizer_files  # torch: only here
    gpt2 = TiktokenTokenizer('gpt2')
    with tempfile.TemporaryDirectory() as tmp:
        save_tokenizer_files(gpt2, tmp)
        gpt2_hf = HFTokenizer(tmp).tk
    rng = random.Random(cfg['seed'])

    def typo(word):  # a letter put in somewhere
        i = rng.randrange(len(word) + 1)
        return word[:i] + rng.choice('etaoinshrdlu') + word[i:]

    learn = [' '.join(typo(w) if rng.random() < 0.05 else w for w in text.split(' '))
             for text in _first(head, BPE_TRAIN_MB)]
    t0 = time.time()
    bpe_hf = HFTokenizer('', files=tokenizer_training.hf_files(
        tokenizer_training.train(learn, BPE_VOCAB)))
    print(f'bench: a {BPE_VOCAB}-token BPE learned from {BPE_TRAIN_MB} MB in '
          f'{time.time() - t0:.1f} s (all cores)')
    bpe = bpe_hf.to_tiktoken()  # the same ids on tiktoken's core, as the workers encode

    # 3) each step alone, over the same documents
    clean = {k: cfg[k] for k in datasets.CLEAN_KEYS}
    normed = [cleaning.normalize(d) for d in sample]
    sigs, lsh = cleaning.minhash(normed), cleaning.Deduper(clean)
    dtype = np.uint16 if gpt2.vocab_size < 65536 else np.uint32

    def dedup():  # a fresh index each time
        dd = cleaning.Deduper(clean)
        for t, s, b in zip(normed, sigs, dd.band_keys(sigs)):
            dd.check(cleaning.doc_key(t), s, b)

    def as_workers(enc):
        return lambda: [enc.encode_to_numpy(t, disallowed_special=()).astype(dtype)
                        for t in normed]

    steps = [('1) normalize', lambda: [cleaning.normalize(d) for d in sample]),
             ('2) quality', lambda: [cleaning.quality_problem(t, clean) for t in normed]),
             ('3) lang_filter', lambda: [cleaning.english_ratio(t) for t in normed]),
             ('4) pii', lambda: [cleaning.scrub_pii(t, Counter()) for t in normed]),
             ('1-4) together, as clean_doc', lambda: [cleaning.clean_doc(d, clean, Counter())
                                                       for d in sample]),
             ('5-6) minhash + LSH bands', lambda: lsh.band_keys(cleaning.minhash(normed))),
             ('5-6) dedup: keys, index, checks', dedup),
             ('gpt2: tiktoken, as the workers', as_workers(gpt2.enc)),
             ('gpt2: tokenizers (reference)', lambda: _one_thread(gpt2_hf, normed)),
             (f'{BPE_VOCAB // 1000}k BPE: tiktoken, as the workers', as_workers(bpe)),
             (f'{BPE_VOCAB // 1000}k BPE: tokenizers (reference)',
              lambda: _one_thread(bpe_hf.tk, normed))]
    print(f'bench: each step alone on one core, over the first {sample_mb:.1f} MB '
          f'({len(sample):,} documents), best of 2:')
    print(f"  {'step':<36} {'s':>6} {'MB/s':>7}")
    seconds = {}
    for name, fn in steps:
        seconds[name] = _timed(fn)
        print(f'  {name:<36} {seconds[name]:6.2f} {sample_mb / seconds[name]:7.1f}')
    # the references tokenize as the workers do
    for name, enc, tk in (('gpt2', gpt2.enc, gpt2_hf), ('BPE', bpe, bpe_hf.tk)):
        if [e.ids for e in _one_thread(tk, normed)] != [a.tolist() for a in as_workers(enc)()]:
            print(f'  (the {name} reference gives other ids than tiktoken on this text)')
    # what one worker does per document: clean_doc, minhash, GPT-2's tokens; num_proc of them are
    # the pipeline's ceiling, less what this process does (read, dedup, write)
    worker = sum(seconds[k] for k in ('1-4) together, as clean_doc', '5-6) minhash + LSH bands',
                                      'gpt2: tiktoken, as the workers'))
    print(f"  {'a worker: clean_doc, minhash, gpt2':<36} {worker:6.2f} {sample_mb / worker:7.1f}")
    print(f"  {f'num_proc={num_proc} of them: the ceiling':<36} {'':>6} "
          f'{num_proc * sample_mb / worker:7.1f}')
