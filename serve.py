"""
Serve models over HTTP: an OpenAI-compatible API with streaming, the tokenizer, and the web page in web/. Standard
library only (http.server); several models at once. This file is HTTP and OpenAI's formats: the decoding, batching
and fairness between clients are engine.py's (one Engine per model, all stepped on one engine thread), the guards
against hostile pages and clients httpd.py's, and the endpoints of the page's learning views views.py's.

    python serve.py --init_from=out-shakespeare-char                      # CPU: open http://127.0.0.1:8000
    python serve.py --init_from=out-a,out-b --device=cuda                  # one GPU, two models
    python serve.py --init_from=runs                                       # every run under runs/ holding ckpt.pt
    python serve.py --init_from=out-shakespeare-char --quantize=int8       # CPU: int8 weights, 1/4-1/3 the bytes
    python serve.py --init_from=out-sft --host=0.0.0.0 --api_key=SECRET    # reachable from other machines: a key

    curl -N http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
         -d '{"model": "out-shakespeare-char", "prompt": "ROMEO:", "max_tokens": 50, "stream": true}'

Endpoints (errors are OpenAI's body {"error": {message, type, param, code}}; "model" defaults to the first one):
    GET  /v1/models; POST /v1/completions (prompt: text, token ids or a list of either; echo + max_tokens=0 +
         logprobs scores a text, first token null); POST /v1/chat/completions (logprobs: true, top_logprobs: k);
         both take OpenAI's sampling fields and ours: top_k, min_p, repetition_penalty, num_beams, length_penalty
    POST /tokenize, /detokenize; GET /tokenizer_info: in vLLM's shapes, which lm-eval's remote tokenizer reads
    POST /v1/models/load {source}, /v1/models/unload {model}: models at run time, beside the others
    the page's views (views.py): /v1/attention, /v1/inspect, /v1/tokenizers, /v1/embedding_map, /v1/templates,
    /v1/arena/*, /runs, /leaderboard, /v1/registry (runs_dir's models, checkpoints and exports)
    GET /: files from web/

Bounded work: a request over max_rows or max_prompt_tokens is a 400 naming the flag; a client that hangs up frees
its rows within a step; a seeded request gives sample.generate's text, for any n (engine.py's seeding rule).
"""
import difflib
import hmac
import json
import mimetypes
import os
import re
import threading
import time
import traceback
import uuid
from dataclasses import asdict, dataclass
from itertools import accumulate
from urllib.parse import parse_qs, unquote, urlsplit

import torch

from nanolab import prompts as library  # prompts.py: `prompts` is the token lists of a request
from nanolab.engine import (BeamStep, Engine, LimitError, NumericalError, PromptScores, Settings, SettingsError, adopt,
                    beam_tree, start)
from nanolab.httpd import ApiError, GuardedHandler, Server
from nanolab.checkpoint import TUNED, checkpoint_stage, load_model, model_sources
from nanolab.device import DTYPES, resolve_device, resolve_dtype
from nanolab.quantize import for_inference
from nanolab import page_api as views  # the endpoints behind the page's views
from nanolab.page_api import encode, flag, is_ids, number

# -----------------------------------------------------------------------------
init_from = 'out-shakespeare-char'  # model sources, comma-separated (out_dir, HF dir, hub name), or a dir of runs
host = '127.0.0.1'          # bind address; any other than localhost needs api_key
port = 8000                 # TCP port; 0 = any free port
api_key = ''                # if set, the API needs 'Authorization: Bearer <api_key>'; '' = $NANOLAB_API_KEY if set
max_batch = 16              # rows decoded together per model (KV-cache slots); further prompts wait their turn
max_rows = 256              # rows (prompts x n x num_beams) a request may ask for; over it: 400
max_prompt_tokens = 32768   # prompt tokens a request may send; over it: 400
prefill_chunk = 256         # prompt tokens prefilled per step, so a long prompt cannot stall the other streams
max_tokens_limit = 4096     # the largest max_tokens a request may ask for
max_connections = 256       # open connections at once (a thread each); beyond: 503 with Retry-After
read_timeout = 10.0         # seconds to send a whole request (line, headers, body); also the keep-alive idle time
n_limit = 16                # the largest n (samples per prompt) and num_beams
threads = 0                 # torch threads for the models; 0 = torch's default (one per core)
device = 'auto'             # auto | cpu | cuda | cuda:N | mps
dtype = 'auto'              # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
quantize = ''               # '' (off) | int8: int8 weights in every linear and the token embedding; CPU (quantize.py)
runs_dir = '.'              # GET /runs lists its subdirectories that hold metrics.jsonl (the run dashboard)
allowed_hosts = ''          # Host names to answer besides loopback names, IP addresses and `host`; comma list, * = any
cors_origins = ''           # web origins (https://app.example) whose pages may call the API; comma list, * = any
max_models = 8              # models loaded at once, counting POST /v1/models/load's; beyond: 409
# -----------------------------------------------------------------------------
MAX_STOPS = 4               # stop strings per request, as OpenAI
MAX_TOP_LOGPROBS = 20       # alternatives per token, as OpenAI's chat API
WEB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'web')
LOCAL_HOSTS = ('127.0.0.1', 'localhost', '::1')
PARAMS = {'max_new_tokens': 'max_tokens', 'num_samples': 'n', 'stop_strings': 'stop', 'prompt_logprobs': 'echo'}

