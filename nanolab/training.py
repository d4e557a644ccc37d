"""
The training pieces that train.py, finetune.py and dpo.py share, each defined once, as plain functions
(model.py holds the rest: device/dtype, checkpoint save/load, load_model):

  1) configure_optimizer   AdamW, weight decay on matrices only, fused on CUDA
  2) get_lr                warmup, then cosine / linear decay, or constant
  3) checkpoint_dict       everything exact resume needs, RNG states included; set_rng_states undoes it;
     resume_config         --init_from=resume: the checkpoint and the run's saved config, flags on top (a damaged
                           metrics.jsonl or checkpoint is refused)
  4) MetricsLogger         out_dir/metrics.jsonl, one JSON object per line (results.read_metrics reads it), and
     open_trackers         the same rows, the config and the run's files to MLflow and W&B (Trackers), when on
  5) plot_loss_svg         the loss curve as a dependency-free SVG
  6) write_model_card      out_dir/README.md, with the evaluations table of results.py
  7) the loop's scaffolding: fail (bad input), catch_stop (Ctrl-C), StepTimer (elapsed, ms/iter), restore_training
     (optimizer, scaler, RNG), optimizer_step (unscale, clip, step), diverged (a NaN or inf val loss)
  8) LoRA (peft): add_lora with its checks, lora_layers, lora_disabled, merged_state_dict
Each script keeps its own visible training loop; these are the pieces the loops share.
"""
import json
import math
import os
import random
import signal
import time
from contextlib import contextmanager

import numpy as np
import torch

from nanolab import results
from nanolab.files import dumps, write_atomic, write_json
from nanolab.results import read_metrics  # the one reader of metrics.jsonl

# -----------------------------------------------------------------------------
# 1) optimizer and 2) learning-rate schedule

OPTIMIZERS = ('adamw', 'muon')

def configure_optimizer(model, weight_decay, learning_rate, betas, device_type, kind='adamw', ns_steps=5):
    """AdamW with weight decay on every >=2-D parameter (matmul weights, embeddings) and none on biases and
    norm gains (as nanoGPT and GPT-3 do). Tied weights appear once in model.parameters(), so step once.
    kind='muon': torch.optim.Muon (momentum, then the update orthogonalized by Newton-Schulz; Jordan et al.
    2024) for the blocks' matrices, AdamW for the embeddings, the head and the 1-D gains, as one Optimizers;
    ns_steps: its Newton-Schulz iterations per step (torch's default is 5)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    matrix = lambda n, p: p.dim() == 2 and '.h.' in n  # a block's Linear weight, not an embedding or the head
    hidden = [p for n, p in named if kind == 'muon' and matrix(n, p)]
    rest = [(n, p) for n, p in named if not (kind == 'muon' and matrix(n, p))]
    decay, no_decay = [p for _, p in rest if p.dim() >= 2], [p for _, p in rest if p.dim() < 2]
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
                for p in decay + no_decay:
                    p.view(-1)[:0].zero_()
        optimizer.register_step_post_hook(bump_versions)
    if kind == 'adamw':
        return optimizer
    if kind != 'muon':
        raise ValueError(f"unknown optimizer '{kind}'; use one of {OPTIMIZERS}")
    # match_rms_adamw scales each matrix's step to AdamW's size (Liu et al. 2025), so one learning rate serves both
    muon = torch.optim.Muon(hidden, lr=learning_rate, weight_decay=weight_decay, adjust_lr_fn='match_rms_adamw',
                            ns_steps=ns_steps)
    return Optimizers(optimizer, muon)

class Optimizers:
    """Several optimizers stepped as one: param_groups (set each group's lr), step, zero_grad, state_dict and
    load_state_dict, which are all that the trainers and torch's GradScaler use."""
    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):  # subtle: read each time, since load_state_dict replaces an optimizer's group dicts
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {'optimizers': [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state):
        if len(state.get('optimizers', ())) != len(self.optimizers):
            raise ValueError('the checkpoint was written with another optimizer setting; resume with the one it used')
        for o, s in zip(self.optimizers, state['optimizers']):
            o.load_state_dict(s)

LR_SCHEDULES = ('cosine', 'linear', 'constant')

def set_lr(optimizer, lr):
    """Give every parameter group learning rate lr; returns lr."""
    for group in optimizer.param_groups:
        group['lr'] = lr
    return lr

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
    """The checkpoint SPEC.md describes. raw_model is the uncompiled, unwrapped model (no '_orig_mod.' keys); with
    LoRA, 'model' holds the merged weights, so every loader reads it as a plain model."""
    ckpt = {'model_args': dict(model_args), 'model': merged_state_dict(raw_model), 'optimizer': optimizer.state_dict(),
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
    from nanolab.configurator import configure
    from nanolab.checkpoint import load_checkpoint
    ckpt = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))
    if os.path.exists(os.path.join(out_dir, 'metrics.jsonl')):
        read_metrics(os.path.join(out_dir, 'metrics.jsonl'))  # a damaged log: refuse now, before anything is written
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
    resume_iter=None (or 0) starts a new file; resume_iter=k keeps the rows of iterations before k, since a resumed
    run logs iteration k (and evaluates it) again, so the file never holds an iteration twice. Each row also goes
    to the run's trackers (MLflow, W&B; open_trackers), which close() finishes."""
    def __init__(self, path, resume_iter=None, trackers=None):
        self.path, self.trackers = path, trackers
        rows = []
        if resume_iter and os.path.exists(path):  # a line torn by a crash mid-write is dropped
            rows = [r for r in read_metrics(path) if r.get('iter', 0) < resume_iter]
        write_atomic(path, lambda f: f.write(''.join(dumps(r) + '\n' for r in rows).encode()))
        self.f = open(path, 'a')

    def log(self, **row):
        self.f.write(dumps(row) + '\n')  # a diverged loss (NaN, inf) is written as null: JSON has no NaN
        self.f.flush()
        if self.trackers:
            self.trackers.log(row)

    def close(self):
        self.f.close()
        if self.trackers:
            self.trackers.finish()

