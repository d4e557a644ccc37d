"""
Supervised fine-tuning (SFT) of any model source on instruction or chat data, full or LoRA (peft).
The loss counts the assistant's tokens only.

    python finetune.py configs/sft_tasks.py       # CPU: the tasks suite on configs/tasks_base.py's
                                                  # model (docs/post-training.md)
    python finetune.py configs/sft_tasks_lora.py  # the same with LoRA
    python finetune.py configs/sft_alpaca.py      # Alpaca, full; configs/sft_lora.py: with LoRA
    python finetune.py --init_from=gpt2 --dataset=alpaca --device=cuda --block_size=512 --lora_r=16
                                                  # one GPU
    python finetune.py --init_from=resume --out_dir=out-sft-tasks  # go on from ckpt.pt, exactly
    python finetune.py --help                     # every setting, with its default

Data: `dataset` names a folder data_dir/<name>/ with train.jsonl and val.jsonl (`python data.py
alpaca|chat|tasks`; named sets are prepared when missing), or is a JSON/JSONL file of Alpaca,
OpenAI `messages` or ShareGPT `conversations` rows, whose val split is val_fraction of its rows,
picked by a hash of each row. Rows missing fields, or whose last turn is not the assistant's, are
errors naming the file and row; rows with an empty answer are skipped and counted
(formats.read_sft).
Loss: each conversation is rendered with the chat template (tokenizer.py); the target at position t
is token t+1 where the template's mask is 1 (the assistant's content and its end of turn) and -1
(ignored) elsewhere, so the other tokens add nothing to the loss or its gradient
(tests/test_finetune.py). The loss is the mean over targets.
Truncation: a conversation longer than block_size+1 tokens keeps its first block_size+1; one whose
assistant tokens all fall past that is dropped. Both are counted and printed.
Batches: batch_size random conversations, each in its own row, right-padded with target -1. Under
the causal mask no token attends to the padding after it, so attention never crosses examples and
padding changes no loss.

LoRA (lora_r > 0, Hu et al. 2021): peft adds W + (lora_alpha/lora_r) B A to the Linear layers named
in lora_targets (by name or name suffix: c_attn, c_proj, c_fc, attn.c_proj, lm_head); only A and B
train. QLoRA (--quantize_base=nf4, Dettmers et al. 2023): the frozen base's block weights are held in
4 bits by bitsandbytes (CPU or CUDA), A and B in full precision; ckpt.pt still holds full-precision
merged weights (the dequantized base plus the update: lora.py).
Memory: --grad_checkpoint=True recomputes each block's activations in the backward pass
(training.use_grad_checkpoint): the same loss and gradients, less memory, ~1/3 more compute.

Writes to out_dir:
  ckpt.pt       merged weights (LoRA folded in), read by load_model like any run, so sample.py,
                dpo.py and evaluate.py take --init_from=out_dir; plus optimizer, RNG and sampler
                states and the LoRA weights, for resume
  adapter/      LoRA: the adapter in Hugging Face module names, written by peft's save_pretrained:
                with base = its adapter_config.json's base_model_name_or_path (out_dir/base_hf,
                the base model's save_pretrained export, or init_from itself when that is a
                Hugging Face directory or hub name),
                PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                out_dir/adapter) has our logits
  config.json, metrics.jsonl (eval rows: val_loss, exact_match on held-out rows), loss.svg,
  README.md
A LoRA run resumes from its init_from, which must not have changed (a checksum of its weights is
compared).
"""
import json
import os
from collections import Counter
from dataclasses import asdict

import torch

