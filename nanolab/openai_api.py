"""
OpenAI's completions and chat completions over the engine: a request's body checked field by field
(an ApiError, a 400 naming the field, for anything wrong), then the answer in OpenAI's shapes,
whole or as server-sent events. server.py routes to completion(); the field checks (number, flag,
is_ids, encode) serve the other endpoints too.

    POST /v1/completions       prompt: text, token ids or a list of either; echo + max_tokens=0 +
                               logprobs scores a text (its first token null)
    POST /v1/chat/completions  messages (OpenAI's content parts too); logprobs: true,
                               top_logprobs: k; tools, tool_choice, parallel_tool_calls
                               (tool_calls.py)
Both take OpenAI's sampling fields, response_format (a JSON schema's constrained decoding) and
logit_bias, and ours: top_k, min_p, repetition_penalty, num_beams, length_penalty, beam_tree,
grammar (a Lark grammar, llguidance's), and a prompt template ('template', 'variables', 'cot'). A
seeded request gives generate's text, for any n.
"""
import difflib
import json
import time
import uuid
from dataclasses import dataclass
from itertools import accumulate

# the template library (`prompts` is a request's token lists)
from nanolab import prompts as library
from nanolab import tool_calls
from nanolab.decoding import Settings, SettingsError
from nanolab.engine import Engine, LimitError
from nanolab.events import BeamStep, PromptScores, beam_tree
from nanolab.httpd import ApiError

MAX_STOPS = 4               # stop strings per request, as OpenAI
MAX_TOP_LOGPROBS = 20       # alternatives per token, as OpenAI's chat API
MAX_LOGIT_BIAS = 300        # tokens a logit_bias may name, as OpenAI
PARAMS = {'max_new_tokens': 'max_tokens', 'num_samples': 'n', 'stop_strings': 'stop',
          'prompt_logprobs': 'echo', 'json_schema': 'response_format',
          'grammar_prefix': 'messages'}

# -----------------------------------------------------------------------------
# 0) a body's fields

def number(body, name, default, lo, hi, integer=False):
    """body[name] as a number in [lo, hi]; absent or JSON null = default."""
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
        raise ApiError(400,
                       f"'{name}' must be {'an integer' if integer else 'a number'}, got "
                       f"{json.dumps(v)[:60]}",
                       name, 'invalid_type')
    if not lo <= v <= hi:  # also catches NaN, which Python's json accepts
        raise ApiError(400, f"'{name}'={v} is out of range: it must be between {lo} and {hi}",
                       name, 'invalid_value')
    return v

def flag(body, name):
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise ApiError(400, f"'{name}' must be true or false, got {json.dumps(v)[:60]}", name,
                       'invalid_type')
    return bool(v)

def is_ids(x):
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

def encode(w, text, param):
    """text through engine w's tokenizer, its length bounded before the tokenizer starts."""
    cap = 8 * (w.max_prompt_tokens or 32768)  # (32768: serve.py's default max_prompt_tokens)
    if len(text) > cap:
        raise ApiError(400,
                       f"'{param}' holds {len(text)} characters, over {cap} (8 per token of "
                       "max_prompt_tokens); send a shorter text",
                       param, 'request_too_large')
    try:
        return w.tok.encode(text)
    except ValueError as e:  # e.g. a character the char vocabulary lacks
        raise ApiError(400, f"'{param}': {e}", param, 'invalid_value') from None

# -----------------------------------------------------------------------------
# 1) the request: its fields checked against the model

COMMON_FIELDS = {'model', 'max_tokens', 'temperature', 'top_p', 'n', 'stop', 'seed',
                 'presence_penalty', 'frequency_penalty', 'stream', 'stream_options', 'user',
                 'top_k', 'min_p', 'repetition_penalty', 'num_beams', 'length_penalty',
                 'beam_tree', 'template', 'variables', 'cot', 'response_format', 'logit_bias',
                 'grammar'}
COMPLETION_FIELDS = COMMON_FIELDS | {'prompt', 'logprobs', 'echo'}
CHAT_FIELDS = COMMON_FIELDS | {'messages', 'logprobs', 'top_logprobs', 'max_completion_tokens',
                               'continue_final_message', 'tools', 'tool_choice',
                               'parallel_tool_calls'}