# -----------------------------------------------------------------------------
# 4b) experiment trackers: MLflow and Weights & Biases, fed by MetricsLogger

TRACKED_FILES = ('config.json', 'loss.svg', 'README.md')  # a run's artifacts: resolved config, loss curve, model card

class Trackers:
    """The trackers a run logs to, each imported only when it is on: the resolved config as params, every
    metrics.jsonl row as metrics at its iteration, TRACKED_FILES as artifacts when the run ends. A resumed run goes on
    in the same tracker runs (their ids are kept in out_dir/trackers.json); the rows a resumed run logs again are
    logged again (MLflow keeps both values at that step; W&B drops a step it has seen)."""
    def __init__(self, out_dir, config, resumed):
        self.out_dir, self.mlflow, self.wandb = out_dir, None, None
        path = os.path.join(out_dir, 'trackers.json')
        ids = json.load(open(path)) if resumed and os.path.exists(path) else {}
        name = config.get('wandb_run_name') or os.path.basename(os.path.abspath(out_dir))
        project = config.get('wandb_project') or 'nanolab'
        if config.get('mlflow_log'):
            try:
                import mlflow
                mlflow.set_experiment(project)  # MLFLOW_TRACKING_URI, else MLflow's default: ./mlflow.db
                run = mlflow.start_run(run_id=ids.get('mlflow'), run_name=None if ids.get('mlflow') else name)
            except Exception as e:  # ImportError, or a store this install cannot open
                raise ValueError(f"--mlflow_log=True could not start an MLflow run ({type(e).__name__}: "
                                 f"{str(e)[:200]}); pip install mlflow (its sqlite store and `mlflow ui`), or point "
                                 "MLFLOW_TRACKING_URI at a tracking server") from None
            if 'mlflow' not in ids:  # params are fixed once logged; a resume keeps the first run's
                mlflow.log_params({k: str(v)[:6000] for k, v in config.items()})
            self.mlflow, ids['mlflow'] = mlflow, run.info.run_id
        if config.get('wandb_log'):
            try:
                import wandb
            except ImportError:
                raise ValueError("--wandb_log=True needs wandb: pip install wandb (and wandb login, or "
                                 "WANDB_MODE=offline to keep the run on disk)") from None
            self.wandb = wandb.init(project=project, name=name, config=config, dir=out_dir, id=ids.get('wandb'),
                                    resume='allow')
            ids['wandb'] = self.wandb.id
        write_json(path, ids)

    def log(self, row):
        step = int(row.get('iter', 0))
        values = {k: float(v) for k, v in row.items() if k != 'iter' and isinstance(v, (int, float))
                  and not isinstance(v, bool) and math.isfinite(v)}  # a diverged NaN is left out, as JSON's null
        if self.mlflow:
            self.mlflow.log_metrics(values, step=step)
        if self.wandb:
            self.wandb.log(values, step=step)

    def finish(self):
        files = [os.path.join(self.out_dir, f) for f in TRACKED_FILES if os.path.exists(os.path.join(self.out_dir, f))]
        if self.mlflow:
            for f in files:
                self.mlflow.log_artifact(f)
            self.mlflow.end_run()
        if self.wandb:
            for f in files:
                self.wandb.save(f, base_path=self.out_dir, policy='now')
            self.wandb.finish()

