"""
Serve models over HTTP: an OpenAI-compatible API with streaming and continuous batching, the tokenizer, and the
web page in web/. Standard library only (http.server); several models at once, one decoding worker thread each.

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
    POST /v1/attention: every layer's attention maps for a short prompt;  GET /runs: runs_dir's runs and metrics
    GET  /leaderboard: the evaluate.py results under runs_dir/*/eval/ (the page's leaderboard)
    GET /: files from web/

Continuous batching, in the worker thread of each model (Worker below):
  1) a request becomes rows, one per (prompt, sample); rows wait in a queue for one of max_batch slots
  2) between decode steps, waiting rows are prefilled one prompt at a time, and their keys/values are copied with
     those of the running rows into a new left-padded cache (_merge): rows right-aligned, so all end at one slot
  3) one forward for all rows per step; each row then picks its token with its own settings and its own generator,
     so a request with a seed gets the same text whatever else is in the batch, and greedy decoding gives
     sample.generate's tokens for that prompt alone
  4) finished rows, and rows whose client has gone, leave with cache.select; a full cache is compacted by _merge
Beam search (num_beams > 1) runs sample.generate on the worker thread between steps, unbatched.
"""
import difflib
import glob
import hmac
import json
import mimetypes
import os
import queue
import select
import socket
import threading
import time
import traceback
import uuid
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import accumulate
from types import SimpleNamespace
from urllib.parse import parse_qs, unquote, urlsplit

import torch
import torch.nn.functional as F

from model import KVCache, load_model, resolve_device, resolve_dtype
from quantize import quantize_int8
from sample import Event, TextStream, top_logprobs, generate_stream, penalty_state, process_logits, sample_next

_before = set(globals())
# -----------------------------------------------------------------------------
init_from = 'out-shakespeare-char'  # model sources, comma-separated (out_dir, HF dir, hub name), or a dir of runs
host = '127.0.0.1'          # bind address; any other than localhost needs api_key
port = 8000                 # TCP port; 0 = any free port
api_key = ''                # if set, the API needs the header 'Authorization: Bearer <api_key>'
max_batch = 16              # decode slots per model; further rows wait in a queue
max_tokens_limit = 4096     # the largest max_tokens a request may ask for
n_limit = 16                # the largest n (samples per prompt) and num_beams
device = 'auto'             # auto | cpu | cuda | cuda:N | mps
dtype = 'auto'              # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
quantize = ''               # '' (off) | int8: int8 weights in every linear and the token embedding; CPU (quantize_int8)
runs_dir = '.'              # GET /runs lists its subdirectories that hold metrics.jsonl (the run dashboard)
# -----------------------------------------------------------------------------
CONFIG_KEYS = [k for k in globals() if k not in _before and k != '_before']  # the settings above, not constants
MAX_BODY = 1 << 20          # request bodies over 1 MB get 413
MAX_STOPS = 4               # stop strings per request, as OpenAI
MAX_TOP_LOGPROBS = 20       # alternatives per token, as OpenAI's chat API
ATTENTION_LIMIT = 128       # prompt tokens for /v1/attention: the maps grow as layers * heads * T^2
WEB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'web')
LOCAL_HOSTS = ('127.0.0.1', 'localhost', '::1')

class ApiError(Exception):
    """A 4xx (or 5xx) answer with OpenAI's error body."""
    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self):
        kind = 'server_error' if self.status >= 500 else 'invalid_request_error'
        return {'error': {'message': str(self), 'type': kind, 'param': self.param, 'code': self.code}}

# -----------------------------------------------------------------------------
# the worker: one thread per model decodes every running request as one batch

class Row:
    """One sequence being decoded: sample `sample_index` of prompt `prompt_index` of a request (o)."""
    def __init__(self, o, prompt_index, sample_index, prompt, device):
        self.o, self.prompt_index, self.sample_index, self.prompt, self.out = o, prompt_index, sample_index, prompt, []
        self.text = TextStream(o)  # sample.py's UTF-8-safe text deltas and stop strings
        # subtle: a private generator per row, so the draws of a seeded row do not depend on its neighbours;
        # sample i of n gets seed+i, so n=1 gives exactly what sample.generate(seed=seed) gives
        self.gen = torch.Generator(device=device).manual_seed(o.seed + sample_index) if o.seed is not None else None
        self.prompt_logprobs = None  # ([None, lp1, ...], [None, top1, ...]) for echo + logprobs, set by the worker

