"""arena.py against references: Cohen's kappa against scikit-learn's cohen_kappa_score, Fleiss' kappa against the
worked example of Fleiss' method (Wikipedia's 10 items x 14 raters, kappa 0.210), Bradley-Terry recovering a known
order from simulated judgments; the judgments file (append, torn last line, bad lines) and the pairs it gives."""
import json
import random

import pytest
from sklearn.metrics import cohen_kappa_score

from nanolab.arena import (WINNERS, append_judgment, arena_stats, bradley_terry, cohen_kappa, fleiss_kappa, read_judgments,
                   to_pairs)


def judgment(item, a, b, winner, annotator='ann', ratings=None):
    j = {'id': item, 'prompt': f'prompt {item}', 'a': {'model': a, 'text': f'{a} says {item}', 'settings': {}},
         'b': {'model': b, 'text': f'{b} says {item}', 'settings': {}}, 'winner': winner, 'annotator': annotator,
         'time': '2026-12-01T00:00:00Z'}
    return {**j, 'ratings': ratings} if ratings else j


def test_cohen_kappa_is_scikit_learns():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(2, 40)
        x = [rng.choice(WINNERS) for _ in range(n)]
        y = [v if rng.random() < 0.6 else rng.choice(WINNERS) for v in x]  # agreeing more than chance
        want = cohen_kappa_score(x, y)
        got = cohen_kappa(x, y)
        assert (got is None) == (want != want) and (got is None or abs(got - want) < 1e-12), (x, y)


def test_fleiss_kappa_of_the_worked_example():
    """Fleiss' kappa's standard worked example (14 raters, 10 subjects, 5 categories): P-bar 0.378, P_e 0.213,
    kappa 0.210."""
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert round(fleiss_kappa(table), 3) == 0.210
    # through arena_stats: 4 annotators on 6 items; by hand, the same formula on the counts per category
    votes = [('a', 'a', 'a', 'b'), ('b', 'b', 'b', 'b'), ('tie', 'a', 'tie', 'tie'), ('a', 'b', 'a', 'a'),
             ('both_bad', 'both_bad', 'tie', 'both_bad'), ('b', 'b', 'a', 'b')]
    js = [judgment(f'i{i}', 'm1', 'm2', w, f'ann{k}') for i, v in enumerate(votes) for k, w in enumerate(v)]
    js.append(judgment('solo', 'm1', 'm2', 'a', 'ann0'))  # one annotator only: not in Fleiss' table
    stats = arena_stats(js, n_boot=10)
    table = [[v.count(w) for w in WINNERS] for v in votes]
    N, n = 6, 4
    p = [sum(r[k] for r in table) / (N * n) for k in range(4)]
    pbar = sum((sum(c * c for c in r) - n) / (n * (n - 1)) for r in table) / N
    pe = sum(x * x for x in p)
    assert stats['fleiss_kappa'] == {'kappa': pytest.approx((pbar - pe) / (1 - pe)), 'items': 6, 'annotators_per_item': 4}
    x = [v[0] for v in votes] + ['a']
    assert stats['cohen_kappa']['ann0|ann1']['items'] == 6  # 'solo' was judged by ann0 alone
    assert stats['cohen_kappa']['ann0|ann1']['kappa'] == pytest.approx(cohen_kappa_score(x[:6], [v[1] for v in votes]))


def test_bradley_terry_recovers_a_known_order_with_intervals():
    rng = random.Random(1)
    strength = {'weak': 0.5, 'mid': 1.0, 'strong': 2.0, 'best': 4.0}
    names, js = list(strength), []
    for k in range(1500):
        a, b = rng.sample(names, 2)
        pa = strength[a] / (strength[a] + strength[b])
        w = 'tie' if rng.random() < 0.1 else 'a' if rng.random() < pa else 'b'
        js.append(judgment(f'i{k}', a, b, w))
    bt = bradley_terry(js)
    assert sorted(bt, key=bt.get) == ['weak', 'mid', 'strong', 'best']
    # the scale: 400 log10 of the strength ratio, the geometric mean at 1000 (ties blur the ratios a little)
    assert abs((bt['best'] - bt['weak']) - 400 * 3 * 0.30103) < 60
    stats = arena_stats(js, n_boot=100)
    for m, r in stats['bradley_terry'].items():
        lo, hi = r['ci95']
        assert lo <= r['rating'] <= hi and hi - lo < 120, (m, r)
    assert list(stats['bradley_terry']) == ['best', 'strong', 'mid', 'weak']  # best first
    pair = stats['pairs']['best|weak']
    assert pair['wins'] > 3 * pair['losses']