def open_trackers(out_dir, config, resumed):
    """The one way a trainer turns on experiment tracking: Trackers when config has mlflow_log or wandb_log on, else
    None (and neither library is imported)."""
    return Trackers(out_dir, config, resumed) if config.get('mlflow_log') or config.get('wandb_log') else None

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
    write_atomic(svg_path, lambda f: f.write('\n'.join(out).encode()))

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
    write_atomic(os.path.join(out_dir, 'README.md'), lambda f: f.write('\n'.join(lines).encode()))

# -----------------------------------------------------------------------------
# 7) the training loop's scaffolding

def fail(msg):
    """Bad input: one line that names the problem and the fix, exit status 1, no traceback."""
    raise SystemExit(f'error: {msg}')

def catch_stop(say=True):
    """Ctrl-C (or SIGTERM) from now on asks the loop to stop: it finishes its step, writes ckpt.pt and exits cleanly;
    a second Ctrl-C stops at once. Returns (stop, restore): stop is a list, non-empty once asked (the loop may append
    a reason of its own); restore() gives the caller's handlers back.
    subtle: a flag, not KeyboardInterrupt mid-step, so the checkpoint never holds a half-applied update"""
    stop = []
    def request_stop(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)
        if say:
            print(f'\n{signal.Signals(signum).name}: stopping after this step and writing a checkpoint (again to abort)')
    old = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    def restore():
        for s, h in old.items():
            signal.signal(s, h)
    return stop, restore

class StepTimer:
    """Training time and speed. elapsed(): seconds trained, counting the runs a resumed run continues (elapsed0, from
    its checkpoint); step(tokens): an optimizer step just ended; pause(): the time until the next step() (an eval, a
    checkpoint) is no step's; window(): (seconds per step, tokens per second) over the steps since the last window()."""
    def __init__(self, elapsed0=0.0):
        self.start = self.t0 = time.time()
        self.elapsed0, self.time, self.steps, self.tokens = elapsed0, 0.0, 0, 0

    def elapsed(self):
        return self.elapsed0 + time.time() - self.start

    def pause(self):
        self.t0 = time.time()

    def step(self, tokens=0):
        t1 = time.time()
        self.time, self.steps, self.tokens, self.t0 = self.time + t1 - self.t0, self.steps + 1, self.tokens + tokens, t1

    def window(self):
        dt, tps = self.time / max(self.steps, 1), self.tokens / self.time if self.time > 0 else 0.0
        self.time, self.steps, self.tokens = 0.0, 0, 0
        return dt, tps