class Worker(threading.Thread):
    def __init__(self, model_name, model, tok, max_batch):
        super().__init__(daemon=True, name=f'worker-{model_name}')
        self.model_name, self.model, self.tok, self.max_batch = model_name, model, tok, max_batch
        p = next(model.parameters())
        self.device, self.dtype, self.block_size = p.device, p.dtype, model.config.block_size
        self.V = min(model.config.vocab_size, tok.vocab_size)  # GPT-2 pads 50257 to 50304: never choose those ids
        self.inbox, self.waiting, self.active = queue.Queue(), deque(), []
        self.cache = self.logits = None  # the batch's KV cache and next-token logits (B, V), row b = active[b]
        self.stats = dict(steps=0, peak_batch=0, rows_finished=0, rows_cancelled=0, compactions=0)

    def submit(self, rows):
        self.inbox.put(rows)

    def call(self, fn):
        """Run fn() on this worker's thread between two decode steps and return its result (or raise its error):
        the model is only ever used by one thread."""
        done = queue.Queue()
        self.inbox.put((fn, done))
        ok, value = done.get()
        if not ok:
            raise value
        return value

    def stop(self):
        self.inbox.put(None)

    @torch.inference_mode()
    def run(self):
        while True:
            try:  # 1) new work: wait for it when idle, otherwise just look
                while True:
                    item = self.inbox.get(block=not (self.active or self.waiting))
                    if item is None:
                        return
                    if isinstance(item, tuple):
                        fn, done = item
                        try:
                            done.put((True, fn()))
                        except Exception as e:
                            done.put((False, e))
                    else:
                        self.waiting.extend(item)
            except queue.Empty:
                pass
            try:
                self._step()
            except Exception as e:  # a bug must not hang the clients: fail what is running, keep serving
                traceback.print_exc()
                for row in self.active + list(self.waiting):
                    row.o.queue.put(e)
                self.active, self.cache, self.logits = [], None, None
                self.waiting.clear()

    def _step(self):
        # 2) admit waiting rows into free slots
        self._admit()
        if not self.active:
            return
        # 3) choose every row's next token and send it to its request
        keep = []
        for b, (row, ev) in enumerate(zip(self.active, self._choose())):
            row.o.queue.put(ev)
            if ev.finish_reason is None and not row.o.cancelled:
                keep.append(b)
            else:
                self.stats['rows_finished' if ev.finish_reason else 'rows_cancelled'] += 1
        # 4) finished and abandoned rows leave the batch
        if len(keep) < len(self.active):
            self.active = [self.active[b] for b in keep]
            if not keep:
                self.cache = self.logits = None
                return
            self.cache.select(torch.tensor(keep, device=self.device))
        # 5) one forward for every row still running; a full cache is compacted first (see _merge)
        if self.cache.length == self.cache.max_len:
            self.cache = self._merge([(self.cache, b) for b in range(len(self.active))])
            self.stats['compactions'] += 1
        idx = torch.tensor([[row.out[-1]] for row in self.active], device=self.device)  # (B, 1)
        logits, _ = self.model(idx, cache=self.cache)
        self.logits = logits[:, -1, :self.V].float()  # (B, V), the tokenizer's ids only
        self.stats['steps'] += 1

    def _admit(self):
        new, prefills = [], {}  # the n samples of a prompt share one prefill, keyed by (request, prompt)
        try:
            while self.waiting and len(self.active) + len(new) < self.max_batch:
                row = self.waiting.popleft()
                if row.o.cancelled:
                    continue
                new.append(row)
                key = (id(row.o), row.prompt_index)
                if key not in prefills:
                    prefills[key] = self._prefill(row.prompt, row.o)
                row.prompt_logprobs = prefills[key][2]
                if row.o.max_tokens == 0:  # scoring only (echo): done without taking a slot
                    new.pop()
                    row.o.queue.put(Event(row.prompt_index, row.sample_index, None, '', None, None, 'length'))
        except Exception:  # back in the queue, so run() fails these rows too and their clients hear of it
            self.waiting.extendleft(reversed(new))
            raise
        if not new:
            return
        joining = [prefills[id(row.o), row.prompt_index] for row in new]  # (logits, cache, _) of each new row
        parts = [(self.cache, b) for b in range(len(self.active))] + [(cache, 0) for _, cache, _ in joining]
        self.active += new
        self.cache = self._merge(parts)
        self.logits = torch.cat(([self.logits] if self.logits is not None else []) + [lg for lg, _, _ in joining])
        self.stats['peak_batch'] = max(self.stats['peak_batch'], len(self.active))

    def _prefill(self, prompt, o):
        """One prompt alone, no padding -> (next-token logits (1, V), its KV cache, prompt logprobs or None).
        Echo with logprobs needs the logits of every position: position i predicts token i+1."""
        cache = KVCache(self.model.config, 1, len(prompt), self.device, self.dtype)
        logits, _ = self.model(torch.tensor([prompt], device=self.device), cache=cache, last_only=not o.echo_lp)
        logits = logits[0, :, :self.V].float()  # (T or 1, V)
        scores = None
        if o.echo_lp:
            logp = F.log_softmax(logits[:-1], dim=-1)  # (T-1, V), the raw distribution as sample.py reports it
            lps = logp.gather(1, torch.tensor(prompt[1:], device=self.device)[:, None])[:, 0].tolist()
            scores = ([None] + lps, [None] + top_logprobs(logp, o.logprobs))
        return logits[-1:], cache, scores

    def _merge(self, parts):
        """Rows given as (cache, row) -> one left-padded cache holding them in that order. Each row's filled slots
        are copied right-aligned, so the new length T is the longest row and no slot is wasted on padding that
        every row shares; there is room for the longest remaining generation, within block_size."""
        lens = [c.length - int(c.pad[b]) for c, b in parts]
        T = max(lens)
        room = max(row.o.max_tokens - len(row.out) for row in self.active)
        new = KVCache(self.model.config, len(parts), min(T + room, self.block_size), self.device, self.dtype,
                      pad=torch.tensor([T - n for n in lens]))
        for i, ((c, b), n) in enumerate(zip(parts, lens)):
            for layer in range(len(new.k)):
                new.k[layer][i, :, T - n:T] = c.k[layer][b, :, c.length - n:c.length]
                new.v[layer][i, :, T - n:T] = c.v[layer][b, :, c.length - n:c.length]
        new.length = T
        return new

    def _choose(self):
        """Every active row's next token under its own settings -> one sample.Event per row."""
        logits = self.logits
        logp = F.log_softmax(logits, dim=-1)  # (B, V) the raw distribution, for the reported logprobs
        nxt = logits.argmax(-1)               # greedy rows need nothing more
        groups = {}  # sampling rows without penalties, by their settings
        for b, row in enumerate(self.active):
            o = row.o
            if o.penalized:  # sample.py's processors, one row at a time
                seen, counts = penalty_state([row.prompt], [row.out], self.V, self.device, **o.pen)
                x = process_logits(logits[b:b + 1], seen, counts, temperature=o.temperature, **o.filters, **o.pen)
                nxt[b] = sample_next(x, o.temperature, row.gen)[0]
            elif o.temperature > 0:
                groups.setdefault((o.temperature, *o.filters.items()), []).append(b)
        # rows with the same settings share one process_logits and softmax (under 16 clients this loop was a fifth of
        # the worker's time, measured): both work row by row, so each row's probabilities are bitwise those
        # sample.generate computes for it alone; only the draw takes the row's own generator
        for (t, *filters), rows in groups.items():
            probs = process_logits(logits[rows], temperature=t, **dict(filters)).softmax(-1)  # (G, V)
            free = [i for i, b in enumerate(rows) if self.active[b].gen is None]  # unseeded: one draw for all
            if free:
                nxt[[rows[i] for i in free]] = torch.multinomial(probs[free], 1)[:, 0]
            for i, b in enumerate(rows):
                if self.active[b].gen is not None:
                    nxt[b] = torch.multinomial(probs[i:i + 1], 1, generator=self.active[b].gen)[0, 0]
        lps = logp.gather(1, nxt[:, None])[:, 0].tolist()
        events = []
        for b, (row, t) in enumerate(zip(self.active, nxt.tolist())):
            row.out.append(t)
            delta, reason = row.text.push(t, len(row.out) == row.o.max_tokens)
            top = top_logprobs(logp[b:b + 1], row.o.logprobs)[0] if row.o.logprobs else None
            events.append(Event(row.prompt_index, row.sample_index, t, delta, lps[b], top, reason))
        return events

