"""
The pieces of a training loop that every trainer (train.py, finetune.py, dpo.py, reward.py, rl.py)
shares, each defined once, as a plain function; each script keeps its own visible loop.

  1) configure_optimizer   AdamW, weight decay on matrices only, fused; or Muon for the blocks'
                           matrices
  2) get_lr, set_lr        warmup, then cosine / linear decay, or constant;
     use_grad_checkpoint   --grad_checkpoint: recompute each block's activations in backward
  3) checkpoint_dict       everything exact resume needs, RNG states included; set_rng_states
                           undoes it;
     resume_config         --init_from=resume: the checkpoint and the run's saved config, flags on
                           top (a damaged metrics.jsonl or checkpoint is refused)
  4) the loop's scaffolding: open_run (never replace a trained run; resume), start_loop (Ctrl-C,
     timer, metrics), catch_stop (Ctrl-C), StepTimer (elapsed, ms/iter), restore_training
     (optimizer, scaler, RNG), optimizer_step (unscale, clip, step), end_eval / keep_or_stop /
     diverged (after an eval), save_on_stop
What a run writes for people to read (metrics.jsonl, MLflow and W&B, loss.svg, the model card) is
tracking.py's; LoRA is lora.py's; checkpoint files and model sources are checkpoint.py's.
"""
import math
import os
import random
import signal
import time
import types

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from nanolab.checkpoint import load_checkpoint
from nanolab.configurator import configure, fail
from nanolab.files import remove_stale
from nanolab.lora import merged_state_dict
from nanolab.runs import read_metrics
from nanolab.tracking import MetricsLogger, open_trackers, plot_loss_svg

# -----------------------------------------------------------------------------
# 1) optimizer and 2) learning-rate schedule

OPTIMIZERS = ('adamw', 'muon')

