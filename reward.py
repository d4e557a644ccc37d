"""
Train a reward model on preference pairs: a model source's transformer with a scalar head on the
last token of prompt + response, trained with the Bradley-Terry loss (Stiennon et al. 2020, Ouyang
et al. 2022), full or LoRA.

    python reward.py                          # CPU default = configs/reward_tasks.py, after
                                              # `python finetune.py configs/sft_tasks.py`
    python reward.py --init_from=out-sft --dataset=hh_rlhf --device=cuda --batch_size=32  # one GPU
    python reward.py --train_file=arena_pairs.jsonl --val_file=arena_val.jsonl
                                              # the arena's pairs (evaluate.py --arena_to_pairs)
    python reward.py --lora_r=8 --quantize_base=nf4 --grad_checkpoint=True  # QLoRA, less memory
    python reward.py --init_from=resume --out_dir=out-reward-tasks  # go on from ckpt.pt, exactly
    python reward.py --help                   # every setting, with its default

    from nanolab.reward_model import load_reward_model  # the model this trains (rl.py, the arena)
    rm, tok = load_reward_model('out-reward-tasks')  # rm.score(tok, messages, answers) -> rewards

Data: what dpo.py reads (preferences.preference_files: the tasks suite's pref_{train,val}.jsonl,
hh-rlhf, dpo_pairs, or any {prompt, chosen, rejected} file, the arena's included), encoded and
truncated by preferences.encode_pair.
The model: r(x, y) = w . h_T + b, where h_T is the final norm's output at the last token of the
chat template's prompt and answer (its end-of-turn token: the whole answer is in view) and the head
starts at zero, so every reward starts at 0, the loss at exactly log 2 and the accuracy at 0.5
(ties count half).
The loss, per pair: -log sigmoid(r(x, y_w) - r(x, y_l)). Logged: loss, accuracy (share of pairs
with r(x, y_w) > r(x, y_l)), margin (mean r(x, y_w) - r(x, y_l)), and the mean rewards of each
side.
Writes to out_dir: ckpt.pt (the transformer, LoRA merged, readable by load_model as a language
model; the head as 'reward_head'; plus what exact resume needs), config.json, metrics.jsonl,
loss.svg, README.md (the model card).
"""
import os
from dataclasses import asdict

import torch

from nanolab.checkpoint import load_model, save_checkpoint
from nanolab.configurator import cli_errors, configure, fail
from nanolab.device import DTYPES, autocast_ctx, resolve_device, resolve_dtype
from nanolab.files import write_json
from nanolab.lora import QUANTIZE, add_lora, lora_state
from nanolab.preferences import load_pairs, pair_order, preference_files
from nanolab.progress import at  # i/N (p%), ETA
from nanolab.reward_model import RewardModel, bt_loss, collate
from nanolab.tracking import write_model_card
from nanolab.training import (LR_SCHEDULES, checkpoint_dict, configure_optimizer, end_eval, get_lr,
                              open_run, optimizer_step, restore_training, save_on_stop, set_lr,
                              start_loop, use_grad_checkpoint)

# -----------------------------------------------------------------------------
# defaults: the CPU run of configs/reward_tasks.py (see that file for the measured figures)
# I/O
out_dir = 'out-reward-tasks'  # checkpoint, metrics, loss curve and model card go here
init_from = 'out-sft-tasks'   # the transformer to start from: a model source (out_dir, .pt, HF dir, hub name) | 'resume'
overwrite = False             # True: a fresh run may replace the trained run in out_dir (its files are lost)
mlflow_log = False            # log params, metrics and artifacts to MLflow (MLFLOW_TRACKING_URI, else ./mlflow.db)
wandb_log = False             # the same to Weights & Biases (WANDB_MODE=offline keeps it on disk)
wandb_project = 'nanolab'     # the W&B project and the MLflow experiment
wandb_run_name = ''           # the run's name in both; '' = out_dir's name
eval_interval = 50            # evaluate on held-out pairs, and write ckpt.pt, every this many iterations (and at the end)
log_interval = 10             # print and log a metrics row every this many iterations
eval_pairs = 500              # held-out pairs per eval; 0 = all
eval_only = False             # evaluate once and exit
# data (as dpo.py)
dataset = 'tasks'             # data_dir/<dataset>/ (`python data.py tasks|hh_rlhf|dpo_pairs`; named sets are prepared when missing)
data_dir = 'data'             # where datasets live
train_file = ''               # training pairs; '' = pref_train.jsonl if the folder has one, else train.jsonl; a path with a '/' = any preference file
val_file = ''                 # held-out pairs, the same way
batch_size = 16               # pairs per micro-batch (each forward sees 2*batch_size sequences)
gradient_accumulation_steps = 1  # micro-batches per optimizer step
block_size = 0                # max tokens per sequence (prompt + answer); 0 = the model's context
# LoRA (peft), as in finetune.py; the head always trains
lora_r = 0                    # rank of the update; 0 = off (all weights train)
lora_alpha = 16.0             # the update is scaled by lora_alpha / lora_r
lora_targets = 'c_attn,c_proj,c_fc'  # comma-separated Linear module names (or suffixes like attn.c_proj)
quantize_base = ''            # QLoRA: 'nf4' = the frozen base's block weights in 4 bits (bitsandbytes, CPU or CUDA; needs lora_r > 0) | '' = as loaded
# AdamW optimizer and schedule
learning_rate = 1e-4          # peak learning rate
max_iters = 200               # total optimizer steps
weight_decay = 0.0            # on >=2-D weights only
beta1 = 0.9                   # AdamW beta1
beta2 = 0.999                 # AdamW beta2
grad_clip = 1.0               # clip the global gradient norm at this value; 0 = off
lr_schedule = 'cosine'        # 'cosine' | 'linear' | 'constant'
warmup_iters = 10             # linear warmup steps
lr_decay_iters = 200          # decay ends here (~max_iters)
min_lr = 1e-5                 # floor after decay
# system
device = 'auto'               # 'auto' (cuda > mps > cpu) | 'cpu' | 'cuda' | 'cuda:N' | 'mps'
dtype = 'auto'                # 'auto' (bf16 on GPUs that have it, else fp16; fp32 on CPU) | 'float32' | 'bfloat16' | 'float16'
grad_checkpoint = False       # recompute each block's activations in backward: less memory, ~1/3 more compute
seed = 1337                   # data order, LoRA init
# -----------------------------------------------------------------------------
CHOICES = {'lr_schedule': LR_SCHEDULES, 'dtype': DTYPES, 'quantize_base': QUANTIZE}
config = configure(globals(), choices=CHOICES)
# never replace a trained run; resume = the run's saved config, this command line on top; an
# adapter's shape is fixed once trained
ckpt, config = open_run(out_dir, init_from, overwrite, __file__, config, CHOICES,
                       fixed=('lora_r', 'lora_alpha', 'lora_targets'))