def test_judgments_file_pairs_and_bad_lines(tmp_path):
    path = tmp_path / 'arena' / 'judgments.jsonl'
    append_judgment(str(path), judgment('x', 'm1', 'm2', 'a', ratings={'a': 5, 'b': 2}))
    append_judgment(str(path), judgment('y', 'm1', 'm2', 'tie'))
    append_judgment(str(path), judgment('z', 'm2', 'm1', 'b', ratings={'b': 4}))
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])['winner'] == 'a'
    with open(path, 'a') as f:
        f.write('{"id": "torn", "prom')  # a write cut short
    with pytest.warns(UserWarning, match='line 4: skipped a torn line'):
        got = read_judgments(str(tmp_path / 'arena'))  # a directory of judgment files
    assert [j['id'] for j in got] == ['x', 'y', 'z']
    stats = arena_stats(got, n_boot=10)
    assert stats['ratings'] == {'m1': {'mean': 4.5, 'n': 2}, 'm2': {'mean': 2.0, 'n': 1}}
    assert stats['pairs'] == {'m1|m2': {'wins': 2, 'ties': 1, 'losses': 0, 'both_bad': 0}}
    assert to_pairs(got) == [{'prompt': [{'role': 'user', 'content': 'prompt x'}], 'chosen': 'm1 says x', 'rejected': 'm2 says x'},
                             {'prompt': [{'role': 'user', 'content': 'prompt z'}], 'chosen': 'm1 says z', 'rejected': 'm2 says z'}]
    for bad, field in ((dict(judgment('q', 'a', 'b', 'a'), winner='maybe'), 'winner'),
                       (dict(judgment('q', 'a', 'b', 'a'), ratings={'a': 6}), 'ratings'),
                       (dict(judgment('q', 'a', 'b', 'a'), id=''), 'id'),
                       ({k: v for k, v in judgment('q', 'a', 'b', 'a').items() if k != 'b'}, "'b'")):
        with pytest.raises(ValueError, match=field):
            append_judgment(str(path), bad)
    path.write_text(path.read_text().replace('"id": "y"', '"id": 7', 1) + '\n')  # a bad line mid-file
    with pytest.raises(ValueError, match='line 2'):
        read_judgments(str(path))


def test_evaluate_arena_writes_arena_json_and_pairs_dpo_reads(tmp_path):
    import os
    import runpy
    import sys
    from nanolab.formats import read_preferences
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    d = tmp_path / 'arena'
    for k, (w, who) in enumerate([('a', 'x'), ('b', 'x'), ('a', 'y'), ('tie', 'y')]):
        append_judgment(str(d / 'judgments.jsonl'), judgment(f'i{k % 2}', 'm1', 'm2', w, who))
    argv = sys.argv
    sys.argv = [os.path.join(root, 'evaluate.py'), f'--arena={d}', f'--arena_to_pairs={tmp_path / "pairs.jsonl"}',
                '--bootstrap=20']
    try:
        with pytest.raises(SystemExit) as e:
            runpy.run_path(sys.argv[0], run_name='__main__')
        assert e.value.code == 0
    finally:
        sys.argv = argv
    stats = json.loads((d / 'arena.json').read_text())
    assert stats['judgments'] == 4 and set(stats['bradley_terry']) == {'m1', 'm2'}
    assert stats['cohen_kappa']['x|y']['items'] == 2
    pairs = read_preferences(str(tmp_path / 'pairs.jsonl'))
    assert [p['chosen'] for p in pairs] == ['m1 says i0', 'm2 says i1', 'm1 says i0']
    # a reward model as the automatic judge: one more annotator, whose verdicts are its rewards' order
    import torch
    from dataclasses import asdict
    from model import GPT, GPTConfig
    from nanolab.checkpoint import save_checkpoint
    from nanolab.reward_model import RewardModel, load_reward_model
    from nanolab.tokenizer import CharTokenizer
    tok = CharTokenizer(chars=' 0123456789:?Aabcdefghijklmnopqrstuvwxyz\nSU')
    torch.manual_seed(0)
    rm = RewardModel(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=tok.vocab_size)))
    torch.nn.init.normal_(rm.head.weight)
    save_checkpoint({'model_args': asdict(rm.gpt.config), 'model': rm.gpt.state_dict(), 'tokenizer': tok.spec(),
                     'config': {}, 'reward_head': rm.head.state_dict()}, str(tmp_path / 'rm' / 'ckpt.pt'))
    sys.argv = [os.path.join(root, 'evaluate.py'), f'--arena={d}', f'--arena_judge={tmp_path / "rm"}', '--bootstrap=20']
    try:
        with pytest.raises(SystemExit):
            runpy.run_path(sys.argv[0], run_name='__main__')
    finally:
        sys.argv = argv
    stats = json.loads((d / 'arena.json').read_text())
    judge = f'reward:{tmp_path / "rm"}'
    assert judge in stats['annotators'] and stats['cohen_kappa'][f'{judge}|x']['items'] == 2  # names sorted
    loaded, _ = load_reward_model(str(tmp_path / 'rm'))
    ra, rb = loaded.score(tok, [{'role': 'user', 'content': 'prompt i0'}], ['m1 says i0', 'm2 says i0'])
    assert stats['judgments'] == 6 and (ra != rb)


