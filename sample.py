"""
Sample from a trained model; and `generate`, the one decoding function that serve.py, evaluate.py and dpo.py call.

    python sample.py --init_from=out-shakespeare-char --device=cpu --start="ROMEO:"     # CPU: streams text as it comes
    python sample.py --init_from=out-shakespeare-char --device=cuda --start=FILE:prompt.txt   # one GPU (bf16 auto)
    python sample.py --init_from=gpt2 --start="The meaning of life" --compare=greedy,beam,top_p,min_p   # hub: online
    python sample.py --init_from=out-shakespeare-char --show_probs=True --max_new_tokens=20
    python sample.py --init_from=out-sft --chat=True                                    # multi-turn chat REPL

Decoding, each step: penalties -> temperature -> top_k -> top_p -> min_p -> sample. Each stage is a small function
below that works on logits of shape (..., vocab), so serve.py applies them per request. Reported logprobs are
always those of the RAW model distribution (log_softmax of the unprocessed logits), whatever the settings, so they
can be compared across settings and used as the model's likelihood (evaluate.py, dpo.py).

Context: the model's block_size is a hard limit.
  - a prompt longer than block_size-1 tokens is left-truncated to its last block_size-1 tokens (one warning on stderr)
  - generation that fills the window goes on in a sliding window: with the KV cache, the cache is rebuilt from the
    last block_size//2 tokens (one prefill per block_size//2 new tokens); without it (use_cache=False, the slow
    reference path) the context is cropped to the last block_size tokens every step, as nanoGPT does.
Stopping: a row stops at any of `stop_tokens` (default: the tokenizer's eot, if it has one; pass stop_tokens=() to
never stop on a token) or when its new text contains any of `stop_strings`; the token ids include the stop token,
the text excludes the stop token and the stop string (as OpenAI's API does).
"""
import math
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Iterator

import torch
import torch.nn.functional as F

from model import KVCache

@dataclass
class Completion:
    tokens: list[int]              # new tokens, including the stop token that ended the row, if any
    text: str | None               # new text, cut before any stop string (None without a tokenizer)
    finish_reason: str             # 'stop' (stop token or string) | 'length' (max_new_tokens reached)
    logprob: float                 # sum of token_logprobs
    token_logprobs: list[float]    # log p(token) under the raw model distribution
    top_logprobs: list[list[tuple[int, float]]] | None  # logprobs=k>0: the k likeliest (token, logprob) per step
    prompt_index: int
    sample_index: int

@dataclass
class Event:
    """One new token of one row, as generate_stream yields it."""
    prompt_index: int
    sample_index: int
    token: int | None              # None only in a final event without a token (max_new_tokens=0)
    text_delta: str                # text now safe to show: '' while a split UTF-8 char or a possible stop string waits
    logprob: float | None          # raw-distribution logprob of token
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: str | None      # 'stop' | 'length' on the row's last event, else None

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
    """temperature 0 means greedy, which the argmax in sample_next handles; dividing by 0 would give inf/nan."""
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

def sample_next(logits, temperature, generator=None):
    """(..., V) processed logits -> (...) token ids: argmax when temperature is 0, else a draw from softmax."""
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    return torch.multinomial(probs.reshape(-1, probs.size(-1)), 1, generator=generator).view(probs.shape[:-1])

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
    """One row's text: holds back a split UTF-8 character at the end and any tail that could begin a stop string,
    finds stop strings that span token boundaries, and says when the row is finished."""
    def __init__(self, o):
        self.tok, self.stops, self.stop_tokens, self.ids, self.sent = o.tokenizer, o.stop_strings, o.stop_tokens, [], 0

    def push(self, token, last):
        """Add a new token -> (text delta, finish_reason or None). A stop token adds no text."""
        is_stop = token in self.stop_tokens
        last, hit, text = last or is_stop, False, ''
        if self.tok is not None:
            self.ids += [] if is_stop else [token]
            data = self.tok.decode_bytes(self.ids)  # subtle: the whole row each time; a token may be half a char
            text = data[:len(data) if last else _utf8_safe_len(data)].decode('utf-8', errors='replace')
            cut = min([i for i in (text.find(s) for s in self.stops) if i >= 0], default=-1)
            hit = cut >= 0
            hold = 0 if last or hit else max((k for s in self.stops for k in range(1, min(len(s), len(text) + 1))
                                              if text.endswith(s[:k])), default=0)
            text = text[:cut] if hit else text[:len(text) - hold]
        delta, self.sent = text[self.sent:], max(self.sent, len(text))
        return delta, 'stop' if is_stop or hit else 'length' if last else None