# -----------------------------------------------------------------------------
# requests: checking the body, and OpenAI's response shapes

COMMON_FIELDS = {'model', 'max_tokens', 'temperature', 'top_p', 'n', 'stop', 'seed', 'presence_penalty',
                 'frequency_penalty', 'stream', 'stream_options', 'user', 'top_k', 'min_p', 'repetition_penalty',
                 'num_beams', 'length_penalty'}
COMPLETION_FIELDS = COMMON_FIELDS | {'prompt', 'logprobs', 'echo'}
CHAT_FIELDS = COMMON_FIELDS | {'messages', 'logprobs', 'top_logprobs', 'max_completion_tokens'}
PEN_OFF = dict(repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)

def _number(body, name, default, lo, hi, integer=False):
    """body[name] as a number in [lo, hi]; absent or JSON null = default."""
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got {json.dumps(v)[:60]}",
                       name, 'invalid_type')
    if not lo <= v <= hi:  # also catches NaN, which Python's json accepts
        raise ApiError(400, f"'{name}'={v} is out of range: it must be between {lo} and {hi}", name, 'invalid_value')
    return v

def _flag(body, name):
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise ApiError(400, f"'{name}' must be true or false, got {json.dumps(v)[:60]}", name, 'invalid_type')
    return bool(v)

