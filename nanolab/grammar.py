"""
Constrained decoding: a row's next token restricted to the tokens a grammar allows, so its text
always parses (a JSON schema's, a tool call's, or any Lark grammar's). The grammar library is
llguidance (Rust, no Python dependencies): measured on GPT-2's vocabulary and a nested schema, its
vocabulary table takes 0.12 s once per tokenizer, a schema's grammar 0.8 ms, a token's mask 16 us
(median); xgrammar's masks were faster (2 us) but its grammars slower (7.6 ms) and it pulls triton
and a compiler runtime with it. Both are far below a CPU decode step (5-25 ms).

    g = schema_grammar('{"type": "object", ...}')        # or lark_grammar(text), tools_grammar(...)
    c = Constraint(vocabulary(tok, V), g, stops=(eot,))  # one per row
    allowed = c.allowed()                                # (V,) bool: the tokens it may take next
    done = c.advance(token)                              # True once the text is complete

The JSON is compact (no free whitespace between its tokens), so a small model cannot spend its
tokens on blank space. A text ends where its grammar does (a JSON value's last brace: the engine
finishes the row there, 'stop'), or, where the grammar would let it go on (free text), at one of
the row's stop tokens, which are allowed whenever the text so far is complete. So a vocabulary
needs no end-of-text token of its own (a char vocabulary's JSON ends at its brace). A grammar is
bounded before it is built (MAX_GRAMMAR_BYTES; a schema's nesting MAX_DEPTH), llguidance's own
limits bound the work of each mask, and the cache holds CACHE grammars.
"""
import json
import weakref
from collections import OrderedDict

import torch

MAX_GRAMMAR_BYTES = 32 << 10  # a schema's (or a tool list's, or a Lark grammar's) text at most
MAX_DEPTH = 16                # nesting of a schema's objects and arrays at most
CACHE = 64                    # grammars kept, the most recently used
# compact JSON: no free whitespace, one separator each (llguidance's option, in any schema)
COMPACT = {'whitespace_flexible': False, 'item_separator': ', ', 'key_separator': ': '}
_grammars = OrderedDict()
_vocabularies = weakref.WeakKeyDictionary()  # tokenizer -> {V: Vocabulary}


class GrammarError(ValueError):
    """A schema or grammar that is not valid, over a bound, or that llguidance refuses: says
    which."""


def _depth(x, d=0):
    if d > MAX_DEPTH:
        return d
    if isinstance(x, dict):
        return max([_depth(v, d + 1) for v in x.values()], default=d + 1)
    if isinstance(x, list):
        return max([_depth(v, d + 1) for v in x], default=d + 1)
    return d