# -----------------------------------------------------------------------------
# requests: checking the body, and OpenAI's response shapes

COMMON_FIELDS = {'model', 'max_tokens', 'temperature', 'top_p', 'n', 'stop', 'seed', 'presence_penalty',
                 'frequency_penalty', 'stream', 'stream_options', 'user', 'top_k', 'min_p', 'repetition_penalty',
                 'num_beams', 'length_penalty', 'beam_tree', 'template', 'variables', 'cot'}
COMPLETION_FIELDS = COMMON_FIELDS | {'prompt', 'logprobs', 'echo'}
CHAT_FIELDS = COMMON_FIELDS | {'messages', 'logprobs', 'top_logprobs', 'max_completion_tokens', 'continue_final_message'}

@dataclass
class Call:
    """One completions or chat request, read and checked: what to decode, and how the answer looks."""
    engine: Engine
    name: str                # the model's name
    chat: bool
    prompts: list            # token id lists
    settings: Settings
    logprobs: int | None     # None: no logprobs in the answer; k: with k alternatives per token
    echo: bool               # completions: the prompt comes first (with its logprobs when logprobs is set)
    stream: bool
    include_usage: bool
    beam_tree: bool = False  # each choice also carries its beam search's tree (engine.beam_tree)


def _read_request(name, w, body, chat):
    """A completions or chat body, checked against the model -> Call. Every problem is an ApiError(400) that names
    the field: the JSON types and the API's own caps here, the decoding settings' ranges in Settings.check."""
    fields = CHAT_FIELDS if chat else COMPLETION_FIELDS
    for k in body:
        if k not in fields:
            close = difflib.get_close_matches(k, fields, n=2)
            raise ApiError(400, f"unknown field '{k}'" + (f"; did you mean {' or '.join(close)}?" if close else
                           ''), k, 'unknown_parameter')
    tok, stop_tokens, stop_strings = w.tok, [w.tok.eot] if w.tok.eot is not None else [], []
    # 1) the prompts: a template of prompts.py ('template', 'variables', 'cot') fills the prompt or the messages
    if 'template' in body:
        name_, values = body.get('template'), body.get('variables', {})
        if not isinstance(name_, str) or not isinstance(values, dict):
            raise ApiError(400, "'template' must be a template's name (GET /v1/templates) and 'variables' an object",
                           'template')
        try:
            filled = library.render(name_, cot=flag(body, 'cot'), **values)
        except (KeyError, ValueError) as e:
            raise ApiError(400, f"'template': {e.args[0]}", 'template') from None
        if chat:
            body['messages'] = filled if isinstance(filled, list) else [{'role': 'user', 'content': filled}]
        elif isinstance(filled, list):
            raise ApiError(400, f"'template': '{name_}' is a chat template; send it to /v1/chat/completions", 'template')
        else:
            body['prompt'] = filled
    if chat:
        messages = body.get('messages')
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects", 'messages')
        for m in messages:  # OpenAI's content parts [{"type": "text", "text": ...}] -> one string
            if isinstance(m, dict) and isinstance(m.get('content'), list):
                if not all(isinstance(p, dict) and p.get('type') == 'text' and isinstance(p.get('text'), str)
                           for p in m['content']):
                    raise ApiError(400, "'messages': a content part must be {\"type\": \"text\", \"text\": string}",
                                   'messages', 'invalid_type')
                m['content'] = ''.join(p['text'] for p in m['content'])
        try:
            cont = flag(body, 'continue_final_message')  # the last (assistant) message goes on: no new turn
            prompts = [tok.render_chat(messages, add_generation_prompt=not cont, continue_final_message=cont)[0]]
        except ValueError as e:
            raise ApiError(400, f"'messages': {e}", 'messages') from None
        stop_tokens, stop_strings = tok.chat_stop_tokens, list(tok.stop_strings)
    else:
        p = body.get('prompt')
        if isinstance(p, str) or (is_ids(p) and p):
            p = [p]
        if not isinstance(p, list) or not p or not all(isinstance(x, str) or is_ids(x) for x in p):
            raise ApiError(400, "'prompt' must be a string, a list of token ids, or a non-empty list of either", 'prompt')
        prompts = [encode(w, x, 'prompt') if isinstance(x, str) else x for x in p]
        prompts = [x or ([tok.eot] if tok.eot is not None else []) for x in prompts]  # '' = from end-of-text
        if any(not x for x in prompts):
            raise ApiError(400, "empty prompt; give at least one token", 'prompt')
        if any(not 0 <= t < w.V for x in prompts for t in x):
            raise ApiError(400, f"prompt token ids must be in [0, {w.V})", 'prompt', 'invalid_value')
    # 2) the sampling settings
    longest = max(map(len, prompts))
    default_max = min(max_tokens_limit, w.block_size - longest) if chat else min(16, w.block_size - longest)
    max_tokens = number(body, 'max_completion_tokens', None, 0, max_tokens_limit, integer=True) if chat else None
    max_tokens = number(body, 'max_tokens', max_tokens, 0, max_tokens_limit, integer=True)
    max_tokens = max(0, default_max) if max_tokens is None else max_tokens
    if longest + max_tokens > w.block_size:
        what = 'messages' if chat else 'prompt'  # OpenAI's message, which clients parse
        raise ApiError(400, f"This model's maximum context length is {w.block_size} tokens. However, you requested "
                       f"{longest + max_tokens} tokens ({longest} in the {what}, {max_tokens} in the completion). "
                       f"Please reduce the length of the {what} or max_tokens.", what, 'context_length_exceeded')
    stop = body.get('stop')
    stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of them", 'stop')
    if chat:
        k = number(body, 'top_logprobs', None, 0, MAX_TOP_LOGPROBS, integer=True)
        if k is not None and not flag(body, 'logprobs'):
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", 'top_logprobs')
        logprobs = (k or 0) if flag(body, 'logprobs') else None
    else:
        logprobs = number(body, 'logprobs', None, 0, MAX_TOP_LOGPROBS, integer=True)
    opts = body.get('stream_options')
    if opts is not None and not (isinstance(opts, dict) and set(opts) <= {'include_usage'}):
        raise ApiError(400, "'stream_options' must be an object like {\"include_usage\": true}", 'stream_options')
    echo, inf = not chat and flag(body, 'echo'), float('inf')
    settings = Settings(
        max_new_tokens=max_tokens, temperature=number(body, 'temperature', 1.0, -inf, 2.0),
        top_k=number(body, 'top_k', 0, 0, w.V, integer=True), top_p=number(body, 'top_p', 1.0, -inf, inf),
        min_p=number(body, 'min_p', 0.0, -inf, inf), repetition_penalty=number(body, 'repetition_penalty', 1.0, 0.01, 10.0),
        presence_penalty=number(body, 'presence_penalty', 0.0, -inf, inf),
        frequency_penalty=number(body, 'frequency_penalty', 0.0, -inf, inf),
        num_beams=number(body, 'num_beams', 1, 1, n_limit, integer=True),
        length_penalty=number(body, 'length_penalty', 1.0, -10.0, 10.0),
        num_samples=number(body, 'n', 1, -inf, n_limit, integer=True), stop_tokens=tuple(stop_tokens),
        stop_strings=tuple(stop_strings + stop), seed=number(body, 'seed', None, 0, 2**62, integer=True),
        logprobs=min(logprobs or 0, w.V), prompt_logprobs=echo and logprobs is not None)  # a tiny vocabulary: all of it
    tree = flag(body, 'beam_tree')
    if tree and settings.num_beams < 2:
        raise ApiError(400, "'beam_tree' shows a beam search: set 'num_beams' to 2 or more", 'beam_tree')
    return Call(w, name, chat, prompts, settings, logprobs, echo, flag(body, 'stream'),
                bool((opts or {}).get('include_usage')), tree)

