"""
The one decoding engine. Every token nanolab generates is chosen here: generate (generation.py) and
sample.py call it, the server runs one per model on its engine thread, and evaluation and the
trainers decode through generate.

    from nanolab.decoding import Settings
    from nanolab.engine import Engine
    engine = Engine(model, tokenizer)            # one per model; engine_thread.start() steps them
    req = engine.submit([ids_a, ids_b], Settings(max_new_tokens=50, temperature=0.8, seed=7))
    for ev in req: print(ev.text_delta, end='')  # Events as tokens come; req.cancel() frees rows

Each step (Engine.step):
  1) cancelled requests leave: their KV-cache slots are free for this step
  2) admission: waiting prompts take free slots, the client holding the fewest first (a client:
     the requests one sender submitted; by default each request is its own), then its request
     holding the fewest (ties: the one that came first), so neither one request of many prompts
     nor one client of many requests can shut a newcomer out; a newcomer that finds every slot
     taken preempts a sampling row of the client holding the most (it re-prefills later, losing
     nothing else); beam searches hold at most max_beam_slots together; rows and prompt tokens
     per request are capped at submit
  3) one forward pass: a new token for every decoding row, plus chunks of the prompts being
     prefilled, at most `prefill_chunk` prompt tokens a step, so a long prompt delays the other
     rows' next token by one chunk only
  4) rows whose context is now fed choose their next token (`choose`); beam groups rank their
     extensions (`Engine._beam_step`); events go to each request's queue; finished rows free their
     slots

The token choice itself (Settings, the logit processors, choose, the seeding rule, TextStream) is
decoding.py's, the KV cache kv_cache.py's, and what a request yields (Request and its events)
events.py's.
"""
import random
import sys
import threading
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import replace

import torch

from nanolab import grammar
from nanolab.decoding import (Settings, SettingsError, TextStream, choose, extend_beams,
                              prompt_lists, top_logprobs)
from nanolab.events import BeamStep, Event, PromptScores, Request
from nanolab.kv_cache import KVCache


