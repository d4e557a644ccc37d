"""
The endpoints behind the page's views, which server.py routes beside OpenAI's API (ROUTES): prompt
templates, the tokenizer comparison, attention maps, the logit lens and activation flow, the
embedding map, the arena, the runs, the leaderboard, the models on disk, the jobs (jobs.py) and
the recipes and settings they start from.
Each endpoint is fn(handler, body): it reads h.engine(body), h.server (engines, runs_dir, jobs)
and answers with h.send_json; bad input is an httpd.ApiError, a 4xx. What runs a model goes
through Engine.call, on the engine thread.
"""
import ast
import glob
import itertools
import json
import os
import re
import time
from dataclasses import asdict, fields
from datetime import datetime, timezone

import torch

from model import ARCHS, GPT, POSITIONS, GPTConfig
from nanolab import hf, prompts
from nanolab.checkpoint import model_name
from nanolab.configurator import describe
from nanolab.files import finite
from nanolab.httpd import ApiError
from nanolab.interpret import activation_flow, logit_lens
from nanolab.jobs import REPO, SCRIPTS
from nanolab.openai_api import encode, flag, is_ids, number
from nanolab.results import LOWER_IS_BETTER, checkpoint_history, leaderboard_rows, read_results
from nanolab.runs import model_registry, read_runs

# -----------------------------------------------------------------------------
# the views

# prompt tokens for /v1/attention: the maps grow as layers * heads * T^2
ATTENTION_LIMIT = 128
ATTENTION_VALUES = 1 << 20  # numbers one /v1/attention answer may hold (about 8 MB of JSON)

def _short_prompt(w, body):
    """body['prompt'] (text or token ids) as ids, 1 to ATTENTION_LIMIT tokens (and within the
    model's context)."""
    p = body.get('prompt')
    ids = encode(w, p, 'prompt') if isinstance(p, str) else p
    if not is_ids(ids) or not 0 < len(ids) <= min(ATTENTION_LIMIT, w.block_size) \
            or any(not 0 <= t < w.V for t in ids):
        raise ApiError(400,
                       "'prompt' must be text or token ids, 1 to "
                       f"{min(ATTENTION_LIMIT, w.block_size)} tokens",
                       'prompt')
    return ids

def _templates(h, body):
    h.send_json(200, {'object': 'list', 'data': prompts.catalog()})

def _render_template(h, body):
    """The page's template tool: a library template ('template') or one's own text ('text'), its
    'variables', 'cot', and few-shot examples ('shots': {examples, k, seed}, formatted by
    prompts.few_shot) before it -> the exact prompt (text, or chat messages), its token ids as the
    model sees them, and their count."""
    name, w = h.engine(body)
    values, shots = body.get('variables') or {}, body.get('shots') or {}
    if not isinstance(values, dict) or not isinstance(shots, dict):
        raise ApiError(400, "'variables' and 'shots' must be objects", 'variables')
    k = number(shots, 'k', 0, 0, 10_000, integer=True)  # checked here: int() of infinity raises
    seed = number(shots, 'seed', 0, 0, 2 ** 62, integer=True)
    try:
        if isinstance(body.get('text'), str):
            out = prompts.render_text(body['text'], values)
        else:
            out = prompts.fill(str(body.get('template')), values, flag(body, 'cot'))
        ex = shots.get('examples') or []
        if not isinstance(ex, list) or not all(isinstance(e, dict) for e in ex):
            raise ValueError("'shots': examples must be a list of {question, answer} objects")
        prefix = prompts.few_shot(ex, k, seed) + '\n\n' if k else ''
        if isinstance(out, list):
            out = out[:-1] + [{**out[-1], 'content': prefix + out[-1]['content']}]
            ids = w.tok.render_chat(out, add_generation_prompt=True)[0]
        else:
            out = prefix + out
            ids = encode(w, out, 'text')
    except (KeyError, ValueError, TypeError) as e:
        raise ApiError(400, f"'template': {e.args[0] if e.args else e}", 'template') from None
    h.send_json(200, {'prompt': out, 'chat': isinstance(out, list), 'tokens': ids,
                      'count': len(ids), 'max_model_len': w.block_size})