def restore_training(ckpt, optimizer, scaler, sampler=None):
    """Exact resume: the optimizer's state, the fp16 loss scale, every RNG state (the data sampler's too, if given).
    Returns the seconds the run had trained, for StepTimer."""
    optimizer.load_state_dict(ckpt['optimizer'])
    if 'scaler' in ckpt:
        scaler.load_state_dict(ckpt['scaler'])
    set_rng_states(ckpt['rng'], sampler)
    return ckpt.get('elapsed', 0.0)

def optimizer_step(params, optimizer, scaler, grad_clip, device_type):
    """After the backward passes: unscale the gradients (fp16), clip their global norm at grad_clip (0 = off), step
    (fp16: skipped if they overflowed), update the loss scale and free the gradients. Returns the norm before
    clipping, as a tensor (.item() on a GPU waits for it)."""
    scaler.unscale_(optimizer)
    params = [p for p in params if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    # subtle: on CPU, skip the multiply by 1 that clipping a small gradient costs (0.5 ms of a 45 ms step,
    # measured); on a GPU, asking whether grad_norm > grad_clip would stall it, so always multiply
    if grad_clip > 0 and (device_type != 'cpu' or grad_norm > grad_clip):
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)  # free the gradients' memory now
    return grad_norm

def diverged(val_loss, iter_num, saved_at, out_dir):
    """True, after saying so, if the val loss is NaN or inf: the run has diverged, and its loop stops without writing
    a checkpoint, so out_dir keeps its last good one (saved_at: that iteration, or None)."""
    if math.isfinite(val_loss):
        return False
    kept = f'its last good one, from iteration {saved_at}' if saved_at is not None else 'what it held before'
    print(f"diverged at iteration {iter_num} (val loss {val_loss}); stopping without a checkpoint, so {out_dir} keeps "
          f"{kept}; try a lower learning_rate, or grad_clip")
    return True

def open_run(out_dir, init_from, overwrite, script, config, choices=None, fixed=(), distributed=False):
    """The start of every trainer: refuse to replace a trained run (check_out_dir), and with --init_from=resume read
    out_dir/ckpt.pt and the run's saved config with this command line on top (resume_config). -> (the checkpoint or
    None, the config to run). Bad input exits with fail's one line. A trainer that is not `distributed` (all but
    train.py) refuses to run under torchrun, where every rank would train the whole job into the same out_dir."""
    ranks = int(os.environ.get('WORLD_SIZE', '1'))
    if ranks > 1 and not distributed:
        name = os.path.basename(script)
        fail(f"{name} trains in one process (one GPU, or the CPU); under torchrun each of the {ranks} ranks would "
             f"train the whole job into {out_dir}. Run it as `python {name} ...` (train.py is the one that takes "
             "torchrun)")
    try:
        check_out_dir(out_dir, init_from, overwrite, os.path.basename(script))
        if init_from == 'resume':
            return resume_config(out_dir, config, script, choices, fixed)
    except ValueError as e:
        fail(e)
    return None, config

def start_loop(out_dir, iter_num, elapsed0, config):
    """What a trainer's loop needs before its first step -> (stop, restore_signals) of catch_stop, a StepTimer that
    goes on from elapsed0, and out_dir/metrics.jsonl's MetricsLogger, which keeps a resumed run's rows before
    iter_num (0 for a new run: a new file) and feeds the trackers config turns on (open_trackers)."""
    try:
        trackers = open_trackers(out_dir, config, resumed=iter_num > 0)
    except ValueError as e:
        fail(e)
    stop, restore_signals = catch_stop()
    metrics = MetricsLogger(os.path.join(out_dir, 'metrics.jsonl'), iter_num, trackers)
    return stop, restore_signals, StepTimer(elapsed0), metrics

def save_on_stop(stopped, saved_at, iter_num, save, out_dir):
    """The end of a loop that Ctrl-C (or SIGTERM) stopped: write ckpt.pt, unless the last eval just did (saved_at)."""
    if stopped and saved_at != iter_num:
        save()
        print(f'wrote {out_dir}/ckpt.pt at iteration {iter_num}; go on with --init_from=resume')

