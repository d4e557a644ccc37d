"""
Cleaning for custom corpora (`python data.py text`): six steps, each on by default and switched by
a data.py flag of the same name. Steps 1-4 look at one document at a time (clean_doc, which
datasets.py runs in worker processes); steps 5-6 compare documents in corpus order (Deduper, in the
main process), so the first copy of a duplicate is the one kept.

  1) normalize    Unicode NFC, '\\r\\n' -> '\\n', control and zero-width chars dropped, ends
                  stripped
  2) quality      Gopher's heuristics (Rae et al. 2021, appendix A.1.1): word count, symbol ratio,
                  repeated lines, mean word length
  3) lang_filter  English only, by the share of English function words: Gopher's stop-word rule
                  as a ratio, so it needs no model or extra dependency
  4) pii          emails, phone numbers, IPv4 addresses and card numbers that pass the Luhn check
                  -> <EMAIL> <PHONE> <IP_ADDRESS> <CARD_NUMBER>
  5) dedup        exact duplicates: a 128-bit hash of the text after steps 1-4
  6) near_dedup   MinHash (Broder 1997) of word 5-gram shingles, LSH banding (Leskovec, Rajaraman
                  and Ullman, Mining of Massive Datasets, ch. 3), each candidate verified against
                  the signature

clean_corpus() runs all six in one process: the reference that the tests and the BPE sample use.
"""
import hashlib
import re
import unicodedata
from collections import Counter
from itertools import repeat

import numpy as np

# MinHash permutations: the Jaccard estimate's std is sqrt(J(1-J)/128), 0.035 at J=0.8
NUM_PERM = 128
SHINGLE = 5      # words per shingle, as RefinedWeb (Penedo et al. 2023) and datatrove
SLICE = 1 << 20  # chars of a long doc MinHash hashes at once (temporaries: ~45 bytes a char)
# chars of short docs hashed at once: smaller temporaries are reused from the heap, where bigger
# ones came from the OS afresh each batch (10x the page faults, 1.5x the time)
BATCH = 1 << 18
STEP = 1 << 16   # bytes per step of MinHash's prefix sums (0.5 MB temporaries)
BLOCK = 1 << 14  # shingles per step of MinHash's permutations (a 2 MB temporary)
PLACEHOLDERS = {'email': '<EMAIL>', 'phone': '<PHONE>', 'ip': '<IP_ADDRESS>',
                'card': '<CARD_NUMBER>'}

# Fast paths (issue 30): English text is nearly all ASCII, and bytes.translate and bytes.count run
# in C at ~1 GB/s where a regex walks the text char by char at ~150 MB/s. So each rule below sorts
# the ASCII bytes with a 256-entry table built from its own regex (the two cannot disagree) and runs
# the regex itself on the document's few non-ASCII chars only: the same results, each step 1.4-6x
# faster on `python data.py bench`'s text.
_ASCII = bytes(range(128))

def _non_ascii(data: bytes) -> str:
    """The non-ASCII chars of UTF-8 data, in order: a handful in an English document."""
    return data.translate(None, _ASCII).decode('utf-8', 'surrogatepass')

def _utf8(text: str):
    """(text's UTF-8 bytes, its non-ASCII chars). surrogatepass: JSON may hold lone surrogates,
    non-ASCII chars like any other here."""
    data = text.encode('utf-8', 'surrogatepass')
    return data, '' if text.isascii() else _non_ascii(data)

def _ascii_only(pattern):
    """bytes.translate's `delete` argument that leaves only the ASCII chars a one-char regex
    matches."""
    return bytes(c for c in range(256) if c > 127 or not pattern.match(chr(c)))

# 1) normalize: C0/C1 controls except \t \n, zero-width chars and the BOM
_CONTROL = re.compile('[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]')
_CONTROL_ASCII = _ascii_only(_CONTROL)

def normalize(text: str) -> str:
    # the quick check is far cheaper than normalizing
    if not unicodedata.is_normalized('NFC', text):
        text = unicodedata.normalize('NFC', text)
    text = text.replace('\r\n', '\n').replace('\r', '\n')
    data, rest = _utf8(text)
    if data.translate(None, _CONTROL_ASCII) or _CONTROL.search(rest):
        text = _CONTROL.sub('', text)
    return text.strip()

