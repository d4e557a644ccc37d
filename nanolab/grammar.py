"""
Constrained decoding: a row's next token restricted to the tokens a grammar allows, so its text
always parses (a JSON schema's). The grammar library is llguidance (Rust, no Python dependencies):
measured on GPT-2's vocabulary and a nested schema, its vocabulary table takes 0.12 s once per
tokenizer, a schema's grammar 0.8 ms, a token's mask 16 us (median); xgrammar's masks were faster
(2 us) but its grammars slower (7.6 ms) and it pulls triton and a compiler runtime with it. Both are
far below a CPU decode step (5-25 ms).

    grammar = schema_grammar('{"type": "object", ...}')   # checked and bounded, cached -> str
    c = Constraint(vocabulary(tok, V), grammar)             # one per row
    allowed = c.allowed()                                   # (V,) bool: the tokens it may take next
    done = c.advance(token)                                 # True once the text is complete

The JSON is compact (no free whitespace between its tokens), so a small model cannot spend its
tokens on blank space, and every row's text ends where its grammar does: the engine finishes it
there ('stop'). A schema is bounded before any grammar is built (MAX_SCHEMA_BYTES, MAX_DEPTH) and
llguidance's own limits bound the work of each mask; the cache of grammars holds CACHE of them.
"""
import json
import weakref
from collections import OrderedDict

import torch

MAX_SCHEMA_BYTES = 32 << 10  # a schema's JSON text at most
MAX_DEPTH = 16               # nesting of a schema's objects and arrays at most
CACHE = 64                   # grammars kept, the most recently used
_grammars = OrderedDict()
_vocabularies = weakref.WeakKeyDictionary()  # tokenizer -> {V: Vocabulary}


class GrammarError(ValueError):
    """A schema that is not valid JSON, over a bound, or that llguidance refuses: says which."""


def _depth(x, d=0):
    if d > MAX_DEPTH:
        return d
    if isinstance(x, dict):
        return max([_depth(v, d + 1) for v in x.values()], default=d + 1)
    if isinstance(x, list):
        return max([_depth(v, d + 1) for v in x], default=d + 1)
    return d


def schema_grammar(schema):
    """A JSON schema (its JSON text, or the object) -> llguidance's grammar for it, checked and
    cached; GrammarError names what is wrong. {"type": "object"} alone is OpenAI's json_object."""
    import llguidance
    text = schema if isinstance(schema, str) else json.dumps(schema)
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise GrammarError(f"the schema is {len(text.encode())} bytes, over {MAX_SCHEMA_BYTES}")
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise GrammarError(f"the schema is not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise GrammarError("the schema must be a JSON object, like {\"type\": \"object\"}")
    if _depth(obj) > MAX_DEPTH:
        raise GrammarError(f"the schema nests deeper than {MAX_DEPTH} levels")
    key = json.dumps(obj, sort_keys=True)
    if key in _grammars:
        _grammars.move_to_end(key)
        return _grammars[key]
    # compact JSON: no free whitespace, one separator each
    obj = {**obj, 'x-guidance': {'whitespace_flexible': False, 'item_separator': ', ',
                                 'key_separator': ': '}}
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(obj))
    msg = llguidance.LLMatcher.validate_grammar(grammar)  # '' when it is good
    if msg:
        raise GrammarError(f"the schema cannot be followed: {msg[:500]}")
    _grammars[key] = grammar
    while len(_grammars) > CACHE:
        _grammars.popitem(last=False)
    return grammar


class _Wrap:
    """Our tokenizer as llguidance reads one: each id's bytes (ids past the tokenizer's vocabulary,
    the model's padding, are empty and never allowed), its special ids, its end-of-text id."""
    def __init__(self, tok, V):
        n = getattr(tok, 'vocab_size', V)
        self.tokens = [tok.decode_bytes([i]) if i < n else b'' for i in range(V)]
        self.special_token_ids = sorted(set(tok.special_tokens.values()) | set(range(n, V)))
        self.eos_token_id, self.bos_token_id, self.tok = tok.eot, None, tok

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
        self.lltok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrap(tok, V)), n_vocab=V)

    def prototype(self, grammar):
        import llguidance
        if grammar not in self.protos:
            self.protos[grammar] = llguidance.LLMatcher(self.lltok, grammar)
            while len(self.protos) > CACHE:
                self.protos.popitem(last=False)
        self.protos.move_to_end(grammar)
        return self.protos[grammar]


def vocabulary(tok, V):
    """tok's Vocabulary of V ids, one per tokenizer and V."""
    if tok.eot is None:
        raise GrammarError("structured output needs a vocabulary with an end-of-text token, where "
                           "a finished text can end; this one (a char vocabulary) has none")
    per = _vocabularies.setdefault(tok, {})
    if V not in per:
        per[V] = Vocabulary(tok, V)
    return per[V]


class Constraint:
    """One row's grammar state: which tokens it allows next, advanced by each token chosen."""
    def __init__(self, vocab, grammar):
        self.m, self.V = vocab.prototype(grammar).deep_copy(), vocab.V

    def allowed(self):
        """(V,) bool: the tokens the grammar takes next (the end-of-text id once it is complete)."""
        return allowed_rows([self])[0]

    def advance(self, token):
        """Take the chosen token -> whether the grammar has ended (its end-of-text token taken).
        Once its text is complete it allows only that token, so the row ends at the next step."""
        if not self.m.consume_token(token):
            raise GrammarError(f"the grammar refused token {token}: {self.m.get_error()}")
        return self.m.is_stopped()


def allowed_rows(constraints):
    """(R, V) bool: each constraint's next tokens, its mask filled by llguidance and the bits of all
    rows unpacked at once (one row at a time took 76 us a row; 16 rows' fills take 50 us)."""
    import llguidance.torch as llt
    V = constraints[0].V
    # (not llguidance's allocate_token_bitmask: it tries to pin the memory, a failure and a logged
    # warning each call on a CPU-only torch)
    bits = torch.full((len(constraints), (V + 31) // 32), -1, dtype=torch.int32)
    for i, c in enumerate(constraints):
        llt.fill_next_token_bitmask(c.m, bits, i)
    shifts = torch.arange(32, dtype=torch.int32)
    return ((bits[:, :, None] >> shifts) & 1).bool().flatten(1)[:, :V]
