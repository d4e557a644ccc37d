"""
sample.py: decoding checked against references: the no-cache path, one prompt at a time, Hugging Face
generate (greedy and beam), hand-computed logit processors, and the CLI as a subprocess.
Tiny random models (2 layers x 64), CPU only.
"""
import copy
import gc
import os
import random
import subprocess
import sys
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch

from model import GPT, GPTConfig
from nanolab.checkpoint import save_checkpoint  # tests/conftest.py puts the repo root on sys.path
from nanolab import decoding

from sample import generate, generate_stream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ARCHS = ['gpt2', 'llama']
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [5, 5, 5, 5, 40]]  # uneven lengths: left padding in one batch


pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


def tiny(arch='gpt2', block_size=64, vocab_size=97):
    """A random model with weights ~N(0, 0.3): sharper than the 0.02 init, so greedy paths vary and margins
    between the top tokens are far above float noise (no flaky argmax ties)."""
    torch.manual_seed(0)
    kw = dict(n_kv_head=2) if arch == 'llama' else {}  # llama: grouped-query attention, 4 query heads on 2 kv heads
    m = GPT(GPTConfig(arch=arch, n_layer=2, n_head=4, n_embd=64, block_size=block_size, vocab_size=vocab_size, **kw))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return m.eval()


class LetterTok:
    """A stand-in tokenizer for stop-string tests: id -> one ASCII letter, so every text is predictable."""
    eot, vocab_size = None, 97

    def decode_bytes(self, ids):
        return bytes(97 + i % 26 for i in ids)

    def decode(self, ids):
        return self.decode_bytes(ids).decode()


def seq_logprob(model, prompt, tokens):
    """Total logprob of tokens after prompt, from one plain forward (no cache, no sample.py code)."""
    idx = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits, _ = model(idx)
    logp = torch.log_softmax(logits[0, len(prompt) - 1:-1].float(), dim=-1)
    return logp.gather(1, torch.tensor(tokens)[:, None]).sum().item()

# -----------------------------------------------------------------------------
# 1-2) the KV cache path against the no-cache path, single prompts, and Hugging Face

@pytest.mark.parametrize('arch', ARCHS)
def test_cache_equals_no_cache_and_single_prompts(arch):
    m = tiny(arch)
    cached = generate(m, PROMPTS, 24, temperature=0)
    full = generate(m, PROMPTS, 24, temperature=0, use_cache=False)
    for c, f, p in zip(cached, full, PROMPTS):
        alone = generate(m, p, 24, temperature=0, use_cache=False)[0]  # no padding, no cache: plain forwards
        assert c.tokens == f.tokens == alone.tokens
        assert len(set(c.tokens)) > 3  # a real path, not one token repeated
        assert c.token_logprobs == pytest.approx(alone.token_logprobs, abs=1e-4)
        assert c.logprob == pytest.approx(seq_logprob(m, p, c.tokens), abs=1e-3)
    assert [c.prompt_index for c in cached] == [0, 1, 2]


