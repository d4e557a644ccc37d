"""
A model's own Jinja chat template (Llama 3, Qwen, Mistral, SmolLM2 ...), rendered and tokenized exactly as
transformers' tokenizer.apply_chat_template(messages, sanitize_control_tokens=True) does (transformers'
utils/chat_template_utils.py: the same sandbox, settings, globals, tojson, continue_final_message).

    t = ChatTemplate.from_files(files, name, encode_raw, encode_special, added)  # None: the dir has no template
    ids, mask = t.render_chat(messages, add_generation_prompt=True, stops={...})

Which template: chat_template.jinja (transformers 5 writes it) wins over tokenizer_config.json's "chat_template"
(a string, or a list of {name, template} whose "default" is used), as transformers loads them.

Typed text stays text: the control tokens (special tokens, and added tokens the template spells) in the messages
are wrapped in private-use markers before rendering, so the encoder tells them from the template's own tokens
(a user's "<|im_end|>" is never the end-of-turn id).

The loss mask, by rendering prefixes: assistant message i owns what render(messages[:i+1]) adds after
render(messages[:i], add_generation_prompt=True) -- its content and end of turn -- cut after its last stop token
(ChatML's "\n" after <|im_end|> is the template's, not the model's). subtle: templates that rewrite earlier turns
(Qwen3 drops the <think> block of answers before the last user message) are not prefix-stable; there a turn is
found in the full rendering by its longest tail (answer + end, without the dropped part), after its prompt; a turn
not found keeps mask 0, and a chat that opens with the assistant counts what render([]) lacks.
Cost: two renders per assistant turn, so quadratic in turns (40 turns: ~0.2 s; one render: ~4 ms).

Hostile templates: Jinja has no step limit, so every loop iteration, call and filter checks a deadline
(TIME_LIMIT_S), and the strings `*`, `**`, `+`, `~`, join, replace and widths would build, and the streamed output,
are bounded (MAX_CHARS + 4x the messages' size). Whatever a template raises becomes a ValueError.
subtle: not bounded: huge widths inside format specs ('{:>999999999}'.format) and other C-level builtins.
"""
import json
import math
import re
import threading
import time
from datetime import datetime
from functools import wraps

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

MAX_CHARS = 1_000_000   # rendered output (plus 4x the messages' own characters)
TIME_LIMIT_S = 2.0      # per render; real templates take milliseconds
START, END = '\U000f0000', '\U000f0001'  # transformers' private-use markers around control tokens in user text
SPECIAL_NAMES = ('bos_token', 'eos_token', 'unk_token', 'sep_token', 'pad_token', 'cls_token', 'mask_token')
REASONING_FIELDS = ('reasoning_content', 'thinking', 'reasoning')
WIDTH_FUNCS = ('center', 'ljust', 'rjust', 'zfill', 'expandtabs', 'indent', 'wordwrap', 'truncate')
TAG = 'CONTINUE_FINAL_MESSAGE_TAG '  # transformers' marker for where the continued message ends
_limits = threading.local()  # this thread's render: deadline and size bound
_ENV = None  # built on first use


class BoundError(ValueError):
    """A template ran past TIME_LIMIT_S or built too much: hostile or broken, never a fit/unfit probe."""


def _check(size=0):
    if time.monotonic() > _limits.deadline:
        raise BoundError(f'the chat template ran past {TIME_LIMIT_S} s (a loop bomb?)')
    if size > _limits.max_chars:
        raise BoundError(f'the chat template built a value of {int(size)} chars, over the bound {_limits.max_chars}')


def _size(x):
    return len(x) if isinstance(x, (str, list, tuple, dict)) else 0


def _guard(iterable):  # every {% for %} iterates through this: one deadline check per item
    for item in iterable:
        _check()
        yield item


def _concat(*parts):  # the `~` operator, bounded
    parts = [str(p) for p in parts]
    _check(sum(map(len, parts)))
    return ''.join(parts)


def _width(name, args, kwargs):
    """Size checks before a builtin allocates: widths, join, replace."""
    if name in WIDTH_FUNCS:
        _check(max([abs(a) for a in (*args, *kwargs.values()) if type(a) is int] or [0]))
    seq = next((a for a in args if isinstance(a, (list, tuple))), None)
    if name == 'join' and seq is not None:
        _check(sum(len(str(x)) for x in seq))
    if name == 'replace' and len(args) >= 3 and isinstance(args[0], str):
        _check(len(args[0]) + (args[0].count(str(args[1])) + 1) * len(str(args[2])))


