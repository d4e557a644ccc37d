"""
The arena: blind pairwise judgments of two replies, the file they are kept in, and the statistics
read from them.

    from nanolab.arena import append_judgment, read_judgments, arena_stats, to_pairs
    append_judgment('runs/arena/judgments.jsonl', judgment)  # validated, one line, atomic
    stats = arena_stats(read_judgments('runs/arena'))  # what `evaluate.py --arena=PATH` prints

A judgment (one JSON line of <runs_dir>/arena/judgments.jsonl; POST /v1/arena/judgments appends):
    {"id": item, "prompt": str, "a": {"model", "text", "settings"}, "b": {...},
     "winner": "a"|"b"|"tie"|"both_bad", "ratings": {"a": 1-5, "b": 1-5} (optional),
     "annotator": str, "time": ISO 8601}
`id` names the item (a prompt and its two replies), so judgments of one item by several annotators
can be matched. The statistics:
  - bradley_terry: each model's strength from its wins and losses (Bradley & Terry 1952), fitted by
    Hunter's (2004) MM iterations, on Chatbot Arena's scale (1000 + 400 log10 strength, the mean
    strength 1); a tie, or both bad, counts as half a win for each side; a 95% percentile-bootstrap
    interval over the judgments
  - pairs: wins, ties and losses of each pair of models; ratings: each model's mean 1-5 rating
  - cohen_kappa: for two annotators, agreement beyond chance over the items both judged (each one's
    latest judgment), four categories, as scikit-learn's cohen_kappa_score computes it
  - fleiss_kappa: the same for many annotators (Fleiss 1971), over the items judged by the same
    number n >= 3 of annotators (the most common such n)
  - to_pairs: the decided judgments (a or b won) as {prompt, chosen, rejected}, what dpo.py and
    reward.py read
"""
import errno
import fcntl
import json
import os
import threading
import warnings
from collections import Counter, defaultdict

import numpy as np

WINNERS = ('a', 'b', 'tie', 'both_bad')
MAX_TEXT = 20000     # characters of a prompt or a reply in one judgment
MAX_NAME = 200       # characters of an item id, a model's or an annotator's name (a new judgment)
MAX_SETTINGS = 2000  # characters of a side's settings, as JSON (a new judgment)
KEYS, SIDE_KEYS = ('id', 'prompt', 'a', 'b', 'winner', 'ratings', 'annotator', 'time'), \
    ('model', 'text', 'settings')

# -----------------------------------------------------------------------------
# 1) the file: one judgment per line, appended whole or not at all

def check_judgment(j, new=False):
    """j if it is a well-formed judgment, else ValueError naming the field and what it must be.
    new (what the server appends): only the format's keys, and names and settings bounded too."""
    if not isinstance(j, dict):
        raise ValueError('a judgment is a JSON object')
    if new and set(j) - set(KEYS):
        raise ValueError(f"unknown field(s) {sorted(set(j) - set(KEYS))[:5]}; a judgment has "
                         f"{', '.join(KEYS)}")
    for k in ('id', 'prompt', 'annotator'):
        most = MAX_NAME if new and k != 'prompt' else MAX_TEXT
        if not isinstance(j.get(k), str) or not j[k].strip() or len(j[k]) > most:
            raise ValueError(f"'{k}' must be a non-empty string of at most {most} characters")
    for side in ('a', 'b'):
        s = j.get(side)
        if not isinstance(s, dict) or not isinstance(s.get('model'), str) \
                or not isinstance(s.get('text'), str) or len(s['text']) > MAX_TEXT \
                or not isinstance(s.get('settings', {}), dict):
            raise ValueError(f"'{side}' must be "
                             '{"model": str, "text": str, "settings": object}')
        if new and (set(s) - set(SIDE_KEYS) or not 0 < len(s['model']) <= MAX_NAME
                    or len(json.dumps(s.get('settings', {}))) > MAX_SETTINGS):
            raise ValueError(f"'{side}' must hold only model (1 to {MAX_NAME} characters), text "
                             f"and settings (at most {MAX_SETTINGS} characters as JSON)")
    if j.get('winner') not in WINNERS:
        raise ValueError(f"'winner' must be one of {', '.join(WINNERS)}")
    ratings = j.get('ratings')
    if ratings is not None and not (
            isinstance(ratings, dict) and set(ratings) <= {'a', 'b'}
            and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 5
                    for v in ratings.values())):
        raise ValueError("'ratings' must be {\"a\": 1-5, \"b\": 1-5} (either may be left out)")
    if not isinstance(j.get('time'), str) or len(j['time']) > 64:
        raise ValueError("'time' must be an ISO 8601 string")
    return j

