"""
The runs directory, read: a run's metrics.jsonl (read_metrics, the one reader of it), every run with its metrics and
config (the page's run dashboard), a run's saved checkpoints, and the model registry (what is on disk: runs with
their checkpoints and evals, Hugging Face directories, exports).

    rows = read_metrics('out-x/metrics.jsonl')          # a torn last line (a run being written) is dropped
    entries, skipped = model_registry('.')              # GET /v1/registry
"""
import glob
import json
import os

import torch

from nanolab.results import read_results


def read_metrics(path):
    """The rows of a metrics.jsonl, the one reader of it (trainers on resume, the loss curve, GET
    /runs). The last line of a run being written (or killed mid-write) may be torn: without its
    newline and not JSON, it is dropped. Any other line that is not a JSON object is an error
    (ValueError naming the file and line)."""
    with open(path, encoding='utf-8') as f:
        lines = f.read().split('\n')  # the last item is '' when the file ends with a newline
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            if n == len(lines):  # torn: the writer never finished this line
                break
            raise ValueError(f'{path} line {n} is not a JSON object; fix or delete that line')
        rows.append(row)
    return rows

def read_runs(root):
    """Every run under root (a subdirectory holding metrics.jsonl) -> ([{name, metrics: [rows],
    config or None, updated: metrics.jsonl's mtime}], names of the runs skipped), what GET /runs
    (page_api.py) sends the page's run dashboard. A run that cannot be read
    (a config.json being written, a broken line mid-file) is skipped, not fatal; links that lead
    out of root are not followed."""
    runs, skipped, top = [], [], os.path.realpath(root)
    for d in sorted(os.listdir(root)):
        path = os.path.join(root, d, 'metrics.jsonl')
        if not os.path.isfile(path):
            continue
        cfg = os.path.join(root, d, 'config.json')
        if any(not os.path.realpath(p).startswith(top + os.sep) for p in (path, cfg)):
            skipped.append(d)
            continue
        try:
            # a run being trained may have a half-written last line: dropped
            rows = read_metrics(path)
            config = json.load(open(cfg)) if os.path.isfile(cfg) else None
        except (OSError, ValueError):
            skipped.append(d)
            continue
        runs.append({'name': d, 'metrics': rows, 'config': config,
                     'updated': os.path.getmtime(path)})
    return runs, skipped

def checkpoint_sources(run_dir):
    """Every saved checkpoint of a run, oldest first, one per iteration: checkpoints/*.pt
    (train.py's keep_checkpoints), best.pt and ckpt.pt; of two files that hold the same iteration,
    ckpt.pt (then best.pt) is kept."""
    if not os.path.isfile(os.path.join(run_dir, 'ckpt.pt')):
        raise ValueError('--checkpoints needs a run directory (an out_dir holding ckpt.pt) and '
                         f'{run_dir} is not one; train with --keep_checkpoints=True to also keep '
                         'a checkpoint from every eval')
    by_iter = {}
    for path in sorted(glob.glob(os.path.join(run_dir, 'checkpoints', '*.pt'))) + \
            [os.path.join(run_dir, name) for name in ('best.pt', 'ckpt.pt')]:
        if os.path.isfile(path):
            # mmap: read the iteration number without reading the weights (cached for the page's
            # registry)
            try:
                by_iter[int(_checkpoint_info(path)[0])] = path
            except Exception as e:
                raise ValueError(f'checkpoint {path} is unreadable or holds '
                                 f'no iter_num ({type(e).__name__}); delete '
                                 'it, or restore it from a backup') from None
    return [by_iter[k] for k in sorted(by_iter)]

