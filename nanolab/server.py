"""
The HTTP service behind serve.py: an OpenAI-compatible API with streaming, the tokenizer, models
loaded and unloaded at run time, the endpoints of the page's views (page_api.py) and the page
itself (web/). Standard library only (http.server). The decoding, batching and fairness between
clients are engine.py's (one Engine per model, all stepped on one engine thread); the guards
against hostile pages and clients httpd.py's; OpenAI's request and answer formats openai_api.py's.

    engines = load_engines('out-shakespeare-char', 'cpu', torch.float32, max_batch=16)
    make_server(engines, port=8000).serve_forever()

Endpoints (errors are OpenAI's body {"error": {message, type, param, code}}; "model" defaults to
the first one):
    GET  /v1/models; POST /v1/completions, /v1/chat/completions (openai_api.py)
    POST /tokenize, /detokenize; GET /tokenizer_info: in vLLM's shapes, which lm-eval's remote
        tokenizer reads
    POST /v1/models/load {source}, /v1/models/unload {model}: models at run time, beside the others
        (read only under runs_dir, --models_dir and the Hugging Face cache: model_path)
    the page's views (page_api.py): /v1/attention, /v1/inspect, /v1/tokenizers, /v1/embedding_map,
        /v1/templates, /v1/arena/*, /runs, /leaderboard, /v1/registry (runs_dir's models,
        checkpoints and exports), /v1/shape (model.py's rules and counts for any shape)
        and the jobs, nanolab's scripts run as the server's children (jobs.py): POST /v1/jobs
        {script, config, settings}, GET /v1/jobs, /v1/jobs/{id}, /v1/jobs/{id}/log; POST
        /v1/jobs/{id}/stop
    the Data tab's (data_api.py): GET /v1/datasets, /v1/datasets/{name} (the datasets under
        --data_dir); POST /v1/uploads?name=FILE (a file's raw bytes, read by its endpoint)
    GET /: files from web/
"""
import hmac
import json
import mimetypes
import os
import re
import threading
import time
import traceback
from dataclasses import asdict
from urllib.parse import parse_qs, unquote, urlsplit

import torch

from nanolab import arena, data_api, hf, jobs, page_api, prompts
from nanolab.checkpoint import MODEL_NAME, TUNED, checkpoint_stage, load_model, model_sources
from nanolab.engine import Engine, NumericalError, compiled
from nanolab.engine_thread import adopt, start
from nanolab.events import BeamStep
from nanolab.files import inside, link_out
from nanolab.httpd import ApiError, GuardedHandler, Server
from nanolab.openai_api import completion, encode, flag, is_ids
from nanolab.quantize import for_inference

WEB_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'web')
LOCAL_HOSTS = ('127.0.0.1', 'localhost', '::1')
# a Hugging Face hub name: 'gpt2', 'HuggingFaceTB/SmolLM-135M'
HUB_NAME = re.compile(r'[A-Za-z0-9][\w.\-]{0,95}(/[A-Za-z0-9][\w.\-]{0,95})?')

# -----------------------------------------------------------------------------
# 1) the models: list, load, unload

def _model_entry(h, name, w):
    return {'id': name, 'object': 'model', 'created': getattr(w, 'created', h.server.started),
            'owned_by': 'nanolab', 'max_model_len': w.block_size, 'arch': w.model.config.arch,
            'n_params': w.model.num_params(), 'tokenizer': w.tok.kind,
            'config': asdict(w.model.config), 'source': getattr(w, 'source', None),
            'stage': getattr(w, 'stage', None),
            'chat': getattr(w, 'stage', None) in TUNED}  # chat: fine-tuned

def _models(h, body):
    h.send_json(200, {'object': 'list',
                      'data': [_model_entry(h, name, w) for name, w in h.server.engines.items()]})