def _is_ids(x):
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

def _encode(w, text, param):
    try:
        return w.tok.encode(text)
    except ValueError as e:  # e.g. a character the char vocabulary lacks
        raise ApiError(400, f"'{param}': {e}", param, 'invalid_value') from None

def _read_request(w, body, chat):
    """A completions or chat body, checked against the model -> (settings o, prompts as token id lists).
    Every problem is an ApiError(400) that names the field."""
    for k in body:
        if k not in (CHAT_FIELDS if chat else COMPLETION_FIELDS):
            close = difflib.get_close_matches(k, CHAT_FIELDS if chat else COMPLETION_FIELDS, n=2)
            raise ApiError(400, f"unknown field '{k}'" + (f"; did you mean {' or '.join(close)}?" if close else
                           ''), k, 'unknown_parameter')
    tok, stop_tokens, stop_strings = w.tok, [w.tok.eot] if w.tok.eot is not None else [], []
    # 1) the prompts
    if chat:
        messages = body.get('messages')
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects", 'messages')
        for m in messages:  # OpenAI's content parts [{"type": "text", "text": ...}] -> one string
            if isinstance(m, dict) and isinstance(m.get('content'), list):
                m['content'] = ''.join(p.get('text', '') for p in m['content'] if isinstance(p, dict))
        try:
            prompts = [tok.render_chat(messages, add_generation_prompt=True)[0]]
        except ValueError as e:
            raise ApiError(400, f"'messages': {e}", 'messages') from None
        stop_tokens, stop_strings = tok.chat_stop_tokens, list(tok.stop_strings)
    else:
        p = body.get('prompt')
        if isinstance(p, str) or (_is_ids(p) and p):
            p = [p]
        if not isinstance(p, list) or not p or not all(isinstance(x, str) or _is_ids(x) for x in p):
            raise ApiError(400, "'prompt' must be a string, a list of token ids, or a non-empty list of either", 'prompt')
        prompts = [_encode(w, x, 'prompt') if isinstance(x, str) else x for x in p]
        prompts = [x or ([tok.eot] if tok.eot is not None else []) for x in prompts]  # '' = from end-of-text
        if any(not x for x in prompts):
            raise ApiError(400, "empty prompt; give at least one token", 'prompt')
        if any(not 0 <= t < w.V for x in prompts for t in x):
            raise ApiError(400, f"prompt token ids must be in [0, {w.V})", 'prompt', 'invalid_value')
    # 2) the sampling settings
    longest = max(map(len, prompts))
    default_max = min(max_tokens_limit, w.block_size - longest) if chat else min(16, w.block_size - longest)
    max_tokens = _number(body, 'max_completion_tokens', None, 0, max_tokens_limit, integer=True) if chat else None
    max_tokens = _number(body, 'max_tokens', max_tokens, 0, max_tokens_limit, integer=True)
    max_tokens = max(0, default_max) if max_tokens is None else max_tokens
    if longest + max_tokens > w.block_size:
        raise ApiError(400, f"This model's maximum context length is {w.block_size} tokens. However, you requested "
                       f"{longest + max_tokens} tokens ({longest} in the {'messages' if chat else 'prompt'}, "
                       f"{max_tokens} in the completion). Please reduce the length of the "
                       f"{'messages' if chat else 'prompt'} or max_tokens.", 'messages' if chat else 'prompt',
                       'context_length_exceeded')
    stop = body.get('stop')
    stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of them", 'stop')
    if chat:
        k = _number(body, 'top_logprobs', None, 0, MAX_TOP_LOGPROBS, integer=True)
        if k is not None and not _flag(body, 'logprobs'):
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", 'top_logprobs')
        logprobs = (k or 0) if _flag(body, 'logprobs') else None
    else:
        logprobs = _number(body, 'logprobs', None, 0, MAX_TOP_LOGPROBS, integer=True)
    opts = body.get('stream_options')
    if opts is not None and not (isinstance(opts, dict) and set(opts) <= {'include_usage'}):
        raise ApiError(400, "'stream_options' must be an object like {\"include_usage\": true}", 'stream_options')
    pen = dict(repetition_penalty=_number(body, 'repetition_penalty', 1.0, 0.01, 10.0),
               presence_penalty=_number(body, 'presence_penalty', 0.0, -2.0, 2.0),
               frequency_penalty=_number(body, 'frequency_penalty', 0.0, -2.0, 2.0))
    o = SimpleNamespace(
        max_tokens=max_tokens, n=_number(body, 'n', 1, 1, n_limit, integer=True),
        temperature=_number(body, 'temperature', 1.0, 0.0, 2.0), pen=pen, penalized=pen != PEN_OFF,
        filters=dict(top_p=_number(body, 'top_p', 1.0, 0.0, 1.0), top_k=_number(body, 'top_k', 0, 0, w.V, integer=True),
                     min_p=_number(body, 'min_p', 0.0, 0.0, 1.0)),
        seed=_number(body, 'seed', None, 0, 2**62, integer=True), logprobs=logprobs,
        echo=not chat and _flag(body, 'echo'), stream=_flag(body, 'stream'),
        include_usage=bool((opts or {}).get('include_usage')),
        num_beams=_number(body, 'num_beams', 1, 1, n_limit, integer=True),
        length_penalty=_number(body, 'length_penalty', 1.0, -10.0, 10.0),
        tokenizer=tok, stop_tokens=set(stop_tokens), stop_strings=stop_strings + stop,  # what TextStream reads
        queue=queue.Queue(), cancelled=False)
    o.echo_lp = o.echo and logprobs is not None
    if o.filters['top_p'] == 0 or o.filters['min_p'] == 1:
        name = 'top_p' if o.filters['top_p'] == 0 else 'min_p'
        raise ApiError(400, "'top_p' must be in (0, 1] (1 = off); 'min_p' in [0, 1) (0 = off)", name, 'invalid_value')
    if o.num_beams > 1 and (o.n > o.num_beams or o.echo_lp):
        raise ApiError(400, "beam search returns the best n <= num_beams beams and cannot echo prompt logprobs; "
                       "lower n, or drop num_beams or echo", 'num_beams', 'invalid_value')
    return o, prompts


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