@pytest.mark.parametrize('arch', ARCHS)
def test_compiled_decode_is_one_graph_and_equals_eager(arch):
    """sample.py --compile: a torch.compile'd model decodes compiled (prefill stays eager). fullgraph=True raises at
    any graph break in the decode step; the compiler's own counters show it compiled once, and once more when the
    cache storage grew (64 -> 128 tokens; the size is dynamic from then on), not once per step; and the tokens and
    logprobs are the eager cache path's. backend='eager' runs dynamo's capture alone (inductor: bench.py)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    m = tiny(arch, block_size=256)
    compiled = torch.compile(m, backend='eager', fullgraph=True)
    a = generate(m, PROMPTS, 90, temperature=0, num_samples=2, logprobs=2)
    b = generate(compiled, PROMPTS, 90, temperature=0, num_samples=2, logprobs=2)
    assert [c.tokens for c in a] == [c.tokens for c in b]
    assert sum((c.token_logprobs for c in a), []) == pytest.approx(sum((c.token_logprobs for c in b), []), abs=1e-5)
    assert counters['stats']['unique_graphs'] == 2, dict(counters['stats'])
    torch._dynamo.reset()


@pytest.mark.parametrize('kernel', ['int8', 'onednn/8'])
def test_compiled_step_takes_int8_and_packed_linears_whole(kernel):
    """The swapped linears under torch.compile: fbgemm's int8 (a TorchScript object torch.compile cannot trace) and
    oneDNN's packed weight reach the graph as one opaque op each (nanolab::int8_linear, nanolab::packed_linear),
    so the decode step has no graph break (fullgraph=True raises at one); its tokens are the eager model's, and a
    row's tokens are the same alone and beside others. backend='eager': dynamo's capture alone."""
    from nanolab import quantize
    if kernel != 'int8' and not quantize.ONEDNN:
        pytest.skip("this PyTorch has no oneDNN linear")
    torch._dynamo.reset()
    m = quantize.for_inference(tiny('llama'), *(('int8',) if kernel == 'int8' else ('', 32, kernel)))
    compiled = torch.compile(m, backend='eager', fullgraph=True)
    a, b = (generate(x, PROMPTS, 30, temperature=0) for x in (m, compiled))
    assert [c.tokens for c in a] == [c.tokens for c in b]
    for p, c in zip(PROMPTS, b):
        assert generate(compiled, p, 30, temperature=0)[0].tokens == c.tokens
    if kernel != 'int8':
        return torch._dynamo.reset()
    # a copy's int8 layers name weights of their own: it decodes on after the original is gone
    twin = copy.deepcopy(m)
    del m, compiled
    torch._dynamo.reset()
    gc.collect()
    assert [c.tokens for c in generate(torch.compile(twin, backend='eager', fullgraph=True), PROMPTS, 30,
                                       temperature=0)] == [c.tokens for c in a]
    torch._dynamo.reset()


@pytest.mark.parametrize('family', [dict(qkv_bias=True), dict(qk_norm=True, head_dim=24), dict(sliding_window=6)],
                         ids=['qwen2', 'qwen3', 'mistral'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=['fp32', 'bf16'])
def test_compiled_step_covers_every_family(family, dtype):
    """The compiled decode step over the families' options (q/k/v biases, q/k norms on wider heads, a sliding
    window shorter than the context), in fp32 and bf16 with the CPU's chosen kernels: one graph, the eager tokens,
    rows independent of their batch-mates."""
    from nanolab import quantize
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = GPT(GPTConfig(arch='llama', n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=64, vocab_size=97,
                      **family)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.1)
    m = quantize.for_inference(m.to(dtype))
    compiled = torch.compile(m, backend='eager', fullgraph=True)
    a, b = (generate(x, PROMPTS, 24, temperature=0) for x in (m, compiled))
    assert [c.tokens for c in a] == [c.tokens for c in b]
    assert generate(compiled, PROMPTS[2], 24, temperature=0)[0].tokens == b[2].tokens
    torch._dynamo.reset()


def test_warm_up_compiles_every_shape_a_server_meets():
    """serve.py --compile: Engine.warm_up compiles the decode step for one row and several, with the KV storage at
    its first size and grown; afterwards requests of any batch size and length compile nothing more (the rows of a
    compiled step come in powers of two, and the sizes torch.compile made dynamic cover the rest)."""
    from torch._dynamo.utils import counters
    from nanolab.engine import Engine
    torch._dynamo.reset()
    counters.clear()
    m = tiny('llama', block_size=256)
    engine = Engine(torch.compile(m, backend='eager'), max_batch=16)
    engine.warm_up()
    warm = counters['stats']['unique_graphs']
    assert 2 <= warm <= 4, dict(counters['stats'])
    rng = random.Random(0)
    for rows, length, n in [(1, 3, 5), (3, 9, 100), (5, 2, 40), (16, 30, 150), (7, 120, 20), (2, 1, 3)]:
        prompts = [[rng.randrange(97) for _ in range(length)] for _ in range(rows)]
        got = {}
        for ev in engine.submit(prompts, decoding.Settings(max_new_tokens=n, temperature=0.0)):
            got.setdefault(ev.prompt_index, []).append(ev.token)
        assert [got[i] for i in range(rows)] == [c.tokens for c in generate(m, prompts, n, temperature=0)]
    assert counters['stats']['unique_graphs'] == warm, dict(counters['stats'])
    torch._dynamo.reset()


@pytest.mark.parametrize('arch', ARCHS)
def test_greedy_and_beam_match_huggingface(arch, tmp_path):
    transformers = pytest.importorskip('transformers')
    m = tiny(arch)
    m.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompt = PROMPTS[0]
    eos = generate(m, prompt, 8, temperature=0)[0].tokens[5]  # a token greedy reaches: beams can end on it
    for kw, ours in [({}, dict(temperature=0)), ({'num_beams': 3}, dict(num_beams=3)),
                     ({'num_beams': 3, 'eos_token_id': eos}, dict(num_beams=3, stop_tokens=[eos]))]:
        # no eos unless given, so HF runs the full length as we do
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, pad_token_id=0, **kw)
        assert generate(m, prompt, 16, **ours)[0].tokens == out[0, len(prompt):].tolist(), kw

# -----------------------------------------------------------------------------
# 3-4) seeds and the greedy limits

def test_seed_reproducible_whatever_the_global_rng():
    m = tiny()
    torch.manual_seed(1)
    a = generate(m, PROMPTS, 20, seed=7, num_samples=2)
    torch.manual_seed(2)
    b = generate(m, PROMPTS, 20, seed=7, num_samples=2)
    c = generate(m, PROMPTS, 20, seed=8, num_samples=2)
    assert [x.tokens for x in a] == [x.tokens for x in b]
    assert [x.tokens for x in a] != [x.tokens for x in c]  # 6 rows x 20 tokens from ~97 ids: never all equal
    assert a[0].tokens != a[1].tokens  # two samples of one prompt differ
    assert [(x.prompt_index, x.sample_index) for x in a] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]


def test_greedy_limits():
    m = tiny('llama')
    greedy = [c.tokens for c in generate(m, PROMPTS, 16, temperature=0)]
    assert [c.tokens for c in generate(m, PROMPTS, 16, top_k=1, seed=3)] == greedy
    assert [c.tokens for c in generate(m, PROMPTS, 16, temperature=1e-6, seed=3)] == greedy
    assert [c.tokens for c in generate(m, PROMPTS, 16, top_p=1e-6, seed=3)] == greedy  # nucleus of one
    assert [c.tokens for c in generate(m, PROMPTS, 16, num_beams=1, temperature=0)] == greedy

# -----------------------------------------------------------------------------
# 5, 7, 8) the logit processors on hand values

def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])  # sorted: 0.5, 0.3, 0.15, 0.05
    logits = probs.log()
    kept = lambda p: torch.isfinite(decoding.top_p_filter(logits, p)).tolist()
    assert kept(0.4) == [False, True, False, False]   # 0.5 alone reaches 0.4
    assert kept(0.75) == [False, True, False, True]   # 0.5 + 0.3 = 0.8 >= 0.75
    assert kept(0.85) == [True, True, False, True]    # needs 0.15 too: 0.95
    assert kept(0.99) == [True, True, True, True]
    assert kept(1e-9) == [False, True, False, False]  # never empty
    # the boundary, in powers of two so the sums are exact: mass 0.5 + 0.25 reaches 0.75, so the 0.125s go
    exact = torch.tensor([0.125, 0.5, 0.125, 0.25]).log()
    assert torch.isfinite(decoding.top_p_filter(exact, 0.75)).tolist() == [False, True, False, True]
    batch = torch.stack([logits, logits.flip(0)])    # rows filtered independently
    assert torch.isfinite(decoding.top_p_filter(batch, 0.75)).tolist() == [[False, True, False, True],
                                                                         [True, False, True, False]]


def test_min_p_and_top_k_filters():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert torch.isfinite(decoding.min_p_filter(logits, 0.5)).tolist() == [True, True, False, False]   # p >= 0.25
    assert torch.isfinite(decoding.min_p_filter(logits, 0.2)).tolist() == [True, True, True, False]    # p >= 0.1
    assert torch.isfinite(decoding.top_k_filter(logits, 2)).tolist() == [True, True, False, False]
    assert torch.equal(decoding.top_k_filter(logits, 0), logits)


def test_penalties_follow_their_formulas():
    logits = torch.tensor([2.0, -2.0, 1.0, -1.0])
    seen = torch.tensor([True, True, False, False])
    assert decoding.apply_repetition_penalty(logits, seen, 2.0).tolist() == [1.0, -4.0, 1.0, -1.0]
    counts = torch.tensor([3, 0, 1, 0])
    assert decoding.apply_presence_frequency(logits, counts, 0.5, 0.25).tolist() == [2 - 0.5 - 0.75, -2.0, 1 - 0.5 - 0.25, -1.0]
    assert decoding.apply_temperature(logits, 0.5).tolist() == [4.0, -4.0, 2.0, -2.0]
    # penalty_state: repetition sees prompt + output, OpenAI penalties count the output only
    seen, counts = decoding.penalty_state([[0, 1]], [[2, 2]], 4, 'cpu', 1.5, 0.0, 0.1)
    assert seen.tolist() == [[True, True, True, False]] and counts.tolist() == [[0, 0, 2, 0]]
    # and generate applies them: a huge frequency penalty forbids any repeat
    m = tiny()
    out = generate(m, PROMPTS[1], 30, temperature=0, frequency_penalty=2.0, repetition_penalty=50.0)[0].tokens
    assert len(set(out)) == len(out) and not set(out) & set(PROMPTS[1])


def test_sampling_follows_the_processed_distribution():
    # temperature 1 with top_k=2: every draw is one of the two likeliest tokens, and both occur
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]]).repeat(2000, 1)
    x = decoding.process_logits(logits, top_k=2)
    rng = random.Random(0)
    drawn = decoding.draw(x.softmax(-1), [rng.random() for _ in range(2000)])
    assert set(drawn.tolist()) == {1, 2}
    assert 0.45 < (drawn == 1).float().mean().item() < 0.62  # p(1) = 1/(1+e^-0.1) = 0.525
    # the inverse CDF by hand: u below p(1)/(p(1)+p(2)) picks token 1, above it token 2; a zero-mass token never
    p = x[:1].softmax(-1)
    cut = (p[0, 1] / p[0].sum()).item()
    assert decoding.draw(p.repeat(3, 1), [0.0, cut - 1e-6, cut + 1e-6]).tolist() == [1, 1, 2]
    assert decoding.draw(torch.tensor([[0.0, 1.0, 0.0]]), [0.999999999]).tolist() == [1]
    # over several blocks of the two-level search, the same tokens as one float64 cumulative sum over the vocabulary
    g = torch.Generator().manual_seed(0)
    p = torch.rand(4, 2500, generator=g) ** 8  # uneven, as real distributions are; the last block is partial
    us = [rng.random() for _ in range(4 * 200)]
    want = [torch.searchsorted(p[i % 4].double().cumsum(0), u * p[i % 4].double().sum(), right=True).item()
            for i, u in enumerate(us)]
    assert decoding.draw(p.repeat(200, 1), us).tolist() == want
    # the fast argmax: aten's, first maximum on ties, -inf left alone
    x = torch.randn(6, 2500, generator=g).masked_fill(torch.rand(6, 2500, generator=g) < 0.5, float('-inf'))
    x[0, [7, 900]] = 99.0
    assert decoding.argmax(x).tolist() == x.argmax(-1).tolist() and decoding.argmax(x)[0] == 7

# -----------------------------------------------------------------------------
# 6) beam search

@pytest.mark.parametrize('arch', ARCHS)
def test_beam_search_beats_greedy(arch):
    m = tiny(arch)
    for p in PROMPTS:
        greedy = generate(m, p, 12, temperature=0)[0]
        beams = generate(m, p, 12, num_beams=4, num_samples=2)
        best = beams[0]
        assert best.logprob == pytest.approx(seq_logprob(m, p, best.tokens), abs=1e-3)  # reported = recomputed
        assert seq_logprob(m, p, best.tokens) >= seq_logprob(m, p, greedy.tokens) - 1e-4
        assert best.logprob >= beams[1].logprob and best.tokens != beams[1].tokens
        assert generate(m, p, 12, num_beams=4, use_cache=False)[0].tokens == best.tokens

def test_beam_tree_holds_the_search_and_its_best_path_is_the_completion():
    """sample.generate(..., beam_tree=True): every kept hypothesis, linked to its parent; each path's cum_logprob is
    the sum of its tokens' logprobs, recomputed by a plain forward; the returned completions' paths are marked."""
    m = tiny()
    stop = (3,)  # a stop token, so some hypotheses finish early
    for p in PROMPTS[:2]:
        got = generate(m, p, 8, num_beams=3, num_samples=2, stop_tokens=stop, beam_tree=True, tokenizer=LetterTok())
        nodes = {n['id']: n for n in got[0].beam_tree}
        assert sorted(nodes) == list(range(len(nodes)))
        for n in nodes.values():
            up, path = n, []
            while up is not None:
                path.append(up['token'])
                up = nodes.get(up['parent'])
            assert n['step'] == len(path) - 1 and n['text'] == LetterTok().decode([n['token']])
            assert n['cum_logprob'] == pytest.approx(seq_logprob(m, p, path[::-1]), abs=1e-3)
            kids = [k for k in nodes.values() if k['parent'] == n['id']]
            assert not (n['finished'] and kids)  # a finished hypothesis is never extended
            assert n['pruned'] == (not n['finished'] and not kids and not n['best'])
        for c in got:  # each completion's own path, root to leaf, is exactly its tokens
            best = sorted((n for n in c.beam_tree if n['best']), key=lambda n: n['step'])
            assert [n['token'] for n in best] == c.tokens
            assert [n['parent'] for n in best] == [None] + [n['id'] for n in best[:-1]]
        assert got[0].beam_tree != got[1].beam_tree  # two choices: the same nodes, another path marked
        assert [c.tokens for c in got] == [c.tokens for c in generate(m, p, 8, num_beams=3, num_samples=2,
                                                                      stop_tokens=stop)]  # the tree changes nothing
    with pytest.raises(ValueError, match='beam_tree needs a beam search'):
        generate(m, PROMPTS[0], 4, beam_tree=True)


# -----------------------------------------------------------------------------
# 8) stopping, streaming, validation

def test_stop_tokens_and_strings():
    m, tok = tiny(), LetterTok()
    full = generate(m, PROMPTS, 20, temperature=0, tokenizer=tok)
    assert all(c.finish_reason == 'length' and len(c.tokens) == 20 for c in full)
    # a stop token: the row ends on it (included in tokens, not in text)
    stop = full[0].tokens[6]
    first = full[0].tokens.index(stop)
    c = generate(m, PROMPTS[0], 20, temperature=0, tokenizer=tok, stop_tokens=[stop])[0]
    assert c.tokens == full[0].tokens[:first + 1] and c.finish_reason == 'stop'
    assert c.text == tok.decode(full[0].tokens[:first])
    # a stop string spanning tokens: text is cut before it, tokens end where it completed
    text = full[0].text
    s = text[8:11]
    cut = text.index(s)
    for use_cache in (True, False):
        c = generate(m, PROMPTS, 20, temperature=0, tokenizer=tok, stop_strings=[s], use_cache=use_cache)
        assert c[0].text == text[:cut] and c[0].finish_reason == 'stop' and c[0].tokens == full[0].tokens[:cut + 3]
        # the other rows go on alone (batch shrinking) and still equal their full runs, or stop at their own hit
        for row, ref in zip(c[1:], full[1:]):
            assert row.tokens == ref.tokens[:len(row.tokens)]
            assert (s in ref.text) == (row.finish_reason == 'stop')
    # streamed deltas add up to the text and never show a prefix of the stop string early
    events = list(generate_stream(m, PROMPTS[0], 20, temperature=0, tokenizer=tok, stop_strings=[s]))
    assert ''.join(e.text_delta for e in events) == text[:cut]
    assert [e.finish_reason for e in events][-1] == 'stop' and all(e.finish_reason is None for e in events[:-1])
    # eot stops by default, unless stop_tokens is given
    tok.eot = full[0].tokens[3]
    assert generate(m, PROMPTS[0], 20, temperature=0, tokenizer=tok)[0].finish_reason == 'stop'
    assert len(generate(m, PROMPTS[0], 20, temperature=0, tokenizer=tok, stop_tokens=())[0].tokens) == 20


def test_text_stream_holds_back_split_utf8():
    tok = SimpleNamespace(decode_bytes=bytes)  # a byte-level tokenizer: id = byte
    ts = decoding.TextStream(tok, stop_strings=[], stop_tokens={0})
    e = 'é'.encode()  # 2 bytes
    assert ts.push(ord('a'), False) == ('a', None)
    assert ts.push(e[0], False) == ('', None)  # half a character: held back, no U+FFFD
    assert ts.push(e[1], False) == ('é', None)
    assert ts.push(e[0], False) == ('', None)
    assert ts.push(0, False) == ('\ufffd', 'stop')  # the end: what is left is shown, as U+FFFD if it is broken
    assert decoding._utf8_safe_len('€'.encode()[:2]) == 0 and decoding._utf8_safe_len(b'ab') == 2


def test_logprobs_and_top_alternatives():
    m = tiny()
    c = generate(m, PROMPTS[0], 5, temperature=0, logprobs=3)[0]
    assert len(c.top_logprobs) == 5 and all(len(t) == 3 for t in c.top_logprobs)
    for tok, lp, top in zip(c.tokens, c.token_logprobs, c.top_logprobs):
        assert top[0][0] == tok and top[0][1] == pytest.approx(lp)  # greedy picks the likeliest
        assert top[0][1] >= top[1][1] >= top[2][1]
    # logprobs come from the raw distribution: sampling settings do not change them
    d = generate(m, PROMPTS[0], 5, temperature=0, repetition_penalty=1.3)[0]
    k = next((i for i, (a, b) in enumerate(zip(c.tokens, d.tokens)) if a != b), len(d.tokens))
    assert d.token_logprobs[:k] == pytest.approx(c.token_logprobs[:k])


def test_context_overflow_slides():
    m = tiny(block_size=32)
    prompt = [i % 90 for i in range(50)]  # longer than block_size
    lengths, forward = [], m.forward
    m.forward = lambda idx, **kw: (lengths.append(idx.size(1)), forward(idx, **kw))[1]
    a = generate(m, prompt, 70, temperature=0)[0]
    del m.forward
    # one prefill of the last 31 prompt tokens, then a rebuild from the last 16 each time the window fills
    prefills = [n for n in lengths if n > 1]
    assert prefills[0] == 31 and len(prefills) >= 4 and set(prefills[1:]) == {16}
    b = generate(m, prompt, 70, temperature=0, use_cache=False)[0]
    assert len(a.tokens) == len(b.tokens) == 70
    assert a.tokens[:2] == b.tokens[:2]  # the same until the window first fills (then the two slide differently)
    assert a.tokens == generate(m, prompt[-31:], 70, temperature=0)[0].tokens  # truncation keeps the last 31


def test_truncation_warns(capsys):
    generate(tiny(block_size=32), list(range(40)), 2, temperature=0)
    assert capsys.readouterr().err.count('warning') == 1


def test_zero_new_tokens_and_sample_counts():
    m = tiny()
    out = generate(m, PROMPTS, 0, num_samples=2)
    assert len(out) == 6 and all(c.tokens == [] and c.finish_reason == 'length' for c in out)


@pytest.mark.parametrize('kw, name', [
    (dict(temperature=-1), 'temperature'), (dict(top_p=0), 'top_p'), (dict(top_p=1.5), 'top_p'),
    (dict(top_k=-1), 'top_k'), (dict(min_p=1.0), 'min_p'), (dict(min_p=-0.1), 'min_p'), (dict(num_beams=0), 'num_beams'),
    (dict(repetition_penalty=0), 'repetition_penalty'), (dict(max_new_tokens=-1), 'max_new_tokens'),
    (dict(num_samples=0), 'num_samples'), (dict(stop_strings=['x']), 'tokenizer'), (dict(prompts=[]), 'empty'),
    (dict(prompts=[[1], []]), 'empty'), (dict(prompts=[1, 500]), 'vocab_size'), (dict(presence_penalty=3), 'presence'),
    (dict(num_beams=2, num_samples=3), 'num_samples'), (dict(logprobs=-1), 'logprobs'),
])
def test_bad_parameters_are_value_errors(kw, name):
    kw = dict(dict(prompts=[1, 2], max_new_tokens=3), **kw)
    with pytest.raises(ValueError, match=name):  # at the call, before any iteration: a server can answer 400 first
        generate_stream(tiny(), kw.pop('prompts'), kw.pop('max_new_tokens'), **kw)

# -----------------------------------------------------------------------------
# 9) the command line

@pytest.fixture(scope='module')
def ckpt_dir(tmp_path_factory):
    from nanolab.tokenizer import CharTokenizer
    d = tmp_path_factory.mktemp('run')
    tok = CharTokenizer(text='ROMEO: Juliet, hello world!\nUser: Assistant: System: ')
    # model vocabulary padded past the tokenizer's, as GPT-2's is: generation must never pick those ids
    m = tiny(vocab_size=64)
    save_checkpoint({'model_args': asdict(m.config), 'model': m.state_dict(), 'tokenizer': tok.spec(), 'config': {}},
                    str(d / 'ckpt.pt'))
    return str(d)


def run_cli(*runs):
    """Run sample.py once per (args, stdin), all at once (each process mostly waits on importing torch)."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    procs = [(subprocess.Popen([sys.executable, os.path.join(ROOT, 'sample.py'), *args], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env), stdin)
             for args, stdin in runs]
    return [SimpleNamespace(returncode=p.returncode, stdout=out, stderr=err)
            for p, stdin in procs for out, err in [p.communicate(stdin, timeout=120)]]


