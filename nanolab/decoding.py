"""
One token choice: the decoding settings (Settings, validated once), the logit processors, the
choice itself (choose: greedy argmax, or a draw by the seeding rule) and the text a row's tokens
make (TextStream). engine.py runs it for every row of every step; these are plain functions of
tensors, tested one by one (tests/test_sample.py).

Each step: penalties -> temperature -> top_k -> top_p -> min_p -> draw. Reported logprobs are
always those of the RAW model distribution (log_softmax of the unprocessed logits), whatever the
settings, so they compare across settings and serve as the model's likelihood (evaluate.py,
dpo.py).

The seeding rule. Sample i (0-based) of every prompt of a request with seed s draws from
random.Random(s + i): one uniform number per token, turned into a token by the inverse CDF of the
row's processed distribution (draw). So a row's text depends on its prompt, its settings and s + i
only: never on the other rows of its request, on the rest of the batch, or on n. Without a seed, a
sampling request draws s from torch's global RNG (torch.manual_seed repeats it); greedy and beam
requests leave that RNG alone, so decoding inside a training run cannot change it.
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F


# below it, a temperature is greedy: logits of up to 1e33 divided by it stay finite in fp32
MIN_TEMPERATURE = 1e-5

class SettingsError(ValueError):
    """A bad decoding setting; `field` names it (serve.py answers 400 with it as the param)."""
    def __init__(self, field, message):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Settings:
    """How to decode a request. check() validates it once, against the model's vocabulary and the
    tokenizer."""
    max_new_tokens: int = 100
    temperature: float = 1.0          # 0 = greedy
    top_k: int = 0                    # keep the k likeliest tokens; 0 = off
    top_p: float = 1.0                # nucleus; 1 = off
    min_p: float = 0.0                # drop p < min_p * p_max; 0 = off
    repetition_penalty: float = 1.0   # CTRL; 1 = off
    presence_penalty: float = 0.0     # OpenAI's, in [-2, 2]
    frequency_penalty: float = 0.0    # OpenAI's, in [-2, 2]
    num_beams: int = 1                # > 1 = beam search (no temperature/top_k/top_p/min_p)
    length_penalty: float = 1.0       # beam score = sum logprob / length ** length_penalty
    num_samples: int = 1              # rows per prompt (beam search: the best num_samples beams)
    stop_tokens: tuple | None = None  # None = the tokenizer's end-of-text; () = no stop token
    stop_strings: tuple = ()
    seed: int | None = None           # the seeding rule above; None = drawn at submit (torch)
    logprobs: int = 0                 # the k likeliest (token, logprob) at every step; 0 = off
    prompt_logprobs: bool = False     # also score every prompt token (echo): PromptScores events
    json_schema: str | None = None    # the text follows this JSON schema (grammar.py); None = off
    grammar: str | None = None        # ... or this grammar, in llguidance's Lark
    logit_bias: tuple = ()            # OpenAI's: ((token id, bias in [-100, 100]), ...) added
    grammar_prefix: tuple = ()        # token ids the text already has (a continued reply's): the
                                      # grammar takes them first

    @property
    def sampler(self):
        """The settings that shape a row's next-token distribution (process_logits' keywords)."""
        return dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                    min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                    presence_penalty=self.presence_penalty,
                    frequency_penalty=self.frequency_penalty)

    @property
    def slots(self):
        """KV-cache slots a prompt takes at once: its beams, or its samples (which share its
        prefill), or 1 to score."""
        return self.num_beams if self.num_beams > 1 else 1 if self.max_new_tokens == 0 else \
            self.num_samples

    @property
    def compiled_grammar(self):
        """The grammar the text follows (grammar.py, cached), or None."""
        from nanolab import grammar
        return grammar.schema_grammar(self.json_schema) if self.json_schema is not None else \
            None if self.grammar is None else grammar.lark_grammar(self.grammar)

    @property
    def penalized(self):
        return (self.repetition_penalty, self.presence_penalty,
                self.frequency_penalty) != (1.0, 0.0, 0.0)

    def check(self, vocab_size, tokenizer=None):
        """-> these settings with the defaults filled in; a bad value is a SettingsError naming the
        field and range."""
        V, s = vocab_size, self
        # not per char
        stops = (s.stop_strings,) if isinstance(s.stop_strings, str) else tuple(s.stop_strings)
        for field, bad, why in [
                ('max_new_tokens', s.max_new_tokens < 0, 'must be >= 0'),
                ('temperature', not s.temperature >= 0, 'must be >= 0 (0 = greedy)'),
                ('top_k', s.top_k < 0, 'must be >= 0 (0 = off)'),
                ('top_p', not 0 < s.top_p <= 1, 'must be in (0, 1] (1 = off)'),
                ('min_p', not 0 <= s.min_p < 1, 'must be in [0, 1) (0 = off)'),
                ('repetition_penalty', not s.repetition_penalty > 0, 'must be > 0 (1 = off)'),
                ('presence_penalty', not -2 <= s.presence_penalty <= 2,
                 "must be in [-2, 2] (as OpenAI's API)"),
                ('frequency_penalty', not -2 <= s.frequency_penalty <= 2,
                 "must be in [-2, 2] (as OpenAI's API)"),
                ('num_beams', s.num_beams < 1, 'must be >= 1 (1 = no beam search)'),
                ('num_samples', s.num_samples < 1, 'must be >= 1'),
                ('num_samples', s.num_beams > 1 and s.num_samples > s.num_beams,
                 f'must be <= num_beams={s.num_beams} (beam search returns the best '
                 'num_samples beams); raise num_beams'),
                ('logprobs', not 0 <= s.logprobs <= V,
                 f'must be in [0, vocab_size={V}] (0 = off)'),
                ('prompt_logprobs', s.prompt_logprobs and s.num_beams > 1,
                 'cannot be combined with beam search'),
                ('stop_strings', any(not isinstance(x, str) or not x for x in stops),
                 'must be non-empty strings')]:
            if bad:
                raise SettingsError(field, f"{field}={getattr(s, field)!r} {why}")
        if stops and tokenizer is None:
            raise SettingsError('stop_strings', "stop_strings need a tokenizer to "
                                                "decode the text; pass tokenizer=")
        if s.json_schema is not None or s.grammar is not None:
            from nanolab import grammar
            field = 'json_schema' if s.json_schema is not None else 'grammar'
            if tokenizer is None or None not in (s.json_schema, s.grammar):
                raise SettingsError(field, "json_schema or grammar (one of them) needs a "
                                           "tokenizer: pass tokenizer=")
            try:  # built here, on the caller's thread (grammar.Vocabulary)
                vocab = grammar.vocabulary(tokenizer, vocab_size)
                vocab.prototype(s.compiled_grammar)
            except grammar.GrammarError as e:
                raise SettingsError(field, f'{field}: {e}') from None
            try:
                if s.grammar_prefix:
                    grammar.Constraint(vocab, s.compiled_grammar, prefix=s.grammar_prefix)
            except grammar.GrammarError as e:
                raise SettingsError('grammar_prefix', f'{e}') from None
        if any(not (isinstance(t, int) and 0 <= t < V and -100 <= b <= 100)
               for t, b in s.logit_bias):
            raise SettingsError('logit_bias', f'logit_bias must map token ids in [0, {V}) to '
                                              'biases in [-100, 100]')
        # subtle: logits / 1e-40 overflow to inf, and softmax(inf) is NaN
        if 0 < s.temperature < MIN_TEMPERATURE:
            # what such a temperature stands for is the argmax anyway
            s = replace(s, temperature=0.0)
        stop_tokens = s.stop_tokens
        # default: stop at end-of-text; pass stop_tokens=() to generate through it
        if stop_tokens is None:
            stop_tokens = (tokenizer.eot,) if getattr(tokenizer, 'eot', None) is not None else ()
        return replace(s, stop_strings=stops, stop_tokens=tuple(stop_tokens))


# -----------------------------------------------------------------------------
# logit processors: logits (..., V) float -> logits with the same shape, new tensors (inputs are
# not modified)

def apply_repetition_penalty(logits, seen, penalty):
    """CTRL (Keskar et al. 2019, eq. 1), as Hugging Face: a token already in the prompt or the
    output (seen: bool (..., V)) gets logit/penalty if its logit is positive, else logit*penalty,
    so it always becomes less likely."""
    if penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)

def apply_presence_frequency(logits, counts, presence, frequency):
    """OpenAI API: logit -= presence * (count > 0) + frequency * count, counts over generated
    tokens only."""
    if presence == 0.0 and frequency == 0.0:
        return logits
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts.to(logits.dtype)

def apply_temperature(logits, temperature):
    """temperature 0 means greedy, which choose's argmax handles; dividing by 0 would give
    inf/nan."""
    return logits if temperature in (0.0, 1.0) else logits / temperature

def top_k_filter(logits, k):
    """Keep the k largest logits (ties with the k-th are kept too, as HF does); k=0 = off."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float('-inf'))

