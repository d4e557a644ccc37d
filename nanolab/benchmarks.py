"""
Custom benchmarks: a JSONL file of rows scored by generation metrics (exact match, contains, BLEU,
ROUGE-L, METEOR), by the likelihood of each choice (multiple choice), or by running the programs
the model writes (code, HumanEval's format, pass@k); each under prompt templates and few-shot
examples (templated). evaluate.py runs them and stores the results.

    r = run_benchmark(model, tok, 'qa.jsonl', metrics=('exact_match', 'contains'))
    r['metrics'], r['stderr'], r['items']   # headline means, their standard errors, item scores
"""
import json
import os

from nanolab import prompts
from nanolab.generation import generate
from nanolab.likelihood import score_continuations
from nanolab.metrics import answer, score_generation, standard_errors
from nanolab.progress import Progress
from nanolab.sandbox import CODE_STOPS, check_program, pass_at_k


def read_benchmark(path):
    """Rows of a benchmark JSONL, one schema: {'id', 'prompt': text or messages, 'references':
    [text, ...]} for generation, or {'id', 'prompt', 'choices': [text, ...], 'answer': index} for
    multiple choice. Accepted rows: {prompt, reference (text or list)}, {prompt, choices, answer
    (index or the choice's text)}, SFT rows ({messages} ending in the assistant's reference),
    Alpaca rows ({instruction, input, output}), and code rows in HumanEval's format ({task_id,
    prompt, canonical_solution, test, entry_point} -> {'id', 'prompt', 'test', 'entry_point',
    'canonical_solution'}). A malformed row is an error naming the file and the 1-based line."""
    rows = []
    with open(path, encoding='utf-8') as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f'{path}, line {n}'
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f'{where}: not valid JSON ({e.msg}); a benchmark file '
                                 'holds one JSON object per line') from None
            if not isinstance(r, dict):
                raise ValueError(f'{where}: expected a JSON object, got {type(r).__name__}')
            rid = str(r.get('id', n))
            if 'messages' in r:
                m = r['messages']
                if not (isinstance(m, list) and len(m) >= 2 and m[-1].get('role') == 'assistant'):
                    raise ValueError(f"{where}: 'messages' must end with the "
                                     "assistant's reference answer")
                rows.append({'id': rid, 'prompt': m[:-1], 'references': [m[-1]['content']]})
            elif 'instruction' in r and 'output' in r:
                prompt = r['instruction'] + (f"\n\n{r['input']}" if r.get('input') else '')
                rows.append({'id': rid, 'prompt': [{'role': 'user', 'content': prompt}],
                             'references': [r['output']]})
            elif {'task_id', 'prompt', 'test', 'entry_point'} <= set(r):
                # HumanEval's own row format
                if not all(isinstance(r[k], str) and r[k]
                           for k in ('task_id', 'prompt', 'test', 'entry_point')):
                    raise ValueError(f"{where}: a code row's task_id, prompt, test and "
                                     "entry_point must be non-empty text")
                rows.append({'id': r['task_id'], 'prompt': r['prompt'], 'test': r['test'],
                             'entry_point': r['entry_point'],
                             'canonical_solution': r.get('canonical_solution')})
            elif 'prompt' in r and 'choices' in r:
                ch, a = r['choices'], r.get('answer')
                if not (isinstance(ch, list) and len(ch) >= 2
                        and all(isinstance(c, str) and c for c in ch)):
                    raise ValueError(f"{where}: 'choices' must be a list of at "
                                     "least 2 non-empty strings")
                if isinstance(a, str) and a in ch:
                    a = ch.index(a)
                if not (isinstance(a, int) and not isinstance(a, bool) and 0 <= a < len(ch)):
                    raise ValueError(f"{where}: 'answer' must be the index of the right choice "
                                     f"(0-{len(ch) - 1}) or its text, got {a!r}")
                rows.append({'id': rid, 'prompt': r['prompt'], 'choices': ch, 'answer': a})
            elif 'prompt' in r and 'reference' in r:
                ref = r['reference'] if isinstance(r['reference'], list) else [r['reference']]
                if not ref or not all(isinstance(x, str) for x in ref) \
                        or not isinstance(r['prompt'], (str, list)):
                    raise ValueError(f"{where}: 'prompt' must be text (or messages) and "
                                     "'reference' text or a list of texts")
                rows.append({'id': rid, 'prompt': r['prompt'], 'references': ref})
            else:
                raise ValueError(f'{where}: has keys {sorted(r)}; a benchmark row needs prompt + '
                                 'reference, prompt + choices + answer, messages, instruction + '
                                 'output, or HumanEval\'s task_id + prompt + test + entry_point')
    if not rows:
        raise ValueError(f'{path} holds no rows')
    if len({'choices' in r for r in rows}) > 1 or len({'test' in r for r in rows}) > 1:
        raise ValueError(f'{path} mixes kinds of rows (multiple choice, generation, code); '
                         'put each kind in its file')
    return rows

