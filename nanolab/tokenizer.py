"""
Tokenizers: one interface over char-level, tiktoken, our own byte-level BPE and Hugging Face
tokenizer directories, plus the chat template, which is defined once, here.

    tok = get_tokenizer('gpt2')                     # or CharTokenizer(text=corpus),
    tok = BPETokenizer.train(text, vocab_size=4096) # or HFTokenizer('path/to/hf_dir')
    ids = tok.encode('hello'); text = tok.decode(ids)
    tok = from_spec(tok.spec())                     # specs live in checkpoints and meta.json

Every kind has encode, decode, decode_bytes, encode_batch, spec, render_chat and the attributes
kind, vocab_size (special tokens included), eot, special_tokens. encode() reads plain text: a user
who types "<|end|>" gets the tokens of those characters, never the end-of-turn id.

Our BPE (minbpe's RegexTokenizer idea on GPT-2's byte-level scheme):
  1) GPT-2's regex splits text into chunks (words, numbers, punctuation, whitespace), so a merge
     never spans e.g. a word and the punctuation after it
  2) each chunk becomes its UTF-8 bytes, ids 0..255, so any text encodes and there is no <unk>
  3) training repeatedly joins the most frequent adjacent pair into a new id 256, 257, ...;
     encoding replays those merges, earliest-learned first

Chat template
-------------
Tokenizers with the chat special tokens (tiktoken gpt2, our BPE, HF dirs that have them):

    <|system|>{content}<|end|><|user|>{content}<|end|><|assistant|>{content}<|end|>

  - each message is <|role|> + the content's tokens + <|end|>; no newlines or spaces are added
  - the generation prompt is <|assistant|>; generation stops at <|end|> (or <|endoftext|>)
  - GPT-2 ids: <|endoftext|>=50256, <|system|>=50257, <|user|>=50258, <|assistant|>=50259,
    <|end|>=50260 (in the padding that takes GPT-2's 50257 up to 50304); our BPE puts
    <|endoftext|> and then the four chat tokens right after its merges

Char-level (and HF dirs without those tokens) use plain-text markers:

    System: {content}\\n\\nUser: {content}\\n\\nAssistant: {content}\\n\\n

  - the generation prompt is "Assistant: "; generation stops at the string "\\n\\n"
  - an HF dir that has an end-of-text token ends each turn with that token instead of "\\n\\n"
  - subtle: an answer that contains a blank line stops early at inference time

The loss mask is 1 exactly on the assistant's content and its end-of-turn token(s), so a
fine-tuned model learns both to answer and to stop; role markers and other turns are 0.

An HF dir with its own Jinja chat template (Llama 3, Qwen, Mistral ...: chat_template.jinja or
tokenizer_config.json) uses that instead, rendered as transformers' apply_chat_template does, its
turns ending at generation_config.json's eos ids and the template's end token (chat_templates.py).
"""
import contextlib
import difflib
import json
import os

import regex  # tiktoken's own dependency; the stdlib `re` has no \p{L} (letter) classes

from nanolab.bpe_training import learn_merges, merge
from nanolab.files import write_text

CHAT_TEMPLATE_DOC = __doc__[__doc__.index('Chat template'):]  # one copy; the README quotes it

# GPT-2's pre-tokenization regex (openai/gpt-2 src/encoder.py). tiktoken's 'gpt2' pattern is a
# faster rewrite of it (possessive quantifiers); tests/test_tokenizer.py checks they agree.
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_REGEX_ENCODINGS = ('gpt2', 'r50k_base', 'p50k_base', 'p50k_edit')  # tiktoken names using it
EOT = '<|endoftext|>'
ROLES = ('system', 'user', 'assistant')
CHAT_TOKENS = ('<|system|>', '<|user|>', '<|assistant|>', '<|end|>')  # ids in this order
TEXT_MARKERS = {'system': 'System: ', 'user': 'User: ', 'assistant': 'Assistant: '}
TEXT_END = '\n\n'


