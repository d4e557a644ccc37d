"""
The one decoding engine. Every token nanolab generates is chosen here: sample.generate and the CLI call it, serve.py
runs one per model in a thread, and evaluate.py and dpo.py decode through sample.generate.

    from engine import Engine, Settings
    engine = Engine(model, tokenizer)                 # one per model; engine.start() runs it in a thread of its own
    req = engine.submit([ids_a, ids_b], Settings(max_new_tokens=50, temperature=0.8, seed=7))
    for ev in req: print(ev.text_delta, end='')       # Events as tokens are chosen; req.cancel() frees its rows

Each step (Engine.step):
  1) cancelled requests leave: their KV-cache slots are free for this step
  2) admission: waiting prompts take free slots, the request with the fewest running rows first (ties: the one
     that came first), so one request of many prompts cannot shut a newcomer out; rows per request and prompt
     tokens per request are capped at submit (LimitError), so no request can hold the engine for long
  3) one forward pass: a new token for every decoding row, plus chunks of the prompts being prefilled, at most
     `prefill_chunk` prompt tokens a step, so a long prompt delays the other rows' next token by one chunk only
  4) rows whose context is now fed choose their next token (`choose`); beam groups rank their extensions
     (`Engine._beam_step`); events go to each request's queue; finished rows free their slots

The seeding rule. Sample i (0-based) of every prompt of a request with seed s draws from random.Random(s + i): one
uniform number per token, turned into a token by the inverse CDF of the row's processed distribution (draw). So a
row's text depends on its prompt, its settings and s + i only: never on the other rows of its request, on the rest
of the batch, or on n. Without a seed, a sampling request draws s from torch's global RNG at submit (torch.manual_seed
repeats it); greedy and beam requests leave that RNG alone, so decoding inside a training run cannot change it.

Decoding, each step: penalties -> temperature -> top_k -> top_p -> min_p -> draw. Reported logprobs are always those
of the RAW model distribution (log_softmax of the unprocessed logits), whatever the settings.
"""
import queue
import random
import sys
import threading
import traceback
from collections import deque
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from model import KVCache


class SettingsError(ValueError):
    """A bad decoding setting; `field` names it (serve.py answers 400 with it as the param)."""
    def __init__(self, field, message):
        super().__init__(message)
        self.field = field


class LimitError(ValueError):
    """A request over one of the engine's limits; `limit` names the Engine argument (and serve.py flag) that sets it."""
    def __init__(self, limit, message):
        super().__init__(message)
        self.limit = limit