def _as_chat(prompt):
    return prompt if isinstance(prompt, list) else [{'role': 'user', 'content': prompt}]

def templated(template='', shots=0, examples=(), seed=1337):
    """A prompt transform for run_benchmark: k few-shot examples (prompts.few_shot, 'qa_pair',
    picked by seed) and the row's prompt put into `template`'s one variable ('' = the prompt as it
    is). A chat prompt's last turn is the text that goes in; a text template's result becomes that
    turn again, a chat template's messages replace it."""
    if template and len(prompts.variables(template)) != 1:
        raise ValueError(f"template '{template}' takes {prompts.variables(template)}; a benchmark "
                         "template takes one variable, which the row's prompt fills")
    prefix = prompts.few_shot(list(examples), shots, seed) + '\n\n' if shots else ''

    def transform(prompt):
        text = prompt if isinstance(prompt, str) else prompt[-1]['content']
        filled = prompts.render(template, **{prompts.variables(template)[0]: text}) \
            if template else text
        # a chat template: its messages, the examples before the last turn's text
        if isinstance(filled, list):
            return filled[:-1] + [{**filled[-1], 'content': prefix + filled[-1]['content']}]
        return prefix + filled if isinstance(prompt, str) else \
            prompt[:-1] + [{**prompt[-1], 'content': prefix + filled}]
    return transform

def run_code(model, tok, rows, max_new_tokens=256, n_samples=1, ks=(1,), timeout_s=10.0,
             memory_mb=1024, confirm=False, seed=1337, **sampling):
    """Code rows (HumanEval's format): n_samples completions of each prompt through generate (raw
    text, no chat template; stopped at CODE_STOPS; greedy unless sampling says otherwise), each
    program (prompt + completion) run with its tests by check_program -> metrics pass@k for each k
    (the mean over problems of pass_at_k(n, c, k)), per-problem scores, and every sample's verdict.
    confirm: running model-written code is unsafe (sandbox.py says what the sandbox does not stop);
    nothing runs without it."""
    if not confirm:
        raise ValueError('a code benchmark runs the programs the model writes; pass '
                         '--confirm_run_unsafe_code=True once you have read what the sandbox does '
                         'not protect against (nanolab/sandbox.py, docs/evaluation.md)')
    bad = [k for k in ks if k > n_samples]
    if bad:
        raise ValueError(f'pass@{bad[0]} needs at least {bad[0]} samples per problem; '
                         f'raise --n_samples to {bad[0]}')
    done = generate(model, [tok.encode(r['prompt']) for r in rows], max_new_tokens,
                    num_samples=n_samples, stop_strings=CODE_STOPS, tokenizer=tok, seed=seed,
                    **{'temperature': 0.0, **sampling})
    verdicts, shown = [[] for _ in rows], Progress(len(done), 'running programs', 'programs')
    # one process at a time: each is limited, and the machine is shared
    for k, c in enumerate(done, 1):
        r = rows[c.prompt_index]
        verdicts[c.prompt_index].append((c.text,) + check_program(
            r['prompt'] + c.text, r['test'], r['entry_point'], timeout_s, memory_mb))
        shown.update(k)
    passed = [sum(ok for _, ok, _ in v) for v in verdicts]
    items = {f'pass@{k}': [pass_at_k(n_samples, c, k) for c in passed] for k in ks}
    headline = {k: sum(v) / len(v) for k, v in items.items()}
    return {'metrics': headline, 'items': items, 'stderr': standard_errors(items, headline),
            'samples': [[{'completion': t, 'passed': ok, 'why': why} for t, ok, why in v]
                        for v in verdicts],
            'settings': {'n_samples': n_samples, 'ks': list(ks), 'timeout_s': timeout_s,
                         'memory_mb': memory_mb, 'max_new_tokens': max_new_tokens,
                         'stop': CODE_STOPS, 'seed': seed, **sampling}}