TOKCMP_CHARS = 20000  # text /v1/tokenizers compares: each answer lists every token

_GPT2 = []  # GPT-2's tokenizer, once loaded

def _gpt2_tokenizer():
    """GPT-2's BPE (tiktoken), loaded on first use; ValueError offline without tiktoken's cached
    files."""
    if not _GPT2:
        from nanolab.tokenizer import TiktokenTokenizer
        _GPT2.append(TiktokenTokenizer('gpt2'))
    return _GPT2[0]

def _tokenizers(h, body):
    """The same text under three tokenizers: one character per token, GPT-2's BPE and the model's
    own: each one's tokens (as text), count, vocabulary and bytes per token. One that cannot load
    or encode the text says why."""
    name, w = h.engine(body)
    text = body.get('text')
    if not isinstance(text, str) or not 0 < len(text) <= TOKCMP_CHARS:
        raise ApiError(400, f"'text' must be a string of 1 to {TOKCMP_CHARS} characters", 'text')
    n_bytes = len(text.encode('utf-8'))

    def row(label, get):
        try:
            tok = get()
            if tok is None:  # one token per character, from a vocabulary of the text's characters
                pieces, vocab = list(text), len(set(text))
            else:
                pieces, vocab = [tok.decode([i]) for i in tok.encode(text)], tok.vocab_size
        except ValueError as e:
            # offline without tiktoken's files, or a character outside a char vocabulary
            return {'name': label, 'error': str(e)}
        return {'name': label, 'tokens': pieces, 'count': len(pieces), 'vocab_size': vocab,
                'bytes_per_token': n_bytes / len(pieces)}
    h.send_json(200, {'model': name, 'bytes': n_bytes, 'data': [
        row('characters', lambda: None), row('GPT-2 BPE (tiktoken)', _gpt2_tokenizer),
        row(f'{name} ({w.tok.kind})', lambda: w.tok)]})

def _attention(h, body):
    """Every layer's attention maps for a short prompt, or one layer's ('layer': i); at most
    ATTENTION_VALUES numbers, since the maps grow as layers x heads x T^2."""
    name, w = h.engine(body)
    ids, cfg = _short_prompt(w, body), w.model.config
    layer = number(body, 'layer', None, 0, cfg.n_layer - 1, integer=True)
    values = (1 if layer is not None else cfg.n_layer) * cfg.n_head * len(ids) ** 2
    if values > ATTENTION_VALUES:
        raise ApiError(400,
                       f"the maps would hold {values} numbers, over {ATTENTION_VALUES}; send a "
                       "shorter prompt, or 'layer': i for one layer",
                       'prompt', 'invalid_value')
    # [(1, nh, T, T)] per layer
    maps = w.call(lambda: w.model.trace(torch.tensor([ids], device=w.device))[1]['att'])
    maps = maps if layer is None else maps[layer:layer + 1]
    h.send_json(200, {'model': name, 'tokens': [w.tok.decode([t]) for t in ids], 'layer': layer,
                      'attentions': [[[[round(x, 4) for x in r] for r in head]
                                      for head in a[0].float().tolist()]
                                     for a in maps]})