@dataclass(frozen=True)
class Settings:
    """How to decode a request. check() validates it once, against the model's vocabulary and the tokenizer."""
    max_new_tokens: int = 100
    temperature: float = 1.0          # 0 = greedy
    top_k: int = 0                    # keep the k likeliest tokens; 0 = off
    top_p: float = 1.0                # nucleus; 1 = off
    min_p: float = 0.0                # drop p < min_p * p_max; 0 = off
    repetition_penalty: float = 1.0   # CTRL; 1 = off
    presence_penalty: float = 0.0     # OpenAI's, in [-2, 2]
    frequency_penalty: float = 0.0    # OpenAI's, in [-2, 2]
    num_beams: int = 1                # > 1 = beam search (temperature/top_k/top_p/min_p do not apply)
    length_penalty: float = 1.0       # beam score = sum logprob / length ** length_penalty
    num_samples: int = 1              # rows per prompt (beam search: the best num_samples beams)
    stop_tokens: tuple | None = None  # None = the tokenizer's end-of-text; () = never stop on a token
    stop_strings: tuple = ()
    seed: int | None = None           # the seeding rule above; None = drawn from torch's global RNG at submit
    logprobs: int = 0                 # the k likeliest (token, logprob) at every step; 0 = off
    prompt_logprobs: bool = False     # also score every prompt token (echo): a PromptScores event per prompt

    @property
    def sampler(self):
        """The settings that shape a row's next-token distribution (process_logits' keywords)."""
        return dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                    repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                    frequency_penalty=self.frequency_penalty)

    @property
    def slots(self):
        """KV-cache slots a prompt takes at once: its beams, or its samples (which share its prefill), or 1 to score."""
        return self.num_beams if self.num_beams > 1 else 1 if self.max_new_tokens == 0 else self.num_samples

    @property
    def penalized(self):
        return (self.repetition_penalty, self.presence_penalty, self.frequency_penalty) != (1.0, 0.0, 0.0)

    def check(self, vocab_size, tokenizer=None):
        """-> these settings with the defaults filled in; a bad value is a SettingsError naming the field and range."""
        V, s = vocab_size, self
        stops = (s.stop_strings,) if isinstance(s.stop_strings, str) else tuple(s.stop_strings)  # not per char
        for field, bad, why in [
                ('max_new_tokens', s.max_new_tokens < 0, 'must be >= 0'),
                ('temperature', not s.temperature >= 0, 'must be >= 0 (0 = greedy)'),
                ('top_k', s.top_k < 0, 'must be >= 0 (0 = off)'),
                ('top_p', not 0 < s.top_p <= 1, 'must be in (0, 1] (1 = off)'),
                ('min_p', not 0 <= s.min_p < 1, 'must be in [0, 1) (0 = off)'),
                ('repetition_penalty', not s.repetition_penalty > 0, 'must be > 0 (1 = off)'),
                ('presence_penalty', not -2 <= s.presence_penalty <= 2, "must be in [-2, 2] (as OpenAI's API)"),
                ('frequency_penalty', not -2 <= s.frequency_penalty <= 2, "must be in [-2, 2] (as OpenAI's API)"),
                ('num_beams', s.num_beams < 1, 'must be >= 1 (1 = no beam search)'),
                ('num_samples', s.num_samples < 1, 'must be >= 1'),
                ('num_samples', s.num_beams > 1 and s.num_samples > s.num_beams,
                 f'must be <= num_beams={s.num_beams} (beam search returns the best num_samples beams); raise num_beams'),
                ('logprobs', not 0 <= s.logprobs <= V, f'must be in [0, vocab_size={V}] (0 = off)'),
                ('prompt_logprobs', s.prompt_logprobs and s.num_beams > 1, 'cannot be combined with beam search'),
                ('stop_strings', any(not isinstance(x, str) or not x for x in stops), 'must be non-empty strings')]:
            if bad:
                raise SettingsError(field, f"{field}={getattr(s, field)!r} {why}")
        if stops and tokenizer is None:
            raise SettingsError('stop_strings', "stop_strings need a tokenizer to decode the text; pass tokenizer=")
        stop_tokens = s.stop_tokens
        if stop_tokens is None:  # default: stop at end-of-text; pass stop_tokens=() to generate through it
            stop_tokens = (tokenizer.eot,) if getattr(tokenizer, 'eot', None) is not None else ()
        return replace(s, stop_strings=stops, stop_tokens=tuple(stop_tokens))


@dataclass
class Event:
    """One new token of one row (sample_index: the sample, or the beam's rank once a beam search is done)."""
    prompt_index: int
    sample_index: int
    token: int | None              # None only in a final event without a token (max_new_tokens=0)
    text_delta: str                # text now safe to show: '' while a split UTF-8 char or a possible stop string waits
    logprob: float | None          # raw-distribution logprob of token
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: str | None      # 'stop' | 'length' on the row's last event, else None

@dataclass
class PromptScores:
    """Settings.prompt_logprobs: each prompt token's raw logprob given the tokens before it (the first: None)."""
    prompt_index: int
    token_logprobs: list
    top_logprobs: list

@dataclass
class BeamStep:
    """One step of a beam search: every hypothesis it keeps, as nodes {id, parent (node id, None = the prompt),
    step, token, logprob, cum_logprob (processed), score (length-normalized), finished}."""
    prompt_index: int
    step: int
    nodes: list[dict]

# -----------------------------------------------------------------------------
# logit processors: logits (..., V) float -> logits with the same shape, new tensors (inputs are not modified)

def apply_repetition_penalty(logits, seen, penalty):
    """CTRL (Keskar et al. 2019, eq. 1), as Hugging Face: a token already in the prompt or the output (seen: bool
    (..., V)) gets logit/penalty if its logit is positive, else logit*penalty, so it always becomes less likely."""
    if penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)

def apply_presence_frequency(logits, counts, presence, frequency):
    """OpenAI API: logit -= presence * (count > 0) + frequency * count, counts over generated tokens only."""
    if presence == 0.0 and frequency == 0.0:
        return logits
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts.to(logits.dtype)

def apply_temperature(logits, temperature):
    """temperature 0 means greedy, which choose's argmax handles; dividing by 0 would give inf/nan."""
    return logits if temperature in (0.0, 1.0) else logits / temperature

