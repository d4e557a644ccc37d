"""
Pretrain a GPT (gpt2 or llama blocks) on a tokenized dataset from data.py (a named one that is
missing is prepared first). nanoGPT's train.py, plus exact resume, metrics and a model card.

    python train.py                                  # CPU default: char-level Shakespeare
    python train.py configs/shakespeare_char_gpu.py  # one GPU: nanoGPT's baby GPT, val loss ~1.47
    torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_124m.py  # several GPUs (DDP)
    python train.py --init_from=resume --out_dir=out-shakespeare-char  # go on from ckpt.pt
    python train.py --init_from=path/to/hf_llama --dataset=mine --learning_rate=3e-5  # continued
    python train.py --help                           # every setting, with its default

Writes to out_dir:
  ckpt.pt        the last state (weights, optimizer, iteration, RNG and sampler states): written at
                 each eval, on Ctrl-C and at the end; `--init_from=resume` continues from it
  best.pt        the same, from the eval with the lowest val loss so far (sample or fine-tune from
                 it)
  checkpoints/   with --keep_checkpoints=True, a copy of every checkpoint written, ckpt_<iter>.pt
                 (`python evaluate.py --init_from=OUT_DIR --checkpoints=True` scores them all)
  config.json    the resolved config; metrics.jsonl (one row per log step and per eval); loss.svg;
                 README.md

Exact resume: the data sampler draws batch offsets from its own torch.Generator, whose state goes
into the checkpoint with every other RNG state, so a run that is killed and resumed logs the same
losses, bit for bit on CPU, as one that never stopped (tests/test_train.py). Under DDP, every rank
draws the same offsets for an iteration and takes its share, so N processes x accumulation k train
on exactly the batches 1 process x N*k does.
"""
import datetime
import math
import os
import shutil
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from model import ARCHS, GPT, POSITIONS, GPTConfig
from nanolab import datasets, hub_corpora
from nanolab.checkpoint import load_model, model_from_checkpoint, save_checkpoint
from nanolab.configurator import cli_errors, configure, fail
from nanolab.device import DTYPES, autocast_ctx, resolve_device, resolve_dtype
from nanolab.device import peak_flops as model_peak_flops
from nanolab.files import write_atomic, write_json
from nanolab.progress import at  # i/N (p%), ETA
from nanolab.tracking import MetricsLogger, open_trackers, plot_loss_svg, write_model_card
from nanolab.training import (LR_SCHEDULES, OPTIMIZERS, StepTimer, catch_stop, checkpoint_dict,
                              configure_optimizer, diverged, get_lr, open_run, optimizer_step,
                              restore_training, save_on_stop, set_lr, use_grad_checkpoint)

