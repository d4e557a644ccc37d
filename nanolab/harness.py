"""
Our model as an lm-evaluation-harness LM, and run_harness, which evaluate.py's --tasks calls.
Requests are split and windowed as lm-eval's own Hugging Face backend does, so both give identical
weights identical scores (tests/test_harness.py); scoring is likelihood.score_continuations,
decoding generation.generate.

    python evaluate.py --init_from=out-x --tasks=hellaswag --num_fewshot=0 --limit=200
    from nanolab.harness import harness_lm_class; harness_lm_class()   # registers 'nanolab', so:
    lm_eval.simple_evaluate(model='nanolab', model_args='init_from=out-x')
"""
import glob
import json
import os
import sys

from nanolab.likelihood import score_continuations
from nanolab.generation import generate


HARNESS_DATA_HELP = ("give a local YAML task with --include_path=DIR (dataset_path: "
                     "json, dataset_kwargs: {data_files: ...}), or make its Hugging "
                     "Face dataset reachable: run once online so it is cached, then "
                     "HF_DATASETS_OFFLINE=1 reads it from the cache")
GEN_KWARGS = ('temperature', 'top_k', 'top_p', 'min_p', 'repetition_penalty', 'num_beams',
              'length_penalty')

def harness_lm_class():
    """Our model as an lm-eval LM. The class is built on first use, so importing this module does
    not import lm-eval, and registered as 'nanolab': after this has run,
    lm_eval.simple_evaluate(model='nanolab', model_args='init_from=out-x') works too. Requests are
    tokenized as lm-eval's `hf` backend does them, so both give identical weights the same scores
    (tests/test_harness.py); scoring is score_continuations, decoding generate."""
    if getattr(harness_lm_class, 'cls', None):
        return harness_lm_class.cls
    import importlib
    # subtle: lm-eval fills its registry only while it is empty: before ours
    importlib.import_module('lm_eval.models')
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    from tqdm import tqdm

    @register_model('nanolab')
    class NanoLM(LM):
        def __init__(self, model=None, tok=None, init_from='', batch_size=16, device=None,
                     dtype='auto', ctx=None, max_batch_size=None):
            super().__init__()
            # lm-eval's own entry points: model='nanolab', model_args='init_from=...'
            if model is None:
                from nanolab.checkpoint import load_model
                from nanolab.device import autocast_ctx, resolve_device, resolve_dtype
                device = resolve_device(device or 'auto')
                model, tok, _ = load_model(init_from, device)
                ctx = autocast_ctx(device, resolve_dtype(dtype, device))
            if tok is None:
                raise ValueError(f"{init_from or 'the model'} has no tokenizer; lm-eval "
                                 "needs one to read its text")
            if not str(batch_size).isdigit():
                raise ValueError(f"batch_size={batch_size!r}: nanolab takes "
                                 "requests per forward, not 'auto'")
            self.model, self.tok, self.batch_size, self.ctx = model, tok, int(batch_size), ctx
            self.T = model.config.block_size
            # what an empty context (and each document's first rolling window) is conditioned on:
            # end-of-text, as HF's backend does; a char-level vocabulary has none, so a newline,
            # where nanoGPT starts its samples
            self.prefix = tok.eot if tok.eot is not None else tok.encode('\n')[0]
            self.truncated = 0  # requests that lost context from the left

        def _pair(self, context, continuation):
            """(context ids, continuation ids) split as HF's backend splits them: the context's
            trailing whitespace moves to the continuation, which is the tail of encode(context +
            continuation), so the tokens at the seam are those of the whole text (encoding the
            parts apart would split words differently)."""
            n = len(context) - len(context.rstrip())
            context, continuation = context[:len(context) - n], \
                context[len(context) - n:] + continuation
            if not context:  # condition on the prefix token, unless the text starts with it anyway
                k = self.tok.encode(continuation)
                return (k[:1], k[1:]) if k[:1] == [self.prefix] else ([self.prefix], k)
            c = self.tok.encode(context)
            return c, self.tok.encode(context + continuation)[len(c):]

        def _score(self, pairs, disable_tqdm):
            """score_continuations on slices of 1024 pairs, longest first (batches still pad
            little), with progress."""
            order, out = sorted(range(len(pairs)), key=lambda i: -sum(map(len, pairs[i]))), {}
            with tqdm(total=len(order), disable=disable_tqdm or len(order) <= 1024,
                      unit='request') as bar:
                for s in range(0, len(order), 1024):
                    part = order[s:s + 1024]
                    out.update(zip(part, score_continuations(self.model, [pairs[i] for i in part],
                                                             self.batch_size, self.ctx)))
                    self.truncated += score_continuations.truncated
                    bar.update(len(part))
            return [out[i] for i in range(len(pairs))]

        def loglikelihood(self, requests, disable_tqdm=False):
            return self._score([self._pair(*r.args) for r in requests], disable_tqdm)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            """log p(text) over windows of block_size tokens: lm-eval's rolling windows (each token
            scored once, the last window backed up to a full context), every document's windows
            scored together."""
            owner, pairs = [], []
            for i, r in enumerate(requests):
                for w in get_rolling_token_windows(self.tok.encode(r.args[0]), self.prefix, self.T,
                                                   context_len=1):
                    owner.append(i)
                    pairs.append(make_disjoint_window(w))
            total = [0.0] * len(requests)
            for i, (lp, _) in zip(owner, self._score(pairs, disable_tqdm)):
                total[i] += lp
            return total

        def generate_until(self, requests, disable_tqdm=False):
            """generate in batches, one group per distinct generation settings (greedy unless
            do_sample), stopping at the task's `until` strings or the eot token, or after
            max_gen_toks tokens."""
            groups, out = {}, [None] * len(requests)
            for i, r in enumerate(requests):
                groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
            eos = self.tok.decode([self.tok.eot]) if self.tok.eot is not None else None
            for idx in groups.values():
                # 256: HF's default max_gen_toks
                kw = dict(normalize_gen_kwargs(requests[idx[0]].args[1], 256))
                until = [s for s in handle_stop_sequences(kw.pop('until'), eos) if s]
                n, do_sample = kw.pop('max_gen_toks'), kw.pop('do_sample')
                kw['temperature'] = float(kw.get('temperature', 1.0)) if do_sample else 0.0
                if set(kw) - set(GEN_KWARGS):
                    raise ValueError(f'generation settings {sorted(set(kw) - set(GEN_KWARGS))} '
                                     'are not supported; sample.generate takes '
                                     f'{", ".join(GEN_KWARGS)}')
                # contexts keep their last tokens, leaving room for the answer (at most half the
                # window: a longer one goes on in generate's sliding window, where HF's backend
                # refuses)
                room = self.T - max(1, min(n, self.T // 2))
                prompts = [self.tok.encode(requests[i].args[0]) or [self.prefix] for i in idx]
                self.truncated += sum(len(p) > room for p in prompts)
                # longest first: batches pad little
                order = sorted(range(len(idx)), key=lambda j: -len(prompts[j]))
                for s in tqdm(range(0, len(order), self.batch_size),
                              disable=disable_tqdm or len(order) < 256, desc='nanolab generating'):
                    chunk = order[s:s + self.batch_size]
                    done = generate(self.model, [prompts[j][-room:] for j in chunk], n,
                                    stop_strings=until, tokenizer=self.tok, **kw)
                    for j, c in zip(chunk, done):
                        out[idx[j]] = c.text
            return out

    harness_lm_class.cls = NanoLM
    return NanoLM

def _task_manager(include_path, names):
    """lm-eval's TaskManager that knows `names`: include_path's tasks alone when they are all
    there, else with lm-eval's own. Cached, as indexing lm-eval's ~15k task YAMLs takes ~10 s on 2
    cores."""
    import difflib
    import yaml
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml
    if include_path and not os.path.isdir(include_path):
        raise ValueError(f'include_path {include_path} is not a directory; give a '
                         'directory of lm-eval task YAMLs')
    for path in sorted(glob.glob(os.path.join(include_path, '**', '*.yaml'), recursive=True)) \
            if include_path else []:
        try:  # lm-eval skips a file it cannot parse without a word; say which one
            load_yaml(path, resolve_func=False)
        except (yaml.YAMLError, ValueError, OSError) as e:
            raise ValueError(f'{path}: not a valid lm-eval task YAML ({str(e).strip()})') from None
    cache = _task_manager.__dict__.setdefault('cache', {})
    for defaults in ([False] if include_path else []) + [True]:
        key = (os.path.abspath(include_path) if include_path else '', defaults)
        if key not in cache:
            cache[key] = TaskManager(include_path=include_path or None, include_defaults=defaults)
        known = set(cache[key].all_tasks)
        if all(n in known or n.endswith('.yaml') and os.path.isfile(n) for n in names):
            return cache[key]
    unknown = [n for n in names if n not in known][0]
    close = difflib.get_close_matches(unknown, known, n=3)
    raise ValueError(f"unknown lm-eval task '{unknown}'" +
                     (f' (did you mean {", ".join(close)}?)' if close else '') +
                     f'; {HARNESS_DATA_HELP}')

def run_harness(model, tok, tasks, include_path='', num_fewshot=-1, limit=0, batch_size=16,
                output_path='', ctx=None, model_name='nanolab', confirm_run_unsafe_code=False):
    """lm-eval's simple_evaluate on our model -> one result dict per task (and group): metrics and
    stderr under lm-eval's names (the default filter's ',none' dropped, another filter's name
    appended: 'exact_match_strict-match'), per-item scores from its logged samples, and settings.
    tasks: comma-separated names (or a list); num_fewshot -1 = each task's default; limit 0 = every
    document. output_path: also write lm-eval's own results JSON, as its CLI's --output_path does:
    a directory gets DIR/<model_name>/results_<time>.json, a path ending in .json gets
    <stem>_<time>.json beside it. confirm_run_unsafe_code: lm-eval runs tasks marked unsafe
    (humaneval, mbpp: they execute the model's programs) only with it; it also sets
    HF_ALLOW_CODE_EVAL=1, the switch of the `evaluate` library's code_eval metric that those tasks
    use. Groups (MMLU and its categories) keep their tree: a group's result lists its 'subtasks',
    each subtask names its 'group'."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    names = [t.strip() for t in tasks.split(',') if t.strip()] if isinstance(tasks, str) else \
        list(tasks)
    if not names:
        raise ValueError('no lm-eval tasks given; pass --tasks=NAME[,NAME...]')
    manager = _task_manager(include_path, names)
    lm = harness_lm_class()(model, tok, batch_size=batch_size, ctx=ctx)
    tracker = EvaluationTracker(output_path=output_path) if output_path else None
    was_training = model.training
    model.eval()  # no dropout while scoring (a training loop may call this); restored below
    if confirm_run_unsafe_code:
        os.environ['HF_ALLOW_CODE_EVAL'] = '1'
    try:
        res = lm_eval.simple_evaluate(lm, {'model': model_name}, names,
                                      num_fewshot=None if num_fewshot < 0 else num_fewshot,
                                      limit=limit or None, task_manager=manager, log_samples=True,
                                      evaluation_tracker=tracker,
                                      confirm_run_unsafe_code=confirm_run_unsafe_code)
    except ValueError as e:
        if 'unsafe' in str(e):  # lm-eval's refusal, in our terms
            raise ValueError(f'{e} With evaluate.py: --confirm_run_unsafe_code=True '
                             '(the programs run unsandboxed inside lm-eval\'s '
                             'code_eval; read its warning first)') from None
        raise
    except Exception as e:
        # a dataset that cannot be read (offline and not cached) fails in there: find the task by
        # loading each one alone; an error that is not about loading a task is not ours to rename
        for n in names:
            try:
                manager.load([n])
            except Exception as e2:
                raise ValueError(f"lm-eval task '{n}' could not load its data "
                                 f"({type(e2).__name__}: {str(e2).strip()[:300]}); "
                                 f"{HARNESS_DATA_HELP}") from e
        raise
    finally:
        model.train(was_training)
    if lm.truncated:
        print(f'warning: {lm.truncated} lm-eval requests were longer than the block size ({lm.T} '
              'tokens) and lost context from the left', file=sys.stderr)
    if tracker:  # the aggregated results file only, as lm-eval's CLI without --log_samples
        tracker.save_results_aggregated({k: v for k, v in res.items() if k != 'samples'},
                                        res['samples'])
    def metric(name, filt):
        return name if filt == 'none' else f'{name}_{filt}'
    out = []
    for name, r in res['results'].items():  # tasks, and groups with their aggregated metrics
        metrics, stderr, items = {}, {}, {}
        for key, v in r.items():  # 'acc,none', 'acc_stderr,none' ('N/A' where there is none)
            if ',' in key and isinstance(v, (int, float)):
                m, filt = key.split(',', 1)
                (stderr if m.endswith('_stderr') else metrics)[
                    metric(m.removesuffix('_stderr'), filt)] = v
        samples = res['samples'].get(name, [])  # one per document and filter
        for s in samples:
            for m in ('acc', 'acc_norm', 'exact_match'):
                if isinstance(s.get(m), (int, float)):
                    items.setdefault(metric(m, s['filter']), []).append(float(s[m]))
        n = sum(res['n-samples'].get(t, {}).get('effective', 0)
                for t in res['group_subtasks'].get(name) or [name])
        tree = {'subtasks': [f'lm_eval:{t}' for t in res['group_subtasks'][name]]} \
            if res['group_subtasks'].get(name) else {}
        parent = next((g for g, subs in res['group_subtasks'].items() if name in subs), None)
        tree.update({'group': f'lm_eval:{parent}'} if parent else {})
        out.append({'task': f'lm_eval:{name}', **tree, 'metrics': metrics, 'stderr': stderr,
                    'n': n,
                    'settings': {'num_fewshot': res['n-shot'].get(name, num_fewshot),
                                 'limit': limit, 'include_path': include_path,
                                 'batch_size': batch_size},
                    'items': items,
                    'item_ids': [s['doc_id'] for s in samples
                                 if s['filter'] == samples[0]['filter']]})
    return out