def top_k_filter(logits, k):
    """Keep the k largest logits (ties with the k-th are kept too, as HF does); k=0 = off."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float('-inf'))

def top_p_filter(logits, p):
    """Nucleus sampling (Holtzman et al. 2019): keep the smallest set of likeliest tokens whose mass is >= p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the strictly likelier tokens
    drop_sorted = before >= p          # subtle: the likeliest token has before=0 < p, so at least one survives
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float('-inf'))

def min_p_filter(logits, min_p):
    """min-p (Nguyen et al. 2024): keep tokens with p >= min_p * p_max, a cut that scales with the model's confidence."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float('-inf'))

def process_logits(logits, seen=None, counts=None, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                   repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0):
    """All processors in order. seen/counts are only needed for the penalties (see penalty_state)."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if counts is not None:
        logits = apply_presence_frequency(logits, counts, presence_penalty, frequency_penalty)
    if temperature == 0.0:
        return logits  # greedy: top_k/top_p/min_p all keep the argmax, so they cannot change it
    logits = apply_temperature(logits, temperature)
    return min_p_filter(top_p_filter(top_k_filter(logits, top_k), top_p), min_p)

def penalty_state(prompts, outputs, vocab_size, device, repetition_penalty, presence_penalty, frequency_penalty):
    """seen (B, V) bool over prompt+output for the repetition penalty, counts (B, V) over outputs for the OpenAI
    penalties; None where that penalty is off (it costs a (B, V) tensor per step)."""
    seen = counts = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool)
        for b, (p, o) in enumerate(zip(prompts, outputs)):
            seen[b, p + o] = True
        seen = seen.to(device)
    if presence_penalty != 0.0 or frequency_penalty != 0.0:
        counts = torch.zeros(len(outputs), vocab_size)
        for b, o in enumerate(outputs):
            counts[b].index_add_(0, torch.tensor(o, dtype=torch.long), torch.ones(len(o)))
        counts = counts.to(device)
    return seen, counts

def draw(probs, uniforms):
    """Inverse-CDF sampling: row b takes the first token whose cumulative probability exceeds uniforms[b] (in [0, 1))
    of its total, so one number per row decides each draw, whatever shares the batch. The sums are float64: over a
    50k vocabulary, float32 rounding would shift the rarest tokens' odds."""
    cdf = probs.double().cumsum(-1)  # (B, V)
    u = torch.tensor(uniforms, dtype=cdf.dtype, device=cdf.device)[:, None] * cdf[:, -1:]
    t = torch.searchsorted(cdf, u, right=True)[:, 0].clamp(max=probs.size(-1) - 1)
    return torch.where(probs.gather(1, t[:, None])[:, 0] > 0, t, probs.argmax(-1))  # subtle: u*total may round up

def choose(logits, rows):
    """The one token choice, for a batch of rows of any requests: logits (B, V) raw -> (tokens list, raw logp (B, V)).
    Rows with equal settings are processed together (each processor works row by row, so a row gets the same
    distribution alone or in company); greedy rows take the argmax; the others draw with their own rng."""
    logp = F.log_softmax(logits, dim=-1)
    nxt = logits.argmax(-1)
    groups = {}
    for b, row in enumerate(rows):
        s = row.req.settings
        if s.temperature > 0 or s.penalized:
            groups.setdefault(tuple(s.sampler.items()), []).append(b)
    for key, idx in groups.items():
        s, group = rows[idx[0]].req.settings, [rows[b] for b in idx]
        seen, counts = penalty_state([r.tokens[:r.n_prompt] for r in group], [r.tokens[r.n_prompt:] for r in group],
                                     logits.size(-1), logits.device, s.repetition_penalty, s.presence_penalty,
                                     s.frequency_penalty) if s.penalized else (None, None)
        x = process_logits(logits[idx], seen, counts, **s.sampler)
        nxt[idx] = x.argmax(-1) if s.temperature == 0 else draw(x.softmax(-1), [r.rng.random() for r in group])
    return nxt.tolist(), logp

def top_logprobs(logp, k):
    """The k likeliest (token, logprob) of each row, or None per row when k=0."""
    if not k:
        return [None] * logp.size(0)
    tv, ti = logp.topk(k, dim=-1)
    return [list(zip(i, v)) for i, v in zip(ti.tolist(), tv.tolist())]

# -----------------------------------------------------------------------------
# text: token ids -> text deltas that never split a UTF-8 character or show part of a stop string

