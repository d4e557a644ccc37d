"""
Evaluate any model source: perplexity and bits per byte, lm-evaluation-harness tasks (our model as
an lm-eval LM), custom benchmarks (exact match, contains, BLEU, ROUGE-L, METEOR; code with pass@k),
and a results store with a leaderboard.

    python evaluate.py --init_from=out-shakespeare-char   # perplexity on the run's own val.bin
    # any text file (a smaller stride is tighter)
    python evaluate.py --init_from=out-x --perplexity=notes.txt --stride=256
    python evaluate.py --init_from=out-sft-tasks --benchmark=tasks   # the synthetic suite
    # {prompt, reference} rows; HumanEval rows (programs run in a limited process: sandbox.py)
    python evaluate.py --init_from=out-x --benchmark=qa.jsonl --max_new_tokens=64
    python evaluate.py --init_from=out-x --benchmark=code.jsonl --n_samples=10 --pass_k=1,10 \
        --temperature=0.8 --confirm_run_unsafe_code=True
    # lm-eval tasks, by its own flag names; then local YAML tasks, offline
    python evaluate.py --init_from=out-x --tasks=hellaswag --num_fewshot=0 --limit=200
    python evaluate.py --init_from=out-x --tasks=mytask --include_path=my_yamls/
    # every saved checkpoint of the run
    python evaluate.py --init_from=out-x --benchmark=tasks --checkpoints=True
    python evaluate.py --leaderboard=out-tasks-base,out-sft-tasks,out-dpo-tasks \
        --sort_by=exact_match
    # the arena's ratings, agreement and preference pairs
    python evaluate.py --arena=runs/arena --arena_to_pairs=arena_pairs.jsonl
    python evaluate.py --help                             # every setting, with its default

Every run writes one JSON result per task under the model's out_dir/eval/ (model source,
checkpoint, config, task, metrics, standard errors, per-item scores, time) and refreshes the model
card's evaluations table. The leaderboard reads those files back: accuracy-like metrics get 95%
bootstrap intervals, and two models scored on the same items get a paired test.
The pieces live in the package: nanolab/likelihood.py (perplexity, continuations),
nanolab/benchmarks.py (benchmark files, templates, code), nanolab/metrics.py (answers and their
scores), nanolab/harness.py (lm-eval), nanolab/results.py (the store and the leaderboard),
nanolab/arena.py. Every answer is decoded by generate, the one decoding loop, at temperature 0
unless told otherwise.
"""
import json
import os
import sys
import time

import torch

from nanolab import arena as arena_report  # `arena` is a setting
from nanolab import datasets, synthetic
from nanolab.benchmarks import run_benchmark, template_table, templated
from nanolab.checkpoint import load_model
from nanolab.configurator import cli_errors, configure, fail
from nanolab.device import DTYPES, autocast_ctx, resolve_device, resolve_dtype
from nanolab.formats import read_sft
from nanolab.harness import run_harness
from nanolab.likelihood import run_perplexity
from nanolab.metrics import GENERATION_METRICS, NORMALIZERS
from nanolab.results import save_result, show_leaderboard, update_model_card
from nanolab.runs import checkpoint_sources

