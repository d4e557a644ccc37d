"""The results store and the leaderboard (results.py, evaluate.py --leaderboard) against hand computations: result files
written atomically and never overwritten, the leaderboard's order, intervals and exact McNemar p-value on hand-made
results, foreign files skipped and counted, the model card's evaluations table, and one end-to-end run (train.py
--keep_checkpoints, evaluate.py --checkpoints, evaluate.py --leaderboard). Tiny models; CPU, about 15 seconds."""
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from nanolab import results
from nanolab.tracking import write_model_card
from nanolab.results import (evals_markdown, mcnemar_p, paired_test, save_result, show_leaderboard,
                             update_model_card)
from nanolab.runs import checkpoint_sources
from test_train import CHARS, TINY, make_dataset, train  # tiny train.py runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def result(model, scores, task='benchmark:qa.jsonl', it=100):
    """A result dict as evaluate.py's main builds one: 0/1 exact-match scores on items '0', '1', ..."""
    mean = sum(scores) / len(scores)
    return {'model': model, 'checkpoint': model, 'iter': it, 'task': task, 'metrics': {'exact_match': mean},
            'stderr': {'exact_match': math.sqrt(mean * (1 - mean) / len(scores))}, 'n': len(scores),
            'items': {'exact_match': scores}, 'item_ids': [str(i) for i in range(len(scores))],
            'settings': {}, 'time': 0.1, 'config': {}}


def perplexity_result(model, loss):
    return {'model': model, 'checkpoint': model, 'iter': 100, 'task': 'perplexity:tiny/val.bin', 'n': 1000,
            'metrics': {'loss': loss, 'perplexity': math.exp(loss)}, 'settings': {}, 'time': 0.1, 'config': {}}


def test_save_result_is_atomic_and_never_overwrites(tmp_path, monkeypatch):
    r = result('out-a', [1.0, 0.0])
    paths = [save_result(str(tmp_path), r) for _ in range(3)]  # the same second: suffixes, not overwrites
    assert len(set(paths)) == 3 and sorted(os.listdir(tmp_path / 'eval')) == sorted(map(os.path.basename, paths))
    assert os.path.basename(paths[0]).startswith('benchmark_qa.jsonl-100-') and paths[0].endswith('Z.json')
    saved = [json.load(open(p)) for p in paths]
    assert all(s['schema'] == 'nanolab-eval/1' and s['items'] == r['items'] for s in saved)
    assert saved[0]['created'] < saved[1]['created'] < saved[2]['created']  # ISO UTC, in time order
    assert os.path.basename(save_result(str(tmp_path), {**r, 'iter': None})).startswith('benchmark_qa.jsonl-final-')
    # a crash before the rename leaves no .json that a reader could take for a result
    monkeypatch.setattr(results.os, 'replace', lambda a, b: (_ for _ in ()).throw(OSError('disk full')))
    with pytest.raises(OSError):
        save_result(str(tmp_path), r)
    assert len([f for f in os.listdir(tmp_path / 'eval') if f.endswith('.json')]) == 4


def test_mcnemar_and_paired_bootstrap_against_hand_values():
    # b=10, c=2: p = 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2 * 79 / 4096
    assert mcnemar_p(10, 2) == mcnemar_p(2, 10) == pytest.approx(0.0385742, abs=1e-6)
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(3, 3) == 1.0
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    assert paired_test(x, x)[0] == 1.0
    p, test = paired_test(x + 0.5 + 0.1 * rng.normal(size=200), x)
    assert test == 'paired bootstrap' and p < 0.01
    assert paired_test(x + 0.01 * rng.normal(size=200), x)[0] > 0.05