def _beam_events(w, o, prompts):
    """Beam search through sample.py on the worker thread: all events at once, at the end."""
    def run():
        return list(generate_stream(w.model, prompts, o.max_tokens, num_beams=o.num_beams, num_samples=o.n,
                                    length_penalty=o.length_penalty, stop_tokens=o.stop_tokens,
                                    stop_strings=o.stop_strings, tokenizer=w.tok, logprobs=o.logprobs or 0, **o.pen))
    return w.call(run)

def _completion(h, body, chat):
    w = h.worker(body)
    o, prompts = _read_request(w, body, chat)
    rows = [Row(o, pi, si, p, w.device) for pi, p in enumerate(prompts) for si in range(o.n)]
    try:
        if o.num_beams > 1:
            events = iter(_beam_events(w, o, prompts))
        else:
            w.submit(rows)
            events = h.events(o, len(rows))
        rid, created = ('chatcmpl-' if chat else 'cmpl-') + uuid.uuid4().hex[:24], int(time.time())
        head = {'id': rid, 'object': 'chat.completion' if chat else 'text_completion', 'created': created,
                'model': w.model_name}
        usage = {'prompt_tokens': sum(map(len, prompts)), 'completion_tokens': 0}
        (_stream if o.stream else _reply)(h, w, o, rows, events, chat, head, usage)
    finally:
        o.cancelled = True  # whatever happened (done, error, client gone), the worker may drop these rows

def _reply(h, w, o, rows, events, chat, head, usage):
    acc = [SimpleNamespace(tokens=[], lps=[], tops=[], text='', finish=None) for _ in rows]
    for ev in events:
        a = acc[ev.prompt_index * o.n + ev.sample_index]
        if ev.token is not None:
            a.tokens.append(ev.token)
            a.lps.append(ev.logprob)
            a.tops.append(ev.top_logprobs)
            usage['completion_tokens'] += 1
        a.text += ev.text_delta
        a.finish = ev.finish_reason or a.finish
    choices = []
    for i, (a, row) in enumerate(zip(acc, rows)):
        if chat:
            lp = _chat_logprobs(w, a.tokens, a.lps, a.tops) if o.logprobs is not None else None
            choices.append({'index': i, 'message': {'role': 'assistant', 'content': a.text}, 'logprobs': lp,
                            'finish_reason': a.finish})
            continue
        lp, text = None, a.text
        if o.echo:
            text = w.tok.decode(row.prompt) + text
        if o.echo_lp:
            lp = _legacy_logprobs(w, row.prompt + a.tokens, row.prompt_logprobs[0] + a.lps, row.prompt_logprobs[1] + a.tops)
        elif o.logprobs is not None:
            lp = _legacy_logprobs(w, a.tokens, a.lps, a.tops)
        choices.append({'index': i, 'text': text, 'logprobs': lp, 'finish_reason': a.finish})
    usage['total_tokens'] = usage['prompt_tokens'] + usage['completion_tokens']
    h.send_json(200, {**head, 'choices': choices, 'usage': usage})

