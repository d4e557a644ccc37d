"""
Online RL from a fine-tuned model: GRPO (Shao et al. 2024). Each iteration samples a group of
answers to each of a few prompts with the engine (generate), scores them with a rule or a reward
model, and moves the policy toward the answers that beat their group's mean, with a KL penalty to
the starting model (the reference).

    python rl.py                            # CPU default = configs/rl_tasks.py, after
                                            # `python finetune.py configs/sft_tasks.py`
    python rl.py --reward=out-reward-tasks  # score with a reward model (reward.py), not the rule
    python rl.py --init_from=resume --out_dir=out-rl-tasks  # go on from out_dir/ckpt.pt, exactly
    python rl.py --help                     # every setting, with its default

The update, per prompt x with G sampled answers y_1..y_G and rewards r_1..r_G:
    A_i    = (r_i - mean(r)) / (std(r) + 1e-4)                 the group-relative advantage
    loss_i = -A_i * mean_t log pi(y_i,t | x, y_i,<t)  +  kl_coef * mean_t k3_t,
    k3_t   = exp(log ref - log pi) - (log ref - log pi) - 1   Schulman's KL estimate
averaged over the batch; A_i is 0 when the group's rewards are all equal, and k3 is an unbiased,
non-negative estimate of the KL. One gradient step per batch of fresh samples (on-policy), so PPO's
ratio is 1 and its clip never acts: the policy-gradient term is the whole of it.
Logged per step: loss, reward (mean of the samples), kl (mean k3), entropy (mean over the answers'
tokens, nats), length (tokens per answer). Per eval, on held-out prompts with greedy answers:
reward (mean), exact_match (after synthetic.normalize), win_rate over the reference's greedy
answers by the rule (ties half), and kl (the exact per-token KL(pi || ref) of the full next-token
distributions along those answers).
Writes to out_dir: ckpt.pt (the policy; load_model reads it), config.json, metrics.jsonl, loss.svg,
README.md.
"""
import copy
import os
from dataclasses import asdict

import torch

from nanolab import datasets, synthetic
from nanolab.checkpoint import load_model, model_from_checkpoint, save_checkpoint
from nanolab.configurator import cli_errors, configure, fail
from nanolab.device import DTYPES, autocast_ctx, resolve_device, resolve_dtype
from nanolab.files import write_json
from nanolab.formats import read_sft
from nanolab.generation import generate
from nanolab.grpo import exact_kl, group_advantages, grpo_loss
from nanolab.metrics import answer, win_rate
from nanolab.preferences import collate_responses, pair_order
from nanolab.progress import at  # i/N (p%), ETA
from nanolab.reward_model import load_reward_model
from nanolab.tracking import write_model_card
from nanolab.training import (LR_SCHEDULES, checkpoint_dict, configure_optimizer, end_eval, get_lr,
                              open_run, optimizer_step, restore_training, save_on_stop, set_lr,
                              start_loop)

# -----------------------------------------------------------------------------
# defaults: the CPU run of configs/rl_tasks.py (see that file for the measured figures)
# I/O
out_dir = 'out-rl-tasks'      # checkpoint, metrics, loss curve and model card go here
init_from = 'out-sft-tasks'   # the policy's start and the reference: a model source | 'resume'
overwrite = False             # True: a fresh run may replace the trained run in out_dir (its files are lost)
mlflow_log = False            # log params, metrics and artifacts to MLflow (MLFLOW_TRACKING_URI, else ./mlflow.db)
wandb_log = False             # the same to Weights & Biases (WANDB_MODE=offline keeps it on disk)
wandb_project = 'nanolab'     # the W&B project and the MLflow experiment
wandb_run_name = ''           # the run's name in both; '' = out_dir's name
eval_interval = 20            # evaluate on held-out prompts, and write ckpt.pt, every this many iterations (and at the end)
log_interval = 5              # print and log a metrics row every this many iterations
eval_prompts = 200            # held-out prompts per eval
eval_only = False             # evaluate once and exit
# data and reward
dataset = 'tasks'             # data_dir/<dataset>/{train,val}.jsonl: SFT rows, whose user turns are the prompts
data_dir = 'data'             # where datasets live
reward = 'rule'               # 'rule' (synthetic.rule_score against the row's answer) | a reward model (reward.py's out_dir)
prompts_per_iter = 8          # prompts per iteration
group_size = 8                # answers sampled per prompt (GRPO's G)
max_new_tokens = 16           # answer length limit, tokens
temperature = 1.0             # sampling temperature of the answers trained on
kl_coef = 0.05                # weight of the KL penalty to the reference
# AdamW optimizer and schedule
learning_rate = 3e-5          # peak learning rate
max_iters = 100               # total optimizer steps
weight_decay = 0.0            # on >=2-D weights only
beta1 = 0.9                   # AdamW beta1
beta2 = 0.999                 # AdamW beta2
grad_clip = 1.0               # clip the global gradient norm at this value; 0 = off
lr_schedule = 'constant'      # 'cosine' | 'linear' | 'constant'
warmup_iters = 5              # linear warmup steps
lr_decay_iters = 100          # decay ends here (cosine, linear)
min_lr = 1e-6                 # floor after decay
# system
device = 'auto'               # 'auto' (cuda > mps > cpu) | 'cpu' | 'cuda' | 'cuda:N' | 'mps'
dtype = 'auto'                # 'auto' (bf16 on GPUs that have it, else fp16; fp32 on CPU) | 'float32' | 'bfloat16' | 'float16'
seed = 1337                   # sampling and prompt order
# -----------------------------------------------------------------------------
CHOICES = {'lr_schedule': LR_SCHEDULES, 'dtype': DTYPES}
config = configure(globals(), choices=CHOICES)
# never replace a trained run
ckpt, config = open_run(out_dir, init_from, overwrite, __file__, config, CHOICES)
globals().update(config)
if ckpt is not None:
    # the flags said 'resume': the run's source
    init_from = config['init_from'] = ckpt['config']['init_from']