@dataclass
class Call:
    """One completions or chat request, read and checked: what to decode, and how the answer
    looks."""
    engine: Engine
    name: str                # the model's name
    chat: bool
    prompts: list            # token id lists
    settings: Settings
    logprobs: int | None     # None: no logprobs in the answer; k: with k alternatives per token
    echo: bool               # completions: the prompt comes first (with logprobs if asked)
    stream: bool
    include_usage: bool
    beam_tree: bool = False  # each choice also carries its beam search's tree (events.beam_tree)
    tools: tool_calls.Tools | None = None  # chat: the request's tools


def response_format(body):
    """OpenAI's response_format -> the JSON schema the answer follows (its text), or None:
    {"type": "text"} none, {"type": "json_object"} any object, {"type": "json_schema",
    "json_schema": {"name": ..., "schema": {...}, "strict": ...}} that schema (every schema is
    followed strictly: the grammar allows nothing else)."""
    rf = body.get('response_format')
    if rf is None or isinstance(rf, dict) and rf.get('type') == 'text':
        return None
    js = rf.get('json_schema') if isinstance(rf, dict) else None
    if isinstance(rf, dict) and rf.get('type') == 'json_object':
        return '{"type": "object"}'
    if not (isinstance(rf, dict) and rf.get('type') == 'json_schema' and isinstance(js, dict)
            and isinstance(js.get('schema', {}), dict)):
        raise ApiError(400, "'response_format' must be {\"type\": \"text\"}, {\"type\": "
                            "\"json_object\"} or {\"type\": \"json_schema\", \"json_schema\": "
                            "{\"name\": ..., \"schema\": {...}}}", 'response_format')
    return json.dumps(js.get('schema') or {'type': 'object'})

def logit_bias(body, V):
    """OpenAI's logit_bias {"token id": bias in [-100, 100]} -> ((id, bias), ...)."""
    lb = body.get('logit_bias')
    if lb is None:
        return ()
    try:
        assert isinstance(lb, dict) and len(lb) <= MAX_LOGIT_BIAS
        pairs = tuple((int(k), v) for k, v in lb.items())
        assert all(0 <= t < V and isinstance(v, (int, float)) and not isinstance(v, bool)
                   and -100 <= v <= 100 for t, v in pairs)
    except (AssertionError, ValueError):
        raise ApiError(400, "'logit_bias' must map up to {} token ids (strings of ids in [0, {}))"
                            " to biases in [-100, 100]".format(MAX_LOGIT_BIAS, V),
                       'logit_bias') from None
    return pairs