def _legacy_logprobs(w, tokens, lps, tops):
    """OpenAI's completions logprobs: parallel lists; top_logprobs {token text: logprob}; offsets into the text."""
    pieces = [w.tok.decode([t]) for t in tokens]
    return {'tokens': pieces, 'token_logprobs': lps,
            'top_logprobs': [None if top is None else {w.tok.decode([i]): lp for i, lp in top} for top in tops],
            'text_offset': [0] + list(accumulate(map(len, pieces)))[:-1] if pieces else []}

def _chat_logprobs(w, tokens, lps, tops):
    """OpenAI's chat logprobs: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    def entry(t, lp):
        return {'token': w.tok.decode([t]), 'logprob': lp, 'bytes': list(w.tok.decode_bytes([t]))}
    return {'content': [{**entry(t, lp), 'top_logprobs': [entry(i, v) for i, v in top or []]}
                        for t, lp, top in zip(tokens, lps, tops)]}

def _completion(h, body, chat):
    name, w = h.engine(body)
    call = _read_request(name, w, body, chat)
    try:
        req = w.submit(call.prompts, call.settings)
    except SettingsError as e:
        param = PARAMS.get(e.field, e.field)
        raise ApiError(400, f"'{param}': {e}", param, 'invalid_value') from None
    except LimitError as e:  # main() gives beam searches half of max_batch
        flag = 'max_batch, of which beam searches get half' if e.limit == 'max_beam_slots' else e.limit
        raise ApiError(400, f"{e} (serve.py --{flag})", None, 'request_too_large') from None
    try:
        (_stream if call.stream else _reply)(h, call, h.events(req, call.beam_tree))
    finally:
        req.cancel()  # whatever happened (done, error, client gone), the engine drops what is left within a step

def _head(call):
    """The fields every response and chunk starts with, and a fresh usage count."""
    rid = ('chatcmpl-' if call.chat else 'cmpl-') + uuid.uuid4().hex[:24]
    head = {'id': rid, 'object': 'chat.completion' if call.chat else 'text_completion', 'created': int(time.time()),
            'model': call.name}
    return head, {'prompt_tokens': sum(map(len, call.prompts)), 'completion_tokens': 0}

def _reply(h, call, events):
    w, n = call.engine, call.settings.num_samples
    acc = [dict(tokens=[], lps=[], tops=[], text='', finish=None) for _ in range(len(call.prompts) * n)]
    scores, steps, (head, usage) = {}, {}, _head(call)
    for ev in events:
        if isinstance(ev, PromptScores):
            scores[ev.prompt_index] = ev
            continue
        if isinstance(ev, BeamStep):
            steps.setdefault(ev.prompt_index, []).append(ev)
            continue
        a = acc[ev.prompt_index * n + ev.sample_index]
        if ev.token is not None:
            a['tokens'].append(ev.token)
            a['lps'].append(ev.logprob)
            a['tops'].append(ev.top_logprobs)
            usage['completion_tokens'] += 1
        a['text'] += ev.text_delta
        a['finish'] = ev.finish_reason or a['finish']
    choices = []
    for i, a in enumerate(acc):
        if call.chat:
            lp = _chat_logprobs(w, a['tokens'], a['lps'], a['tops']) if call.logprobs is not None else None
            choices.append({'index': i, 'message': {'role': 'assistant', 'content': a['text']}, 'logprobs': lp,
                            'finish_reason': a['finish']})
        else:
            prompt, lp, text = call.prompts[i // n], None, a['text']
            if call.echo:
                text = w.tok.decode(prompt) + text
            if call.settings.prompt_logprobs:
                s = scores[i // n]
                lp = _legacy_logprobs(w, prompt + a['tokens'], s.token_logprobs + a['lps'], s.top_logprobs + a['tops'])
            elif call.logprobs is not None:
                lp = _legacy_logprobs(w, a['tokens'], a['lps'], a['tops'])
            choices.append({'index': i, 'text': text, 'logprobs': lp, 'finish_reason': a['finish']})
        if call.beam_tree:
            choices[-1]['beam_tree'] = beam_tree(steps.get(i // n, []), w.tok, a['tokens'])
    usage['total_tokens'] = usage['prompt_tokens'] + usage['completion_tokens']
    h.send_json(200, {**head, 'choices': choices, 'usage': usage})

def _stream(h, call, events):
    """Server-sent events in OpenAI's chunk format, one chunk per token (and per finish), then data: [DONE]."""
    w, n = call.engine, call.settings.num_samples
    head, usage = _head(call)
    head['object'] = 'chat.completion.chunk' if call.chat else 'text_completion'

    def chunk(i, **choice):
        h.sse({**head, 'choices': [{'index': i, 'logprobs': None, 'finish_reason': None, **choice}]})
    h.start_sse()
    started, scores, steps, done = set(), {}, {}, {}
    for ev in events:
        if isinstance(ev, PromptScores):
            scores[ev.prompt_index] = ev
            continue
        if isinstance(ev, BeamStep):
            steps.setdefault(ev.prompt_index, []).append(ev)
            continue
        i = ev.prompt_index * n + ev.sample_index
        tok = [ev.token] if ev.token is not None else []
        extra = {}
        if call.beam_tree:  # the finishing chunk of each choice carries its tree (a beam search's tokens come at its end)
            done.setdefault(i, []).extend(tok)
            if ev.finish_reason:
                extra = {'beam_tree': beam_tree(steps.get(ev.prompt_index, []), w.tok, done[i])}
        usage['completion_tokens'] += len(tok)
        if call.chat:
            lp = _chat_logprobs(w, tok, [ev.logprob], [ev.top_logprobs]) if call.logprobs is not None and tok else None
            if i not in started:  # OpenAI opens each choice with its role
                chunk(i, delta={'role': 'assistant', 'content': ''})
            if ev.text_delta or lp:
                chunk(i, delta={'content': ev.text_delta}, logprobs=lp)
            if ev.finish_reason:
                chunk(i, delta={}, finish_reason=ev.finish_reason, **extra)
        else:
            if call.echo and i not in started:  # the prompt comes first, as its own chunk
                prompt, s = call.prompts[ev.prompt_index], scores.get(ev.prompt_index)
                chunk(i, text=w.tok.decode(prompt),
                      logprobs=_legacy_logprobs(w, prompt, s.token_logprobs, s.top_logprobs) if s else None)
            lp = _legacy_logprobs(w, tok, [ev.logprob] * len(tok), [ev.top_logprobs] * len(tok)) \
                if call.logprobs is not None else None
            if ev.text_delta or ev.finish_reason or tok and lp:
                chunk(i, text=ev.text_delta, logprobs=lp, finish_reason=ev.finish_reason, **extra)
        started.add(i)
    if call.include_usage:  # OpenAI: a last chunk with no choices carries the usage
        usage['total_tokens'] = usage['prompt_tokens'] + usage['completion_tokens']
        h.sse({**head, 'choices': [], 'usage': usage})
    h.sse('[DONE]')
    h.end_sse()