_append_lock = threading.Lock()

def append_judgment(path, j):
    """Append one checked judgment to path as one line, in one write, flushed to disk: all of its
    bytes or none (a short write, as on a full disk, is cut back off and raises OSError). Two
    writers never interleave a line (O_APPEND, an flock, and a lock within this process); a torn
    line a crash left at the end is closed first, so it stays a line of its own that readers skip.
    """
    line = (json.dumps(check_judgment(j, new=True), ensure_ascii=False) + '\n').encode('utf-8')
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with _append_lock:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b'\n':
                line = b'\n' + line
            try:
                if os.write(fd, line) != len(line):
                    raise OSError(errno.ENOSPC, f'only part of the judgment was written to {path}')
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)  # what was there before, whole
                raise
        finally:
            os.close(fd)  # and its flock

def read_judgments(path):
    """The judgments of a judgments file, or of every *.jsonl under a directory. A torn line (a
    write a crash cut short: not JSON) is skipped with a warning; a line that is JSON but not a
    judgment is a ValueError naming the file and line."""
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith('.jsonl'))
    if not files:
        raise ValueError(f'no judgments at {path}: give a judgments.jsonl or a directory holding '
                         'them (serve.py writes <runs_dir>/arena/judgments.jsonl)')
    out = []
    for f in files:
        with open(f, encoding='utf-8', errors='replace') as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    j = json.loads(line)
                except ValueError:
                    warnings.warn(f'{f} line {n}: skipped a torn line (a write cut short)')
                    continue
                try:
                    out.append(check_judgment(j))
                except ValueError as e:
                    raise ValueError(f'{f} line {n}: {e}') from None
    return out


class Store:
    """A server's judgments file: appends, and the judgments and statistics read from it, each
    read or computed at most once per change of the file (its size and mtime), however many ask."""
    def __init__(self, path):
        self.path, self.lock, self.cache = path, threading.Lock(), {}

    def append(self, j):
        append_judgment(self.path, j)

    def _cached(self, key, compute):
        with self.lock:  # one computes; the others wait for its answer
            try:
                st = os.stat(self.path)
                version = (st.st_size, st.st_mtime_ns)
            except FileNotFoundError:
                version = None
            if key not in self.cache or self.cache[key][0] != version:
                self.cache[key] = (version, compute(version))
            return self.cache[key][1]

    def judgments(self):
        return self._cached('judgments',
                            lambda version: read_judgments(self.path) if version else [])

    def stats(self, n_boot=200):
        """arena_stats of the judgments (200 bootstrap resamples), or {"judgments": 0}."""
        judged = self.judgments()
        return self._cached(('stats', n_boot), lambda version: arena_stats(judged, n_boot)
                            if judged else {'judgments': 0})

# -----------------------------------------------------------------------------
# 2) the statistics

def _games(judgments):
    """(models, per judgment: the index of its pair of models (-1 when a model met itself: that
    says nothing of its strength), of a's and b's model, and a's share of the win (ties half),
    and each pair's two model indices)."""
    models = sorted({j[s]['model'] for j in judgments for s in ('a', 'b')})
    index, pairs = {m: i for i, m in enumerate(models)}, {}
    pid, ai, bi, wa = [], [], [], []
    for j in judgments:
        a, b = index[j['a']['model']], index[j['b']['model']]
        pid.append(-1 if a == b else pairs.setdefault((min(a, b), max(a, b)), len(pairs)))
        ai.append(a)
        bi.append(b)
        wa.append({'a': 1.0, 'b': 0.0}.get(j['winner'], 0.5))
    ends = np.array(list(pairs) or np.zeros((0, 2)), dtype=np.int64).reshape(-1, 2)
    return models, np.array(pid, dtype=np.int64), np.array(ai, dtype=np.int64), \
        np.array(bi, dtype=np.int64), np.array(wa), ends