def _utf8_safe_len(data):
    """Length of the longest prefix of bytes `data` that does not end inside a multi-byte UTF-8 character."""
    for i in range(1, min(4, len(data)) + 1):
        c = data[-i]
        if c & 0xC0 != 0x80:  # a lead byte (or ASCII), not a continuation byte 10xxxxxx
            need = 1 if c < 0xC0 else 2 if c < 0xE0 else 3 if c < 0xF0 else 4
            return len(data) - i if need > i else len(data)
    return len(data)

class TextStream:
    """One row's text as its tokens arrive, decoded incrementally: each token is decoded after the few before it
    (tokenizers that join tokens by context, like SentencePiece's spaces, come out right), a split UTF-8 character
    at the end and any tail that could begin a stop string are held back, and stop strings spanning tokens are found
    by searching only the text that could hold a new match. Cost per token: constant, not the length of the row."""
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
            self.raw += after[len(before):] if after.startswith(before) else self.tok.decode_bytes([token])
            self.ids.append(token)
        n = len(self.raw) if last else _utf8_safe_len(self.raw)
        self.text, self.raw = self.text + self.raw[:n].decode('utf-8', errors='replace'), self.raw[n:]
        text = self.text
        lo = max(0, self.searched - max(map(len, self.stops), default=0) + 1)  # a new match ends in the new text
        cut = min([i for i in (text.find(s, lo) for s in self.stops) if i >= 0], default=-1)
        self.searched = len(text)
        hold = 0 if last or cut >= 0 else max((k for s in self.stops for k in range(1, min(len(s), len(text) + 1))
                                               if text.endswith(s[:k])), default=0)
        end = cut if cut >= 0 else len(text) - hold
        delta, self.sent = text[self.sent:end], max(self.sent, end)
        return delta, 'stop' if is_stop or cut >= 0 else 'length' if last else None

# -----------------------------------------------------------------------------
# requests, rows and beam groups