# 2) quality. A symbol is what is not a letter, digit, space or common punctuation
_SYMBOL = re.compile(r'''[^\w\s.,;:!?'"()\-\u2018\u2019\u201c\u201d]''')

_SYMBOL_ASCII = _ascii_only(_SYMBOL)
# str.split()'s ASCII whitespace -> ' ', every other byte -> 'x'
_SPACE_X = bytes(32 if c < 128 and chr(c).isspace() else 120 for c in range(256))

def quality_problem(text: str, cfg: dict, utf8=None):
    """The first Gopher rule the text breaks, or None. utf8: _utf8(text), when the caller has it."""
    data, rest = utf8 or _utf8(text)
    if any(map(str.isspace, rest)):  # rare: whitespace beyond ASCII
        words = text.split()
        n, nonspace = len(words), sum(map(len, words))
    else:  # the words and their chars counted, not built: a word starts where ' x' is
        mask = data.translate(_SPACE_X)
        n, nonspace = mask.count(b' x') + mask.startswith(b'x'), len(text) - mask.count(b' ')
    if n < cfg['min_words']:
        return 'too_short'
    symbols = len(data.translate(None, _SYMBOL_ASCII)) + len(_SYMBOL.findall(rest))
    if symbols > cfg['max_symbol_ratio'] * nonspace:
        return 'symbols'
    lines = [s for s in (line.strip() for line in text.split('\n')) if s]
    if len(lines) > 1 and 1 - len(set(lines)) / len(lines) > cfg['max_dup_lines']:
        return 'repeated_lines'
    lo, hi = cfg['mean_word_len']
    if not lo <= nonspace / n <= hi:
        return 'word_length'
    return None

# 3) language: closed-class English words, which make up ~40-50% of running English text and a few
# % of German or French (where "in", "an", "so", "was", "a", "on" also occur)
ENGLISH = frozenset('''the a an and or but if so as than then that this these those there here of to in on at
by for with from into about over after before up out not no is are was were be been am do does did have has had
will would can could should may might must shall i you he she it we they me him her us them my your his its our
their what which who when where how why all some any just also very'''.split())
_LETTERS = re.compile(r'[^\W\d_]+')  # runs of letters, any script
_ENGLISH_UTF8 = frozenset(w.encode() for w in ENGLISH)
# ASCII non-letters -> ' ', the rest (ASCII letters, every byte of a non-ASCII char) unchanged
_LETTER_SPACE = bytes(c if c > 127 or _LETTERS.match(chr(c)) else 32 for c in range(256))

def _lower_utf8(text: str, utf8=None) -> bytes:
    """text.lower() as UTF-8: bytes.lower() (ASCII only, fast) when no non-ASCII char changes case.
    subtle: str.lower() maps char by char except for a final sigma, and the capital sigma changes
    case, so when every non-ASCII char lowers to itself only the ASCII letters change."""
    data, rest = utf8 or _utf8(text)
    return data.lower() if rest == rest.lower() else _utf8(text.lower())[0]

def english_ratio(text: str, utf8=None) -> float:
    """The share of the text's lowercase letter runs that are ENGLISH words."""
    data = _lower_utf8(text, utf8)
    if not data.isascii():  # a non-ASCII non-letter ends a run: make it a space
        for c in set(_non_ascii(data)):
            if not _LETTERS.match(c):
                data = data.replace(c.encode('utf-8', 'surrogatepass'), b' ')
    words = data.translate(_LETTER_SPACE).split()
    return sum(map(_ENGLISH_UTF8.__contains__, words)) / max(1, len(words))

# 4) PII. subtle: the order matters: cards before phones, so a phone pattern never eats a
#    card's digits
# subtle: bounded repeats (RFC 5321 allows 64 chars before the @), or a long run of word chars
# costs quadratic time when an @ is somewhere in the document
EMAIL = re.compile(r'[\w.+-]{1,64}@[\w-]{1,63}(?:\.[\w-]{1,63})*\.[A-Za-z]{2,24}\b')
CARD = re.compile(r'(?<![\d-])(?:\d{4}([ -]?)\d{4}\1\d{4}\1\d{1,7}'
                  r'|\d{4}([ -]?)\d{6}\2\d{4,5})(?![\d-])')
