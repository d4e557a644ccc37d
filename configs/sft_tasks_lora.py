# SFT with LoRA (peft) on the tasks suite (tasks.py) from the base model of configs/tasks_base.py: step 3 of the
# post-training demonstration. CPU (2 cores): ~? min; held-out exact match ~?%, val loss ~?.
#   python finetune.py configs/sft_tasks_lora.py
out_dir = 'out-sft-tasks-lora'
init_from = 'out-tasks-base'
dataset = 'tasks'
em_normalize = 'tasks'
lora_r = 16
lora_alpha = 32.0
