"""
Align a fine-tuned model with preference pairs: DPO (Rafailov et al. 2023) or IPO (Azar et al.
2023), against a frozen reference: a copy of the starting (SFT) model, or with LoRA the same model
with its adapter switched off.

    python dpo.py                                    # CPU default = configs/dpo_tasks.py, after
                                                     # `python finetune.py configs/sft_tasks.py`
    python dpo.py configs/dpo_demo.py                # CPU: hh-rlhf pairs after SFT on Alpaca
    python dpo.py --init_from=out-sft --dataset=hh_rlhf --device=cuda --batch_size=32  # one GPU
    python dpo.py --lora_r=8 --out_dir=out-dpo-lora  # LoRA: the reference is the adapter off
    python dpo.py --lora_r=8 --quantize_base=nf4 --grad_checkpoint=True  # QLoRA, less memory
    python dpo.py --init_from=resume --out_dir=out-dpo-tasks  # go on from out_dir/ckpt.pt, exactly
    python dpo.py --help                             # every setting, with its default

Data: data_dir/<dataset>/pref_{train,val}.jsonl (the tasks suite, whose {train,val}.jsonl are SFT
rows) or {train,val}.jsonl (`python data.py hh_rlhf|dpo_pairs`), prepared when missing; or any file
that formats.read_preferences reads: {prompt, chosen, rejected} JSONL, hh-rlhf transcripts,
ShareGPT pairs.
Writes to out_dir: ckpt.pt (the policy, LoRA merged in, so load_model reads it like any run; plus
what exact resume needs: optimizer, LoRA weights, a checksum of the reference, which resume
rebuilds from init_from); metrics.jsonl (log rows: loss and the statistics below; eval rows:
val_loss and the same on held-out pairs, plus on the tasks suite win_rate: how often
synthetic.rule_score prefers the policy's greedy answer to the reference's, ties half);
config.json, loss.svg and README.md (the model card).

The math, per pair (x = prompt, y_w = chosen, y_l = rejected), with log-probabilities summed over
the response tokens only (the prompt and the padding are masked out):
    h       = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)]
    sigmoid = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)    DPO (cDPO: eps)
    ipo     = (h - 1 / (2 * beta)) ** 2                                            IPO
with eps = label_smoothing; IPO on the same summed log-probs (subtle: trl averages the log-probs
over the response tokens for IPO; we keep the paper's sums).
Logged with trl's names: rewards/chosen = beta * (log pi(y_w) - log ref(y_w)) and rewards/rejected
likewise, rewards/margins = their difference, rewards/accuracies = share of pairs with
rewards/chosen > rewards/rejected, where a tie counts half (trl counts it 0, which reads 0% at step
0, where every reward is exactly 0), logps/* the policy's summed log-probs, and
kl = mean(log pi(y_w) - log ref(y_w)) on the chosen responses.

Sequences: prompt = render_chat(prompt messages, add_generation_prompt=True); response = the tokens
that render_chat adds for the assistant's answer (its content and end-of-turn token), exactly as
SFT saw them. Truncation to block_size + 1 tokens: 1) the prompt loses tokens from the left (its
oldest turns) until it fits next to the longer response, but keeps at least half the budget; 2)
each response is cut from the right to what is left. Pairs whose two responses become identical are
skipped and counted; so are the pairs formats.py skips. Dropout is off throughout (trl's
disable_dropout), so policy and reference agree exactly at step 0.
"""
import copy
import functools
import os
from contextlib import nullcontext
from dataclasses import asdict

import torch

from nanolab import synthetic
from nanolab.checkpoint import load_model, model_from_checkpoint, save_checkpoint
from nanolab.configurator import cli_errors, configure, fail
from nanolab.device import DTYPES, autocast_ctx, resolve_device, resolve_dtype
from nanolab.files import write_json
from nanolab.formats import read_preferences
from nanolab.lora import QUANTIZE, add_lora, lora_disabled, lora_state
from nanolab.metrics import answer, win_rate
from nanolab.preferences import (LOSS_TYPES, collate, load_pairs, pair_order, preference_files,
                                 preference_loss, response_logps)
