"""
The training pieces that train.py, finetune.py and dpo.py share, each defined once, as plain functions
(model.py holds the rest: device/dtype, checkpoint save/load, load_model):

  1) configure_optimizer   AdamW, weight decay on matrices only, fused on CUDA
  2) get_lr                warmup, then cosine / linear decay, or constant
  3) checkpoint_dict       everything exact resume needs, RNG states included; set_rng_states undoes it;
     resume_config         --init_from=resume: the checkpoint and the run's saved config, flags on top
  4) MetricsLogger         out_dir/metrics.jsonl, one JSON object per line
  5) plot_loss_svg         the loss curve as a dependency-free SVG
  6) write_model_card      out_dir/README.md, with the evaluations table of results.py
"""
import json
import math
import os
import random

import numpy as np
import torch

import results

# -----------------------------------------------------------------------------
# 1) optimizer and 2) learning-rate schedule

def configure_optimizer(model, weight_decay, learning_rate, betas, device_type):
    """AdamW with weight decay on every >=2-D parameter (matmul weights, embeddings) and none on biases and
    norm gains (as nanoGPT and GPT-3 do). Tied weights appear once in model.parameters(), so step once."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay, no_decay = [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]
    groups = [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]
    # fused: one kernel over all tensors, on CUDA and, since torch 2.4, on CPU, where it measured 1.0 ms
    # against 2.9 ms for the default per-tensor loop (0.8M params, 2 cores): 4% of a step of the CPU default
    fused = device_type in ('cuda', 'cpu')
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused or None)
    if fused:
        # subtle: the fused kernel writes the weights without bumping their version counters, which model.py's
        # cached CPU head (GPT._head) keys on, so evals saw stale weights; bump them (empty in-place ops, 0.05 ms)
        def bump_versions(opt, args, kwargs):
            with torch.no_grad():
                for p in params:
                    p.view(-1)[:0].zero_()
        optimizer.register_step_post_hook(bump_versions)
    return optimizer

LR_SCHEDULES = ('cosine', 'linear', 'constant')

def get_lr(it, warmup_iters, lr_decay_iters, learning_rate, min_lr, schedule='cosine'):
    """Learning rate at iteration `it` (counting from 0)."""
    # 1) linear warmup over warmup_iters steps (nanoGPT's (it+1)/(warmup+1): never exactly 0)
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if schedule == 'constant':
        return learning_rate
    # 3) past lr_decay_iters: the floor
    if it >= lr_decay_iters:
        return min_lr
    # 2) in between: decay from learning_rate to min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)  # 0 -> 1
    if schedule == 'cosine':
        coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # Loshchilov & Hutter 2017, no restarts
    elif schedule == 'linear':
        coeff = 1.0 - ratio
    else:
        raise ValueError(f"unknown lr schedule '{schedule}'; use one of {LR_SCHEDULES}")
    return min_lr + coeff * (learning_rate - min_lr)

# -----------------------------------------------------------------------------
# 3) checkpoints. subtle: model.load_checkpoint reads with torch.load(weights_only=True), which accepts only
# tensors and plain Python containers, so numpy and Python RNG states are stored as lists

def rng_states(sampler=None):
    """Every random state a training step draws from: Python, numpy, torch CPU (dropout), CUDA, and the
    data sampler's own generator."""
    py = random.getstate()
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {'python': [py[0], list(py[1]), py[2]], 'numpy': [name, keys.tolist(), pos, has_gauss, gauss],
              'torch': torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states['cuda'] = torch.cuda.get_rng_state()
    if sampler is not None:
        states['sampler'] = sampler.get_state()
    return states

def set_rng_states(states, sampler=None):
    """Restore what rng_states() saved (the sampler's state only if a sampler is given)."""
    random.setstate((states['python'][0], tuple(states['python'][1]), states['python'][2]))
    name, keys, pos, has_gauss, gauss = states['numpy']
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states['torch'])
    if 'cuda' in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states['cuda'])
    if sampler is not None:
        sampler.set_state(states['sampler'])

def checkpoint_dict(raw_model, optimizer, model_args, iter_num, best_val_loss, config, tokenizer_spec,
                    sampler=None, scaler=None, **extra):
    """The checkpoint SPEC.md describes. raw_model is the uncompiled, unwrapped model (no '_orig_mod.' keys)."""
    ckpt = {'model_args': dict(model_args), 'model': raw_model.state_dict(), 'optimizer': optimizer.state_dict(),
            'iter_num': iter_num, 'best_val_loss': float(best_val_loss), 'config': dict(config),
            'tokenizer': tokenizer_spec, 'rng': rng_states(sampler), **extra}
    if scaler is not None and scaler.is_enabled():
        ckpt['scaler'] = scaler.state_dict()
    return ckpt

