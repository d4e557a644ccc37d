# The small-language-model recipe: a 15.7M-parameter Llama (8 layers x 384, 6 query / 2 key-value heads,
# SwiGLU, RoPE) with a 512-token context on TinyStories (Eldan & Li 2023), in our own 4096-token
# byte-level BPE (python data.py tinystories; train.py prepares it on first use, ~10 s).
# Hardware: one GPU (bf16); 65,536 tokens per iteration. GPU; not measured here.
# CPU runs briefly (measured on the 2-core dev CPU, fp32, offline data subset): with
#   python train.py configs/tinystories_15m.py --device=cpu --compile=False --batch_size=4 \
#       --gradient_accumulation_steps=1 --max_iters=40 --eval_iters=5 --eval_interval=20 --log_interval=5
# a step takes ~1.6 s (~85 s in all) and the val loss goes from 8.39 to 7.22 (still warming up).
# subtle: offline mirrors hold a ~1M-token subset of the stories; on it this recipe overfits after a few
# hundred iterations (watch val loss; best.pt keeps the best). Online, data.py fetches the full ~470M tokens.
#   python train.py configs/tinystories_15m.py

out_dir = 'out-tinystories-15m'
eval_interval = 500
eval_iters = 100
log_interval = 10

dataset = 'tinystories'
gradient_accumulation_steps = 4
batch_size = 32
block_size = 512

arch = 'llama'
n_layer = 8
n_head = 6
n_kv_head = 2
tie_embeddings = False  # Llama's own: untied
optim = 'adamw'
n_embd = 384
dropout = 0.0

learning_rate = 1e-3
max_iters = 20000
lr_decay_iters = 20000
min_lr = 1e-4
beta2 = 0.95
warmup_iters = 1000

device = 'auto'
compile = True
