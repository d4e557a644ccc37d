"""
generate and generate_stream: the library's calls into the decoding engine (engine.py), the one
decoder. sample.py exposes them (`from sample import generate`); evaluation, the trainers' in-loop
answers and the benchmarks decode through them, and the server (server.py) runs the engine itself,
so the same seeded request gives the same text everywhere.

    from sample import generate
    out = generate(model, [ids_a, ids_b], max_new_tokens=50, temperature=0.8, seed=7,
                   tokenizer=tok)
    print(out[0].text, out[0].finish_reason, out[0].token_logprobs)

Every strategy, the order of the logit processors, the seeding rule and what logprobs mean are in
decoding.py's and engine.py's docstrings.

Context: the model's block_size is a hard limit.
  - a prompt longer than block_size-1 tokens is left-truncated to its last block_size-1 tokens (one
    warning on stderr)
  - generation that fills the window goes on in a sliding window: with the KV cache, the context
    restarts from its last block_size//2 tokens (one prefill per block_size//2 new tokens); without
    it (use_cache=False, the slow reference path) the context is cropped to the last block_size
    tokens every step, as nanoGPT does.
Stopping: a row stops at any of `stop_tokens` (default: the tokenizer's eot, if it has one; pass
stop_tokens=() to never stop on a token) or when its new text contains any of `stop_strings`; the
token ids include the stop token, the text excludes the stop token and the stop string (as OpenAI's
API does).
"""
from dataclasses import dataclass
from typing import Iterator

from nanolab.decoding import Settings, prompt_lists
from nanolab.engine import Engine
from nanolab.events import BeamStep, Event, beam_tree as grow_tree


@dataclass
class Completion:
    tokens: list[int]              # new tokens, the stop token that ended the row included
    text: str | None               # new text, cut before any stop string (None: no tokenizer)
    finish_reason: str             # 'stop' (a stop token or string) | 'length' (max_new_tokens)
    logprob: float                 # sum of token_logprobs
    token_logprobs: list[float]    # log p(token) under the raw model distribution
    # logprobs=k>0: the k likeliest (token, logprob) per step
    top_logprobs: list[list[tuple[int, float]]] | None
    prompt_index: int
    sample_index: int
    # beam_tree=True: the search's nodes (events.beam_tree), this one's path 'best'
    beam_tree: list[dict] | None = None


def generate_stream(model, prompts, max_new_tokens=100, *, temperature=1.0, top_k=0, top_p=1.0,
                    min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                    num_beams=1, length_penalty=1.0, num_samples=1, stop_tokens=None,
                    stop_strings=(), tokenizer=None, seed=None, use_cache=True, logprobs=0,
                    json_schema=None, grammar=None, logit_bias=(),
                    beam_steps=False) -> Iterator[Event]:
    """Events, one per new token of each row, as soon as it is chosen (beam search: all at the end,
    and with beam_steps=True a BeamStep event per step before them).
    prompts: list[int] or list[list[int]] of different lengths, decoded together in one batch; each
    prompt is repeated num_samples times (prompt_index, sample_index say which row an event belongs
    to).
    seed: engine.py's seeding rule (sample i draws from random.Random(seed + i)), whatever the
    global RNG. json_schema: a JSON schema's text that every row's text follows, or grammar: a Lark
    grammar's (grammar.py; either needs tokenizer=); logit_bias: {token id: bias} or pairs, OpenAI's
    (added to the logits, +-100 forcing or banning a token). Arguments are checked here, at the call, so a caller can refuse bad input before it
    starts streaming; decoding runs as the result is iterated, on a private Engine. The model
    should be in eval mode (load_model does that)."""
    settings = Settings(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                        presence_penalty, frequency_penalty, num_beams, length_penalty,
                        num_samples, None if stop_tokens is None else tuple(stop_tokens),
                        stop_strings, seed, logprobs, json_schema=json_schema, grammar=grammar,
                        logit_bias=tuple(dict(logit_bias).items()))
    prompts = prompt_lists(prompts)
    engine = Engine(model, tokenizer, max_batch=len(prompts) * max(1, num_samples, num_beams),
                    use_cache=use_cache)
    req = engine.submit(prompts, settings)

    def events():
        try:
            for ev in req:
                if isinstance(ev, Event) or beam_steps and isinstance(ev, BeamStep):
                    yield ev
        finally:
            req.cancel()
    return events()


def generate(model, prompts, max_new_tokens=100, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
             repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, num_beams=1,
             length_penalty=1.0, num_samples=1, stop_tokens=None, stop_strings=(), tokenizer=None,
             seed=None, use_cache=True, logprobs=0, json_schema=None, grammar=None,
             logit_bias=(), beam_tree=False) -> list[Completion]:
    """One Completion per (prompt, sample), ordered by prompt then sample (see the module
    docstring). It collects generate_stream's events, so there is exactly one decoding loop.
    beam_tree=True (num_beams > 1): each Completion also carries the tree its search grew
    (events.beam_tree), its own path marked 'best'."""
    if beam_tree and num_beams < 2:
        raise ValueError(f'beam_tree needs a beam search (num_beams > 1, not {num_beams})')
    args = dict(locals())  # every argument, as given
    args.pop('beam_tree')
    events, done, steps = generate_stream(**args, beam_steps=beam_tree), {}, {}
    for ev in events:
        if isinstance(ev, BeamStep):
            steps.setdefault(ev.prompt_index, []).append(ev)
            continue
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
        if beam_tree:
            c.beam_tree = grow_tree(steps.get(c.prompt_index, []), tokenizer, c.tokens)
    return [done[k] for k in sorted(done)]
