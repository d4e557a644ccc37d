"""
The results store and the leaderboard: evaluate.py writes one JSON file per (checkpoint, task,
time) under a run's out_dir/eval/; the model card (tracking.write_model_card), the leaderboard
(`python evaluate.py --leaderboard=...`) and the page (page_api.py) read them back here.

    from nanolab.results import save_result, read_results, show_leaderboard
    save_result('out-x', result)  # out-x/eval/<task>-<iter>-<time>.json, atomic, never overwriting
    show_leaderboard(['out-a', 'out-b'], 'exact_match')  # a table, leaderboard.md/.csv/.json

Statistics: a 95% percentile-bootstrap interval over per-item scores; against the best row of a
task on the same items, an exact McNemar test for 0/1 scores (math.comb, no scipy) and a paired
bootstrap otherwise.
"""
import glob
import json
import math
import os
import re

from nanolab.files import finite, write_text

# -----------------------------------------------------------------------------
# 1) reading results: the model card and the leaderboard

def evals_markdown(out_dir):
    """The model card's evaluations table: the latest evaluate.py result per (checkpoint, task) in
    out_dir/eval/; '' when there is none."""
    results, _ = read_results(glob.glob(os.path.join(out_dir, 'eval', '*.json')))
    if not results:
        return ''
    lines = ['| task | checkpoint | iter | n | metrics (± standard error) | date |',
             '|---|---|---|---|---|---|']
    groups = {r['task']: r['group'] for r in results if r.get('group')}
    for r in sorted(results, key=lambda r: (task_path(r, groups), r.get('iter') or 0,
                                            r['checkpoint'])):
        shown = ', '.join(f'{k} {v:.4f}' +
                          (f" ± {r['stderr'][k]:.4f}" if k in (r.get('stderr') or {}) else '')
                          for k, v in r['metrics'].items())
        it = '-' if r.get('iter') is None else r['iter']
        task = '&nbsp;&nbsp;' * (len(task_path(r, groups)) - 1) + \
            ('↳ ' if r.get('group') else '') + r['task']
        lines.append(f"| {task} | {os.path.basename(os.path.normpath(r['checkpoint']))} | {it} | "
                     f"{r['n']:,} | {shown} | {r['created'][:10]} |")
    return '\n'.join(lines + ['', 'Each result, with its settings and per-item scores, is a file '
                                   'in `eval/`; compare models with `python evaluate.py '
                                   '--leaderboard=DIR,DIR,...`.'])

RESULT_SCHEMA = 'nanolab-eval/1'