# -----------------------------------------------------------------------------
# the other endpoints

def _model_entry(h, name, w):
    return {'id': name, 'object': 'model', 'created': getattr(w, 'created', h.server.started), 'owned_by': 'nanolab',
            'max_model_len': w.block_size, 'arch': w.model.config.arch, 'n_params': w.model.num_params(),
            'tokenizer': w.tok.kind, 'config': asdict(w.model.config), 'source': getattr(w, 'source', None),
            'stage': getattr(w, 'stage', None), 'chat': getattr(w, 'stage', None) in TUNED}  # chat: fine-tuned

def _models(h, body):
    h.send_json(200, {'object': 'list', 'data': [_model_entry(h, name, w) for name, w in h.server.engines.items()]})


MODEL_NAME = re.compile(r'[A-Za-z0-9][\w.\-]{0,63}')

def _load(h, body):
    """POST /v1/models/load {"source": a run directory, ckpt.pt, .safetensors, Hugging Face directory or hub name,
    relative paths under runs_dir first; "name": optional}: load it with the server's device, dtype and quantize,
    beside the others (engine.adopt), -> the model's GET /v1/models entry. One load at a time; max_models at once."""
    source, name = body.get('source'), body.get('name')
    if not isinstance(source, str) or not source.strip():
        raise ApiError(400, '"source" must be a model source: a run directory, a checkpoint, a Hugging Face '
                       'directory or hub name', 'source', 'invalid_source')
    path = os.path.join(h.server.runs_dir, source)
    path = path if not os.path.isabs(source) and os.path.exists(path) else source
    with h.server.models_lock:
        engines = h.server.engines
        if len(engines) >= h.server.max_models:
            raise ApiError(409, f"{len(engines)} models are loaded, this server's --max_models; unload one first "
                           "(POST /v1/models/unload)", None, 'too_many_models')
        name = name if name is not None else os.path.basename(os.path.normpath(source.removesuffix('/ckpt.pt')))
        if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
            raise ApiError(400, f'"name" must be 1-64 letters, digits, ".", "_" or "-", got {json.dumps(name)[:70]}',
                           'name', 'invalid_name')
        if name in engines:
            raise ApiError(409, f"a model named {name!r} is loaded already; unload it, or give another \"name\"",
                           'name', 'model_exists')
        first = next(iter(engines.values()))
        try:
            if not os.path.exists(path):  # a hub name: download here, not on the engine thread the others decode on
                from nanolab import hf
                path = hf.local_dir(path)
            engine = adopt(first, lambda: _engine(path, **first.options))
        except ValueError as e:  # load_model names what is wrong with the source and what to do
            raise ApiError(400, str(e), 'source', 'invalid_source') from None
        h.server.engines = {**engines, name: engine}  # a new dict: a request reading the old one is unaffected
    h.send_json(200, _model_entry(h, name, engine))

