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
import json
import math
import os
import random
import threading
from collections import Counter, defaultdict

WINNERS = ('a', 'b', 'tie', 'both_bad')
MAX_TEXT = 20000  # characters of a prompt or a reply in one judgment

# -----------------------------------------------------------------------------
# 1) the file: one judgment per line, appended whole

def check_judgment(j):
    """j if it is a well-formed judgment, else ValueError naming the field and what it must be."""
    if not isinstance(j, dict):
        raise ValueError('a judgment is a JSON object')
    for k in ('id', 'prompt', 'annotator'):
        if not isinstance(j.get(k), str) or not j[k].strip() or len(j[k]) > MAX_TEXT:
            raise ValueError(f"'{k}' must be a non-empty string of at most {MAX_TEXT} characters")
    for side in ('a', 'b'):
        s = j.get(side)
        if not isinstance(s, dict) or not isinstance(s.get('model'), str) \
                or not isinstance(s.get('text'), str) or len(s['text']) > MAX_TEXT \
                or not isinstance(s.get('settings', {}), dict):
            raise ValueError(f"'{side}' must be "
                             '{"model": str, "text": str, "settings": object}')
    if j.get('winner') not in WINNERS:
        raise ValueError(f"'winner' must be one of {', '.join(WINNERS)}")
    ratings = j.get('ratings')
    if ratings is not None and not (
            isinstance(ratings, dict) and set(ratings) <= {'a', 'b'}
            and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 5
                    for v in ratings.values())):
        raise ValueError("'ratings' must be {\"a\": 1-5, \"b\": 1-5} (either may be left out)")
    if not isinstance(j.get('time'), str):
        raise ValueError("'time' must be an ISO 8601 string")
    return j

_append_lock = threading.Lock()

def append_judgment(path, j):
    """Append one checked judgment to path as one line, in one write, flushed to disk (two writers
    never interleave a line: O_APPEND, a single write, and a lock within this process)."""
    line = (json.dumps(check_judgment(j), ensure_ascii=False) + '\n').encode('utf-8')
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with _append_lock:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

def read_judgments(path):
    """The judgments of a judgments file, or of every *.jsonl under a directory. A torn last line
    (a write cut short) is dropped; any other malformed line is a ValueError naming the file and
    line."""
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith('.jsonl'))
    if not files:
        raise ValueError(f'no judgments at {path}: give a judgments.jsonl or a directory holding '
                         'them (serve.py writes <runs_dir>/arena/judgments.jsonl)')
    out = []
    for f in files:
        with open(f, encoding='utf-8') as fh:
            lines = fh.read().split('\n')
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                out.append(check_judgment(json.loads(line)))
            except ValueError as e:
                if n == len(lines):  # the last line, without its newline: torn
                    break
                raise ValueError(f'{f} line {n}: {e}') from None
    return out

# -----------------------------------------------------------------------------
# 2) the statistics

def bradley_terry(judgments, iters=200):
    """{model: rating} on Chatbot Arena's scale, fitted by Hunter's MM algorithm: p_i <- W_i /
    sum_j n_ij / (p_i + p_j), with W_i the wins of i (ties half each) and n_ij the games of i and
    j; then scaled to a geometric mean of 1."""
    wins, games = Counter(), Counter()
    for j in judgments:
        a, b = j['a']['model'], j['b']['model']
        if a == b:
            continue  # two settings of one model say nothing about the model's strength
        games[frozenset((a, b))] += 1
        wins[a] += {'a': 1, 'b': 0}.get(j['winner'], 0.5)
        wins[b] += {'a': 0, 'b': 1}.get(j['winner'], 0.5)
    models = sorted({m for pair in games for m in pair})
    p = {m: 1.0 for m in models}
    for _ in range(iters):
        new = {}
        for m in models:
            denom = sum(n / (p[m] + p[next(iter(pair - {m}))]) for pair, n in games.items()
                        if m in pair)
            # a model that never won keeps a tiny strength, not 0
            new[m] = max(wins[m], 1e-3) / denom
        g = math.exp(sum(math.log(v) for v in new.values()) / len(new))
        p = {m: v / g for m, v in new.items()}
    return {m: 1000 + 400 * math.log10(v) for m, v in p.items()}

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
    rng, boots = random.Random(seed), defaultdict(list)
    for _ in range(n_boot):
        for m, r in bradley_terry([rng.choice(judgments) for _ in judgments], iters=100).items():
            boots[m].append(r)
    ci = {m: [sorted(v)[int(0.025 * len(v))], sorted(v)[min(len(v) - 1, int(0.975 * len(v)))]]
          for m, v in boots.items()}
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
