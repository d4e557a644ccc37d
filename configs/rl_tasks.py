# GRPO on the tasks suite's prompts, rewarded by its rule (synthetic.rule_score: concise and correct 1, correct with the
# filler 0.5, wrong 0), from the SFT model of configs/sft_tasks.py. Hardware: 2-core CPU (fp32). Time: ~40 s
# (measured 39.8 s, ~0.3 s/iter). Expected (measured, 200 held-out prompts, greedy): mean reward 0.477 -> 0.932,
# exact match 93.5% -> 93.5%, win rate over the SFT model 0.955, kl 0.42 nats.
#   python train.py configs/tasks_base.py && python finetune.py configs/sft_tasks.py && python rl.py configs/rl_tasks.py
# These are rl.py's defaults, written out so the recipe reads on its own.
out_dir = 'out-rl-tasks'
init_from = 'out-sft-tasks'
dataset = 'tasks'
reward = 'rule'
prompts_per_iter = 8
group_size = 8
max_new_tokens = 16
temperature = 1.0
kl_coef = 0.05
learning_rate = 3e-5
max_iters = 100
eval_interval = 20
eval_prompts = 200