# -----------------------------------------------------------------------------
# defaults: the CPU run of configs/shakespeare_char.py (see that file for the measured figures)
# I/O
out_dir = 'out-shakespeare-char'  # checkpoints, metrics, loss curve and model card go here
eval_interval = 250           # evaluate, and write ckpt.pt, every this many iterations (and at the end)
log_interval = 10             # print and log a metrics row every this many iterations
eval_iters = 20               # batches per split for each loss estimate
eval_only = False             # evaluate once and exit
always_save_checkpoint = True # write ckpt.pt at every eval; False: only at the end and on Ctrl-C (best.pt either way)
keep_checkpoints = False      # also keep a copy of each eval's checkpoint as out_dir/checkpoints/ckpt_<iter>.pt (for evaluate.py --checkpoints)
init_from = 'scratch'         # 'scratch' | 'resume' (out_dir/ckpt.pt) | a model source: out_dir, .pt, HF dir, hub name
overwrite = False             # True: a fresh run may replace the trained run in out_dir (its files are lost)
# experiment tracking (each imported only when on)
mlflow_log = False            # log params, metrics and artifacts to MLflow (MLFLOW_TRACKING_URI, else ./mlflow.db)
wandb_log = False             # the same to Weights & Biases (WANDB_MODE=offline keeps it on disk)
wandb_project = 'nanolab'     # the W&B project and the MLflow experiment
wandb_run_name = ''           # the run's name in both; '' = out_dir's name
# data
dataset = 'shakespeare_char'  # data_dir/<dataset>/ from data.py; named datasets are prepared when missing
data_dir = 'data'             # where datasets live
gradient_accumulation_steps = 1  # micro-batches per optimizer step, over all DDP processes together
batch_size = 16               # sequences per micro-batch (per process)
block_size = 64               # tokens per sequence (context length)
# model (scratch only: resume takes them from the checkpoint, a model source from itself)
arch = 'llama'                # 'gpt2' | 'llama'
n_layer = 4                   # transformer blocks
n_head = 4                    # attention (query) heads
n_kv_head = 2                 # key/value heads (llama GQA); 0 = n_head
n_embd = 128                  # embedding width
ffn_hidden = 0                # MLP width; 0 = 4*n_embd (gpt2), 8/3*n_embd rounded up to 64 (llama)
vocab_size = 0                # model vocabulary; 0 = the dataset's (set e.g. 50304 to pad GPT-2's for speed)
dropout = 0.0                 # dropout rate; 0 for pretraining, 0.1+ for small data
bias = False                  # biases in Linear and LayerNorm (gpt2; nanoGPT: False is a bit better and faster)
tie_embeddings = True         # share the token embedding with the output head (gpt2 does; llama models often do not)
positions = ''                # 'learned' | 'rope' | 'sinusoidal' (fixed, Vaswani et al. 2017); '' = the arch's (gpt2 learned, llama rope)
# optimizer
optim = 'muon'                # 'adamw' | 'muon' (Muon for the blocks' matrices, AdamW for the rest)
muon_ns_steps = 3             # muon: Newton-Schulz iterations per step (torch's default 5; each costs ~3 small matmuls per matrix)
learning_rate = 3e-3          # peak learning rate
max_iters = 1000              # total optimizer steps
weight_decay = 0.1            # on >=2-D weights only
beta1 = 0.9                   # AdamW beta1
beta2 = 0.99                  # AdamW beta2 (0.99 for small batches, 0.95 for big runs)
grad_clip = 1.0               # clip the global gradient norm at this value; 0 = off
# learning-rate schedule
lr_schedule = 'cosine'        # 'cosine' | 'linear' | 'constant'
warmup_iters = 100            # linear warmup steps
lr_decay_iters = 1000         # decay ends here (~max_iters, Chinchilla)
min_lr = 3e-4                 # floor after decay (~learning_rate/10)
# system
device = 'auto'               # 'auto' (cuda > mps > cpu) | 'cpu' | 'cuda' | 'cuda:N' | 'mps'
dtype = 'auto'                # 'auto' (bf16 on GPUs that have it, else fp16 with a GradScaler; fp32 on CPU) | 'float32' | 'bfloat16' | 'float16'
compile = False               # torch.compile the model (faster steps after a compile of ~1 min)
grad_checkpoint = False       # recompute each block's activations in backward: less memory, ~1/3 more compute
backend = 'auto'              # DDP backend: 'auto' (nccl on GPU, gloo on CPU) | 'nccl' | 'gloo'
seed = 1337                   # model init, data order and dropout
peak_flops = 0.0              # FLOP/s that MFU divides by; 0 = auto: the GPU's dense peak for dtype (device.PEAK_FLOPS), 163e9 on CPU (measured)
# -----------------------------------------------------------------------------
# collectives wait this long for rank 0's data preparation, evals and saves
DDP_TIMEOUT = datetime.timedelta(hours=1)
CHOICES = {'arch': ARCHS, 'positions': ('', *POSITIONS), 'lr_schedule': LR_SCHEDULES,
           'backend': ('auto', 'nccl', 'gloo'), 'dtype': DTYPES, 'optim': OPTIMIZERS}
config = configure(globals(), choices=CHOICES)
# settings that are model args
MODEL_KEYS = [f.name for f in fields(GPTConfig) if f.name in config]

