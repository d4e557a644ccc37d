# DPO on Anthropic's hh-rlhf pairs (harmless-base; data.py hh_rlhf), from the SFT model of configs/sft_alpaca.py.
# CPU (2 cores): ~? min; held-out reward accuracy 50% at step 0 -> ?%, kl ?.
#   python finetune.py configs/sft_alpaca.py && python dpo.py configs/dpo_demo.py
out_dir = 'out-dpo-demo'
init_from = 'out-sft-alpaca'  # sft_alpaca's out_dir
dataset = 'hh_rlhf'           # data/hh_rlhf/{train,val}.jsonl (prepared if missing)
win_rate_prompts = 0          # hh-rlhf has no rule to judge answers by
