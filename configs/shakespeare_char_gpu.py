# nanoGPT's baby GPT on char-level Shakespeare: 6 layers, 6 heads, 384 wide, context 256 (10.7M parameters).
# Hardware: one GPU (bf16). GPU; not measured here. Expected (nanoGPT's figure, one A100): val loss ~1.47
# after 5000 iterations in about 3 minutes; it starts to overfit near the end, so best.pt keeps the best eval.
# On the 2-core dev CPU a step takes ~11-14 s (bench.py --which=train), so this is not a CPU recipe.
#   python train.py configs/shakespeare_char_gpu.py

out_dir = 'out-shakespeare-char-gpu'
eval_interval = 250
eval_iters = 200
log_interval = 10

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256

arch = 'gpt2'
n_kv_head = 0
tie_embeddings = True
optim = 'adamw'
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2
bias = False

learning_rate = 1e-3  # baby networks can afford a higher one
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100

device = 'auto'
compile = True
