# Char-level Shakespeare on a laptop CPU with nanoGPT's model (GPT-2 blocks, AdamW): the GPT-2 baseline beside the
# CPU default (configs/shakespeare_char.py: Llama blocks with Muon); docs/serving.md ("Serving", "int8 weights")
# measured the model it writes.
# Hardware: 2-core CPU (fp32). Time: ~80 s for 1500 iterations (~48 ms/iter) plus evals.
# Expected: val loss ~1.85 (measured 1.8533). nanoGPT's documented CPU run of the same model
# (2000 iters at lr 1e-3) reaches 1.8857 in 108 s here, run back to back; a 3x higher learning rate gets further in 1500.
#   python train.py configs/shakespeare_gpt2.py
#   python sample.py --init_from=out-shakespeare-gpt2 --start="ROMEO:"

out_dir = 'out-shakespeare-gpt2'
eval_interval = 250
eval_iters = 20
log_interval = 10

dataset = 'shakespeare_char'  # prepared from tinyshakespeare on first use
gradient_accumulation_steps = 1
batch_size = 12
block_size = 64

# nanoGPT's CPU model: 4 layers, 4 heads, 128 wide, no dropout, no biases
arch = 'gpt2'
n_kv_head = 0
tie_embeddings = True
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
bias = False

optim = 'adamw'
learning_rate = 3e-3  # tuned: 1e-3 (nanoGPT) 1.886 at 2000 iters; 2e-3 1.844 at 2000; 3e-3 1.853 at 1500
max_iters = 1500
lr_decay_iters = 1500
min_lr = 3e-4
beta2 = 0.99  # tokens per iteration are few
warmup_iters = 100

device = 'auto'
compile = False  # measured: steps 7% faster, but 13 s to compile: a net loss for a 70 s run (bench.py --which=train)