globals().update(config)
if ckpt is not None:
    # the flags said 'resume': the run's source
    init_from = config['init_from'] = ckpt['config']['init_from']
if quantize_base and not lora_r:
    fail(f'quantize_base={quantize_base!r} (QLoRA) trains LoRA adapters on a frozen 4-bit base; '
         'give --lora_r (e.g. 16), or leave quantize_base off')

# 1) device, dtype, the transformer and the head (LoRA: on the transformer; the head trains whole)
with cli_errors():
    device = resolve_device(device)
    device_type = device.split(':')[0]
    ptdtype = resolve_dtype(dtype, device)
    gpt, tok, _ = load_model(init_from)  # on resume, the base is rebuilt from the same source
if tok is None:
    fail(f'{init_from} has no tokenizer, so its chat template is unknown; start '
         'from a model that has one')
model_args, n_params = asdict(gpt.config), gpt.num_params(non_embedding=False)
block_size = min(block_size or model_args['block_size'], model_args['block_size'])
if lora_r:
    torch.manual_seed(seed)
    with cli_errors():
        gpt = add_lora(gpt, lora_r, lora_alpha, 0.0, lora_targets, quantize_base, device)
if grad_checkpoint:
    use_grad_checkpoint(gpt)
model = RewardModel(gpt)
if ckpt is not None:
    if lora_r:
        model.gpt.load_state_dict(ckpt['lora']['state'], strict=False)
    else:
        model.gpt.load_state_dict(ckpt['model'])
    model.head.load_state_dict(ckpt['reward_head'])
model.to(device).eval()  # eval(): dropout off, so a pair's rewards do not depend on the draw
n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
print(f'{n_params / 1e6:.2f}M parameters, {f"LoRA r={lora_r}" if lora_r else "full"} reward '
      f'model, {n_train / 1e6:.3f}M trainable, {device}, {str(ptdtype).replace("torch.", "")}')

# 2) the pairs
with cli_errors():
    paths = preference_files(data_dir, dataset, train_file, val_file)
    (train_pairs, _), (val_pairs, _) = (load_pairs(p, tok, block_size) for p in paths)
if not train_pairs or not val_pairs:
    fail(f'no usable pairs in {paths[0] if not train_pairs else paths[1]}; '
         'see the skip counts above')
val_pairs = val_pairs[:eval_pairs or len(val_pairs)]
val_batches = [collate(val_pairs[i:i + batch_size], device)
               for i in range(0, len(val_pairs), batch_size)]

# 3) optimizer, random state, output directory
optimizer = configure_optimizer(model, weight_decay, learning_rate, (beta1, beta2), device_type)
scaler = torch.amp.GradScaler(device_type, enabled=(ptdtype == torch.float16))
iter_num, best_val_loss, elapsed0 = (ckpt['iter_num'], ckpt['best_val_loss'], 0.0) if ckpt else \
    (0, float('inf'), 0.0)
with cli_errors():  # exact resume: the optimizer, the fp16 loss scale, the RNG states
    elapsed0 = restore_training(ckpt, optimizer, scaler) if ckpt else 0.0
