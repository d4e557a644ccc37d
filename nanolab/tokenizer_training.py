"""
Tokenizer training at scale: a 32k-token byte-level BPE (or a Unigram) learned from hundreds of MB
by Hugging Face `tokenizers` (Rust), saved as a Hugging Face tokenizer directory that every script
reads (tokenizer.HFTokenizer): a dataset's tokenizer, the HF export, the GGUF export.

    python data.py tokenizer --input=corpus/ --vocab_size=32000 --out_name=mine  # tokenizers/mine
    python data.py text --input=corpus/ --tokenizer=tokenizers/mine              # use it
    tk = train(texts, vocab_size=32000)                     # a tokenizers.Tokenizer, in Python

The BPE is our BPETokenizer's scheme and GPT-2's (bpe_training.py is the readable version, which
issue 30 saw take 4.6 s for 1,024 tokens from 1.1 MB, and hours at 32k from hundreds of MB):
GPT-2's regex splits the text into chunks, each chunk is its UTF-8 bytes (so any text encodes and
every byte round-trips), and the most frequent adjacent pair is merged until vocab_size; ids are
the 256 bytes, the merges in order, then <|endoftext|> and the four chat tokens (SPECIALS), as
BPETokenizer.train numbers them. On text whose pair counts never tie, the merges equal ours
(tests/test_tokenizer_training.py); at a tie ours takes the smallest byte ids, `tokenizers` the
smallest of its own ids, which number the bytes in the order of their printable stand-ins
(bytes_to_unicode), so on real text the two part at the first tie the orders settle differently
(merge 242 of 1 MB of TinyStories). --kind=unigram learns a Unigram LM (Kudo 2018) over the same
byte-level chunks instead.

What it learns from: the first tokenizer_train_mb MB of --input (files in order, read as `data.py
text` reads them: .txt .md .jsonl .json, .gz too), uncleaned; each document is pre-tokenized on
its own, as the dataset will tokenize it, and a long one is cut into ~8 KB pieces where GPT-2's
regex splits anyway (SAFE_CUT), so that all cores work on it.

Which trainer. Measured on the 2-core dev CPU (lscpu: AMD EPYC), shared with another job, so each
figure is the range of 2-3 runs; vocab 32,000; 100 MB of synthetic English (TinyStories and
wikitext-2 paragraphs drawn at random, 15% of their words swapped for others and 5% given a typo:
298k distinct chunks); bytes per token on 2 MB held out (TinyStories valid + wikitext-2 test):

    trainer                           seconds  peak RAM  bytes/token
    tokenizers BPE (this module)       17-21    0.6 GB      4.29
    sentencepiece BPE                   5-10    0.4 GB      4.29
    tokenizers Unigram (--kind)        33-85    0.6 GB      3.38
    sentencepiece Unigram              40-55    2.1 GB      4.12

    python data.py tokenizer --input=t100.txt --vocab_size=32000 [--kind=unigram]
    spm.SentencePieceTrainer.train(input='t100.txt', vocab_size=32000, model_type=...,
                                   byte_fallback=True, num_threads=2, input_sentence_size=0)

Without the typos (27k distinct chunks) the BPEs took 11 s and 5.5 s. sentencepiece trains faster,
but we use `tokenizers`: its BPE is byte-level with GPT-2's regex, the scheme of our own BPE (so the
two are checked merge for merge), of tiktoken's gpt2 and of GGUF's 'gpt2' tokenizer, which
gguf_export.py writes as it is; it saves the tokenizer.json that HFTokenizer and transformers load,
where a sentencepiece model needs converting, and its vocabulary (spaces as U+2581, <0xNN> byte
tokens) is GGUF's 'llama' kind, which we do not write; and it meets the goal, a 32k vocabulary from
100 MB in well under a minute here. Its Unigram compresses worse than sentencepiece's on this text,
so bpe is the default.
"""
import hashlib
import itertools
import json
import os
import shutil
import time
from datetime import datetime, timezone

import regex

from nanolab import datasets
from nanolab.files import remove_stale, write_text
from nanolab.tokenizer import CHAT_TOKENS, EOT, HFTokenizer

