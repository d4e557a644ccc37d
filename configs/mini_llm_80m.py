# A mini LLM: Llama-style, 16 layers x 384 (deep and thin, as MobileLLM argues for small models), 6 query
# heads sharing 2 key-value heads (GQA), RoPE, SwiGLU 1920 wide, untied embeddings over GPT-2's vocabulary
# padded to 50304: 80.3M parameters (41.7M outside the embeddings; counted with model.py).
# Data: FineWeb-Edu (sample-10BT, ~10B GPT-2 tokens of web pages rated educational), streamed from the
# Hugging Face Hub. Why it and not C4: a general LLM wants general text, not stories, and the FineWeb
# paper (Penedo et al. 2024) reports higher knowledge and reasoning scores (MMLU, ARC) for models trained on
# FineWeb-Edu than on C4 for the same number of tokens. This run reads 30000 x 131,072 = 3.9B tokens, so 4B
# of them (1% held out) serve it without repeats: ~8 GB of .bin (train.py does not start the streaming):
#   python data.py fineweb_edu --max_tokens=4000000000 --val_fraction=0.01
# Preparation time (measured on a slice here, extrapolated): data.py tokenized 100 MB of OpenWebText-shaped
# parquet (25.3M GPT-2 tokens) in 9.7-9.9 s on the 2-core dev CPU, ~2.6M tokens/s, the download apart:
# the 4B-token slice (~17 GB of text) takes ~26 minutes of tokenizing, plus the download.
#   python train.py configs/mini_llm_80m.py
# Hardware: one GPU (bf16, ~131k tokens per iteration); GPU; not measured here, so no loss is promised.
# Several GPUs: torchrun --standalone --nproc_per_node=8 train.py configs/mini_llm_80m.py

out_dir = 'out-mini-llm-80m'
eval_interval = 1000
eval_iters = 100
log_interval = 10

dataset = 'fineweb_edu'
gradient_accumulation_steps = 8
batch_size = 16
block_size = 1024

arch = 'llama'
n_layer = 16
n_head = 6
n_kv_head = 2
n_embd = 384
ffn_hidden = 1920
vocab_size = 50304  # GPT-2's 50257 (+4 chat tokens) padded to a multiple of 64 for faster matmuls
tie_embeddings = False
optim = 'adamw'
dropout = 0.0

learning_rate = 6e-4
max_iters = 30000
lr_decay_iters = 30000
min_lr = 6e-5
beta2 = 0.95
warmup_iters = 1000
weight_decay = 0.1

device = 'auto'
compile = True