def read_request(name, w, body, chat, max_tokens_limit=4096, n_limit=16):
    """A completions or chat body, checked against the model -> Call. Every problem is an
    ApiError(400) that names the field: the JSON types and the API's own caps here
    (max_tokens_limit: the largest max_tokens; n_limit: the largest n and num_beams), the decoding
    settings' ranges in Settings.check."""
    fields = CHAT_FIELDS if chat else COMPLETION_FIELDS
    for k in body:
        if k not in fields:
            close = difflib.get_close_matches(k, fields, n=2)
            raise ApiError(400, f"unknown field '{k}'" +
                           (f"; did you mean {' or '.join(close)}?" if close else ''),
                           k, 'unknown_parameter')
    tok, stop_tokens, stop_strings = w.tok, [w.tok.eot] if w.tok.eot is not None else [], []
    tools = None
    # 1) the prompts: a template of prompts.py ('template', 'variables', 'cot') fills the prompt or
    #    the messages
    if 'template' in body:
        name_, values = body.get('template'), body.get('variables', {})
        if not isinstance(name_, str) or not isinstance(values, dict):
            raise ApiError(400,
                           "'template' must be a template's name (GET /v1/templates) "
                           "and 'variables' an object",
                           'template')
        try:
            filled = library.fill(name_, values, flag(body, 'cot'))
        except (KeyError, ValueError) as e:
            raise ApiError(400, f"'template': {e.args[0]}", 'template') from None
        if chat:
            body['messages'] = filled if isinstance(filled, list) else \
                [{'role': 'user', 'content': filled}]
        elif isinstance(filled, list):
            raise ApiError(400, f"'template': '{name_}' is a chat template; send "
                                "it to /v1/chat/completions", 'template')
        else:
            body['prompt'] = filled
    if chat:
        messages = body.get('messages')
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list of "
                                "{\"role\", \"content\"} objects", 'messages')
        for m in messages:  # OpenAI's content parts [{"type": "text", "text": ...}] -> one string
            if isinstance(m, dict) and isinstance(m.get('content'), list):
                if not all(isinstance(p, dict) and p.get('type') == 'text'
                           and isinstance(p.get('text'), str) for p in m['content']):
                    raise ApiError(400,
                                   "'messages': a content part must be {\"type\": "
                                   "\"text\", \"text\": string}",
                                   'messages', 'invalid_type')
                m['content'] = ''.join(p['text'] for p in m['content'])
            # OpenAI's newer name for system instructions: a system message to every template
            if isinstance(m, dict) and m.get('role') == 'developer':
                m['role'] = 'system'
        tools = tool_calls.read(body)
        messages, listed = tool_calls.messages_for(tok, messages, tools)
        try:
            # the last (assistant) message goes on: no new turn
            cont = flag(body, 'continue_final_message')
            prompts = [tok.render_chat(messages, add_generation_prompt=not cont,
                                       continue_final_message=cont, tools=listed)[0]]
        except ValueError as e:
            raise ApiError(400, f"'messages': {e}", 'messages') from None
        stop_tokens, stop_strings = tok.chat_stop_tokens, list(tok.stop_strings)
    else:
        p = body.get('prompt')
        if isinstance(p, str) or (is_ids(p) and p):
            p = [p]
        if not isinstance(p, list) or not p or not all(isinstance(x, str) or is_ids(x) for x in p):
            raise ApiError(400, "'prompt' must be a string, a list of token ids, "
                                "or a non-empty list of either", 'prompt')
        prompts = [encode(w, x, 'prompt') if isinstance(x, str) else x for x in p]
        # '' = from end-of-text
        prompts = [x or ([tok.eot] if tok.eot is not None else []) for x in prompts]
        if any(not x for x in prompts):
            raise ApiError(400, "empty prompt; give at least one token", 'prompt')
        if any(not 0 <= t < w.V for x in prompts for t in x):
            raise ApiError(400, f"prompt token ids must be in [0, {w.V})", 'prompt',
                           'invalid_value')
    # 2) the sampling settings
    longest = max(map(len, prompts))
    default_max = min(max_tokens_limit, w.block_size - longest) if chat else \
        min(16, w.block_size - longest)
    max_tokens = number(body, 'max_completion_tokens', None, 0, max_tokens_limit,
                        integer=True) if chat else None
    max_tokens = number(body, 'max_tokens', max_tokens, 0, max_tokens_limit, integer=True)
    max_tokens = max(0, default_max) if max_tokens is None else max_tokens
    if longest + max_tokens > w.block_size:
        what = 'messages' if chat else 'prompt'  # OpenAI's message, which clients parse
        raise ApiError(400,
                       f"This model's maximum context length is {w.block_size} tokens. "
                       f"However, you requested {longest + max_tokens} tokens ({longest} in "
                       f"the {what}, {max_tokens} in the completion). Please reduce the "
                       f"length of the {what} or max_tokens.",
                       what, 'context_length_exceeded')
    stop = body.get('stop')
    stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOPS \
            or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a non-empty string or a list of "
                            f"up to {MAX_STOPS} of them", 'stop')
    if chat:
        k = number(body, 'top_logprobs', None, 0, MAX_TOP_LOGPROBS, integer=True)
        if k is not None and not flag(body, 'logprobs'):
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", 'top_logprobs')
        logprobs = (k or 0) if flag(body, 'logprobs') else None
    else:
        logprobs = number(body, 'logprobs', None, 0, MAX_TOP_LOGPROBS, integer=True)
    opts = body.get('stream_options')
    if opts is not None and not (isinstance(opts, dict) and set(opts) <= {'include_usage'}):
        raise ApiError(400, "'stream_options' must be an object like {\"include_usage\": true}",
                       'stream_options')
    echo, inf = not chat and flag(body, 'echo'), float('inf')
    lark = body.get('grammar')
    if tools is not None and tools.grammar is not None and \
            (response_format(body) is not None or lark is not None):
        raise ApiError(400, "'tools' with 'response_format' or 'grammar': the reply is a tool call "
                            "or a text; send one of them (or tool_choice \"none\")", 'tools')
    if lark is not None and not isinstance(lark, str):
        raise ApiError(400, "'grammar' must be a Lark grammar's text, like 'start: \"yes\" | "
                            "\"no\"'", 'grammar', 'invalid_type')
    settings = Settings(
        max_new_tokens=max_tokens, temperature=number(body, 'temperature', 1.0, -inf, 2.0),
        top_k=number(body, 'top_k', 0, 0, w.V, integer=True),
        top_p=number(body, 'top_p', 1.0, -inf, inf),
        min_p=number(body, 'min_p', 0.0, -inf, inf),
        repetition_penalty=number(body, 'repetition_penalty', 1.0, 0.01, 10.0),
        presence_penalty=number(body, 'presence_penalty', 0.0, -inf, inf),
        frequency_penalty=number(body, 'frequency_penalty', 0.0, -inf, inf),
        num_beams=number(body, 'num_beams', 1, 1, n_limit, integer=True),
        length_penalty=number(body, 'length_penalty', 1.0, -10.0, 10.0),
        num_samples=number(body, 'n', 1, -inf, n_limit, integer=True),
        stop_tokens=tuple(stop_tokens),
        stop_strings=tuple(stop_strings + stop),
        seed=number(body, 'seed', None, 0, 2**62, integer=True),
        # a tiny vocabulary: all of it
        logprobs=min(logprobs or 0, w.V), prompt_logprobs=echo and logprobs is not None,
        json_schema=response_format(body), logit_bias=logit_bias(body, w.V),
        # a continued reply under a grammar: the grammar takes its text first
        grammar_prefix=tuple(encode(w, body['messages'][-1]['content'], 'messages'))
        if chat and flag(body, 'continue_final_message') else (),
        grammar=tools.grammar if tools is not None and tools.grammar is not None else lark)
    tree = flag(body, 'beam_tree')
    if tree and settings.num_beams < 2:
        raise ApiError(400, "'beam_tree' shows a beam search: set 'num_beams' to 2 or more",
                       'beam_tree')
    return Call(w, name, chat, prompts, settings, logprobs, echo, flag(body, 'stream'),
                bool((opts or {}).get('include_usage')), tree, tools)

