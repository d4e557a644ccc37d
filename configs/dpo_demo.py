# DPO on Anthropic's hh-rlhf pairs (harmless-base test split, the one stored offline: 2,070 train / 233 held-out
# pairs after formats.py's skips) from the Alpaca SFT model of configs/sft_alpaca.py (15.2M Llama; offline, its
# 4,096-token BPE in 32,000 rows).
# Hardware: one GPU (bf16); its full figures are not measured here, since its SFT input comes from the GPU recipe
# tinystories_15m. The 2-core CPU runs it at ~2.7 s/iter with --batch_size=4 --block_size=256 --eval_pairs=32
# (measured, fp32, 4 iters (--max_iters=4 --lr_decay_iters=4 --eval_interval=4) from a CPU-trained SFT model, 33 s
# in all; 736 of the 2,070 pairs are truncated at that length; reward accuracy on 32 held-out pairs 0.500 -> 0.562).
#   python train.py configs/tinystories_15m.py && python finetune.py configs/sft_alpaca.py && python dpo.py configs/dpo_demo.py
out_dir = 'out-dpo-demo'
init_from = 'out-sft-alpaca'  # sft_alpaca's out_dir
dataset = 'hh_rlhf'           # data/hh_rlhf/{train,val}.jsonl (prepared if missing)
win_rate_prompts = 0          # hh-rlhf has no rule to judge answers by; held-out reward accuracy is the measure
block_size = 512
batch_size = 16
learning_rate = 1e-5          # pretrained-scale models want less than the tiny tasks model's 5e-5
min_lr = 1e-6
max_iters = 130               # one epoch of the 2,070 pairs
lr_decay_iters = 130
eval_interval = 25
eval_pairs = 0                # all 233 held-out pairs