def top_p_filter(logits, p):
    """Nucleus sampling (Holtzman et al. 2019): keep the smallest set of likeliest tokens whose
    mass is >= p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the strictly likelier tokens
    drop_sorted = before >= p
    # subtle: the likeliest token always stays (its before is 0), even for a p that is 0 in float32
    # (1e-300 passes p > 0 as a Python float and compares as 0 with the logits' float32)
    drop_sorted[..., 0] = False
    # back to vocabulary order
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float('-inf'))

def min_p_filter(logits, min_p):
    """min-p (Nguyen et al. 2024): keep tokens with p >= min_p * p_max, a cut that scales with the
    model's confidence."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float('-inf'))

def process_logits(logits, seen=None, counts=None, *, temperature=1.0, top_k=0, top_p=1.0,
                   min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0):
    """All processors in order. seen/counts are only needed for the penalties (see
    penalty_state)."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if counts is not None:
        logits = apply_presence_frequency(logits, counts, presence_penalty, frequency_penalty)
    if temperature == 0.0:
        return logits  # greedy: top_k/top_p/min_p all keep the argmax, so they cannot change it
    logits = apply_temperature(logits, temperature)
    return min_p_filter(top_p_filter(top_k_filter(logits, top_k), top_p), min_p)

def penalty_state(prompts, outputs, vocab_size, device, repetition_penalty, presence_penalty,
                  frequency_penalty):
    """seen (B, V) bool over prompt+output for the repetition penalty, counts (B, V) over outputs
    for the OpenAI penalties; None where that penalty is off. Built on the device from the rows'
    token ids (one copy of the ids, not of a (B, V) table)."""
    seen = counts = None

    def where(lists):  # (row index, token id) of every token, as two index tensors on the device
        # one torch.tensor per row, not one flattened Python list: 2.7 vs 4.8 ms for 16 rows of
        # 1000 tokens
        ids = torch.cat([torch.tensor(x, dtype=torch.long) for x in lists])
        rows = torch.repeat_interleave(torch.arange(len(lists)),
                                       torch.tensor([len(x) for x in lists]))
        return rows.to(device), ids.to(device)
    if repetition_penalty != 1.0:
        seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
        seen[where([p + o for p, o in zip(prompts, outputs)])] = True
    if presence_penalty != 0.0 or frequency_penalty != 0.0:
        counts = torch.zeros(len(outputs), vocab_size, device=device)
        r, t = where(outputs)
        counts.index_put_((r, t), torch.ones(len(t), device=device), accumulate=True)
    return seen, counts

def argmax(x, block=1024):
    """x.argmax(-1) (B, V), the first maximum of each row: the block holding it by each block's
    max, then the token inside that block. aten's argmax over a whole vocabulary is a serial scan,
    10x slower than a max (measured: 0.8 ms for 16 rows of 50k logits), and every greedy row needs
    one each step."""
    B, V = x.shape
    n = V // block
    if n < 2:
        return x.argmax(-1)
    tops = x[:, :n * block].reshape(B, n, block).amax(-1)  # (B, n)
    tail = x[:, n * block:]
    best = tops.argmax(-1)  # the first block holding its max
    inside = x[:, :n * block].reshape(B, n, block).gather(
        1, best.view(B, 1, 1).expand(B, 1, block))[:, 0]
    t = best * block + inside.argmax(-1)
    # the last, partial block wins only with a strictly larger value (it comes after the others)
    if tail.size(1):
        t = torch.where(tail.amax(-1) > tops.amax(-1), n * block + tail.argmax(-1), t)
    return t

def draw(probs, uniforms, block=1024):
    """Inverse-CDF sampling: row b takes the first token whose cumulative probability exceeds
    uniforms[b] (in [0, 1)) of its total, so one number per row decides each draw, whatever shares
    the batch. In two levels, so no cumulative sum runs over the whole vocabulary (a serial scan:
    0.7 ms for 16 rows of 50k): blocks of `block` tokens by their mass, then the token inside the
    block; the running sums are float64, or float32's rounding would shift the rarest tokens'
    odds."""
    B, V = probs.shape
    n = -(-V // block)
    # float32 sums of 1024 (pairwise): ~1e-7
    head = probs[:, :(n - 1) * block].reshape(B, n - 1, block).sum(-1)
    mass = torch.cat([head, probs[:, (n - 1) * block:].sum(-1, keepdim=True)],
                     dim=1).double()  # (B, n)
    cdf = mass.cumsum(-1)
    u = torch.tensor(uniforms, dtype=torch.float64,
                     device=probs.device)[:, None] * cdf[:, -1:]  # (B, 1)
    k = torch.searchsorted(cdf, u, right=True).clamp_(max=n - 1)  # the block
    u = u - (cdf.gather(1, k) - mass.gather(1, k))                # mass left to cover inside it
    idx = k * block + torch.arange(block, device=probs.device)    # (B, block) its tokens
    inside = torch.where(idx < V, probs.gather(1, idx.clamp(max=V - 1)), 0).double().cumsum(-1)
    # clamped: a row whose probabilities are not numbers would otherwise point past the vocabulary
    t = (idx.gather(1, torch.searchsorted(inside, u, right=True).clamp_(max=block - 1)))[:, 0]
    t = t.clamp_(max=V - 1)
    # subtle: float rounding can land past the mass
    bad = probs.gather(1, t.clamp(max=V - 1)[:, None])[:, 0] <= 0
    if probs.is_cuda:  # no host sync on a GPU: the argmax is cheaper than waiting for the device
        return torch.where(bad, argmax(probs), t)
    return torch.where(bad, argmax(probs), t) if bool(bad.any()) else t

def choose(logits, rows):
    """The one token choice, for a batch of rows of any requests: logits (B, V) raw -> (tokens
    (B,), raw logprobs of those tokens (B,), logsumexp (B,) to turn any raw logit into its logprob,
    broken (B,) bool: the rows whose token could not be chosen, errors {row: why} for the rows of a
    group that raised). Rows with equal settings are processed together (each processor works row
    by row, so a row gets the same distribution alone or in company); greedy rows take the argmax;
    the others draw with their own rng. No (B, V) log-softmax is made: logprobs come from the
    chosen logits and one logsumexp per row.
    Each row is isolated, by construction: a row whose logits hold NaN or inf (an fp16 overflow),
    or whose settings leave no finite logit to draw from, is marked broken and decoded from zeros
    instead, and a group whose processing raises marks its own rows; the caller fails those rows'
    requests (engine.py) and their neighbours go on. Nothing here waits for the device (but draw's
    rare check on the CPU): the caller fetches tokens, logprobs and broken in one transfer."""
    raw, lse = logits, torch.logsumexp(logits, dim=-1)
    broken = ~torch.isfinite(lse)  # NaN anywhere, or +inf, makes the row's logsumexp non-finite
    logits = constrain(logits, rows)  # the logprobs stay the model's (raw)
    # on a CPU the check costs nothing and spares a copy of every row's logits each step (0.2 ms
    # for 8 rows of 50k); on a GPU, no waiting for the device
    if logits.is_cuda or bool(broken.any()):
        logits = torch.where(broken[:, None], 0.0, logits)
        lse = torch.where(broken, math.log(logits.size(-1)), lse)  # the logsumexp of a row of zeros
    nxt = torch.zeros(len(rows), dtype=torch.long, device=logits.device)
    groups, errors = {}, {}
    for b, row in enumerate(rows):
        groups.setdefault(tuple(row.req.settings.sampler.items()), []).append(b)
    for key, idx in groups.items():
        s, group = rows[idx[0]].req.settings, [rows[b] for b in idx]
        whole = len(idx) == len(rows)
        try:
            x = logits if whole else logits[idx]
            if s.penalized:
                seen, counts = penalty_state([r.tokens[:r.n_prompt] for r in group],
                                             [r.tokens[r.n_prompt:] for r in group],
                                             logits.size(-1), logits.device, s.repetition_penalty,
                                             s.presence_penalty, s.frequency_penalty)
                x = process_logits(x, seen, counts, **s.sampler)
            elif s.temperature > 0:
                x = process_logits(x, **s.sampler)
            # processed rows with no finite logit left (all -inf, or a NaN or +inf from an extreme
            # setting) have nothing to draw from: broken, whatever token is picked below
            dead = ~torch.isfinite(x.amax(-1)) if s.penalized or s.temperature > 0 else False
            t = argmax(x) if s.temperature == 0 else \
                draw(x.softmax(-1), [r.rng.random() for r in group])
        except Exception as e:  # this group's rows fail; the batch goes on
            errors.update({b: f'{type(e).__name__}: {e}' for b in idx})
            t = torch.zeros(len(idx), dtype=torch.long, device=logits.device)
            dead = torch.ones(len(idx), dtype=torch.bool, device=logits.device)
        if whole:
            nxt, broken = t, broken | dead
        else:
            nxt[idx], broken[idx] = t, broken[idx] | dead
    return nxt, raw.gather(1, nxt[:, None])[:, 0] - lse, lse, broken, errors

def constrain(logits, rows):
    """Each row's logit_bias added and its grammar's mask applied (a token it does not allow:
    -inf), before any other processing: logits (B, V) raw -> new logits, or the same tensor when no
    row has either. A row's mask is its own (grammar.Constraint), filled for the rows together."""
    held = [b for b, r in enumerate(rows) if getattr(r, 'constraint', None) is not None]
    biased = [b for b, r in enumerate(rows) if r.req.settings.logit_bias]
    if not held and not biased:
        return logits
    logits = logits.clone()
    for b in biased:
        ids, bias = zip(*rows[b].req.settings.logit_bias)
        logits[b, list(ids)] += torch.tensor(bias, dtype=logits.dtype, device=logits.device)
    if held:
        from nanolab.grammar import allowed_rows
        allowed = allowed_rows([rows[b].constraint for b in held]).to(logits.device)
        logits[held] = logits[held].masked_fill(~allowed, float('-inf'))
    return logits