def hunter_by_loops(judgments, iters=200):
    """Hunter's MM written out as loops over models and pairs: the reference for arena.bradley_terry."""
    import math
    from collections import Counter
    wins, games = Counter(), Counter()
    for j in judgments:
        a, b = j['a']['model'], j['b']['model']
        if a != b:
            games[frozenset((a, b))] += 1
            wins[a] += {'a': 1, 'b': 0}.get(j['winner'], 0.5)
            wins[b] += {'a': 0, 'b': 1}.get(j['winner'], 0.5)
    p = {m: 1.0 for pair in games for m in pair}
    for _ in range(iters):
        new = {m: max(wins[m], 1e-3) / sum(n / (p[m] + p[next(iter(pair - {m}))]) for pair, n in games.items()
                                           if m in pair) for m in p}
        g = math.exp(sum(math.log(v) for v in new.values()) / len(new))
        p = {m: v / g for m, v in new.items()}
    return {m: 1000 + 400 * math.log10(v) for m, v in p.items()}


def test_bradley_terry_is_the_loops_fit_and_a_model_against_itself_has_no_rating():
    rng = random.Random(2)
    names = [f'm{i}' for i in range(7)]
    js = [judgment(str(k), *rng.sample(names, 2), rng.choice(WINNERS)) for k in range(300)]
    js.append(judgment('self', 'm0', 'm0', 'a'))
    want, got = hunter_by_loops(js), bradley_terry(js)
    assert set(got) == set(want) and all(abs(got[m] - want[m]) < 1e-9 for m in want)
    # only self-play: no ratings, and the statistics still come (this was a ZeroDivisionError)
    stats = arena_stats([judgment('s', 'm0', 'm0', 'a')], n_boot=5)
    assert stats['bradley_terry'] == {} and stats['judgments'] == 1


def test_a_torn_line_is_skipped_and_appends_after_it_go_on(tmp_path):
    path = tmp_path / 'judgments.jsonl'
    append_judgment(str(path), judgment('x', 'm1', 'm2', 'a'))
    with open(path, 'a') as f:
        f.write('{"id": "torn", "prom')  # a crash mid-write
    append_judgment(str(path), judgment('y', 'm1', 'm2', 'b'))  # closes the torn line first
    append_judgment(str(path), judgment('z', 'm1', 'm2', 'tie'))
    with pytest.warns(UserWarning, match='line 2: skipped a torn line'):
        got = read_judgments(str(path))
    assert [j['id'] for j in got] == ['x', 'y', 'z']


def test_a_short_write_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    """A disk that takes only part of a line (os.write's short count): the part is cut off again and the append
    raises OSError (the server answers 507), so the file never holds a torn judgment."""
    import os
    from nanolab import arena
    path = tmp_path / 'judgments.jsonl'
    append_judgment(str(path), judgment('x', 'm1', 'm2', 'a'))
    before = path.read_bytes()
    write = os.write
    monkeypatch.setattr(arena.os, 'write', lambda fd, data: write(fd, data[:len(data) // 2]))
    with pytest.raises(OSError):
        append_judgment(str(path), judgment('y', 'm1', 'm2', 'b'))
    monkeypatch.setattr(arena.os, 'write', write)
    assert path.read_bytes() == before
    append_judgment(str(path), judgment('z', 'm1', 'm2', 'b'))
    assert [j['id'] for j in read_judgments(str(path))] == ['x', 'z']


def test_new_judgments_are_bounded_in_every_field(tmp_path):
    path = str(tmp_path / 'judgments.jsonl')
    j = judgment('x', 'm1', 'm2', 'a')
    for bad, words in [({**j, 'extra': 'x' * 100}, 'unknown field'),
                       ({**j, 'a': {**j['a'], 'model': 'm' * 5000}}, 'model'),
                       ({**j, 'a': {**j['a'], 'model': ''}}, 'model'),
                       ({**j, 'b': {**j['b'], 'settings': {'k': 'v' * 5000}}}, 'settings'),
                       ({**j, 'b': {**j['b'], 'logprobs': [0.1] * 10}}, 'only'),
                       ({**j, 'annotator': 'a' * 1000}, 'annotator'),
                       ({**j, 'id': 'i' * 1000}, 'id')]:
        with pytest.raises(ValueError, match=words):
            append_judgment(path, bad)
    append_judgment(path, j)
    assert len(read_judgments(path)) == 1


def test_the_store_computes_statistics_once_per_change(tmp_path, monkeypatch):
    import threading
    from nanolab import arena
    calls = []
    stats = arena.arena_stats
    monkeypatch.setattr(arena, 'arena_stats', lambda js, n_boot: calls.append(len(js)) or stats(js, n_boot))
    store = arena.Store(str(tmp_path / 'arena' / 'judgments.jsonl'))
    assert store.stats() == {'judgments': 0} and calls == []
    store.append(judgment('x', 'm1', 'm2', 'a'))
    threads = [threading.Thread(target=store.stats) for _ in range(8)]  # eight readers at once: one computes
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.stats()['judgments'] == 1 and calls == [1]
    store.append(judgment('y', 'm1', 'm2', 'b'))
    assert store.stats()['judgments'] == 2 and store.stats()['judgments'] == 2 and calls == [1, 2]