from nanolab import datasets, synthetic
from nanolab.checkpoint import load_model, model_from_checkpoint, save_checkpoint
from nanolab.configurator import cli_errors, configure, fail
from nanolab.device import DTYPES, autocast_ctx, resolve_device, resolve_dtype
from nanolab.files import write_json
from nanolab.formats import ROLES, in_val, read_rows, read_sft
from nanolab.lora import QUANTIZE, add_lora, lora_layers, lora_state, n_weights
from nanolab.metrics import exact_match
from nanolab.progress import at  # i/N (p%), ETA
from nanolab.tokenizer import from_spec
from nanolab.tracking import write_model_card
from nanolab.training import (LR_SCHEDULES, checkpoint_dict, configure_optimizer, end_eval, get_lr,
                              open_run, optimizer_step, restore_training, save_on_stop, set_lr,
                              start_loop, use_grad_checkpoint)

# -----------------------------------------------------------------------------
# defaults: the CPU run of configs/sft_tasks.py (see that file for the measured figures)
# I/O
out_dir = 'out-sft-tasks'     # checkpoint, adapter, metrics, loss curve and model card go here
eval_interval = 200           # evaluate (val loss, exact match) and write ckpt.pt every this many iterations, and at the end
log_interval = 10             # print and log a metrics row every this many iterations
eval_iters = 10               # batches per split for each loss estimate
eval_only = False             # evaluate once and exit
keep_checkpoints = False      # also keep a copy of each eval's checkpoint as out_dir/checkpoints/ckpt_<iter>.pt (for evaluate.py --checkpoints)
init_from = 'out-tasks-base'  # 'resume' (out_dir/ckpt.pt) | a model source: out_dir, .pt, HF dir, hub name
overwrite = False             # True: a fresh run may replace the trained run in out_dir (its files are lost)
mlflow_log = False            # log params, metrics and artifacts to MLflow (MLFLOW_TRACKING_URI, else ./mlflow.db)
wandb_log = False             # the same to Weights & Biases (WANDB_MODE=offline keeps it on disk)
wandb_project = 'nanolab'     # the W&B project and the MLflow experiment
wandb_run_name = ''           # the run's name in both; '' = out_dir's name
# data
dataset = 'tasks'             # data_dir/<dataset>/{train,val}.jsonl (named sets are prepared), or a .json/.jsonl file
data_dir = 'data'             # where datasets live
val_fraction = 0.05           # a file dataset: share of its rows held out for validation
batch_size = 32               # conversations per micro-batch
gradient_accumulation_steps = 1  # micro-batches per optimizer step
block_size = 0                # max tokens per conversation (see Truncation); 0 = the model's context
# exact match on held-out rows, at every eval (metrics.exact_match: greedy, the chat template)
em_rows = 500                 # val rows to score; 0 = off
em_max_new_tokens = 16        # answer length limit, tokens
em_normalize = 'tasks'        # answers compare after: 'strip' (whitespace) | 'tasks' (also drops the tasks suite's filler)
# LoRA (peft); lora_r = 0 is full fine-tuning
lora_r = 0                    # rank of the update; 0 = off (all weights train)
lora_alpha = 16.0             # the update is scaled by lora_alpha / lora_r
lora_dropout = 0.0            # dropout on the LoRA input
lora_targets = 'c_attn,c_proj,c_fc'  # comma-separated Linear module names (or suffixes like attn.c_proj; lm_head)
quantize_base = ''            # QLoRA: 'nf4' = the frozen base's block weights in 4 bits (bitsandbytes, CPU or CUDA; needs lora_r > 0) | '' = as loaded
# AdamW optimizer and schedule
learning_rate = 2e-3          # peak learning rate
max_iters = 1000              # total optimizer steps
weight_decay = 0.0            # on >=2-D weights only
beta1 = 0.9                   # AdamW beta1
beta2 = 0.99                  # AdamW beta2
grad_clip = 1.0               # clip the global gradient norm at this value; 0 = off
lr_schedule = 'cosine'        # 'cosine' | 'linear' | 'constant'
warmup_iters = 30             # linear warmup steps
lr_decay_iters = 1000         # decay ends here (~max_iters)
min_lr = 1e-4                 # floor after decay
# system
device = 'auto'               # 'auto' (cuda > mps > cpu) | 'cpu' | 'cuda' | 'cuda:N' | 'mps'
dtype = 'auto'                # 'auto' (bf16/fp16 on GPUs, fp32 on CPU; a LoRA base stored in bf16 stays bf16 where the CPU has bf16) | 'float32' | 'bfloat16' | 'float16'
grad_checkpoint = False       # recompute each block's activations in backward: less memory, ~1/3 more compute
seed = 1337                   # LoRA init, data order and dropout
# -----------------------------------------------------------------------------
CHOICES = {'lr_schedule': LR_SCHEDULES, 'em_normalize': ('strip', 'tasks'), 'dtype': DTYPES,
           'quantize_base': QUANTIZE}