# -----------------------------------------------------------------------------
# defaults: perplexity of the CPU default model on its own validation split
init_from = 'out-shakespeare-char'  # a model source: out_dir, .pt, Hugging Face directory, hub name
out_dir = ''                  # where eval/ results go; '' = init_from when it is a directory, else eval-<name>
# perplexity and bits per byte (the default when nothing else is asked)
perplexity = ''               # a dataset name (data_dir/<name>/val.bin) or a text file; '' = the run's own dataset
stride = 0                    # sliding-window step in tokens; 0 = block_size (fast); smaller scores each token with more context
max_tokens = 0                # score at most this many tokens; 0 = all
data_dir = 'data'             # where datasets live
# custom benchmarks: a JSONL of {prompt, reference} or {prompt, choices, answer} rows, or 'tasks'
benchmark = ''                # path, or 'tasks' (the post-training suite's held-out split, data_dir/tasks/val.jsonl)
bench_metrics = 'exact_match,contains,bleu,rouge_l'  # generation metrics, of exact_match,contains,bleu,rouge_l,meteor (choice rows: acc, acc_norm); tasks: exact_match,contains (one-word answers have no BLEU)
template = ''                 # benchmark: comma list of prompts.py templates to score it under ('' = its rows as written, e.g. ',instruction_concise'); each fills its one variable with the row's prompt
shots = '0'                   # benchmark: comma list of few-shot counts, each run with each template (examples prefixed, drawn by seed)
shots_file = ''               # few-shot examples: JSONL of {question, answer}; '' with benchmark=tasks = the suite's training instructions
normalize = 'strip'           # answers compare after: 'strip' | 'lower' (strip + lowercase) | 'tasks' (also drops the suite's filler)
chat = True                   # wrap prompts in the chat template (a model without one gets them raw)
n_samples = 1                 # code benchmarks (HumanEval's rows): programs sampled per problem; pass@k needs n >= k
pass_k = '1'                  # code benchmarks: comma list of k for pass@k, e.g. 1,10
code_timeout = 10.0           # code benchmarks: seconds each program and its tests may run (CPU time too)
code_memory_mb = 1024         # code benchmarks: address space each program may take, MB
confirm_run_unsafe_code = False  # run model-written code: our code benchmarks, and lm-eval tasks marked unsafe (humaneval, mbpp)
max_new_tokens = 32           # answer length limit, tokens
temperature = 0.0             # 0 = greedy
top_k = 0                     # keep the k likeliest tokens, as sample.py (only when temperature > 0); 0 = off
top_p = 1.0                   # nucleus: keep the smallest set with mass >= top_p (only when temperature > 0); 1.0 = off
# lm-evaluation-harness, by its own flag names
tasks = ''                    # comma-separated lm-eval task names
include_path = ''             # a directory of task YAMLs (local tasks work offline)
num_fewshot = -1              # few-shot examples; -1 = the task's default
limit = 0                     # examples per task; 0 = all (also caps benchmark rows)
batch_size = 16               # requests per forward
output_path = ''              # also write lm-eval's own results JSON here
# results and comparison
leaderboard = ''              # comma-separated run directories (or eval/ folders): print and write the leaderboard, then exit
sort_by = ''                  # leaderboard metric to sort by; '' = the first one found
leaderboard_out = 'leaderboard'  # file stem of the Markdown, CSV and JSON it writes
arena = ''                    # a judgments file or a directory of them (arena.py): print and write arena.json next to it, then exit
arena_judge = ''              # with arena: a reward model (reward.py's out_dir) judges every item too, as annotator 'reward:<dir>' (its kappa with each human)
arena_to_pairs = ''           # with arena: also write the decided judgments as {prompt, chosen, rejected} JSONL here
checkpoints = False           # evaluate every saved checkpoint of init_from's run (ckpt.pt, best.pt, checkpoints/*.pt)
bootstrap = 1000              # bootstrap resamples for the 95% intervals
# system
device = 'auto'               # 'auto' (cuda > mps > cpu) | 'cpu' | 'cuda' | 'cuda:N' | 'mps'
dtype = 'auto'                # 'auto' (bf16 on GPUs that have it, else fp16; fp32 on CPU) | 'float32' | 'bfloat16' | 'float16'
seed = 1337                   # sampling (temperature > 0) and bootstrap
# -----------------------------------------------------------------------------
CHOICES = {'normalize': ('strip', 'lower', 'tasks'), 'dtype': DTYPES}
config = configure(globals(), choices=CHOICES)

# 1) the modes that read results rather than models: the arena's statistics, the leaderboard
if arena:
    with cli_errors():
        arena_report.report(arena, bootstrap, seed, arena_judge, arena_to_pairs)
    sys.exit(0)
if leaderboard:
    with cli_errors():
        show_leaderboard([d for d in leaderboard.split(',') if d], sort_by, leaderboard_out,
                         bootstrap, seed)
    sys.exit(0)

# 2) every setting checked before any model loads
unknown = set(bench_metrics.split(',')) - set(GENERATION_METRICS)
if unknown:
    fail(f"unknown bench_metrics {sorted(unknown)}; choose from {','.join(GENERATION_METRICS)}")
try:
    ks = sorted({int(k) for k in pass_k.split(',')})
    if ks[0] < 1:
        raise ValueError
except ValueError:
    fail(f'--pass_k must be a comma list of counts >= 1, like 1,10, not {pass_k!r}')
code = {'n_samples': n_samples, 'ks': ks, 'timeout_s': code_timeout, 'memory_mb': code_memory_mb,
        'confirm': confirm_run_unsafe_code, 'seed': seed}
with cli_errors():
    device = resolve_device(device)
    ptdtype = resolve_dtype(dtype, device)
    sources = checkpoint_sources(init_from) if checkpoints else [init_from]
ctx = autocast_ctx(device, ptdtype)
# results go with the run: its out_dir, or the folder of a .pt file; a Hugging Face model gets
# eval-<name>/
is_run = os.path.exists(os.path.join(init_from, 'ckpt.pt'))
results_dir = out_dir or (init_from if is_run
                          else os.path.dirname(init_from) or '.' if init_from.endswith('.pt')
                          else 'eval-' + os.path.basename(os.path.normpath(init_from)))
