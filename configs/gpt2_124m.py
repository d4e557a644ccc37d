# GPT-2 small (124M) reproduction on OpenWebText, nanoGPT's recipe: 12 layers x 768, context 1024,
# ~0.5M tokens per iteration (12 x 1024 x 40 micro-batches), 600k iterations = ~300B tokens.
# Hardware: several GPUs with DDP; GPU; not measured here. Expected (nanoGPT's figure, 8x A100 40GB,
# ~4 days): val loss ~2.85. Data: OpenWebText (Gokaslan & Cohen 2019, ~9B GPT-2 tokens: ~18 GB of .bin),
# streamed from the Hugging Face Hub (Skylion007/openwebtext, or a local copy of its shards in
# $NANOLAB_DATA_MIRROR/hub/) by data.py, which resumes where it stopped; train.py never starts that itself:
#   python data.py openwebtext
# Preparation time (measured on a slice here, extrapolated): data.py tokenized 100 MB of OpenWebText-shaped
# parquet (25.3M GPT-2 tokens) in 9.7-9.9 s on the 2-core dev CPU, ~2.6M tokens/s, the download apart:
# OpenWebText's ~9B tokens (~40 GB of text) take ~1 hour of tokenizing, plus the download (compressed shards).
#   torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_124m.py
# gradient_accumulation_steps counts over all processes: 8 GPUs do 5 micro-steps each.

out_dir = 'out-gpt2-124m'
eval_interval = 1000
eval_iters = 200
log_interval = 10

dataset = 'openwebtext'
gradient_accumulation_steps = 5 * 8
batch_size = 12
block_size = 1024

arch = 'gpt2'
n_kv_head = 0
tie_embeddings = True
optim = 'adamw'
n_layer = 12
n_head = 12
n_embd = 768
vocab_size = 50304  # GPT-2's 50257 (+4 chat tokens) padded to a multiple of 64 for faster matmuls
dropout = 0.0
bias = False

learning_rate = 6e-4
max_iters = 600000
lr_decay_iters = 600000
min_lr = 6e-5
beta2 = 0.95
warmup_iters = 2000
weight_decay = 0.1

device = 'auto'
compile = True