def _load(h, body):
    """POST /v1/models/load {"source": a run directory, ckpt.pt, .safetensors or Hugging Face
    directory under runs_dir, a --models_dir or the Hugging Face cache (model_path), or a hub name;
    "name": optional}: load it with the server's device, dtype and quantize, beside the others
    (engine_thread.adopt: built on a thread of its own, so they decode meanwhile), -> the model's
    GET /v1/models entry. One load at a time; max_models at once."""
    source, name = body.get('source'), body.get('name')
    if not isinstance(source, str) or not source.strip() or len(source) > 4096 or '\0' in source:
        raise ApiError(400,
                       '"source" must be a model source: a run directory, a checkpoint, a Hugging '
                       'Face directory or hub name',
                       'source', 'invalid_source')
    with h.server.models_lock:
        engines = h.server.engines
        if len(engines) >= h.server.max_models:
            raise ApiError(409,
                           f"{len(engines)} models are loaded, this server's --max_models; unload "
                           "one first (POST /v1/models/unload)",
                           None, 'too_many_models')
        name = name if name is not None else \
            os.path.basename(os.path.normpath(source.removesuffix('/ckpt.pt')))
        if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
            raise ApiError(400,
                           '"name" must be 1-64 letters, digits, ".", "_" or "-", '
                           f'got {json.dumps(name)[:70]}',
                           'name', 'invalid_name')
        if name in engines:
            raise ApiError(409,
                           f"a model named {name!r} is loaded already; unload "
                           "it, or give another \"name\"",
                           'name', 'model_exists')
        first = next(iter(engines.values()))
        try:
            path = model_path(source, h.server.model_roots)
            engine = adopt(first, lambda: _engine(path, **first.options))
        except ValueError as e:  # load_model names what is wrong with the source and what to do
            raise ApiError(400, str(e), 'source', 'invalid_source') from None
        # a new dict: a request reading the old one is unaffected
        h.server.engines = {**engines, name: engine}
    h.send_json(200, _model_entry(h, name, engine))

def model_path(source, roots):
    """The path POST /v1/models/load reads a source from: the first of roots (realpaths) that holds
    it, resolved with every link, and every file in it too, inside one of roots; or a hub name,
    downloaded into the Hugging Face cache. Any other path, absent or not, gets one ValueError,
    which says nothing of what is there."""
    outside = ValueError(f"no model source {source[:200]!r} under this server's --runs_dir, "
                         "--models_dir or Hugging Face cache; give a path relative to one of "
                         "them, or start the server with --models_dir=DIR")
    # an absolute path as it is; a relative one under each root, where it is (its own name: it may
    # be a link, which must then lead inside too)
    candidates = [source] if os.path.isabs(source) else \
        [c for c in (os.path.normpath(os.path.join(r, source)) for r in roots)
         if inside(c, roots) and os.path.lexists(c)]
    for c in candidates:
        full = os.path.realpath(c)
        if not inside(full, roots) or not os.path.exists(full):
            raise outside
        if os.path.isdir(full) and link_out(full, roots):
            raise ValueError(f"{source[:200]!r} holds a link that leads out of this server's "
                             "--runs_dir, --models_dir and Hugging Face cache; add the directory "
                             "it leads to with --models_dir=DIR")
        return full
    if os.path.isabs(source) or '..' in source.split('/') or not HUB_NAME.fullmatch(source):
        raise outside
    return hf.download(source)  # a hub name: downloaded here, not on the engine thread

def _unload(h, body):
    """POST /v1/models/unload {"model": name}: no new requests go to it; the ones it has finish,
    then it is let go."""
    name = body.get('model')
    with h.server.models_lock:
        engines = h.server.engines
        if not isinstance(name, str) or name not in engines:
            raise ApiError(404,
                           f"no model {json.dumps(name)[:60]} is loaded; this "
                           f"server has {', '.join(engines)}",
                           'model', 'model_not_found')
        if len(engines) == 1:
            raise ApiError(409,
                           f"{name} is the only model loaded; load another "
                           "first (POST /v1/models/load)",
                           'model', 'last_model')
        h.server.engines = {k: v for k, v in engines.items() if k != name}
        engines[name].stop()
    h.send_json(200, {'id': name, 'object': 'model', 'unloaded': True})


