"""
Evaluate any model source: perplexity and bits per byte, lm-evaluation-harness tasks (our model as an lm-eval LM),
custom benchmarks (exact match, contains, BLEU, ROUGE-L, METEOR; code with pass@k), and a results store with a
leaderboard.

    python evaluate.py --init_from=out-shakespeare-char                   # perplexity on the run's own val.bin
    python evaluate.py --init_from=out-x --perplexity=notes.txt --stride=256   # any text file; smaller stride = tighter
    python evaluate.py --init_from=out-sft-tasks --benchmark=tasks         # the synthetic instruction suite (tasks.py)
    python evaluate.py --init_from=out-x --benchmark=qa.jsonl --max_new_tokens=64   # {prompt, reference} rows
    python evaluate.py --init_from=out-x --benchmark=code.jsonl --n_samples=10 --pass_k=1,10 --temperature=0.8 \
        --confirm_run_unsafe_code=True      # HumanEval rows: programs run in a limited process (scoring.py)
    python evaluate.py --init_from=out-x --tasks=hellaswag --num_fewshot=0 --limit=200   # lm-eval, by its own flag names
    python evaluate.py --init_from=out-x --tasks=mytask --include_path=my_yamls/           # local YAML tasks, offline
    python evaluate.py --init_from=out-x --benchmark=tasks --checkpoints=True  # every saved checkpoint of the run
    python evaluate.py --leaderboard=out-tasks-base,out-sft-tasks,out-dpo-tasks --sort_by=exact_match
    python evaluate.py --arena=runs/arena --arena_to_pairs=arena_pairs.jsonl   # the arena's ratings, agreement, pairs
    python evaluate.py --help                                              # every setting, with its default

Every run writes one JSON result per task under the model's out_dir/eval/ (model source, checkpoint, config,
task, metrics, standard errors, per-item scores, time) and refreshes the model card's evaluations table.
The leaderboard reads those files back: accuracy-like metrics get 95% bootstrap intervals, and two models scored
on the same items get a paired test.

Also a library: finetune.py logs exact_match and dpo.py win_rate through answer(), exact_match() and win_rate();
every answer is decoded by sample.generate, the one decoding loop, at temperature 0 unless told otherwise.
"""
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from nanolab.progress import Progress
from sample import generate
from nanolab.sandbox import CODE_STOPS, GENERATION_METRICS, check_program, pass_at_k, score_generation  # evaluate.pass_at_k

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
top_k = 0                     # sampling filters, as sample.py (only when temperature > 0)
top_p = 1.0
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
# 1) answers, exact match and win rate: the helpers finetune.py and dpo.py call



def answer(model, tok, conversations, max_new_tokens=32, batch_size=64, progress=False, **sampling):
    """The model's reply to each conversation (a list of messages ending before the assistant's turn): rendered
    with the chat template and its generation prompt, decoded in batches until the template's end of turn, and
    stripped of surrounding whitespace. sampling: other generate() settings (default greedy). progress: report
    rows done, rate and ETA on stderr after each batch (progress.Progress)."""
    was_training = model.training
    model.eval()
    sampling = {'temperature': 0.0, **sampling}
    stop_tokens = tok.chat_stop_tokens or ()  # char-level templates end turns with a string instead
    out, shown = [], Progress(len(conversations), 'answering', 'rows') if progress else None
    try:
        for i in range(0, len(conversations), batch_size):
            prompts = [tok.render_chat(c, add_generation_prompt=True)[0] for c in conversations[i:i + batch_size]]
            done = generate(model, prompts, max_new_tokens, stop_tokens=stop_tokens, stop_strings=tok.stop_strings,
                            tokenizer=tok, **sampling)
            out += [c.text.strip() for c in done]
            if shown:
                shown.update(len(out))
    finally:
        model.train(was_training)
    return out


