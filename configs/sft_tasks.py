# SFT, all weights, on the tasks suite (synthetic.py) from the base model of configs/tasks_base.py: step 2 of the
# post-training demonstration (`python finetune.py` with no arguments runs exactly this). Hardware: 2-core CPU.
# Time: ~2-3 min (measured 157 s). Expected: held-out exact match ~94% (measured 94.2%; the base: 0.0%, the
# iter 0 row), val loss ~0.10 (measured 0.1009).
#   python train.py configs/tasks_base.py && python finetune.py configs/sft_tasks.py
#   python sample.py --init_from=out-sft-tasks --chat=True
out_dir = 'out-sft-tasks'
init_from = 'out-tasks-base'  # tasks_base's out_dir
dataset = 'tasks'             # data/tasks/{train,val}.jsonl, prepared on first use
em_normalize = 'tasks'        # exact match ignores the suite's "Sure! " filler
em_rows = 500                 # every held-out instruction
batch_size = 32
learning_rate = 2e-3
max_iters = 1000
lr_decay_iters = 1000
eval_interval = 200