norm = synthetic.normalize if normalize == 'tasks' else NORMALIZERS[normalize]
bench_path = benchmark
if benchmark == 'tasks':  # the post-training suite's held-out instructions, prepared when missing
    with cli_errors():
        bench_path = os.path.join(datasets.prepare('tasks', data_dir=data_dir), 'val.jsonl')
    if normalize == 'strip':
        norm = synthetic.normalize
    # the default: BLEU needs 4-grams, ROUGE-L = EM here
    if bench_metrics == 'exact_match,contains,bleu,rouge_l':
        bench_metrics = 'exact_match,contains'
if bench_path and not os.path.isfile(bench_path):
    fail(f"no benchmark file {bench_path}; give a JSONL path or 'tasks'")
shot_examples = []  # few-shot examples: {question, answer}
if shots != '0':
    try:
        if any(int(x) < 0 for x in shots.split(',')):
            raise ValueError
    except ValueError:
        fail(f"--shots must be a comma list of counts >= 0, like 0,3, not {shots!r}")
    if shots_file:
        with open(shots_file, encoding='utf-8') as f:
            shot_examples = [json.loads(line) for line in f if line.strip()]
    elif benchmark == 'tasks':  # the suite's training instructions and their concise answers
        train = read_sft(os.path.join(os.path.dirname(bench_path), 'train.jsonl'))[:1000]
        shot_examples = [{'question': r['messages'][-2]['content'],
                          'answer': synthetic.normalize(r['messages'][-1]['content'])}
                         for r in train]
    else:
        fail('--shots needs --shots_file=JSONL of {question, answer} rows (or --benchmark=tasks)')
if template:
    with cli_errors(KeyError):  # each template checked before any model loads (templated's check)
        for t in template.split(','):
            templated(t.strip())
torch.manual_seed(seed)
sampling = {'temperature': temperature, 'top_k': top_k, 'top_p': top_p} if temperature > 0 else {}


def save(results, base, t0):
    """Store each result of one job (its time: the job's) and print its metrics."""
    for r in results:
        r = {**base, **r, 'time': round(time.time() - t0, 2), 'config': config}
        path = save_result(results_dir, r)
        shown = ', '.join(f'{k} {v:.4f}' +
                          (f" ± {r['stderr'][k]:.4f}" if k in r.get('stderr', {}) else '')
                          for k, v in r['metrics'].items())
        print(f"{r['task']}: {shown} (n={r['n']}, {r['time']:.1f} s) -> {path}")
    if len(results) > 1 and all('shots' in r.get('settings', {}) for r in results):
        template_table(results, bootstrap, seed)


# 3) each model (each saved checkpoint with --checkpoints): lm-eval tasks, the benchmark,
#    perplexity
for source in sources:
    with cli_errors():
        model, tok, ckpt = load_model(source, device)
    if tok is None:
        fail(f'{source} has no tokenizer; evaluate needs one to read text')
    print(f"{source}: {model.num_params(non_embedding=False) / 1e6:.2f}M parameters, {device}, "
          f"{str(ptdtype).replace('torch.', '')}")
    where = os.path.join(source, 'ckpt.pt') if os.path.isdir(source) and ckpt else source
    base = {'model': init_from, 'checkpoint': where, 'iter': ckpt.get('iter_num')}
    # autocast on GPUs (bf16/fp16), for generation too; nothing on the CPU in fp32
    if tasks:
        t0 = time.time()
        with ctx, cli_errors(FileNotFoundError):
            results = run_harness(model, tok, tasks, include_path, num_fewshot, limit, batch_size,
                                  output_path, ctx, os.path.basename(os.path.normpath(source)),
                                  confirm_run_unsafe_code)
        save(results, base, t0)
    # one result per (template, shots): benchmark:NAME, or benchmark:NAME[template=T,shots=K]
    if bench_path:
        t0, results = time.time(), []
        name = benchmark if benchmark == 'tasks' else \
            os.path.splitext(os.path.basename(bench_path))[0]
        for t in template.split(','):
            for k in (int(x) for x in shots.split(',')):
                tag = f"{name}[template={t or 'none'},shots={k}]" \
                    if (template or shots != '0') else name
                with ctx, cli_errors(FileNotFoundError):
                    results.append(run_benchmark(model, tok, bench_path, bench_metrics.split(','),
                                                 norm, chat, max_new_tokens, batch_size, limit,
                                                 ctx, tag,
                                                 templated(t.strip(), k, shot_examples, seed),
                                                 code, **sampling))
                results[-1]['settings'].update(template=t.strip(), shots=k)
        save(results, base, t0)
    if perplexity or not (tasks or bench_path):
        ppl_source = perplexity or ckpt.get('config', {}).get('dataset', '')
        if not ppl_source:
            fail(f"{source} does not say which dataset it was trained on; pass "
                 "--perplexity=DATASET or a text file")
        t0 = time.time()
        with ctx, cli_errors(FileNotFoundError):
            results = [run_perplexity(model, tok, ppl_source, stride, max_tokens, batch_size,
                                      data_dir, ctx)]
        save(results, base, t0)
update_model_card(results_dir)