from nanolab.progress import at  # i/N (p%), ETA
from nanolab.tracking import write_model_card
from nanolab.training import (LR_SCHEDULES, checkpoint_dict, configure_optimizer, end_eval, get_lr,
                              open_run, optimizer_step, restore_training, save_on_stop, set_lr,
                              start_loop, use_grad_checkpoint)

# -----------------------------------------------------------------------------
# defaults: the CPU run of configs/dpo_tasks.py (see that file for the measured figures)
# I/O
out_dir = 'out-dpo-tasks'     # checkpoint, metrics, loss curve and model card go here
init_from = 'out-sft-tasks'   # the policy's start and the reference: a model source (out_dir, .pt, HF dir, hub name) | 'resume'
overwrite = False             # True: a fresh run may replace the trained run in out_dir (its files are lost)
mlflow_log = False            # log params, metrics and artifacts to MLflow (MLFLOW_TRACKING_URI, else ./mlflow.db)
wandb_log = False             # the same to Weights & Biases (WANDB_MODE=offline keeps it on disk)
wandb_project = 'nanolab'     # the W&B project and the MLflow experiment
wandb_run_name = ''           # the run's name in both; '' = out_dir's name
eval_interval = 50            # evaluate on held-out pairs, and write ckpt.pt, every this many iterations (and at the end)
log_interval = 10             # print and log a metrics row every this many iterations
eval_pairs = 200              # held-out pairs per eval; 0 = all
eval_only = False             # evaluate once and exit
# data
dataset = 'tasks'             # data_dir/<dataset>/ (`python data.py tasks|hh_rlhf|dpo_pairs`; named sets are prepared when missing)
data_dir = 'data'             # where datasets live
train_file = ''               # training pairs; '' = pref_train.jsonl in the dataset folder if it has one (tasks), else train.jsonl; a path with a '/' = any preference file
val_file = ''                 # held-out pairs, the same way (pref_val.jsonl, else val.jsonl)
batch_size = 16               # pairs per micro-batch (each forward sees 2*batch_size rows: chosen, then rejected)
gradient_accumulation_steps = 1  # micro-batches per optimizer step
block_size = 0                # max tokens per sequence (prompt + response); 0 = the model's context
# DPO
loss_type = 'sigmoid'         # 'sigmoid' (DPO) | 'ipo' (summed log-ratios) | 'ipo_mean' (per token, as trl's ipo)
beta = 0.1                    # strength of the pull toward the reference (the KL penalty's inverse temperature)
label_smoothing = 0.0         # cDPO: assumed share of flipped labels, in [0, 0.5); sigmoid loss only
# LoRA (peft), as in finetune.py; the reference is then the same model with its adapter disabled
lora_r = 0                    # rank of the update; 0 = off (all weights train, the reference is a frozen copy)
lora_alpha = 16.0             # the update is scaled by lora_alpha / lora_r
lora_targets = 'c_attn,c_proj,c_fc'  # comma-separated Linear module names (or suffixes like attn.c_proj)
quantize_base = ''            # QLoRA: 'nf4' = the frozen base's block weights in 4 bits (bitsandbytes, CPU or CUDA; needs lora_r > 0) | '' = as loaded
# win rate (metrics.win_rate), tasks suite only: greedy answers of policy and reference, judged by
# synthetic.rule_score
win_rate_prompts = 200        # held-out prompts answered by both models at each eval; 0 = off
max_new_tokens = 16           # answer length limit for the win rate, tokens
# AdamW optimizer
learning_rate = 2e-5          # peak learning rate; on the tasks suite 5e-5 cut held-out exact match 94% -> 80%, 1e-5 left the win rate at 0.68
max_iters = 150               # total optimizer steps
weight_decay = 0.0            # on >=2-D weights only
beta1 = 0.9                   # AdamW beta1
beta2 = 0.999                 # AdamW beta2
grad_clip = 1.0               # clip the global gradient norm at this value; 0 = off
# learning-rate schedule
lr_schedule = 'cosine'        # 'cosine' | 'linear' | 'constant'
warmup_iters = 10             # linear warmup steps
lr_decay_iters = 150          # decay ends here (~max_iters)
min_lr = 2e-6                 # floor after decay (~learning_rate/10)
# system
device = 'auto'               # 'auto' (cuda > mps > cpu) | 'cpu' | 'cuda' | 'cuda:N' | 'mps'
dtype = 'auto'                # 'auto' (bf16 on GPUs that have it, else fp16; fp32 on CPU) | 'float32' | 'bfloat16' | 'float16'
grad_checkpoint = False       # recompute each block's activations in backward: less memory, ~1/3 more compute
seed = 1337                   # data order, LoRA init
# -----------------------------------------------------------------------------
CHOICES = {'loss_type': LOSS_TYPES, 'lr_schedule': LR_SCHEDULES, 'dtype': DTYPES,
           'quantize_base': QUANTIZE}