config = configure(globals(), choices=CHOICES)

# never replace a trained run; resume = the run's saved config, then this command line on top (so
# `--max_iters=...` extends a run); the adapter's shape is fixed once it is trained
ckpt, config = open_run(out_dir, init_from, overwrite, __file__, config, CHOICES,
                        fixed=('lora_r', 'lora_alpha', 'lora_targets'))
globals().update(config)
if quantize_base and not lora_r:
    fail(f'quantize_base={quantize_base!r} (QLoRA) trains LoRA adapters on a frozen 4-bit base; '
         'give --lora_r (e.g. 16), or leave quantize_base off')

# -----------------------------------------------------------------------------
# the data: conversations -> (inputs, targets) of the chat template

def read_conversations(path, counts):
    """formats.read_sft's rows, after refusing a conversation whose last turn is not the
    assistant's: an unanswered prompt at the end is a broken row, not something to train on."""
    for where, row in read_rows(path):
        turns = row.get('messages', row.get('conversations')) if isinstance(row, dict) else None
        if isinstance(turns, list) and turns and isinstance(turns[-1], dict):
            # unknown roles: read_sft's error
            role = ROLES.get(turns[-1].get('role', turns[-1].get('from')))
            if role not in (None, 'assistant'):
                raise ValueError(f"{where}: the last turn is the {role}'s, not the "
                                 "assistant's; end the conversation with the assistant's "
                                 "answer, or drop its unanswered last turn")
    return read_sft(path, counts)

def load_rows():
    """(train rows, val rows, description) of `dataset`: a prepared folder, or a file split by
    val_fraction."""
    counts = Counter()
    if dataset.removesuffix('.gz').endswith(('.json', '.jsonl')) and not os.path.isfile(dataset):
        fail(f'dataset file {dataset} does not exist; give a JSON/JSONL file, or a '
             f'folder name under {data_dir}/')
    if os.path.isfile(dataset):
        rows = read_conversations(dataset, counts)
        val = [in_val(json.dumps(r, sort_keys=True).encode(), val_fraction, seed) for r in rows]
        train_rows, val_rows = [r for r, v in zip(rows, val) if not v], \
            [r for r, v in zip(rows, val) if v]
        where = dataset
    else:
        where = os.path.join(data_dir, dataset)
        if dataset in datasets.JSONL_SETS and not os.path.exists(os.path.join(where, 'meta.json')):
            datasets.prepare(dataset, data_dir=data_dir)
        meta = datasets.load_meta(where)
        if meta.get('format') != 'sft':
            fail(f"{where} is a {'token stream (pretrain on it with train.py)' if 'train_tokens' in meta else 'preference set (use dpo.py)'}, "
                 "not SFT data; give an SFT folder or file")
        train_rows, val_rows = (read_conversations(os.path.join(where, f'{s}.jsonl'), counts)
                                for s in ('train', 'val'))
    if not train_rows or not val_rows:
        fail(f'{where}: {len(train_rows)} train and {len(val_rows)} val conversations; both '
             'splits need some (add rows, or raise val_fraction)')
    return train_rows, val_rows, where