if group_size < 2 or kl_coef < 0:
    fail(f'group_size={group_size} must be at least 2 (advantages compare a group) '
         f'and kl_coef={kl_coef} >= 0')

# 1) device, dtype; the policy and the frozen reference, from the starting model; the reward
with cli_errors():
    device = resolve_device(device)
    device_type = device.split(':')[0]
    ptdtype = resolve_dtype(dtype, device)
    ref, tok, _ = load_model(init_from, device)
    policy = model_from_checkpoint(ckpt, os.path.join(out_dir, 'ckpt.pt')) if ckpt else \
        copy.deepcopy(ref)
    scorer = load_reward_model(reward, device)[0] if reward != 'rule' else None
if tok is None:
    fail(f'{init_from} has no tokenizer, so its chat template is unknown; start '
         'from a model that has one')
ref.requires_grad_(False).eval()
# eval(): dropout off; answers are sampled and scored by the same function
policy.to(device).eval()
model_args = asdict(policy.config)

# 2) the prompts: SFT rows, their last (assistant) message the reference answer the rule compares
#    with
folder = os.path.join(data_dir, dataset)
try:
    if dataset in datasets.JSONL_SETS and not os.path.exists(os.path.join(folder, 'meta.json')):
        datasets.prepare(dataset, data_dir=data_dir)
    train_rows, val_rows = (read_sft(os.path.join(folder, f'{s}.jsonl')) for s in ('train', 'val'))
except (OSError, ValueError) as e:
    fail(f'{folder}: {e}; prepare it with `python data.py {dataset}`')
val_rows = val_rows[:eval_prompts]
if not train_rows or not val_rows:
    fail(f'{folder} has no prompts in one of its splits')

def score(rows, answers):
    """The reward of each answer: the rule against its row's answer, or the reward model."""
    if scorer is None:
        return [synthetic.rule_score(r, a) for r, a in zip(rows, answers)]
    return [scorer.score(tok, r['messages'][:-1], [a])[0] for r, a in zip(rows, answers)]

# 3) optimizer, random state, output directory
optimizer = configure_optimizer(policy, weight_decay, learning_rate, (beta1, beta2), device_type)
scaler = torch.amp.GradScaler(device_type, enabled=(ptdtype == torch.float16))
iter_num, best_val_loss = (ckpt['iter_num'], ckpt['best_val_loss']) if ckpt else (0, float('inf'))
# exact resume: the optimizer, the fp16 loss scale, the RNG states (sampling is seeded by the
# iteration)
with cli_errors():
    elapsed0 = restore_training(ckpt, optimizer, scaler) if ckpt else 0.0
ckpt = None
ctx = autocast_ctx(device, ptdtype)
os.makedirs(out_dir, exist_ok=True)
config.update({k: globals()[k] for k in config})
write_json(os.path.join(out_dir, 'config.json'), config)  # atomic: never a half-written config
convs = [r['messages'][:-1] for r in val_rows]
with ctx:  # generation under the run's autocast (bf16 on GPUs), as its forward passes
    ref_answers = answer(ref, tok, convs, max_new_tokens)  # the reference never changes
stops = dict(stop_tokens=tok.chat_stop_tokens or (), stop_strings=tok.stop_strings, tokenizer=tok)

@torch.no_grad()
def estimate():
    """Greedy answers to the held-out prompts: mean reward, exact match, win rate over the
    reference, and KL."""
    with ctx:
        answers = answer(policy, tok, convs, max_new_tokens)
    rewards = score(val_rows, answers)
    em = sum(synthetic.normalize(a) == synthetic.normalize(r['messages'][-1]['content'])
             for r, a in zip(val_rows, answers))
    win, _ = win_rate(val_rows, answers, ref_answers, synthetic.rule_score)
    seqs = [(tok.render_chat(c, add_generation_prompt=True)[0], tok.encode(a) or [0])
            for c, a in zip(convs, answers)]
    x, y = collate_responses(seqs, device)
    with ctx:
        kl = exact_kl(policy, ref, x, y)
    # val_loss: the reward's shortfall, 1 - mean reward, so a falling curve is a rising reward
    # (loss.svg)
    return {'val_loss': 1 - sum(rewards) / len(rewards), 'reward': sum(rewards) / len(rewards),
            'exact_match': em / len(val_rows), 'win_rate': win, 'kl': kl}

