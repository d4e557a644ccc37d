"""
What a training run leaves for people to read: metrics.jsonl (one JSON object per logged step,
runs.read_metrics reads it back), the same rows in MLflow and Weights & Biases when they are on,
the loss curve as a dependency-free SVG (loss.svg), and the model card (README.md). Every trainer
logs through these.

    metrics = MetricsLogger('out-x/metrics.jsonl', resume_iter=None,
                            trackers=open_trackers('out-x', config, False))
    metrics.log(iter=100, loss=1.23, lr=3e-4)
    plot_loss_svg('out-x/metrics.jsonl', 'out-x/loss.svg')
"""
import json
import math
import os

from nanolab import results
from nanolab.files import dumps, write_atomic, write_json
from nanolab.runs import read_metrics  # the one reader of metrics.jsonl

# -----------------------------------------------------------------------------
# 1) metrics.jsonl

class MetricsLogger:
    """Appends one JSON object per line to `path` and flushes, so a killed run keeps every row it
    printed. resume_iter=None (or 0) starts a new file; resume_iter=k keeps the rows of iterations
    before k, since a resumed run logs iteration k (and evaluates it) again, so the file never
    holds an iteration twice. Each row also goes to the run's trackers (MLflow, W&B;
    open_trackers), which close() finishes."""
    def __init__(self, path, resume_iter=None, trackers=None):
        self.path, self.trackers = path, trackers
        rows = []
        if resume_iter and os.path.exists(path):  # a line torn by a crash mid-write is dropped
            rows = [r for r in read_metrics(path) if r.get('iter', 0) < resume_iter]
        write_atomic(path, lambda f: f.write(''.join(dumps(r) + '\n' for r in rows).encode()))
        self.f = open(path, 'a')

    def log(self, **row):
        # a diverged loss (NaN, inf) is written as null: JSON has no NaN
        self.f.write(dumps(row) + '\n')
        self.f.flush()
        if self.trackers:
            self.trackers.log(row)

    def close(self):
        self.f.close()
        if self.trackers:
            self.trackers.finish()

# -----------------------------------------------------------------------------
# 2) experiment trackers: MLflow and Weights & Biases, fed by MetricsLogger

# a run's artifacts: resolved config, loss curve, model card
TRACKED_FILES = ('config.json', 'loss.svg', 'README.md')

class Trackers:
    """The trackers a run logs to, each imported only when it is on: the resolved config as params,
    every metrics.jsonl row as metrics at its iteration, TRACKED_FILES as artifacts when the run
    ends. A resumed run goes on in the same tracker runs (their ids are kept in
    out_dir/trackers.json); the rows a resumed run logs again are logged again (MLflow keeps both
    values at that step; W&B drops a step it has seen)."""
    def __init__(self, out_dir, config, resumed):
        self.out_dir, self.mlflow, self.wandb = out_dir, None, None
        path = os.path.join(out_dir, 'trackers.json')
        ids = json.load(open(path)) if resumed and os.path.exists(path) else {}
        name = config.get('wandb_run_name') or os.path.basename(os.path.abspath(out_dir))
        project = config.get('wandb_project') or 'nanolab'
        if config.get('mlflow_log'):
            try:
                import mlflow
                # MLFLOW_TRACKING_URI, else MLflow's default: ./mlflow.db
                mlflow.set_experiment(project)
                run = mlflow.start_run(run_id=ids.get('mlflow'),
                                       run_name=None if ids.get('mlflow') else name)
            except ImportError:
                raise ValueError("--mlflow_log=True needs MLflow: pip install mlflow (its sqlite "
                                 "store and `mlflow ui`), or point MLFLOW_TRACKING_URI at a "
                                 "tracking server") from None
            except Exception as e:  # a store this install cannot open: MLflow's own remedy, whole
                raise ValueError("--mlflow_log=True could not start an MLflow run; MLflow says: "
                                 f"{type(e).__name__}: {str(e)[:4000]} (or point "
                                 "MLFLOW_TRACKING_URI at a tracking server)") from None
            if 'mlflow' not in ids:  # params are fixed once logged; a resume keeps the first run's
                mlflow.log_params({k: str(v)[:6000] for k, v in config.items()})
            self.mlflow, ids['mlflow'] = mlflow, run.info.run_id
        if config.get('wandb_log'):
            try:
                import wandb
            except ImportError:
                raise ValueError("--wandb_log=True needs wandb: pip install wandb (and wandb "
                                 "login, or WANDB_MODE=offline to keep the run on disk)") from None
            self.wandb = wandb.init(project=project, name=name, config=config, dir=out_dir,
                                    id=ids.get('wandb'), resume='allow')
            ids['wandb'] = self.wandb.id
        write_json(path, ids)

    def log(self, row):
        step = int(row.get('iter', 0))
        values = {k: float(v) for k, v in row.items() if k != 'iter'
                  and isinstance(v, (int, float))
                  # a diverged NaN is left out, as JSON's null
                  and not isinstance(v, bool) and math.isfinite(v)}
        if self.mlflow:
            self.mlflow.log_metrics(values, step=step)
        if self.wandb:
            self.wandb.log(values, step=step)

    def finish(self):
        files = [os.path.join(self.out_dir, f) for f in TRACKED_FILES
                 if os.path.exists(os.path.join(self.out_dir, f))]
        if self.mlflow:
            for f in files:
                self.mlflow.log_artifact(f)
            self.mlflow.end_run()
        if self.wandb:
            for f in files:
                self.wandb.save(f, base_path=self.out_dir, policy='now')
            self.wandb.finish()