def _inspect(h, body):
    """What happens inside the model for a short prompt, from one traced forward (GPT.trace): the
    logit lens (each layer's top 'top' predictions at each position, with probabilities) and the
    activation flow (norms of the residual stream and of what attention and the MLP add, per layer
    and position; each head's attention entropy)."""
    name, w = h.engine(body)
    ids, top = _short_prompt(w, body), number(body, 'top', 3, 1, 10, integer=True)

    def run():
        idx = torch.tensor([ids], device=w.device)
        _, trace = w.model.trace(idx)
        lp, ix = logit_lens(w.model, trace)[:, 0].topk(min(top, w.V), dim=-1)  # (L, T, top)
        return lp.exp().tolist(), ix.tolist(), \
            {k: v.tolist() for k, v in activation_flow(trace).items()}
    probs, index, flow = w.call(run)
    r4 = lambda xs: [round(x, 4) for x in xs]
    lens = [[[{'token': w.tok.decode([i]), 'id': i, 'prob': round(p, 4)} for i, p in zip(ii, pp)]
             for ii, pp in zip(li, lp)] for li, lp in zip(index, probs)]  # [layer][position][rank]
    h.send_json(200, {'model': name, 'tokens': [w.tok.decode([t]) for t in ids], 'lens': lens,
                      'flow': {'embed': r4(flow['embed'][0]),
                               **{k: [r4(x[0]) for x in flow[k]]
                                  for k in ('resid', 'attn', 'mlp')},
                               'entropy': [[r4(hd) for hd in x[0]] for x in flow['entropy']]}})

EMBED_POINTS = 4096  # token embeddings /v1/embedding_map projects at most

def _embedding_map(h, body):
    """The token embedding table (wte) projected to 3-D by PCA (the three directions of most
    variance of its first 'n' rows, centred): what the page's overview turns in 3-D. explained:
    each axis's share of the variance."""
    name, w = h.engine(body)
    n = number(body, 'n', 512, 1, EMBED_POINTS, integer=True)

    def run():
        ids = torch.arange(min(n, w.V), device=w.device)
        # (n, C); through the module: int8 tables too
        E = w.model.transformer.wte(ids).detach().float()
        E = E - E.mean(0)
        # E = U S V^T: U S are the rows in V's basis
        U, S, _ = torch.linalg.svd(E, full_matrices=False)
        # 3-D, the widest axis scaled to about [-1, 1]
        pts = (U[:, :3] * S[:3]) / (S[0] if S[0] > 0 else 1)
        return pts.tolist(), (S[:3] ** 2 / (S ** 2).sum().clamp_min(1e-12)).tolist()
    points, explained = w.call(run)
    h.send_json(200, {'model': name, 'tokens': [w.tok.decode([i]) for i in range(len(points))],
                      'points': [[round(x, 4) for x in p] for p in points],
                      'explained': [round(x, 4) for x in explained]})

# the arena: blind pairwise judgments, kept in <runs_dir>/arena/judgments.jsonl (server.arena: an
# arena.Store)

def _arena_judge(h, body):
    """Append one judgment (arena.py's format, every field bounded; the server stamps its time) ->
    {"id", "judged": true}; 507 when the disk takes only part of it (nothing is kept)."""
    j = {**body, 'time': datetime.now(timezone.utc).isoformat(timespec='seconds')}
    try:
        h.server.arena.append(j)
    except ValueError as e:
        raise ApiError(400, f'bad judgment: {e}', None, 'invalid_value') from None
    except OSError as e:
        raise ApiError(507, f"the judgment was not stored ({e.strerror or e}); free some disk "
                       "space under --runs_dir and vote again", None, 'insufficient_storage') \
            from None
    h.send_json(200, {'id': j['id'], 'judged': True})

def _arena_judged(h):
    try:
        return h.server.arena.judgments()
    except ValueError as e:  # a line edited into something else: say where, and keep serving
        raise ApiError(409, f'the arena file is damaged: {e}', None, 'conflict') from None

def _arena_items(h, body):
    """Items for judging again (agreement): the latest version of each item others judged and
    `annotator` has not."""
    who = body.get('annotator', '')
    items = {}
    for j in _arena_judged(h):
        items.setdefault(j['id'], {'id': j['id'], 'prompt': j['prompt'], 'a': j['a'], 'b': j['b'],
                                   'by': set()})['by'].add(j['annotator'])
    todo = [{k: v for k, v in it.items() if k != 'by'} for it in items.values()
            if who not in it['by']]
    h.send_json(200, {'object': 'list', 'data': todo[:50], 'remaining': len(todo)})

