# SFT with LoRA (peft, r=16 on every attention and MLP matrix) on Alpaca, from the same TinyStories model as
# configs/sft_alpaca.py; writes a merged checkpoint plus out-sft-lora/adapter/ for peft on the base's Hugging Face
# export. Loss: like sft_alpaca.py, val loss is the measure. Hardware: one GPU, or the 2-core CPU at
# ~8.4 s/iter (~42 min for 300 iters; LoRA saves optimizer memory, not forward/backward time). Measured with
# --device=cpu --max_iters=10 --lr_decay_iters=10 --eval_interval=10 from a 40-iteration CPU run of
# tinystories_15m: 442,368 weights train (2.83%), val loss 9.94 -> 9.78, 150 s in all.
#   python train.py configs/tinystories_15m.py && python finetune.py configs/sft_lora.py
out_dir = 'out-sft-lora'
init_from = 'out-tinystories-15m'
dataset = 'alpaca'
block_size = 512
batch_size = 8
gradient_accumulation_steps = 2
lora_r = 16
lora_alpha = 32.0
lora_dropout = 0.05
lora_targets = 'c_attn,c_proj,c_fc'  # llama's lm_head is untied, so ',lm_head' is allowed too
learning_rate = 1e-3          # LoRA takes a higher rate than full fine-tuning
min_lr = 1e-4
max_iters = 300
lr_decay_iters = 300
warmup_iters = 20
eval_interval = 50
eval_iters = 10
log_interval = 10
em_rows = 0
em_normalize = 'strip'