def test_cli_samples_compares_and_chats(ckpt_dir, tmp_path):
    (tmp_path / 'p.txt').write_text('ROMEO:')
    base = [f'--init_from={ckpt_dir}', '--device=cpu']
    plain, compare, probs, chat = run_cli(
        (base + [f'--start=FILE:{tmp_path / "p.txt"}', '--num_samples=2', '--max_new_tokens=30'], ''),
        (base + ['--start=ROMEO:', '--max_new_tokens=10', '--compare=greedy,beam,min_p'], ''),
        (base + ['--start=ROMEO:', '--max_new_tokens=4', '--show_probs=True', '--num_samples=1'], ''),
        (base + ['--chat=True', '--max_new_tokens=5'], 'hello\nworld\n'))
    for r in (plain, compare, probs, chat):
        assert r.returncode == 0, r.stderr
    assert plain.stdout.count('ROMEO:') == 2 and plain.stdout.count('---------------') == 2
    assert all(f'==== {n} ' in compare.stdout for n in ('greedy', 'beam', 'min_p'))
    assert probs.stdout.count('top-5:') == 4
    assert chat.stdout.count('> ') == 3  # two turns, then EOF at the third prompt


def test_cli_template_is_prompts_ids(ckpt_dir):
    """--template/--variables: the sample starts from prompts.prompt_ids (greedy, so the text is generate's)."""
    from nanolab import prompts
    from nanolab.checkpoint import load_model
    model, tok, _ = load_model(ckpt_dir)
    ids = prompts.prompt_ids(tok, 'play_scene', {'speaker': 'ROMEO', 'line': 'hello'})
    want = generate(model, ids, 8, temperature=0, tokenizer=tok)[0].text
    r, = run_cli(([f'--init_from={ckpt_dir}', '--device=cpu', '--template=play_scene', '--num_samples=1',
                   '--variables={"speaker": "ROMEO", "line": "hello"}', '--temperature=0', '--max_new_tokens=8'], ''))
    assert r.returncode == 0, r.stderr
    assert tok.decode(ids) + want in r.stdout, r.stdout  # after the settings it was given