def _arena_stats(h, body):
    """arena.arena_stats of the judgments so far (200 bootstrap resamples), or {"judgments": 0}:
    computed once per change of the file (arena.Store)."""
    _arena_judged(h)
    h.send_json(200, h.server.arena.stats())

def _runs(h, body):
    runs, skipped = read_runs(h.server.runs_dir)
    h.send_json(200, {'object': 'list', 'skipped': skipped,
                      'data': [{**r, 'served': r['name'] in h.server.engines} for r in runs]})

# bootstrap resamples of the page's intervals and paired tests (evaluate.py's default)
LEADERBOARD_BOOT = 1000
# (the result files and their mtimes) -> the last answer, so the page's polling costs nothing
_BOARD = {}

def _leaderboard(h, body):
    """The latest evaluate.py result per (checkpoint, task) under runs_dir/*/eval/
    (results.read_results), as the page's grid, radar and history draw them:
    results.leaderboard_rows (each metric's value, 95% interval, the paired test against the task's
    best; lm-eval groups before their subtasks) and results.checkpoint_history (a flag on each
    metric that dropped significantly from one checkpoint to the next). Per-item scores stay on
    disk."""
    paths = sorted(glob.glob(os.path.join(h.server.runs_dir, '*', 'eval', '*.json')))
    key = tuple((p, os.path.getmtime(p)) for p in paths if os.path.exists(p))
    if key not in _BOARD:
        results, skipped = read_results(paths)
        _BOARD.clear()
        _BOARD[key] = finite({'object': 'leaderboard', 'lower_is_better': LOWER_IS_BETTER,
                              'skipped': len(skipped), 'n_boot': LEADERBOARD_BOOT,
                              'rows': leaderboard_rows(results, n_boot=LEADERBOARD_BOOT),
                              'history': checkpoint_history(results, n_boot=LEADERBOARD_BOOT)})
    h.send_json(200, _BOARD[key])

def _registry(h, body):
    """GET /v1/registry: what is on disk under runs_dir (runs.model_registry: runs with their
    checkpoints and evals, Hugging Face directories, exports) and the hub models in the Hugging Face
    cache (hf.cached_models), each marked with the name it is served under, if it is, and the name
    to serve it under (checkpoint.model_name)."""
    entries, skipped = model_registry(h.server.runs_dir)
    entries += hf.cached_models()
    served = {os.path.realpath(w.source): name for name, w in h.server.engines.items()
              if getattr(w, 'source', None)}
    for e in entries:  # model_name: the name to load it under (the page's "serve" buttons send it)
        e['served'], e['model_name'] = served.get(os.path.realpath(e['path'])), model_name(e['name'])
        for c in e['checkpoints']:
            c['served'] = served.get(os.path.realpath(c['path']))
            c['model_name'] = model_name(f"{e['name']}-{c['iter']}")
    h.send_json(200, {'object': 'list', 'data': entries, 'skipped': [p for p, _ in skipped]})


# the field ranges /v1/shape accepts
SHAPE_LIMITS = {'n_layer': (1, 1 << 12), 'n_head': (1, 1024), 'n_kv_head': (0, 1024), 'n_embd': (1, 1 << 17),
                'ffn_hidden': (0, 1 << 20), 'block_size': (1, 1 << 21), 'vocab_size': (1, 1 << 22)}