def test_leaderboard_order_intervals_paired_test_and_files(tmp_path, capsys):
    a, b = str(tmp_path / 'out-a'), str(tmp_path / 'out-b')
    # 40 items: both right on 20, both wrong on 8, only a on 10 (b), only b on 2 (c) -> a 30/40, b 22/40
    sa = [1.0] * 20 + [0.0] * 8 + [1.0] * 10 + [0.0] * 2
    sb = [1.0] * 20 + [0.0] * 8 + [0.0] * 10 + [1.0] * 2
    save_result(a, result(a, [0.0] * 40))  # an older result of a: the latest wins
    save_result(a, result(a, sa))
    save_result(b, result(b, sb))
    save_result(a, perplexity_result(a, 2.0))
    save_result(b, perplexity_result(b, 1.5))
    # foreign and malformed files: skipped and counted, never a traceback
    (tmp_path / 'out-a' / 'eval' / 'a_notes.json').write_text('{"hello": 1}')
    (tmp_path / 'out-a' / 'eval' / 'b_torn.json').write_text('{"schema": "nanolab-eval/1", "mod')
    (tmp_path / 'out-b' / 'eval' / 'c_partial.json').write_text('{"schema": "nanolab-eval/1", "task": "x"}')
    stem = str(tmp_path / 'board' / 'lb')
    rows = show_leaderboard([a, b], sort_by='exact_match', out_stem=stem)
    out = capsys.readouterr().out
    assert 'skipped 3 file(s)' in out and 'a_notes.json' in out
    bench = [r for r in rows if r['task'] == 'benchmark:qa.jsonl']
    ppl = [r for r in rows if r['task'] == 'perplexity:tiny/val.bin']
    assert [r['model'] for r in bench] == [a, b] and [r['model'] for r in ppl] == [b, a]  # loss: lower is better
    assert bench[0]['metrics']['exact_match']['value'] == 0.75
    for r in bench:
        s = r['metrics']['exact_match']
        assert s['ci95'][0] < s['value'] < s['ci95'][1] and s['ci95'][1] - s['ci95'][0] < 0.5
    assert bench[0]['test'] == 'best' and bench[1]['test'] == 'McNemar'
    assert bench[1]['p_vs_best'] == pytest.approx(2 * 79 / 4096)
    assert ppl[0]['sorted_by'] == 'loss' and ppl[1]['test'] is None  # no per-item scores: no test
    # the files: Markdown with intervals and the p-value, CSV and JSON with the same rows
    md = open(stem + '.md').read()
    assert 'p=0.0386 (McNemar, exact_match)' in md and '0.7500 [' in md and '2.0000' in md
    table = list(csv.DictReader(open(stem + '.csv')))
    assert [r['model'] for r in table] == [a, b, b, a] and float(table[1]['p_vs_best']) == pytest.approx(0.0386, abs=1e-4)
    assert float(table[0]['exact_match_ci_low']) < 0.75 < float(table[0]['exact_match_ci_high'])
    assert len(json.load(open(stem + '.json'))['rows']) == 4
    # errors name the problem and the fix
    with pytest.raises(ValueError, match="unknown sort_by 'acc'.*exact_match, loss, perplexity"):
        show_leaderboard([a, b], sort_by='acc', out_stem=stem)
    with pytest.raises(ValueError, match='not a directory'):
        show_leaderboard([str(tmp_path / 'nope')], out_stem=stem)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='no evaluation results.*python evaluate.py --init_from='):
        show_leaderboard([str(tmp_path / 'empty')], out_stem=stem)


def test_model_card_evaluations_table(tmp_path):
    out = str(tmp_path / 'run')
    os.makedirs(out)
    card = lambda: open(os.path.join(out, 'README.md')).read()
    write_model_card(out, 'run', 'A test model.', {'n_layer': 2}, 1000, {'dataset': 'tiny'}, {'val loss': 1.5},
                     command='python train.py')
    assert 'None yet' in card() and evals_markdown(out) == ''
    save_result(out, result(out, [1.0, 0.0, 1.0, 1.0]))
    update_model_card(out)
    text = card()
    section = text.split('## Evaluations')[1].split('## Use')[0]
    assert 'benchmark:qa.jsonl' in section and 'exact_match 0.7500 ± 0.2165' in section and 'None yet' not in section
    assert text.count('## Evaluations') == 1 and '## Use' in text and 'val loss' in text  # the rest is kept
    # train.py / finetune.py rewriting the card later keep the table
    write_model_card(out, 'run', 'A test model.', {'n_layer': 2}, 1000, {'dataset': 'tiny'}, {'val loss': 1.4})
    assert 'exact_match 0.7500' in card()
    # a folder without a card (a Hugging Face model's eval-<name>) gets a minimal one
    other = str(tmp_path / 'eval-gpt2')
    save_result(other, result('gpt2', [1.0, 0.0]))
    update_model_card(other)
    assert open(os.path.join(other, 'README.md')).read().startswith('# eval-gpt2') and 'exact_match 0.5000' in \
        open(os.path.join(other, 'README.md')).read()