def exact_match(model, tok, rows, max_new_tokens=32, batch_size=64, normalize=str.strip):
    """Share of SFT rows whose greedy answer equals the reference, the row's last (assistant) message, once both
    go through `normalize` (default: strip whitespace; tasks.normalize also drops the tasks suite's filler).
    Returns (score in [0, 1], details: one {'prompt', 'reference', 'answer', 'match'} per row)."""
    if not rows:
        raise ValueError('exact_match needs at least one row')
    bad = [i for i, r in enumerate(rows) if r['messages'][-1]['role'] != 'assistant']
    if bad:
        raise ValueError(f"row {bad[0]}: the last message is the {rows[bad[0]]['messages'][-1]['role']}'s, not "
                         "the assistant's reference answer that exact match compares against")
    replies = answer(model, tok, [r['messages'][:-1] for r in rows], max_new_tokens, batch_size)
    details = [{'prompt': r['messages'][-2]['content'] if len(r['messages']) > 1 else '',
                'reference': r['messages'][-1]['content'], 'answer': a,
                'match': normalize(a) == normalize(r['messages'][-1]['content'])} for r, a in zip(rows, replies)]
    return sum(d['match'] for d in details) / len(details), details


def win_rate(rows, answers, ref_answers, score):
    """How often a judge that applies `score(row, answer)` (higher is better; e.g. tasks.rule_score) prefers
    `answers` to `ref_answers`, one pair per row: a win counts 1, a tie 0.5 (so identical models score 0.5).
    dpo.py gets both lists from answer(), for the policy and for the reference. Returns (rate, details)."""
    if not rows or not len(rows) == len(answers) == len(ref_answers):
        raise ValueError(f'win_rate needs one answer and one reference answer per row, got {len(rows)} rows, '
                         f'{len(answers)} answers and {len(ref_answers)} reference answers')
    details = [{'answer': a, 'ref_answer': b, 'score': score(r, a), 'ref_score': score(r, b)}
               for r, a, b in zip(rows, answers, ref_answers)]
    wins = sum(1.0 if d['score'] > d['ref_score'] else 0.5 if d['score'] == d['ref_score'] else 0.0 for d in details)
    return wins / len(details), details

# -----------------------------------------------------------------------------
# 2) log-likelihoods: perplexity, bits per byte, and scoring continuations (multiple choice, lm-eval)