# -----------------------------------------------------------------------------
# forward passes: whole contexts (prefill, or every step without cache) and one token per row with the cache

def _prefill(model, seqs, room, use_cache):
    """Run left-padded contexts through the model -> (last-position logits (B, V), KV cache with `room` free slots,
    or None without cache). Without cache, a throwaway cache still carries the padding mask when lengths differ."""
    p = next(model.parameters())
    T = max(len(s) for s in seqs)
    idx = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        idx[b, T - len(s):] = torch.tensor(s)
    pad = torch.tensor([T - len(s) for s in seqs], device=p.device)
    cache = None
    if use_cache or bool(pad.any()):
        max_len = min(T + room, model.config.block_size) if use_cache else T
        cache = KVCache(model.config, len(seqs), max_len, p.device, p.dtype, pad=pad)
    logits, _ = model(idx.to(p.device), cache=cache, last_only=True)
    return logits[:, -1].float(), cache if use_cache else None

def _advance(model, cache, ctxs, room, use_cache):
    """Logits for the next token of each context (ctxs: full token lists ending in the token just chosen)."""
    bs = model.config.block_size
    if not use_cache:  # the reference path: recompute the last block_size tokens (nanoGPT's crop)
        return _prefill(model, [c[-bs:] for c in ctxs], 0, False)
    if cache.length >= cache.max_len:  # the window is full: restart the cache from the last half of each row
        return _prefill(model, [c[-(bs // 2):] for c in ctxs], room, True)
    idx = torch.tensor([[c[-1]] for c in ctxs], device=cache.pad.device)  # (B, 1)
    logits, _ = model(idx, cache=cache)
    return logits[:, -1].float(), cache

# -----------------------------------------------------------------------------
# generation

def _check(model, prompts, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
           frequency_penalty, num_beams, num_samples, stop_strings, tokenizer, logprobs):
    """Every bad argument is a ValueError naming the parameter and its valid range -> (list[list[int]], vocab size)."""
    def bad(cond, msg):
        if cond:
            raise ValueError(msg)
    prompts = prompts.tolist() if isinstance(prompts, torch.Tensor) else prompts
    bad(len(prompts) == 0, "prompts is empty; pass a list of token ids, or a list of such lists")
    prompts = [prompts] if not isinstance(prompts[0], (list, tuple)) else prompts  # one prompt, or a batch
    prompts = [[int(t) for t in p] for p in prompts]
    bad(any(len(p) == 0 for p in prompts), "empty prompt; give at least one token (e.g. the tokenizer's eot)")
    # subtle: the model's vocabulary may be padded past the tokenizer's (GPT-2: 50304 > 50257, for speed); those
    # ids decode to nothing, so generation cuts them from the logits before anything else, raw logprobs included
    V = min(model.config.vocab_size, getattr(tokenizer, 'vocab_size', None) or model.config.vocab_size)
    bad(any(not 0 <= t < V for p in prompts for t in p), f"prompt token ids must be in [0, vocab_size={V})")
    bad(max_new_tokens < 0, f"max_new_tokens={max_new_tokens} must be >= 0")
    bad(not temperature >= 0, f"temperature={temperature} must be >= 0 (0 = greedy)")
    bad(top_k < 0, f"top_k={top_k} must be >= 0 (0 = off)")
    bad(not 0 < top_p <= 1, f"top_p={top_p} must be in (0, 1] (1 = off)")
    bad(not 0 <= min_p < 1, f"min_p={min_p} must be in [0, 1) (0 = off)")
    bad(not repetition_penalty > 0, f"repetition_penalty={repetition_penalty} must be > 0 (1 = off)")
    bad(not -2 <= presence_penalty <= 2, f"presence_penalty={presence_penalty} must be in [-2, 2] (as OpenAI's API)")
    bad(not -2 <= frequency_penalty <= 2, f"frequency_penalty={frequency_penalty} must be in [-2, 2] (as OpenAI's API)")
    bad(num_beams < 1, f"num_beams={num_beams} must be >= 1 (1 = no beam search)")
    bad(num_samples < 1, f"num_samples={num_samples} must be >= 1")
    bad(num_beams > 1 and num_samples > num_beams, f"num_samples={num_samples} must be <= num_beams={num_beams} "
        "(beam search returns the best num_samples beams); raise num_beams")
    bad(not 0 <= logprobs <= V, f"logprobs={logprobs} must be in [0, vocab_size={V}] (0 = off)")
    bad(stop_strings and tokenizer is None, "stop_strings need a tokenizer to decode the text; pass tokenizer=")
    bad(any(not s for s in stop_strings), "stop_strings must be non-empty strings")
    return prompts, V

def generate_stream(model, prompts, max_new_tokens=100, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                    repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, num_beams=1,
                    length_penalty=1.0, num_samples=1, stop_tokens=None, stop_strings=(), tokenizer=None, seed=None,
                    use_cache=True, logprobs=0) -> Iterator[Event]:
    """Events, one per new token of each row, as soon as it is chosen (beam search: all at the end).
    prompts: list[int] or list[list[int]] of different lengths, decoded together in one left-padded batch;
    each prompt is repeated num_samples times (prompt_index, sample_index say which row an event belongs to).
    seed: a private torch.Generator, so the same seed gives the same text whatever the global RNG.
    Arguments are checked here, at the call, so a server can answer 400 before it starts streaming; decoding runs
    as the result is iterated. The model should be in eval mode (load_model does that)."""
    stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)  # subtle: not per char
    prompts, V = _check(model, prompts, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                        presence_penalty, frequency_penalty, num_beams, num_samples, stop_strings, tokenizer, logprobs)
    if stop_tokens is None:  # default: stop at end-of-text; pass stop_tokens=() to generate through it
        stop_tokens = [tokenizer.eot] if getattr(tokenizer, 'eot', None) is not None else []
    stop_tokens = set(stop_tokens)
    # prompts longer than the window keep their last block_size-1 tokens, leaving room for one new token
    limit = model.config.block_size - 1
    if any(len(p) > limit for p in prompts):
        print(f"warning: prompt longer than block_size-1={limit} tokens; keeping its last {limit}", file=sys.stderr)
        prompts = [p[-limit:] for p in prompts]
    pen = dict(repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
               frequency_penalty=frequency_penalty)
    o = SimpleNamespace(**locals())  # every setting by name, for the decoding loops
    if max_new_tokens == 0:
        return iter([Event(i, s, None, '', None, None, 'length') for i in range(len(prompts)) for s in range(num_samples)])
    return _beam_search(model, o) if num_beams > 1 else _sample(model, o)

@torch.inference_mode()
def _sample(model, o):
    # 1) one row per (prompt, sample), prefilled together; `active` maps batch rows to the rows still going
    rows = [(i, s) for i in range(len(o.prompts)) for s in range(o.num_samples)]
    outs = [[] for _ in rows]
    texts = [TextStream(o) for _ in rows]
    active = list(range(len(rows)))
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(o.seed) if o.seed is not None else None
    logits, cache = _prefill(model, [o.prompts[i] for i, _ in rows], o.max_new_tokens, o.use_cache)
    for step in range(o.max_new_tokens):
        # 2) choose the next token of every active row
        logits = logits[:, :o.V]
        logp = F.log_softmax(logits, dim=-1)  # (B, V) the raw distribution, for the reported logprobs
        seen, counts = penalty_state([o.prompts[rows[r][0]] for r in active], [outs[r] for r in active], o.V,
                                     device, **o.pen)
        x = process_logits(logits, seen, counts, temperature=o.temperature, top_k=o.top_k, top_p=o.top_p,
                           min_p=o.min_p, **o.pen)
        nxt = sample_next(x, o.temperature, gen)  # (B,)
        lps = logp.gather(1, nxt[:, None])[:, 0].tolist()
        tops = top_logprobs(logp, o.logprobs)
        # 3) report it, and see which rows are done
        keep = []
        for b, (r, t) in enumerate(zip(active, nxt.tolist())):
            outs[r].append(t)
            delta, reason = texts[r].push(t, step == o.max_new_tokens - 1)
            yield Event(*rows[r], t, delta, lps[b], tops[b], reason)
            if reason is None:
                keep.append(b)
        if not keep:
            return
        # 4) drop finished rows from the batch (their compute would be wasted), then one forward for the rest
        if len(keep) < len(active):
            active = [active[b] for b in keep]
            if cache is not None:
                cache.select(torch.tensor(keep, device=device))
        ctxs = [o.prompts[rows[r][0]] + outs[r] for r in active]
        logits, cache = _advance(model, cache, ctxs, o.max_new_tokens - step - 1, o.use_cache)

def top_logprobs(logp, k):
    """The k likeliest (token, logprob) of each row, or None per row when k=0."""
    if not k:
        return [None] * logp.size(0)
    tv, ti = logp.topk(k, dim=-1)
    return [list(zip(i, v)) for i, v in zip(ti.tolist(), tv.tolist())]

@torch.inference_mode()
def _beam_search(model, o):
    """Beam search, one prompt at a time, its K beams sharing one KV cache (reordered with cache.select each step).
    As HF's with early_stopping=False: each step the 2K best extensions are ranked; one that ends in a stop token
    (or stop string) is a finished hypothesis if it ranks in the top K; the search ends when K hypotheses are
    finished and no running beam scores better, or at max_new_tokens. score = sum logprob / len**length_penalty,
    len counting the new tokens, the stop token included. Penalties apply; temperature/top_k/top_p/min_p do not."""
    K = o.num_beams
    def norm(beam):
        return beam['score'] / len(beam['tokens']) ** o.length_penalty
    def stopped(tokens):
        return tokens[-1] in o.stop_tokens or any(s in o.tokenizer.decode(tokens) for s in o.stop_strings)
    for pi, prompt in enumerate(o.prompts):
        beams, finished = [dict(tokens=[], score=0.0, lps=[], tops=[])], []  # one beam to start: K copies would tie
        logits, cache = _prefill(model, [prompt], o.max_new_tokens, o.use_cache)
        for step in range(o.max_new_tokens):
            # 1) extend every beam by every token; rank the 2K best by total processed logprob
            logits = logits[:, :o.V]
            logp_raw = F.log_softmax(logits, dim=-1)  # (nb, V)
            seen, counts = penalty_state([prompt] * len(beams), [b['tokens'] for b in beams], o.V, logits.device,
                                         **o.pen)
            logp = F.log_softmax(process_logits(logits, seen, counts, temperature=0.0, **o.pen), dim=-1)
            cand = torch.tensor([b['score'] for b in beams], device=logp.device)[:, None] + logp  # (nb, V)
            vals, flat = cand.view(-1).topk(min(2 * K, cand.numel()))
            tops = top_logprobs(logp_raw, o.logprobs)
            # 2) the first K that do not stop run on; stopped ones in the top K are finished
            new = []
            for rank, (v, f) in enumerate(zip(vals.tolist(), flat.tolist())):
                src, t = divmod(f, o.V)
                b = dict(tokens=beams[src]['tokens'] + [t], score=v, src=src,
                         lps=beams[src]['lps'] + [logp_raw[src, t].item()], tops=beams[src]['tops'] + [tops[src]])
                if stopped(b['tokens']):
                    if rank < K:  # HF: a stop token outside the top K would crowd out better running beams
                        finished.append(b)
                elif len(new) < K:
                    new.append(b)
            beams = new
            best = sorted(finished, key=norm, reverse=True)[:K]
            if len(best) >= K and max(map(norm, beams), default=float('-inf')) <= norm(best[-1]):
                beams = []  # done: no running beam beats the K finished ones (HF's early_stopping=False heuristic)
            if not beams:
                break
            if step < o.max_new_tokens - 1:  # 3) reorder the cache to the surviving beams, one forward for all
                if cache is not None:
                    cache.select(torch.tensor([b['src'] for b in beams], device=logits.device))
                logits, cache = _advance(model, cache, [prompt + b['tokens'] for b in beams],
                                         o.max_new_tokens - step - 1, o.use_cache)
        # 4) the best num_samples of finished and still running beams, as events
        for si, b in enumerate(sorted(finished + beams, key=norm, reverse=True)[:o.num_samples]):
            text = TextStream(o)
            for j, t in enumerate(b['tokens']):
                delta, reason = text.push(t, j == len(b['tokens']) - 1)
                yield Event(pi, si, t, delta, b['lps'][j], b['tops'][j], reason)

def generate(model, prompts, max_new_tokens=100, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
             repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, num_beams=1, length_penalty=1.0,
             num_samples=1, stop_tokens=None, stop_strings=(), tokenizer=None, seed=None, use_cache=True,
             logprobs=0) -> list[Completion]:
    """One Completion per (prompt, sample), ordered by prompt then sample (see the module docstring).
    It collects generate_stream's events, so there is exactly one decoding loop."""
    events, done = generate_stream(**locals()), {}  # every argument, as given
    for ev in events:
        key = (ev.prompt_index, ev.sample_index)
        c = done.setdefault(key, Completion([], '', '', 0.0, [], [] if logprobs else None, *key))
        if ev.token is not None:
            c.tokens.append(ev.token)
            c.token_logprobs.append(ev.logprob)
            if logprobs:
                c.top_logprobs.append(ev.top_logprobs)
        c.text += ev.text_delta
        c.finish_reason = ev.finish_reason or c.finish_reason
    for c in done.values():
        c.logprob, c.text = sum(c.token_logprobs), c.text if tokenizer is not None else None
    return [done[k] for k in sorted(done)]

# -----------------------------------------------------------------------------
# the command line (nanoGPT's sample.py names)
init_from = 'out-shakespeare-char'  # model source: out_dir, ckpt.pt, Hugging Face dir, or hub name like 'gpt2'
start = "\n"                  # prompt text, or FILE:path to read it from a file; '' = start from the eot token
num_samples = 10              # samples to draw, one after another, with seeds seed, seed+1, ...
max_new_tokens = 500          # new tokens per sample
temperature = 0.8             # 0 = greedy; < 1 sharper, > 1 more random
top_k = 200                   # keep the k likeliest tokens; 0 = off
top_p = 1.0                   # nucleus: keep the smallest set with mass >= top_p; 1.0 = off
min_p = 0.0                   # drop tokens with p < min_p * p_max; 0 = off
repetition_penalty = 1.0      # CTRL penalty on tokens already seen (prompt too); 1.0 = off, 1.1-1.3 typical
presence_penalty = 0.0        # OpenAI: subtracted from every token already generated; [-2, 2]
frequency_penalty = 0.0       # OpenAI: subtracted once per occurrence in the output; [-2, 2]
num_beams = 1                 # > 1 = beam search (deterministic: temperature/top_k/top_p/min_p are ignored)
length_penalty = 1.0          # beam score = sum logprob / length**length_penalty; > 1 favours longer
stop = ''                     # one stop string ('' = none; eot always stops). A newline: --stop="'\n'"
seed = 1337                   # random seed of the sampler (a private generator)
device = 'auto'               # auto | cpu | cuda | cuda:N | mps
dtype = 'auto'                # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
compile = False               # torch.compile the model (PyTorch 2.0); pays off only for long generations
use_cache = True              # KV cache; False recomputes the whole context every step (slow reference path)
chat = False                  # multi-turn chat REPL on stdin (a chat-tuned model); /exit or Ctrl-D quits
show_probs = False            # print each new token with its probability and the top-5 alternatives
compare = ''                  # comma list of PRESETS run side by side on the same prompt and seed, e.g. greedy,beam,top_p
# -----------------------------------------------------------------------------

# --compare presets: each replaces the sampling flags; max_new_tokens, stop and seed still come from the flags
PRESETS = {
    'greedy': dict(temperature=0.0),
    'beam': dict(temperature=0.0, num_beams=4),
    'temperature': dict(temperature=0.8),
    'top_k': dict(temperature=1.0, top_k=40),                       # GPT-2's samples used k=40 (Radford et al. 2019)
    'top_p': dict(temperature=1.0, top_p=0.9),                      # Holtzman et al. 2019
    'min_p': dict(temperature=1.0, min_p=0.1),                      # Nguyen et al. 2024
    'repetition': dict(temperature=0.0, repetition_penalty=1.3),    # greedy + CTRL penalty (Keskar et al. 2019)
}

def _prompt_ids(tok):
    text = start
    if text.startswith('FILE:'):
        try:
            text = open(text[5:], encoding='utf-8').read()
        except OSError as e:
            raise ValueError(f"cannot read the prompt file {start[5:]} ({e.strerror}); check --start=FILE:path") from None
    ids = [tok.eot] if text == '' and tok.eot is not None else tok.encode(text)  # '': unconditional, as GPT-2
    if not ids:
        raise ValueError("the prompt encodes to no tokens; give --start=TEXT")
    return ids

def _chat(model, tok, opts):
    """A REPL: the whole history is rendered with the chat template each turn; the reply stops at end-of-turn."""
    messages = []
    opts = dict(opts, stop_tokens=set(tok.chat_stop_tokens), stop_strings=tok.stop_strings + opts['stop_strings'])
    print('chat: type a message; /exit or Ctrl-D quits', file=sys.stderr)
    while True:
        try:
            line = input('> ')
        except EOFError:
            break
        if line.strip() == '/exit':
            break
        messages.append({'role': 'user', 'content': line})
        ids, _ = tok.render_chat(messages, add_generation_prompt=True)
        reply = ''
        for ev in generate_stream(model, ids, max_new_tokens, seed=seed + len(messages), **opts):
            print(ev.text_delta, end='', flush=True)
            reply += ev.text_delta
        print()
        messages.append({'role': 'assistant', 'content': reply})

def main():
    from configurator import configure
    from model import load_model, resolve_device, resolve_dtype
    configure(globals(), choices={'dtype': ('auto', 'float32', 'bfloat16', 'float16'), 'device': None})
    presets = [n.strip() for n in compare.split(',') if n.strip()]
    if any(n not in PRESETS for n in presets):
        raise ValueError(f"unknown --compare preset(s) {[n for n in presets if n not in PRESETS]}; "
                         f"choose from {','.join(PRESETS)}")
    dev = resolve_device(device)
    model, tok, _ = load_model(init_from, dev, resolve_dtype(dtype, dev))
    if tok is None:
        raise ValueError(f"{init_from} comes without a tokenizer, so the prompt cannot be encoded; use a source with "
                         "tokenizer files (a nanolab out_dir, or a Hugging Face dir with tokenizer.json)")
    if compile:
        model = torch.compile(model)
    opts = {k: globals()[k] for k in ('temperature', 'top_k', 'top_p', 'min_p', 'repetition_penalty', 'presence_penalty',
                                      'frequency_penalty', 'num_beams', 'length_penalty', 'use_cache')}
    opts.update(stop_strings=[stop] if stop else [], tokenizer=tok)
    if chat:
        return _chat(model, tok, opts)
    ids = _prompt_ids(tok)
    for name in presets:  # --compare: one labelled block per strategy, same prompt, same seed
        neutral = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, num_beams=1, repetition_penalty=1.0,
                       presence_penalty=0.0, frequency_penalty=0.0)
        c = generate(model, ids, max_new_tokens, seed=seed, **{**opts, **neutral, **PRESETS[name]})[0]
        print(f"==== {name} ({', '.join(f'{k}={v}' for k, v in PRESETS[name].items())}) | mean logprob "
              f"{c.logprob / max(1, len(c.tokens)):.3f}, finish: {c.finish_reason} ====\n{tok.decode(ids)}{c.text}\n")
    for k in range(0 if presets else 1 if num_beams > 1 else num_samples):  # beam search is deterministic: once
        print('' if show_probs else tok.decode(ids), end='', flush=True)
        for ev in generate_stream(model, ids, max_new_tokens, seed=seed + k, logprobs=5 if show_probs else 0, **opts):
            if show_probs and ev.token is not None:  # the token, its probability, and the 5 likeliest
                alts = '  '.join(f'{tok.decode([t])!r} {math.exp(lp):.3f}' for t, lp in ev.top_logprobs)
                print(f'{tok.decode([ev.token])!r:>14} p={math.exp(ev.logprob):.3f}   top-5: {alts}', flush=True)
            elif not show_probs:
                print(ev.text_delta, end='', flush=True)
        print('\n---------------')

if __name__ == '__main__':
    try:
        main()
    except ValueError as e:  # bad input: one line naming the problem and the fix, exit 1, no traceback
        raise SystemExit(f'error: {e}')