def check_out_dir(out_dir, init_from, overwrite, script):
    """Refuse (ValueError, naming the fix) a fresh run into an out_dir that holds a trained run, which it would
    silently replace (metrics.jsonl truncated, best.pt and ckpt.pt rewritten), unless overwrite; and an out_dir that
    is the run being trained from."""
    src = init_from[:-len('/ckpt.pt')] if init_from.endswith('/ckpt.pt') else init_from
    if init_from not in ('scratch', 'resume') and os.path.realpath(src) == os.path.realpath(out_dir):
        raise ValueError(f"init_from and out_dir are the same directory ({out_dir}); a run cannot write over the "
                         f"model it starts from: give another --out_dir, or --init_from=resume to go on with it")
    held = [f for f in ('ckpt.pt', 'best.pt') if os.path.isfile(os.path.join(out_dir, f))]
    if init_from != 'resume' and held and not overwrite:
        raise ValueError(f"{out_dir} already holds a trained run ({', '.join(held)}); a new run would replace it. "
                         f"Go on with it (python {script} --init_from=resume --out_dir={out_dir}), train into "
                         f"another --out_dir, or replace it with --overwrite=True")

def resume_config(out_dir, config, script, choices=None, fixed=()):
    """--init_from=resume: (out_dir/ckpt.pt, the config to go on with) = the run's saved config with this command
    line applied on top again, so `--max_iters=...` extends a run. `fixed`: settings that can't change on resume
    (a trained adapter's shape). A missing or corrupt checkpoint, or a changed fixed setting, raises ValueError."""
    from configurator import configure
    from model import load_checkpoint
    ckpt = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))
    saved = {k: v for k, v in ckpt['config'].items() if k in config}  # keys this script still has
    resumed = configure({**config, **saved, '__file__': script}, choices=choices, verbose=False)
    changed = [k for k in fixed if resumed[k] != ckpt['config'][k]]
    if changed:
        k = changed[0]
        raise ValueError(f"{k}={resumed[k]!r} differs from the checkpoint's {ckpt['config'][k]!r}; "
                         f"{', '.join(fixed)} can't change on resume")
    return ckpt, resumed

# -----------------------------------------------------------------------------
# 4) metrics.jsonl

class MetricsLogger:
    """Appends one JSON object per line to `path` and flushes, so a killed run keeps every row it printed.
    resume_iter=None starts a new file; resume_iter=k keeps the rows of iterations before k, since a resumed
    run logs iteration k (and evaluates it) again, so the file never holds an iteration twice."""
    def __init__(self, path, resume_iter=None):
        self.path = path
        rows = []
        if resume_iter is not None and os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:  # a line torn by a crash mid-write
                        continue
                    if row.get('iter', 0) < resume_iter:
                        rows.append(line if line.endswith('\n') else line + '\n')
        tmp = path + '.tmp'
        with open(tmp, 'w') as f:
            f.writelines(rows)
        os.replace(tmp, path)
        self.f = open(path, 'a')

    def log(self, **row):
        self.f.write(results.dumps(row) + '\n')  # a diverged loss (NaN, inf) is written as null: JSON has no NaN
        self.f.flush()

    def close(self):
        self.f.close()

def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

# -----------------------------------------------------------------------------
# 5) the loss curve, as SVG text: no plotting dependency