# -----------------------------------------------------------------------------
# 2) the answer, whole or streamed, in OpenAI's shapes

def _legacy_logprobs(w, tokens, lps, tops, start=0):
    """OpenAI's completions logprobs: parallel lists; top_logprobs {token text: logprob}; offsets
    into the text, the first at `start` (a stream's chunk: the length of the choice's pieces sent
    before it)."""
    pieces = [w.tok.decode([t]) for t in tokens]
    return {'tokens': pieces, 'token_logprobs': lps,
            'top_logprobs': [None if top is None else {w.tok.decode([i]): lp for i, lp in top}
                             for top in tops],
            'text_offset': list(accumulate(map(len, pieces[:-1]), initial=start))
            if pieces else []}

def _chat_logprobs(w, tokens, lps, tops, grammar):
    """OpenAI's chat logprobs: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob,
    bytes}]}]}; under a grammar (grammar: per token, its Event's allowed, top_allowed and
    allowed_top) each token also says how many tokens the grammar allowed ("allowed_tokens"), each
    alternative whether it was one of them ("allowed"), and the likeliest it allowed
    ("allowed_top_logprobs"): the page's generation path draws them."""
    def entry(t, lp, ok=None):
        return {'token': w.tok.decode([t]), 'logprob': lp, 'bytes': list(w.tok.decode_bytes([t])),
                **({} if ok is None else {'allowed': ok})}
    return {'content': [{**entry(t, lp), 'top_logprobs': [
        entry(i, v, None if oks is None else oks[j]) for j, (i, v) in enumerate(top or [])],
        **({} if n is None else {'allowed_tokens': n}),
        **({} if best is None else {'allowed_top_logprobs': [entry(i, v) for i, v in best]})}
        for t, lp, top, (n, oks, best) in zip(tokens, lps, tops, grammar)]}