class Tokenizer:
    """The common interface. Subclasses set kind, vocab_size, eot, special_tokens and implement
    encode(text) -> ids, decode_bytes(ids) -> bytes and spec() -> dict."""
    kind, vocab_size, eot, special_tokens = None, 0, None, {}

    def decode(self, ids) -> str:
        # errors='replace': sampled ids can stop mid-character; show that, don't crash
        return self.decode_bytes(ids).decode('utf-8', errors='replace')

    def encode_batch(self, texts, num_threads=2):
        return [self.encode(t) for t in texts]

    def __repr__(self):
        return f'{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size}, eot={self.eot})'

    def _ids(self, ids) -> list:
        """decode's input guard: a flat list of ints inside the vocabulary."""
        ids = ids.tolist() if hasattr(ids, 'tolist') else ids  # torch tensor / numpy array
        flat = isinstance(ids, (list, tuple))
        bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < self.vocab_size] if flat else [ids]
        if bad:
            raise ValueError(f'cannot decode {bad[0]!r:.60}: decode takes a flat list or 1-D tensor of ints in '
                             f'[0, {self.vocab_size}). Pass idx[0] rather than a batch, and mask the logits of '
                             f'padded vocabulary entries (ids >= {self.vocab_size}) before sampling.')
        return list(ids)

    # ---- chat ----
    def _has_chat_tokens(self):
        return all(t in self.special_tokens for t in CHAT_TOKENS)

    def _chat_format(self):
        """(role -> header ids, end-of-turn ids): special tokens if we have them, else text."""
        if self._has_chat_tokens():
            return {r: [self.special_tokens[f'<|{r}|>']] for r in ROLES}, [self.special_tokens['<|end|>']]
        headers = {r: self.encode(m) for r, m in TEXT_MARKERS.items()}
        return headers, ([self.eot] if self.eot is not None else self.encode(TEXT_END))

    @property
    def chat_stop_tokens(self) -> list:
        """Ids that end an assistant turn at generation time (see CHAT_TEMPLATE_DOC)."""
        end = [self.special_tokens['<|end|>']] if self._has_chat_tokens() else []
        return end + ([self.eot] if self.eot is not None else [])

    @property
    def stop_strings(self) -> list:
        """Strings that end an assistant turn, for kinds whose turns end in plain text."""
        return [] if self._has_chat_tokens() or self.eot is not None else [TEXT_END]

    def chat_jinja(self):
        """This template as Jinja, the language of transformers' apply_chat_template and of GGUF's
        tokenizer.chat_template (hf.py and gguf_export.py write it): role tokens where we have them, else text."""
        if self._has_chat_tokens():
            return ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
        end = json.dumps(EOT if self.eot is not None else TEXT_END)
        return (f"{{% set markers = {json.dumps(TEXT_MARKERS)} %}}{{% for m in messages %}}"
                f"{{{{ markers[m['role']] }}}}{{{{ m['content'] }}}}{{{{ {end} }}}}{{% endfor %}}"
                f"{{% if add_generation_prompt %}}{{{{ markers['assistant'] }}}}{{% endif %}}")

    takes_tools = False  # whether render_chat's template has a place for OpenAI's tools (tool_calls.py)

    def render_chat(self, messages, add_generation_prompt=False, continue_final_message=False, tools=None):
        """messages [{'role', 'content'}, ...] -> (ids, mask) with the chat template;
        mask[i] = 1 iff token i is assistant content or an assistant end-of-turn token.
        continue_final_message (Hugging Face's name): the last message, the assistant's, stays open (no end of turn),
        so a model prompted with it goes on writing that reply (the page's "what if" branches)."""
        if continue_final_message and (add_generation_prompt or not messages or not isinstance(messages[-1], dict)
                                       or messages[-1].get('role') != 'assistant'):
            raise ValueError("continue_final_message continues the last message, which must be the assistant's "
                             "(and needs no generation prompt)")
        if not isinstance(messages, (list, tuple)):
            raise ValueError(f'messages must be a list of {{"role", "content"}} dicts, got {type(messages).__name__}')
        if tools:
            raise ValueError("this chat format has no place for tools: put them in a system message (tool_calls.py)")
        headers, end = self._chat_format()
        ids, mask = [], []
        for i, m in enumerate(messages):
            role = m.get('role') if isinstance(m, dict) else None
            if role not in ROLES:
                raise ValueError(f'message {i}: role must be one of {ROLES}, got {role!r} in {m!r:.80}; '
                                 'convert other formats (e.g. ShareGPT from/value) to role/content first')
            if not isinstance(m.get('content'), str):
                raise ValueError(f'message {i}: content must be a str, got {type(m.get("content")).__name__}; '
                                 'join multi-part content into one string')
            body = self.encode(m['content']) + (end if not (continue_final_message and i == len(messages) - 1) else [])
            ids += headers[role] + body
            mask += [0] * len(headers[role]) + [int(role == 'assistant')] * len(body)
        if add_generation_prompt:
            ids += headers['assistant']
            mask += [0] * len(headers['assistant'])
        return ids, mask