def _unload(h, body):
    """POST /v1/models/unload {"model": name}: no new requests go to it; the ones it has finish, then it is let go."""
    name = body.get('model')
    with h.server.models_lock:
        engines = h.server.engines
        if not isinstance(name, str) or name not in engines:
            raise ApiError(404, f"no model {json.dumps(name)[:60]} is loaded; this server has {', '.join(engines)}",
                           'model', 'model_not_found')
        if len(engines) == 1:
            raise ApiError(409, f"{name} is the only model loaded; load another first (POST /v1/models/load)",
                           'model', 'last_model')
        h.server.engines = {k: v for k, v in engines.items() if k != name}
        engines[name].stop()
    h.send_json(200, {'id': name, 'object': 'model', 'unloaded': True})


def _tokenize(h, body):
    name, w = h.engine(body)
    text = body.get('prompt')
    if 'template' in body:  # the ids a completion with this template decodes from (prompts.prompt_ids)
        try:
            ids = library.prompt_ids(w.tok, body['template'], body.get('variables') or {}, flag(body, 'cot'))
        except (KeyError, ValueError, TypeError) as e:
            raise ApiError(400, f"'template': {e.args[0] if e.args else e}", 'template') from None
    elif 'messages' in body:  # the chat template's tokens, as /v1/chat/completions would decode from
        try:
            ids = w.tok.render_chat(body['messages'], add_generation_prompt=flag(body, 'add_generation_prompt'),
                                    continue_final_message=flag(body, 'continue_final_message'))[0]
        except ValueError as e:
            raise ApiError(400, f"'messages': {e}", 'messages') from None
    elif not isinstance(text, str):
        raise ApiError(400, "'prompt' must be a string (or send 'messages' for the chat template)", 'prompt')
    elif text in w.tok.special_tokens:
        # subtle: encode() reads plain text, but lm-eval's remote tokenizer finds eos_token_id by tokenizing the
        # eos_token string, so a prompt that IS a special token's text gets that token's id
        ids = [w.tok.special_tokens[text]]
    else:
        ids = encode(w, text, 'prompt')
    h.send_json(200, {'tokens': ids, 'count': len(ids), 'max_model_len': w.block_size,
                      'token_strs': [w.tok.decode([t]) for t in ids]})