def _rows_per_forward(model, T, batch_size):
    """Rows per forward pass, capped so the fp32 logits (rows x T x vocab, and their log-softmax: 8 bytes an element)
    fit: in a quarter of the GPU's free memory on CUDA (torch.cuda.mem_get_info), in ~1 GB elsewhere."""
    p = next(model.parameters())
    budget = torch.cuda.mem_get_info(p.device)[0] // 4 if p.is_cuda else 1 << 30
    return max(1, min(batch_size, budget // (8 * max(1, T * model.config.vocab_size))))

def perplexity_of(model, ids, stride=0, batch_size=16, ctx=None):
    """Sliding-window negative log-likelihood of a token stream `ids` (1-D), every token but the first scored once.
    Windows hold block_size + 1 tokens and start every `stride` tokens (the last one is moved back to end at the
    stream's end, so every window is full); a window scores only the tokens no earlier window scored, so with
    stride = block_size each token sees the context since its window began (fast), and with a smaller stride
    each token sees at least block_size - stride tokens of context (tighter, block_size / stride times slower).
    Returns {'nll': summed nats, 'tokens': scored tokens, 'windows': windows}."""
    T = model.config.block_size
    stride = stride or T
    if not 0 < stride <= T:
        raise ValueError(f'stride={stride} must be between 1 and the block size {T}')
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    N = len(ids)
    if N < 2:
        raise ValueError(f'perplexity needs at least 2 tokens, got {N}')
    wins, done, begin = [], 1, 0  # done: the first position not yet scored
    while done < N:
        begin = min(begin, max(0, N - T - 1))
        end = min(begin + T + 1, N)
        wins.append((begin, end, done))
        done, begin = end, begin + stride
    device = next(model.parameters()).device
    nll, rows = 0.0, _rows_per_forward(model, T, batch_size)
    with torch.no_grad(), (ctx or torch.autocast('cpu', enabled=False)):
        for i in range(0, len(wins), rows):
            chunk = wins[i:i + rows]
            x = torch.stack([ids[b:e - 1] for b, e, _ in chunk]).to(device)  # same length: every window is full
            y = torch.stack([ids[b + 1:e] for b, e, _ in chunk]).to(device)
            for r, (b, _, first) in enumerate(chunk):
                y[r, :first - b - 1] = -1  # already scored by an earlier window
            logits, _ = model(x)
            nll += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1, reduction='sum').item()
    return {'nll': nll, 'tokens': N - 1, 'windows': len(wins)}

def score_continuations(model, requests, batch_size=16, ctx=None):
    """log p(continuation | context) for (context_ids, continuation_ids) pairs: [(summed logprob, is_greedy)],
    is_greedy = every continuation token is the argmax. A pair longer than block_size + 1 tokens loses context from
    the left (its continuation must fit in block_size); the number so truncated is score_continuations.truncated.
    Pairs run longest first, so each batch pads little (lm-eval's HF backend orders its requests the same way)."""
    T = model.config.block_size
    device = next(model.parameters()).device
    out, truncated = [None] * len(requests), 0
    seqs = []
    for i, (c, k) in enumerate(requests):
        if not k:
            raise ValueError(f'request {i}: the continuation is empty')
        if len(k) > T:
            raise ValueError(f'request {i}: the continuation is {len(k)} tokens, more than the block size {T}')
        s = (list(c) + list(k))[-(T + 1):]
        truncated += len(c) + len(k) > T + 1
        seqs.append((i, s, len(k)))
    seqs.sort(key=lambda t: -len(t[1]))
    j = 0
    with torch.no_grad(), (ctx or torch.autocast('cpu', enabled=False)):
        while j < len(seqs):
            L = len(seqs[j][1]) - 1  # the longest in the chunk: rows are sorted longest first
            chunk = seqs[j:j + _rows_per_forward(model, L, batch_size)]
            j += len(chunk)
            x = torch.zeros(len(chunk), L, dtype=torch.long)
            for r, (_, s, _) in enumerate(chunk):
                x[r, :len(s) - 1] = torch.tensor(s[:-1])
            # logits only from the first position that predicts a continuation token: the output head and
            # log_softmax over the context positions are most of the cost of scoring short answers
            p0 = min(len(s) - 1 - n for _, s, n in chunk)
            logp = F.log_softmax(model(x.to(device), logits_at=slice(p0, None))[0].float(), dim=-1)
            for r, (i, s, n) in enumerate(chunk):
                lp = logp[r, len(s) - 1 - n - p0:len(s) - 1 - p0]  # the positions that predict the continuation
                k = torch.tensor(s[-n:], device=lp.device)
                out[i] = (lp.gather(1, k[:, None]).sum().item(), bool((lp.argmax(-1) == k).all()))
    score_continuations.truncated = truncated
    return out
score_continuations.truncated = 0

def stream_tokens(source, tok, data_dir='data'):
    """(token ids, UTF-8 bytes they decode to, description) of a perplexity source: a dataset name (its val.bin,
    which must be in the model's tokenizer) or a text file (encoded with the model's tokenizer)."""
    import numpy as np
    if os.path.isfile(source):
        with open(source, encoding='utf-8', errors='strict') as f:
            text = f.read()
        try:
            ids = tok.encode(text)
        except (KeyError, ValueError) as e:
            raise ValueError(f"{source}: the model's tokenizer cannot encode this text ({e}); a char-level model "
                             'only knows the characters of its training text') from None
        return np.asarray(ids, dtype=np.int64), len(text.encode('utf-8')), source
    import data
    folder = os.path.join(data_dir, source)
    meta = data.load_meta(folder)  # a clear error naming `python data.py NAME` when missing
    if meta['tokenizer'] != tok.spec():
        raise ValueError(f"{folder} was tokenized with {meta['tokenizer'].get('kind')} (vocab {meta['vocab_size']}), "
                         f"not the model's tokenizer ({tok.spec().get('kind')}, vocab {tok.vocab_size}); pass "
                         '--perplexity=FILE.txt to score raw text with the model\'s own tokenizer')
    path = os.path.join(folder, 'val.bin')
    if not os.path.exists(path):
        raise ValueError(f'{folder} has no val.bin (an SFT or preference set?); pass --perplexity=DATASET or a text file')
    ids = np.fromfile(path, dtype=np.dtype(meta['dtype'])).astype(np.int64)
    return ids, None, f'{source}/val.bin'

def run_perplexity(model, tok, source, stride=0, max_tokens=0, batch_size=16, data_dir='data', ctx=None):
    """Perplexity and bits per byte of a model on a perplexity source (see stream_tokens), as a result dict's
    metrics. Bits per byte = summed nats / ln 2 / the UTF-8 bytes of the scored tokens, so it compares across
    tokenizers, where perplexity does not."""
    ids, n_bytes, what = stream_tokens(source, tok, data_dir)
    if max_tokens and len(ids) > max_tokens + 1:
        ids, n_bytes = ids[:max_tokens + 1], None
    r = perplexity_of(model, ids, stride, batch_size, ctx)
    first = len(tok.decode_bytes([int(ids[0])]))
    scored_bytes = (n_bytes if n_bytes is not None else len(tok.decode_bytes(ids.tolist()))) - first
    loss = r['nll'] / r['tokens']
    return {'task': f'perplexity:{what}', 'metrics': {'loss': loss, 'perplexity': math.exp(loss),
            'bits_per_byte': r['nll'] / math.log(2) / max(1, scored_bytes)},
            'n': r['tokens'], 'settings': {'stride': stride or model.config.block_size, 'windows': r['windows'],
                                            'bytes': scored_bytes, 'max_tokens': max_tokens}}

# -----------------------------------------------------------------------------
# 3) custom benchmarks: JSONL rows scored by exact match, contains, BLEU and ROUGE-L, or by choice log-likelihood

NORMALIZERS = {'strip': str.strip, 'lower': lambda s: s.strip().lower()}

def read_benchmark(path):
    """Rows of a benchmark JSONL, one schema: {'id', 'prompt': text or messages, 'references': [text, ...]} for
    generation, or {'id', 'prompt', 'choices': [text, ...], 'answer': index} for multiple choice. Accepted rows:
    {prompt, reference (text or list)}, {prompt, choices, answer (index or the choice's text)}, SFT rows
    ({messages} ending in the assistant's reference), Alpaca rows ({instruction, input, output}), and code rows in
    HumanEval's format ({task_id, prompt, canonical_solution, test, entry_point} -> {'id', 'prompt', 'test',
    'entry_point', 'canonical_solution'}). A malformed row is an error naming the file and the 1-based line."""
    rows = []
    with open(path, encoding='utf-8') as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f'{path}, line {n}'
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f'{where}: not valid JSON ({e.msg}); a benchmark file holds one JSON object per line') from None
            if not isinstance(r, dict):
                raise ValueError(f'{where}: expected a JSON object, got {type(r).__name__}')
            rid = str(r.get('id', n))
            if 'messages' in r:
                m = r['messages']
                if not (isinstance(m, list) and len(m) >= 2 and m[-1].get('role') == 'assistant'):
                    raise ValueError(f"{where}: 'messages' must end with the assistant's reference answer")
                rows.append({'id': rid, 'prompt': m[:-1], 'references': [m[-1]['content']]})
            elif 'instruction' in r and 'output' in r:
                prompt = r['instruction'] + (f"\n\n{r['input']}" if r.get('input') else '')
                rows.append({'id': rid, 'prompt': [{'role': 'user', 'content': prompt}], 'references': [r['output']]})
            elif {'task_id', 'prompt', 'test', 'entry_point'} <= set(r):  # HumanEval's own row format
                if not all(isinstance(r[k], str) and r[k] for k in ('task_id', 'prompt', 'test', 'entry_point')):
                    raise ValueError(f"{where}: a code row's task_id, prompt, test and entry_point must be non-empty text")
                rows.append({'id': r['task_id'], 'prompt': r['prompt'], 'test': r['test'],
                             'entry_point': r['entry_point'], 'canonical_solution': r.get('canonical_solution')})
            elif 'prompt' in r and 'choices' in r:
                ch, a = r['choices'], r.get('answer')
                if not (isinstance(ch, list) and len(ch) >= 2 and all(isinstance(c, str) and c for c in ch)):
                    raise ValueError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
                if isinstance(a, str) and a in ch:
                    a = ch.index(a)
                if not (isinstance(a, int) and not isinstance(a, bool) and 0 <= a < len(ch)):
                    raise ValueError(f"{where}: 'answer' must be the index of the right choice (0-{len(ch) - 1}) or its text, got {a!r}")
                rows.append({'id': rid, 'prompt': r['prompt'], 'choices': ch, 'answer': a})
            elif 'prompt' in r and 'reference' in r:
                ref = r['reference'] if isinstance(r['reference'], list) else [r['reference']]
                if not ref or not all(isinstance(x, str) for x in ref) or not isinstance(r['prompt'], (str, list)):
                    raise ValueError(f"{where}: 'prompt' must be text (or messages) and 'reference' text or a list of texts")
                rows.append({'id': rid, 'prompt': r['prompt'], 'references': ref})
            else:
                raise ValueError(f'{where}: has keys {sorted(r)}; a benchmark row needs prompt + reference, prompt + '
                                 'choices + answer, messages, instruction + output, or HumanEval\'s task_id + prompt + '
                                 'test + entry_point')
    if not rows:
        raise ValueError(f'{path} holds no rows')
    if len({'choices' in r for r in rows}) > 1 or len({'test' in r for r in rows}) > 1:
        raise ValueError(f'{path} mixes kinds of rows (multiple choice, generation, code); put each kind in its file')
    return rows