def _stream(h, w, o, rows, events, chat, head, usage):
    """Server-sent events in OpenAI's chunk format, one chunk per token (and per finish), then data: [DONE]."""
    head = {**head, 'object': 'chat.completion.chunk' if chat else 'text_completion'}

    def chunk(i, **choice):
        h.sse({**head, 'choices': [{'index': i, 'logprobs': None, 'finish_reason': None, **choice}]})
    h.start_sse()
    started = set()
    for ev in events:
        i = ev.prompt_index * o.n + ev.sample_index
        row, tok = rows[i], [ev.token] if ev.token is not None else []
        usage['completion_tokens'] += len(tok)
        if chat:
            lp = _chat_logprobs(w, tok, [ev.logprob], [ev.top_logprobs]) if o.logprobs is not None and tok else None
            if i not in started:  # OpenAI opens each choice with its role
                chunk(i, delta={'role': 'assistant', 'content': ''})
            if ev.text_delta or lp:
                chunk(i, delta={'content': ev.text_delta}, logprobs=lp)
            if ev.finish_reason:
                chunk(i, delta={}, finish_reason=ev.finish_reason)
        else:
            if o.echo and i not in started:  # the prompt comes first, as its own chunk
                chunk(i, text=w.tok.decode(row.prompt),
                      logprobs=_legacy_logprobs(w, row.prompt, *row.prompt_logprobs) if o.echo_lp else None)
            lp = _legacy_logprobs(w, tok, [ev.logprob] * len(tok), [ev.top_logprobs] * len(tok)) \
                if o.logprobs is not None else None
            if ev.text_delta or ev.finish_reason or tok and lp:
                chunk(i, text=ev.text_delta, logprobs=lp, finish_reason=ev.finish_reason)
        started.add(i)
    if o.include_usage:  # OpenAI: a last chunk with no choices carries the usage
        usage['total_tokens'] = usage['prompt_tokens'] + usage['completion_tokens']
        h.sse({**head, 'choices': [], 'usage': usage})
    h.sse('[DONE]')
    h.end_sse()

# -----------------------------------------------------------------------------
# the other endpoints

def _models(h, body):
    h.send_json(200, {'object': 'list', 'data': [
        {'id': name, 'object': 'model', 'created': h.server.started, 'owned_by': 'nanolab',
         'max_model_len': w.block_size, 'arch': w.model.config.arch, 'n_params': w.model.num_params(),
         'tokenizer': w.tok.kind} for name, w in h.server.workers.items()]})

def _tokenize(h, body):
    w = h.worker(body)
    text = body.get('prompt')
    if 'messages' in body:  # the chat template's tokens, as /v1/chat/completions would decode from
        try:
            ids = w.tok.render_chat(body['messages'], add_generation_prompt=_flag(body, 'add_generation_prompt'))[0]
        except ValueError as e:
            raise ApiError(400, f"'messages': {e}", 'messages') from None
    elif not isinstance(text, str):
        raise ApiError(400, "'prompt' must be a string (or send 'messages' for the chat template)", 'prompt')
    elif text in w.tok.special_tokens:
        # subtle: encode() reads plain text, but lm-eval's remote tokenizer finds eos_token_id by tokenizing the
        # eos_token string, so a prompt that IS a special token's text gets that token's id
        ids = [w.tok.special_tokens[text]]
    else:
        ids = _encode(w, text, 'prompt')
    h.send_json(200, {'tokens': ids, 'count': len(ids), 'max_model_len': w.block_size,
                      'token_strs': [w.tok.decode([t]) for t in ids]})

def _detokenize(h, body):
    w = h.worker(body)
    ids = body.get('tokens')
    if not _is_ids(ids) or any(not 0 <= t < w.V for t in ids):
        raise ApiError(400, f"'tokens' must be a list of token ids in [0, {w.V})", 'tokens')
    h.send_json(200, {'prompt': w.tok.decode(ids)})

def _tokenizer_info(h, body):
    w = h.worker(body)
    tok = w.tok
    eos = next((s for s, i in tok.special_tokens.items() if i == tok.eot), None)
    h.send_json(200, {'model': w.model_name, 'kind': tok.kind, 'vocab_size': w.V, 'max_model_len': w.block_size,
                      'eos_token': eos, 'eos_token_id': tok.eot, 'bos_token': None, 'pad_token': None,
                      'special_tokens': tok.special_tokens, 'chat_stop_tokens': tok.chat_stop_tokens,
                      'chat_stop_strings': tok.stop_strings})

def _attention(h, body):
    w = h.worker(body)
    p = body.get('prompt')
    ids = _encode(w, p, 'prompt') if isinstance(p, str) else p
    if not _is_ids(ids) or not 0 < len(ids) <= min(ATTENTION_LIMIT, w.block_size) or any(not 0 <= t < w.V for t in ids):
        raise ApiError(400, f"'prompt' must be text or token ids, 1 to {min(ATTENTION_LIMIT, w.block_size)} tokens",
                       'prompt')
    maps = w.call(lambda: w.model.attention_maps(torch.tensor([ids], device=w.device)))  # [(1, nh, T, T)] per layer
    h.send_json(200, {'model': w.model_name, 'tokens': [w.tok.decode([t]) for t in ids],
                      'attentions': [[[[round(x, 4) for x in r] for r in head] for head in a[0].float().tolist()]
                                     for a in maps]})