# DDP: torchrun sets RANK; each process drives one device; the gradients are averaged across them
ddp = int(os.environ.get('RANK', -1)) != -1
rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')) \
    if ddp else (0, 0, 1)
master_process = rank == 0  # only it prints and writes files

# never replace a trained run; resume = the run's saved config, then this command line on top (so
# `--max_iters=...` extends a run); the model args always come from the checkpoint
ckpt, config = open_run(out_dir, init_from, overwrite, __file__, config, CHOICES, distributed=True)
if ckpt is not None:
    globals().update(config)
    # (a key the checkpoint predates keeps its default: GPTConfig's for that checkpoint too)
    for k in MODEL_KEYS:
        if k != 'block_size' and k in ckpt['model_args'] and globals()[k] != ckpt['model_args'][k]:
            if master_process:
                print(f"resume: {k} = {ckpt['model_args'][k]!r} from the "
                      f"checkpoint (not {globals()[k]!r})")
            globals()[k] = ckpt['model_args'][k]

with cli_errors():
    # 1) device and dtype, checked: asking for what this machine lacks is an error, not a silent
    #    fallback
    device = resolve_device(device)
    # under torchrun each rank takes its own GPU, whatever --device names
    if ddp and device.startswith('cuda'):
        device = f'cuda:{local_rank}'
    device_type = device.split(':')[0]
    ptdtype = resolve_dtype(dtype, device)
    # 2) under DDP the process group first, with a timeout long enough for what rank 0 does alone
    #    (preparing the data, evaluating, saving: NCCL's default 10 minutes would kill the others
    #    waiting for it)
    if ddp:
        if device_type == 'cuda':
            torch.cuda.set_device(device)
        dist.init_process_group(backend=('nccl' if device_type == 'cuda' else 'gloo')
                                if backend == 'auto' else backend, timeout=DDP_TIMEOUT)
    # 3) the dataset: rank 0 prepares a named one that is missing (data.py), then everyone reads
    #    meta.json
    folder = os.path.join(data_dir, dataset)
    if dataset in datasets.DATASETS and not os.path.exists(os.path.join(folder, 'meta.json')):
        # never a Hub corpus (OpenWebText: 18 GB of tokens): every rank stops with data.py's command
        if hub_corpora.from_hub(dataset, os.path.join(data_dir, '_downloads')):
            fail(hub_corpora.prepare_first(
                dataset, max_iters * gradient_accumulation_steps * batch_size * block_size))
        if master_process:
            datasets.prepare(dataset, data_dir=data_dir)
    if ddp:
        dist.barrier()  # the other ranks wait for rank 0's data preparation
    meta = datasets.load_meta(folder)
if 'train_tokens' not in meta:
    fail(f"{folder} is a fine-tuning dataset (JSONL), not a token stream; train on it "
         "with finetune.py or dpo.py")
if gradient_accumulation_steps % world_size:
    fail(f'gradient_accumulation_steps={gradient_accumulation_steps} must be a multiple of '
         f'the {world_size} processes')
# micro-steps per process: the global batch never changes
accum = gradient_accumulation_steps // world_size
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size

# 4) the model: from scratch, resumed, or any model source (continued pretraining)
iter_num, best_val_loss, tok_spec, origin = 0, float('inf'), meta['tokenizer'], init_from
with cli_errors():
    if init_from == 'scratch':
        vocab_size = vocab_size or meta['vocab_size']
        # subtle: the same weights on every rank (DDP also broadcasts rank 0's)
        torch.manual_seed(seed)
        raw_model = GPT(GPTConfig(**{k: globals()[k] for k in MODEL_KEYS}))
    elif init_from == 'resume':
        raw_model = model_from_checkpoint(ckpt, os.path.join(out_dir, 'ckpt.pt'))
        iter_num, best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
        tok_spec, origin = ckpt.get('tokenizer') or tok_spec, ckpt.get('origin', 'scratch')
    else:
        raw_model, tok, _ = load_model(init_from)
        if tok is not None:
            tok_spec = tok.spec()
            if tok_spec != meta['tokenizer'] and master_process:
                print(f"note: {init_from}'s tokenizer ({tok.kind}) is not the one "
                      f"{folder} was made with ({meta['tokenizer'].get('kind')}); make "
                      "sure their token ids mean the same")