def _as_chat(prompt):
    return prompt if isinstance(prompt, list) else [{'role': 'user', 'content': prompt}]

def templated(template='', shots=0, examples=(), seed=1337):
    """A prompt transform for run_benchmark: k few-shot examples (prompts.few_shot, 'qa_pair', picked by seed) and
    the row's prompt put into `template`'s one variable ('' = the prompt as it is). A chat prompt's last turn is the
    text that goes in; a text template's result becomes that turn again, a chat template's messages replace it."""
    from nanolab import prompts
    if template and len(prompts.variables(template)) != 1:
        raise ValueError(f"template '{template}' takes {prompts.variables(template)}; a benchmark template takes one "
                         "variable, which the row's prompt fills")
    prefix = prompts.few_shot(list(examples), shots, seed) + '\n\n' if shots else ''

    def transform(prompt):
        text = prompt if isinstance(prompt, str) else prompt[-1]['content']
        filled = prompts.render(template, **{prompts.variables(template)[0]: text}) if template else text
        if isinstance(filled, list):  # a chat template: its messages, the examples before the last turn's text
            return filled[:-1] + [{**filled[-1], 'content': prefix + filled[-1]['content']}]
        return prefix + filled if isinstance(prompt, str) else prompt[:-1] + [{**prompt[-1], 'content': prefix + filled}]
    return transform