def completion(h, body, chat):
    """POST /v1/completions (chat False) or /v1/chat/completions: decode on the model's engine and
    answer, whole or as server-sent events; the request's rows are freed however it ends."""
    name, w = h.engine(body)
    call = read_request(name, w, body, chat, h.server.max_tokens_limit, h.server.n_limit)
    try:
        req = w.submit(call.prompts, call.settings, client=h.client)  # its client's turn
    except SettingsError as e:
        param = 'tools' if e.field == 'grammar' and call.tools is not None else \
            PARAMS.get(e.field, e.field)
        raise ApiError(400, f"'{param}': {e}", param, 'invalid_value') from None
    except LimitError as e:  # serve.py gives beam searches half of max_batch
        flag = 'max_batch, of which beam searches get half' if e.limit == 'max_beam_slots' else \
            e.limit
        raise ApiError(400, f"{e} (serve.py --{flag})", None, 'request_too_large') from None
    try:
        (_stream if call.stream else _reply)(h, call, h.events(req, call.beam_tree))
    finally:
        # whatever happened (done, error, client gone), the engine drops what is left within a step
        req.cancel()

def _head(call):
    """The fields every response and chunk starts with, and a fresh usage count."""
    rid = ('chatcmpl-' if call.chat else 'cmpl-') + uuid.uuid4().hex[:24]
    head = {'id': rid, 'object': 'chat.completion' if call.chat else 'text_completion',
            'created': int(time.time()), 'model': call.name}
    return head, {'prompt_tokens': sum(map(len, call.prompts)), 'completion_tokens': 0}

def _tokens(events, scores, steps):
    """A request's Events (its tokens), filing its PromptScores in scores (by prompt) and its
    BeamSteps in steps (a list per prompt) as they pass."""
    for ev in events:
        if isinstance(ev, PromptScores):
            scores[ev.prompt_index] = ev
        elif isinstance(ev, BeamStep):
            steps.setdefault(ev.prompt_index, []).append(ev)
        else:
            yield ev