_OCTET = r'(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)'
IPV4 = re.compile(rf'(?<![\d.])(?:{_OCTET}\.){{3}}{_OCTET}(?!\.?\d)')
# +44 20 7946 0958, or (555) 123-4567
PHONE = re.compile(r'(?<![\w+])(?:\+\d{1,3}(?:[ .-]\(?\d{1,4}\)?){2,5}'
                   r'|(?:1[ .-])?(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4})(?!\d)')

def luhn_ok(digits: str) -> bool:
    """The Luhn checksum (ISO/IEC 7812-1) that every payment card number passes, and 90% of random
    digit strings fail: double every second digit from the right, the total is a multiple of 10."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0

# A match of CARD holds 4 digits in a row, of IPV4 'digit.digit', of PHONE 4 digits in a row or
# '+digit': a text without one is left as it is, without that pattern's scan (slow: its lookarounds
# are tried at every char). Found in a mask of the text: ASCII digits -> '0', '.' and '+' kept, the
# rest ' '; the digits of other scripts (non-ASCII) are rare, and get the patterns' own scans.
_DIGIT_MASK = bytes(48 if 48 <= c < 58 else c if c in b'.+' else 32 for c in range(256))
_DIGIT = re.compile(r'\d')

def scrub_pii(text: str, stats: Counter, utf8=None) -> str:
    """text with its PII replaced by PLACEHOLDERS, counted into stats. utf8: _utf8(text), when the
    caller has it."""
    def card(m):
        digits = re.sub(r'\D', '', m.group())
        if 13 <= len(digits) <= 19 and luhn_ok(digits):
            stats['pii.card'] += 1
            return PLACEHOLDERS['card']
        return m.group()  # an order number or ID: leave it
    if '@' in text:
        text, n = EMAIL.subn(PLACEHOLDERS['email'], text)
        stats['pii.email'] += n
        utf8 = None if n else utf8
    def phone(m):
        # E.164: at most 15 digits; fewer than 7 is no number
        if 7 <= len(re.sub(r'\D', '', m.group())) <= 15:
            stats['pii.phone'] += 1
            return PLACEHOLDERS['phone']
        return m.group()
    data, rest = utf8 or _utf8(text)
    mask = b'0000+0.0' if _DIGIT.search(rest) else data.translate(_DIGIT_MASK)
    if b'0' not in mask:  # most texts: no digit at all
        return text
    # subtle: the mask is of the text before CARD and IPV4 replace their matches; a placeholder
    # holds no digit, '.' or '+', so a replacement makes no new hint (a stale one costs a scan)
    if b'0000' in mask:
        text = CARD.sub(card, text)
    if b'0.0' in mask:
        text, n = IPV4.subn(PLACEHOLDERS['ip'], text)
        stats['pii.ip'] += n
    if b'0000' in mask or b'+0' in mask:
        text = PHONE.sub(phone, text)
    return text

def clean_doc(text: str, cfg: dict, stats: Counter):
    """Steps 1-4 on one document: the cleaned text, or None when a filter drops it. Counts go to
    stats as 'step.what' keys ('quality.too_short', 'pii.email', ...)."""
    if cfg['normalize']:
        new = normalize(text)
        stats['normalize.changed'] += new != text
        text = new
    if not text.strip():
        stats['empty.removed'] += 1
        return None
    utf8 = _utf8(text)  # steps 2-4 share it
    if cfg['quality'] and (problem := quality_problem(text, cfg, utf8)):
        stats[f'quality.{problem}'] += 1
        return None
    if cfg['lang_filter'] and english_ratio(text, utf8) < cfg['min_english']:
        stats['lang_filter.removed'] += 1
        return None
    if cfg['pii']:
        new = scrub_pii(text, stats, utf8)
        stats['pii.docs_changed'] += new != text
        text = new
    return text

# 5) exact dedup key, also the per-document hash that datasets.py splits train/val by
def doc_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode('utf-8'), digest_size=16).digest()

# 6) MinHash, vectorized over a batch of documents
# bytes.translate's table: 1 for a byte of a word, else 0. UTF-8 bytes of non-ASCII chars are word
# bytes: letters of other scripts stay in their word
_WORD_BYTE = bytes(c in b'abcdefghijklmnopqrstuvwxyz0123456789' or c > 127 for c in range(256))
_rng = np.random.default_rng(20240601)  # fixed: signatures must not change between runs
_Q = np.uint64(0x100000001B3)  # odd multiplier of the polynomial byte hash (FNV's prime)
# its inverse mod 2^64, to shift a prefix hash back to 0
_QINV = np.uint64(pow(int(_Q), -1, 1 << 64))
_SHINGLE_MUL, _PERM_A, _PERM_B, _BAND_MUL = (
    _rng.integers(0, 2 ** 64, n, dtype=np.uint64) | np.uint64(odd)
    for n, odd in ((SHINGLE, 1), (NUM_PERM, 1), (NUM_PERM, 0), (NUM_PERM, 1)))
_pow = [np.ones(1, np.uint64)] * 2

def _powers(n):
    """(Q^j, Q^-j) mod 2^64 for j < n, cached; numpy's uint64 arithmetic wraps: that is the mod."""
    while len(_pow[0]) < max(n, 1 << 20):
        # doubled: [q^0 .. q^(k-1)] and q^k times that (cumprod took ~0.1 s more in every worker)
        _pow[:] = [np.concatenate([p, p * (p[-1:] * q)]) for p, q in zip(_pow, (_Q, _QINV))]
    return _pow