def _runs(h, body):
    """Every run under runs_dir (a subdirectory holding metrics.jsonl) with its config and logged rows."""
    runs, root = [], h.server.runs_dir
    for d in sorted(os.listdir(root)):
        path = os.path.join(root, d, 'metrics.jsonl')
        if not os.path.isfile(path):
            continue
        with open(path) as f:  # subtle: a run being trained may have a half-written last line; skip it
            rows = [json.loads(line) for line in f if line.strip().endswith('}')]
        cfg = os.path.join(root, d, 'config.json')
        runs.append({'name': d, 'served': d in h.server.workers, 'metrics': rows,
                     'config': json.load(open(cfg)) if os.path.isfile(cfg) else None})
    h.send_json(200, {'object': 'list', 'data': runs})

def _leaderboard(h, body):
    """The latest evaluate.py result per (checkpoint, task) under runs_dir/*/eval/, read by results.read_results as
    the model cards and evaluate.py's leaderboard read them; per-item scores and configs are left out (size)."""
    from results import LOWER_IS_BETTER, read_results
    results, skipped = read_results(glob.glob(os.path.join(h.server.runs_dir, '*', 'eval', '*.json')))
    keep = ('model', 'checkpoint', 'iter', 'task', 'n', 'metrics', 'stderr', 'created')
    h.send_json(200, {'object': 'list', 'lower_is_better': LOWER_IS_BETTER, 'skipped': len(skipped),
                      'data': [{k: r.get(k) for k in keep} for r in results]})

API = {'/v1/models': ('GET', _models), '/v1/completions': ('POST', lambda h, b: _completion(h, b, False)),
       '/v1/chat/completions': ('POST', lambda h, b: _completion(h, b, True)), '/tokenize': ('POST', _tokenize),
       '/detokenize': ('POST', _detokenize), '/tokenizer_info': ('GET', _tokenizer_info),
       '/v1/attention': ('POST', _attention), '/runs': ('GET', _runs),
       '/leaderboard': ('GET', _leaderboard)}

# -----------------------------------------------------------------------------
# HTTP

class Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'  # keep-alive: an evaluation client sends thousands of requests
    timeout = 300                  # an idle connection gives its thread back after 5 minutes
    server_version = 'nanolab'

    def do_GET(self):
        self.route('GET')

    def do_POST(self):
        self.route('POST')

    def route(self, method):
        url, self.started = urlsplit(self.path), False
        try:
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
        except ApiError as e:
            if self.started:  # mid-stream: the status line is gone, so say it in the stream and close
                self.sse(e.body())
                self.close_connection = True
            else:
                self.send_json(e.status, e.body())
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the client has gone; _completion has already released its rows
        except Exception as e:
            traceback.print_exc()
            if not self.started:
                self.send_json(500, ApiError(500, f'internal error: {type(e).__name__}: {e}').body())
            self.close_connection = True

    def body(self):
        n = self.headers.get('Content-Length', '' if 'chunked' in self.headers.get('Transfer-Encoding', '') else '0')
        if not n.isdigit() or int(n) > MAX_BODY:
            self.close_connection = True  # the unread body would be taken for the next request
            if not n.isdigit():
                raise ApiError(411, "send the body with a Content-Length header (not chunked)", None, 'bad_length')
            raise ApiError(413, f"request body of {n} bytes is over the {MAX_BODY} byte limit; send fewer or "
                           "shorter prompts per request", None, 'request_too_large')
        n = int(n)
        try:
            body = json.loads(self.rfile.read(n))
        except ValueError as e:
            raise ApiError(400, f"the body is not valid JSON ({e}); send a JSON object", None, 'invalid_json') from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object {...}", None, 'invalid_json')
        return body

    def worker(self, body):
        """The worker of body['model']; the first model when there is no 'model'."""
        workers, name = self.server.workers, body.get('model')
        if name is None:
            return next(iter(workers.values()))
        if name not in workers:
            raise ApiError(404, f"The model '{name}' does not exist; this server has {', '.join(workers)} "
                           "(GET /v1/models)", 'model', 'model_not_found')
        return workers[name]

    def events(self, o, n_rows):
        """This request's events from the worker until all its rows finish. Between events it checks whether the
        client has gone (a closed socket reads as EOF), so an abandoned request frees its slots."""
        while n_rows:
            try:
                ev = o.queue.get(timeout=0.25)
            except queue.Empty:
                ev = None
            if self.client_gone():  # a select() per event: microseconds, where a token costs a forward pass
                raise ConnectionResetError('client went away')
            if ev is None:
                continue
            if isinstance(ev, Exception):
                raise ev
            n_rows -= ev.finish_reason is not None
            yield ev

    def client_gone(self):
        try:
            readable = select.select([self.connection], [], [], 0)[0]
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b''
        except OSError:
            return True

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

    def send(self, status, data, ctype):
        self.send_response(status)
        self.send_header('Content-Type', ctype)
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_json(self, status, obj):
        self.send(status, json.dumps(obj).encode(), 'application/json')

    def start_sse(self):
        self.send_response(200)
        self.send_header('Content-Type', 'text/event-stream')
        self.send_header('Cache-Control', 'no-cache')
        self.send_header('Transfer-Encoding', 'chunked')  # HTTP/1.1: the connection stays usable afterwards
        self.end_headers()
        self.started = True

    def sse(self, obj):
        """One server-sent event, as one HTTP chunk."""
        data = b'data: ' + (obj if isinstance(obj, str) else json.dumps(obj)).encode() + b'\n\n'
        self.wfile.write(b'%x\r\n%s\r\n' % (len(data), data))

    def end_sse(self):
        self.wfile.write(b'0\r\n\r\n')