def extend_beams(logits, rows, k):
    """Beam search's choice, for the live beams of one search: logits (nb, V) raw -> the k best
    one-token extensions by total processed logprob (row.score + this token's), best first, as
    [(beam index, token, total, raw logprob)], and each beam's top alternatives (raw). Penalties
    apply; temperature, top_k, top_p and min_p do not."""
    s, V = rows[0].req.settings, logits.size(-1)
    raw = F.log_softmax(logits, dim=-1)  # (nb, V)
    seen, counts = penalty_state([r.tokens[:r.n_prompt] for r in rows],
                                 [r.tokens[r.n_prompt:] for r in rows], V, logits.device,
                                 s.repetition_penalty, s.presence_penalty,
                                 s.frequency_penalty) if s.penalized else (None, None)
    logp = F.log_softmax(process_logits(constrain(logits, rows), seen, counts,
                                        **{**s.sampler, 'temperature': 0.0}), dim=-1)
    total = torch.tensor([r.score for r in rows], device=logp.device)[:, None] + logp  # (nb, V)
    vals, flat = total.view(-1).topk(min(k, total.numel()))
    beam, tok = flat // V, flat % V
    out = zip(beam.tolist(), tok.tolist(), vals.tolist(), raw[beam, tok].tolist())
    # (a grammar may allow fewer than k extensions: the others are -inf)
    return [e for e in out if e[2] > float('-inf')], top_logprobs(raw, s.logprobs)