def minhash(docs: list) -> np.ndarray:
    """(len(docs), NUM_PERM) uint32 MinHash signatures of each doc's set of word 5-grams. Words are
    lowercase runs of [a-z0-9] and non-ASCII chars, so punctuation and case changes don't count."""
    # subtle: docs are hashed in batches of ~BATCH chars, and a doc longer than SLICE in slices
    # whose signatures are min-combined: the signature of the union of their shingles (less the few
    # cut in two). Memory stays bounded whatever the documents' sizes.
    pieces, owner = [], []
    for i, d in enumerate(docs):
        for s in range(0, max(1, len(d)), SLICE):
            pieces.append(d[s:s + SLICE])
            owner.append(i)
    sigs, batch, size = [], [], 0
    for p in pieces + [None]:
        if batch and (p is None or size + len(p) > BATCH):
            sigs.append(_signatures(batch))
            batch, size = [], 0
        if p is not None:
            batch.append(p)
            size += len(p)
    if not sigs:
        return np.zeros((0, NUM_PERM), np.uint32)
    return np.minimum.reduceat(np.concatenate(sigs),
                               np.searchsorted(owner, np.arange(len(docs))), axis=0)

def _signatures(docs):
    D = len(docs)
    # 1) every doc's lowercase UTF-8 bytes in one array, a space between docs
    parts = [_lower_utf8(d) for d in docs]
    doc_start = np.cumsum([0] + [len(p) + 1 for p in parts[:-1]])
    joined = b' '.join(parts)
    b = np.frombuffer(joined, np.uint8)
    # 2) word boundaries, and each word's polynomial hash from prefix sums: sum b[j] Q^(j - start)
    w = np.frombuffer(b'\0' + joined.translate(_WORD_BYTE) + b'\0', bool)
    edges = np.flatnonzero(w[1:] != w[:-1])
    starts = edges[0::2]
    qpow, qinv = _powers(len(b) + 1)
    # the prefix sums H[p] = sum_{j < p} (b[j] + 1) Q^j at the edges, STEP bytes at a time: small
    # temporaries stay in cache and are reused from the heap (whole-batch ones, 16 bytes a char,
    # came from the OS afresh, page faults and all)
    H, carry = np.zeros(len(edges), np.uint64), np.zeros(1, np.uint64)
    for lo in range(0, len(b), STEP):
        hi = min(lo + STEP, len(b))
        c = np.cumsum((b[lo:hi] + np.uint64(1)) * qpow[lo:hi])  # H[lo + 1:hi + 1]
        c += carry
        i, j = np.searchsorted(edges, [lo, hi], side='right')
        H[i:j], carry = c[edges[i:j] - lo - 1], c[-1:]
    wh = (H[1::2] - H[0::2]) * qinv[starts]
    count = np.diff(np.searchsorted(starts, np.r_[doc_start, len(b)]))  # words per doc
    wdoc = np.repeat(np.arange(D), count)
    # 3) shingle hashes: n consecutive words of one doc
    W, n = len(wh), SHINGLE
    k = max(0, W - n + 1)
    sh = sum((wh[j:j + k] * _SHINGLE_MUL[j] for j in range(n)), np.zeros(k, np.uint64))
    keep = wdoc[:k] == wdoc[n - 1:n - 1 + k]
    # a doc with fewer than n words is one shingle of them all; a doc without words, the shingle 0
    short = count[wdoc] < n
    pos = np.arange(W) - (np.cumsum(count) - count)[wdoc]  # a word's position in its doc
    part, pdoc = wh[short] * _SHINGLE_MUL[np.minimum(pos[short], n - 1)], wdoc[short]
    seg = np.flatnonzero(np.r_[True, pdoc[1:] != pdoc[:-1]]) if len(pdoc) else np.zeros(0, int)
    empty = np.flatnonzero(count == 0)
    sh = np.concatenate([sh[keep], np.add.reduceat(part, seg) if len(seg) else part,
                         np.zeros(len(empty), np.uint64)])
    sdoc = np.concatenate([wdoc[:k][keep], pdoc[seg], empty])
    order = np.argsort(sdoc, kind='stable')
    x = sh[order] >> np.uint64(32)  # 32-bit keys for the multiply-shift permutations
    bounds = np.searchsorted(sdoc[order], np.arange(D + 1))  # doc d's shingles: bounds[d:d + 2]
    # 4) NUM_PERM hash functions h(x) = (a x + b) mod 2^64, top 32 bits (Dietzfelbinger's
    #    multiply-add-shift, 2-universal): the min of the top bits is the top bits of the min, so
    #    shift after reducing. 16 functions at a time, over docs d0..d1 (~BLOCK shingles) at a
    #    time, in place: the (16, BLOCK) temporary stays in cache (5x faster than all shingles at
    #    once, measured on 1 MB)
    sig = np.empty((NUM_PERM, D), np.uint32)
    buf, d0 = np.empty(16 * BLOCK, np.uint64), 0
    while d0 < D:
        d1 = max(d0 + 1, int(np.searchsorted(bounds, bounds[d0] + BLOCK, side='right')) - 1)
        xs, first = x[bounds[d0]:bounds[d1]], bounds[d0:d1] - bounds[d0]
        h = buf[:16 * len(xs)] if len(xs) <= BLOCK else np.empty(16 * len(xs), np.uint64)
        h = h.reshape(16, len(xs))
        for g in range(0, NUM_PERM, 16):
            np.multiply(_PERM_A[g:g + 16, None], xs, out=h)
            h += _PERM_B[g:g + 16, None]
            sig[g:g + 16, d0:d1] = np.minimum.reduceat(h, first, axis=1) >> np.uint64(32)
        d0 = d1
    return sig.T

