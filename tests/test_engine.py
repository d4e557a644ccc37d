"""
engine.py from Python, without HTTP: requests that join and leave between steps, cancellation within one step, fair
admission, chunked prefill beside decoding rows, scoring without a held slot, beam-search step events and the
limits. References: sample.generate on each prompt alone, and a plain forward for the scores. Tiny random models.
"""
import pytest
import torch
import torch.nn.functional as F

from nanolab.decoding import Settings, SettingsError
from nanolab.engine import Engine, LimitError
from nanolab.events import BeamStep, Event, PromptScores
from sample import generate
from test_sample import PROMPTS, tiny  # the same sharp tiny models

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


def run(engine, reqs, max_steps=10_000):
    """Step the engine until every request is done -> {request: [its events]}, and the steps it took."""
    out = {id(r): [] for r in reqs}
    for step in range(max_steps):
        for r in reqs:
            while not r.queue.empty():
                out[id(r)].append(r.queue.get())
        if not engine.busy():
            return out, step
        engine.step()
    raise AssertionError('the engine did not finish')


def tokens(events, prompt_index=0, sample_index=0):
    return [e.token for e in events if isinstance(e, Event) and (e.prompt_index, e.sample_index) ==
            (prompt_index, sample_index) and e.token is not None]


def test_requests_join_and_leave_between_steps_and_each_equals_generate_alone():
    m = tiny('llama')
    engine = Engine(m, max_batch=6)
    a = engine.submit(PROMPTS, Settings(max_new_tokens=20, temperature=0))
    for _ in range(5):  # a is running when b and c arrive
        engine.step()
    b = engine.submit([PROMPTS[1]], Settings(max_new_tokens=12, temperature=0.9, top_k=20, seed=5, num_samples=2))
    c = engine.submit([[3, 1, 4, 1, 5, 9, 2, 6]], Settings(max_new_tokens=8, temperature=0))
    out, _ = run(engine, [a, b, c])
    for i, p in enumerate(PROMPTS):
        assert tokens(out[id(a)], i) == generate(m, p, 20, temperature=0)[0].tokens
    for i in range(2):  # the seeding rule: sample i of seed 5 is sample 0 of seed 5 + i
        want = generate(m, PROMPTS[1], 12, temperature=0.9, top_k=20, seed=5 + i)[0].tokens
        assert tokens(out[id(b)], 0, i) == want
    assert tokens(out[id(b)], 0, 0) != tokens(out[id(b)], 0, 1)
    assert tokens(out[id(c)]) == generate(m, [3, 1, 4, 1, 5, 9, 2, 6], 8, temperature=0)[0].tokens
    assert engine.stats['peak_batch'] == 6 and not any(engine.slots)


def test_cancel_frees_the_rows_within_one_step():
    m = tiny()
    engine = Engine(m, max_batch=8)
    long = engine.submit(PROMPTS, Settings(max_new_tokens=50, temperature=0, num_samples=2))
    beams = engine.submit([PROMPTS[0]], Settings(max_new_tokens=50, num_beams=2))
    for _ in range(3):
        engine.step()
    assert sum(r is not None for r in engine.slots) == 8
    long.cancel()
    engine.step()
    assert [r.req for r in engine.slots if r is not None] == [beams, beams]
    assert engine.stats['rows_cancelled'] == 6
    beams.cancel()
    engine.step()
    assert not engine.busy() and engine.cache.lengths == [0] * 8


def test_admission_is_fair_to_a_newcomer():
    """A request of 40 prompts holds every slot; a request that comes later takes the next free slot, ahead of
    the rest of the 40 (fewest running rows first), and its reply still equals generate alone."""
    m = tiny()
    engine = Engine(m, max_batch=4)
    flood = engine.submit([[i + 1] for i in range(40)], Settings(max_new_tokens=6, temperature=0))
    engine.step()
    late = engine.submit([PROMPTS[0]], Settings(max_new_tokens=10, temperature=0))
    first = None
    for step in range(100):
        engine.step()
        if first is None and any(r is not None and r.req is late for r in engine.slots):
            first = step
            break
    assert first is not None and first <= 6  # one flood row's length, not the 40 prompts' (60 steps)
    out, _ = run(engine, [flood, late])
    assert tokens(out[id(late)]) == generate(m, PROMPTS[0], 10, temperature=0)[0].tokens


def test_a_newcomer_preempts_a_request_that_holds_every_slot():
    """Four long greedy rows of one request hold all 4 slots; a newcomer takes one at once (preemption): the latest
    of those rows goes back to its queue and later prefills its context again. Every reply equals generate alone."""
    m = tiny(block_size=128)
    engine = Engine(m, max_batch=4)
    hog = engine.submit([[i + 1, i + 2] for i in range(4)], Settings(max_new_tokens=60, temperature=0))
    for _ in range(5):
        engine.step()
    late = engine.submit([PROMPTS[0]], Settings(max_new_tokens=10, temperature=0))
    engine.step()
    assert any(r is not None and r.req is late for r in engine.slots) and engine.stats['rows_preempted'] == 1
    out, _ = run(engine, [hog, late])
    assert tokens(out[id(late)]) == generate(m, PROMPTS[0], 10, temperature=0)[0].tokens
    for i in range(4):  # the preempted row's 60 tokens are the same as if it had never left
        assert tokens(out[id(hog)], i) == generate(m, [i + 1, i + 2], 60, temperature=0)[0].tokens