def _bounded_filter(f, name):
    @wraps(f)  # keeps jinja's pass_context/pass_eval_context marks
    def run(*args, **kwargs):
        _width(name, [a for a in args if not isinstance(a, (nodes.EvalContext, jinja2.runtime.Context))], kwargs)
        out = f(*args, **kwargs)
        _check(_size(out))
        return out
    return run


class _Bounded(NodeTransformer):
    # subtle: an ImportedName compiles to a module-level import, so a template cannot shadow or skip the guards
    def visit_For(self, node):
        node = self.generic_visit(node)
        node.iter = nodes.Call(nodes.ImportedName(f'{__name__}._guard'), [node.iter], [], None, None)
        return node

    def visit_Concat(self, node):
        return nodes.Call(nodes.ImportedName(f'{__name__}._concat'), self.generic_visit(node).nodes, [], None, None)


class _Env(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(['*', '**', '+'])

    def _parse(self, source, name, filename):
        return _Bounded().visit(super()._parse(source, name, filename))

    def call_binop(self, context, operator, left, right):
        if operator == '*':
            n, seq = (left, right) if isinstance(left, int) else (right, left)
            _check(_size(seq) * n if isinstance(n, int) else 0)
        elif operator == '+':
            _check(_size(left) + _size(right))
        elif operator == '**' and isinstance(left, int) and isinstance(right, int):
            _check(right * math.log2(abs(left) + 1) / 8)  # the result's bytes
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
        _width(getattr(__obj, '__name__', ''), [getattr(__obj, '__self__', None), *args], kwargs)
        out = super().call(__context, __obj, *args, **kwargs)
        _check(_size(out))
        return out


class _Generation(Extension):
    """transformers' {% generation %}...{% endgeneration %} (assistant-mask markers): renders its body."""
    tags = {'generation'}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(('name:endgeneration',), drop_needle=True)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: no HTML escaping (Jinja's escapes <, >, &, ')
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _no_dunder(name):
    if isinstance(name, str) and name.startswith('_'):
        raise jinja2.exceptions.SecurityError(f'chat templates cannot set the namespace attribute {name!r}')


class _Namespace(jinja2.utils.Namespace):
    """transformers' namespace: no underscore attributes (CPython internals)."""
    def __init__(*args, **kwargs):  # jinja's signature trick: namespace(self=...) works
        attrs = dict(*args[1:], **kwargs)
        any(map(_no_dunder, attrs))
        jinja2.utils.Namespace.__init__(args[0], attrs)

    def __setitem__(self, name, value):
        _no_dunder(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


class _Dict:
    """transformers' `dict` global: dict() and dict.fromkeys only, no attribute escapes."""
    __call__, fromkeys = staticmethod(dict), staticmethod(dict.fromkeys)


def _environment():
    env = _Env(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])  # transformers' settings
    env.filters = {k: _bounded_filter(f, k) for k, f in {**env.filters, 'tojson': _tojson}.items()}
    env.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=_Dict(), namespace=_Namespace)
    return env


def _mark(obj, control_re):
    """transformers' mark_control_tokens: wrap the control tokens in user strings in the markers."""
    if isinstance(obj, str):
        return control_re.sub(f'{START}\\g<0>{END}', obj.replace(START, '').replace(END, ''))
    if isinstance(obj, dict):
        return {k: _mark(v, control_re) for k, v in obj.items()}
    return [_mark(v, control_re) for v in obj] if isinstance(obj, (list, tuple)) else obj