def lsh_params(threshold: float, num_perm=NUM_PERM, fn_weight=0.9):
    """(bands, rows): a pair with Jaccard s shares a band with probability 1 - (1 - s^rows)^bands
    (MMDS 3.4.2). Pick the pair that minimizes false-positive area below threshold + false-negative
    area above it (datasketch's optimal_param), with false negatives weighted up: candidates are
    verified against the signatures anyway, so a false positive costs a comparison, a miss a
    duplicate."""
    s = np.linspace(0, 1, 501)
    best = None
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = 1 - (1 - s ** r) ** b
            err = (1 - fn_weight) * p[s < threshold].sum() + \
                fn_weight * (1 - p[s >= threshold]).sum()
            if best is None or err < best[0]:
                best = (err, b, r)
    return best[1], best[2]

class Deduper:
    """Steps 5 and 6, in corpus order. check() answers None (keep: now indexed), 'dedup' or
    'near_dedup'."""

    def __init__(self, cfg: dict):
        self.exact, self.near, self.jaccard = cfg['dedup'], cfg['near_dedup'], cfg['jaccard']
        self.seen = set()
        if self.near:
            self.bands, self.rows = lsh_params(self.jaccard)
            # band hash -> index of the first doc with it
            self.tables = [{} for _ in range(self.bands)]
            # kept docs' signatures, grown by doubling
            self.sigs = np.empty((1024, NUM_PERM), np.uint32)
            self.n = 0

    def band_keys(self, sigs: np.ndarray) -> np.ndarray:
        """(D, bands) uint64: one hash per band of rows signature values."""
        return (sigs[:, :self.bands * self.rows].reshape(len(sigs), self.bands, self.rows)
                .astype(np.uint64) * _BAND_MUL[:self.rows]).sum(-1)

    def check(self, key: bytes, sig=None, bands=None):
        if self.exact:
            if key in self.seen:
                return 'dedup'
            self.seen.add(key)
        if not self.near:
            return None
        # one lookup per band: the first doc in its bucket, or this one, put there now. subtle: a
        # bucket remembers its first doc only (a list per bucket would double the memory); a doc
        # that shares a bucket without being a duplicate is still found through its other bands
        bands, n = bands.tolist(), self.n
        first = list(map(dict.setdefault, self.tables, bands, repeat(n)))
        if first.count(n) < len(first):  # other docs share buckets: verify on the signatures
            for j in set(first) - {n}:
                if np.count_nonzero(self.sigs[j] == sig) >= self.jaccard * NUM_PERM:
                    for t, h, i in zip(self.tables, bands, first):  # out of the index again
                        if i == n:
                            del t[h]
                    return 'near_dedup'
        if n == len(self.sigs):
            self.sigs = np.concatenate([self.sigs, np.empty_like(self.sigs)])
        self.sigs[n] = sig
        self.n += 1
        return None