def _reply(h, call, events):
    w, n = call.engine, call.settings.num_samples
    acc = [dict(tokens=[], lps=[], tops=[], grammar=[], text='', finish=None)
           for _ in range(len(call.prompts) * n)]
    scores, steps, (head, usage) = {}, {}, _head(call)
    for ev in _tokens(events, scores, steps):
        a = acc[ev.prompt_index * n + ev.sample_index]
        if ev.token is not None:
            a['tokens'].append(ev.token)
            a['lps'].append(ev.logprob)
            a['tops'].append(ev.top_logprobs)
            a['grammar'].append((ev.allowed, ev.top_allowed, ev.allowed_top))
            usage['completion_tokens'] += 1
        a['text'] += ev.text_delta
        a['finish'] = ev.finish_reason or a['finish']
    choices = []
    for i, a in enumerate(acc):
        if call.chat:
            lp = _chat_logprobs(w, a['tokens'], a['lps'], a['tops'], a['grammar']) \
                if call.logprobs is not None else None
            message, finish = {'role': 'assistant', 'content': a['text']}, a['finish']
            if call.tools is not None and call.tools.is_call(a['text']):  # a finished call: 'stop'
                message = {'role': 'assistant', 'content': None,
                           'tool_calls': tool_calls.tool_calls(a['text'])}
                finish = 'tool_calls' if finish == 'stop' else finish
            choices.append({'index': i, 'message': message, 'logprobs': lp,
                            'finish_reason': finish})
        else:
            prompt, lp, text = call.prompts[i // n], None, a['text']
            if call.echo:
                text = w.tok.decode(prompt) + text
            if call.settings.prompt_logprobs:
                s = scores[i // n]
                lp = _legacy_logprobs(w, prompt + a['tokens'], s.token_logprobs + a['lps'],
                                      s.top_logprobs + a['tops'])
            elif call.logprobs is not None:
                lp = _legacy_logprobs(w, a['tokens'], a['lps'], a['tops'])
            choices.append({'index': i, 'text': text, 'logprobs': lp,
                            'finish_reason': a['finish']})
        if call.beam_tree:
            choices[-1]['beam_tree'] = beam_tree(steps.get(i // n, []), w.tok, a['tokens'])
    usage['total_tokens'] = usage['prompt_tokens'] + usage['completion_tokens']
    h.send_json(200, {**head, 'choices': choices, 'usage': usage})

def _stream(h, call, events):
    """Server-sent events in OpenAI's chunk format, one chunk per token (and per finish), then
    data: [DONE]."""
    w, n = call.engine, call.settings.num_samples
    head, usage = _head(call)
    head['object'] = 'chat.completion.chunk' if call.chat else 'text_completion'

    # OpenAI: with include_usage every chunk carries "usage": null, the last one the count
    nulls = {'usage': None} if call.include_usage else {}

    def chunk(i, **choice):
        h.sse({**head, 'choices': [{'index': i, 'logprobs': None, 'finish_reason': None,
                                    **choice}], **nulls})
    h.start_sse()
    started, scores, steps, done, offset, calls = set(), {}, {}, {}, {}, {}
    for ev in _tokens(events, scores, steps):
        i = ev.prompt_index * n + ev.sample_index
        tok = [ev.token] if ev.token is not None else []
        extra = {}
        # the finishing chunk of each choice carries its tree (a beam search's tokens come at its
        # end)
        if call.beam_tree:
            done.setdefault(i, []).extend(tok)
            if ev.finish_reason:
                extra = {'beam_tree': beam_tree(steps.get(ev.prompt_index, []), w.tok, done[i])}
        usage['completion_tokens'] += len(tok)
        if call.chat:
            lp = _chat_logprobs(w, tok, [ev.logprob], [ev.top_logprobs],
                                [(ev.allowed, ev.top_allowed, ev.allowed_top)]) \
                if call.logprobs is not None and tok else None
            if i not in started:  # OpenAI opens each choice with its role
                chunk(i, delta={'role': 'assistant', 'content': ''})
            # a reply that begins as a tool call streams as tool_calls deltas (tool_calls.py)
            if ev.text_delta and i not in calls:
                calls[i] = tool_calls.CallStream() \
                    if call.tools is not None and call.tools.is_call(ev.text_delta) else None
            if calls.get(i) is not None:
                deltas = calls[i].push(ev.text_delta)
                if deltas or lp:
                    chunk(i, delta={'tool_calls': deltas} if deltas else {}, logprobs=lp)
            elif ev.text_delta or lp:
                chunk(i, delta={'content': ev.text_delta}, logprobs=lp)
            if ev.finish_reason:
                reason = 'tool_calls' if calls.get(i) is not None and ev.finish_reason == 'stop' \
                    else ev.finish_reason
                chunk(i, delta={}, finish_reason=reason, **extra)
        else:
            if call.echo and i not in started:  # the prompt comes first, as its own chunk
                prompt, s = call.prompts[ev.prompt_index], scores.get(ev.prompt_index)
                lp = _legacy_logprobs(w, prompt, s.token_logprobs, s.top_logprobs) if s else None
                chunk(i, text=w.tok.decode(prompt), logprobs=lp)
                if lp:
                    offset[i] = lp['text_offset'][-1] + len(lp['tokens'][-1])
            lp = _legacy_logprobs(w, tok, [ev.logprob] * len(tok), [ev.top_logprobs] * len(tok),
                                  offset.get(i, 0)) if call.logprobs is not None else None
            if lp and tok:  # offsets count from the start of the choice's text, as unstreamed
                offset[i] = lp['text_offset'][-1] + len(lp['tokens'][-1])
            if ev.text_delta or ev.finish_reason or tok and lp:
                chunk(i, text=ev.text_delta, logprobs=lp, finish_reason=ev.finish_reason, **extra)
        started.add(i)
    if call.include_usage:  # OpenAI: a last chunk with no choices carries the usage
        usage['total_tokens'] = usage['prompt_tokens'] + usage['completion_tokens']
        h.sse({**head, 'choices': [], 'usage': usage})
    h.sse('[DONE]')
    h.end_sse()