def model_sources(spec):
    """init_from -> [(name, source)]: comma-separated sources, where a directory that is neither a run nor a Hugging
    Face model stands for every subdirectory holding ckpt.pt. A model's name is its directory's name."""
    out = []
    for s in [x.strip() for x in spec.split(',') if x.strip()]:
        if os.path.isdir(s) and not any(os.path.exists(os.path.join(s, f)) for f in ('ckpt.pt', 'config.json')):
            runs = sorted(d for d in os.listdir(s) if os.path.isfile(os.path.join(s, d, 'ckpt.pt')))
            if not runs:
                raise ValueError(f"{s} holds no ckpt.pt, no config.json and no run directories with ckpt.pt; "
                                 "train a model into it first (python train.py --out_dir=...), or fix the path")
            out += [(d, os.path.join(s, d)) for d in runs]
        else:
            out.append((os.path.basename(os.path.normpath(s)) if os.path.exists(s) else s, s))
    names = [n for n, _ in out]
    if not out or len(set(names)) < len(names):
        raise ValueError(f"init_from={spec!r} gives {'no models' if not out else f'two models named alike: {names}'}; "
                         "give one or more distinct sources, comma-separated")
    return out

def load_workers(spec, device='cpu', dtype=torch.float32, max_batch=16, quantize=''):
    """Load every model of init_from (int8 with quantize='int8') and start its worker -> {name: Worker}."""
    workers = {}
    for name, source in model_sources(spec):
        model, tok, _ = load_model(source, device, dtype)
        if quantize == 'int8':
            quantize_int8(model)
        elif quantize:
            raise ValueError(f"unknown quantize={quantize!r}; use '' (off) or int8")
        if tok is None:
            raise ValueError(f"{source} comes without a tokenizer, so text cannot be encoded; serve a source with "
                             "tokenizer files (a nanolab out_dir, or a Hugging Face dir with tokenizer.json)")
        workers[name] = Worker(name, model, tok, max_batch)
        workers[name].start()
    return workers

class Server(ThreadingHTTPServer):
    """One thread per connection. subtle: socketserver's listen backlog of 5 reset connections when 32 clients
    connected at once (measured), so it is raised."""
    request_queue_size = 256
    daemon_threads = True

def make_server(workers, host='127.0.0.1', port=0, api_key='', runs_dir='.'):
    """The HTTP server for the workers ({name: Worker}); call serve_forever() on it."""
    if host not in LOCAL_HOSTS and not api_key:
        raise ValueError(f"host={host!r} makes the server reachable from other machines; set --api_key=SECRET "
                         "(clients send 'Authorization: Bearer SECRET'), or keep --host=127.0.0.1")
    server = Server((host, port), Handler)
    server.workers, server.api_key, server.runs_dir, server.started = workers, api_key, runs_dir, int(time.time())
    return server

def main():
    from configurator import configure
    config = configure({'__file__': __file__, **{k: globals()[k] for k in CONFIG_KEYS}},
                       choices={'dtype': ('auto', 'float32', 'bfloat16', 'float16'), 'device': None,
                                'quantize': ('', 'int8')})
    globals().update({k: config[k] for k in CONFIG_KEYS})
    dev = resolve_device(device)
    workers = load_workers(init_from, dev, resolve_dtype(dtype, dev), max_batch, quantize)
    server = make_server(workers, host, port, api_key, runs_dir)
    print(f"serving {', '.join(workers)} on http://{host}:{server.server_address[1]}  (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == '__main__':
    try:
        main()
    except ValueError as e:  # bad input: one line naming the problem and the fix, exit 1, no traceback
        raise SystemExit(f'error: {e}')