def checked_schema(schema, what='the schema'):
    """A JSON schema (its JSON text, or the object) -> the object, its size and depth bounded."""
    text = schema if isinstance(schema, str) else json.dumps(schema)
    if len(text.encode()) > MAX_GRAMMAR_BYTES:
        raise GrammarError(f"{what} is {len(text.encode())} bytes, over {MAX_GRAMMAR_BYTES}")
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise GrammarError(f"{what} is not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise GrammarError(f"{what} must be a JSON object, like {{\"type\": \"object\"}}")
    if _depth(obj) > MAX_DEPTH:
        raise GrammarError(f"{what} nests deeper than {MAX_DEPTH} levels")
    return obj


def _cached(key, build):
    """The grammar for key, built (and validated) once."""
    import llguidance
    if key in _grammars:
        _grammars.move_to_end(key)
        return _grammars[key]
    try:
        grammar = build()
    except ValueError as e:  # llguidance's parse errors
        raise GrammarError(f"the grammar cannot be built: {str(e)[:500]}") from None
    msg = llguidance.LLMatcher.validate_grammar(grammar)  # '' when it is good
    if msg:
        raise GrammarError(f"the grammar cannot be followed: {msg[:500]}")
    _grammars[key] = grammar
    while len(_grammars) > CACHE:
        _grammars.popitem(last=False)
    return grammar


def schema_grammar(schema):
    """A JSON schema (its JSON text, or the object) -> llguidance's grammar for it, checked and
    cached; GrammarError names what is wrong. {"type": "object"} alone is OpenAI's json_object."""
    import llguidance
    obj = checked_schema(schema)
    return _cached(('json', json.dumps(obj, sort_keys=True)),
                   lambda: llguidance.LLMatcher.grammar_from_json_schema(
                       json.dumps({**obj, 'x-guidance': COMPACT})))


def lark_grammar(text):
    """A grammar in llguidance's Lark dialect (`start: ...`; `%json {schema}` embeds a schema) ->
    its grammar, checked and cached (sample.py --grammar, serve.py's 'grammar' field)."""
    import llguidance
    if not isinstance(text, str) or not text.strip():
        raise GrammarError("the grammar must be a non-empty Lark text, like 'start: \"yes\" | \"no\"'")
    if len(text.encode()) > MAX_GRAMMAR_BYTES:
        raise GrammarError(f"the grammar is {len(text.encode())} bytes, over {MAX_GRAMMAR_BYTES}")
    return _cached(('lark', text), lambda: llguidance.LLMatcher.grammar_from_lark(text))


def tools_grammar(tools, choice='auto', parallel=True):
    """Tool calls (tool_calls.py's format) -> their grammar's Lark text, checked. tools: [(name,
    parameters schema, each bounded by checked_schema)]; choice: 'auto' (a call, or a text that does
    not start with '{'), 'required' (a call), or one tool's name (a call of it); parallel: one call
    or several."""
    named = [(n, p) for n, p in tools if choice in ('auto', 'required') or n == choice]
    calls = [{'type': 'object', 'properties': {'name': {'const': n}, 'arguments': p},
              'required': ['name', 'arguments'], 'additionalProperties': False} for n, p in named]
    schema = {'type': 'object', 'properties': {'tool_calls': {
        'type': 'array', 'items': {'anyOf': calls}, 'minItems': 1,
        **({} if parallel else {'maxItems': 1})}},
        'required': ['tool_calls'], 'additionalProperties': False, 'x-guidance': COMPACT}
    text = json.dumps(schema)
    if len(text.encode()) > MAX_GRAMMAR_BYTES:
        raise GrammarError(f"the tools' schemas take {len(text.encode())} bytes, over "
                           f"{MAX_GRAMMAR_BYTES}; send fewer or smaller tools")
    top = 'start: call | TEXT | ""\nTEXT: /[^{][\\s\\S]*/\n' if choice == 'auto' else 'start: call\n'
    lark = f'{top}call: %json {text}\n'
    lark_grammar(lark)
    return lark


class _Wrap:
    """Our tokenizer as llguidance reads one: each id's bytes (ids past the tokenizer's vocabulary,
    the model's padding, are empty and never allowed), its special ids, and an end-of-text id V
    past the model's vocabulary, which no row ever takes (a row ends at a stop token instead)."""
    def __init__(self, tok, V):
        n = min(getattr(tok, 'vocab_size', V), V)
        self.tokens = [tok.decode_bytes([i]) for i in range(n)] + [b''] * (V + 1 - n)
        self.special_token_ids = sorted(set(tok.special_tokens.values()) | set(range(n, V + 1)))
        self.eos_token_id, self.bos_token_id, self.tok = V, None, tok

    def __call__(self, s):
        return self.tok.encode(s.decode('utf-8', 'replace') if isinstance(s, bytes) else s)


class Vocabulary:
    """llguidance's table of a tokenizer's V ids (0.1-0.2 s for 50k ids, so built once), and the
    start-state matchers of the grammars used with it, which rows copy: building one can take
    100-1000 ms for a large grammar, so Settings.check builds it on the request's thread and the
    engine's thread only copies it. Kept as the grammars are (CACHE)."""
    def __init__(self, tok, V):
        import llguidance
        self.V, self.protos = V, OrderedDict()
        self.lltok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrap(tok, V)),
                                            n_vocab=V + 1)

    def prototype(self, grammar):
        """grammar's matcher at its start; GrammarError if no token of the vocabulary can begin
        its text (JSON from a char vocabulary without '{')."""
        import llguidance
        if grammar not in self.protos:
            m = llguidance.LLMatcher(self.lltok, grammar)
            if m.is_error():
                raise GrammarError(f"the grammar cannot start: {m.get_error()[:500]}")
            self.protos[grammar] = m
            if not allowed_rows([Constraint(self, grammar)])[0].any():
                del self.protos[grammar]
                raise GrammarError("the grammar allows only the empty text" if m.is_accepting() else
                                   "no token of this model's vocabulary can begin the text the "
                                   "grammar wants (JSON needs '{' or '\"', which a char "
                                   "vocabulary may lack)")
            while len(self.protos) > CACHE:
                self.protos.popitem(last=False)
        self.protos.move_to_end(grammar)
        return self.protos[grammar]