def test_cli_errors_are_one_line(ckpt_dir):
    cases = [('--init_from=out-does-not-exist', 'does not exist'), ('--temperature=-1', 'temperature'),
             ('--compare=greedy,nucleus', 'nucleus'), ('--start=FILE:/no/such/file.txt', 'prompt file'),
             ('--template=play_scen', 'did you mean play_scene'), ('--template=story', 'missing opening'),
             ('--template=story --variables={bad', '--variables must be a JSON object')]
    runs = run_cli(*[([f'--init_from={ckpt_dir}', '--device=cpu', '--max_new_tokens=3', *arg.split(' ')], '')
                     for arg, _ in cases])
    for (arg, msg), r in zip(cases, runs):
        assert r.returncode != 0, arg
        assert msg in r.stderr and 'error' in r.stderr, (arg, r.stderr)
        assert 'Traceback' not in r.stderr, arg


def test_a_temperature_below_min_temperature_is_greedy():
    """logits / 1e-40 overflow to inf and softmax(inf) is NaN: such a temperature decodes as greedy, which is what it
    stands for, and Settings.check says so in the settings it returns."""
    import torch
    from nanolab.decoding import MIN_TEMPERATURE, Settings
    from model import GPT, GPTConfig
    from sample import generate
    assert Settings(temperature=1e-40).check(50).temperature == 0.0
    assert Settings(temperature=MIN_TEMPERATURE).check(50).temperature == MIN_TEMPERATURE
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=50)).eval()
    want = generate(m, [1, 2, 3], 8, temperature=0.0)[0].tokens
    assert all(generate(m, [1, 2, 3], 8, temperature=t, seed=1)[0].tokens == want for t in (1e-40, 1e-30, 1e-6))