# -----------------------------------------------------------------------------
# 2) the tokenizer, in vLLM's shapes (lm-eval's remote tokenizer reads them)

def _tokenize(h, body):
    name, w = h.engine(body)
    text = body.get('prompt')
    # the ids a completion with this template decodes from (prompts.prompt_ids)
    if 'template' in body:
        try:
            ids = prompts.prompt_ids(w.tok, body['template'], body.get('variables') or {},
                                     flag(body, 'cot'))
        except (KeyError, ValueError, TypeError) as e:
            raise ApiError(400, f"'template': {e.args[0] if e.args else e}", 'template') from None
    elif 'messages' in body:
        # the chat template's tokens, as /v1/chat/completions would decode from
        try:
            ids = w.tok.render_chat(body['messages'],
                                    add_generation_prompt=flag(body, 'add_generation_prompt'),
                                    continue_final_message=flag(body, 'continue_final_message'))[0]
        except ValueError as e:
            raise ApiError(400, f"'messages': {e}", 'messages') from None
    elif not isinstance(text, str):
        raise ApiError(400, "'prompt' must be a string (or send 'messages' for the chat template)",
                       'prompt')
    elif text in w.tok.special_tokens:
        # subtle: encode() reads plain text, but lm-eval's remote tokenizer finds eos_token_id by
        # tokenizing the eos_token string, so a prompt that IS a special token's text gets that
        # token's id
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
    # a vocabulary without an end-of-text token (a char model) names a bos instead, for clients that
    # score text from a prefix token (lm-eval's rolling log-likelihood: bos, else eos); eos stays
    # none, so nothing stops at it. A newline (sample.py's default start), else a space. subtle:
    # not id 0 (a char vocabulary's sorted newline), which lm-eval's `bos_id or eos_id` reads as none
    bos = next((c for c in ('\n', ' ', '.') if len(ids := tok.encode(c)) == 1 and ids[0]), None) \
        if eos is None else None
    h.send_json(200, {'model': name, 'kind': tok.kind, 'vocab_size': w.V,
                      'max_model_len': w.block_size, 'eos_token': eos, 'eos_token_id': tok.eot,
                      'bos_token': bos, 'bos_token_id': tok.encode(bos)[0] if bos else None,
                      'pad_token': None, 'special_tokens': tok.special_tokens,
                      'chat_stop_tokens': tok.chat_stop_tokens,
                      'chat_stop_strings': tok.stop_strings})


ROUTES = {'/v1/models': ('GET', _models),
          '/v1/completions': ('POST', lambda h, b: completion(h, b, False)),
          '/v1/chat/completions': ('POST', lambda h, b: completion(h, b, True)),
          '/tokenize': ('POST', _tokenize), '/detokenize': ('POST', _detokenize),
          '/tokenizer_info': ('GET', _tokenizer_info), '/v1/models/load': ('POST', _load),
          '/v1/models/unload': ('POST', _unload), **page_api.ROUTES, **data_api.ROUTES}
# a path with an id in it -> its ROUTES key: /v1/jobs/ID/log -> /v1/jobs/{id}/log (h.path_id = ID)
ID_PATH = re.compile(r'(/v1/jobs/|/v1/datasets/)([^/]+)(/[a-z]+)?')

# -----------------------------------------------------------------------------
# 3) HTTP: the routes, the handler, and the server

