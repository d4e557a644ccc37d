"""
Datasets: fetch (local mirror first, then the network), clean, tokenize, and write what train.py
reads.

    python data.py shakespeare_char               # 65 chars, 1,003,854 / 111,540 tokens (nanoGPT)
    python data.py shakespeare                    # the same text, GPT-2 BPE
    python data.py tinystories --vocab_size=4096  # our own BPE (--tokenizer=gpt2: GPT-2's)
    python data.py text --input=docs/,more/*.jsonl --out_name=mine --tokenizer=bpe --jaccard=0.85
    python data.py alpaca                         # also chat, hh_rlhf, dpo_pairs (JSONL sets)
    python data.py tasks                          # the synthetic suite (tasks_base: its base text)
    python data.py bench --mb=100                 # time the `text` pipeline on synthetic text
    python data.py --help                         # every setting, with its default

The dataset's name is the first argument (or --dataset=NAME). data_dir/<name>/ gets train.bin and
val.bin (one flat token stream each) and meta.json, or train.jsonl and val.jsonl for the SFT and
preference sets; nanolab/datasets.py says what each holds and how `text` is cleaned and tokenized
in parallel. Trainers prepare a missing named dataset with these same settings.
"""
import json
import os
import sys
import tempfile
import time

import numpy as np

from nanolab import datasets
from nanolab.configurator import cli_errors, configure, fail
from nanolab.downloads import fetch_source
from nanolab.formats import open_text

# -----------------------------------------------------------------------------
dataset = ''                  # shakespeare_char | shakespeare | tinystories | text | tasks | tasks_base | alpaca | chat | hh_rlhf | dpo_pairs | bench
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
if '--help' in sys.argv or '-h' in sys.argv:
    print(__doc__.split('\n\n')[1] + '\n')  # the commands, then configure() lists the settings
CHOICES = {'dataset': ('', *datasets.DATASETS, *datasets.JSONL_SETS, 'bench'),
           'tokenizer': datasets.TOKENIZERS, 'doc_split': datasets.DOC_SPLITS,
           'on_bad_file': ('error', 'skip')}
config = configure(globals(), positional='dataset', choices=CHOICES)
if not dataset:
    fail(f'name a dataset: python data.py NAME [--key=value ...] with NAME one of '
         f'{", ".join([*datasets.DATASETS, *datasets.JSONL_SETS, "bench"])}')

if dataset != 'bench':  # prepare it (nothing to do when it is there with the same settings)
    with cli_errors():
        datasets.prepare(dataset, **config)
else:
    # the whole `text` pipeline (cleaning + GPT-2 tokenization) on `mb` MB of synthetic documents
    rng = np.random.default_rng(seed)
    paras = []  # 1) paragraphs of real English: TinyStories from the mirror (or the network)
    with cli_errors():
        for key in ('tinystories_val', 'tinystories_train'):
            with open_text(fetch_source(key, os.path.join(data_dir, '_downloads'))[0]) as f:
                paras += [p.split() for p in f.read(20_000_000).split('\n\n')
                          if len(p.split()) > 20]
    vocab = np.array(sorted({w for p in paras[:5000] for w in p}), dtype=object)
    # 2) documents of 3-6 paragraphs with 15% of their words swapped, so they stay distinct (5-gram
    #    Jaccard ~0.2 between two that share paragraphs), and 2% of them twice, for dedup to find
    with tempfile.TemporaryDirectory() as tmp:
        path, size = os.path.join(tmp, 'bench.jsonl'), 0
        with open(path, 'w', encoding='utf-8') as f:
            while size < mb * 1e6:
                words = np.array([w for i in rng.integers(0, len(paras), rng.integers(3, 7))
                                  for w in paras[i]], object)
                swap = rng.random(len(words)) < 0.15
                words[swap] = vocab[rng.integers(0, len(vocab), swap.sum())]
                line = json.dumps({'text': ' '.join(words)}) + '\n'
                size += f.write(line * (2 if rng.random() < 0.02 else 1))
        size = os.path.getsize(path)
        print(f"bench: {size / 1e6:.0f} MB of JSONL, num_proc={num_proc}: "
              "cleaning + gpt2 tokenization ...")
        t0 = time.time()  # 3) the timed part: everything prepare('text') does
        datasets.prepare('text', **{**config, 'data_dir': tmp, 'input': path, 'tokenizer': 'gpt2'})
        dt = time.time() - t0
    print(f'bench: {size / 1e6:.0f} MB in {dt:.1f} s = {size / 1e6 / dt:.2f} MB/s; '
          f'1 GB would take {1e3 / (size / 1e6 / dt) / 60:.1f} min')