def encode(rows, split, counts):
    """[(x, y)] token lists: x = the template's tokens, y = the next token where the mask is 1,
    else -1. Applies the truncation rule (module docstring) and counts what it cut and dropped."""
    out = []
    for n, r in enumerate(rows):
        try:
            ids, mask = tok.render_chat(r['messages'])
        except ValueError as e:
            fail(f'{split} conversation {n + 1}: {e}')
        x, y = ids[:-1], [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
        if len(x) > block_size:
            x, y = x[:block_size], y[:block_size]
            counts[f'{split}_truncated'] += 1
        if all(t == -1 for t in y):
            counts[f'{split}_dropped_no_answer_in_block'] += 1
            continue
        out.append((x, y))
    return out

def get_batch(examples, idx):
    """Conversations idx as right-padded (B, T) inputs and targets (pad: input 0, target -1), on
    the device."""
    T = max(len(examples[i][0]) for i in idx)
    x, y = torch.zeros(len(idx), T, dtype=torch.long), \
        torch.full((len(idx), T), -1, dtype=torch.long)
    for b, i in enumerate(idx):
        xi, yi = examples[i]
        x[b, :len(xi)], y[b, :len(yi)] = torch.tensor(xi), torch.tensor(yi)
    return x.to(device), y.to(device)

# -----------------------------------------------------------------------------
# LoRA (lora.add_lora injects it): the adapter in Hugging Face names

def lora_to_hf(model):
    """Our LoRA weights under Hugging Face module names -> {peft key: tensor}. gpt2: HF GPT-2 has
    our names. llama: our fused c_attn (q|k|v) and c_fc (gate|up) are HF's separate projections,
    which share A and split B by rows, since the rows of B A are (rows of B) A; c_proj is o_proj in
    attention and down_proj in the MLP."""
    c, out = model.config, {}
    for name, m in lora_layers(model):
        A, B = m.lora_A['default'].weight.detach(), m.lora_B['default'].weight.detach()
        if c.arch == 'gpt2' or name == 'lm_head':
            parts = [(name, B)]
        else:
            h = f"model.layers.{name.split('.')[2]}."
            if name.endswith('attn.c_attn'):
                hs = c.head_size
                parts = zip([h + 'self_attn.q_proj', h + 'self_attn.k_proj',
                             h + 'self_attn.v_proj'],
                            B.split([c.n_head * hs, c.n_kv_head * hs, c.n_kv_head * hs]))
            elif name.endswith('attn.c_proj'):
                parts = [(h + 'self_attn.o_proj', B)]
            elif name.endswith('mlp.c_fc'):
                parts = zip([h + 'mlp.gate_proj', h + 'mlp.up_proj'],
                            B.split([c.ffn_hidden, c.ffn_hidden]))
            else:
                parts = [(h + 'mlp.down_proj', B)]
        for hf_name, b in parts:
            out[f'base_model.model.{hf_name}.lora_A.weight'] = A.clone()
            out[f'base_model.model.{hf_name}.lora_B.weight'] = b.clone()
    return out

def save_adapter(model, base):
    """out_dir/adapter, by peft's save_pretrained on the Hugging Face model `base` with our LoRA
    weights loaded."""
    import warnings
    import transformers
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # peft calls a deprecated API
    warnings.filterwarnings('ignore', category=FutureWarning, module='transformers')
    sd = lora_to_hf(model)
    modules = sorted({k.split('.lora_')[0].removeprefix('base_model.model.') for k in sd})
    hf = transformers.AutoModelForCausalLM.from_pretrained(base)
    # short names when they pick exactly these modules
    leaves = sorted({n.rsplit('.', 1)[-1] for n in modules})
    exact = {n for n, _ in hf.named_modules() if n.rsplit('.', 1)[-1] in leaves} == set(modules)
    cfg = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                     target_modules=leaves if exact else modules,
                     # HF GPT-2's Conv1D stores weights as (in, out)
                     fan_in_fan_out=model.config.arch == 'gpt2')
    peft_model = get_peft_model(hf, cfg)
    result = set_peft_model_state_dict(peft_model, sd)
    if [k for k in result.unexpected_keys if 'lora_' in k]:
        raise RuntimeError(f'adapter keys {result.unexpected_keys[:3]} found no module in {base}')
    # save_embedding_layers=False: lm_head's own weight is frozen (the base has it); peft would
    # copy it by default
    peft_model.save_pretrained(os.path.join(out_dir, 'adapter'), save_embedding_layers=False)