def prompt_lists(prompts):
    """One prompt (token ids) or a batch of them (lists, or a 2-D tensor) -> list[list[int]], none empty."""
    prompts = prompts.tolist() if isinstance(prompts, torch.Tensor) else prompts
    if len(prompts) == 0:
        raise ValueError("prompts is empty; pass a list of token ids, or a list of such lists")
    prompts = [prompts] if not isinstance(prompts[0], (list, tuple)) else prompts  # one prompt, or a batch
    prompts = [[int(t) for t in p] for p in prompts]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt; give at least one token (e.g. the tokenizer's eot)")
    return prompts

class Request:
    """What Engine.submit returns. Iterate it for its events (in a thread of your own when the engine runs in one;
    otherwise iterating runs the engine's steps); cancel() frees its rows within one step."""
    def __init__(self, engine, prompts, settings):
        self.engine, self.prompts, self.settings = engine, prompts, settings
        s = settings
        self.waiting = deque(range(len(prompts)))  # prompts not yet admitted
        self.running = 0                            # slots it holds
        self.outputs = len(prompts) * s.num_samples  # final events to come
        self.queue, self.cancelled = queue.SimpleQueue(), False

    def cancel(self):
        self.cancelled = True
        self.engine.wake.set()

    def get(self, timeout=None):
        """The next event (or an exception from the engine), None after timeout seconds without one."""
        while self.engine.thread is None and self.queue.empty():
            self.engine.step()
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def __iter__(self):
        left = self.outputs
        while left:
            ev = self.get()
            if isinstance(ev, Exception):
                raise ev
            left -= isinstance(ev, Event) and ev.finish_reason is not None
            yield ev

class Row:
    """One sequence in a slot of the batch: sample `sample_index` of prompt `prompt_index`, or one beam of a group.
    tokens holds the prompt and everything generated; tokens[start:] is the context (start > 0 once it slid)."""
    def __init__(self, req, prompt_index, sample_index, tokens, slot, rng=None, group=None):
        s = req.settings
        self.req, self.prompt_index, self.sample_index, self.slot, self.rng, self.group = \
            req, prompt_index, sample_index, slot, rng, group
        self.tokens, self.n_prompt, self.start = list(tokens), len(req.prompts[prompt_index]), 0
        self.parent, self.children, self.scores, self.admitted = None, [], None, 0
        self.text = TextStream(req.engine.tok, s.stop_strings, s.stop_tokens) if group is None else None
        self.score, self.lps, self.tops, self.node = 0.0, [], [], None  # beam search only

class Beams:
    """Beam search over one prompt in `slots` (num_beams of them): the live hypotheses are rows, ranked by processed
    logprob; finished ones wait in `finished` for the end."""
    def __init__(self, req, prompt_index, slots):
        self.req, self.prompt_index, self.slots = req, prompt_index, slots
        self.rows, self.finished, self.step, self.next_id = [], [], 0, 0

    def norm(self, score, n):
        return score / n ** self.req.settings.length_penalty

# -----------------------------------------------------------------------------
# the engine

class Engine:
    """Continuous batching on one KV cache of `max_batch` slots (see the module docstring). Limits (None = none):
    max_rows: prompts x n (x num_beams) per request; max_prompt_tokens: prompt tokens per request; prefill_chunk:
    prompt tokens prefilled per step. use_cache=False recomputes every row's whole context each step (the slow
    reference path, nanoGPT's crop to the last block_size tokens)."""
    def __init__(self, model, tokenizer=None, *, max_batch=16, max_rows=None, max_prompt_tokens=None,
                 prefill_chunk=512, use_cache=True):
        self.model, self.tok, self.max_batch, self.use_cache = model, tokenizer, max_batch, use_cache
        self.max_rows, self.max_prompt_tokens, self.prefill_chunk = max_rows, max_prompt_tokens, prefill_chunk
        p = next(model.parameters())
        self.device, self.dtype, self.block_size = p.device, p.dtype, model.config.block_size
        # subtle: the model's vocabulary may be padded past the tokenizer's (GPT-2: 50304 > 50257, for speed); those
        # ids decode to nothing, so the engine cuts them from the logits before anything else, raw logprobs included
        self.V = min(model.config.vocab_size, getattr(tokenizer, 'vocab_size', None) or model.config.vocab_size)
        self.slots = [None] * max_batch  # the Row in each slot (a Beams group: reserved for its beams), None = free
        self.cache, self.inbox, self.waiting, self.calls = None, deque(), deque(), deque()
        self.thread, self.wake, self.stopped = None, threading.Event(), False
        self.stats = dict(steps=0, peak_batch=0, rows_finished=0, rows_cancelled=0, prefill_tokens=0, chunks=0)

    def submit(self, prompts, settings=Settings()):
        """Queue prompts (token id lists, or one list) for decoding -> Request. Checked here, so a caller can
        refuse bad input before streaming: SettingsError or ValueError for bad values, LimitError over a limit."""
        prompts = prompt_lists(prompts)
        if any(not 0 <= t < self.V for p in prompts for t in p):
            raise ValueError(f"prompt token ids must be in [0, vocab_size={self.V})")
        s = settings.check(self.V, self.tok)
        if s.prompt_logprobs and not self.use_cache:
            raise SettingsError('prompt_logprobs', "prompt_logprobs needs the KV cache (use_cache=True)")
        rows = len(prompts) * max(s.num_samples, s.num_beams)
        for limit, value, cap, what in [('max_rows', rows, self.max_rows, 'rows (prompts x n x num_beams)'),
                                        ('max_prompt_tokens', sum(map(len, prompts)), self.max_prompt_tokens,
                                         'prompt tokens'),
                                        ('max_batch', s.slots, self.max_batch, 'rows decoded together (n or num_beams)')]:
            if cap is not None and value > cap:
                raise LimitError(limit, f"the request asks for {value} {what}, over this engine's limit of {cap} "
                                 f"({limit}); send fewer or shorter prompts, or a smaller n or num_beams")
        limit = self.block_size - 1  # prompts longer than the window keep their last tokens, leaving room for one new
        if any(len(p) > limit for p in prompts):
            print(f"warning: prompt longer than block_size-1={limit} tokens; keeping its last {limit}", file=sys.stderr)
            prompts = [p[-limit:] for p in prompts]
        if s.seed is None and s.temperature > 0 and s.num_beams == 1:  # greedy leaves torch's RNG alone (training)
            s = replace(s, seed=int(torch.randint(0, 2 ** 62, ())))
        req = Request(self, prompts, s)
        if s.max_new_tokens == 0 and not s.prompt_logprobs:  # nothing to compute
            for i in range(len(prompts) * s.num_samples):
                req.queue.put(Event(i // s.num_samples, i % s.num_samples, None, '', None, None, 'length'))
            req.waiting.clear()
        else:
            self.inbox.append(req)
            self.wake.set()
        return req

    # -- a thread of its own (serve.py) ---------------------------------------------------------------------------

    def start(self, idle_release=60.0):
        """Run steps in a daemon thread while there is work; the KV cache is let go after idle_release idle seconds."""
        self.thread = threading.Thread(target=self._run, args=(idle_release,), daemon=True, name='engine')
        self.thread.start()
        return self

    def stop(self):
        self.stopped = True
        self.wake.set()

    def call(self, fn):
        """Run fn() between two steps, on the engine's thread (the model is only ever used by one), -> its result."""
        if self.thread is None:
            return fn()
        done = queue.SimpleQueue()
        self.calls.append((fn, done))
        self.wake.set()
        ok, value = done.get()
        if not ok:
            raise value
        return value

    def busy(self):
        return bool(self.inbox or self.waiting or any(r is not None for r in self.slots))

    def _run(self, idle_release):
        while not self.stopped:
            self.wake.clear()
            while self.calls:
                fn, done = self.calls.popleft()
                try:
                    done.put((True, fn()))
                except Exception as e:
                    done.put((False, e))
            if not self.busy():
                if not self.wake.wait(idle_release) and not self.busy():
                    self.cache = None  # idle: give the memory back
                continue
            try:
                self.step()
            except Exception as e:  # a bug must not hang the clients: fail what is running, keep serving
                traceback.print_exc()
                self._fail(e)

    def _fail(self, error):
        reqs = {id(r.req): r.req for r in self.slots if r is not None}
        reqs.update({id(q): q for q in list(self.waiting) + list(self.inbox)})
        for req in reqs.values():
            req.queue.put(error)
            req.cancelled = True
        self.slots, self.cache = [None] * self.max_batch, None
        self.waiting.clear()
        self.inbox.clear()

    # -- one step ---------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self):
        """One step (the module docstring) -> whether there was anything to do."""
        self._leave()
        self._admit()
        rows = [r for r in self.slots if isinstance(r, Row) and r.parent is None]
        if not rows:
            return bool(self.waiting)
        ready, logits = self._forward(rows) if self.use_cache else self._forward_whole(rows)
        self.stats['steps'] += 1
        sampling = [i for i, r in enumerate(ready) if r.group is None]
        if sampling:
            self._sample([ready[i] for i in sampling], logits[sampling])
        groups = {}
        for i, r in enumerate(ready):
            if r.group is not None:
                groups.setdefault(id(r.group), (r.group, []))[1].append(i)
        for g, idx in groups.values():
            self._beam_step(g, [ready[i] for i in idx], logits[idx])
        return True

    def _leave(self):
        """1) cancelled requests' rows leave, freeing their slots; their waiting prompts are dropped."""
        for i, r in enumerate(self.slots):
            if r is not None and r.req.cancelled:
                self._free(i, finished=False)
        self.waiting = deque(q for q in self.waiting if not q.cancelled)

    def _free(self, slot, finished):
        r = self.slots[slot]
        r.req.running -= 1
        self.slots[slot] = None
        if self.cache is not None:
            self.cache.lengths[slot] = 0
        self.stats['rows_finished' if finished else 'rows_cancelled'] += isinstance(r, Row)

    def _admit(self):
        """2) free slots go to waiting prompts, the request with the fewest running rows first."""
        while self.inbox:
            self.waiting.append(self.inbox.popleft())
        free = [i for i, r in enumerate(self.slots) if r is None]
        while free and self.waiting:
            req = min(self.waiting, key=lambda q: q.running)  # ties: the first in line
            if req.settings.slots > len(free):
                break  # its turn: the slots wait for it, rather than let smaller requests jump ahead forever
            slots, free = free[:req.settings.slots], free[req.settings.slots:]
            self._place(req, req.waiting.popleft(), slots)
            if not req.waiting:
                self.waiting.remove(req)
        self.stats['peak_batch'] = max(self.stats['peak_batch'], sum(r is not None for r in self.slots))

    def _place(self, req, pi, slots):
        s, prompt = req.settings, req.prompts[pi]
        if self.cache is None and self.use_cache:
            self.cache = KVCache(self.model.config, self.max_batch, min(self.block_size, 64), self.device, self.dtype)
        req.running += len(slots)
        if s.num_beams > 1:
            g = Beams(req, pi, slots)
            g.rows = [Row(req, pi, 0, prompt, slots[0], group=g)]  # one beam to start: K copies would tie
            for x in slots:
                self.slots[x] = g
            self.slots[slots[0]] = g.rows[0]
            rows = g.rows
        else:
            rows = [Row(req, pi, i, prompt, x, rng=random.Random((s.seed or 0) + i)) for i, x in enumerate(slots)]
            for r in rows:
                self.slots[r.slot] = r
            if self.use_cache:  # the other samples copy the first one's prompt keys/values instead of prefilling
                rows[0].children = rows[1:]
                for r in rows[1:]:
                    r.parent = rows[0]
        rows[0].admitted = self.stats['steps']
        if s.prompt_logprobs:
            rows[0].scores = ([None], [None])

    def _forward(self, rows):
        """3) one forward for the decoding rows (one token each) and prompt chunks (within the prefill budget)
        -> (rows whose next token is due, their raw logits (R, V))."""
        c, bs = self.cache, self.block_size
        decode, prefill = [], []
        for r in rows:
            if len(r.tokens) - r.start > bs:  # the window is full: restart it from the last half of the context
                r.start, c.lengths[r.slot] = len(r.tokens) - bs // 2, 0
            fresh = len(r.tokens) == r.n_prompt  # a new row's prompt goes in as a chunk, even a 1-token one
            (decode if len(r.tokens) - r.start - c.lengths[r.slot] == 1 and not fresh else prefill).append(r)
        chunks, budget = [], self.prefill_chunk
        for r in sorted(prefill, key=lambda r: r.admitted):  # first come, first prefilled
            take = min(len(r.tokens) - r.start - c.lengths[r.slot], budget)
            if take > 0:
                chunks.append((r, take))
                budget -= take
        hi = max((r.slot for r in decode), default=-1) + 1
        ids, real = [0] * hi, [False] * hi
        for r in decode:
            ids[r.slot], real[r.slot] = r.tokens[-1], True
        want, due, scoring, done, off = [r.slot for r in decode], [(r, i) for i, r in enumerate(decode)], [], [], hi
        for r, T in chunks:
            a = r.start + c.lengths[r.slot]
            ids += r.tokens[a:a + T]
            n = min(T, r.n_prompt - 1 - a)
            if r.scores is not None and n > 0:  # echo: logits at every prompt position, to score the token after it
                scoring.append((r, len(want), n, r.tokens[a + 1:a + 1 + n]))
                want += range(off, off + n)
            if a + T == len(r.tokens):  # the whole context is in: the next token is due
                done.append(r)
                if r.req.settings.max_new_tokens > 0:
                    due += [(x, len(want)) for x in [r] + r.children]
                    want.append(off + T - 1)
            off += T
        self.stats['prefill_tokens'] += off - hi
        self.stats['chunks'] += len(chunks)
        c.schedule(decode=hi, real=real, chunks=[(r.slot, T) for r, T in chunks])
        logits = self.model(torch.tensor([ids], device=self.device), cache=c,
                            logits_at=torch.tensor(want, dtype=torch.long, device=self.device))[0][0, :, :self.V].float()
        for r, i, n, targets in scoring:  # the prompt's scores, kept as they come: no (T, V) logits are held
            logp = F.log_softmax(logits[i:i + n], dim=-1)
            r.scores[0].extend(logp.gather(1, torch.tensor(targets, device=logp.device)[:, None])[:, 0].tolist())
            r.scores[1].extend(top_logprobs(logp, r.req.settings.logprobs))
        for r in done:
            s = r.req.settings
            if r.scores is not None and r.start == 0:
                r.req.queue.put(PromptScores(r.prompt_index, *r.scores))
                r.scores = None
            if s.max_new_tokens == 0:  # scoring only: done, for every sample of the prompt
                for i in range(s.num_samples):
                    r.req.queue.put(Event(r.prompt_index, i, None, '', None, None, 'length'))
                self._free(r.slot, finished=True)
        for r, _ in due:
            if r.parent is not None:  # the first sample's prompt is in: the others copy its keys and values
                c.copy([r.parent.slot], [r.slot])
                r.parent = None
        return [r for r, _ in due], logits[[i for _, i in due]]

    def _forward_whole(self, rows):
        """3) without the cache: every row's context again, cropped to the last block_size tokens (the reference)."""
        out = []
        for r in rows:
            ctx = torch.tensor([r.tokens[-self.block_size:]], device=self.device)
            out.append(self.model(ctx, logits_from=ctx.size(1) - 1)[0][0, -1, :self.V].float())
        return rows, torch.stack(out)

    def _sample(self, rows, logits):
        """4) sampling rows choose, report and maybe finish."""
        tokens, logp = choose(logits, rows)
        lps = logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
        for b, (r, t) in enumerate(zip(rows, tokens)):
            s = r.req.settings
            r.tokens.append(t)
            delta, reason = r.text.push(t, len(r.tokens) - r.n_prompt == s.max_new_tokens)
            top = top_logprobs(logp[b:b + 1], s.logprobs)[0]
            r.req.queue.put(Event(r.prompt_index, r.sample_index, t, delta, lps[b], top, reason))
            if reason is not None:
                self._free(r.slot, finished=True)

    def _beam_step(self, g, rows, logits):
        """4) one step of a beam search, as Hugging Face's with early_stopping=False: the 2K best extensions of the
        live beams by total processed logprob; one that ends in a stop token (or string) is a finished hypothesis
        if it ranks in the top K; the first K others live on. The search ends when K hypotheses are finished and no
        live beam scores better, or at max_new_tokens. score = sum logprob / len**length_penalty, len counting the
        new tokens, the stop token included. Penalties apply; temperature/top_k/top_p/min_p do not."""
        s, K, V = g.req.settings, g.req.settings.num_beams, self.V
        order = {id(r): i for i, r in enumerate(rows)}
        rows = sorted(rows, key=lambda r: g.rows.index(r))
        logits = logits[[order[id(r)] for r in rows]]
        logp_raw = F.log_softmax(logits, dim=-1)  # (nb, V)
        seen, counts = penalty_state([r.tokens[:r.n_prompt] for r in rows], [r.tokens[r.n_prompt:] for r in rows], V,
                                     logits.device, s.repetition_penalty, s.presence_penalty,
                                     s.frequency_penalty) if s.penalized else (None, None)
        logp = F.log_softmax(process_logits(logits, seen, counts, **{**s.sampler, 'temperature': 0.0}), dim=-1)
        cand = torch.tensor([r.score for r in rows], device=logp.device)[:, None] + logp  # (nb, V)
        vals, flat = cand.view(-1).topk(min(2 * K, cand.numel()))
        tops = top_logprobs(logp_raw, s.logprobs)
        new, nodes = [], []
        for rank, (v, f) in enumerate(zip(vals.tolist(), flat.tolist())):
            src, t = divmod(f, V)
            p = rows[src]
            out = p.tokens[p.n_prompt:] + [t]
            node = dict(id=g.next_id, parent=p.node, step=g.step, token=t, logprob=logp_raw[src, t].item(),
                        cum_logprob=v, score=g.norm(v, len(out)), finished=False)
            hyp = (p, t, v, node, p.lps + [node['logprob']], p.tops + [tops[src]])
            if t in s.stop_tokens or any(x in self.tok.decode(out) for x in s.stop_strings):
                if rank < K:  # HF: a stop token outside the top K would crowd out better running beams
                    node['finished'] = True
                    g.finished.append(hyp)
                else:
                    continue
            elif len(new) < K:
                new.append(hyp)
            else:
                continue
            nodes.append(node)
            g.next_id += 1
        g.req.queue.put(BeamStep(g.prompt_index, g.step, nodes))
        g.step += 1
        score = lambda h: g.norm(h[2], len(h[0].tokens) - h[0].n_prompt + 1)
        best = sorted(g.finished, key=score, reverse=True)[:K]
        if not new or g.step == s.max_new_tokens or (len(best) >= K and max(map(score, new)) <= score(best[-1])):
            return self._end_beams(g, sorted(g.finished + new, key=score, reverse=True)[:s.num_samples])
        # the survivors take the group's slots: each copies its parent's keys and values (the reorder)
        live = []
        for x, (p, t, v, node, lps, tops_) in zip(g.slots, new):
            r = Row(g.req, g.prompt_index, 0, p.tokens + [t], x, group=g)
            r.start, r.score, r.node, r.lps, r.tops = p.start, v, node['id'], lps, tops_
            live.append((p.slot, r))
        if self.cache is not None:
            self.cache.copy([src for src, _ in live], [r.slot for _, r in live])
        for x in g.slots:
            self.slots[x] = g
        for _, r in live:
            self.slots[r.slot] = r
        g.rows = [r for _, r in live]

    def _end_beams(self, g, best):
        """The best num_samples hypotheses, as one event per token (sample_index = rank); the group's slots free."""
        for rank, (p, t, v, node, lps, tops) in enumerate(best):
            text = TextStream(self.tok, g.req.settings.stop_strings, g.req.settings.stop_tokens)
            out = p.tokens[p.n_prompt:] + [t]
            for j, tok in enumerate(out):
                delta, reason = text.push(tok, j == len(out) - 1)
                g.req.queue.put(Event(g.prompt_index, rank, tok, delta, lps[j], tops[j], reason))
        for x in g.slots:
            self._free(x, finished=True)