def test_end_to_end_checkpoints_and_leaderboard(tmp_path):
    data_dir, run = str(tmp_path / 'data'), str(tmp_path / 'run')
    make_dataset(data_dir, n_train=4000, n_val=1000)
    train(*TINY, f'--data_dir={data_dir}', f'--out_dir={run}', '--max_iters=20', '--lr_decay_iters=20',
          '--keep_checkpoints=True')
    assert sorted(os.listdir(os.path.join(run, 'checkpoints'))) == ['ckpt_10.pt', 'ckpt_20.pt']
    sources = checkpoint_sources(run)  # one per iteration; ckpt.pt stands for its copy ckpt_20.pt
    assert len(sources) == 2 and sources[-1] == os.path.join(run, 'ckpt.pt')
    with pytest.raises(ValueError, match='not one'):
        checkpoint_sources(data_dir)
    # a multiple-choice benchmark in the tiny vocabulary: 'a' is followed by 3a or 3a+1 mod 16, never by 'p'
    bench = tmp_path / 'mc.jsonl'
    bench.write_text(''.join(json.dumps({'prompt': CHARS[i], 'choices': [CHARS[3 * i % 16], 'p'], 'answer': 0}) + '\n'
                             for i in range(1, 9)))
    cmd = [sys.executable, os.path.join(ROOT, 'evaluate.py'), '--device=cpu']
    done = subprocess.run(cmd + [f'--init_from={run}', f'--benchmark={bench}', '--chat=False', '--checkpoints=True'],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert len(os.listdir(os.path.join(run, 'eval'))) == 2 and 'benchmark:mc |' in open(os.path.join(run, 'README.md')).read()
    done = subprocess.run(cmd + [f'--leaderboard={run}', '--sort_by=acc'], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = json.load(open(tmp_path / 'leaderboard.json'))['rows']
    assert sorted(r['iter'] for r in rows) == [10, 20] and rows[1]['test'] == 'McNemar'  # the same 8 items
    done = subprocess.run(cmd + ['--leaderboard=nowhere'], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.startswith('error: nowhere is not a directory'), done.stderr


def test_checkpoint_history_flags_a_significant_drop_only():
    """Three checkpoints of one run: 900 -> 1000 loses 10 of 40 items (McNemar p = 2/1024: flagged), 1000 -> 1100
    changes one item (p = 1: not flagged); a lower perplexity is no regression, a higher one significant is."""
    a = [1.0] * 30 + [0.0] * 10
    b = [1.0] * 20 + [0.0] * 20  # items 20-29 lost
    c = [1.0] * 21 + [0.0] * 19  # item 20 back
    rs = [{**result('out-x', s, it=it), 'checkpoint': f'out-x/checkpoints/ckpt_{it}.pt'} for s, it in
          ((a, 900), (b, 1000), (c, 1100))]
    rs[-1]['checkpoint'] = 'out-x/ckpt.pt'  # the last one is the run's ckpt.pt: the same run
    (h,) = results.checkpoint_history(rs)
    assert h['run'] == 'out-x' and [p['iter'] for p in h['points']] == [900, 1000, 1100]
    (flag,) = h['flags']
    assert (flag['metric'], flag['from_iter'], flag['to_iter'], flag['test']) == ('exact_match', 900, 1000, 'McNemar')
    assert flag['p'] == pytest.approx(mcnemar_p(0, 10)) and flag['p'] < 0.05
    assert results.checkpoint_history([rs[0]]) == []  # one checkpoint: no history


def test_groups_come_before_their_subtasks_in_the_leaderboard_and_the_card(tmp_path):
    rs = [result('m', [1.0, 0.0], task='lm_eval:mmlu_stem'), result('m', [1.0, 1.0], task='lm_eval:aaa'),
          result('m', [0.0, 1.0], task='lm_eval:mmlu_abstract_algebra'), result('m', [1.0, 0.0], task='lm_eval:mmlu')]
    rs[0]['group'], rs[2]['group'], rs[3]['subtasks'] = 'lm_eval:mmlu', 'lm_eval:mmlu_stem', ['lm_eval:mmlu_stem']
    rows = results.leaderboard_rows(rs, n_boot=50)
    assert [(r['task'], r['depth']) for r in rows] == [('lm_eval:aaa', 0), ('lm_eval:mmlu', 0),
                                                       ('lm_eval:mmlu_stem', 1), ('lm_eval:mmlu_abstract_algebra', 2)]
    for r in rs:
        save_result(str(tmp_path), r)
    card = [line.split(' | ')[0] for line in evals_markdown(str(tmp_path)).splitlines()[2:6]]
    assert card == ['| lm_eval:aaa', '| lm_eval:mmlu', '| &nbsp;&nbsp;↳ lm_eval:mmlu_stem',
                    '| &nbsp;&nbsp;&nbsp;&nbsp;↳ lm_eval:mmlu_abstract_algebra']