def run_code(model, tok, rows, max_new_tokens=256, n_samples=1, ks=(1,), timeout_s=10.0, memory_mb=1024,
             confirm=False, seed=1337, **sampling):
    """Code rows (HumanEval's format): n_samples completions of each prompt through sample.generate (raw text, no
    chat template; stopped at CODE_STOPS; greedy unless sampling says otherwise), each program (prompt +
    completion) run with its tests by check_program -> metrics pass@k for each k (the mean over problems of
    pass_at_k(n, c, k)), per-problem scores, and every sample's verdict. confirm: running model-written code is
    unsafe (scoring.py says what the sandbox does not stop); nothing runs without it."""
    if not confirm:
        raise ValueError('a code benchmark runs the programs the model writes; pass --confirm_run_unsafe_code=True '
                         "once you have read what the sandbox does not protect against (scoring.py, README)")
    bad = [k for k in ks if k > n_samples]
    if bad:
        raise ValueError(f'pass@{bad[0]} needs at least {bad[0]} samples per problem; raise --n_samples to {bad[0]}')
    done = generate(model, [tok.encode(r['prompt']) for r in rows], max_new_tokens, num_samples=n_samples,
                    stop_strings=CODE_STOPS, tokenizer=tok, seed=seed, **{'temperature': 0.0, **sampling})
    verdicts, shown = [[] for _ in rows], Progress(len(done), 'running programs', 'programs')
    for k, c in enumerate(done, 1):  # one process at a time: each is limited, and the machine is shared
        r = rows[c.prompt_index]
        verdicts[c.prompt_index].append((c.text,) + check_program(r['prompt'] + c.text, r['test'], r['entry_point'],
                                                                 timeout_s, memory_mb))
        shown.update(k)
    passed = [sum(ok for _, ok, _ in v) for v in verdicts]
    items = {f'pass@{k}': [pass_at_k(n_samples, c, k) for c in passed] for k in ks}
    headline = {k: sum(v) / len(v) for k, v in items.items()}
    return {'metrics': headline, 'items': items, 'stderr': standard_errors(items, headline),
            'samples': [[{'completion': t, 'passed': ok, 'why': why} for t, ok, why in v] for v in verdicts],
            'settings': {'n_samples': n_samples, 'ks': list(ks), 'timeout_s': timeout_s, 'memory_mb': memory_mb,
                         'max_new_tokens': max_new_tokens, 'stop': CODE_STOPS, 'seed': seed, **sampling}}