ckpt = None
ctx = autocast_ctx(device, ptdtype)
os.makedirs(out_dir, exist_ok=True)
config.update({k: globals()[k] for k in config})
write_json(os.path.join(out_dir, 'config.json'), config)  # atomic: never a half-written config

def rewards(x, last):
    with ctx:
        r = model(x, last)
    B = x.size(0) // 2
    return bt_loss(r[:B], r[B:])

@torch.no_grad()
def estimate():
    """Loss, accuracy, margin and mean rewards on the held-out pairs."""
    parts = [rewards(x, last) for x, last in val_batches]
    row = {'val_loss': torch.cat([l for l, _ in parts]).mean().item()}
    row.update({k: torch.cat([s[k] for _, s in parts]).mean().item() for k in parts[0][1]})
    return row

def save():
    """ckpt.pt: the transformer (LoRA merged: load_model reads it), the head, and what exact resume
    needs."""
    extra = {'lora': {'base': init_from, 'state': lora_state(model.gpt)}} if lora_r else {}
    save_checkpoint(checkpoint_dict(model.gpt, optimizer, model_args, iter_num, best_val_loss,
                                    config, tok.spec(), scaler=scaler, elapsed=timer.elapsed(),
                                    origin=init_from, reward_head=model.head.state_dict(),
                                    stage='reward', **extra),
                    os.path.join(out_dir, 'ckpt.pt'))

def update_card(last=None):
    stats = {'iterations': iter_num,
             **{f'held-out {k}': last[k] for k in ('val_loss', 'accuracy', 'margin')
                if last and k in last},
             'training time (s)': round(timer.elapsed(), 1)}
    how = ("A reward model (scalar head on the last token, Bradley-Terry "
           f"loss{f', LoRA r={lora_r} merged' if lora_r else ''}) trained with nanolab's "
           f"reward.py from {init_from} on preference pairs from {dataset}.")
    info = {'dataset': f'{dataset} ({paths[0]}, {paths[1]})', 'train pairs': len(train_pairs),
            'val pairs': len(val_pairs)}
    write_model_card(out_dir, os.path.basename(os.path.abspath(out_dir)), how, model_args,
                     n_params, info, stats,
                     command='python reward.py --init_from=resume '
                             f'--out_dir={out_dir}   # train on')

# Ctrl-C (or SIGTERM): finish the step, write ckpt.pt, exit cleanly; a second Ctrl-C stops at once
stop, restore_signals, timer, metrics = start_loop(out_dir, iter_num, elapsed0, config)
last_eval, saved_at, bad = None, None, False
update_card()

# training loop
while True:
    lr = set_lr(optimizer, get_lr(iter_num, warmup_iters, lr_decay_iters, learning_rate, min_lr,
                                  lr_schedule))

    # evaluate on the held-out pairs and write the checkpoint
    if iter_num % eval_interval == 0 or iter_num >= max_iters or eval_only:
        row = estimate()
        best_val_loss = min(best_val_loss, row['val_loss'])
        print(f"step {iter_num}: val loss {row['val_loss']:.4f}, accuracy {row['accuracy']:.3f}, "
              f"margin {row['margin']:.3f}")
        update_card(last_eval := row)  # then log, write ckpt.pt (or stop: diverged), loss.svg
        bad, saved_at = end_eval(metrics, row, iter_num, lr, timer, saved_at, out_dir, save,
                                 f'{out_dir}: reward model on {dataset}', eval_only)
    if iter_num >= max_iters or eval_only or stop or bad:
        break

    # forward backward update, with gradient accumulation
    stats = []
    for micro_step in range(gradient_accumulation_steps):
        idx = pair_order(len(train_pairs), iter_num, micro_step, batch_size,
                         gradient_accumulation_steps, seed)
        losses, s = rewards(*collate([train_pairs[i] for i in idx], device))
        scaler.scale(losses.mean() / gradient_accumulation_steps).backward()
        stats.append({'loss': losses.detach(), **s})
    # clip, step
    grad_norm = optimizer_step(model.parameters(), optimizer, scaler, grad_clip, device_type)

    # timing (evals excluded) and logging
    timer.step()
    if iter_num % log_interval == 0:
        row, (dt, _) = {k: torch.cat([s[k] for s in stats]).mean().item() for k in stats[0]}, \
            timer.window()
        print(f"iter {at(iter_num, max_iters, dt)}: loss {row['loss']:.4f}, "
              f"accuracy {row['accuracy']:.2f}, margin {row['margin']:.3f}, lr "
              f"{lr:.2e}, {dt * 1000:.0f} ms/iter")
        metrics.log(iter=iter_num, **row, lr=lr, grad_norm=grad_norm.item(), ms_per_iter=dt * 1000,
                    time=round(timer.elapsed(), 2))
    iter_num += 1

# the end: ckpt.pt holds the last state, whatever stopped the run (unless the last eval wrote it)
save_on_stop(stop and not bad and not eval_only, saved_at, iter_num, save, out_dir)
update_card(last_eval)
metrics.close()  # after the card: the trackers take it
restore_signals()