config = configure(globals(), choices=CHOICES)

# never replace a trained run; resume = the run's saved config, this command line on top; an
# adapter's shape is fixed once trained
ckpt, config = open_run(out_dir, init_from, overwrite, __file__, config, CHOICES,
                       fixed=('lora_r', 'lora_alpha', 'lora_targets'))
globals().update(config)
if ckpt is not None:
    # the flags said 'resume': the run's model source
    init_from = config['init_from'] = ckpt['config']['init_from']
if not 0 <= label_smoothing < 0.5 or beta <= 0:
    fail(f'label_smoothing={label_smoothing} must be in [0, 0.5) and beta={beta} positive')
if quantize_base and not lora_r:
    fail(f'quantize_base={quantize_base!r} (QLoRA) trains LoRA adapters on a frozen 4-bit base; '
         'give --lora_r (e.g. 16), or leave quantize_base off')

# 1) device, dtype; 2) the policy and the reference, from the SFT model
with cli_errors():
    device = resolve_device(device)
    device_type = device.split(':')[0]
    ptdtype = resolve_dtype(dtype, device)
    sft, tok, _ = load_model(init_from)  # on resume, the reference is rebuilt from the same source
if tok is None:
    fail(f'{init_from} has no tokenizer, so its chat template is unknown; start '
         'from a model that has one')
model_args = asdict(sft.config)
block_size = min(block_size or model_args['block_size'], model_args['block_size'])
# a checksum of the reference
ref_sum = float(sum(p.double().sum() for p in sft.state_dict().values()))
if ckpt is not None and ref_sum != ckpt['ref_sum']:
    fail(f"the reference {init_from} has changed since this run started, so it can't resume "
         "exactly; restore it, or start a new run")
n_params = sft.num_params(non_embedding=False)  # before LoRA adds its own
policy = sft if lora_r else copy.deepcopy(sft)
if ckpt is not None and not lora_r:
    policy = model_from_checkpoint(ckpt, os.path.join(out_dir, 'ckpt.pt'))
# a LoRA SFT run's ckpt.pt holds merged weights, so adapter off = the SFT model, not its base
if lora_r:
    # LoRA's A matrices start random (B starts at 0, so the policy starts as the SFT model)
    torch.manual_seed(seed)
    with cli_errors():
        model = add_lora(policy, lora_r, lora_alpha, 0.0, lora_targets, quantize_base, device)
    if ckpt is not None:
        model.load_state_dict(ckpt['lora']['state'], strict=False)
    ref_model, reference = model, functools.partial(lora_disabled, model)
else:
    model, ref_model, reference = policy, sft.requires_grad_(False), nullcontext
if grad_checkpoint:
    use_grad_checkpoint(model)  # the reference's passes run without grad: never recomputed
model.to(device).eval()  # eval(): dropout off; the reference needs no grad but policy params do
ref_model.to(device).eval()
n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
print(f'{n_params / 1e6:.2f}M parameters, {f"LoRA r={lora_r}" if lora_r else "full"} '
      f'{"IPO" if loss_type.startswith("ipo") else "DPO"} (beta={beta}), {n_train / 1e6:.3f}M trainable, '
      f'{device}, {str(ptdtype).replace("torch.", "")}')

# 3) the pairs: a named dataset is prepared by data.py when its folder is missing
with cli_errors():
    paths = preference_files(data_dir, dataset, train_file, val_file)
    (train_pairs, _), (val_pairs, _) = (load_pairs(p, tok, block_size + 1) for p in paths)