def run_benchmark(model, tok, path, metrics=('exact_match',), normalize=str.strip, chat=True, max_new_tokens=32,
                  batch_size=16, limit=0, ctx=None, name='', prompt_fn=None, code=None, **sampling):
    """Score a model on a benchmark file (read_benchmark) -> a result dict (metrics, stderr, per-item scores).
    prompt_fn: maps each row's prompt before it is asked (templated(): a template and few-shot examples).
    Code rows: run_code, with code's settings (n_samples, ks, timeout_s, memory_mb, confirm, seed).
    Generation rows: the model's answers (answer(), through sample.generate) scored by score_generation.
    Multiple-choice rows: accuracy (the likeliest choice is the answer) and acc_norm (likelihood per byte)."""
    rows = read_benchmark(path)[:limit or None]
    if prompt_fn is not None:
        rows = [{**r, 'prompt': prompt_fn(r['prompt'])} for r in rows]
    name = name or os.path.splitext(os.path.basename(path))[0]
    out = {'task': f'benchmark:{name}', 'n': len(rows), 'item_ids': [r['id'] for r in rows],
           'settings': {'chat': chat, 'max_new_tokens': max_new_tokens, **sampling}}
    if 'test' in rows[0]:
        return {**out, 'task': f'code:{name}', **run_code(model, tok, rows, max_new_tokens, **(code or {}), **sampling)}
    if 'choices' in rows[0]:
        def context(r):
            return tok.render_chat(_as_chat(r['prompt']), add_generation_prompt=True)[0] if chat else tok.encode(r['prompt'])
        reqs = [(context(r), tok.encode(c)) for r in rows for c in r['choices']]
        scores, k = score_continuations(model, reqs, batch_size, ctx), 0
        acc, acc_norm = [], []
        for r in rows:
            lp = [s for s, _ in scores[k:k + len(r['choices'])]]
            k += len(r['choices'])
            per_byte = [x / max(1, len(c.encode('utf-8'))) for x, c in zip(lp, r['choices'])]
            acc.append(float(max(range(len(lp)), key=lp.__getitem__) == r['answer']))
            acc_norm.append(float(max(range(len(lp)), key=per_byte.__getitem__) == r['answer']))
        items = {'acc': acc, 'acc_norm': acc_norm}
        headline = {k: sum(v) / len(v) for k, v in items.items()}
    else:
        if chat:
            answers = answer(model, tok, [_as_chat(r['prompt']) for r in rows], max_new_tokens, batch_size, True,
                             **sampling)
        else:
            if any(isinstance(r['prompt'], list) for r in rows):
                raise ValueError(f'{path} has chat rows (messages), but chat=False asks for raw prompts')
            done = generate(model, [tok.encode(r['prompt']) for r in rows], max_new_tokens, tokenizer=tok,
                            **{'temperature': 0.0, **sampling})
            answers = [c.text.strip() for c in done]
        headline, items = score_generation(answers, rows, metrics, normalize)
        out['answers'] = answers
    out['metrics'] = headline
    out['stderr'] = standard_errors(items, headline)
    out['items'] = items
    return out