class Handler(GuardedHandler):
    """The API and the page; GuardedHandler (httpd.py) reads, checks and writes."""
    def do_GET(self):
        self.route()
    do_POST = do_OPTIONS = do_GET

    def route(self):
        url, method = urlsplit(self.path), self.command
        m = ID_PATH.fullmatch(url.path)
        path, self.path_id = (m[1] + '{id}' + (m[3] or ''), m[2]) if m else (url.path, None)
        try:
            self.check_request(method)
            if method == 'OPTIONS':  # a CORS preflight from an origin in --cors_origins
                return self.send(204, b'', 'text/plain')
            if path not in ROUTES:
                if method != 'GET' or url.path.startswith('/v1/'):
                    raise ApiError(404,
                                   f"unknown path {method} {url.path}; the "
                                   f"API is {', '.join(ROUTES)}",
                                   None, 'unknown_url')
                return self.static(url.path)
            want, fn = ROUTES[path]
            if method not in want.split():
                raise ApiError(405, f"{path} takes {' or '.join(want.split())}, not {method}", None,
                               'method_not_allowed')
            key = self.server.api_key
            if key and not hmac.compare_digest(self.headers.get('Authorization', '').encode(),
                                               f'Bearer {key}'.encode()):
                raise ApiError(401,
                               "missing or incorrect API key: send the header "
                               "'Authorization: Bearer <key>' with the key the server "
                               "was started with (--api_key)",
                               None, 'invalid_api_key')
            # an upload's body is a file, which its endpoint reads itself (data_api._upload)
            body = {} if path == '/v1/uploads' else self.body() if method == 'POST' else \
                {k: v[-1] for k, v in parse_qs(url.query).items()}
            # one client: its address and the key it sends (everything local is 127.0.0.1)
            self.client = (self.client_address[0], self.headers.get('Authorization', ''))
            with self.server.turn(self.client, self.check_client):
                fn(self, body)
        except (ApiError, NumericalError) as e:
            # this request's logits broke, not the server: only it fails
            if isinstance(e, NumericalError):
                e = ApiError(500, str(e), None, 'numerical_error')
            # an unread body would be parsed as the next request
            unread = method != 'GET' and not self.body_read
            # mid-stream: the status line is gone, so say it in the stream (no [DONE]) and close
            if self.started:
                self.sse(e.body())
                self.end_sse()
                self.close_connection = True
            else:
                self.send_json(e.status, e.body())
            if unread:  # discard what is still coming, so the client reads the answer; close
                self.drain()
                self.close_connection = True
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            # the client has gone; completion() has already released its rows
            self.close_connection = True
        except Exception as e:
            traceback.print_exc()
            error = ApiError(500, f'internal error: {type(e).__name__}: {e}').body()
            # mid-stream, the error goes in the stream (OpenAI's way), so the client knows it is
            # not complete
            try:
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
            raise ApiError(404,
                           f"The model {json.dumps(name)[:60]} does not exist; this server has "
                           f"{', '.join(engines)} (GET /v1/models)",
                           'model', 'model_not_found')
        return name, engines[name]

    def events(self, req, beam_steps=False):
        """The request's Events and PromptScores (and with beam_steps its BeamSteps) until all its
        rows finish; between events (and every 0.25 s) it checks that the client is still there, so
        an abandoned request frees its rows."""
        return (ev for ev in req.events(self.check_client)
                if beam_steps or not isinstance(ev, BeamStep))

    def static(self, path):
        rel = unquote(path).lstrip('/') or 'index.html'
        if '..' in rel.replace('\\', '/').split('/') or '\0' in rel:
            raise ApiError(400, "'..' is not allowed in paths", None, 'invalid_path')
        root = os.path.realpath(WEB_DIR)
        full = os.path.realpath(os.path.join(root, rel))
        if os.path.isdir(full):
            full = os.path.join(full, 'index.html')
        # realpath: symlinks cannot lead out
        if not full.startswith(root + os.sep) or not os.path.isfile(full):
            raise ApiError(404, f"no file {path} (static files come from web/)", None, 'not_found')
        with open(full, 'rb') as f:
            self.send(200, f.read(), mimetypes.guess_type(full)[0] or 'application/octet-stream')