def vocabulary(tok, V):
    """tok's Vocabulary of V ids, one per tokenizer and V."""
    per = _vocabularies.setdefault(tok, {})
    if V not in per:
        per[V] = Vocabulary(tok, V)
    return per[V]


class Constraint:
    """One row's grammar state: which tokens it allows next, advanced by each token chosen.
    stops: the row's stop tokens, allowed (and ending the text) whenever the text is complete."""
    def __init__(self, vocab, grammar, stops=(), matcher=None, prefix=()):
        self.vocab, self.grammar, self.mask, self.count = vocab, grammar, None, None
        self.stops = tuple(t for t in stops if 0 <= t < vocab.V)
        self.m = (matcher or vocab.prototype(grammar)).deep_copy()
        self.V = vocab.V
        if prefix and not self.m.consume_tokens(list(prefix)):  # text the reply already has
            raise GrammarError(f"the text so far does not follow the grammar ({self.m.get_error()})")

    def fork(self):
        """A copy that goes on alone (a beam's child)."""
        return Constraint(self.vocab, self.grammar, self.stops, self.m)

    def allowed(self):
        """(V,) bool: the tokens the grammar takes next."""
        return allowed_rows([self])[0]

    def report(self, top, logits, lse):
        """What the last mask allowed, for the row's Event: (how many tokens, whether it allowed
        each of top's (id, logprob) or None, the len(top) likeliest it allowed as (id, raw logprob)
        from the row's raw logits and their logsumexp lse, or None without top)."""
        if top is None:
            return self.count, None, None
        v, i = logits.masked_fill(~self.mask.to(logits.device), float('-inf')) \
            .topk(min(len(top), self.count))
        return self.count, [bool(self.mask[t]) for t, _ in top], \
            list(zip(i.tolist(), (v - lse).tolist()))

    def advance(self, token):
        """Take the chosen token -> whether the text has ended (the grammar's end, or a stop token
        once the text is complete)."""
        if token in self.stops and self.m.is_accepting():
            return True
        if not self.m.consume_token(token):
            raise GrammarError(f"the grammar refused token {token}: {self.m.get_error()}")
        return self.m.is_stopped()


def allowed_rows(constraints):
    """(R, V) bool: each constraint's next tokens, its mask filled by llguidance and the bits of all
    rows unpacked at once (one row at a time took 76 us a row; 16 rows' fills take 50 us)."""
    V = constraints[0].V
    # (not llguidance.torch's helpers: importing that module compiles a kernel with torch.compile,
    # 4-6 s on the first constrained request; its allocator tries to pin memory, and fails, on a
    # CPU-only torch. Its fill is this one call.)
    bits = torch.full((len(constraints), (V + 32) // 32), -1, dtype=torch.int32)
    for i, c in enumerate(constraints):
        c.m.unsafe_compute_mask_ptr(bits[i].data_ptr(), bits.size(1) * 4)
    shifts = torch.arange(32, dtype=torch.int32)
    out = ((bits[:, :, None] >> shifts) & 1).bool().flatten(1)[:, :V]
    for i, c in enumerate(constraints):
        if c.stops and c.m.is_accepting():
            out[i, list(c.stops)] = True
    # what this step allowed, and how many (the page shows them: Event.allowed)
    for c, row, n in zip(constraints, out, out.sum(1).tolist()):
        c.mask, c.count = row, n
    return out