def _detokenize(h, body):
    name, w = h.engine(body)
    ids = body.get('tokens')
    if not is_ids(ids) or any(not 0 <= t < w.V for t in ids):
        raise ApiError(400, f"'tokens' must be a list of token ids in [0, {w.V})", 'tokens')
    h.send_json(200, {'prompt': w.tok.decode(ids)})

def _tokenizer_info(h, body):
    name, w = h.engine(body)
    tok = w.tok
    eos = next((s for s, i in tok.special_tokens.items() if i == tok.eot), None)
    h.send_json(200, {'model': name, 'kind': tok.kind, 'vocab_size': w.V, 'max_model_len': w.block_size,
                      'eos_token': eos, 'eos_token_id': tok.eot, 'bos_token': None, 'pad_token': None,
                      'special_tokens': tok.special_tokens, 'chat_stop_tokens': tok.chat_stop_tokens,
                      'chat_stop_strings': tok.stop_strings})


# the arena: blind pairwise judgments, kept in <runs_dir>/arena/judgments.jsonl (arena.py)


API = {'/v1/models': ('GET', _models), '/v1/completions': ('POST', lambda h, b: _completion(h, b, False)),
       '/v1/chat/completions': ('POST', lambda h, b: _completion(h, b, True)), '/tokenize': ('POST', _tokenize),
       '/detokenize': ('POST', _detokenize), '/tokenizer_info': ('GET', _tokenizer_info),
       '/v1/models/load': ('POST', _load), '/v1/models/unload': ('POST', _unload), **views.ROUTES}