class ChatTemplate:
    """A compiled template and what rendering needs: the special-token globals, the control tokens (added: text ->
    (id, special)), and two encoders: encode_raw ignores added tokens, encode_special finds them."""

    def __init__(self, source, name, encode_raw, encode_special, added, specials):
        global _ENV
        _ENV = _ENV or _environment()
        self.source, self.name, self.encode_raw, self.encode_special = source, name, encode_raw, encode_special
        self.added, self.specials = added, specials  # specials: bos_token, eos_token ... -> text (template globals)
        try:
            self.template, ast = _ENV.from_string(source), _ENV.parse(source)
        except jinja2.TemplateError as e:
            raise self._error(e) from None
        # control tokens, as transformers' _get_control_tokens: special, or spelled in the template's literals
        literal = '\0'.join({n.data for n in ast.find_all(nodes.TemplateData)}
                            | {n.value for n in ast.find_all(nodes.Const) if isinstance(n.value, str)})
        control = [t for t, (_, special) in added.items() if special or (t in literal and not t.isspace())]
        alt = '|'.join(map(re.escape, sorted(control, key=len, reverse=True))) or '(?!)'  # longest first
        self.control_re, self.markers_re = re.compile(alt), re.compile(f'{START}({alt}){END}|[{START}{END}]')

    @classmethod
    def for_hf(cls, tok):
        """A tokenizer.HFTokenizer's template (None if its directory has none), with the two encoders it needs:
        text with no added tokens at all (the messages' content) and text with them (the template's own)."""
        if tok.bpe:
            raw, special = tok.bpe.encode, lambda t: tok.bpe.to_tiktoken().encode(t, allowed_special='all')
        else:  # subtle: a second instance, as tok.tk's encode_special_tokens must stay on (threads share it)
            from tokenizers import Tokenizer as HFTok
            tk = HFTok.from_str(tok.files['tokenizer.json'])
            special = lambda t: tk.encode(t, add_special_tokens=False).ids  # noqa: E731

            def raw(text):  # no added tokens at all, special or not: transformers' _encode_without_added_tokens
                text = tk.normalizer.normalize_str(text) if tk.normalizer else text
                splits = [s for s, _ in tk.pre_tokenizer.pre_tokenize_str(text)] if tk.pre_tokenizer else [text]
                return [t.id for s in splits for t in tk.model.tokenize(s)]
        return cls.from_files(tok.files, tok.name, raw, special, tok.added)

    @classmethod
    def from_files(cls, files, name, encode_raw, encode_special, added):
        """The directory's template (None if it has none) from its files (text by file name)."""
        config = json.loads(files.get('tokenizer_config.json') or '{}')
        source = files.get('chat_template.jinja') or config.get('chat_template')
        if isinstance(source, list):  # [{name, template}, ...]: transformers uses "default"
            named = {t.get('name'): t.get('template') for t in source if isinstance(t, dict)}
            if 'default' not in named:
                raise ValueError(f'{name}: tokenizer_config.json has chat templates {sorted(map(str, named))} but '
                                 'none named "default"; name one "default" or save it as chat_template.jinja')
            source = named['default']
        if source and not isinstance(source, str):
            raise ValueError(f'{name}: chat_template must be a string, got {type(source).__name__}; fix '
                             'tokenizer_config.json or write the template to chat_template.jinja')
        specials = {**json.loads(files.get('special_tokens_map.json') or '{}'), **config}
        specials = {k: v.get('content') if isinstance(v, dict) else v for k, v in specials.items()}  # AddedToken dicts
        specials = {k: specials[k] for k in SPECIAL_NAMES if specials.get(k) is not None}
        return cls(source, name, encode_raw, encode_special, added, specials) if source else None

    def _error(self, e):
        return (BoundError if isinstance(e, BoundError) else ValueError)(
            f'the chat template of {self.name} failed ({type(e).__name__}: {e}); fix the template (chat_template.jinja '
            """or tokenizer_config.json "chat_template") or delete it to use nanolab's own chat format""")

    def render(self, messages, add_generation_prompt=False, continue_final_message=False, tools=None):
        """messages -> the rendered text, control tokens in user text marked, as transformers renders it; tools:
        OpenAI's tool list, for a template that has a place for it (tool_calls.py)."""
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
            raise ValueError('messages must be a list of {"role", "content"} dicts')
        if continue_final_message and (add_generation_prompt or not messages):
            raise ValueError('continue_final_message continues the last message: it needs one, and no generation '
                             'prompt')
        chat = []
        for m in messages:  # transformers drops None values and aliases the reasoning fields
            m = {k: v for k, v in m.items() if v is not None}
            reasoning = next((m[k] for k in REASONING_FIELDS if m.get(k) is not None), None)
            chat.append({'thinking': reasoning, **m, 'reasoning_content': reasoning} if reasoning is not None else m)
        chat, final = _mark(chat, self.control_re), None
        if continue_final_message:
            final = chat[-1].get('content')
            if not isinstance(final, str) or 'content' not in self.source:
                raise ValueError('continue_final_message needs a final message whose string content the template '
                                 'renders')
            chat[-1] = {**chat[-1], 'content': final + TAG}
        _limits.deadline = time.monotonic() + TIME_LIMIT_S
        _limits.max_chars = MAX_CHARS + 4 * len(json.dumps(chat, default=str))
        out, size = [], 0
        try:  # streamed, so a template that writes without end stops at the bound
            for chunk in self.template.generate(messages=chat, tools=tools, documents=None,
                                                add_generation_prompt=add_generation_prompt, **self.specials):
                size += len(chunk)
                _check(size)
                out.append(chunk)
        except Exception as e:  # the sandbox's, the template's raise_exception, our bounds, Python's own
            raise self._error(e) from None
        text = ''.join(out)
        if final is not None:  # cut at the tag, as transformers does
            if final.strip() not in text or TAG.strip() not in text:
                raise ValueError(f'the chat template of {self.name} drops part of the final message, so it cannot '
                                 'be continued; send it without continue_final_message')
            at = text.rindex(TAG.strip())
            text = text[:at] if text[at:at + len(TAG)] == TAG else text[:at].rstrip()
        return text

    def encode(self, text):
        """Rendered text -> ids, as transformers' encode_marked_chat: marked tokens (user text) as plain text."""
        pieces = self.markers_re.split(text)  # [text, marked token or None, text, ...]
        ids, newline = self.encode_special(pieces[0]), self.encode_special('\n')
        for i, piece in enumerate(pieces[1:], start=1):
            if not piece:
                continue
            enc = self.encode_raw if i % 2 else self.encode_special
            # subtle: encoded after a newline, then without it, so SentencePiece adds no prefix space mid-chat
            got = enc('\n' + piece)
            got = got[len(newline):] if got[:len(newline)] == newline else enc(piece)
            if i % 2 and self.added.get(piece, (None,))[0] in got:
                raise ValueError(f'{piece!r} typed in a message encodes to its own token even as plain text; '
                                 'remove it from the message')
            ids += got
        return ids

    def ids(self, messages, add_generation_prompt=False, continue_final_message=False, tools=None):
        return self.encode(self.render(messages, add_generation_prompt, continue_final_message, tools))

    def end_tokens(self):
        """The special tokens the template writes after an assistant's content (<|eot_id|>, <|im_end|> ...)."""
        chat = [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'}]
        try:
            p, q = self.render(chat[:1], True), self.render(chat)
        except BoundError:
            raise
        except ValueError:
            return []  # the probe does not fit this template (e.g. it wants a system message): eos only
        tail = q[len(p):] if q.startswith(p) else q
        tail = tail[tail.find('Hello') + len('Hello'):] if 'Hello' in tail else ''
        return [i for i in self.encode_special(tail) if i in {i for i, special in self.added.values() if special}]

    def render_chat(self, messages, add_generation_prompt=False, continue_final_message=False, stops=(), tools=None):
        """(ids, mask): ids as transformers' apply_chat_template(..., sanitize_control_tokens=True); mask 1 on each
        assistant message's tokens through its last stop token (the module docstring has the method, its limits)."""
        full = self.ids(messages, add_generation_prompt, continue_final_message, tools)
        mask, cursor, key = [0] * len(full), 0, ''.join(map(chr, full))  # ids as a str: fast sublist search
        for i, m in enumerate(messages):
            if m.get('role') != 'assistant':
                continue
            is_open = continue_final_message and i == len(messages) - 1
            try:
                p = self.ids(messages[:i], True, tools=tools)
            except ValueError:  # e.g. an empty chat, which some templates refuse
                p = []
            q = self.ids(messages[:i + 1], False, is_open, tools)
            start = next((k for k, (a, b) in enumerate(zip(p, q)) if a != b), min(len(p), len(q)))
            turn = q[start:]
            if not is_open:  # cut after the last stop token: what follows is the template's separator
                turn = turn[:1 + max((k for k, t in enumerate(turn) if t in stops), default=len(turn) - 1)]
            at = start if full[start:start + len(turn)] == turn and start >= cursor else -1  # prefix-stable
            since = max(cursor, len(p) if full[:len(p)] == p else 0)
            for k in range(len(turn) if at < 0 else 0):  # rewritten later: its longest tail, after its prompt
                if (at := key.find(''.join(map(chr, turn[k:])), since)) >= 0:
                    turn = turn[k:]
                    break
            if at >= 0 and turn:
                mask[at:at + len(turn)] = [1] * len(turn)
                cursor = at + len(turn)
        return full, mask