def test_admission_is_fair_between_clients_not_only_requests():
    """One client sends 40 requests of one prompt each (a server's client opening many connections) and holds every
    slot; a second client's request takes the next free slot, ahead of the first client's 36 waiting requests (each
    of which holds no slot either, so per request they would tie and go first); and a newcomer client whose rows
    hold every slot of one other client preempts that client's rows, never its own."""
    m = tiny(block_size=128)
    engine = Engine(m, max_batch=4)
    flood = [engine.submit([[i + 1]], Settings(max_new_tokens=6, temperature=0), client='one')
             for i in range(40)]
    engine.step()
    late = engine.submit([PROMPTS[0]], Settings(max_new_tokens=10, temperature=0), client='two')
    first = None
    for step in range(100):
        engine.step()
        if any(r is not None and r.req is late for r in engine.slots):
            first = step
            break
    assert first is not None and first <= 6  # one flood row's length, not 40 requests' (60 steps)
    out, _ = run(engine, flood + [late])
    assert tokens(out[id(late)]) == generate(m, PROMPTS[0], 10, temperature=0)[0].tokens
    # preemption by client: 'one' holds the 4 slots with two requests of 2 rows; 'three' takes one of them
    hogs = [engine.submit([[i + 1, i + 2], [i + 3, i + 4]], Settings(max_new_tokens=60, temperature=0),
                          client='one') for i in range(2)]
    for _ in range(3):
        engine.step()
    newcomer = engine.submit([PROMPTS[1]], Settings(max_new_tokens=8, temperature=0), client='three')
    engine.step()
    assert any(r is not None and r.req is newcomer for r in engine.slots)
    out, _ = run(engine, hogs + [newcomer])
    for k, h in enumerate(hogs):  # the preempted row's tokens are the same as if it had never left
        for i in range(2):
            want = generate(m, [2 * i + k + 1, 2 * i + k + 2], 60, temperature=0)[0].tokens
            assert tokens(out[id(h)], i) == want


def test_beam_searches_hold_at_most_their_share_of_the_slots():
    m = tiny()
    engine = Engine(m, max_batch=4, max_beam_slots=2)
    beams = engine.submit(PROMPTS[:2], Settings(max_new_tokens=8, num_beams=2))
    sampled = engine.submit([[5], [6], [7]], Settings(max_new_tokens=20, temperature=0))
    held = []
    while engine.busy():
        engine.step()
        held.append(sum(r is not None and r.req is beams for r in engine.slots))
    assert max(held) == 2  # one group of 2 beams at a time, beside the sampling rows
    out, _ = run(engine, [beams, sampled])
    with pytest.raises(LimitError, match='max_beam_slots'):
        engine.submit([[1]], Settings(num_beams=3))


def test_a_long_prompt_is_prefilled_in_chunks_while_a_row_decodes():
    m = tiny(block_size=128)
    engine = Engine(m, max_batch=2, prefill_chunk=8)
    stream = engine.submit([PROMPTS[1]], Settings(max_new_tokens=30, temperature=0))
    engine.step()
    engine.step()
    long_prompt = [(7 * i) % 90 for i in range(60)]
    long = engine.submit([long_prompt], Settings(max_new_tokens=5, temperature=0))
    got, steps = [], 0
    while not any(isinstance(e, Event) for e in got) and steps < 20:  # until the long prompt's first token
        before = stream.queue.qsize()
        engine.step()
        steps += 1
        assert stream.queue.qsize() == before + 1  # the stream got its token in every one of those steps
        while not long.queue.empty():
            got.append(long.queue.get())
    assert steps == 8  # ceil(60 / 8) chunks, the last one giving the first token
    out, _ = run(engine, [stream, long])
    assert tokens(got + out[id(long)]) == generate(m, long_prompt, 5, temperature=0)[0].tokens


def test_scoring_holds_no_slot_and_equals_a_plain_forward():
    m = tiny('llama')
    engine = Engine(m, max_batch=1, prefill_chunk=3)  # chunks of 3: the scores are stitched across chunks
    req = engine.submit(PROMPTS, Settings(max_new_tokens=0, prompt_logprobs=True, logprobs=2, num_samples=2))
    out, steps = run(engine, [req])
    scores = {e.prompt_index: e for e in out[id(req)] if isinstance(e, PromptScores)}
    for i, p in enumerate(PROMPTS):
        with torch.no_grad():
            logp = F.log_softmax(m(torch.tensor([p]))[0][0].float(), -1)
        want = logp[torch.arange(len(p) - 1), p[1:]].tolist()
        assert scores[i].token_logprobs[0] is None and scores[i].token_logprobs[1:] == pytest.approx(want, abs=1e-5)
        assert [t for t, _ in scores[i].top_logprobs[1]] == logp[0].topk(2).indices.tolist()
    finals = [e for e in out[id(req)] if isinstance(e, Event)]
    assert len(finals) == 6 and all(e.token is None and e.finish_reason == 'length' for e in finals)
    assert not any(engine.slots) and steps == 3 + 1 + 2  # prompts of 7, 2 and 5 tokens, 3 a step, one at a time


