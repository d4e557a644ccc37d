# A reward model on the tasks suite's preference pairs (synthetic.py: concise and correct beats filler or wrong), from
# the SFT model of configs/sft_tasks.py. Hardware: 2-core CPU (fp32). Time: ~25 s (measured 25.0 s, ~75 ms/iter).
# Expected: held-out pairwise accuracy ~0.80 (measured 0.798; 0.500 at step 0), margin ~1.6.
#   python train.py configs/tasks_base.py && python finetune.py configs/sft_tasks.py && python reward.py configs/reward_tasks.py
# These are reward.py's defaults, written out so the recipe reads on its own.
out_dir = 'out-reward-tasks'
init_from = 'out-sft-tasks'
dataset = 'tasks'
batch_size = 16
eval_interval = 50
eval_pairs = 500
learning_rate = 1e-4
max_iters = 200
lr_decay_iters = 200
min_lr = 1e-5
warmup_iters = 10