model_args = asdict(raw_model.config)
if model_args['vocab_size'] < meta['vocab_size']:
    fail("vocabulary mismatch: the model "
         f"({'init_from=' + init_from if init_from != 'scratch' else 'vocab_size'}) has "
         f"{model_args['vocab_size']} tokens but dataset {folder} uses {meta['vocab_size']}; "
         "prepare the data with the model's tokenizer, or train from scratch")
if block_size > model_args['block_size']:
    fail(f"block_size={block_size} is longer than the model's context "
         f"({model_args['block_size']}); lower block_size")
for split in ('train', 'val'):
    if meta[f'{split}_tokens'] < batch_size * block_size + 1:
        fail(f"the {split} split of {folder} has {meta[f'{split}_tokens']:,} tokens, fewer than "
             f"one batch needs (batch_size*block_size+1 = {batch_size * block_size + 1:,}); lower "
             "batch_size or block_size, or add data")
# the config shows the real model
globals().update({k: model_args[k] for k in MODEL_KEYS if k != 'block_size'})
config.update({k: globals()[k] for k in config})
if grad_checkpoint:
    use_grad_checkpoint(raw_model)
raw_model.to(device).train()
if master_process:
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, 'config.json'), config)  # atomic: never a half-written config
    print(f"{raw_model.num_params() / 1e6:.2f}M parameters (non-embedding), {tokens_per_iter:,} "
          f"tokens per iteration, {device}, "
          f"{str(ptdtype).replace('torch.', '')}" + (f', {world_size} processes' if ddp else ''))

# 5) optimizer, fp16 gradient scaler, random state, compile, DDP
optimizer = configure_optimizer(raw_model, weight_decay, learning_rate, (beta1, beta2),
                                device_type, optim, muon_ns_steps)
# a no-op unless fp16
scaler = torch.amp.GradScaler(device_type, enabled=(ptdtype == torch.float16))
# draws the training batches' offsets (the same on every rank)
sampler = torch.Generator().manual_seed(seed)
elapsed0 = 0.0  # training seconds before this process started (resume)
if ckpt is not None:
    with cli_errors():
        # exact resume: data order, dropout, everything
        elapsed0 = restore_training(ckpt, optimizer, scaler, sampler)
# dropout: a different stream on each rank (rank 0 resumes its saved one)
if ckpt is None or rank > 0:
    torch.manual_seed(seed + rank + iter_num)
ckpt = None  # free the memory
model = torch.compile(raw_model) if compile else raw_model
train_model = DDP(model, device_ids=[local_rank] if device_type == 'cuda' else None,
                  broadcast_buffers=False) if ddp else model
ctx = autocast_ctx(device, ptdtype)

# poor man's data loader (nanoGPT)
def get_batch(split, n, generator, share=slice(None)):
    """Rows `share` of n random (x, y) rows of block_size tokens, y shifted by one; offsets from
    `generator`."""
    # re-open the memmap every batch to avoid a memory leak (nanoGPT;
    # https://stackoverflow.com/q/45132940)
    tokens = np.memmap(os.path.join(folder, f'{split}.bin'), dtype=meta['dtype'], mode='r')
    ix = torch.randint(len(tokens) - block_size, (n,), generator=generator)[share].tolist()
    # (n, T+1)
    xy = torch.from_numpy(np.stack([tokens[i:i + block_size + 1] for i in ix]).astype(np.int64))
    if device_type == 'cuda':  # pinned memory lets the copy to the GPU run asynchronously
        xy = xy.pin_memory().to(device, non_blocking=True)
    else:
        xy = xy.to(device)
    return xy[:, :-1], xy[:, 1:]  # inputs (n, T), next-token targets (n, T)