# -----------------------------------------------------------------------------
# HTTP

class Handler(GuardedHandler):
    """The API and the page; GuardedHandler (httpd.py) reads, checks and writes."""
    def do_GET(self):
        self.route()
    do_POST = do_OPTIONS = do_GET

    def route(self):
        url, method = urlsplit(self.path), self.command
        try:
            self.check_request(method)
            if method == 'OPTIONS':  # a CORS preflight from an origin in --cors_origins
                return self.send(204, b'', 'text/plain')
            if url.path not in API:
                if method != 'GET' or url.path.startswith('/v1/'):
                    raise ApiError(404, f"unknown path {method} {url.path}; the API is {', '.join(API)}", None,
                                   'unknown_url')
                return self.static(url.path)
            want, fn = API[url.path]
            if method != want:
                raise ApiError(405, f"{url.path} takes {want}, not {method}", None, 'method_not_allowed')
            key = self.server.api_key
            if key and not hmac.compare_digest(self.headers.get('Authorization', '').encode(), f'Bearer {key}'.encode()):
                raise ApiError(401, "missing or incorrect API key: send the header 'Authorization: Bearer <key>' "
                               "with the key the server was started with (--api_key)", None, 'invalid_api_key')
            fn(self, self.body() if method == 'POST' else {k: v[-1] for k, v in parse_qs(url.query).items()})
        except (ApiError, NumericalError) as e:
            if isinstance(e, NumericalError):  # this request's logits broke, not the server: only it fails
                e = ApiError(500, str(e), None, 'numerical_error')
            if method != 'GET' and not self.body_read:  # an unread body would be parsed as the next request
                self.close_connection = True
            if self.started:  # mid-stream: the status line is gone, so say it in the stream (no [DONE]) and close
                self.sse(e.body())
                self.end_sse()
                self.close_connection = True
            else:
                self.send_json(e.status, e.body())
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the client has gone; _completion has already released its rows
        except Exception as e:
            traceback.print_exc()
            error = ApiError(500, f'internal error: {type(e).__name__}: {e}').body()
            try:  # mid-stream, the error goes in the stream (OpenAI's way), so the client knows it is not complete
                if self.started:
                    self.sse(error)
                    self.end_sse()
                else:
                    self.send_json(500, error)
            except OSError:
                pass
            self.close_connection = True

    def engine(self, body):
        """(name, Engine) of body['model']; the first model when there is no 'model'."""
        engines, name = self.server.engines, body.get('model')
        if name is None:
            return next(iter(engines.items()))
        if not isinstance(name, str) or name not in engines:
            raise ApiError(404, f"The model {json.dumps(name)[:60]} does not exist; this server has {', '.join(engines)} "
                           "(GET /v1/models)", 'model', 'model_not_found')
        return name, engines[name]

    def events(self, req, beam_steps=False):
        """The request's Events and PromptScores (and with beam_steps its BeamSteps) until all its rows finish;
        between events (and every 0.25 s) it checks that the client is still there, so an abandoned request frees
        its rows."""
        return (ev for ev in req.events(self.check_client) if beam_steps or not isinstance(ev, BeamStep))

    def static(self, path):
        rel = unquote(path).lstrip('/') or 'index.html'
        if '..' in rel.replace('\\', '/').split('/') or '\0' in rel:
            raise ApiError(400, "'..' is not allowed in paths", None, 'invalid_path')
        root = os.path.realpath(WEB_DIR)
        full = os.path.realpath(os.path.join(root, rel))
        if os.path.isdir(full):
            full = os.path.join(full, 'index.html')
        if not full.startswith(root + os.sep) or not os.path.isfile(full):  # realpath: symlinks cannot lead out
            raise ApiError(404, f"no file {path} (static files come from web/)", None, 'not_found')
        with open(full, 'rb') as f:
            self.send(200, f.read(), mimetypes.guess_type(full)[0] or 'application/octet-stream')