def _ticks(lo, hi, n=5):
    """About n round numbers (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    span = (hi - lo) or abs(hi) or 1.0
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step)) + 1)], step

def plot_loss_svg(metrics_path, svg_path, title='loss'):
    """Train loss (log rows' `loss`) and val loss (eval rows' `val_loss`) against iteration, with axes,
    ticks and a legend. Written atomically; does nothing until there are two points to draw."""
    rows = read_metrics(metrics_path)
    ok = lambda v: isinstance(v, (int, float)) and math.isfinite(v)  # a diverged run logs inf/nan: leave them out
    series = [('train loss', '#1f77b4', [(r['iter'], r['loss']) for r in rows if ok(r.get('loss'))]),
              ('val loss', '#d62728', [(r['iter'], r['val_loss']) for r in rows if ok(r.get('val_loss'))])]
    pts = [p for _, _, s in series for p in s]
    if len(pts) < 2:
        return
    W, H, L, R, T, B = 640, 400, 60, 20, 30, 45  # size and margins, px
    xt, xs = _ticks(0, max(x for x, _ in pts))
    yt, ys = _ticks(min(y for _, y in pts), max(y for _, y in pts))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]
    X = lambda x: L + (x - x0) / ((x1 - x0) or 1) * (W - L - R)
    Y = lambda y: H - B - (y - y0) / ((y1 - y0) or 1) * (H - T - B)
    fmt = lambda v, step: f'{v:.{max(0, -math.floor(math.log10(step)))}f}'
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           'font-family="sans-serif" font-size="12">', f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="14">{_xml(title)}</text>']
    for v in xt:  # vertical grid lines and x labels
        out.append(f'<line x1="{X(v):.1f}" y1="{T}" x2="{X(v):.1f}" y2="{H - B}" stroke="#ddd"/>'
                   f'<text x="{X(v):.1f}" y="{H - B + 16}" text-anchor="middle">{fmt(v, xs)}</text>')
    for v in yt:
        out.append(f'<line x1="{L}" y1="{Y(v):.1f}" x2="{W - R}" y2="{Y(v):.1f}" stroke="#ddd"/>'
                   f'<text x="{L - 6}" y="{Y(v) + 4:.1f}" text-anchor="end">{fmt(v, ys)}</text>')
    out.append(f'<path d="M{L},{T} V{H - B} H{W - R}" fill="none" stroke="black"/>'
               f'<text x="{(L + W - R) / 2}" y="{H - 8}" text-anchor="middle">iteration</text>'
               f'<text x="14" y="{(T + H - B) / 2}" text-anchor="middle" transform="rotate(-90 14 {(T + H - B) / 2})">loss</text>')
    for i, (name, color, s) in enumerate(series):
        if s:
            d = ' '.join(f'{X(x):.1f},{Y(y):.1f}' for x, y in s)
            out.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        ly = T + 12 + 18 * i  # legend, top right
        out.append(f'<line x1="{W - R - 110}" y1="{ly}" x2="{W - R - 90}" y2="{ly}" stroke="{color}" stroke-width="2"/>'
                   f'<text x="{W - R - 84}" y="{ly + 4}">{name}</text>')
    out.append('</svg>\n')
    tmp = svg_path + '.tmp'
    with open(tmp, 'w') as f:
        f.write('\n'.join(out))
    os.replace(tmp, svg_path)

def _xml(s):
    return str(s).replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')

# -----------------------------------------------------------------------------
# 6) the model card

def write_model_card(out_dir, title, how, model_args, n_params, data, metrics, command=None, evals=None):
    """out_dir/README.md: what the model is, its data, size and metrics, and its evaluations.
    how: one line on how it was made; data: {'name', 'tokenizer', 'train_tokens', ...}; metrics: name -> value;
    evals: more markdown for the Evaluations section, which also holds the table of evaluate.py's results in
    out_dir/eval/ (evals_markdown), so a script that rewrites the card keeps them."""
    fmt = lambda v: f'{v:.4f}' if isinstance(v, float) else f'{v:,}' if isinstance(v, int) else str(v)
    arch = ', '.join(f'{k}={model_args[k]}' for k in ('arch', 'n_layer', 'n_head', 'n_kv_head', 'n_embd',
                                                      'block_size', 'vocab_size') if k in model_args)
    lines = [f'# {title}', '', how, '',
             '## Model', '', f'- parameters: {n_params / 1e6:.2f}M', f'- architecture: {arch}', '',
             '## Data', ''] + [f'- {k}: {fmt(v)}' for k, v in data.items()] + \
            ['', '## Metrics', '', '| metric | value |', '|---|---|'] + [f'| {k} | {fmt(v)} |' for k, v in metrics.items()] + \
            ['', 'Every logged step is in `metrics.jsonl`; the curve is `loss.svg`; the resolved config is `config.json`.', '',
             '## Evaluations', '', '\n\n'.join(filter(None, [evals, results.evals_markdown(out_dir)]))
             or f'None yet. Run `python evaluate.py --init_from={out_dir}` to add them.', '']
    if command:
        lines += ['## Use', '', '```sh', command, f'python sample.py --init_from={out_dir}', '```', '']
    tmp = os.path.join(out_dir, 'README.md.tmp')
    with open(tmp, 'w') as f:
        f.write('\n'.join(lines))
    os.replace(tmp, os.path.join(out_dir, 'README.md'))
