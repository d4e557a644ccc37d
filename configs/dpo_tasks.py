# DPO on the tasks suite's preference pairs (synthetic.py: concise and correct beats filler or wrong), from the SFT
# model of configs/sft_tasks.py: the last step of the post-training demonstration. Hardware: 2-core CPU (fp32).
# Time: ~1-2 min (measured 107 s with other jobs on the cores). Expected (measured): held-out reward accuracy
# 0.500 at step 0 -> 0.940, win rate over the SFT model 0.902 (synthetic.rule_score, 200 held-out prompts), kl 1.20
# nats; held-out exact match 94.2% -> 89.8% (python evaluate.py --init_from=out-dpo-tasks --benchmark=tasks).
#   python train.py configs/tasks_base.py && python finetune.py configs/sft_tasks.py && python dpo.py configs/dpo_tasks.py
# These are dpo.py's defaults, written out so the recipe reads on its own.
out_dir = 'out-dpo-tasks'
init_from = 'out-sft-tasks'   # sft_tasks' out_dir
dataset = 'tasks'             # data/tasks/pref_{train,val}.jsonl (prepared if missing)
win_rate_prompts = 200        # held-out prompts, judged by synthetic.rule_score
beta = 0.1
learning_rate = 2e-5
min_lr = 2e-6
max_iters = 150
lr_decay_iters = 150