def compiled(model):
    """model torch.compile'd for decoding (sample.py and serve.py --compile, bench.py): the Engine
    runs its decode steps compiled and prefills eagerly. subtle: torch.compile keeps its compiled
    steps per code object, GPT.forward's, which every model in the process shares, and past
    recompile_limit (8) quietly runs eagerly; a model takes up to four (Engine.warm_up), so a
    server of several models outgrew it (measured: bench.py's fifth compiled model decoded at its
    eager speed). Raised to 64."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(model)


class NumericalError(RuntimeError):
    """A request whose model output cannot be decoded (NaN or inf logits); serve.py answers 500
    naming it."""

class LimitError(ValueError):
    """A request over one of the engine's limits; `limit` names the Engine argument (and serve.py
    flag) that sets it."""
    def __init__(self, limit, message):
        super().__init__(message)
        self.limit = limit


# -----------------------------------------------------------------------------
# rows and beam groups

class Row:
    """One sequence in a slot of the batch: sample `sample_index` of prompt `prompt_index`, or one
    beam of a group. tokens holds the prompt and everything generated; tokens[start:] is the
    context (start > 0 once it slid)."""
    def __init__(self, req, prompt_index, sample_index, tokens, slot, rng=None, group=None):
        s = req.settings
        self.req, self.prompt_index, self.sample_index, self.slot, self.rng, self.group = \
            req, prompt_index, sample_index, slot, rng, group
        self.tokens, self.n_prompt, self.start = list(tokens), len(req.prompts[prompt_index]), 0
        self.parent, self.children, self.scores, self.admitted = None, [], None, 0
        self.text = TextStream(req.engine.tok, s.stop_strings, s.stop_tokens) \
            if group is None else None
        # a grammar's state (json_schema, grammar): a beam's is its parent's, forked
        self.constraint = grammar.Constraint(grammar.vocabulary(req.engine.tok, req.engine.V),
                                             s.compiled_grammar, s.stop_tokens,
                                             prefix=s.grammar_prefix) \
            if s.compiled_grammar is not None and (group is None or not group.rows) else None
        self.score, self.lps, self.tops, self.node = 0.0, [], [], None  # beam search only

class Beams:
    """Beam search over one prompt in `slots` (num_beams of them): the live hypotheses are rows,
    ranked by processed logprob; finished ones wait in `finished` for the end."""
    def __init__(self, req, prompt_index, slots):
        self.req, self.prompt_index, self.slots = req, prompt_index, slots
        self.rows, self.finished, self.step, self.next_id = [], [], 0, 0  # rows: the live beams

    def norm(self, score, n):
        return score / n ** self.req.settings.length_penalty

# -----------------------------------------------------------------------------
# the engine

class Engine:
    """Continuous batching on one KV cache of `max_batch` slots (see the module docstring). Limits
    (None = none): max_rows: prompts x n (x num_beams) per request; max_prompt_tokens: prompt
    tokens per request; prefill_chunk: prompt tokens prefilled per step; max_beam_slots: slots all
    beam searches may hold (None = max_batch). use_cache=False recomputes every row's whole context
    each step (the slow reference path, nanoGPT's crop to the last block_size tokens)."""
    def __init__(self, model, tokenizer=None, *, max_batch=16, max_rows=None,
                 max_prompt_tokens=None, prefill_chunk=512, max_beam_slots=None, use_cache=True):
        # a torch.compile'd model decodes compiled and prefills eagerly: prompt chunks come in
        # every length, and a compiled forward would compile again for each; decode steps keep
        # their shapes (KVCache static)
        self.model, self.decoder = getattr(model, '_orig_mod', model), model
        self.tok, self.max_batch, self.use_cache = tokenizer, max_batch, use_cache
        self.max_beam_slots = max_batch if max_beam_slots is None else max_beam_slots
        self.max_rows, self.max_prompt_tokens, self.prefill_chunk = max_rows, max_prompt_tokens, \
            prefill_chunk
        p = next(model.parameters())
        self.device, self.dtype, self.block_size = p.device, p.dtype, model.config.block_size
        # subtle: the model's vocabulary may be padded past the tokenizer's (GPT-2: 50304 > 50257,
        # for speed); those ids decode to nothing, so the engine cuts them from the logits before
        # anything else, raw logprobs included
        self.V = min(model.config.vocab_size, getattr(tokenizer, 'vocab_size', None)
                     or model.config.vocab_size)
        # the Row in each slot (a Beams group: reserved for its beams), None = free
        self.slots = [None] * max_batch
        self.cache, self.inbox, self.waiting, self.calls = None, deque(), deque(), deque()
        self.thread, self.wake, self.stopped, self.pool, self.lock = None, threading.Event(), \
            False, None, threading.Lock()
        self.stats = dict(steps=0, peak_batch=0, rows_finished=0, rows_cancelled=0,
                          rows_preempted=0, prefill_tokens=0, chunks=0)

    def submit(self, prompts, settings=Settings(), client=None):
        """Queue prompts (token id lists, or one list) for decoding -> Request. Checked here, so a
        caller can refuse bad input before streaming: SettingsError or ValueError for bad values,
        LimitError over a limit. client: who sent it (the server's: address and key), whose
        requests share one turn at admission; None: a client of its own."""
        prompts = prompt_lists(prompts)
        if any(not 0 <= t < self.V for p in prompts for t in p):
            raise ValueError(f"prompt token ids must be in [0, vocab_size={self.V})")
        s = settings.check(self.V, self.tok)
        if s.prompt_logprobs and not self.use_cache:
            raise SettingsError('prompt_logprobs', "prompt_logprobs needs the "
                                                   "KV cache (use_cache=True)")
        rows = len(prompts) * max(s.num_samples, s.num_beams)
        for limit, value, cap, what in [('max_rows', rows, self.max_rows,
                                         'rows (prompts x n x num_beams)'),
                                        ('max_prompt_tokens', sum(map(len, prompts)),
                                         self.max_prompt_tokens, 'prompt tokens'),
                                        ('max_batch', s.slots, self.max_batch,
                                         'rows decoded together (n or num_beams)'),
                                        ('max_beam_slots', s.slots if s.num_beams > 1 else 0,
                                         self.max_beam_slots,
                                         'beams (rows that beam searches may hold together)')]:
            if cap is not None and value > cap:
                raise LimitError(limit,
                                 f"the request asks for {value} {what}, over this engine's "
                                 f"limit of {cap} ({limit}); send fewer or shorter prompts, "
                                 "or a smaller n or num_beams")
        # prompts longer than the window keep their last tokens, leaving room for one new
        limit = self.block_size - 1
        if any(len(p) > limit for p in prompts):
            print(f"warning: prompt longer than block_size-1={limit} "
                  f"tokens; keeping its last {limit}", file=sys.stderr)
            prompts = [p[-limit:] for p in prompts]
        # greedy leaves torch's RNG alone (training)
        if s.seed is None and s.temperature > 0 and s.num_beams == 1:
            s = replace(s, seed=int(torch.randint(0, 2 ** 62, ())))
        req = Request(self, prompts, s)
        if client is not None:  # else the request is a client of its own (Request)
            req.client = client
        if s.max_new_tokens == 0 and not s.prompt_logprobs:  # nothing to compute
            for i in range(len(prompts) * s.num_samples):
                req.queue.put(Event(i // s.num_samples, i % s.num_samples, None, '', None, None,
                                    'length'))
            req.waiting.clear()
        else:
            self.inbox.append(req)
            self.wake.set()
        return req

    # -- on the engine thread (the server's): engine_thread.start steps the engines there ---------------

    def stop(self):
        """Take no more requests (a caller that stops sending them, as server.py's unload); the
        engine thread finishes the ones it has, then lets the engine go (its KV cache too)."""
        self.stopped = True
        self.wake.set()

    def call(self, fn):
        """Run fn() between two steps, on the engine's thread (the model is only ever used by one),
        -> its result."""
        # subtle: not between _release's check and its last _run_calls, or fn would never run
        with self.lock:
            queued = self.thread is not None
            if queued:
                done = Future()
                self.calls.append((fn, done))
                self.wake.set()
        return done.result() if queued else fn()

    def _release(self):
        """The engine thread lets a stopped, idle engine go: later calls run on their caller's
        thread."""
        with self.lock:
            self.thread, self.cache = None, None
        self._run_calls()  # any that came in before the lock

    def warm_up(self):
        """A compiled decoder (a torch.compile'd model) compiles its decode steps now, not under a
        client's request: for one row and for several (then any number: torch.compile makes the
        size dynamic after a second one), with the KV storage at its first size and grown (dynamic
        the same way); four compilations in all, 10-40 s on a CPU. Nothing for an eager model."""
        if self.decoder is self.model:
            return
        n = max(1, min(70, self.block_size - 3))  # past the storage's first 64 tokens
        for length, rows in ((8, 1), (8, 2), (n, 2), (n, 1)):
            for _ in self.submit([[0] * min(length, n)] * min(rows, self.max_batch),
                                 Settings(max_new_tokens=2, temperature=0.0)):
                pass

    def busy(self):
        return bool(self.inbox or self.waiting or any(r is not None for r in self.slots))

    def _run_calls(self):
        while self.calls:
            fn, done = self.calls.popleft()
            try:
                done.set_result(fn())
            except Exception as e:
                done.set_exception(e)

    def _fail(self, error):
        reqs = {id(r.req): r.req for r in self.slots if r is not None}
        reqs.update({id(q): q for q in list(self.waiting) + list(self.inbox)})
        for req in reqs.values():
            req.queue.put(error)
            req.cancelled = True
        self.slots, self.cache = [None] * self.max_batch, None
        self.waiting.clear()
        self.inbox.clear()

    # -- one step ---------------------------------------------------------------------------------

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
            try:
                self._beam_step(g, [ready[i] for i in idx], logits[idx])
            except Exception as e:  # this search fails; the other rows of the batch go on
                self._fail_request(g.req, f'its beam search failed ({type(e).__name__}: {e})')
        return True

    def _leave(self):
        """1) cancelled requests' rows leave, freeing their slots; their waiting prompts are
        dropped."""
        for i, r in enumerate(self.slots):
            if r is not None and r.req.cancelled:
                self._free(i, 'rows_cancelled')
        self.waiting = deque(q for q in self.waiting if not q.cancelled)

    def _free(self, slot, why):
        """Slot `slot` is free again; why: the stats key that counts it (rows_finished, _cancelled,
        _preempted)."""
        r = self.slots[slot]
        r.req.running -= 1
        self.slots[slot] = None
        if self.cache is not None:
            self.cache.lengths[slot] = 0
        self.stats[why] += isinstance(r, Row)

    def _admit(self):
        """2) free slots go to waiting work: the client holding the fewest slots first (a client's
        requests share its turn; by default each request is a client of its own), then its request
        holding the fewest. A request with none that finds no free slot takes them from the client
        holding the most, which may be its own (_preempt). Beam searches together hold at most max_beam_slots (serve.py:
        half the batch), so the rest can always be freed."""
        while self.inbox:
            self.waiting.append(self.inbox.popleft())
        free = [i for i, r in enumerate(self.slots) if r is None]
        held = Counter(r.req.client for r in self.slots if r is not None)
        while self.waiting:
            beams = sum(isinstance(r, Beams) or isinstance(r, Row) and r.group is not None
                        for r in self.slots)
            # stable: ties keep their order
            req = next((q for q in sorted(self.waiting, key=lambda q: (held[q.client], q.running))
                        if q.resume or q.settings.num_beams == 1
                        or beams + q.settings.slots <= self.max_beam_slots), None)
            if req is None:
                break
            need = 1 if req.resume else req.settings.slots
            if need > len(free) and req.running == 0:
                free += self._preempt(need - len(free), req, held)
            if need > len(free):
                # its turn: the slots wait, rather than let smaller requests jump ahead forever
                break
            slots, free, held[req.client] = free[:need], free[need:], held[req.client] + need
            if req.resume:
                self._resume(req.resume.popleft(), slots[0])
            else:
                self._place(req, req.waiting.popleft(), slots)
            if not req.waiting and not req.resume:
                self.waiting.remove(req)
        self.stats['peak_batch'] = max(self.stats['peak_batch'],
                                       sum(r is not None for r in self.slots))

    def _preempt(self, k, req, held):
        """Up to k slots for req, which holds none, from the client holding the most (held:
        slots by client), its request holding the most: that request's latest sampling rows go
        back to its queue with everything but their keys and values, which they prefill again when
        their turn comes (their logits then agree with an uninterrupted run to float rounding).
        Never a request's last row, nor a beam (a group steps together), nor a row mid-fork or
        mid-score. -> the freed slots."""
        freed = []
        while len(freed) < k:
            victims = [r for r in self.slots if isinstance(r, Row) and r.group is None
                       and r.parent is None and not r.children and r.scores is None
                       and r.req is not req and r.req.running > 1]
            if not victims:
                break
            top = max((held[v.req.client], v.req.running) for v in victims)
            r = max((v for v in victims if (held[v.req.client], v.req.running) == top),
                    key=lambda v: v.admitted)
            held[r.req.client] -= 1
            freed.append(r.slot)
            self._free(r.slot, 'rows_preempted')
            r.slot = None
            r.req.resume.append(r)
            if r.req not in self.waiting:
                self.waiting.append(r.req)
        return freed

    def _resume(self, r, slot):
        r.slot, r.admitted, self.slots[slot] = slot, self.stats['steps'], r
        r.req.running += 1

    def _place(self, req, pi, slots):
        s, prompt = req.settings, req.prompts[pi]
        if self.cache is None and self.use_cache:
            self.cache = KVCache(self.model.config, self.max_batch, min(self.block_size, 64),
                                 self.device, self.dtype, static=self.decoder is not self.model)
        req.running += len(slots)
        if s.num_beams > 1:
            g = Beams(req, pi, slots)
            # one beam to start: K copies would tie
            g.rows = [Row(req, pi, 0, prompt, slots[0], group=g)]
            for x in slots:
                self.slots[x] = g
            self.slots[slots[0]] = g.rows[0]
            rows = g.rows
        else:
            rows = [Row(req, pi, i, prompt, x, rng=random.Random((s.seed or 0) + i))
                    for i, x in enumerate(slots)]
            for r in rows:
                self.slots[r.slot] = r
            # the other samples copy the first one's prompt keys/values instead of prefilling
            if self.use_cache:
                rows[0].children = rows[1:]
                for r in rows[1:]:
                    r.parent = rows[0]
        rows[0].admitted = self.stats['steps']
        if s.prompt_logprobs:
            rows[0].scores = ([None], [None])

    def _forward(self, rows):
        """3) one forward for the decoding rows (one token each) and prompt chunks (within the
        prefill budget) -> (rows whose next token is due, their raw logits (R, V))."""
        c, bs = self.cache, self.block_size
        decode, prefill = [], []
        for r in rows:
            # the window is full: restart it from the last half of the context
            if len(r.tokens) - r.start > bs:
                r.start, c.lengths[r.slot] = len(r.tokens) - bs // 2, 0
            # a new row's prompt goes in as a chunk, even a 1-token one
            fresh = len(r.tokens) == r.n_prompt
            (decode if len(r.tokens) - r.start - c.lengths[r.slot] == 1 and not fresh
             else prefill).append(r)
        chunks, budget = [], self.prefill_chunk
        for r in sorted(prefill, key=lambda r: r.admitted):  # first come, first prefilled
            take = min(len(r.tokens) - r.start - c.lengths[r.slot], budget)
            if take > 0:
                chunks.append((r, take))
                budget -= take
        hi = max((r.slot for r in decode), default=-1) + 1
        if hi and not chunks and self.decoder is not self.model:
            # a compiled step: the rows come in powers of two (the others throwaway), so clients
            # coming and going meet a handful of compiled shapes, not one per batch size
            hi = min(self.max_batch, 1 << (hi - 1).bit_length())
        ids, real = [0] * hi, [False] * hi
        for r in decode:
            ids[r.slot], real[r.slot] = r.tokens[-1], True
        want, due, scoring, done, off = [r.slot for r in decode], \
            [(r, i) for i, r in enumerate(decode)], [], [], hi
        for r, T in chunks:
            a = r.start + c.lengths[r.slot]
            ids += r.tokens[a:a + T]
            n = min(T, r.n_prompt - 1 - a)
            # echo: logits at every prompt position, to score the token after it
            if r.scores is not None and n > 0:
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
        step = c.schedule(decode=hi, real=real, chunks=[(r.slot, T) for r, T in chunks])
        logits = (self.model if chunks else self.decoder)(
            torch.tensor([ids], device=self.device), step=step, logits_at=torch.tensor(
                want, dtype=torch.long, device=self.device))[0][0, :, :self.V].float()
        # the prompt's scores, kept as they come: no (T, V) logits are held
        for r, i, n, targets in scoring:
            lg = logits[i:i + n]
            lse = torch.logsumexp(lg, dim=-1)
            r.scores[0].extend((lg.gather(1, torch.tensor(targets, device=lg.device)[:, None])
                                [:, 0] - lse).tolist())
            r.scores[1].extend(top_logprobs(lg, r.req.settings.logprobs, lse))
        for r in done:
            s = r.req.settings
            if r.scores is not None and r.start == 0:
                r.req.queue.put(PromptScores(r.prompt_index, *r.scores))
                r.scores = None
            if s.max_new_tokens == 0:  # scoring only: done, for every sample of the prompt
                for i in range(s.num_samples):
                    r.req.queue.put(Event(r.prompt_index, i, None, '', None, None, 'length'))
                self._free(r.slot, 'rows_finished')
        for r, _ in due:
            # the first sample's prompt is in: the others copy its keys and values
            if r.parent is not None:
                c.copy([r.parent.slot], [r.slot])
                r.parent.children, r.parent = [], None
        return [r for r, _ in due], logits[[i for _, i in due]]

    def _forward_whole(self, rows):
        """3) without the cache: every row's context again, cropped to the last block_size tokens
        (the reference)."""
        out = []
        for r in rows:
            ctx = torch.tensor([r.tokens[-self.block_size:]], device=self.device)
            out.append(self.model(ctx, logits_at=slice(ctx.size(1) - 1, None))
                       [0][0, -1, :self.V].float())
        return rows, torch.stack(out)

    def _sample(self, rows, logits):
        """4) sampling rows choose, report and maybe finish. A row whose token cannot be chosen
        (logits that are not finite, a distribution its settings left empty, an error while choosing
        or reporting it) fails its own request (NumericalError), and only it: the others in the
        batch go on."""
        tokens, lps, lse, broken, errors = choose(logits, rows)
        # one transfer from the device per step: tokens, their logprobs, the broken flags, and the
        # top-k alternatives of the rows that asked for them (the largest k of the batch, cut per
        # row below)
        k = max(r.req.settings.logprobs for r in rows)
        parts = [tokens.double(), lps.double(), broken.double()]
        if k:
            tv, ti = logits.topk(k, dim=-1)
            parts += [ti.double().flatten(), (tv - lse[:, None]).double().flatten()]
        host = torch.cat(parts).tolist()
        B = len(rows)
        toks, lps, bad = [int(x) for x in host[:B]], host[B:2 * B], host[2 * B:3 * B]
        for b, r in enumerate(rows):
            if b in errors and not r.req.cancelled:
                self._fail_request(r.req, f'choosing its next token failed ({errors[b]})')
            elif bad[b] and not r.req.cancelled:
                self._fail_request(r.req, "the model's next-token distribution for this request is "
                                   "not finite (NaN or inf logits), so no token can be drawn: an "
                                   "overflow in half precision, damaged weights, or a setting so "
                                   "extreme it leaves no token; try dtype=float32 or bfloat16")
        for b, (r, t, lp) in enumerate(zip(rows, toks, lps)):
            if r.req.cancelled:
                continue
            s = r.req.settings
            try:
                r.tokens.append(t)
                # a grammar's text ends where the grammar does: a stop, its held-back tail sent
                done = r.constraint is not None and r.constraint.advance(t)
                delta, reason = r.text.push(t, len(r.tokens) - r.n_prompt == s.max_new_tokens
                                            or done)
                reason = 'stop' if done else reason
                top = None
                if s.logprobs:  # row b's ids at 3B + bk, their logprobs B*k further on
                    at = 3 * B + b * k
                    top = list(zip((int(i) for i in host[at:at + s.logprobs]),
                                   host[at + B * k:at + B * k + s.logprobs]))
                # under a grammar: what it allowed at this step (the page draws it)
                allowed = r.constraint.report(top, logits[b], lse[b]) \
                    if r.constraint is not None else (None, None, None)
            except Exception as e:  # e.g. a token its tokenizer cannot decode: only this request
                self._fail_request(r.req, f'reporting its token {t} failed ({type(e).__name__}: '
                                   f'{e})')
                continue
            r.req.queue.put(Event(r.prompt_index, r.sample_index, t, delta, lp, top, reason,
                                  *allowed))
            if reason is not None:
                self._free(r.slot, 'rows_finished')

    def _fail_request(self, req, why):
        """req alone fails (a NumericalError in its stream, which the server answers as a 500 for it
        only); its rows leave at the next step (_leave)."""
        req.queue.put(NumericalError(why))
        req.cancelled = True

    def _beam_step(self, g, rows, logits):
        """4) one step of a beam search, as Hugging Face's with early_stopping=False: the 2K best
        extensions of the live beams by total processed logprob; one that ends in a stop token (or
        string) is a finished hypothesis if it ranks in the top K; the first K others live on. The
        search ends when K hypotheses are finished and no live beam scores better, or at
        max_new_tokens. score = sum logprob / len**length_penalty, len counting the new tokens, the
        stop token included. Penalties apply; temperature/top_k/top_p/min_p do not."""
        s, K = g.req.settings, g.req.settings.num_beams
        order = {id(r): i for i, r in enumerate(rows)}
        rows = sorted(rows, key=lambda r: g.rows.index(r))
        ext, tops = extend_beams(logits[[order[id(r)] for r in rows]], rows, 2 * K)
        new, nodes = [], []
        for rank, (src, t, v, lp) in enumerate(ext):
            p = rows[src]
            out = p.tokens[p.n_prompt:] + [t]
            node = dict(id=g.next_id, parent=p.node, step=g.step, token=t, logprob=lp,
                        cum_logprob=v, score=g.norm(v, len(out)), finished=False)
            hyp = (p, t, v, node, p.lps + [node['logprob']], p.tops + [tops[src]], None)
            if p.constraint is not None:  # the child's grammar state: its parent's, and t
                hyp = hyp[:-1] + (p.constraint.fork(),)
                ended = hyp[-1].advance(t)
            else:
                ended = False
            if ended or t in s.stop_tokens or any(x in self.tok.decode(out)
                                                  for x in s.stop_strings):
                # HF: a stop token outside the top K would crowd out better running beams
                if rank < K:
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
        if not new or g.step == s.max_new_tokens or \
                (len(best) >= K and max(map(score, new)) <= score(best[-1])):
            return self._end_beams(
                g, sorted(g.finished + new, key=score, reverse=True)[:s.num_samples])
        # the reorder: the survivors take the group's slots, each copying its parent's keys/values
        live = []
        for x, (p, t, v, node, lps, tops_, constraint) in zip(g.slots, new):
            r = Row(g.req, g.prompt_index, 0, p.tokens + [t], x, group=g)
            r.start, r.score, r.node, r.lps, r.tops = p.start, v, node['id'], lps, tops_
            r.constraint = constraint
            live.append((p.slot, r))
        if self.cache is not None:
            self.cache.copy([src for src, _ in live], [r.slot for _, r in live])
        for x in g.slots:
            self.slots[x] = g
        for _, r in live:
            self.slots[r.slot] = r
        g.rows = [r for _, r in live]

    def _end_beams(self, g, best):
        """The best num_samples hypotheses, as one event per token (sample_index = rank); the
        group's slots free."""
        for rank, (p, t, v, node, lps, tops, _) in enumerate(best):
            text = TextStream(self.tok, g.req.settings.stop_strings, g.req.settings.stop_tokens)
            out = p.tokens[p.n_prompt:] + [t]
            for j, tok in enumerate(out):
                delta, reason = text.push(tok, j == len(out) - 1)
                # (one its grammar ended is finished too: a stop)
                reason = 'stop' if reason and node['finished'] else reason
                g.req.queue.put(Event(g.prompt_index, rank, tok, delta, lps[j], tops[j], reason))
        for x in g.slots:
            self._free(x, 'rows_finished')