def end_eval(metrics, row, iter_num, lr, timer, saved_at, out_dir, save, title, eval_only=False):
    """After an eval of a trainer's loop: log the row (with the iteration, lr and time), write ckpt.pt or stop on a
    diverged row['val_loss'] (keep_or_stop), redraw loss.svg, and leave the time until the next step out of ms/iter.
    -> (bad, saved_at) of keep_or_stop."""
    metrics.log(iter=iter_num, **row, lr=lr, time=round(timer.elapsed(), 2))
    bad, saved_at = keep_or_stop(row['val_loss'], iter_num, saved_at, out_dir, save, eval_only)
    plot_loss_svg(metrics.path, os.path.join(out_dir, 'loss.svg'), title=title)
    timer.pause()  # evals don't count in ms/iter
    return bad, saved_at

def keep_or_stop(val_loss, iter_num, saved_at, out_dir, save, eval_only=False):
    """After an eval: a diverged val loss stops the run with nothing written -> (True, saved_at); else save() writes
    ckpt.pt (not at iteration 0, nor in eval_only) -> (False, the iteration out_dir's ckpt.pt now holds)."""
    if diverged(val_loss, iter_num, saved_at, out_dir):
        return True, saved_at
    if iter_num > 0 and not eval_only:
        save()
        return False, iter_num
    return False, saved_at

# -----------------------------------------------------------------------------
# 8) LoRA (Hu et al. 2021) through peft: finetune.py and dpo.py inject it the same way

def add_lora(model, r, alpha, dropout, targets):
    """Inject peft LoRA layers (W + (alpha/r) B A) into the Linear layers named in `targets`, a comma list of module
    names or name suffixes (c_attn, attn.c_proj, lm_head); every other weight is frozen. ValueError, naming the
    model's Linear modules, if a target matches none; and for lm_head when it shares the embedding's weight (the
    update could not be merged)."""
    from peft import LoraConfig, inject_adapter_in_model
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    names = [t.strip() for t in targets.split(',') if t.strip()]
    missing = [t for t in names if not any(n == t or n.endswith('.' + t) for n in linear)]
    if missing or not names:
        raise ValueError(f"lora_targets {missing or targets!r} name no Linear module of this model; its Linear modules "
                         f"are {sorted({n.rsplit('.', 1)[-1] for n in linear})} (full names like {linear[0]}): "
                         "e.g. --lora_targets=c_attn,c_proj,c_fc")
    if 'lm_head' in names and model.config.tie_embeddings:
        raise ValueError('lm_head shares its weight with the token embedding in this model (tie_embeddings), so a LoRA '
                         'on it could not be merged; leave lm_head out of lora_targets')
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names)
    return inject_adapter_in_model(cfg, model)

def lora_layers(model):
    """[(name, peft LoraLayer)] of a model; [] without LoRA (peft is then not even imported)."""
    if not any('.lora_' in n for n, _ in model.named_parameters()):
        return []
    from peft.tuners.lora import LoraLayer
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]

def lora_state(model):
    """The LoRA weights alone (A and B of every layer), what a checkpoint needs to resume them."""
    return {k: v for k, v in model.state_dict().items() if '.lora_' in k}

def merged_state_dict(model):
    """The model's state dict with each LoRA update folded into its weight, W + (alpha/r) B A, under the plain
    model's names; without LoRA, its state dict."""
    layers = lora_layers(model)
    if not layers:
        return model.state_dict()
    sd = {k.replace('.base_layer.', '.'): v for k, v in model.state_dict().items() if '.lora_' not in k}
    for name, m in layers:
        sd[name + '.weight'] = (m.base_layer.weight + m.get_delta_weight('default')).detach()
    return sd

@contextmanager
def lora_disabled(model):
    """The model as it was before add_lora, for the block's duration: every LoRA update off (dpo.py's reference)."""
    layers = [m for _, m in lora_layers(model)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)