def clean_corpus(docs, cfg: dict, stats: Counter, batch=256):
    """All six steps in one process, in order: yields the kept, cleaned docs and counts into
    stats."""
    dd = Deduper(cfg)
    docs = iter(docs)
    while chunk := [d for _, d in zip(range(batch), docs)]:
        stats['docs_in'] += len(chunk)
        kept = [t for t in (clean_doc(d, cfg, stats) for d in chunk) if t is not None]
        sigs = minhash(kept) if dd.near and kept else None
        bands = dd.band_keys(sigs) if sigs is not None else None
        for i, t in enumerate(kept):
            verdict = dd.check(doc_key(t), *((sigs[i], bands[i]) if sigs is not None else ()))
            if verdict:
                stats[f'{verdict}.removed'] += 1
            else:
                stats['docs_out'] += 1
                yield t

def report(stats: Counter, cfg: dict) -> dict:
    """Counter({'quality.too_short': 3, ...}) -> {'docs_in', step: {what: n} or 'off', 'docs_out'},
    printed: what each step removed or changed, as meta.json stores it."""
    out = {'docs_in': stats['docs_in']}
    zero = {'normalize': ['changed'], 'pii': ['docs_changed', *PLACEHOLDERS], 'quality': [],
            'empty': []}
    for step in ('normalize', 'quality', 'lang_filter', 'pii', 'dedup', 'near_dedup', 'empty'):
        counts = dict.fromkeys(zero.get(step, ['removed']), 0)
        counts.update({k.split('.', 1)[1]: v for k, v in sorted(stats.items())
                       if k.startswith(step + '.')})
        counts.update({'removed': sum(counts.values())} if step == 'quality' else {})
        out[step] = counts if step == 'empty' or cfg[step] else 'off'
    out['docs_out'] = stats['docs_out']
    print(f"cleaning: {out['docs_in']} documents in, {out['docs_out']} out")
    for step, counts in out.items():
        if isinstance(counts, str) or (isinstance(counts, dict) and (counts or step != 'empty')):
            print(f"  {step:<11} "
                  f"{counts if isinstance(counts, str) else ', '.join(f'{k} {v}' for k, v in counts.items())}")
    return out