def open_trackers(out_dir, config, resumed):
    """The one way a trainer turns on experiment tracking: Trackers when config has mlflow_log or
    wandb_log on, else None (and neither library is imported)."""
    return Trackers(out_dir, config, resumed) \
        if config.get('mlflow_log') or config.get('wandb_log') else None

# -----------------------------------------------------------------------------
# 3) the loss curve, as SVG text: no plotting dependency

def _ticks(lo, hi, n=5):
    """About n round numbers (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    span = (hi - lo) or abs(hi) or 1.0
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step)) + 1)], step

def plot_loss_svg(metrics_path, svg_path, title='loss'):
    """Train loss (log rows' `loss`) and val loss (eval rows' `val_loss`) against iteration, with
    axes, ticks and a legend. Written atomically; does nothing until there are two points to
    draw."""
    rows = read_metrics(metrics_path)
    # a diverged run logs inf/nan: leave them out
    ok = lambda v: isinstance(v, (int, float)) and math.isfinite(v)
    series = [('train loss', '#1f77b4', [(r['iter'], r['loss']) for r in rows
                                         if ok(r.get('loss'))]),
              ('val loss', '#d62728', [(r['iter'], r['val_loss']) for r in rows
                                       if ok(r.get('val_loss'))])]
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
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="14">{_xml(title)}</text>']
    for v in xt:  # vertical grid lines and x labels
        out.append(f'<line x1="{X(v):.1f}" y1="{T}" x2="{X(v):.1f}" y2="{H - B}" stroke="#ddd"/>'
                   f'<text x="{X(v):.1f}" y="{H - B + 16}" text-anchor="middle">'
                   f'{fmt(v, xs)}</text>')
    for v in yt:
        out.append(f'<line x1="{L}" y1="{Y(v):.1f}" x2="{W - R}" y2="{Y(v):.1f}" stroke="#ddd"/>'
                   f'<text x="{L - 6}" y="{Y(v) + 4:.1f}" text-anchor="end">{fmt(v, ys)}</text>')
    out.append(f'<path d="M{L},{T} V{H - B} H{W - R}" fill="none" stroke="black"/>'
               f'<text x="{(L + W - R) / 2}" y="{H - 8}" text-anchor="middle">iteration</text>'
               f'<text x="14" y="{(T + H - B) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {(T + H - B) / 2})">loss</text>')
    for i, (name, color, s) in enumerate(series):
        if s:
            d = ' '.join(f'{X(x):.1f},{Y(y):.1f}' for x, y in s)
            out.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        ly = T + 12 + 18 * i  # legend, top right
        out.append(f'<line x1="{W - R - 110}" y1="{ly}" x2="{W - R - 90}" y2="{ly}" '
                   f'stroke="{color}" stroke-width="2"/>'
                   f'<text x="{W - R - 84}" y="{ly + 4}">{name}</text>')
    out.append('</svg>\n')
    write_atomic(svg_path, lambda f: f.write('\n'.join(out).encode()))

def _xml(s):
    return str(s).replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')

# -----------------------------------------------------------------------------
# 4) the model card

def write_model_card(out_dir, title, how, model_args, n_params, data, metrics, command=None,
                     evals=None):
    """out_dir/README.md: what the model is, its data, size and metrics, and its evaluations.
    how: one line on how it was made; data: {'name', 'tokenizer', 'train_tokens', ...}; metrics:
    name -> value; evals: more markdown for the Evaluations section, which also holds the table of
    evaluate.py's results in out_dir/eval/ (evals_markdown), so a script that rewrites the card
    keeps them."""
    fmt = lambda v: f'{v:.4f}' if isinstance(v, float) else f'{v:,}' if isinstance(v, int) else \
        str(v)
    arch = ', '.join(f'{k}={model_args[k]}'
                     for k in ('arch', 'n_layer', 'n_head', 'n_kv_head', 'n_embd', 'block_size',
                               'vocab_size') if k in model_args)
    lines = [f'# {title}', '', how, '',
             '## Model', '', f'- parameters: {n_params / 1e6:.2f}M', f'- architecture: {arch}', '',
             '## Data', ''] + [f'- {k}: {fmt(v)}' for k, v in data.items()] + \
            ['', '## Metrics', '', '| metric | value |', '|---|---|'] + \
            [f'| {k} | {fmt(v)} |' for k, v in metrics.items()] + \
            ['', 'Every logged step is in `metrics.jsonl`; the curve is `loss.svg`; the resolved '
             'config is `config.json`.', '', '## Evaluations', '',
             '\n\n'.join(filter(None, [evals, results.evals_markdown(out_dir)]))
             or f'None yet. Run `python evaluate.py --init_from={out_dir}` to add them.', '']
    if command:
        lines += ['## Use', '', '```sh', command, f'python sample.py --init_from={out_dir}', '```',
                  '']
    write_atomic(os.path.join(out_dir, 'README.md'), lambda f: f.write('\n'.join(lines).encode()))