KINDS = ('bpe', 'unigram')
SPECIALS = (EOT, *CHAT_TOKENS)  # after the learned vocabulary, as BPETokenizer.train numbers them
ROOT = 'tokenizers'             # tokenizers/<out_name>, relative to the working directory
# a longer document goes to the trainer in pieces of about PIECE_CHARS (measured: `tokenizers`
# learns 20 MB in 4.9 s from 8 KB pieces, 6.1 s from 64 KB ones, 10.6 s from 1 MB ones), cut where
# GPT-2's chunks stay the same: between a non-space char and whitespace, as no chunk holds
# whitespace after a non-space char (GPT2_SPLIT_PATTERN's one lookahead looks past whitespace runs
# that end before the cut)
PIECE_CHARS = 1 << 13
SAFE_CUT = regex.compile(r'(?<=\S)(?=\s)')


def train(texts, vocab_size, kind='bpe'):
    """A tokenizers.Tokenizer learned from texts (an iterable of str, each pre-tokenized on its
    own) with vocab_size ids in all: what it learns (the 256 bytes first for bpe), then SPECIALS."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    _check(vocab_size, kind)
    learned = vocab_size - len(SPECIALS)
    # 1) byte-level: GPT-2's regex (use_regex: GPT2_SPLIT_PATTERN), then each byte as a printable
    #    char; all 256 of them are in the vocabulary, seen in the text or not
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if kind == 'bpe':
        # subtle: no special tokens in the trainer, which would put them at ids 0..4
        tk, trainer = Tokenizer(models.BPE()), trainers.BpeTrainer(
            vocab_size=learned, min_frequency=0, initial_alphabet=alphabet, show_progress=False)
    else:
        tk, trainer = Tokenizer(models.Unigram()), trainers.UnigramTrainer(
            vocab_size=learned, initial_alphabet=alphabet, show_progress=False)
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    # 2) learn (all cores: the chunks of each text are counted in parallel)
    tk.train_from_iterator(texts, trainer)
    got = tk.get_vocab_size()
    if got < learned:
        what = 'merges' if kind == 'bpe' else 'pieces'
        raise ValueError(f'the text holds only {got - 256} {what} beyond the bytes, not '
                         f'{learned - 256}: give more text (--input, '
                         f'--tokenizer_train_mb) or use vocab_size <= {got + len(SPECIALS)}')
    # 3) the special tokens, right after: never produced from text (HFTokenizer.encode)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tk


def _check(vocab_size, kind):
    if kind not in KINDS:
        raise ValueError(f'kind={kind!r} is one of {", ".join(KINDS)}')
    if vocab_size < 256 + len(SPECIALS):
        raise ValueError(f'vocab_size={vocab_size} is too small: raise it to at least '
                         f'{256 + len(SPECIALS)} (256 byte tokens + {len(SPECIALS)} special '
                         'tokens)')


def hf_files(tk):
    """The Hugging Face directory's files {name: text} for tk: tokenizer.json and a
    tokenizer_config.json as hf.save_tokenizer_files writes ours (eos <|endoftext|>, the chat
    template with the chat tokens), so transformers' AutoTokenizer loads it with our ids."""
    files = {'tokenizer.json': tk.to_str()}
    chat = HFTokenizer('', files=files).chat_jinja()
    config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'add_prefix_space': False,
              'clean_up_tokenization_spaces': False, 'chat_template': chat,
              'bos_token': EOT, 'eos_token': EOT, 'unk_token': EOT}
    return {**files, 'tokenizer_config.json': json.dumps(config, indent=2)}


def _pieces(docs, limit, sample):
    """The trainer's texts: docs, each alone, up to `limit` chars in all; a long one cut at SAFE_CUT
    points into pieces of about PIECE_CHARS. The first ~1 MB is also kept in `sample`."""
    total = 0
    for doc in docs:
        start = 0
        while start < len(doc) and total < limit:
            cut = SAFE_CUT.search(doc, start + PIECE_CHARS) if len(doc) - start > PIECE_CHARS \
                else None
            piece = doc[start:cut.start() if cut else len(doc)][:int(limit - total)]
            if total < 1e6:
                sample.append(piece[:int(1e6)])
            start, total = start + len(piece), total + len(piece)
            yield piece
        if total >= limit:
            return