def save():
    save_checkpoint(checkpoint_dict(policy, optimizer, model_args, iter_num, best_val_loss, config,
                                    tok.spec(), scaler=scaler, elapsed=timer.elapsed(),
                                    origin=init_from, stage='rl'),
                    os.path.join(out_dir, 'ckpt.pt'))

def update_card(last=None):
    stats = {'iterations': iter_num, 'answers sampled': iter_num * prompts_per_iter * group_size,
             **{f'held-out {k}': last[k] for k in ('reward', 'exact_match', 'win_rate', 'kl')
                if last},
             'training time (s)': round(timer.elapsed(), 1)}
    how = (f"GRPO (groups of {group_size}, kl_coef={kl_coef}) with nanolab's rl.py from "
           f"{init_from}, rewarded by "
           f"{'synthetic.rule_score' if reward == 'rule' else 'the reward model ' + reward} "
           f"on prompts from {dataset}.")
    info = {'dataset': folder, 'train prompts': len(train_rows), 'held-out prompts': len(val_rows)}
    write_model_card(out_dir, os.path.basename(os.path.abspath(out_dir)), how, model_args,
                     policy.num_params(non_embedding=False), info, stats,
                     command=f'python rl.py --init_from=resume --out_dir={out_dir}   # train on')

# Ctrl-C (or SIGTERM): finish the step, write ckpt.pt, exit cleanly; a second Ctrl-C stops at once
stop, restore_signals, timer, metrics = start_loop(out_dir, iter_num, elapsed0, config)
last_eval, saved_at, bad = None, None, False
update_card()

# training loop
while True:
    lr = set_lr(optimizer, get_lr(iter_num, warmup_iters, lr_decay_iters, learning_rate, min_lr,
                                  lr_schedule))

    # evaluate on the held-out prompts and write the checkpoint
    if iter_num % eval_interval == 0 or iter_num >= max_iters or eval_only:
        row = estimate()
        best_val_loss = min(best_val_loss, row['val_loss'])
        print(f"step {iter_num}: reward {row['reward']:.3f}, exact match "
              f"{row['exact_match']:.1%}, win rate {row['win_rate']:.3f}, kl {row['kl']:.4f}")
        update_card(last_eval := row)  # then log, write ckpt.pt (or stop: diverged), loss.svg
        bad, saved_at = end_eval(metrics, row, iter_num, lr, timer, saved_at, out_dir, save,
                                 f'{out_dir}: 1 - held-out reward', eval_only)
    if iter_num >= max_iters or eval_only or stop or bad:
        break

    # 1) sample: a group of answers per prompt, seeded by the iteration (so a resumed run samples
    #    the same)
    rows = [train_rows[i] for i in pair_order(len(train_rows), iter_num, 0, prompts_per_iter, 1,
                                              seed)]
    prompts = [tok.render_chat(r['messages'][:-1], add_generation_prompt=True)[0] for r in rows]
    outs = generate(policy, prompts, max_new_tokens, temperature=temperature,
                    num_samples=group_size, seed=seed * 100003 + iter_num, **stops)
    # 2) score, and compare each answer with its group
    rewards = score([rows[c.prompt_index] for c in outs], [c.text.strip() for c in outs])
    adv = group_advantages(rewards, group_size).to(device)
    # 3) one step on the samples: the policy gradient and the KL penalty
    x, y = collate_responses([(prompts[c.prompt_index], c.tokens or [0]) for c in outs], device)
    with ctx:
        with torch.no_grad():
            ref_logits = ref(x)[0]
        loss, s = grpo_loss(policy(x)[0], ref_logits, y, adv, kl_coef)
    scaler.scale(loss).backward()
    # clip, step
    grad_norm = optimizer_step(policy.parameters(), optimizer, scaler, grad_clip, device_type)

    # timing (evals excluded) and logging
    timer.step()
    if iter_num % log_interval == 0:
        (dt, _), r = timer.window(), sum(rewards) / len(rewards)
        row = {'loss': loss.item(), 'reward': r, **{k: v.mean().item() for k, v in s.items()}}
        print(f"iter {at(iter_num, max_iters, dt)}: loss {row['loss']:.4f}, reward {r:.3f}, "
              f"kl {row['kl']:.4f}, entropy {row['entropy']:.3f}, length "
              f"{row['length']:.1f}, {dt * 1000:.0f} ms/iter")
        metrics.log(iter=iter_num, **row, lr=lr, grad_norm=grad_norm.item(), ms_per_iter=dt * 1000,
                    time=round(timer.elapsed(), 2))
    iter_num += 1

# the end: ckpt.pt holds the last state, whatever stopped the run (unless the last eval wrote it)
save_on_stop(stop and not bad and not eval_only, saved_at, iter_num, save, out_dir)
update_card(last_eval)
metrics.close()  # after the card: the trackers take it
restore_signals()
