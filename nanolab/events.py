"""
What a request to the decoding engine gives back: the Request handle (iterate it for the events,
cancel() it), the events themselves (Event: one new token of one row; PromptScores: the prompt's
own log-probabilities; BeamStep: what a beam search kept at one step), and beam_tree, the tree a
beam search grew, built from its BeamSteps.

    req = engine.submit([ids_a, ids_b], Settings(max_new_tokens=50))
    for ev in req:  # Events as tokens are chosen (in your own thread when the engine runs in one)
        print(ev.prompt_index, ev.text_delta, end='')
"""
import queue
from collections import deque
from dataclasses import dataclass


@dataclass
class Event:
    """One new token of one row (sample_index: the sample, or the beam's rank once a beam search is
    done)."""
    prompt_index: int
    sample_index: int
    token: int | None              # None only in a final event without a token (max_new_tokens=0)
    text_delta: str                # new text safe to show ('' while a char or stop string waits)
    logprob: float | None          # raw-distribution logprob of token
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: str | None      # 'stop' | 'length' on the row's last event, else None
    # a grammar's row (json_schema, grammar): how many tokens it allowed at this step, whether it
    # allowed each of top_logprobs' tokens, and (with logprobs) the likeliest tokens it allowed
    allowed: int | None = None
    top_allowed: list[bool] | None = None
    allowed_top: list[tuple[int, float]] | None = None

@dataclass
class PromptScores:
    """Settings.prompt_logprobs: each prompt token's raw logprob given the tokens before it (the
    first: None)."""
    prompt_index: int
    token_logprobs: list
    top_logprobs: list

@dataclass
class BeamStep:
    """One step of a beam search: every hypothesis it keeps, as nodes {id, parent (node id, None =
    the prompt), step, token, logprob, cum_logprob (processed), score (length-normalized),
    finished}."""
    prompt_index: int
    step: int
    nodes: list[dict]

def beam_tree(steps, tokenizer=None, completion=()):
    """The tree a beam search grew, from its BeamSteps (one prompt's): every node it kept, by id,
    each with 'text' (its token decoded; None without a tokenizer), 'best' (on the path of
    `completion`, the tokens the search returned, from the first step to the last) and 'pruned' (a
    live hypothesis that no later step extended and that was not returned: a branch the search
    dropped). Parent ids point up the tree; the first step's parent is None (the prompt). The path
    of `completion` is unique: a hypothesis is one sequence of tokens."""
    nodes = sorted((dict(n) for st in steps for n in st.nodes), key=lambda n: n['id'])
    children = {}
    for n in nodes:
        children.setdefault(n['parent'], {})[n['token']] = n
    path, at = set(), None
    for t in completion:  # walk down from the prompt along the returned tokens
        n = children.get(at, {}).get(t)
        if n is None:
            break
        path.add(n['id'])
        at = n['id']
    for n in nodes:
        n['text'] = tokenizer.decode([n['token']]) if tokenizer is not None else None
        n['best'] = n['id'] in path
        n['pruned'] = not n['finished'] and not n['best'] and n['id'] not in children
    return nodes

class Request:
    """What Engine.submit returns. Iterate it for its events (in a thread of your own when the
    engine runs in one; otherwise iterating runs the engine's steps); cancel() frees its rows
    within one step."""
    def __init__(self, engine, prompts, settings):
        self.engine, self.prompts, self.settings = engine, prompts, settings
        self.waiting = deque(range(len(prompts)))  # prompts not yet admitted
        self.resume = deque()                       # its preempted rows, admitted again first
        self.running = 0                            # slots it holds
        self.client = self                          # shares its turns with (Engine.submit)
        self.outputs = len(prompts) * settings.num_samples  # final events to come
        self.queue, self.cancelled = queue.SimpleQueue(), False

    def cancel(self):
        self.cancelled = True
        self.engine.wake.set()

    def get(self, timeout=None):
        """The next event (or an exception from the engine), None after timeout seconds without
        one."""
        while self.engine.thread is None and self.queue.empty():
            self.engine.step()
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def __iter__(self):
        return self.events()

    def events(self, check=None, every=0.25):
        """Its events until every row has finished. check(), if given, runs after each event and
        every `every` seconds without one (the server's, Handler.check_client, raises when the
        client has gone, and the caller then cancels)."""
        left = self.outputs
        while left:
            ev = self.get(timeout=every if check else None)
            if check:
                check()
            if isinstance(ev, Exception):
                raise ev
            if ev is not None:
                left -= isinstance(ev, Event) and ev.finish_reason is not None
                yield ev