def standard_errors(items, headline):
    """The standard error of each headline mean over its per-item scores: sample standard deviation / sqrt(n)."""
    return {k: (sum((x - headline[k]) ** 2 for x in v) / max(1, len(v) - 1) / len(v)) ** 0.5
            for k, v in items.items() if k in headline}

def template_table(results, n_boot=1000, seed=1337):
    """Print the benchmark's first metric under each (template, shots) with a 95% bootstrap interval, and the
    difference from the zero-shot run without a template (the first result when there is none) with a paired test
    on the same items (results.paired_test: exact McNemar for 0/1 scores)."""
    import numpy as np
    from nanolab.results import _bootstrap_means, paired_test
    key = next(iter(results[0]['items']))
    base = next((r for r in results if not r['settings']['template'] and r['settings']['shots'] == 0), results[0])
    print(f"\n| template | shots | {key} | 95% interval | vs {base['settings']['template'] or 'none'}, "
          f"{base['settings']['shots']} shots | p |\n|---|---|---|---|---|---|")
    for r in results:
        x = np.asarray(r['items'][key], dtype=float)
        lo, hi = np.percentile(_bootstrap_means(x, n_boot, seed), [2.5, 97.5])
        d = (x.mean() - np.mean(base['items'][key])) * 100
        p = paired_test(x, base['items'][key], n_boot, seed)[0] if r is not base else None
        print(f"| {r['settings']['template'] or 'none'} | {r['settings']['shots']} | {x.mean():.3f} | "
              f"{lo:.3f}-{hi:.3f} | {'' if r is base else f'{d:+.1f} points'} | {'' if p is None else f'{p:.3g}'} |")