def checksum(model):
    return float(sum(p.double().sum() for p in model.state_dict().values()))

# -----------------------------------------------------------------------------
# set-up: device, model, data, LoRA, optimizer

with cli_errors():
    device = resolve_device(device)
    device_type = device.split(':')[0]
    ptdtype = resolve_dtype(dtype, device)
    # 1) the model and its tokenizer: a finished SFT run resumed, or any model source
    iter_num, best_val_loss, origin = 0, float('inf'), init_from
    if ckpt is not None and 'lora' not in ckpt:
        raw_model, tok = model_from_checkpoint(ckpt, out_dir), from_spec(ckpt['tokenizer'])
    else:
        origin = ckpt['lora']['base'] if ckpt else init_from
        # a LoRA base is frozen: a bf16 model stays in bf16 where the CPU computes it (half the
        # memory: device.resolve_dtype); the weights that train are fp32 either way
        raw_model, tok, _ = load_model(origin, 'cpu', 'auto' if lora_r > 0 and dtype == 'auto'
                                       else torch.float32)
    if ckpt is not None:
        iter_num, best_val_loss = ckpt['iter_num'], ckpt['best_val_loss']
        origin = ckpt.get('origin', origin)
    if tok is None:
        fail(f"{origin} has no tokenizer, and SFT needs its chat template; give a source with one "
             "(a nanolab run, or a Hugging Face directory with tokenizer files)")
    # 2) the data
    train_rows, val_rows, where = load_rows()
if tok.vocab_size > raw_model.config.vocab_size:
    fail(f'the tokenizer has {tok.vocab_size} tokens but the model only '
         f'{raw_model.config.vocab_size}; they do not belong together')
block_size = block_size or raw_model.config.block_size
if block_size > raw_model.config.block_size:
    fail(f"block_size={block_size} is longer than the model's context "
         f"({raw_model.config.block_size}); lower block_size")
counts = Counter()
train_data, val_data = encode(train_rows, 'train', counts), encode(val_rows, 'val', counts)
if not train_data or not val_data:
    fail(f'no conversation of {where} has an answer within block_size={block_size} tokens '
         f'({dict(counts)}); raise block_size')
n_tokens = sum(len(x) for x, _ in train_data)
print(f'{where}: {len(train_data):,} train conversations ({n_tokens:,} '
      f'tokens, {sum(t != -1 for _, y in train_data for t in y):,} of them '
      f'targets), {len(val_data):,} val' +
      (f'; truncation: {dict(counts)}' if counts else ''))

# 3) LoRA, or all weights; the base of a LoRA run is exported for peft users (and checked on
#    resume)
model_args = asdict(raw_model.config)
base_sum = checksum(raw_model) if lora_r > 0 else None
if ckpt is not None and lora_r > 0 and base_sum != ckpt['lora']['base_sum']:
    fail(f"the base model {origin} has changed since this LoRA run started, so it can't resume "
         "exactly; restore it, or start a new run")
# else a HF directory or hub name
ours = origin.endswith('.pt') or os.path.exists(os.path.join(origin, 'ckpt.pt'))
# the HF model the adapter applies to
lora_base = os.path.join(out_dir, 'base_hf') if ours else origin
os.makedirs(out_dir, exist_ok=True)
if lora_r > 0 and ckpt is None and lora_base.endswith('base_hf'):
    raw_model.save_pretrained(lora_base, tokenizer=tok)
