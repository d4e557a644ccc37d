# Char-level Shakespeare on a laptop CPU: the default (`python train.py` trains exactly this).
# Hardware: 2-core CPU (fp32). Time: ~80-90 s (1000 iterations of 16x64 tokens, ~65-90 ms/iter, plus evals).
# Expected: val loss ~1.69 (measured 1.6927). nanoGPT's documented CPU run (GPT-2 blocks, AdamW, 2000 iterations of
# 12x64 at lr 1e-3) reaches 1.9164 through our train.py, in more wall time, back to back: `python bench.py
# --which=train` (docs/training.md).
#   python train.py configs/shakespeare_char.py
#   python sample.py --init_from=out-shakespeare-char --start="ROMEO:"
# What was tried (each a whole run on this CPU; val loss at the end, 4x4x128 models, block 64):
#   Llama blocks (RoPE, RMSNorm, SwiGLU, 2 kv heads, tied head) vs GPT-2's, AdamW, 1500 x 12: 1.748 vs 1.853
#   Muon for the blocks' matrices vs AdamW, 1500 x 12: 1.648 vs 1.748, but the Newton-Schulz work is ~15-30 ms per
#     step whatever the batch (16 small matrices), so it pays with larger batches: 3 Newton-Schulz steps instead of
#     torch's 5 cost 1.668 vs 1.648 for less of it
#   batch x iterations, Muon: 16 x 1000 (this recipe) 1.6927 in 89 s wall; 16 x 1200 1.6645 (~1.05x nanoGPT's wall);
#     12 x 1500 1.668; 24 x 800 1.689; 24 x 700 1.712; 32 x 600 1.698
#   AdamW at 5e-3 is worse than 3e-3 (1.720 vs 1.695 at 2100 x 12); block 128 reaches 1.646 (1500 x 12) at twice the
#     cost per step; warmup 30 instead of 100: 1.677 vs 1.668; learning rate 6e-3 with Muon: the same as 3e-3
#   compile: steps 7% faster, but 13 s to compile: a net loss for a run this short (bench.py --which=train)
#   positions (python train.py --positions=...): rope (this recipe's) 1.6927, learned 1.7695, sinusoidal 1.9214

out_dir = 'out-shakespeare-char'
eval_interval = 250
eval_iters = 20
log_interval = 10

dataset = 'shakespeare_char'  # prepared from tinyshakespeare on first use
gradient_accumulation_steps = 1
batch_size = 16
block_size = 64

# 4 layers, 4 heads, 128 wide (nanoGPT's CPU model), with Llama blocks
arch = 'llama'
n_layer = 4
n_head = 4
n_kv_head = 2  # two query heads share each key/value head
n_embd = 128
tie_embeddings = True  # as GPT-2 does (Llama's own untied head: 1.79 vs 1.75 with AdamW)
dropout = 0.0
bias = False

optim = 'muon'  # torch.optim.Muon for the blocks' matrices, AdamW for the embedding and the norms
muon_ns_steps = 3
learning_rate = 3e-3  # one rate for both (match_rms_adamw scales Muon's steps to AdamW's size)
max_iters = 1000
lr_decay_iters = 1000
min_lr = 3e-4
beta2 = 0.99  # tokens per iteration are few
warmup_iters = 100

device = 'auto'
compile = False