def top_logprobs(logits, k, lse=None):
    """The k likeliest (token, logprob) of each row, or None per row when k=0. logits: raw logits
    with their logsumexp lse (B,), or logprobs already (lse None)."""
    if not k:
        return [None] * logits.size(0)
    tv, ti = logits.topk(k, dim=-1)
    return [list(zip(i, v)) for i, v in zip(ti.tolist(),
                                            (tv if lse is None else tv - lse[:, None]).tolist())]

def prompt_lists(prompts):
    """One prompt (token ids) or a batch of them (lists, or a 2-D tensor) -> list[list[int]], none
    empty."""
    prompts = prompts.tolist() if isinstance(prompts, torch.Tensor) else prompts
    if len(prompts) == 0:
        raise ValueError("prompts is empty; pass a list of token ids, or a list of such lists")
    # one prompt, or a batch
    prompts = [prompts] if not isinstance(prompts[0], (list, tuple)) else prompts
    prompts = [[int(t) for t in p] for p in prompts]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt; give at least one token (e.g. the tokenizer's eot)")
    return prompts

# -----------------------------------------------------------------------------
# text: token ids -> text deltas that never split a UTF-8 character or show part of a stop string

def _utf8_safe_len(data):
    """Length of the longest prefix of bytes `data` that does not end inside a multi-byte UTF-8
    character."""
    for i in range(1, min(4, len(data)) + 1):
        c = data[-i]
        if c & 0xC0 != 0x80:  # a lead byte (or ASCII), not a continuation byte 10xxxxxx
            need = 1 if c < 0xC0 else 2 if c < 0xE0 else 3 if c < 0xF0 else 4
            return len(data) - i if need > i else len(data)
    return len(data)

class TextStream:
    """One row's text as its tokens arrive, decoded incrementally: each token is decoded after the
    few before it (tokenizers that join tokens by context, like SentencePiece's spaces, come out
    right), a split UTF-8 character at the end and any tail that could begin a stop string are held
    back, and stop strings spanning tokens are found by searching only the text that could hold a
    new match. Cost per token: constant, not the length of the row."""
    CONTEXT = 4  # tokens decoded again before each new one

    def __init__(self, tokenizer, stop_strings=(), stop_tokens=()):
        self.tok, self.stops, self.stop_tokens = tokenizer, tuple(stop_strings), set(stop_tokens)
        self.ids, self.raw, self.text, self.sent, self.searched = [], b'', '', 0, 0

    def push(self, token, last):
        """Add a new token -> (text delta, finish_reason or None). A stop token adds no text."""
        is_stop = token in self.stop_tokens
        last = last or is_stop
        if self.tok is None:
            return '', 'stop' if is_stop else 'length' if last else None
        if not is_stop:
            ctx = self.ids[-self.CONTEXT:]
            before, after = self.tok.decode_bytes(ctx), self.tok.decode_bytes(ctx + [token])
            self.raw += after[len(before):] if after.startswith(before) else \
                self.tok.decode_bytes([token])
            self.ids.append(token)
        n = len(self.raw) if last else _utf8_safe_len(self.raw)
        self.text, self.raw = self.text + self.raw[:n].decode('utf-8', errors='replace'), \
            self.raw[n:]
        text = self.text
        # a new match ends in the new text
        lo = max(0, self.searched - max(map(len, self.stops), default=0) + 1)
        cut = min([i for i in (text.find(s, lo) for s in self.stops) if i >= 0], default=-1)
        self.searched = len(text)
        hold = 0 if last or cut >= 0 else max((k for s in self.stops
                                               for k in range(1, min(len(s), len(text) + 1))
                                               if text.endswith(s[:k])), default=0)
        end = cut if cut >= 0 else len(text) - hold
        delta, self.sent = text[self.sent:end], max(self.sent, end)
        return delta, 'stop' if is_stop or cut >= 0 else 'length' if last else None