class CharTokenizer(Tokenizer):
    """nanoGPT's shakespeare_char: one id per distinct character of the text, in sorted order."""
    kind = 'char'

    def __init__(self, text=None, chars=None):
        if (text is None) == (chars is None):
            raise ValueError('CharTokenizer needs exactly one of text= (build the vocabulary from it) '
                             'or chars= (the vocabulary itself, as stored in a spec)')
        self.chars = ''.join(sorted(set(text))) if text is not None else chars
        if not self.chars or len(set(self.chars)) != len(self.chars):
            raise ValueError(f'char vocabulary {self.chars[:40]!r} is empty or repeats a char; '
                             'build it with CharTokenizer(text=corpus)')
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size, self.eot, self.special_tokens = len(self.chars), None, {}

    def encode(self, text):
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f'character {e.args[0]!r} is not in the char vocabulary ({self.vocab_size} chars); '
                             'rebuild the vocabulary from text that contains it (CharTokenizer(text=...)) '
                             'or remove it from the input') from None

    def decode(self, ids):
        return ''.join(self.chars[i] for i in self._ids(ids))

    def decode_bytes(self, ids):
        return self.decode(ids).encode('utf-8')

    def spec(self):
        return {'kind': 'char', 'chars': self.chars}

    def _chat_format(self):
        # the text markers must be spelled with chars the vocabulary has; say which are missing
        missing = sorted(set(''.join(TEXT_MARKERS.values()) + TEXT_END) - set(self.chars))
        if missing:
            markers = TEXT_END.join(TEXT_MARKERS.values())
            raise ValueError(f'the chat template needs the chars {missing}, which this char vocabulary lacks; '
                             f'rebuild it from text that has them: CharTokenizer(text=corpus + {markers!r})')
        return super()._chat_format()


class TiktokenTokenizer(Tokenizer):
    """A tiktoken encoding ('gpt2' by default) plus the chat tokens right above its vocabulary."""
    kind = 'tiktoken'

    def __init__(self, name='gpt2'):
        import tiktoken
        if name not in tiktoken.list_encoding_names():
            close = difflib.get_close_matches(name, tiktoken.list_encoding_names() + ['char'])
            raise ValueError(f'unknown tokenizer {name!r}; did you mean {close}? Choices: char, a BPE .json file, '
                             f'a Hugging Face directory, or a tiktoken encoding {tiktoken.list_encoding_names()}')
        try:
            base = tiktoken.get_encoding(name)
        except Exception as e:  # offline and not cached: requests' error says nothing about the fix
            raise ValueError(f'could not load tiktoken encoding {name!r} ({type(e).__name__}: {e}); go online once, '
                             "or point TIKTOKEN_CACHE_DIR at a folder holding tiktoken's cached BPE files") from e
        # chat tokens take the ids right above the base vocabulary: for gpt2 that is 50257..50260,
        # inside the padding that rounds GPT-2's 50257 up to 50304, so model shapes don't change
        chat = {t: base.n_vocab + i for i, t in enumerate(CHAT_TOKENS)}
        self.enc = tiktoken.Encoding(name=f'{name}_chat', pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks,
                                     special_tokens={**base._special_tokens, **chat})  # tiktoken README's recipe
        self.name, self.special_tokens = name, dict(self.enc._special_tokens)
        self.vocab_size, self.eot = self.enc.n_vocab, self.special_tokens.get(EOT)

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts, num_threads=2):
        return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode_bytes(self, ids):
        return self.enc.decode_bytes(self._ids(ids))

    def spec(self):
        return {'kind': 'tiktoken', 'name': self.name}