def configure_optimizer(model, weight_decay, learning_rate, betas, device_type, kind='adamw',
                        ns_steps=5):
    """AdamW with weight decay on every >=2-D parameter (matmul weights, embeddings) and none on
    biases and norm gains (as nanoGPT and GPT-3 do). Tied weights appear once in
    model.parameters(), so step once. kind='muon': torch.optim.Muon (momentum, then the update
    orthogonalized by Newton-Schulz; Jordan et al. 2024) for the blocks' matrices, AdamW for the
    embeddings, the head and the 1-D gains, as one Optimizers; ns_steps: its Newton-Schulz
    iterations per step (torch's default is 5)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # a block's Linear weight, not an embedding or the head
    matrix = lambda n, p: p.dim() == 2 and '.h.' in n
    hidden = [p for n, p in named if kind == 'muon' and matrix(n, p)]
    rest = [(n, p) for n, p in named if not (kind == 'muon' and matrix(n, p))]
    decay, no_decay = [p for _, p in rest if p.dim() >= 2], [p for _, p in rest if p.dim() < 2]
    groups = [{'params': decay, 'weight_decay': weight_decay},
              {'params': no_decay, 'weight_decay': 0.0}]
    # fused: one kernel over all tensors, on CUDA and, since torch 2.4, on CPU, where it measured
    # 1.0 ms against 2.9 ms for the default per-tensor loop (0.8M params, 2 cores): 4% of a step of
    # the CPU default
    fused = device_type in ('cuda', 'cpu')
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused or None)
    if fused:
        # subtle: the fused kernel writes the weights without bumping their version counters, so
        # anything keyed on a weight's version (a cached copy of it) would read stale values; bump
        # them (empty in-place ops, 0.05 ms)
        def bump_versions(opt, args, kwargs):
            with torch.no_grad():
                for p in decay + no_decay:
                    p.view(-1)[:0].zero_()
        optimizer.register_step_post_hook(bump_versions)
    if kind == 'adamw':
        return optimizer
    if kind != 'muon':
        raise ValueError(f"unknown optimizer '{kind}'; use one of {OPTIMIZERS}")
    # match_rms_adamw scales each matrix's step to AdamW's size (Liu et al. 2025), so one learning
    # rate serves both
    muon = torch.optim.Muon(hidden, lr=learning_rate, weight_decay=weight_decay,
                            adjust_lr_fn='match_rms_adamw', ns_steps=ns_steps)
    return Optimizers(optimizer, muon)

class Optimizers:
    """Several optimizers stepped as one: param_groups (set each group's lr), step, zero_grad,
    state_dict and load_state_dict, which are all that the trainers and torch's GradScaler use."""
    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    # subtle: read each time, since load_state_dict replaces an optimizer's group dicts
    def param_groups(self):
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
            raise ValueError('the checkpoint was written with another optimizer setting; '
                             'resume with the one it used')
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

def use_grad_checkpoint(model):
    """Gradient checkpointing (Chen et al. 2016) of a GPT: each transformer block keeps only its
    input for the backward pass and recomputes its activations there, so activation memory is one
    block's plus the blocks' inputs instead of every block's, for ~1/3 more compute (the blocks'
    forward runs twice). An explicit per-instance wrap: each Block's forward attribute becomes
    _checkpointed_forward bound to it (a deepcopy binds to the copy; `del block.forward` undoes
    it); parameters and state-dict keys are untouched. It applies only when a backward can follow
    (grad enabled), and never to a KV-cache step or a trace; not keyed on .training, since dpo.py
    and reward.py train in eval() (dropout off). torch's non-reentrant checkpoint replays the RNG
    state in the recompute, so dropout draws the same masks: loss and gradients equal the plain
    run's (tests/test_qlora.py). Returns model."""
    for block in model.transformer.h:
        block.forward = types.MethodType(_checkpointed_forward, block)
    return model

def _checkpointed_forward(block, x, rope, step, layer, trace=None):
    forward = type(block).forward  # the class's own forward: the block as model.py defines it
    if torch.is_grad_enabled() and step is None and trace is None:
        return checkpoint(forward, block, x, rope, step, layer, trace, use_reentrant=False)
    return forward(block, x, rope, step, layer, trace)

# -----------------------------------------------------------------------------
# 3) checkpoints. subtle: checkpoint.load_checkpoint reads with torch.load(weights_only=True),
# which accepts only tensors and plain Python containers, so numpy and Python RNG states are stored
# as lists

def rng_states(sampler=None):
    """Every random state a training step draws from: Python, numpy, torch CPU (dropout), CUDA, and
    the data sampler's own generator."""
    py = random.getstate()
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {'python': [py[0], list(py[1]), py[2]],
              'numpy': [name, keys.tolist(), pos, has_gauss, gauss],
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

def checkpoint_dict(raw_model, optimizer, model_args, iter_num, best_val_loss, config,
                    tokenizer_spec, sampler=None, scaler=None, **extra):
    """Everything exact resume needs, as one checkpoint dict: model_args, model, optimizer,
    iter_num, best_val_loss, config, tokenizer, rng (the fp16 scaler's state too, and `extra`).
    raw_model is the uncompiled, unwrapped model (no '_orig_mod.' keys); with LoRA, 'model' holds
    the merged weights, so every loader reads it as a plain model."""
    ckpt = {'model_args': dict(model_args), 'model': merged_state_dict(raw_model),
            'optimizer': optimizer.state_dict(), 'iter_num': iter_num,
            'best_val_loss': float(best_val_loss), 'config': dict(config),
            'tokenizer': tokenizer_spec, 'rng': rng_states(sampler), **extra}
    if scaler is not None and scaler.is_enabled():
        ckpt['scaler'] = scaler.state_dict()
    return ckpt

def check_out_dir(out_dir, init_from, overwrite, script):
    """Refuse (ValueError, naming the fix) a fresh run into an out_dir that holds a trained run,
    which it would silently replace (metrics.jsonl truncated, best.pt and ckpt.pt rewritten),
    unless overwrite; and an out_dir that is the run being trained from."""
    src = init_from[:-len('/ckpt.pt')] if init_from.endswith('/ckpt.pt') else init_from
    if init_from not in ('scratch', 'resume') \
            and os.path.realpath(src) == os.path.realpath(out_dir):
        raise ValueError(f"init_from and out_dir are the same directory ({out_dir}); a run cannot "
                         "write over the model it starts from: give another --out_dir, or "
                         "--init_from=resume to go on with it")
    held = [f for f in ('ckpt.pt', 'best.pt') if os.path.isfile(os.path.join(out_dir, f))]
    if init_from != 'resume' and held and not overwrite:
        raise ValueError(f"{out_dir} already holds a trained run ({', '.join(held)}); a new "
                         f"run would replace it. Go on with it (python {script} "
                         f"--init_from=resume --out_dir={out_dir}), train into another "
                         "--out_dir, or replace it with --overwrite=True")

def resume_config(out_dir, config, script, choices=None, fixed=()):
    """--init_from=resume: (out_dir/ckpt.pt, the config to go on with) = the run's saved config
    with this command line applied on top again, so `--max_iters=...` extends a run. `fixed`:
    settings that can't change on resume (a trained adapter's shape). A missing or corrupt
    checkpoint, or a changed fixed setting, raises ValueError."""
    ckpt = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))
    if os.path.exists(os.path.join(out_dir, 'metrics.jsonl')):
        # a damaged log: refuse now, before anything is written
        read_metrics(os.path.join(out_dir, 'metrics.jsonl'))
    saved = {k: v for k, v in ckpt['config'].items() if k in config}  # keys this script still has
    resumed = configure({**config, **saved, '__file__': script}, choices=choices, verbose=False)
    changed = [k for k in fixed if resumed[k] != ckpt['config'][k]]
    if changed:
        k = changed[0]
        raise ValueError(f"{k}={resumed[k]!r} differs from the checkpoint's "
                         f"{ckpt['config'][k]!r}; {', '.join(fixed)} can't change on resume")
    return ckpt, resumed