def _shape(h, body):
    """POST /v1/shape {GPTConfig's fields}: model.py's own rules and counts for a shape the page's
    calculator is given -> {config: every field resolved (ffn_hidden, n_kv_head, positions, ...),
    params, params_non_embedding, flops_per_token}, or {invalid: GPTConfig's reason} for a shape it
    refuses (the answer to the question asked, so a 200; a malformed request is a 400). The counts are the model's own (num_params, flops_per_token), of models built on the
    meta device (no weights are made): with one block and with two, since every count is linear in
    the number of identical blocks, so a shape of any depth costs two small builds."""
    kinds = {f.name: type(f.default) for f in fields(GPTConfig)}
    args = {}
    for k, v in body.items():
        if k not in kinds:
            raise ApiError(400, f"unknown field '{k}'; a shape has {', '.join(kinds)}", k,
                           'unknown_parameter')
        if k in SHAPE_LIMITS:
            args[k] = number(body, k, None, *SHAPE_LIMITS[k], integer=True)
        elif k in ('bias', 'tie_embeddings'):
            args[k] = flag(body, k) if v is not None else None
        elif k in ('arch', 'positions'):
            allowed = ARCHS if k == 'arch' else ('', *POSITIONS)
            if v is not None and v not in allowed:
                raise ApiError(400, f"'{k}' must be one of {', '.join(map(repr, allowed))}, got "
                               f"{json.dumps(v)[:40]}", k, 'invalid_value')
            args[k] = v
        elif k == 'dropout':
            args[k] = number(body, k, None, 0.0, 0.99)
        else:  # rope_theta, norm_eps
            args[k] = number(body, k, None, 1e-12 if k == 'rope_theta' else 0.0, 1e12)
    args = {k: v for k, v in args.items() if v is not None}
    try:
        config = GPTConfig(**args)
    except ValueError as e:
        return h.send_json(200, {'invalid': str(e)})
    counts = []
    for L in (1, 2):
        with torch.device('meta'):
            m = GPT(GPTConfig(**{**asdict(config), 'n_layer': L}))
        counts.append((m.num_params(non_embedding=False), m.num_params(),
                       m.flops_per_token(config.block_size)))
    (p1, n1, f1), (p2, n2, f2) = counts
    L = config.n_layer - 1  # blocks beyond the first, each adding what the second did
    h.send_json(200, {'config': asdict(config), 'params': p1 + L * (p2 - p1),
                      'params_non_embedding': n1 + L * (n2 - n1), 'flops_per_token': f1 + L * (f2 - f1)})


# the jobs: nanolab's scripts run by the server (h.server.jobs, a jobs.Jobs)

def _jobs(h, body):
    """GET /v1/jobs: every record, newest first; POST /v1/jobs {script, config, settings}: a job
    (Jobs.submit) -> its record."""
    if h.command == 'GET':
        return h.send_json(200, {'object': 'list', 'data': h.server.jobs.list(),
                                 'max_jobs': h.server.jobs.max_jobs, 'scripts': SCRIPTS})
    unknown = sorted(set(body) - {'script', 'config', 'settings'})
    if unknown:
        raise ApiError(400, f"unknown field '{unknown[0][:40]}'; a job is {{script, config, "
                       "settings}", unknown[0][:40], 'unknown_parameter')
    h.send_json(200, h.server.jobs.submit(body.get('script'), body.get('config'),
                                          body.get('settings')))

def _job(h, body):
    h.send_json(200, h.server.jobs.get(h.path_id))

def _job_stop(h, body):
    h.send_json(200, h.server.jobs.stop(h.path_id))

def _job_log(h, body):
    """GET /v1/jobs/{id}/log?offset=N[&stream=true] (Jobs.log); streamed: an event per part read,
    until the job has ended and its log is read, then [DONE]."""
    offset, stream = body.get('offset', '0'), body.get('stream', 'false')
    if not (offset.isascii() and offset.isdigit() and len(offset) <= 15):
        raise ApiError(400, f"'offset' must be a byte count, got {offset[:40]!r}", 'offset',
                       'invalid_value')
    if stream not in ('true', 'false'):
        raise ApiError(400, f"'stream' must be true or false, got {stream[:40]!r}", 'stream',
                       'invalid_value')
    part = h.server.jobs.log(h.path_id, int(offset))
    if stream == 'false':
        return h.send_json(200, part)
    h.start_sse()
    while True:
        if part['text'] or part['done']:
            h.sse(part)
        if part['done']:
            break
        if part['next_offset'] == part['offset']:  # nothing new: wait, and leave if it has gone
            time.sleep(0.25)
            h.check_client()
        part = h.server.jobs.log(h.path_id, part['next_offset'])
    h.sse('[DONE]')
    h.end_sse()

