"""
Learning byte-level BPE merges from text: the training half of tokenizer.BPETokenizer (whose
`train` calls learn_merges), after minbpe's RegexTokenizer.

  1) a regex splits the text into chunks (words, numbers, punctuation, whitespace), so a merge never
     spans e.g. a word and the punctuation after it; each distinct chunk is counted once
  2) each chunk is its UTF-8 bytes, ids 0..255
  3) the most frequent adjacent pair joins into a new id 256, 257, ..., and only the chunks holding
     it are recounted
"""
from collections import Counter

import regex  # tiktoken's own dependency; the stdlib `re` has no \p{L} (letter) classes


def merge(ids, pair, idx):
    """Replace each non-overlapping occurrence of pair in ids, left to right, with idx."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(idx)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _add_pairs(stats, ids, n):
    """Add n to the count of every adjacent pair in ids (n < 0 removes a word's old pairs)."""
    for pair in zip(ids, ids[1:]):
        stats[pair] += n
        if not stats[pair]:
            del stats[pair]


def learn_merges(text, num_merges, pattern, n_special=0, verbose=False):
    """The first num_merges merges of text, split by the regex pattern -> [(a, b)], merge i making
    id 256 + i. n_special: the special tokens that will follow (for the error's vocab_size)."""
    # 1) BPE works inside chunks, so count each distinct chunk once: 'the' x 10,000 is one list
    chunks = Counter(regex.findall(pattern, text))
    words, counts = [list(c.encode('utf-8')) for c in chunks], list(chunks.values())
    stats = Counter()  # (a, b) -> occurrences in the text
    for w, n in zip(words, counts):
        _add_pairs(stats, w, n)
    merges, vocab = [], [bytes([b]) for b in range(256)]
    for i in range(num_merges):
        if not stats:
            raise ValueError(f'the text ran out of pairs to merge after {i} merges; give more text or use '
                             f'vocab_size <= {256 + i + n_special}')
        # 2) the most frequent pair; ties go to the smallest ids, so training is deterministic
        pair = max(stats, key=lambda p: (stats[p], -p[0], -p[1]))
        if verbose:
            print(f'merge {i + 1}/{num_merges}: {pair} -> {256 + i} '
                  f'{vocab[pair[0]] + vocab[pair[1]]!r} ({stats[pair]} times)')
        # 3) merge it in the words that contain it, updating the counts of those words only
        #    (recounting every pair after each merge is what makes naive training slow)
        for j, w in enumerate(words):
            if pair[0] in w and len(new := merge(w, pair, 256 + i)) < len(w):
                _add_pairs(stats, w, -counts[j])
                _add_pairs(stats, new, counts[j])
                words[j] = new
        merges.append(pair)
        vocab.append(vocab[pair[0]] + vocab[pair[1]])
    return merges