# -----------------------------------------------------------------------------
# 4) the training loop's scaffolding

def catch_stop(say=True):
    """Ctrl-C (or SIGTERM) from now on asks the loop to stop: it finishes its step, writes ckpt.pt
    and exits cleanly; a second Ctrl-C stops at once. Returns (stop, restore): stop is a list,
    non-empty once asked (the loop may append a reason of its own); restore() gives the caller's
    handlers back.
    subtle: a flag, not KeyboardInterrupt mid-step, so the checkpoint never holds a half-applied
    update"""
    stop = []
    def request_stop(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)
        if say:
            print(f'\n{signal.Signals(signum).name}: stopping after this step and writing a '
                  'checkpoint (again to abort)')
    old = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    def restore():
        for s, h in old.items():
            signal.signal(s, h)
    return stop, restore

class StepTimer:
    """Training time and speed. elapsed(): seconds trained, counting the runs a resumed run
    continues (elapsed0, from its checkpoint); step(tokens): an optimizer step just ended; pause():
    the time until the next step() (an eval, a checkpoint) is no step's; window(): (seconds per
    step, tokens per second) over the steps since the last window()."""
    def __init__(self, elapsed0=0.0):
        self.start = self.t0 = time.time()
        self.elapsed0, self.time, self.steps, self.tokens = elapsed0, 0.0, 0, 0

    def elapsed(self):
        return self.elapsed0 + time.time() - self.start

    def pause(self):
        self.t0 = time.time()

    def step(self, tokens=0):
        t1 = time.time()
        self.time, self.steps, self.tokens, self.t0 = self.time + t1 - self.t0, self.steps + 1, \
            self.tokens + tokens, t1

    def window(self):
        dt, tps = self.time / max(self.steps, 1), self.tokens / self.time if self.time > 0 else 0.0
        self.time, self.steps, self.tokens = 0.0, 0, 0
        return dt, tps

def restore_training(ckpt, optimizer, scaler, sampler=None):
    """Exact resume: the optimizer's state, the fp16 loss scale, every RNG state (the data
    sampler's too, if given). Returns the seconds the run had trained, for StepTimer."""
    optimizer.load_state_dict(ckpt['optimizer'])
    if 'scaler' in ckpt:
        scaler.load_state_dict(ckpt['scaler'])
    set_rng_states(ckpt['rng'], sampler)
    return ckpt.get('elapsed', 0.0)

def optimizer_step(params, optimizer, scaler, grad_clip, device_type):
    """After the backward passes: unscale the gradients (fp16), clip their global norm at grad_clip
    (0 = off), step (fp16: skipped if they overflowed), update the loss scale and free the
    gradients. Returns the norm before clipping, as a tensor (.item() on a GPU waits for it)."""
    scaler.unscale_(optimizer)
    params = [p for p in params if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    # subtle: on CPU, skip the multiply by 1 that clipping a small gradient costs (0.5 ms of a 45
    # ms step, measured); on a GPU, asking whether grad_norm > grad_clip would stall it, so always
    # multiply
    if grad_clip > 0 and (device_type != 'cpu' or grad_norm > grad_clip):
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)  # free the gradients' memory now
    return grad_norm

def diverged(val_loss, iter_num, saved_at, out_dir):
    """True, after saying so, if the val loss is NaN or inf: the run has diverged, and its loop
    stops without writing a checkpoint, so out_dir keeps its last good one (saved_at: that
    iteration, or None)."""
    if math.isfinite(val_loss):
        return False
    kept = f'its last good one, from iteration {saved_at}' if saved_at is not None else \
        'what it held before'
    print(f"diverged at iteration {iter_num} (val loss {val_loss}); stopping without a "
          f"checkpoint, so {out_dir} keeps {kept}; try a lower learning_rate, or grad_clip")
    return True

