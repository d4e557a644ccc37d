# Evaluate a tasks-suite model on five benchmarks at once, on the 2-core CPU: the held-out instructions
# (benchmark:tasks, exact match), perplexity on the base corpus (tasks_base val.bin), and three lm-eval tasks from
# local YAMLs over the same held-out rows (configs/lm_eval_tasks: multiple choice between the right and the wrong
# answer, greedy answers by exact match, rolling log-likelihood). Run from the repo root, once per model:
#   for m in out-tasks-base out-sft-tasks out-dpo-tasks out-rl-tasks; do
#     python evaluate.py configs/eval_tasks_suite.py --init_from=$m; done
#   python serve.py --init_from=out-sft-tasks      # the Runs tab: the grid, the radar, the history
# Measured here: ~25 s a model (docs/evaluation.md). Each result goes to the model's eval/ and its model card.
benchmark = 'tasks'
perplexity = 'tasks_base'
tasks = 'tasks_choice,tasks_answer,tasks_text'
include_path = 'configs/lm_eval_tasks'
limit = 200
