"""
Datasets: fetch (local mirror first, then the network), clean, tokenize, and write what train.py
reads.

    python data.py shakespeare_char               # 65 chars, 1,003,854 / 111,540 tokens (nanoGPT)
    python data.py shakespeare                    # the same text, GPT-2 BPE
    python data.py tinystories --vocab_size=4096  # our own BPE (--tokenizer=gpt2: GPT-2's)
    python data.py openwebtext --max_tokens=100000000  # a slice, streamed from the Hugging Face Hub
    python data.py fineweb_edu --max_docs=100000  # also wikitext103, c4 (nanolab/hub_corpora.py)
    python data.py text --input=docs/,more/*.jsonl --out_name=mine --tokenizer=bpe --jaccard=0.85
    python data.py tokenizer --input=docs/ --vocab_size=32000 --out_name=mine  # train a tokenizer,
    python data.py text --input=docs/ --tokenizer=tokenizers/mine                # then use it
    python data.py alpaca                         # also chat, hh_rlhf, dpo_pairs (JSONL sets)
    python data.py tasks                          # the synthetic suite (tasks_base: its base text)
    python data.py bench --mb=100                 # the `text` pipeline's speed, whole and per step
    python data.py --help                         # every setting, with its default

The dataset's name is the first argument (or --dataset=NAME). data_dir/<name>/ gets train.bin and
val.bin (one flat token stream each) and meta.json, or train.jsonl and val.jsonl for the SFT and
preference sets; nanolab/datasets.py says what each holds and how `text` is cleaned and tokenized
in parallel. Trainers prepare a missing named dataset with these same settings, except the Hub
corpora (their command above; a stopped one goes on where it stopped when run again).
"""
import sys

from nanolab import bench_data, datasets, tokenizer_training
from nanolab.configurator import cli_errors, configure, fail

# -----------------------------------------------------------------------------
dataset = ''                  # shakespeare_char | shakespeare | tinystories | wikitext103 | openwebtext | c4 | fineweb_edu | text | tasks | tasks_base | alpaca | chat | hh_rlhf | dpo_pairs | bench | tokenizer
data_dir = 'data'             # datasets go to data_dir/<name>/, downloads to data_dir/_downloads/
tokenizer = 'auto'            # auto (char for shakespeare_char, bpe for tinystories, else gpt2) | char | gpt2 | bpe | a trained one's directory: tokenizers/NAME
vocab_size = 4096             # tokenizer=bpe and `tokenizer`: 256 bytes + merges (or pieces) + 5 special tokens
bpe_train_mb = 2.0            # tokenizer=bpe: MB of train text the merges are learned from (~15 s at 4096)
kind = 'bpe'                  # `tokenizer`: what it trains, bpe (byte-level, GPT-2's regex) | unigram
tokenizer_train_mb = 100.0    # `tokenizer`: MB of --input it learns from, the first in file order (32k BPE: ~20 s per 100 MB, 2 cores)
val_fraction = 0.1            # share held out for validation (by position for shakespeare, as nanoGPT)
seed = 1337                   # salts the per-document train/val hash; seeds the benchmark's text
max_tokens = 0                # Hub corpora: stop at the first document past this many tokens, train + val (0: all)
max_docs = 0                  # Hub corpora: at most this many documents, train + val (0: all); a published val split gets val_fraction of a cap
input = ''                    # text: comma-separated files, directories, globs; .txt .md .jsonl .json (.gz too)
text_field = 'text'           # text: the field of each .jsonl/.json row that holds the document
encoding = 'utf-8'            # text: how the input files are decoded (latin-1, cp1252, utf-16, ...)
on_bad_file = 'error'         # text: a file that does not decode: 'error' (stop, naming it) | 'skip' (counted); binary files are always skipped
doc_split = 'file'            # text: a .txt/.md file is one document | paragraph | line; <|endoftext|> always splits
out_name = 'text'             # text: the dataset folder, data_dir/<out_name>; `tokenizer`: tokenizers/<out_name>
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
mb = 100.0                    # bench: MB of synthetic text (each step is timed on its first 10 MB)
# -----------------------------------------------------------------------------
if '--help' in sys.argv or '-h' in sys.argv:
    print(__doc__.split('\n\n')[1] + '\n')  # the commands, then configure() lists the settings
CHOICES = {'dataset': ('', *datasets.DATASETS, *datasets.JSONL_SETS, 'bench', 'tokenizer'),
           'kind': tokenizer_training.KINDS, 'doc_split': datasets.DOC_SPLITS,
           'on_bad_file': ('error', 'skip')}  # tokenizer: also a path, checked by datasets.prepare
config = configure(globals(), positional='dataset', choices=CHOICES)
if not dataset:
    fail(f'name a dataset: python data.py NAME [--key=value ...] with NAME one of '
         f'{", ".join([*datasets.DATASETS, *datasets.JSONL_SETS, "bench", "tokenizer"])}')

if dataset == 'tokenizer':  # train one into tokenizers/<out_name> (nanolab/tokenizer_training.py)
    with cli_errors():
        tokenizer_training.main(config)
elif dataset != 'bench':  # prepare it (nothing to do when it is there with the same settings)
    with cli_errors():
        datasets.prepare(dataset, **config)
else:  # time the `text` pipeline, whole and step by step (nanolab/bench_data.py)
    with cli_errors():
        bench_data.run(config)