def check_writable(out_dir):
    """out_dir (made if need be) must be a folder this process can write in: a ValueError that
    names why not (a file of that name, a read-only disk, no permission) before any work."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir {out_dir} is a file, not a folder; give another --out_dir")
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f'.probe.{os.getpid()}.tmp')
        with open(probe, 'wb'):
            pass
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"out_dir {out_dir} cannot be written in ({e.strerror or e}); give "
                         "another --out_dir, or make it writable") from None

def open_run(out_dir, init_from, overwrite, script, config, choices=None, fixed=(),
             distributed=False):
    """The start of every trainer: refuse to replace a trained run (check_out_dir), and with
    --init_from=resume read out_dir/ckpt.pt and the run's saved config with this command line on
    top (resume_config). -> (the checkpoint or None, the config to run). Bad input exits with
    fail's one line. A trainer that is not `distributed` (all but train.py) refuses to run under
    torchrun, where every rank would train the whole job into the same out_dir."""
    ranks = int(os.environ.get('WORLD_SIZE', '1'))
    if ranks > 1 and not distributed:
        name = os.path.basename(script)
        fail(f"{name} trains in one process (one GPU, or the CPU); under torchrun each of the "
             f"{ranks} ranks would train the whole job into {out_dir}. Run it as `python {name} "
             "...` (train.py is the one that takes torchrun)")
    try:
        check_out_dir(out_dir, init_from, overwrite, os.path.basename(script))
        check_writable(out_dir)
        for folder in (out_dir, os.path.join(out_dir, 'checkpoints')):
            for name in remove_stale(folder):  # a killed save's checkpoint-sized temp file
                print(f'removed {os.path.join(folder, name)}, left by a run that was killed')
        if init_from == 'resume':
            return resume_config(out_dir, config, script, choices, fixed)
    except ValueError as e:
        fail(e)
    return None, config

def start_loop(out_dir, iter_num, elapsed0, config):
    """What a trainer's loop needs before its first step -> (stop, restore_signals) of catch_stop,
    a StepTimer that goes on from elapsed0, and out_dir/metrics.jsonl's MetricsLogger, which keeps
    a resumed run's rows before iter_num (0 for a new run: a new file) and feeds the trackers
    config turns on (open_trackers)."""
    try:
        trackers = open_trackers(out_dir, config, resumed=iter_num > 0)
    except ValueError as e:
        fail(e)
    stop, restore_signals = catch_stop()
    metrics = MetricsLogger(os.path.join(out_dir, 'metrics.jsonl'), iter_num, trackers)
    return stop, restore_signals, StepTimer(elapsed0), metrics

def save_on_stop(stopped, saved_at, iter_num, save, out_dir):
    """The end of a loop that Ctrl-C (or SIGTERM) stopped: write ckpt.pt, unless the last eval just
    did (saved_at), and say how to go on either way."""
    if not stopped:
        return
    if saved_at != iter_num:
        save()
    print(f"{'wrote' if saved_at != iter_num else 'the last eval wrote'} {out_dir}/ckpt.pt at "
          f"iteration {iter_num}; go on with --init_from=resume")

def end_eval(metrics, row, iter_num, lr, timer, saved_at, out_dir, save, title, eval_only=False):
    """After an eval of a trainer's loop: log the row (with the iteration, lr and time), write
    ckpt.pt or stop on a diverged row['val_loss'] (keep_or_stop), redraw loss.svg, and leave the
    time until the next step out of ms/iter. -> (bad, saved_at) of keep_or_stop."""
    metrics.log(iter=iter_num, **row, lr=lr, time=round(timer.elapsed(), 2))
    bad, saved_at = keep_or_stop(row['val_loss'], iter_num, saved_at, out_dir, save, eval_only)
    plot_loss_svg(metrics.path, os.path.join(out_dir, 'loss.svg'), title=title)
    timer.pause()  # evals don't count in ms/iter
    return bad, saved_at

def keep_or_stop(val_loss, iter_num, saved_at, out_dir, save, eval_only=False):
    """After an eval: a diverged val loss stops the run with nothing written -> (True, saved_at);
    else save() writes ckpt.pt (not at iteration 0, nor in eval_only) -> (False, the iteration
    out_dir's ckpt.pt now holds)."""
    if diverged(val_loss, iter_num, saved_at, out_dir):
        return True, saved_at
    if iter_num > 0 and not eval_only:
        save()
        return False, iter_num
    return False, saved_at