def _rank_bpe(ranks, data, max_rank):
    """tiktoken's algorithm: join the adjacent parts whose concatenation has the lowest rank,
    using ranks below max_rank only. On a token's own bytes it stops at the two parts the token
    was merged from, which recovers a merges list from tiktoken's ranks (minbpe's trick)."""
    parts = [bytes([b]) for b in data]
    while True:
        found = [(ranks[p + q], i) for i, (p, q) in enumerate(zip(parts, parts[1:]))
                 if ranks.get(p + q, max_rank) < max_rank]
        if not found:
            return parts
        _, i = min(found)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def bytes_to_unicode():
    """GPT-2's map from the 256 bytes to printable chars, so BPE files can be text: printable
    bytes stand for themselves, the others shift up past 255 (space 0x20 -> 'Ġ', '\\n' -> 'Ċ')."""
    bs = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    shifted = [b for b in range(256) if b not in bs]
    return {**{b: chr(b) for b in bs}, **{b: chr(256 + n) for n, b in enumerate(shifted)}}


class BPETokenizer(Tokenizer):
    """Our byte-level BPE. Its state is the ordered merges list: merge i joins the pair of ids
    (a, b) into the new id 256 + i. Special tokens come after the merges."""
    kind = 'bpe'

    def __init__(self, merges=(), special_tokens=None, pattern=GPT2_SPLIT_PATTERN, byte_order=None):
        # 1) the 256 byte tokens: byte_order[i] is the byte id i stands for. The identity for the
        #    BPEs we train; GPT-2 numbered the printable bytes first ('!' is id 0), so it permutes.
        self.byte_order = list(range(256)) if byte_order is None else list(byte_order)
        if sorted(self.byte_order) != list(range(256)):
            raise ValueError('byte_order must list each byte 0..255 once; the tokenizer spec is corrupt, re-save it')
        self.vocab = {i: bytes([b]) for i, b in enumerate(self.byte_order)}  # id -> bytes
        self.byte_ids = {b: i for i, b in enumerate(self.byte_order)}
        # 2) the merges, in the order they were learned (rows may carry a 3rd, readable field)
        self.merges = {}  # (a, b) -> new id
        for i, (a, b, *_) in enumerate(merges):
            if not (0 <= a < 256 + i and 0 <= b < 256 + i):
                raise ValueError(f'merge {i} ({a}, {b}) uses an id that does not exist yet; '
                                 'the merges list is corrupt, re-train or re-save it')
            self.merges[(a, b)] = 256 + i
            self.vocab[256 + i] = self.vocab[a] + self.vocab[b]
        # 3) special tokens: never produced by encode(), only by render_chat and callers
        self.special_tokens = dict(special_tokens or {})
        ids = list(self.special_tokens.values())
        if len(set(ids)) != len(ids) or any(i < len(self.vocab) for i in ids):
            raise ValueError(f'special token ids {self.special_tokens} must be distinct and >= {len(self.vocab)}')
        self.special_bytes = {i: t.encode('utf-8') for t, i in self.special_tokens.items()}
        self.vocab_size = max([len(self.vocab) - 1, *ids]) + 1
        self.eot = self.special_tokens.get(EOT)
        self.pattern, self.regex = pattern, regex.compile(pattern)
        self._cache, self._tiktoken = {}, None

    @classmethod
    def train(cls, text, vocab_size, verbose=False):
        """Learn merges from text: vocab_size = 256 bytes + merges + <|endoftext|> + 4 chat tokens."""
        specials = (EOT,) + CHAT_TOKENS
        num_merges = vocab_size - 256 - len(specials)
        if num_merges < 0:
            raise ValueError(f'vocab_size={vocab_size} is too small: raise it to at least {256 + len(specials)} '
                             f'(256 byte tokens + {len(specials)} special tokens)')
        merges = learn_merges(text, num_merges, GPT2_SPLIT_PATTERN, len(specials), verbose)
        return cls(merges, {t: 256 + num_merges + k for k, t in enumerate(specials)})

    def encode(self, text):
        """Plain text -> ids. Once to_tiktoken() has been built, tiktoken's Rust core does it
        (same ids, much faster); encode_python is the readable reference."""
        return self._tiktoken.encode_ordinary(text) if self._tiktoken else self.encode_python(text)

    def encode_python(self, text):
        ids = []
        for chunk in self.regex.findall(text):
            if chunk not in self._cache:  # real text repeats its words; GPT-2's encoder caches too
                if len(self._cache) > 100_000:
                    self._cache.clear()
                self._cache[chunk] = self._encode_chunk(chunk.encode('utf-8'))
            ids.extend(self._cache[chunk])
        return ids

    def _encode_chunk(self, data):
        ids = [self.byte_ids[b] for b in data]
        while len(ids) >= 2:
            # replay merges in training order: the present pair with the lowest new id goes first
            pair = min(zip(ids, ids[1:]), key=lambda p: self.merges.get(p, float('inf')))
            if pair not in self.merges:
                break  # nothing left to merge
            ids = merge(ids, pair, self.merges[pair])
        return ids

    def encode_batch(self, texts, num_threads=2):
        return self.to_tiktoken().encode_ordinary_batch(texts, num_threads=num_threads)

    def decode_bytes(self, ids):
        return b''.join(self.vocab[i] if i in self.vocab else self.special_bytes[i] for i in self._ids(ids))

    def to_tiktoken(self):
        """This tokenizer as a tiktoken.Encoding, for tiktoken's fast Rust core (built once)."""
        if self._tiktoken is None:
            import tiktoken
            # subtle: tiktoken ranks byte strings, not (a, b) pairs: it joins any two adjacent parts
            # whose concatenation is a token. That agrees with replaying our merges for GPT-2's files
            # and for the BPEs we train (the tests check both), but two ids with the same bytes would
            # collapse into one rank, so refuse those.
            ranks = {b: i for i, b in self.vocab.items()}
            if len(ranks) != len(self.vocab):
                raise ValueError('two token ids share the same bytes, which tiktoken cannot represent; '
                                 'use encode_python')
            self._tiktoken = tiktoken.Encoding(name='nanolab_bpe', pat_str=self.pattern, mergeable_ranks=ranks,
                                               special_tokens=self.special_tokens)
        return self._tiktoken

    def spec(self):
        spec = {'kind': 'bpe', 'pattern': self.pattern, 'special_tokens': self.special_tokens,
                'merges': [list(p) for p in self.merges]}
        if self.byte_order != list(range(256)):
            spec['byte_order'] = self.byte_order
        return spec

    def save(self, path):
        """One readable JSON file: the pattern, the special tokens, then one merge per line as
        [a, b, "merged text"] (the text is for human eyes; load() ignores it)."""
        head = {k: v for k, v in self.spec().items() if k != 'merges'}
        rows = [json.dumps([a, b, self.vocab[idx].decode('utf-8', errors='replace')], ensure_ascii=False)
                for (a, b), idx in self.merges.items()]
        # json.dumps(indent=...) would put every int on its own line; write one merge per line
        body = json.dumps(head, ensure_ascii=False, indent=1)[:-2] + ',\n "merges": [\n  ' + ',\n  '.join(rows)
        write_text(path, body + '\n ]\n}\n')

    @classmethod
    def load(cls, path):
        try:
            with open(path, encoding='utf-8') as f:
                spec = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f'cannot read BPE tokenizer file {path} ({e}); re-create it with BPETokenizer.save') from e
        if spec.get('kind') != 'bpe':
            raise ValueError(f'{path} holds a {spec.get("kind")!r} tokenizer, not a BPE one; load it with from_spec')
        return from_spec(spec)

    @classmethod
    def from_gpt2_files(cls, encoder_json_path, vocab_bpe_path):
        """GPT-2's BPE from its published encoder.json + vocab.bpe (the same formats as HF's
        vocab.json + merges.txt), plus the chat tokens. Encodes exactly like tiktoken's 'gpt2'."""
        with open(encoder_json_path, encoding='utf-8') as f, open(vocab_bpe_path, encoding='utf-8') as g:
            return cls._from_gpt2_data(json.load(f), g.read(), add_chat_tokens=True)

    @classmethod
    def _from_gpt2_data(cls, encoder, merges_text, extra_specials=None, add_chat_tokens=False):
        layout_error = ValueError("vocab.json/merges.txt are not laid out like GPT-2's (256 byte tokens, then one "
                                  "token per merge in merges order), which BPETokenizer needs; give the directory "
                                  "a tokenizer.json (transformers' tokenizer.save_pretrained writes one)")
        # 1) byte tokens: GPT-2 writes each byte as a printable char (bytes_to_unicode)
        byte_order = [None] * 256
        for b, ch in bytes_to_unicode().items():
            if not 0 <= encoder.get(ch, -1) < 256:
                raise layout_error
            byte_order[encoder[ch]] = b
        # 2) merges: a '#version' header, then "a b" per line in the order they were learned
        merges = []
        for line in merges_text.split('\n'):
            if line and not line.startswith('#version'):
                a, b = line.split(' ')
                if encoder.get(a + b) != 256 + len(merges):
                    raise layout_error
                merges.append((encoder[a], encoder[b]))
        # 3) whatever else the vocabulary holds is special (GPT-2: <|endoftext|> = 50256)
        specials = {t: i for t, i in {**encoder, **(extra_specials or {})}.items() if i >= 256 + len(merges)}
        if add_chat_tokens:  # right above GPT-2's vocabulary, as TiktokenTokenizer does
            top = max(specials.values(), default=255 + len(merges))
            specials.update({t: top + 1 + k for k, t in enumerate(CHAT_TOKENS)})
        return cls(merges, specials, GPT2_SPLIT_PATTERN, byte_order)

    @classmethod
    def from_tiktoken(cls, enc):
        """Recover our merges list from a tiktoken.Encoding's ranks (they must be contiguous)."""
        ranks = enc._mergeable_ranks
        by_rank = sorted(ranks, key=ranks.get)
        if [ranks[t] for t in by_rank] != list(range(len(by_rank))) or any(len(t) != 1 for t in by_rank[:256]):
            raise ValueError(f'tiktoken encoding {enc.name!r} is not a plain byte-level BPE (ranks 0..255 = bytes, '
                             'then contiguous merges), so it cannot be converted')
        merges = [tuple(ranks[p] for p in _rank_bpe(ranks, t, ranks[t])) for t in by_rank[256:]]
        return cls(merges, enc._special_tokens, enc._pat_str, [t[0] for t in by_rank[:256]])


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer directory: tokenizer.json through the `tokenizers` library, else
    GPT-2-style vocab.json + merges.txt through our BPETokenizer. The files are kept as text, so
    spec() is self-contained: a checkpoint still loads after the directory is gone."""
    kind = 'hf'
    FILES = ('tokenizer.json', 'vocab.json', 'merges.txt', 'added_tokens.json', 'tokenizer_config.json',
             'special_tokens_map.json', 'generation_config.json', 'chat_template.jinja')

    def __init__(self, path, files=None):
        if files is None:
            if not os.path.isdir(path):
                raise ValueError(f'{path} is not a directory; give a Hugging Face tokenizer directory '
                                 '(tokenizer.json, or vocab.json + merges.txt)')
            files = {}
            for name in filter(lambda n: os.path.exists(os.path.join(path, n)), self.FILES):
                with open(os.path.join(path, name), encoding='utf-8') as f:
                    files[name] = f.read()
        self.name, self.files, self.tk, self.bpe = str(path), files, None, None
        if 'tokenizer.json' in files:
            from tokenizers import Tokenizer as HFTok
            self.tk = HFTok.from_str(files['tokenizer.json'])
            # subtle: `tokenizers` finds added tokens inside raw text by default; switch that off so
            # encode() stays plain text, like every other kind (a typed "<|end|>" is just text)
            self.tk.encode_special_tokens = True
            added = self.tk.get_added_tokens_decoder()  # id -> AddedToken
            self.special_tokens, self.added_ids = {t.content: i for i, t in added.items() if t.special}, set(added)
            self.added = {t.content: (i, t.special) for i, t in added.items()}  # the chat template's control tokens
            ids = self.tk.get_vocab(with_added_tokens=True)
            self.vocab_size = max(ids.values()) + 1
            self.byte_level = (json.loads(files['tokenizer.json']).get('decoder') or {}).get('type') == 'ByteLevel'
            self.u2b = {c: b for b, c in bytes_to_unicode().items()}  # decode_bytes' table, built once (streaming)
        elif 'vocab.json' in files and 'merges.txt' in files:
            self.bpe = BPETokenizer._from_gpt2_data(json.loads(files['vocab.json']), files['merges.txt'],
                                                    json.loads(files.get('added_tokens.json', '{}')))
            ids, self.vocab_size = self.bpe.special_tokens, self.bpe.vocab_size
            self.special_tokens = dict(ids)
            self.added = {t: (i, True) for t, i in ids.items()}
        else:
            raise ValueError(f'{path} has no tokenizer.json and no vocab.json + merges.txt; save the tokenizer there '
                             'with transformers (tokenizer.save_pretrained(dir)) or hf.save_tokenizer_files')
        # eot = the directory's eos token (tokenizer_config.json wins over special_tokens_map.json)
        config = {**json.loads(files.get('special_tokens_map.json', '{}')),
                  **json.loads(files.get('tokenizer_config.json', '{}'))}
        eos = config.get('eos_token') or EOT
        eos = eos.get('content') if isinstance(eos, dict) else eos
        self.eot = ids.get(eos)
        if self.eot is not None:
            self.special_tokens.setdefault(eos, self.eot)

    def encode(self, text):
        return self.bpe.encode(text) if self.bpe else self.tk.encode(text, add_special_tokens=False).ids

    # ---- the directory's own Jinja chat template (nanolab/chat_templates.py), when it has one ----
    @property
    def chat_template(self):
        """The directory's ChatTemplate, or None (then nanolab's format, as for the other kinds). Compiled on
        first use, so a broken template fails chats only, with the fix in its message."""
        if not hasattr(self, '_template'):
            from nanolab.chat_templates import ChatTemplate
            t = ChatTemplate.for_hf(self)
            # our own export's template (hf.save_tokenizer_files) is this format: keep its exact rules (stop strings)
            self._template = None if t is None or t.source == Tokenizer.chat_jinja(self) else t
        return self._template

    def chat_jinja(self):
        """The directory's own template where it has one (what GGUF and HF exports carry on)."""
        return self.chat_template.source if self.chat_template is not None else super().chat_jinja()

    @property
    def takes_tools(self):
        return self.chat_template is not None and 'tools' in self.chat_template.source

    def render_chat(self, messages, add_generation_prompt=False, continue_final_message=False, tools=None):
        if self.chat_template is None:
            return super().render_chat(messages, add_generation_prompt, continue_final_message, tools)
        return self.chat_template.render_chat(messages, add_generation_prompt, continue_final_message,
                                              set(self.chat_stop_tokens), tools)

    @property
    def chat_stop_tokens(self):
        """With a template: generation_config.json's eos ids, the eos token, and the special tokens the template
        ends a turn with (<|eot_id|>, <|im_end|>)."""
        if self.chat_template is None:
            return super().chat_stop_tokens
        if not hasattr(self, '_stops'):
            eos = json.loads(self.files.get('generation_config.json') or '{}').get('eos_token_id')
            eos = eos if isinstance(eos, list) else [eos]
            ids = [*eos, self.eot, *self.chat_template.end_tokens()]
            self._stops = [i for k, i in enumerate(ids) if isinstance(i, int) and i not in ids[:k]]
        return self._stops

    @property
    def stop_strings(self):
        return [] if self.chat_template is not None else super().stop_strings

    def encode_batch(self, texts, num_threads=2):
        if self.bpe:
            return self.bpe.encode_batch(texts, num_threads)
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids):
        return self.bpe.decode(ids) if self.bpe else self.tk.decode(self._ids(ids), skip_special_tokens=False)

    def decode_bytes(self, ids):
        if self.bpe:
            return self.bpe.decode_bytes(ids)
        if not self.byte_level:  # e.g. SentencePiece-style vocabularies: whole characters only
            return self.decode(ids).encode('utf-8')
        # byte-level: each token is a string of bytes_to_unicode chars, so the bytes come out exact
        # even mid-character (what streaming needs); added tokens are stored as plain text
        tokens = [(i, self.tk.id_to_token(i)) for i in self._ids(ids)]
        return b''.join(t.encode('utf-8') if i in self.added_ids else bytes(self.u2b[c] for c in t) for i, t in tokens)

    def spec(self):
        return {'kind': 'hf', 'name': self.name, 'files': self.files}

    def to_tiktoken(self):
        """data.py's workers: GPT-2's plain byte-level BPE in its layout (tokenizer_training.py's) as our BPETokenizer
        on tiktoken's Rust core, the same ids 6-8x faster than `tokenizers`; anything else keeps `tokenizers` (None)."""
        j = json.loads(self.files.get('tokenizer.json', '{}'))
        m, pre = j.get('model') or {}, j.get('pre_tokenizer') or {}
        byte_level = pre == {**pre, 'type': 'ByteLevel', 'add_prefix_space': False, 'use_regex': True}
        if self.bpe is None and byte_level and m.get('type') == 'BPE' and not j.get('normalizer') \
                and not (m.get('dropout') or m.get('ignore_merges')) and all(s for _, s in self.added.values()):
            with contextlib.suppress(ValueError):  # not GPT-2's layout (256 bytes, then a token per merge)
                merges = '\n'.join(p if isinstance(p, str) else ' '.join(p) for p in m['merges'])
                self.bpe = BPETokenizer._from_gpt2_data(m['vocab'], merges, self.special_tokens)
        return self.bpe.to_tiktoken() if self.bpe else None


