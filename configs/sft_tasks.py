# SFT, full fine-tuning, on the tasks suite (tasks.py) from the base model of configs/tasks_base.py: step 2 of the
# post-training demonstration. CPU (2 cores): ~? min; held-out exact match ~?% (the base: 0%), val loss ~?.
#   python train.py configs/tasks_base.py && python finetune.py configs/sft_tasks.py
out_dir = 'out-sft-tasks'
init_from = 'out-tasks-base'
dataset = 'tasks'
em_normalize = 'tasks'