def _fit(samples, pid, ai, bi, wa, ends, n_models, iters):
    """Hunter's MM algorithm (2004) for several resamples at once: samples (B, J) judgment indices
    -> ratings (B, n_models), NaN for a model with no game in its resample. p_i <- W_i / sum_j
    n_ij / (p_i + p_j), W_i the wins of i (ties half each), n_ij the games of i and j, then scaled
    to a geometric mean of 1: whole arrays per step, so a step costs O(pairs), not O(models x
    pairs)."""
    B, M, P = samples.shape[0], n_models, len(ends)
    rows = np.arange(B)[:, None]
    pids, played = pid[samples], pid[samples] >= 0
    games = np.bincount((rows * P + pids)[played], minlength=B * P).reshape(B, P).astype(float)
    wins = (np.bincount((rows * M + ai[samples])[played], wa[samples][played], B * M)
            + np.bincount((rows * M + bi[samples])[played], 1 - wa[samples][played], B * M))
    wins = wins.reshape(B, M)
    flat_i, flat_j = (rows * M + ends[:, 0]).ravel(), (rows * M + ends[:, 1]).ravel()
    per_model = lambda x: (np.bincount(flat_i, x.ravel(), B * M)
                           + np.bincount(flat_j, x.ravel(), B * M)).reshape(B, M)
    active = per_model(games) > 0
    count = np.maximum(active.sum(1, keepdims=True), 1)
    p = np.ones((B, M))
    for _ in range(iters):
        denom = per_model(games / (p[:, ends[:, 0]] + p[:, ends[:, 1]]))
        # a model that never won keeps a tiny strength, not 0
        new = np.where(active, np.maximum(wins, 1e-3) / np.where(active, denom, 1.0), 1.0)
        p = new / np.exp(np.where(active, np.log(new), 0.0).sum(1, keepdims=True) / count)
    return np.where(active, 1000 + 400 * np.log10(p), np.nan)

def bradley_terry(judgments, iters=200):
    """{model: rating} on Chatbot Arena's scale (1000 + 400 log10 strength), fitted by Hunter's MM
    algorithm (_fit); a model that only met itself has none."""
    models, pid, ai, bi, wa, ends = _games(judgments)
    r = _fit(np.arange(len(judgments))[None], pid, ai, bi, wa, ends, len(models), iters)[0]
    return {m: float(v) for m, v in zip(models, r) if v == v}

def cohen_kappa(x, y, labels=WINNERS):
    """Cohen's kappa of two lists of labels: (p_o - p_e) / (1 - p_e); None when chance agreement is
    total."""
    n = len(x)
    po = sum(a == b for a, b in zip(x, y)) / n
    cx, cy = Counter(x), Counter(y)
    pe = sum(cx[k] * cy[k] for k in labels) / n ** 2
    return None if pe == 1 else (po - pe) / (1 - pe)

def fleiss_kappa(table):
    """Fleiss' kappa of an items x categories table of counts, every row summing to the same n
    raters."""
    N, n = len(table), sum(table[0])
    p = [sum(row[k] for row in table) / (N * n) for k in range(len(table[0]))]
    P = [(sum(c * c for c in row) - n) / (n * (n - 1)) for row in table]
    pe = sum(v * v for v in p)
    return None if pe == 1 else (sum(P) / N - pe) / (1 - pe)

def _latest(judgments):
    """{item id: {annotator: winner}}, each annotator's latest judgment of each item (the file is
    in time order)."""
    out = defaultdict(dict)
    for j in judgments:
        out[j['id']][j['annotator']] = j['winner']
    return out