def run_benchmark(model, tok, path, metrics=('exact_match',), normalize=str.strip, chat=True,
                  max_new_tokens=32, batch_size=16, limit=0, ctx=None, name='', prompt_fn=None,
                  code=None, **sampling):
    """Score a model on a benchmark file (read_benchmark) -> a result dict (metrics, stderr,
    per-item scores). prompt_fn: maps each row's prompt before it is asked (templated(): a template
    and few-shot examples).
    Code rows: run_code, with code's settings (n_samples, ks, timeout_s, memory_mb, confirm, seed).
    Generation rows: the model's answers (answer(), through generate) scored by score_generation.
    Multiple-choice rows: accuracy (the likeliest choice is the answer) and acc_norm (likelihood
    per byte)."""
    rows = read_benchmark(path)[:limit or None]
    if prompt_fn is not None:
        rows = [{**r, 'prompt': prompt_fn(r['prompt'])} for r in rows]
    name = name or os.path.splitext(os.path.basename(path))[0]
    out = {'task': f'benchmark:{name}', 'n': len(rows), 'item_ids': [r['id'] for r in rows],
           'settings': {'chat': chat, 'max_new_tokens': max_new_tokens, **sampling}}
    if 'test' in rows[0]:
        return {**out, 'task': f'code:{name}', **run_code(model, tok, rows, max_new_tokens,
                                                          **(code or {}), **sampling)}
    if 'choices' in rows[0]:
        def context(r):
            return tok.render_chat(_as_chat(r['prompt']), add_generation_prompt=True)[0] \
                if chat else tok.encode(r['prompt'])
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
            answers = answer(model, tok, [_as_chat(r['prompt']) for r in rows], max_new_tokens,
                             batch_size, True, **sampling)
        else:
            if any(isinstance(r['prompt'], list) for r in rows):
                raise ValueError(f'{path} has chat rows (messages), but '
                                 'chat=False asks for raw prompts')
            done = generate(model, [tok.encode(r['prompt']) for r in rows], max_new_tokens,
                            tokenizer=tok, **{'temperature': 0.0, **sampling})
            answers = [c.text.strip() for c in done]
        headline, items = score_generation(answers, rows, metrics, normalize)
        out['answers'] = answers
    out['metrics'] = headline
    out['stderr'] = standard_errors(items, headline)
    out['items'] = items
    return out

def template_table(results, n_boot=1000, seed=1337):
    """Print the benchmark's first metric under each (template, shots) with a 95% bootstrap
    interval, and the difference from the zero-shot run without a template (the first result when
    there is none) with a paired test on the same items (results.paired_test: exact McNemar for 0/1
    scores)."""
    import numpy as np
    from nanolab.results import bootstrap_means, paired_test
    key = next(iter(results[0]['items']))
    base = next((r for r in results if not r['settings']['template']
                 and r['settings']['shots'] == 0), results[0])
    print(f"\n| template | shots | {key} | 95% interval | vs "
          f"{base['settings']['template'] or 'none'}, {base['settings']['shots']} shots | p "
          "|\n|---|---|---|---|---|---|")
    for r in results:
        x = np.asarray(r['items'][key], dtype=float)
        lo, hi = np.percentile(bootstrap_means(x, n_boot, seed), [2.5, 97.5])
        d = (x.mean() - np.mean(base['items'][key])) * 100
        p = paired_test(x, base['items'][key], n_boot, seed)[0] if r is not base else None
        print(f"| {r['settings']['template'] or 'none'} | {r['settings']['shots']} | "
              f"{x.mean():.3f} | {lo:.3f}-{hi:.3f} | {'' if r is base else f'{d:+.1f} points'} | "
              f"{'' if p is None else f'{p:.3g}'} |")

