# The small-language-model recipe in llama2.c's stories15M shape (Karpathy's TinyStories models): a Llama of
# 6 layers x 288 (6 heads, n_kv_head 6: no GQA; SwiGLU 768 wide; RoPE; tied embeddings) over a 32,000-token
# vocabulary, 15,191,712 parameters (9,216,000 of them the embedding), with a 512-token context, trained on
# TinyStories (Eldan & Li 2023) in a 32k byte-level BPE learned from the stories (nanolab/tokenizer_training.py,
# from the first 100 MB of the train file; ~17 s per 100 MB of synthetic English on the 2-core dev CPU):
#   python data.py tokenizer --input=TinyStoriesV2-GPT4-train.txt --vocab_size=32000 --out_name=tinystories_32k
#   python data.py tinystories --tokenizer=tokenizers/tinystories_32k
#   python train.py configs/tinystories_15m.py
# Preparation time (measured on a slice here, extrapolated): data.py tokenized 100 MB of web-text-shaped
# parquet (25.3M GPT-2 tokens) in 9.7-9.9 s on the 2-core dev CPU, ~2.6M tokens/s, the download apart;
# a 32k tokenizer learned from 100 MB in 17.5 s: TinyStories' ~0.5B tokens prepare in ~4 minutes.
# (the train file: huggingface.co/datasets/roneneldan/TinyStories). Without the two data.py steps, train.py
# prepares `tinystories` itself in our own 4,096-token BPE and the model keeps its 32,000 rows (vocab_size).
# Offline that is the way: the mirror's 4 MB of stories hold only 12,031 BPE merges, too few for a 32k
# tokenizer (`python data.py tokenizer` on them stops, naming vocab_size <= 12292).
# Hardware: one GPU (bf16); 65,536 tokens per iteration. GPU; not measured here.
# CPU runs briefly (measured on the 2-core dev CPU, fp32, offline data subset): with
#   python train.py configs/tinystories_15m.py --device=cpu --compile=False --batch_size=4 \
#       --gradient_accumulation_steps=1 --max_iters=40 --eval_iters=5 --eval_interval=20 --log_interval=5
# a step took 1.8-1.9 s (108 s in all; the log's MFU ~69% of 163 GFLOP/s) and the val loss went from 10.35
# to 9.40: the warmup is 1,000 iterations, so that is its start only.
# subtle: offline mirrors hold a ~1M-token subset of the stories; on it this recipe overfits after a few
# hundred iterations (watch val loss; best.pt keeps the best). With no local copy, `python data.py tinystories`
# streams the full set from the Hugging Face Hub (roneneldan/TinyStories; train.py does not start that itself).

out_dir = 'out-tinystories-15m'
eval_interval = 500
eval_iters = 100
log_interval = 10

dataset = 'tinystories'
gradient_accumulation_steps = 4
batch_size = 32
block_size = 512

arch = 'llama'
n_layer = 6
n_head = 6
n_kv_head = 6
tie_embeddings = True   # as llama2.c's: the 32,000 x 288 embedding is also the output head
optim = 'adamw'
n_embd = 288
vocab_size = 32000      # the model's rows: the 32k tokenizer's ids (a smaller dataset vocabulary leaves some unused)
dropout = 0.0

learning_rate = 1e-3
max_iters = 20000
lr_decay_iters = 20000
min_lr = 1e-4
beta2 = 0.95
warmup_iters = 1000

device = 'auto'
compile = True