def arena_stats(judgments, n_boot=1000, seed=1337):
    """Everything `python evaluate.py --arena` reports (the module docstring); JSON-ready."""
    if not judgments:
        raise ValueError('no judgments to summarize')
    bt = bradley_terry(judgments)
    # a 95% percentile-bootstrap interval: n_boot resamples of the judgments, fitted in chunks
    models, pid, ai, bi, wa, ends = _games(judgments)
    rng, J, boots = np.random.default_rng(seed), len(judgments), []
    chunk = max(1, min(n_boot, 4_000_000 // J))  # resamples per fit: bounded memory
    for start in range(0, n_boot, chunk):
        samples = rng.integers(0, J, size=(min(chunk, n_boot - start), J))
        boots.append(_fit(samples, pid, ai, bi, wa, ends, len(models), 100))
    boots = np.concatenate(boots) if boots else np.zeros((0, len(models)))
    ci = {}
    for k, m in enumerate(models):
        v = np.sort(boots[:, k][~np.isnan(boots[:, k])])
        if m in bt and len(v):
            ci[m] = [float(v[int(0.025 * len(v))]), float(v[min(len(v) - 1, int(0.975 * len(v)))])]
    pairs = defaultdict(Counter)
    ratings = defaultdict(list)
    for j in judgments:
        a, b = j['a']['model'], j['b']['model']
        key, flip = (f'{a}|{b}', False) if a <= b else (f'{b}|{a}', True)
        w = j['winner'] if not flip else {'a': 'b', 'b': 'a'}.get(j['winner'], j['winner'])
        pairs[key][{'a': 'wins', 'b': 'losses'}.get(w, 'ties' if w == 'tie' else 'both_bad')] += 1
        for side in ('a', 'b'):
            if (j.get('ratings') or {}).get(side) is not None:
                ratings[j[side]['model']].append(j['ratings'][side])
    items = _latest(judgments)
    annotators = sorted({a for votes in items.values() for a in votes})
    cohen = {}
    for i, x in enumerate(annotators):
        for y in annotators[i + 1:]:
            both = [v for v in items.values() if x in v and y in v]
            if both:
                cohen[f'{x}|{y}'] = \
                    {'kappa': cohen_kappa([v[x] for v in both], [v[y] for v in both]),
                     'items': len(both)}
    counts = Counter(len(v) for v in items.values() if len(v) >= 3)
    fleiss = None
    if counts:
        n = max(counts, key=lambda k: (counts[k], k))
        table = [[list(v.values()).count(w) for w in WINNERS] for v in items.values()
                 if len(v) == n]
        fleiss = {'kappa': fleiss_kappa(table), 'items': len(table), 'annotators_per_item': n}
    return {'judgments': len(judgments), 'items': len(items), 'annotators': annotators,
            'bradley_terry': {m: {'rating': bt[m], 'ci95': ci.get(m)}
                              for m in sorted(bt, key=bt.get, reverse=True)},
            'pairs': {k: {s: c[s] for s in ('wins', 'ties', 'losses', 'both_bad')}
                      for k, c in sorted(pairs.items())},
            'ratings': {m: {'mean': sum(v) / len(v), 'n': len(v)}
                        for m, v in sorted(ratings.items())},
            'cohen_kappa': cohen, 'fleiss_kappa': fleiss}

def to_pairs(judgments):
    """The decided judgments as preference pairs {prompt: [user message], chosen, rejected}
    (dpo.py, reward.py)."""
    return [{'prompt': [{'role': 'user', 'content': j['prompt']}],
             'chosen': j[j['winner']]['text'],
             'rejected': j['b' if j['winner'] == 'a' else 'a']['text']}
            for j in judgments if j['winner'] in ('a', 'b') and j['a']['text'] != j['b']['text']]

# -----------------------------------------------------------------------------
# 3) the report: `python evaluate.py --arena=PATH [--arena_judge=DIR] [--arena_to_pairs=OUT]`

def judge_with(judgments, reward_dir):
    """The judgments plus one by a reward model (reward.py's out_dir) on every item, annotator
    'reward:<dir>': its verdict is the order of its rewards for the two replies, so arena_stats
    gives its kappa with each human."""
    from nanolab.reward_model import load_reward_model
    rm, tok = load_reward_model(reward_dir)
    out = list(judgments)
    for j in {j['id']: j for j in judgments}.values():
        ra, rb = rm.score(tok, [{'role': 'user', 'content': j['prompt']}],
                          [j['a']['text'], j['b']['text']])
        out.append({**j, 'annotator': f'reward:{reward_dir}', 'ratings': None,
                    'winner': 'a' if ra > rb else 'b' if rb > ra else 'tie'})
    return out

def report(path, n_boot=1000, seed=1337, judge='', pairs_out=''):
    """Print arena_stats of the judgments at path and write them to arena.json beside them (and
    with pairs_out the decided judgments as preference pairs); judge: a reward model's out_dir to
    judge every item too. -> the stats."""
    from nanolab.files import finite, write_atomic
    judged = read_judgments(path)
    if judge:
        judged = judge_with(judged, judge)
    stats = arena_stats(judged, n_boot, seed)
    out = os.path.join(path if os.path.isdir(path) else os.path.dirname(path) or '.', 'arena.json')
    write_atomic(out, lambda f: f.write(json.dumps(finite(stats), indent=1).encode()))
    fmt = lambda k: 'none' if k is None else round(k, 3)
    print(f"{stats['judgments']} judgments of {stats['items']} items by "
          f"{len(stats['annotators'])} annotators")
    for m, r in stats['bradley_terry'].items():
        lo, hi = r['ci95'] or (None, None)
        print(f"  {m:30s} {r['rating']:7.1f}"
              + (f"  [{lo:.1f}, {hi:.1f}]" if lo is not None else ''))
    for k, v in stats['cohen_kappa'].items():
        print(f"  cohen kappa {k}: {fmt(v['kappa'])} over {v['items']} items")
    if stats['fleiss_kappa']:
        f = stats['fleiss_kappa']
        print(f"  fleiss kappa: {fmt(f['kappa'])} over {f['items']} items x "
              f"{f['annotators_per_item']} annotators")
    print(f'wrote {out}')
    if pairs_out:
        pairs = to_pairs(judged)
        write_atomic(pairs_out,
                     lambda f: f.write(''.join(json.dumps(p) + '\n' for p in pairs).encode()))
        print(f'wrote {len(pairs)} pairs to {pairs_out} (dpo.py --train_file=..., reward.py)')
    return stats