@torch.no_grad()
def estimate_loss():
    """Mean loss over eval_iters batches per split. The batches come from a generator re-seeded
    each time, so every eval (and every run) scores the same text, and evals draw nothing from the
    training RNGs."""
    out = {}
    model.eval()
    for split in ('train', 'val'):
        gen = torch.Generator().manual_seed(1234)
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            X, Y = get_batch(split, batch_size, gen)
            with ctx:
                losses[k] = model(X, Y)[1].item()
        out[split] = losses.mean().item()
    model.train()
    return out

def save(name, also_best=False):
    """Atomically write the state at the top of iteration iter_num to out_dir/name; copy it to
    best.pt too, and with keep_checkpoints to checkpoints/ckpt_<iter>.pt, which no later save
    replaces."""
    path, best = os.path.join(out_dir, name), os.path.join(out_dir, 'best.pt')
    state = checkpoint_dict(raw_model, optimizer, model_args, iter_num, best_val_loss, config,
                            tok_spec, sampler=sampler, scaler=scaler, elapsed=timer.elapsed(),
                            origin=origin, stage='pretrain')
    # subtle: best.pt first, so no ckpt.pt ever records a best_val_loss whose model best.pt does
    # not hold
    save_checkpoint(state, best if also_best else path)
    if also_best:
        with open(best, 'rb') as src:
            write_atomic(path, lambda f: shutil.copyfileobj(src, f))
    if keep_checkpoints:
        save_checkpoint(state, os.path.join(out_dir, 'checkpoints', f'ckpt_{iter_num}.pt'))

def update_card(last_eval=None):
    stats = {'iterations': iter_num, 'tokens seen': iter_num * tokens_per_iter}
    if last_eval:
        stats.update({'train loss': last_eval['train_loss'], 'val loss': last_eval['val_loss'],
                      'val perplexity': last_eval['val_ppl'], 'best val loss': best_val_loss})
    stats['training time (s)'] = round(timer.elapsed(), 1)
    how = (f"A {model_args['arch']} language model trained with nanolab's train.py, "
           f"{'from scratch' if origin == 'scratch' else 'continued from ' + origin}, on "
           f"{dataset}.")
    info = {'dataset': f'{dataset} ({folder})', 'tokenizer': (tok_spec or {}).get('kind', '?'),
            'train tokens': meta['train_tokens'], 'val tokens': meta['val_tokens']}
    write_model_card(out_dir, os.path.basename(os.path.abspath(out_dir)), how, model_args,
                     raw_model.num_params(non_embedding=False), info, stats,
                     command='python train.py --init_from=resume '
                             f'--out_dir={out_dir}   # train on')

# Ctrl-C (or SIGTERM): finish the step, write ckpt.pt, exit cleanly; a second Ctrl-C stops at once
stop, restore_signals = catch_stop(say=master_process)

# logging
timer = StepTimer(elapsed0)
if master_process:  # a resumed run drops the rows it will log again; the trackers get every row
    with cli_errors():
        trackers = open_trackers(out_dir, config, resumed=init_from == 'resume')
    metrics = MetricsLogger(os.path.join(out_dir, 'metrics.jsonl'),
                            iter_num if init_from == 'resume' else None, trackers)
    update_card()
# per device; None: an unlisted GPU, no MFU shown
peak = peak_flops or model_peak_flops(device, ptdtype)