if not train_pairs or not val_pairs:
    fail(f'no usable pairs in {paths[0] if not train_pairs else paths[1]}; '
         'see the skip counts above')
val_pairs = val_pairs[:eval_pairs or len(val_pairs)]
# held-out prompts for the win rate, and the reference's answers to them
win_rows, ref_answers = [], []
if win_rate_prompts and dataset == 'tasks':  # the one dataset with a rule to judge answers by
    # rule_score reads a row's prompt and chosen answer
    win_rows = read_preferences(paths[1])[:win_rate_prompts]

# 4) optimizer (on the trainable parameters only), random state, output directory
optimizer = configure_optimizer(model, weight_decay, learning_rate, (beta1, beta2), device_type)
scaler = torch.amp.GradScaler(device_type, enabled=(ptdtype == torch.float16))
iter_num, best_val_loss, elapsed0 = 0, float('inf'), 0.0
if ckpt is not None:  # exact resume: the optimizer, the fp16 loss scale, the RNG states
    with cli_errors():
        elapsed0 = restore_training(ckpt, optimizer, scaler)
    iter_num, best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
ckpt = None
ctx = autocast_ctx(device, ptdtype)
os.makedirs(out_dir, exist_ok=True)
config.update({k: globals()[k] for k in config})
write_json(os.path.join(out_dir, 'config.json'), config)  # atomic: never a half-written config
pairs_per_iter = batch_size * gradient_accumulation_steps

def get_batch(it, micro_step):
    return collate([train_pairs[i] for i in pair_order(len(train_pairs), it, micro_step,
                                                       batch_size, gradient_accumulation_steps,
                                                       seed)], device)

def forward(x, y, ref=None):
    """Policy and reference log-probs of a collated batch -> (per-pair losses, stats). The
    reference runs under no_grad: forward computes the same function in every mode, so step 0's
    loss is still exactly log 2."""
    with ctx:
        logps = response_logps(model, x, y)
        if ref is None:
            with reference(), torch.no_grad():
                ref = response_logps(ref_model, x, y)
    B, n = x.size(0) // 2, (y != -1).sum(1)  # n: each response's tokens
    return preference_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta, loss_type,
                           label_smoothing, n[:B], n[B:]) + (ref,)

val_batches = [collate(val_pairs[i:i + batch_size], device)
               for i in range(0, len(val_pairs), batch_size)]
# the reference never changes: its val log-probs are computed once
val_refs = [None] * len(val_batches)

@torch.no_grad()
def estimate():
    """DPO loss and statistics on the held-out pairs; with a rule, the win rate over the
    reference."""
    losses, stats = [], []
    for k, (x, y) in enumerate(val_batches):
        l, s, val_refs[k] = forward(x, y, val_refs[k])
        losses.append(l), stats.append(s)
    row = {'val_loss': torch.cat(losses).mean().item()}
    row.update({k: torch.cat([s[k] for s in stats]).mean().item() for k in stats[0]})
    if win_rows:  # greedy answers of both models, scored by the rule the preferences encode
        prompts = [r['prompt'] for r in win_rows]
        if not ref_answers:  # the reference's answers never change
            with reference(), ctx:
                ref_answers.extend(answer(ref_model, tok, prompts, max_new_tokens))
        with ctx:  # generation under the run's autocast (bf16 on GPUs), as its forward passes
            answers = answer(model, tok, prompts, max_new_tokens)
        row['win_rate'], details = win_rate(win_rows, answers, ref_answers, synthetic.rule_score)
        # the rule's mean score, policy
        row['win_score'] = sum(d['score'] for d in details) / len(details)
        row['ref_win_score'] = sum(d['ref_score'] for d in details) / len(details)  # and reference
    return row

def save():
    """ckpt.pt: the merged policy (load_model reads it like any checkpoint) + what exact resume
    needs."""
    extra = {'lora': {'base': init_from, 'state': lora_state(model)}} if lora_r else {}
    save_checkpoint(checkpoint_dict(model, optimizer, model_args, iter_num, best_val_loss, config,
                                    tok.spec(), scaler=scaler, elapsed=timer.elapsed(),
                                    origin=init_from, ref_sum=ref_sum, stage='dpo', **extra),
                    os.path.join(out_dir, 'ckpt.pt'))