def _result_problem(r):
    """What makes a parsed JSON file not a usable evaluate.py result, or None."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    numbers = lambda d: isinstance(d, dict) and all(map(number, d.values()))  # {name: number}
    if not isinstance(r, dict) or r.get('schema') != RESULT_SCHEMA:
        return f"no 'schema': '{RESULT_SCHEMA}' marker"
    missing = [k for k in ('model', 'checkpoint', 'task', 'metrics', 'n', 'created') if k not in r]
    if missing:
        return f'missing {missing}'
    # optional: per-item scores, and which items they are
    items, ids = r.get('items', {}), r.get('item_ids')
    ok = (numbers(r['metrics']) and numbers(r.get('stderr', {})) and number(r['n']) and
          (r.get('iter') is None or number(r['iter'])) and
          all(isinstance(r[k], str) for k in ('checkpoint', 'task', 'created')) and
          isinstance(items, dict) and all(isinstance(v, list) and all(map(number, v))
                                          for v in items.values()) and
          (ids is None or (isinstance(ids, list) and all(isinstance(i, (str, int)) for i in ids)
                           and all(len(v) == len(ids) for v in items.values()))))
    return None if ok else 'a field of the wrong type'

def read_results(paths):
    """The evaluate.py results among `paths`: (the latest result per (checkpoint, task), each with
    its 'file' added; [(path, why)] for each file skipped as foreign or malformed). Never raises on
    a bad file."""
    latest, skipped = {}, []
    for path in sorted(paths):
        try:
            with open(path, encoding='utf-8') as f:
                r = json.load(f)
        except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or bad UTF-8
            skipped.append((path, f'not readable JSON ({type(e).__name__})'))
            continue
        why = _result_problem(r)
        if why:
            skipped.append((path, why))
            continue
        # out_dir = its ckpt.pt
        key = (os.path.normpath(r['checkpoint']).removesuffix(os.sep + 'ckpt.pt'), r['task'])
        if key not in latest \
                or (r['created'], path) > (latest[key]['created'], latest[key]['file']):
            latest[key] = {**r, 'file': path}  # ISO timestamps sort in time order
    return list(latest.values()), skipped

# -----------------------------------------------------------------------------
# 2) writing results, and the leaderboard


LOWER_IS_BETTER = ('loss', 'perplexity', 'bits_per_byte', 'word_perplexity', 'byte_perplexity')

def save_result(results_dir, result):
    """Write one result dict as results_dir/eval/<task>-<iter or 'final'>-<UTC time>.json,
    atomically, adding the 'schema' marker and 'created' time that the model card and the
    leaderboard read (read_results). A name already taken gets a -2, -3, ... suffix, so no result
    is ever overwritten. Returns the path."""
    from datetime import datetime, timezone
    now = datetime.now(timezone.utc)
    folder = os.path.join(results_dir, 'eval')
    os.makedirs(folder, exist_ok=True)
    it = 'final' if result.get('iter') is None else result['iter']
    stem = \
        f"{re.sub(r'[^A-Za-z0-9._-]+', '_', result['task']).strip('_')}-{it}-{now:%Y%m%dT%H%M%SZ}"
    path, k = os.path.join(folder, f'{stem}.json'), 1
    while os.path.exists(path):
        k += 1
        path = os.path.join(folder, f'{stem}-{k}.json')
    result = {'schema': RESULT_SCHEMA, 'created': now.isoformat(timespec='microseconds'), **result}
    # one key a line, each value on its line (NaN: null): readable, without a line for each of
    # thousands of per-item scores
    lines = [f' {json.dumps(k)}: {json.dumps(finite(v), default=str)}' for k, v in result.items()]
    write_text(path, '{\n' + ',\n'.join(lines) + '\n}\n')
    return path

def update_model_card(results_dir):
    """Rewrite the Evaluations section of results_dir/README.md (the card that every trainer
    writes, which builds the same table) from eval/*.json; a folder without a card gets a minimal
    one."""
    path = os.path.join(results_dir, 'README.md')
    section = f"## Evaluations\n\n{evals_markdown(results_dir) or 'None yet.'}\n\n"
    if os.path.exists(path):
        with open(path, encoding='utf-8') as f:
            text = f.read()
        # the section runs to the next '## ' heading, or to the end
        text, found = re.subn(r'^## Evaluations\n.*?(?=^## |\Z)', lambda m: section, text, count=1,
                              flags=re.S | re.M)
        text = text if found else text.rstrip('\n') + '\n\n' + section
    else:
        text = f"# {os.path.basename(os.path.abspath(results_dir))}\n\n" \
            f"Evaluated with nanolab's evaluate.py.\n\n{section}"
    os.makedirs(results_dir, exist_ok=True)
    write_text(path, text.rstrip('\n') + '\n')

def bootstrap_means(x, n_boot, seed):
    """Means of n_boot resamples of x (with replacement), drawn 256 at a time to bound memory."""
    import numpy as np
    rng = np.random.default_rng(seed)
    return np.concatenate([x[rng.integers(0, len(x), (min(256, n_boot - i), len(x)))].mean(1)
                           for i in range(0, n_boot, 256)])

def mcnemar_p(b, c):
    """Exact two-sided McNemar test. Of the b + c items two models disagree on, the first got b
    right and the second c; if they are equally good, each such item is a fair coin flip, so p is
    the chance that a Binomial(b + c, 1/2) lands min(b, c) or further from the middle, on either
    side."""
    n = b + c
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n) if n else 1.0

def paired_test(x, y, n_boot=1000, seed=1337):
    """p-value for 'per-item scores x and y (the same items, in order) have the same mean' -> (p,
    test name): exact McNemar for 0/1 scores, else a paired bootstrap of the mean difference,
    shifted to the null (the share of resampled differences at least as far from the observed one
    as it is from zero)."""
    import numpy as np
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if np.isin(x, (0, 1)).all() and np.isin(y, (0, 1)).all():
        return mcnemar_p(int(((x == 1) & (y == 0)).sum()),
                         int(((x == 0) & (y == 1)).sum())), 'McNemar'
    d = x - y
    means = bootstrap_means(d, n_boot, seed)
    return float((1 + (abs(means - d.mean()) >= abs(d.mean())).sum()) / (n_boot + 1)), \
        'paired bootstrap'

def _paired_items(r, best, metric):
    """r's and best's per-item scores of metric on the same items (in r's order), or None if they
    lack them."""
    a, b = (r.get('items') or {}).get(metric), (best.get('items') or {}).get(metric)
    ids_a, ids_b = r.get('item_ids'), best.get('item_ids')
    if not (a and b and ids_a and ids_b and len(set(ids_a)) == len(ids_a) == len(ids_b)
            and set(ids_a) == set(ids_b)):
        return None
    where = {i: k for k, i in enumerate(ids_b)}
    return a, [b[where[i]] for i in ids_a]

def task_path(result, groups):
    """[top group, ..., task] of a result, from the 'group' its subtasks name (lm-eval's tree:
    MMLU, its four categories, their subjects); groups: {task: its group}. Sorting by it puts each
    group before its members."""
    path, t = [result['task']], result['task']
    while groups.get(t) and groups[t] not in path:
        t = groups[t]
        path.insert(0, t)
    return path

def leaderboard_rows(results, sort_by='', n_boot=1000, seed=1337):
    """One row per result, task by task (each lm-eval group followed by its subtasks), best first
    by sort_by (or the task's first metric): each metric's value, 95% percentile-bootstrap interval
    over its per-item scores (stderr where there are none), and a paired test of the sort metric
    against the task's best on the same items (p_vs_best, with the test's name). What the
    leaderboard prints and the page's grid draws."""
    import numpy as np
    groups = {r['task']: r['group'] for r in results if r.get('group')}
    rows = []
    for task in sorted({r['task'] for r in results}, key=lambda t: task_path({'task': t}, groups)):
        group = [r for r in results if r['task'] == task]
        key = sort_by if any(sort_by in r['metrics'] for r in group) else \
            next(iter(group[0]['metrics']), '')
        sign = 1 if key in LOWER_IS_BETTER else -1
        group.sort(key=lambda r: (key not in r['metrics'], sign * r['metrics'].get(key, 0),
                                  r['checkpoint']))
        for r in group:
            row = {k: r.get(k) for k in ('model', 'checkpoint', 'iter', 'task', 'n', 'created',
                                         'file', 'group', 'subtasks')}
            row.update(sorted_by=key, metrics={}, p_vs_best=None,
                       test='best' if r is group[0] else None, depth=len(task_path(r, groups)) - 1)
            for m, v in r['metrics'].items():
                items = (r.get('items') or {}).get(m)
                ci = np.percentile(bootstrap_means(np.asarray(items, dtype=float), n_boot, seed),
                                   [2.5, 97.5]).tolist() \
                    if items else None
                row['metrics'][m] = {'value': v, 'ci95': ci,
                                     'stderr': (r.get('stderr') or {}).get(m)}
            pair = _paired_items(r, group[0], key) if r is not group[0] else None
            if pair:
                row['p_vs_best'], row['test'] = paired_test(*pair, n_boot, seed)
            rows.append(row)
    return rows

def run_of(checkpoint):
    """The run directory a result's checkpoint belongs to: out_dir for out_dir/ckpt.pt, best.pt or
    out_dir/checkpoints/ckpt_N.pt (train.py's keep_checkpoints), the path itself otherwise."""
    d = os.path.dirname(os.path.normpath(checkpoint)) if checkpoint.endswith('.pt') else \
        os.path.normpath(checkpoint)
    return os.path.dirname(d) if os.path.basename(d) == 'checkpoints' else d

def checkpoint_history(results, n_boot=1000, seed=1337, alpha=0.05):
    """Each run's results on each task across its checkpoints (evaluate.py --checkpoints), oldest
    first, and a flag wherever a metric got significantly worse than at the previous checkpoint:
    lower for accuracy-like metrics (higher for LOWER_IS_BETTER) with a paired test on the same
    items below alpha. -> [{run, task, points: [{iter, checkpoint, metrics}], flags: [{metric,
    from_iter, to_iter, before, after, p, test}]}] for the runs with two or more checkpoints scored
    on a task."""
    by = {}
    for r in results:
        if r.get('iter') is not None:
            # one result per iteration
            by.setdefault((run_of(r['checkpoint']), r['task']), {})[r['iter']] = r
    out = []
    for (run, task), at in sorted(by.items()):
        if len(at) < 2:
            continue
        seq = [at[i] for i in sorted(at)]
        flags = []
        for a, b in zip(seq, seq[1:]):
            for m in b['metrics']:
                pair = _paired_items(b, a, m) if m in a['metrics'] else None
                worse = (b['metrics'][m] > a['metrics'][m]) if m in LOWER_IS_BETTER else \
                    (b['metrics'][m] < a['metrics'][m])
                if pair and worse:
                    p, test = paired_test(*pair, n_boot, seed)
                    if p < alpha:
                        flags.append({'metric': m, 'from_iter': a['iter'], 'to_iter': b['iter'],
                                      'before': a['metrics'][m], 'after': b['metrics'][m], 'p': p,
                                      'test': test})
        out.append({'run': run, 'task': task, 'flags': flags,
                    'points': [{'iter': r['iter'], 'checkpoint': r['checkpoint'],
                                'metrics': r['metrics']} for r in seq]})
    return out

def show_leaderboard(dirs, sort_by='', out_stem='leaderboard', n_boot=1000, seed=1337):
    """Compare the results under dirs (run directories, whose eval/ is read, or folders of result
    files, read recursively): one row per (checkpoint, task), its latest result. Each task's rows
    are sorted by sort_by (or, when '' or the task lacks it, its first metric), best first:
    descending, or ascending for LOWER_IS_BETTER. Metrics with per-item scores get a 95%
    percentile-bootstrap interval (n_boot resamples), others ± standard error; a row scored on the
    same items as its task's best gets a paired test of that metric against it. Prints the table
    and writes <out_stem>.md, .csv and .json. Returns the rows."""
    import csv
    import io
    if n_boot < 1:
        raise ValueError(f'bootstrap={n_boot}: the leaderboard needs at least 1 '
                         'bootstrap resample (1000 is usual)')
    paths = []
    for d in dirs:
        if not os.path.isdir(d):
            raise ValueError(f'{d} is not a directory; give run directories (out_dir) or '
                             'folders of evaluate.py results')
        folder = os.path.join(d, 'eval') if os.path.isdir(os.path.join(d, 'eval')) else d
        paths += glob.glob(os.path.join(folder, '**', '*.json'), recursive=True)
    results, skipped = read_results(paths)
    if skipped:
        print(f'skipped {len(skipped)} file(s) that are not evaluate.py results (first: '
              f'{skipped[0][0]}: {skipped[0][1]})')
    if not results:
        raise ValueError(f"no evaluation results in {', '.join(dirs)}; run `python evaluate.py "
                         "--init_from=DIR ...` first")
    # every metric, first seen first
    names = list(dict.fromkeys(m for r in results for m in r['metrics']))
    if sort_by and sort_by not in names:
        raise ValueError(f"unknown sort_by '{sort_by}'; the results have: {', '.join(names)}")
    rows = leaderboard_rows(results, sort_by, n_boot, seed)
    # 2) the table, as Markdown (printed and written), CSV and JSON
    def cell(s):
        if s is None:
            return ''
        if s['ci95']:
            return f"{s['value']:.4f} [{s['ci95'][0]:.4f}, {s['ci95'][1]:.4f}]"
        return f"{s['value']:.4f}" + (f" ± {s['stderr']:.4f}" if s['stderr'] is not None else '')
    def versus(row):
        return f"best ({row['sorted_by']})" if row['test'] == 'best' else \
            f"p={row['p_vs_best']:.3g} ({row['test']}, {row['sorted_by']})" if row['test'] else ''
    head = ['model', 'checkpoint', 'iter', 'task', 'n', *names, 'vs best']
    md = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for row in rows:
        ck = os.path.basename(row['checkpoint']) if row['checkpoint'].endswith('.pt') else ''
        # a group's subtask
        task = '&nbsp;&nbsp;' * row['depth'] + ('↳ ' if row['group'] else '') + row['task']
        md.append('| ' + ' | '.join([row['model'], ck,
                                     '-' if row['iter'] is None else str(row['iter']), task,
                                     f"{row['n']:,}",
                                     *(cell(row['metrics'].get(m)) for m in names),
                                     versus(row)]) + ' |')
    md += ['', f'[lo, hi]: 95% percentile-bootstrap interval over the items ({n_boot} resamples); '
               '± standard error where there are no per-item scores. vs best: a paired test '
               'against the task\'s top row on the same items (exact McNemar for 0/1 scores, '
               'else a paired bootstrap).']
    print('\n'.join(md))
    # CSV: 4 columns a metric
    numbers = lambda s: (s['value'], *(s['ci95'] or ('', '')), s['stderr']) if s else ('',) * 4
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator='\n')
    w.writerow(head[:5] + [f'{m}{s}' for m in names for s in ('', '_ci_low', '_ci_high',
                                                              '_stderr')]
               + ['sorted_by', 'p_vs_best', 'test'])
    for row in rows:
        w.writerow([row[k] for k in head[:5]]
                   + [x for m in names for x in numbers(row['metrics'].get(m))]
                   + [row['sorted_by'], row['p_vs_best'], row['test']])
    os.makedirs(os.path.dirname(out_stem) or '.', exist_ok=True)
    write_text(f'{out_stem}.md', '# Leaderboard\n\n' + '\n'.join(md) + '\n')
    write_text(f'{out_stem}.csv', buf.getvalue())
    write_text(f'{out_stem}.json', json.dumps(finite({'sort_by': sort_by, 'n_boot': n_boot,
                                                      'seed': seed, 'skipped': len(skipped),
                                                      'rows': rows}), indent=1) + '\n')
    print(f'wrote {out_stem}.md, {out_stem}.csv and {out_stem}.json')
    return rows