def _engine(source, device, dtype, quantize, limits):
    """One model source, ready for inference (int8: quantize='int8'), in an Engine that remembers how it was made
    (source, options), so POST /v1/models/load makes the next one alike."""
    model, tok, ckpt = load_model(source, device, dtype)
    if tok is None:
        raise ValueError(f"{source} comes without a tokenizer, so text cannot be encoded; serve a source with "
                         "tokenizer files (a nanolab out_dir, or a Hugging Face dir with tokenizer.json)")
    engine = Engine(for_inference(model, quantize), tok, **limits)
    engine.source, engine.created, engine.stage = source, int(time.time()), checkpoint_stage(ckpt)
    engine.options = dict(device=device, dtype=dtype, quantize=quantize, limits=limits)
    return engine

def load_engines(spec, device='cpu', dtype=torch.float32, quantize='', threads=0, **limits):
    """Every model of init_from in an Engine (_engine), loaded and stepped on the engine thread (engine.start)
    -> {name: Engine}. threads: torch's, 0 = its default. limits: Engine's."""
    sources = model_sources(spec)

    def build():
        if threads:
            torch.set_num_threads(threads)
        for name, source in sources:
            yield _engine(source, device, dtype, quantize, limits)
    return dict(zip([name for name, _ in sources], start(build)))

def make_server(engines, host='127.0.0.1', port=0, api_key='', runs_dir='.', allowed_hosts=(), cors_origins=(),
                max_connections=256, read_timeout=10.0, max_models=8):
    """The HTTP server for the engines ({name: Engine}); call serve_forever() on it. allowed_hosts: Host names
    answered besides loopback names, addresses and host; cors_origins: origins whose pages may call the API."""
    if host not in LOCAL_HOSTS and not api_key:
        raise ValueError(f"host={host!r} makes the server reachable from other machines; set --api_key=SECRET "
                         "(clients send 'Authorization: Bearer SECRET'), or keep --host=127.0.0.1")
    server = Server((host, port), Handler)
    server.max_connections, server.read_timeout = max_connections, read_timeout
    server.engines, server.api_key, server.runs_dir, server.started = engines, api_key, runs_dir, int(time.time())
    server.max_models, server.models_lock = max_models, threading.Lock()
    server.allowed_hosts = {'localhost', host.lower(), *(h.strip().lower() for h in allowed_hosts if h.strip())}
    server.cors_origins = {o.strip().rstrip('/') for o in cors_origins if o.strip()}
    return server

def main():
    from nanolab.configurator import configure
    configure(globals(), choices={'dtype': DTYPES, 'device': None, 'quantize': ('', 'int8')})
    key = api_key or os.environ.get('NANOLAB_API_KEY', '')  # the environment keeps it out of the process list
    dev = resolve_device(device)
    engines = load_engines(init_from, dev, resolve_dtype(dtype, dev), quantize, threads, max_batch=max_batch,
                           max_rows=max_rows, max_prompt_tokens=max_prompt_tokens, prefill_chunk=prefill_chunk,
                           max_beam_slots=max_batch // 2)  # beam searches leave half the slots to the others
    server = make_server(engines, host, port, key, runs_dir, allowed_hosts.split(','), cors_origins.split(','),
                         max_connections, read_timeout, max_models)
    print(f"serving {', '.join(engines)} on http://{host}:{server.server_address[1]}  (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == '__main__':
    try:
        main()
    except ValueError as e:  # bad input: one line naming the problem and the fix, exit 1, no traceback
        raise SystemExit(f'error: {e}')