RECIPES_MAX = 200   # recipe files /v1/recipes reads at most
RECIPE_ABOUT = 4    # lines of each recipe's header comment it sends
_RECIPES = {}       # (the files and their mtimes) -> the last answer

def _recipe(path, settings):
    """One configs/ file, read without running it -> {name, config, script, about, values}: its
    header comment's first lines, its literal assignments (an expression stays the script's to
    evaluate), and the script it is for: the one its header runs it with (`python S
    configs/NAME.py`), else the only one whose settings hold every name it assigns."""
    with open(path, encoding='utf-8') as f:
        src = f.read()
    name, values = os.path.basename(path), {}
    for n in ast.parse(src).body:
        if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name):
            try:
                values[n.targets[0].id] = ast.literal_eval(n.value)
            except ValueError:
                pass
    header = [line[1:].strip() for line in itertools.takewhile(
        lambda line: line.startswith('#'), src.splitlines())]
    said = re.search(rf'python (\w+\.py) configs/{re.escape(name)}', src)
    fits = [s for s, rows in settings.items() if set(values) <= {r['name'] for r in rows}]
    script = said.group(1) if said and said.group(1) in SCRIPTS else \
        fits[0] if len(fits) == 1 else None
    return {'name': name[:-3], 'config': f'configs/{name}', 'script': script,
            'about': ' '.join(header[:RECIPE_ABOUT]), 'values': finite(values)}

def _recipes(h, body):
    """GET /v1/recipes: what the Train tab's form is built from, read without running anything
    (configurator.describe): each job script's settings [{name, default, type, comment, choices}]
    in the order of its settings block, and the recipes in configs/ (_recipe). Computed once per
    change of those files."""
    paths = [os.path.join(REPO, s) for s in SCRIPTS] + \
        sorted(glob.glob(os.path.join(REPO, 'configs', '*.py')))[:RECIPES_MAX]
    key = tuple((p, os.path.getmtime(p)) for p in paths if os.path.exists(p))
    if key not in _RECIPES:
        settings = {s: finite(describe(os.path.join(REPO, s))) for s in SCRIPTS}
        recipes = [_recipe(p, settings) for p in paths[len(SCRIPTS):]]
        _RECIPES.clear()
        _RECIPES[key] = {'object': 'recipes', 'scripts': settings, 'data': recipes}
    h.send_json(200, _RECIPES[key])


ROUTES = {'/v1/templates': ('GET', _templates), '/v1/templates/render': ('POST', _render_template),
          '/v1/tokenizers': ('POST', _tokenizers), '/v1/attention': ('POST', _attention),
          '/v1/inspect': ('POST', _inspect), '/v1/embedding_map': ('POST', _embedding_map),
          '/v1/arena/judgments': ('POST', _arena_judge), '/v1/arena/items': ('GET', _arena_items),
          '/v1/arena/stats': ('GET', _arena_stats), '/runs': ('GET', _runs),
          '/leaderboard': ('GET', _leaderboard), '/v1/registry': ('GET', _registry),
          '/v1/shape': ('POST', _shape),
          # server.py's router puts the {id} of a path in h.path_id
          '/v1/jobs': ('GET POST', _jobs), '/v1/jobs/{id}': ('GET', _job),
          '/v1/jobs/{id}/log': ('GET', _job_log), '/v1/jobs/{id}/stop': ('POST', _job_stop),
          '/v1/recipes': ('GET', _recipes)}