def check_fits(tok, vocab_size):
    """ValueError when the tokenizer has ids that an embedding of vocab_size rows has no rows for (e.g. chat tokens
    above GPT-2's 50257 on a 50257-row model): an export would write tokens without weights. None passes."""
    if tok is not None and tok.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer has ids up to {tok.vocab_size - 1}, beyond the model's embedding of "
                         f"{vocab_size} rows, so those tokens have no weights; train with vocab_size >= the "
                         "tokenizer's (50304 pads GPT-2's 50257 with room for the chat tokens), or drop them")


def from_spec(spec: dict) -> Tokenizer:
    """Rebuild a tokenizer from tok.spec(), as stored in checkpoints and meta.json."""
    kind = spec.get('kind') if isinstance(spec, dict) else None
    try:
        if kind == 'char':
            return CharTokenizer(chars=spec['chars'])
        elif kind == 'tiktoken':
            return TiktokenTokenizer(spec['name'])
        elif kind == 'bpe':
            return BPETokenizer(spec['merges'], spec['special_tokens'], spec['pattern'], spec.get('byte_order'))
        elif kind == 'hf':
            return HFTokenizer(spec.get('name', ''), files=spec['files'])
        else:
            raise ValueError(f'unknown tokenizer spec kind {kind!r}: expected a dict written by Tokenizer.spec(), '
                             "with kind one of 'char', 'tiktoken', 'bpe', 'hf'")
    except KeyError as e:
        raise ValueError(f'{kind} tokenizer spec lacks the field {e}; the checkpoint or meta.json is damaged, '
                         're-create it (data.py re-tokenizes, train.py re-saves)') from None


def get_tokenizer(name_or_spec) -> Tokenizer:
    """'gpt2' or another tiktoken encoding name, a spec dict, a saved BPE .json, or a HF directory."""
    if isinstance(name_or_spec, Tokenizer):
        return name_or_spec
    if isinstance(name_or_spec, dict):
        return from_spec(name_or_spec)
    name = str(name_or_spec)
    if name == 'char':
        raise ValueError("a char tokenizer is built from its text: CharTokenizer(text=corpus); "
                         "a saved one comes back with from_spec(meta['tokenizer'])")
    if os.path.isdir(name):
        return HFTokenizer(name)
    if name.endswith('.json') and os.path.isfile(name):
        return BPETokenizer.load(name)
    return TiktokenTokenizer(name)