def _engine(source, device, dtype, quantize, limits, compile=False):
    """One model source, ready for inference (int8: quantize='int8'; compile: its decode steps
    compiled before it serves), in an Engine that remembers how it was made (source, options), so
    POST /v1/models/load makes the next one alike."""
    model, tok, ckpt = load_model(source, device, dtype)
    if tok is None:
        raise ValueError(f"{source} comes without a tokenizer, so text cannot be encoded; "
                         "serve a source with tokenizer files (a nanolab out_dir, or a "
                         "Hugging Face dir with tokenizer.json)")
    model = for_inference(model, quantize, report=True)
    engine = Engine(compiled(model) if compile else model, tok, **limits)
    if compile:
        t0 = time.time()
        engine.warm_up()
        print(f"{source}: decode steps compiled in {time.time() - t0:.0f} s")
    engine.source, engine.created, engine.stage = source, int(time.time()), checkpoint_stage(ckpt)
    engine.options = dict(device=device, dtype=dtype, quantize=quantize, limits=limits,
                          compile=compile)
    return engine

def load_engines(spec, device='cpu', dtype=torch.float32, quantize='', threads=0, compile=False,
                 **limits):
    """Every model of init_from in an Engine (_engine), loaded and stepped on the engine thread
    (engine_thread.start) -> {name: Engine}. threads: torch's, 0 = its default. limits: Engine's."""
    sources = model_sources(spec)

    def build():
        if threads:
            torch.set_num_threads(threads)
        for name, source in sources:
            yield _engine(source, device, dtype, quantize, limits, compile)
    return dict(zip([name for name, _ in sources], start(build)))

def make_server(engines, host='127.0.0.1', port=0, api_key='', runs_dir='.', allowed_hosts=(),
                cors_origins=(), max_connections=256, read_timeout=10.0, max_models=8,
                max_tokens_limit=4096, n_limit=16, models_dirs=(), max_client_requests=16,
                max_jobs=1, data_dir='data'):
    """The HTTP server for the engines ({name: Engine}); call serve_forever() on it, and
    server.jobs.close() after (its jobs end with it). allowed_hosts: Host names answered besides
    loopback names, addresses and host; cors_origins: origins whose pages may call the API;
    models_dirs: directories POST /v1/models/load and jobs may read besides runs_dir and the
    Hugging Face cache; the rest are serve.py's settings of the same names."""
    from huggingface_hub.constants import HF_HUB_CACHE
    if max_client_requests < 1:
        raise ValueError(f"max_client_requests={max_client_requests}: a client must be able to run "
                         "at least 1 request (--max_client_requests=16 is the default)")
    if host not in LOCAL_HOSTS and not api_key:
        raise ValueError(f"host={host!r} makes the server reachable from other "
                         "machines; set --api_key=SECRET (clients send 'Authorization: "
                         "Bearer SECRET'), or keep --host=127.0.0.1")
    model_roots = [os.path.realpath(d) for d in (runs_dir, *models_dirs, HF_HUB_CACHE) if d.strip()]
    job_runner = jobs.Jobs(runs_dir, data_dir, model_roots, max_jobs)  # before the port is taken
    server = Server((host, port), Handler)
    server.max_connections, server.read_timeout = max_connections, read_timeout
    server.max_client_requests = max_client_requests
    server.engines, server.api_key, server.runs_dir, server.started = engines, api_key, runs_dir, \
        int(time.time())
    server.max_models, server.models_lock = max_models, threading.Lock()
    server.arena = arena.Store(os.path.join(runs_dir, 'arena', 'judgments.jsonl'))
    server.model_roots, server.jobs = model_roots, job_runner
    server.max_tokens_limit, server.n_limit = max_tokens_limit, n_limit
    server.allowed_hosts = {'localhost', host.lower(), *(h.strip().lower() for h in allowed_hosts
                                                         if h.strip())}
    server.cors_origins = {o.strip().rstrip('/') for o in cors_origins if o.strip()}
    return server
