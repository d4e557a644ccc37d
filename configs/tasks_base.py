# The base model of the post-training demonstration (docs/post-training.md): a 4-layer char-level GPT pretrained
# on Shakespeare and WikiText-2 (for its digits), over a vocabulary that also spells the tasks suite (data.py
# tasks_base). Hardware: 2-core CPU (fp32). Time: ~3 min (measured 177 s, ~80 ms/iter). Expected: val loss ~1.70
# (measured 1.7084); held-out exact match on the suite 0.0%. Then: python finetune.py configs/sft_tasks.py
out_dir = 'out-tasks-base'
dataset = 'tasks_base'
block_size = 128              # the SFT conversations are up to ~75 chars
batch_size = 12
arch = 'gpt2'                 # the blocks, optimizer and head it was measured with (train.py's CPU default is
n_kv_head = 0                 # Llama + Muon)
tie_embeddings = True
optim = 'adamw'
n_layer = 4
n_head = 4
n_embd = 128
max_iters = 2000
lr_decay_iters = 2000
eval_interval = 250
