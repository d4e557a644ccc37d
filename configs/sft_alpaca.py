# SFT, all weights, on Alpaca (data.py alpaca; offline: the 999-row alpaca_en_demo.json stand-in) from the
# TinyStories model of configs/tinystories_15m.py, whose BPE has the chat template's special tokens. A 15M model
# learns Alpaca's format, not its knowledge: read val loss, not exact match (off here). Hardware: one GPU, or the
# 2-core CPU at ~7.8-8.4 s/iter (~40 min for the 300 iters; measured with --device=cpu --max_iters=20
# --lr_decay_iters=20 --eval_interval=20 from a 40-iteration CPU run of tinystories_15m (its header's command): val
# loss 9.94 -> 8.49 in 20 iters, 222 s in all, peak RSS 3.8 GB).
#   python train.py configs/tinystories_15m.py && python finetune.py configs/sft_alpaca.py
#   python sample.py --init_from=out-sft-alpaca --chat=True
out_dir = 'out-sft-alpaca'
init_from = 'out-tinystories-15m'  # any model source with a BPE tokenizer: --init_from=gpt2 (online) works too
dataset = 'alpaca'            # prepared from the mirror or the network on first use
block_size = 512              # Alpaca rows are ~150 tokens (median), up to ~800: longer ones are truncated
batch_size = 8
gradient_accumulation_steps = 2
learning_rate = 3e-4
min_lr = 3e-5
max_iters = 300
lr_decay_iters = 300
warmup_iters = 20
eval_interval = 50
eval_iters = 10
log_interval = 10
em_rows = 0                   # exact match means little on open-ended answers
em_normalize = 'strip'