if lora_r > 0:
    torch.manual_seed(seed)  # LoRA's A is random (B starts at 0, so the model starts as the base)
    with cli_errors():
        raw_model = add_lora(raw_model, lora_r, lora_alpha, lora_dropout, lora_targets,
                             quantize_base, device)
    if ckpt is not None:
        raw_model.load_state_dict(ckpt['lora']['state'], strict=False)
if grad_checkpoint:
    use_grad_checkpoint(raw_model)
raw_model.to(device).train()
n_all, n_train = n_weights(raw_model), \
    sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
print(f'trainable params: {n_train:,} of {n_all:,} ({100 * n_train / n_all:.2f}%)' +
      (f', LoRA r={lora_r} on {lora_targets} ({len(lora_layers(raw_model))} layers' +
       (f', {quantize_base} base)' if quantize_base else ')') if lora_r > 0
       else ', full fine-tuning'))
config.update({k: globals()[k] for k in config})
write_json(os.path.join(out_dir, 'config.json'), config)  # atomic: never a half-written config

optimizer = configure_optimizer(raw_model, weight_decay, learning_rate, (beta1, beta2),
                                device_type)
scaler = torch.amp.GradScaler(device_type, enabled=(ptdtype == torch.float16))
sampler = torch.Generator().manual_seed(seed)  # draws the training conversations
elapsed0 = 0.0
if ckpt is not None:
    with cli_errors():
        # exact resume: data order, dropout, everything
        elapsed0 = restore_training(ckpt, optimizer, scaler, sampler)
else:
    torch.manual_seed(seed)
ckpt = None  # free the memory
ctx = autocast_ctx(device, ptdtype)
normalize = synthetic.normalize if em_normalize == 'tasks' else str.strip

@torch.no_grad()
def estimate_loss():
    """Mean loss over eval_iters batches per split, from a generator re-seeded each time (the same
    rows every eval)."""
    out = {}
    raw_model.eval()
    for split, examples in (('train', train_data), ('val', val_data)):
        gen = torch.Generator().manual_seed(1234)
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            with ctx:
                losses[k] = raw_model(*get_batch(examples, torch.randint(
                    len(examples), (batch_size,), generator=gen).tolist()))[1].item()
        out[split] = losses.mean().item()
    raw_model.train()
    return out

def save():
    """Atomically write out_dir/ckpt.pt: merged weights for every loader, and what resume needs."""
    ck = checkpoint_dict(raw_model, optimizer, model_args, iter_num, best_val_loss, config,
                         tok.spec(), sampler=sampler, scaler=scaler, elapsed=timer.elapsed(),
                         origin=origin, stage='sft')
    if lora_r > 0:
        ck['lora'] = {'base': origin, 'base_sum': base_sum, 'adapter_base': lora_base,
                      'state': lora_state(raw_model)}
    save_checkpoint(ck, os.path.join(out_dir, 'ckpt.pt'))
    if keep_checkpoints:
        save_checkpoint(ck, os.path.join(out_dir, 'checkpoints', f'ckpt_{iter_num}.pt'))

def update_card(last_eval=None):
    stats = {'iterations': iter_num}
    if last_eval:
        stats.update({k.replace('_', ' '): last_eval[k]
                      for k in ('train_loss', 'val_loss', 'exact_match') if k in last_eval})
    stats['training time (s)'] = round(timer.elapsed(), 1)
    how = (f"A {model_args['arch']} model fine-tuned from {origin} with nanolab's finetune.py on "
           f"{dataset} "
           f"({f'LoRA r={lora_r} on {lora_targets}, merged' if lora_r > 0 else 'full fine-tuning'}), "
           "loss on the assistant's tokens only.")
    info = {'dataset': where, 'tokenizer': tok.kind, 'train conversations': len(train_data),
            'val conversations': len(val_data)}
    evals = (f"Exact match on {min(em_rows, len(val_rows))} held-out conversations of {dataset}: "
             f"{last_eval['exact_match']:.1%} (greedy, `metrics.exact_match`, "
             f"normalize={em_normalize})."
             if last_eval and 'exact_match' in last_eval else None)
    write_model_card(out_dir, os.path.basename(os.path.abspath(out_dir)), how, model_args, n_all,
                     info, stats,
                     command='python finetune.py --init_from=resume '
                             f'--out_dir={out_dir}   # train on',
                     evals=evals)