def update_card(last=None):
    keys = ('val_loss', 'rewards/accuracies', 'rewards/margins', 'kl', 'win_rate')
    stats = {'iterations': iter_num, 'pairs seen': iter_num * pairs_per_iter,
             **{f'held-out {k}': last[k] for k in keys if last and k in last},
             'training time (s)': round(timer.elapsed(), 1)}
    how = (f"{'IPO' if loss_type.startswith('ipo') else 'DPO'} "
           f"(beta={beta}{f', LoRA r={lora_r} merged' if lora_r else ''}) with nanolab's dpo.py, "
           f"starting from and referenced to {init_from}, on preference pairs from {dataset}.")
    info = {'dataset': f'{dataset} ({paths[0]}, {paths[1]})', 'train pairs': len(train_pairs),
            'val pairs': len(val_pairs)}
    write_model_card(out_dir, os.path.basename(os.path.abspath(out_dir)), how, model_args,
                     n_params, info, stats,
                     command=f'python dpo.py --init_from=resume --out_dir={out_dir}   # train on')

# Ctrl-C (or SIGTERM): finish the step, write ckpt.pt, exit cleanly; a second Ctrl-C stops at once
last_eval, saved_at, bad = None, None, False
stop, restore_signals, timer, metrics = start_loop(out_dir, iter_num, elapsed0, config)
update_card()

# training loop
while True:

    # this iteration's learning rate
    lr = set_lr(optimizer, get_lr(iter_num, warmup_iters, lr_decay_iters, learning_rate, min_lr,
                                  lr_schedule))

    # evaluate on the held-out pairs and write the checkpoint
    if iter_num % eval_interval == 0 or iter_num >= max_iters or eval_only:
        row = estimate()
        best_val_loss = min(best_val_loss, row['val_loss'])
        print(f"step {iter_num}: val loss {row['val_loss']:.4f}, reward accuracy "
              f"{row['rewards/accuracies']:.3f}, margin "
              f"{row['rewards/margins']:.3f}, kl {row['kl']:.3f}" +
              (f", win rate {row['win_rate']:.3f}" if 'win_rate' in row else ''))
        update_card(last_eval := row)  # then log, write ckpt.pt (or stop: diverged), loss.svg
        bad, saved_at = end_eval(metrics, row, iter_num, lr, timer, saved_at, out_dir, save,
                                 f'{out_dir}: {loss_type} on {dataset}', eval_only)
    if iter_num >= max_iters or eval_only or stop or bad:
        break

    # forward backward update, with gradient accumulation
    stats = []
    for micro_step in range(gradient_accumulation_steps):
        x, y = get_batch(iter_num, micro_step)
        losses, s, _ = forward(x, y)
        scaler.scale(losses.mean() / gradient_accumulation_steps).backward()
        stats.append({'loss': losses.detach(), **s})
    # clip, step
    grad_norm = optimizer_step(model.parameters(), optimizer, scaler, grad_clip, device_type)

    # timing (evals excluded) and logging
    timer.step()
    if iter_num % log_interval == 0:
        row, (dt, _) = {k: torch.cat([s[k] for s in stats]).mean().item() for k in stats[0]}, \
            timer.window()
        print(f"iter {at(iter_num, max_iters, dt)}: loss {row['loss']:.4f}, accuracy "
              f"{row['rewards/accuracies']:.2f}, margin {row['rewards/margins']:.3f}, kl "
              f"{row['kl']:.3f}, lr {lr:.2e}, {dt * 1000:.0f} ms/iter")
        metrics.log(iter=iter_num, **row, lr=lr, grad_norm=grad_norm.item(), ms_per_iter=dt * 1000,
                    time=round(timer.elapsed(), 2))
    iter_num += 1

# the end: ckpt.pt holds the last state, whatever stopped the run (unless the last eval wrote it)
save_on_stop(stop and not bad and not eval_only, saved_at, iter_num, save, out_dir)
update_card(last_eval)
metrics.close()  # after the card: the trackers take it
restore_signals()