# -----------------------------------------------------------------------------
if __name__ == '__main__':
    from nanolab.configurator import configure
    from nanolab.checkpoint import load_model
    from nanolab.device import DTYPES, autocast_ctx, resolve_device, resolve_dtype
    from nanolab.results import checkpoint_sources, save_result, show_leaderboard, update_model_card
    from nanolab.training import fail  # bad input: one line that names the problem and the fix, exit 1, no traceback
    config = configure(globals(), choices={'normalize': ('strip', 'lower', 'tasks'),
                                           'dtype': DTYPES})

    if arena:  # the arena's statistics (arena.py), then exit
        from nanolab import arena as arena_stats_module  # `arena` is the setting
        try:
            arena_stats_module.report(arena, bootstrap, seed, arena_judge, arena_to_pairs)
        except ValueError as e:
            fail(e)
        sys.exit(0)
    if leaderboard:
        try:
            show_leaderboard([d for d in leaderboard.split(',') if d], sort_by, leaderboard_out, bootstrap, seed)
        except ValueError as e:
            fail(e)
        sys.exit(0)
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
    try:
        device = resolve_device(device)
        ptdtype = resolve_dtype(dtype, device)
        sources = checkpoint_sources(init_from) if checkpoints else [init_from]
    except ValueError as e:
        fail(e)
    ctx = autocast_ctx(device, ptdtype)
    # results go with the run: its out_dir, or the folder of a .pt file; a Hugging Face model gets eval-<name>/
    is_run = os.path.exists(os.path.join(init_from, 'ckpt.pt'))
    results_dir = out_dir or (init_from if is_run else os.path.dirname(init_from) or '.' if init_from.endswith('.pt')
                              else 'eval-' + os.path.basename(os.path.normpath(init_from)))
    if normalize == 'tasks':
        from nanolab import synthetic as tasks_suite
        norm = tasks_suite.normalize
    else:
        norm = NORMALIZERS[normalize]
    bench_path = benchmark
    if benchmark == 'tasks':  # the post-training suite's held-out instructions, prepared when missing
        import data
        bench_path = os.path.join(data.prepare('tasks', data_dir=data_dir), 'val.jsonl')
        if normalize == 'strip':
            from nanolab import synthetic as tasks_suite
            norm = tasks_suite.normalize
        if bench_metrics == 'exact_match,contains,bleu,rouge_l':  # the default: BLEU needs 4-grams, ROUGE-L = EM here
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
            from nanolab.formats import read_sft
            from nanolab import synthetic as tasks_suite
            train = read_sft(os.path.join(os.path.dirname(bench_path), 'train.jsonl'))[:1000]
            shot_examples = [{'question': r['messages'][-2]['content'], 'answer': tasks_suite.normalize(r['messages'][-1]['content'])}
                             for r in train]
        else:
            fail('--shots needs --shots_file=JSONL of {question, answer} rows (or --benchmark=tasks)')
    if template:
        try:  # each template checked before any model loads (templated's check)
            for t in template.split(','):
                templated(t.strip())
        except (KeyError, ValueError) as e:
            fail(e.args[0])
    torch.manual_seed(seed)
    sampling = {'temperature': temperature, 'top_k': top_k, 'top_p': top_p} if temperature > 0 else {}
    for source in sources:
        try:
            model, tok, ckpt = load_model(source, device)
        except ValueError as e:
            fail(e)
        if tok is None:
            fail(f'{source} has no tokenizer; evaluate needs one to read text')
        print(f"{source}: {model.num_params(non_embedding=False) / 1e6:.2f}M parameters, {device}, "
              f"{str(ptdtype).replace('torch.', '')}")
        where = os.path.join(source, 'ckpt.pt') if os.path.isdir(source) and ckpt else source
        base = {'model': init_from, 'checkpoint': where, 'iter': ckpt.get('iter_num')}
        jobs = []
        if tasks:
            from nanolab.harness import run_harness
            jobs.append(lambda: run_harness(model, tok, tasks, include_path, num_fewshot, limit, batch_size, output_path, ctx,
                                            os.path.basename(os.path.normpath(source)), confirm_run_unsafe_code))
        if bench_path:  # one result per (template, shots): benchmark:NAME, or benchmark:NAME[template=T,shots=K]
            def bench_jobs():
                out = []
                for t in template.split(','):
                    for k in (int(x) for x in shots.split(',')):
                        name = benchmark if benchmark == 'tasks' else os.path.splitext(os.path.basename(bench_path))[0]
                        tag = f"{name}[template={t or 'none'},shots={k}]" if (template or shots != '0') else name
                        out.append(run_benchmark(model, tok, bench_path, bench_metrics.split(','), norm, chat,
                                                 max_new_tokens, batch_size, limit, ctx, tag,
                                                 templated(t.strip(), k, shot_examples, seed), code, **sampling))
                        out[-1]['settings'].update(template=t.strip(), shots=k)
                return out
            jobs.append(bench_jobs)
        if perplexity or not jobs:
            ppl_source = perplexity or ckpt.get('config', {}).get('dataset', '')
            if not ppl_source:
                fail(f"{source} does not say which dataset it was trained on; pass --perplexity=DATASET or a text file")
            jobs.append(lambda: [run_perplexity(model, tok, ppl_source, stride, max_tokens, batch_size, data_dir, ctx)])
        for job in jobs:
            t0 = time.time()
            try:
                with ctx:  # autocast on GPUs (bf16/fp16), for generation too; nothing on the CPU in fp32
                    results = job()
            except (ValueError, FileNotFoundError) as e:
                fail(e)
            for r in results:
                r = {**base, **r, 'time': round(time.time() - t0, 2), 'config': config}
                path = save_result(results_dir, r)
                shown = ', '.join(f'{k} {v:.4f}' + (f" ± {r['stderr'][k]:.4f}" if k in r.get('stderr', {}) else '')
                                  for k, v in r['metrics'].items())
                print(f"{r['task']}: {shown} (n={r['n']}, {r['time']:.1f} s) -> {path}")
            if len(results) > 1 and all('shots' in r.get('settings', {}) for r in results):
                template_table(results, bootstrap, seed)
    update_model_card(results_dir)