def _checkpoint_info(path, cache={}):
    """(iter_num, model_args, tokenizer kind, kind, parameters) of a checkpoint, read through mmap
    (the weights' shapes, not their values), cached by (path, size, mtime) so that the page's
    refreshes do not read it again."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in cache:
        ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        # a tied weight counts once
        shared = {(t.data_ptr(), t.shape): t.numel() for t in ckpt['model'].values()}
        cache[key] = (ckpt.get('iter_num'), ckpt['model_args'],
                      (ckpt.get('tokenizer') or {}).get('kind'),
                      # reward.py's scores text
                      'reward' if 'reward_head' in ckpt else 'run', sum(shared.values()))
    return cache[key]

def model_registry(root):
    """What is on disk under root, for the page's model registry and checkpoint browser: each run
    (a subdirectory holding ckpt.pt; kind 'run', or 'reward' for reward.py's) with its size, shape,
    parameters, tokenizer, latest evals and every checkpoint (iteration, the val loss metrics.jsonl
    logged there, that checkpoint's evals); each Hugging Face directory (config.json + weights) and
    each export.py file (.gguf, .safetensors) under root or a run. -> ([entry], [(path, why)]
    skipped). A file that cannot be read is skipped with the reason, never fatal."""
    entries, skipped, top = [], [], os.path.realpath(root)
    for d in sorted(os.listdir(root)):
        run = os.path.join(root, d)
        if not os.path.isdir(run) or not os.path.realpath(run).startswith(top + os.sep):
            continue
        files = [os.path.join(r, f) for r, _, fs in os.walk(run) for f in fs]
        size = sum(os.path.getsize(f) for f in files if os.path.isfile(f))
        exports = [{'path': f, 'format': f.rsplit('.', 1)[1], 'size': os.path.getsize(f)}
                   for f in sorted(files) if f.endswith(('.gguf', '.safetensors'))
                   and os.sep + 'hf' + os.sep not in f]
        if os.path.isfile(os.path.join(run, 'ckpt.pt')):
            try:
                evals, _ = read_results(glob.glob(os.path.join(run, 'eval', '*.json')))
                val = {r['iter']: r['val_loss']
                       for r in (read_metrics(os.path.join(run, 'metrics.jsonl'))
                                 if os.path.isfile(os.path.join(run, 'metrics.jsonl')) else [])
                       if 'val_loss' in r}
                checkpoints = []
                for path in checkpoint_sources(run):
                    it, args, tok, _, _ = _checkpoint_info(path)
                    mine = {r['task']: r['metrics'] for r in evals
                            if os.path.realpath(r['checkpoint']) in (os.path.realpath(path),
                                                                     os.path.realpath(run))
                            and r.get('iter') == it}
                    checkpoints.append({'path': path, 'file': os.path.relpath(path, run),
                                        'iter': it, 'val_loss': val.get(it), 'evals': mine})
                it, args, tok, kind, n_params = _checkpoint_info(os.path.join(run, 'ckpt.pt'))
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                skipped.append((run, f'{type(e).__name__}: {str(e)[:120]}'))
                continue
            entries.append({'name': d, 'path': run, 'kind': kind, 'size': size,
                            'arch': args.get('arch'), 'n_params': n_params,
                            'block_size': args.get('block_size'), 'tokenizer': tok, 'iter': it,
                            'checkpoints': checkpoints, 'exports': exports,
                            'evals': {r['task']: r['metrics']
                                      for r in sorted(evals, key=lambda r: r['created'])}})
        elif os.path.isfile(os.path.join(run, 'config.json')) \
                and glob.glob(os.path.join(run, '*.safetensors')) + \
                glob.glob(os.path.join(run, '*.bin')):
            try:
                hf = json.load(open(os.path.join(run, 'config.json')))
            except (OSError, ValueError) as e:
                skipped.append((run, f'config.json: {type(e).__name__}'))
                continue
            entries.append({'name': d, 'path': run, 'kind': 'hf', 'size': size,
                            'arch': hf.get('model_type'), 'n_params': None,
                            'block_size': hf.get('n_positions')
                            or hf.get('max_position_embeddings'),
                            'tokenizer':
                            'hf' if os.path.exists(os.path.join(run, 'tokenizer.json')) else None,
                            'checkpoints': [], 'exports': [], 'evals': {}})
    return entries, skipped