# Ctrl-C (or SIGTERM): finish the step, write ckpt.pt, exit cleanly; a second Ctrl-C stops at once
stop, restore_signals, timer, metrics = start_loop(out_dir, iter_num, elapsed0, config)
update_card()

# -----------------------------------------------------------------------------
# training loop
saved_at, last_eval, bad = None, None, False
while True:

    # this iteration's learning rate
    lr = set_lr(optimizer, get_lr(iter_num, warmup_iters, lr_decay_iters, learning_rate, min_lr,
                                  lr_schedule))

    # evaluate: loss on both splits, exact match on held-out rows; write the checkpoint
    if iter_num % eval_interval == 0 or iter_num >= max_iters or eval_only:
        losses = estimate_loss()
        best_val_loss = min(best_val_loss, losses['val'])
        row = dict(train_loss=losses['train'], val_loss=losses['val'])
        if em_rows > 0:
            with ctx:  # generation under the run's autocast (bf16 on GPUs), as its forward passes
                row['exact_match'], _ = exact_match(raw_model, tok, val_rows[:em_rows],
                                                    em_max_new_tokens, normalize=normalize)
        print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}" +
              (f", exact match {row['exact_match']:.1%}" if em_rows > 0 else ''))
        update_card(last_eval := row)  # then log, write ckpt.pt (or stop: diverged), loss.svg
        bad, saved_at = end_eval(metrics, row, iter_num, lr, timer, saved_at, out_dir, save,
                                 f'{out_dir}: SFT on {dataset}', eval_only)
    if iter_num >= max_iters or eval_only or stop or bad:
        break

    # forward backward update, with gradient accumulation
    idx = torch.randint(len(train_data), (gradient_accumulation_steps * batch_size,),
                        generator=sampler).tolist()
    loss_sum, n_tokens = 0.0, 0
    for micro_step in range(gradient_accumulation_steps):
        X, Y = get_batch(train_data, idx[micro_step * batch_size:(micro_step + 1) * batch_size])
        with ctx:
            _, loss = raw_model(X, Y)
            # the gradients add up to those of the mean loss
            loss = loss / gradient_accumulation_steps
        loss_sum = loss_sum + loss.detach()
        scaler.scale(loss).backward()
        n_tokens += X.numel()
    # clip, step
    grad_norm = optimizer_step(raw_model.parameters(), optimizer, scaler, grad_clip, device_type)

    # timing and logging
    timer.step(n_tokens)
    if iter_num % log_interval == 0:
        (dt, tps), lossf, gnorm = timer.window(), loss_sum.item(), grad_norm.item()
        print(f'iter {at(iter_num, max_iters, dt)}: loss {lossf:.4f}, lr {lr:.2e}, grad norm '
              f'{gnorm:.3f}, {dt * 1000:.2f} ms/iter, {tps:,.0f} tok/s')
        metrics.log(iter=iter_num, loss=lossf, lr=lr, grad_norm=gnorm, ms_per_iter=dt * 1000,
                    tokens_per_sec=tps, time=round(timer.elapsed(), 2))
    iter_num += 1

# the end: ckpt.pt holds the last state, whatever stopped the run; a LoRA run writes its adapter
save_on_stop(stop and not bad, saved_at, iter_num, save, out_dir)
if lora_r > 0 and not eval_only and not bad:
    save_adapter(raw_model, lora_base)
    print(f'wrote {out_dir}/adapter (peft, Hugging Face names) for the base model {lora_base}')
update_card(last_eval)
metrics.close()  # after the card: the trackers take it
restore_signals()  # leave the caller's Ctrl-C handling as it was