def main(cfg):
    """`python data.py tokenizer`: train on the first tokenizer_train_mb MB of cfg['input'] and
    save tokenizers/<out_name> (a directory, written whole or not at all). -> its path."""
    name, kind, cap = cfg['out_name'], cfg['kind'], cfg['tokenizer_train_mb'] * 1e6
    _check(cfg['vocab_size'], kind)
    if not name or name in ('.', '..') or os.path.basename(name) != name:
        raise ValueError(f'out_name={name!r} must be a plain name: the tokenizer goes to '
                         f'{ROOT}/NAME')
    if not str(cfg['input']).strip():
        raise ValueError('`tokenizer` needs --input: files, directories or globs, comma-separated, '
                         'e.g. --input=corpus/,x/*.jsonl')
    if not cap > 0:
        raise ValueError(f"tokenizer_train_mb={cfg['tokenizer_train_mb']} must be > 0")
    # 1) the input files that hold the slice: twice its size in file bytes (JSON has markup; a .gz
    #    holds more text than its size), each checked to be text first (datasets._usable_files)
    files, size = [], 0
    for path in datasets._input_files(cfg['input']):
        if size < 2 * cap:
            files.append(path)
            size += os.path.getsize(path)
    files, _ = datasets._usable_files(files, cfg)
    stat = [(p, os.path.getsize(p), os.path.getmtime(p)) for p in files]
    settings = {'kind': kind, 'vocab_size': cfg['vocab_size'], 'specials': list(SPECIALS),
                'tokenizer_train_mb': cfg['tokenizer_train_mb'],
                **{k: cfg[k] for k in ('text_field', 'doc_split', 'encoding')},
                'inputs': hashlib.sha256(json.dumps(stat).encode()).hexdigest()}
    # 2) an existing directory is kept when it was trained with these settings, else refused
    folder = os.path.join(ROOT, name)
    if os.path.exists(folder):
        try:
            with open(os.path.join(folder, 'training.json'), encoding='utf-8') as f:
                same = json.load(f).get('settings') == settings
        except (OSError, ValueError):
            same = False
        if same:
            print(f'{folder} is up to date (same settings and input); delete it to train it again')
            return folder
        raise ValueError(f'{folder} already holds a tokenizer, made from other settings or input; '
                         f'pick another --out_name, or delete it (rm -r {folder}) and run again')
    # 3) learn from the slice, timed
    sample = []
    print(f"training a {cfg['vocab_size']}-token {kind} on up to {cap / 1e6:g} MB of "
          f"{len(files)} file(s) ...")
    t0 = time.time()
    pieces = _pieces(datasets._read_docs(files, cfg), cap, sample)
    if (first := next(pieces, None)) is None:
        raise ValueError(f"--input={cfg['input']} holds no text to learn from")
    tk = train(itertools.chain([first], pieces), cfg['vocab_size'], kind)
    seconds = time.time() - t0
    # bytes per token of (up to) 1 MB of the training text: a sanity figure, not a held-out one
    n = sum(len(e.ids) for e in tk.encode_batch(sample, add_special_tokens=False))
    bpt = sum(len(s.encode('utf-8')) for s in sample) / max(n, 1)
    # 4) the directory: written beside its place, then renamed into it
    record = {'settings': settings, 'input': cfg['input'], 'files': files[:100],
              'seconds': round(seconds, 1), 'bytes_per_token': round(bpt, 3),
              'created': datetime.now(timezone.utc).isoformat(timespec='seconds')}
    _write_dir(folder, {**hf_files(tk), 'training.json': json.dumps(record, indent=1)})
    print(f'{folder}: {tk.get_vocab_size()} tokens ({kind}) in {seconds:.1f} s, '
          f'{bpt:.2f} bytes/token on 1 MB of its text; use it: --tokenizer={folder}')
    return folder


def _write_dir(folder, files):
    """folder holding files {name: text}, or nothing: each file is written (fsynced) into a temp
    directory beside it, which is then renamed to folder."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    remove_stale(parent)  # what a killed run left
    tmp = f'{folder}.{os.getpid()}.tmp'
    try:
        os.makedirs(tmp)
        for fname, text in files.items():
            write_text(os.path.join(tmp, fname), text)
        os.rename(tmp, folder)  # subtle: fails, not replaces, if a full folder appeared meanwhile
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