# training loop
saved_at, stopping, last_eval, bad = None, False, None, False
while True:

    # this iteration's learning rate
    lr = set_lr(optimizer, get_lr(iter_num, warmup_iters, lr_decay_iters, learning_rate, min_lr,
                                  lr_schedule))

    # evaluate the loss on train/val sets and write checkpoints
    if master_process and (iter_num % eval_interval == 0 or iter_num >= max_iters or eval_only):
        losses = estimate_loss()
        improved = losses['val'] < best_val_loss
        best_val_loss = min(best_val_loss, losses['val'])
        # exp overflows past ~709; NaN stays
        ppl = float('inf') if losses['val'] > 700 else math.exp(losses['val'])
        row = dict(iter=iter_num, train_loss=losses['train'], val_loss=losses['val'], val_ppl=ppl,
                   lr=lr, time=round(timer.elapsed(), 2))
        print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
              f"(ppl {row['val_ppl']:.2f})")
        metrics.log(**row)
        # keep the last good checkpoint, and stop
        if diverged(losses['val'], iter_num, saved_at, out_dir):
            bad = True
            # the ranks stop together at the next log step (DDP), as on Ctrl-C
            stop.append('diverged')
        elif iter_num > 0 and not eval_only:
            if always_save_checkpoint or iter_num >= max_iters:
                save('ckpt.pt', also_best=improved)
                saved_at = iter_num
            elif improved:
                save('best.pt')
        plot_loss_svg(metrics.path, os.path.join(out_dir, 'loss.svg'),
                      title=f'{out_dir}: {dataset}')
        update_card(row)
        last_eval = row
        timer.pause()  # evals don't count in ms/iter
    if iter_num >= max_iters or eval_only or stopping:
        break

    # forward backward update, with gradient accumulation. Every rank draws the offsets of all
    # gradient_accumulation_steps * batch_size rows of this iteration and takes its own share, so
    # the data does not depend on the number of processes
    X, Y = get_batch('train', gradient_accumulation_steps * batch_size, sampler,
                     slice(rank * accum * batch_size, (rank + 1) * accum * batch_size))
    loss_sum = 0.0
    for micro_step in range(accum):
        if ddp:  # sync gradients on the last micro-step only (what model.no_sync() toggles)
            train_model.require_backward_grad_sync = (micro_step == accum - 1)
        rows = slice(micro_step * batch_size, (micro_step + 1) * batch_size)
        with ctx:
            _, loss = train_model(X[rows], Y[rows])
            loss = loss / accum  # so the gradients add up to those of the mean loss
        loss_sum = loss_sum + loss.detach()
        scaler.scale(loss).backward()  # fp16: scaled up so small gradients don't underflow
    # clip, step
    grad_norm = optimizer_step(raw_model.parameters(), optimizer, scaler, grad_clip, device_type)

    # timing and logging
    timer.step(tokens_per_iter)
    stopping = bool(stop) and not ddp  # DDP: the ranks agree on it at log steps, below
    if iter_num % log_interval == 0:
        # the mean loss over all ranks; and stop together, or the others would wait forever
        if ddp:
            flags = torch.stack([loss_sum, torch.tensor(float(bool(stop)), device=device)])
            dist.all_reduce(flags)
            loss_sum, stopping = flags[0] / world_size, flags[1].item() > 0
        if master_process:
            # .item(): a GPU sync
            (dt, _), lossf, gnorm = timer.window(), loss_sum.item(), grad_norm.item()
            mfu = raw_model.estimate_mfu(tokens_per_iter / world_size / dt, peak,
                                         T=block_size) if peak else None
            print(f'iter {at(iter_num, max_iters, dt)}: loss {lossf:.4f}, lr {lr:.2e}, grad norm '
                  f'{gnorm:.3f}, {dt * 1000:.2f} ms/iter, {tokens_per_iter / dt:,.0f} '
                  'tok/s' + (f', mfu {mfu * 100:.2f}%' if mfu is not None else ''))
            metrics.log(iter=iter_num, loss=lossf, lr=lr, grad_norm=gnorm,
                        tokens_per_sec=tokens_per_iter / dt, ms_per_iter=dt * 1000, mfu=mfu,
                        time=round(timer.elapsed(), 2))
    iter_num += 1

# the end: ckpt.pt holds the last state, whatever stopped the run (unless the last eval wrote it)
if master_process:
    save_on_stop(stopping and not bad, saved_at, iter_num, lambda: save('ckpt.pt'), out_dir)
    update_card(last_eval)
    metrics.close()  # after the card: the trackers take it
if ddp:
    dist.destroy_process_group()
restore_signals()  # leave the caller's Ctrl-C handling as it was