def test_beam_steps_trace_the_returned_beams():
    m = tiny()
    engine = Engine(m, max_batch=3)
    req = engine.submit([PROMPTS[2]], Settings(max_new_tokens=9, num_beams=3, num_samples=2))
    out, _ = run(engine, [req])
    steps = [e for e in out[id(req)] if isinstance(e, BeamStep)]
    nodes = {n['id']: n for s in steps for n in s.nodes}
    assert [s.step for s in steps] == list(range(len(steps))) and 0 < len(steps) <= 9
    assert all(len([n for n in s.nodes if not n['finished']]) <= 3 for s in steps)
    for rank, want in enumerate(generate(m, PROMPTS[2], 9, num_beams=3, num_samples=2)):
        assert tokens(out[id(req)], 0, rank) == want.tokens
    # the best beam is the path of parents back from the best-scoring node of the last step
    best = max(steps[-1].nodes, key=lambda n: n['score'])
    path = []
    while best is not None:
        path.append(best['token'])
        best = nodes.get(best['parent'])
    assert path[::-1] == tokens(out[id(req)], 0, 0)


def test_limits_and_settings_are_checked_at_submit():
    engine = Engine(tiny(), max_batch=4, max_rows=8, max_prompt_tokens=20)
    with pytest.raises(LimitError, match='max_rows') as e:
        engine.submit([[1]] * 5, Settings(num_samples=2))
    assert e.value.limit == 'max_rows'
    with pytest.raises(LimitError, match='max_prompt_tokens'):
        engine.submit([[1] * 21])
    with pytest.raises(LimitError, match='max_batch'):
        engine.submit([[1]], Settings(num_beams=5))
    with pytest.raises(SettingsError, match='top_p') as e:
        engine.submit([[1]], Settings(top_p=0))
    assert e.value.field == 'top_p' and not engine.busy()


def test_logprobs_past_the_vocabulary_are_refused_at_submit_not_in_the_batch():
    engine = Engine(tiny(vocab_size=16), max_batch=4)
    running = engine.submit([[1, 2]], Settings(max_new_tokens=4, temperature=0))
    engine.step()
    with pytest.raises(SettingsError, match='logprobs') as e:
        engine.submit([[3]], Settings(max_new_tokens=2, logprobs=20))  # topk(20) of 16 would fail every row
    assert e.value.field == 'logprobs'
    assert [ev.finish_reason for ev in running][-1] == 'length'  # the running request is untouched


def test_a_row_whose_token_cannot_be_chosen_fails_its_request_alone(monkeypatch):
    """Row isolation by construction: a top_p that is 0 in float32 keeps the likeliest token (greedy) instead of
    emptying the distribution; an error while one group of rows chooses (injected here for top_k=7) fails that
    request only, and a request stepping beside it in the same batch gives generate's tokens."""
    from nanolab import decoding
    from nanolab.engine import NumericalError
    m = tiny('gpt2')
    engine = Engine(m, max_batch=8)
    tiny_p = engine.submit(PROMPTS[:2], Settings(max_new_tokens=12, temperature=1.0, top_p=1e-300, seed=3))
    out, _ = run(engine, [tiny_p])
    for i, p in enumerate(PROMPTS[:2]):
        assert tokens(out[id(tiny_p)], i) == generate(m, p, 12, temperature=0)[0].tokens  # the likeliest: greedy
    process = decoding.process_logits

    def fails_for_top_k_7(logits, *a, **kw):
        if kw.get('top_k') == 7:
            raise RuntimeError('injected')
        return process(logits, *a, **kw)
    monkeypatch.setattr(decoding, 'process_logits', fails_for_top_k_7)
    bad = engine.submit(PROMPTS[0], Settings(max_new_tokens=12, temperature=0.8, top_k=7, seed=1))
    good = engine.submit(PROMPTS[1:], Settings(max_new_tokens=12, temperature=0.8, top_k=20, seed=2))
    out, _ = run(engine, [bad, good])
    errors = [e for e in out[id(bad)] if isinstance(e, Exception)]
    assert len(errors) == 1 and isinstance(errors[0], NumericalError) and 'injected' in str(errors[0])
    for i, p in enumerate(PROMPTS[1:]):
        assert tokens(out[id(good)], i) == generate(m, p, 12, temperature=0.8, top_k=20, seed=2)[0].tokens
    assert not any(engine.slots)
