"""serve.py over real HTTP on 127.0.0.1 (port 0, server in a thread of this process), against references:
sample.generate on the same checkpoint alone (greedy, seeded sampling, beam search, chat), a direct forward for
echo + logprobs scoring, the tokenizer itself; OpenAI's response, chunk and error shapes; a client that goes away.
Two tiny random models saved as runs: a char-level GPT-2 and a tiktoken Llama. CPU, about 20 seconds."""
import contextlib
import copy
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from nanolab import quantize
from nanolab.server import load_engines, make_server
from model import GPT, GPTConfig
from nanolab.checkpoint import load_model, save_checkpoint  # tests/conftest.py puts the repo root on sys.path
from sample import generate
from nanolab.tokenizer import CharTokenizer, TiktokenTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHARS = 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ :.,!?\n'  # holds the chat markers' characters


def save_run(path, config, tok, stage=None):
    """A random model with sharp weights ~N(0, 0.3), so greedy paths vary and top-token margins dwarf float noise
    (as tests/test_sample.py), saved as a run directory the way train.py leaves one (stage: which trainer wrote it,
    as model.checkpoint_stage reads it: 'sft' makes the page open it in chat mode)."""
    torch.manual_seed(0)
    m = GPT(config)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    save_checkpoint({'model_args': asdict(config), 'model': m.state_dict(), 'tokenizer': tok.spec(),
                     **({'stage': stage} if stage else {})}, os.path.join(path, 'ckpt.pt'))


def two_runs(d):
    """d/char (a char-level GPT-2) and d/bpe (a Llama over GPT-2's BPE), random weights; test_web.py uses it too."""
    save_run(d / 'char', GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=256, vocab_size=len(CHARS)),
             CharTokenizer(chars=''.join(sorted(CHARS))), stage='sft')
    save_run(d / 'bpe', GPTConfig(arch='llama', n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=64),
             TiktokenTokenizer('gpt2'), stage='sft')
    return d


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    d = two_runs(tmp_path_factory.mktemp('runs'))
    (d / 'char' / 'metrics.jsonl').write_text('{"iter": 0, "loss": 4.1}\n{"iter": 10, "loss": 3.2}\n{"iter": 2')
    (d / 'char' / 'config.json').write_text('{"n_layer": 2}')
    return d


@contextlib.contextmanager
def slow(worker, seconds):
    """Each forward of the worker's model takes `seconds` longer, so a stream lasts long enough to watch (or to
    share its steps with another request); tests/test_web.py uses it too."""
    forward = worker.model.forward

    def slowed(*a, **k):
        time.sleep(seconds)
        return forward(*a, **k)
    worker.model.forward = slowed  # an instance attribute: nn.Module.__call__ calls it
    try:
        yield
    finally:
        del worker.model.forward


@contextlib.contextmanager
def serving(runs_dir, max_batch=4, source=None, max_models=8, server=None, **limits):
    """serve.py in this process on a free port, over a directory of runs (serving source, default all of them);
    server: more of make_server's arguments. tests/test_web.py and tests/test_jobs.py use it too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest, and the machine is shared
    engines = load_engines(str(source or runs_dir), 'cpu', torch.float32, max_batch=max_batch,
                                 **{'max_rows': 64, 'max_prompt_tokens': 4096, 'prefill_chunk': 16, **limits})
    srv = make_server(engines, port=0, runs_dir=str(runs_dir), max_models=max_models, **(server or {}))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        srv.jobs.close()
        for w in srv.engines.values():  # what is loaded now: POST /v1/models/load may have changed it
            w.stop()
        torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def server(runs):
    with serving(runs) as srv:
        yield srv


@pytest.fixture(scope='module')
def ref(runs):
    """The same checkpoints loaded separately: the reference side of every comparison."""
    return {name: load_model(str(runs / name))[:2] for name in ('char', 'bpe')}


def call(srv, method, path, body=None, raw=None, headers=None):
    """One HTTP request -> (status, parsed JSON or raw bytes)."""
    conn = http.client.HTTPConnection('127.0.0.1', srv.server_address[1], timeout=60)
    data = raw if raw is not None else json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=data, headers={'Content-Type': 'application/json', **(headers or {})})
    r = conn.getresponse()
    payload = r.read()
    conn.close()
    return r.status, json.loads(payload) if r.getheader('Content-Type') == 'application/json' else payload


def events(payload):
    """SSE body -> the data of each event (parsed JSON, or the string '[DONE]')."""
    out = []
    for block in payload.decode().split('\n\n'):
        if block.strip():
            assert block.startswith('data: '), block
            data = block[len('data: '):]
            out.append(data if data == '[DONE]' else json.loads(data))
    return out


def greedy(ref, name, prompt, n, **kw):
    model, tok = ref[name]
    ids = tok.encode(prompt) if isinstance(prompt, str) else prompt
    return generate(model, ids, n, temperature=0.0, tokenizer=tok, **kw)[0]


def test_models_static_and_help(server):
    status, body = call(server, 'GET', '/v1/models')
    assert status == 200 and body['object'] == 'list'
    assert {m['id']: m['max_model_len'] for m in body['data']} == {'bpe': 64, 'char': 256}
    assert all(m['object'] == 'model' and m['owned_by'] == 'nanolab' for m in body['data'])
    status, page = call(server, 'GET', '/')
    assert status == 200 and b'<html' in page
    status, body = call(server, 'GET', '/runs')  # the half-written last row of a running training is skipped
    (run,) = body['data']
    assert abs(run.pop('updated') - os.path.getmtime(os.path.join(server.runs_dir, 'char', 'metrics.jsonl'))) < 1e-3
    assert run == {'name': 'char', 'served': True, 'config': {'n_layer': 2},
                   'metrics': [{'iter': 0, 'loss': 4.1}, {'iter': 10, 'loss': 3.2}]}
    out = subprocess.run([sys.executable, 'serve.py', '--help'], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and 'max_batch' in out.stdout and 'api_key' in out.stdout


def test_completion_equals_generate_and_stream_equals_reply(server, ref):
    want = greedy(ref, 'char', 'To be', 40)
    status, body = call(server, 'POST', '/v1/completions', {'model': 'char', 'prompt': 'To be', 'max_tokens': 40,
                                                            'temperature': 0})
    assert status == 200 and body['object'] == 'text_completion' and body['id'].startswith('cmpl-')
    (choice,) = body['choices']
    assert choice['text'] == want.text and choice['finish_reason'] == want.finish_reason == 'length'
    assert body['usage'] == {'prompt_tokens': 5, 'completion_tokens': 40, 'total_tokens': 45}
    # the same request streamed: OpenAI's chunks, [DONE] last, a usage chunk when asked for
    status, payload = call(server, 'POST', '/v1/completions', {'model': 'char', 'prompt': 'To be', 'max_tokens': 40,
                           'temperature': 0, 'stream': True, 'stream_options': {'include_usage': True}})
    evs = events(payload)
    assert status == 200 and evs[-1] == '[DONE]' and len(evs) > 3
    chunks, usage = evs[:-2], evs[-2]
    assert all(c['object'] == 'text_completion' and c['id'] == chunks[0]['id'] for c in chunks)
    assert ''.join(c['choices'][0]['text'] for c in chunks) == want.text
    assert chunks[-1]['choices'][0]['finish_reason'] == 'length'
    assert usage['choices'] == [] and usage['usage']['completion_tokens'] == 40
    # OpenAI: with include_usage every chunk before the last says "usage": null; without it, none says it
    assert all('usage' in c and c['usage'] is None for c in chunks)
    assert not any('usage' in c for c in events(call(server, 'POST', '/v1/completions', {
        'model': 'char', 'prompt': 'To be', 'max_tokens': 5, 'stream': True})[1])[:-1])
    # streamed logprobs' text offsets count from the start of the text, as the unstreamed answer's do (with the
    # echoed prompt too)
    for echo in (False, True):
        req = {'model': 'char', 'prompt': 'To be', 'max_tokens': 12, 'temperature': 0, 'logprobs': 2, 'echo': echo}
        whole = call(server, 'POST', '/v1/completions', req)[1]['choices'][0]['logprobs']
        parts = [c['choices'][0]['logprobs'] for c in events(call(server, 'POST', '/v1/completions',
                                                                  {**req, 'stream': True})[1])[:-1]
                 if c['choices'][0].get('logprobs')]
        assert sum((p['text_offset'] for p in parts), []) == whole['text_offset'] and len(whole['text_offset']) >= 12
        assert sum((p['tokens'] for p in parts), []) == whole['tokens']


def test_chat_stream_and_logprobs(server, ref):
    model, tok = ref['char']
    messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hello there'}]
    ids, _ = tok.render_chat(messages, add_generation_prompt=True)
    want = generate(model, ids, 30, temperature=0.0, tokenizer=tok, stop_tokens=tok.chat_stop_tokens,
                    stop_strings=tok.stop_strings)[0]
    body = {'model': 'char', 'messages': messages, 'max_tokens': 30, 'temperature': 0}
    status, reply = call(server, 'POST', '/v1/chat/completions', body)
    assert status == 200 and reply['object'] == 'chat.completion'
    assert reply['choices'][0]['message'] == {'role': 'assistant', 'content': want.text}
    # OpenAI's developer role is the system role
    status, dev = call(server, 'POST', '/v1/chat/completions',
                       {**body, 'messages': [{**messages[0], 'role': 'developer'}, messages[1]]})
    assert status == 200 and dev['choices'] == reply['choices'] and dev['usage'] == reply['usage']
    assert reply['usage']['prompt_tokens'] == len(ids)
    status, payload = call(server, 'POST', '/v1/chat/completions', {**body, 'stream': True})
    evs = events(payload)
    assert evs[-1] == '[DONE]' and all(c['object'] == 'chat.completion.chunk' for c in evs[:-1])
    assert evs[0]['choices'][0]['delta'] == {'role': 'assistant', 'content': ''}
    assert ''.join(c['choices'][0]['delta'].get('content', '') for c in evs[:-1]) == want.text
    assert evs[-2]['choices'][0]['finish_reason'] == want.finish_reason
    # chat logprobs in OpenAI's chat format, equal to sample.generate's
    want = generate(model, ids, 5, temperature=0.0, tokenizer=tok, stop_tokens=tok.chat_stop_tokens,
                    stop_strings=tok.stop_strings, logprobs=3)[0]
    status, reply = call(server, 'POST', '/v1/chat/completions',
                         {**body, 'max_tokens': 5, 'logprobs': True, 'top_logprobs': 3})
    content = reply['choices'][0]['logprobs']['content']
    assert [c['token'] for c in content] == [tok.decode([t]) for t in want.tokens]
    assert [c['logprob'] for c in content] == pytest.approx(want.token_logprobs, abs=1e-4)
    assert all(len(c['top_logprobs']) == 3 and c['bytes'] == list(c['token'].encode()) for c in content)


def test_concurrent_requests_are_batched_and_each_equals_generate_alone(server, ref):
    prompts = ['Hello', 'A', 'The quick brown fox', 'ab ab ab', 'Zz', 'What is this?']
    lengths = [60, 45, 50, 70, 40, 55]
    results, barrier = {}, threading.Barrier(len(prompts))

    def client(i):
        barrier.wait()
        results[i] = call(server, 'POST', '/v1/completions', {'model': 'char', 'prompt': prompts[i],
                                                             'max_tokens': lengths[i], 'temperature': 0})

    peak = server.engines['char'].stats['peak_batch']
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, p in enumerate(prompts):
        status, body = results[i]
        assert status == 200 and body['choices'][0]['text'] == greedy(ref, 'char', p, lengths[i]).text, p
    stats = server.engines['char'].stats
    assert stats['peak_batch'] >= 2 and stats['peak_batch'] <= 4 and max(peak, 2) <= stats['peak_batch']


def test_a_long_prompt_is_prefilled_in_chunks_beside_a_stream_and_both_equal_generate(server, ref):
    """A 2-token prompt that will run 60 tokens, joined by a 50-token prompt: the server prefills 16 prompt tokens
    a step (prefill_chunk), so the long prompt goes in as 4 chunks in the same forwards as the stream's tokens, at
    other positions of the cache; the slot grows past its first size on the way. Each reply equals generate alone."""
    w, tok = server.engines['bpe'], ref['bpe'][1]
    short, long = [tok.encode('Hi')[0], 5], list(range(1000, 1050))
    chunks = w.stats['chunks']
    conn = http.client.HTTPConnection('127.0.0.1', server.server_address[1], timeout=60)
    conn.request('POST', '/v1/completions', json.dumps({'model': 'bpe', 'prompt': short, 'max_tokens': 60,
                 'temperature': 0, 'stream': True}), {'Content-Type': 'application/json'})
    r = conn.getresponse()
    first = r.readline()  # the stream has started: the short row is running
    status, body = call(server, 'POST', '/v1/completions', {'model': 'bpe', 'prompt': long, 'max_tokens': 10,
                                                            'temperature': 0})
    streamed = first + r.read()
    conn.close()
    text = ''.join(e['choices'][0]['text'] for e in events(streamed)[:-1])
    assert status == 200 and body['choices'][0]['text'] == greedy(ref, 'bpe', long, 10).text
    assert text == greedy(ref, 'bpe', short, 60).text
    assert w.stats['chunks'] - chunks >= 5  # the short prompt's chunk, then 16 + 16 + 16 + 2


def test_seeded_sampling_is_the_same_whatever_the_batch(server, ref):
    model, tok = ref['char']
    body = {'model': 'char', 'prompt': 'Once', 'max_tokens': 40, 'temperature': 1.0, 'top_k': 20, 'seed': 123, 'n': 2}
    status, alone = call(server, 'POST', '/v1/completions', body)
    texts = [c['text'] for c in alone['choices']]
    assert texts[0] != texts[1]  # sample i draws with seed + i
    for i in range(2):  # and each equals sample.generate with that seed, alone
        assert texts[i] == generate(model, tok.encode('Once'), 40, temperature=1.0, top_k=20, seed=123 + i,
                                    tokenizer=tok)[0].text
    results = {}

    def client(key, b):
        results[key] = call(server, 'POST', '/v1/completions', b)

    others = [{'model': 'char', 'prompt': p, 'max_tokens': 50, 'temperature': 0.9, 'seed': s}
              for p, s in (('Hi', 1), ('Yes and', None), ('no', 5))]
    threads = [threading.Thread(target=client, args=(k, b)) for k, b in [('seeded', body)] + list(enumerate(others))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [c['text'] for c in results['seeded'][1]['choices']] == texts


def test_beam_search_equals_generate(server, ref):
    model, tok = ref['char']
    want = [c.text for c in generate(model, tok.encode('So'), 12, num_beams=3, num_samples=2, tokenizer=tok)]
    status, body = call(server, 'POST', '/v1/completions', {'model': 'char', 'prompt': 'So', 'max_tokens': 12,
                                                            'num_beams': 3, 'n': 2})
    assert status == 200 and [c['text'] for c in body['choices']] == want


def test_beam_tree_through_the_api(server, ref):
    """"beam_tree": true gives each choice the tree of sample.generate's, whose best path spells the choice's text;
    streamed, the finishing chunk carries it; without a beam search it is a 400 naming the field."""
    model, tok = ref['char']
    want = generate(model, tok.encode('So'), 10, num_beams=3, num_samples=2, tokenizer=tok, beam_tree=True)
    req = {'model': 'char', 'prompt': 'So', 'max_tokens': 10, 'num_beams': 3, 'n': 2, 'beam_tree': True}
    FLOATS = ('logprob', 'cum_logprob', 'score')
    def same(a, b):  # the server's model is for_inference's (another head layout): floats agree to rounding
        return len(a) == len(b) and all({k: v for k, v in x.items() if k not in FLOATS} ==
                                        {k: v for k, v in y.items() if k not in FLOATS} and
                                        all(abs(x[k] - y[k]) < 1e-5 for k in FLOATS) for x, y in zip(a, b))
    status, body = call(server, 'POST', '/v1/completions', req)
    assert status == 200
    for c, w in zip(body['choices'], want):
        assert same(c['beam_tree'], w.beam_tree)
        best = sorted((n for n in c['beam_tree'] if n['best']), key=lambda n: n['step'])
        assert ''.join(n['text'] for n in best) == c['text'] == w.text
    status, raw = call(server, 'POST', '/v1/completions', {**req, 'stream': True})
    chunks = [e for e in events(raw) if e != '[DONE]' and e['choices']]
    trees = {ch['choices'][0]['index']: ch['choices'][0]['beam_tree'] for ch in chunks if 'beam_tree' in ch['choices'][0]}
    assert sorted(trees) == [0, 1] and all(same(trees[i], want[i].beam_tree) for i in trees)
    status, body = call(server, 'POST', '/v1/completions', {**req, 'num_beams': 1, 'n': 1})
    assert status == 400 and body['error']['param'] == 'beam_tree'


def test_templates_give_the_same_ids_as_python(server, ref):
    """prompts.py over the API: GET /v1/templates; /tokenize with a template == prompts.prompt_ids in Python; a
    completion from a text template == generate on those ids; a chat template renders the chat's ids; errors name
    the variable."""
    from nanolab import prompts
    model, tok = ref['char']
    status, body = call(server, 'GET', '/v1/templates')
    assert status == 200 and len(body['data']) == len(prompts.TEMPLATES) >= 20
    values = {'speaker': 'ROMEO', 'line': 'So be it'}
    want = prompts.prompt_ids(tok, 'play_scene', values)
    assert call(server, 'POST', '/tokenize', {'model': 'char', 'template': 'play_scene', 'variables': values})[1]['tokens'] == want
    got = call(server, 'POST', '/v1/completions', {'model': 'char', 'template': 'play_scene', 'variables': values,
                                                   'max_tokens': 10, 'temperature': 0})[1]['choices'][0]['text']
    assert got == generate(model, want, 10, temperature=0, tokenizer=tok)[0].text
    chat_ids = prompts.prompt_ids(tok, 'instruction', {'instruction': 'So be it'})
    assert call(server, 'POST', '/tokenize', {'model': 'char', 'template': 'instruction',
                                              'variables': {'instruction': 'So be it'}})[1]['tokens'] == chat_ids
    assert chat_ids == tok.render_chat([{'role': 'user', 'content': 'So be it'}], add_generation_prompt=True)[0]
    status, body = call(server, 'POST', '/v1/chat/completions', {'model': 'char', 'template': 'instruction',
                                                                 'variables': {'instruction': 'So be it'}, 'max_tokens': 3})
    assert status == 200
    for req, msg in (({'template': 'play_scene', 'variables': {'speaker': 'X'}}, 'missing line'),
                     ({'template': 'instruction', 'variables': {'instruction': 'x'}}, 'chat template'),
                     ({'template': 'nope'}, 'unknown template')):
        status, body = call(server, 'POST', '/v1/completions', {'model': 'char', **req})
        assert status == 400 and body['error']['param'] == 'template' and msg in body['error']['message'], body


def test_a_seeded_request_is_the_same_through_generate_the_cli_and_the_server(server, ref, runs):
    """engine.py's seeding rule, end to end: sample i of seed s is the same text from sample.generate (n samples at
    once), from sample.py (one sample at a time, seed + k) and from /v1/completions, for n = 1 and n = 3."""
    model, tok = ref['char']
    for n in (1, 3):
        lib = [c.text for c in generate(model, tok.encode('ROMEO:'), 30, temperature=1.0, top_k=0, seed=7,
                                        num_samples=n, tokenizer=tok)]
        status, body = call(server, 'POST', '/v1/completions', {'model': 'char', 'prompt': 'ROMEO:', 'max_tokens': 30,
                                                                'temperature': 1.0, 'seed': 7, 'n': n})
        assert status == 200 and [c['text'] for c in body['choices']] == lib
        cli = subprocess.run([sys.executable, 'sample.py', f'--init_from={runs / "char"}', '--device=cpu',
                              '--start=ROMEO:', '--max_new_tokens=30', '--temperature=1.0', '--top_k=0', '--seed=7',
                              f'--num_samples={n}'], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0, cli.stderr
        out = re.sub(r'(?m)^\w+ = .*  \(from .*\)\n', '', cli.stdout)  # the resolved config comes first
        printed = [s.removeprefix('ROMEO:') for s in out.split('\n---------------\n')[:-1]]
        assert printed == lib
    assert len(set(lib)) == 3  # three different samples


def test_a_client_that_hangs_up_mid_beam_search_frees_its_rows_within_a_step(server):
    w = server.engines['char']
    body = json.dumps({'model': 'char', 'prompt': ['So', 'To be'], 'max_tokens': 200, 'num_beams': 2}).encode()
    forward = w.model.forward

    def slowed(*a, **k):  # steps long enough to count them
        time.sleep(0.02)
        return forward(*a, **k)
    w.model.forward = slowed
    try:
        s = socket.create_connection(('127.0.0.1', server.server_address[1]))
        s.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n'
                  b'Content-Length: %d\r\n\r\n%s' % (len(body), body))
        start = w.stats['steps']
        while w.stats['steps'] < start + 5:  # the search is under way (both prompts: 4 slots)
            time.sleep(0.005)
        s.close()
        closed = w.stats['steps']
        deadline = time.time() + 10
        while w.busy() and time.time() < deadline:
            time.sleep(0.002)
        assert not w.busy() and w.stats['steps'] - closed <= 2  # the handler notices at the next step's event
    finally:
        del w.model.forward


def test_an_over_limit_request_gets_a_400_while_a_stream_keeps_streaming(server, ref):
    conn = http.client.HTTPConnection('127.0.0.1', server.server_address[1], timeout=60)
    conn.request('POST', '/v1/completions', json.dumps({'model': 'char', 'prompt': 'Hello', 'max_tokens': 80,
                 'temperature': 0, 'stream': True}), {'Content-Type': 'application/json'})
    r = conn.getresponse()
    first = r.readline()
    for body, limit in [({'prompt': ['a'] * 65}, 'max_rows'), ({'prompt': 'a', 'n': 5}, 'max_batch'),
                        ({'prompt': [[1] * 200] * 50}, 'max_prompt_tokens')]:
        status, err = call(server, 'POST', '/v1/completions', {'model': 'char', 'max_tokens': 1, **body})
        assert status == 400 and f'--{limit}' in err['error']['message'], err
    text = ''.join(e['choices'][0]['text'] for e in events(first + r.read())[:-1])
    conn.close()
    assert text == greedy(ref, 'char', 'Hello', 80).text


def test_echo_logprobs_scoring_equals_a_direct_forward(server, ref):
    model, tok = ref['bpe']
    prompts = [tok.encode('The cat sat on the mat'), tok.encode('Hello, world! How are you?')]
    status, body = call(server, 'POST', '/v1/completions', {'model': 'bpe', 'prompt': prompts, 'echo': True,
                                                            'max_tokens': 0, 'logprobs': 2, 'temperature': 0})
    assert status == 200 and len(body['choices']) == 2
    for p, c in zip(prompts, body['choices']):
        lp = c['logprobs']
        assert c['text'] == tok.decode(p) and lp['tokens'] == [tok.decode([t]) for t in p]
        with torch.no_grad():
            logits = model(torch.tensor([p]))[0][0, :, :tok.vocab_size]
        want = F.log_softmax(logits.float(), -1)[torch.arange(len(p) - 1), p[1:]].tolist()
        assert lp['token_logprobs'][0] is None and lp['top_logprobs'][0] is None
        assert lp['token_logprobs'][1:] == pytest.approx(want, abs=1e-4)
        assert all(len(top) == 2 for top in lp['top_logprobs'][1:])
    assert body['usage']['completion_tokens'] == 0
    # lm-eval's loglikelihood request: max_tokens=1, logprobs=1; a greedy token's logprob is its top-1 value
    status, body = call(server, 'POST', '/v1/completions', {'model': 'bpe', 'prompt': prompts, 'echo': True,
                                                            'max_tokens': 1, 'logprobs': 1, 'temperature': 0})
    for p, c in zip(prompts, body['choices']):
        lp = c['logprobs']
        assert len(lp['token_logprobs']) == len(p) + 1
        assert lp['token_logprobs'][-1] == max(lp['top_logprobs'][-1].values())


def test_tokenizer_endpoints(server, ref):
    tok = ref['bpe'][1]
    status, body = call(server, 'POST', '/tokenize', {'model': 'bpe', 'prompt': 'Hello world, ça va?'})
    assert status == 200 and body['tokens'] == tok.encode('Hello world, ça va?') and body['count'] == len(body['tokens'])
    status, back = call(server, 'POST', '/detokenize', {'model': 'bpe', 'tokens': body['tokens']})
    assert status == 200 and back['prompt'] == 'Hello world, ça va?'
    status, info = call(server, 'GET', '/tokenizer_info?model=bpe')
    assert status == 200 and info['eos_token'] == '<|endoftext|>' and info['max_model_len'] == 64
    # lm-eval's remote tokenizer: no model field, and the eos string must tokenize to the eos id
    status, body = call(server, 'POST', '/tokenize', {'prompt': '<|endoftext|>', 'add_special_tokens': False,
                                                      'model': 'bpe'})
    assert body['tokens'] == [tok.eot]
    status, body = call(server, 'POST', '/tokenize', {'model': 'char', 'prompt': 'abc'})
    assert body['tokens'] == ref['char'][1].encode('abc')


def test_lm_evals_api_model_scores_a_char_model_through_the_server(runs, ref):
    """lm-eval's local-completions model with its remote tokenizer (/tokenizer_info, /tokenize) against a char model,
    which has no end-of-text token: the rolling log-likelihood starts from the token the server names as its bos
    (it sent [[null, ...]] and failed before), and equals the model's own sum of log-probs after that token."""
    pytest.importorskip('tenacity')
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    model, tok = ref['char']
    # the remote tokenizer names no model: the server's first, so the char model is served alone
    with serving(runs, source=runs / 'char') as server:
        status, info = call(server, 'GET', '/tokenizer_info')
        bos = info['bos_token']
        assert info['eos_token_id'] is None and bos in ('\n', ' ') and info['bos_token_id'] == tok.encode(bos)[0] > 0
        lm = LocalCompletionsAPI(base_url=f'http://127.0.0.1:{server.server_address[1]}/v1/completions',
                                 model='char', tokenizer_backend='remote', max_length=256, max_retries=1)
        text = 'To be, or not to be: that is the question.'
        (got,) = lm.loglikelihood_rolling([Instance('loglikelihood_rolling', {}, (text,), 0)], disable_tqdm=True)
    ids = tok.encode(bos + text)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0][0].float(), -1)
    want = logp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
    assert got == pytest.approx(want, abs=1e-3)


def test_compile_serves_compiled_steps_and_loads_alike(runs, ref, monkeypatch):
    """serve.py --compile: a model's decode steps are compiled before it serves (torch.compile's own capture,
    backend='eager', stands in for inductor here), its greedy text is the eager model's, and POST /v1/models/load
    compiles the model it adds the same way (the engine's options)."""
    real = torch.compile
    monkeypatch.setattr(torch, 'compile', lambda m, **kw: real(m, backend='eager', **kw))
    torch._dynamo.reset()
    try:
        with serving(runs, source=runs / 'char', compile=True) as srv:
            w = srv.engines['char']
            assert w.decoder is not w.model and w.options['compile'] is True
            body = call(srv, 'POST', '/v1/completions', {'model': 'char', 'prompt': 'To be', 'max_tokens': 30,
                                                         'temperature': 0})[1]
            assert body['choices'][0]['text'] == greedy(ref, 'char', 'To be', 30).text
            status, _ = call(srv, 'POST', '/v1/models/load', {'source': str(runs / 'bpe'), 'name': 'bpe2'})
            assert status == 200 and srv.engines['bpe2'].decoder is not srv.engines['bpe2'].model
            body = call(srv, 'POST', '/v1/completions', {'model': 'bpe2', 'prompt': 'Hello', 'max_tokens': 12,
                                                         'temperature': 0})[1]
            assert body['choices'][0]['text'] == greedy(ref, 'bpe', 'Hello', 12).text
    finally:
        torch._dynamo.reset()


def test_response_format_makes_the_answer_follow_the_schema(server):
    """OpenAI's response_format on both endpoints, by constrained decoding: a random model's answer parses and
    validates against the schema, whole and streamed; json_object gives an object; a bad response_format or schema
    is a 400 that names response_format."""
    jsonschema = pytest.importorskip('jsonschema')
    schema = {'type': 'object', 'properties': {'ok': {'type': 'boolean'}, 'n': {'type': 'integer', 'minimum': 0,
              'maximum': 9}}, 'required': ['ok', 'n'], 'additionalProperties': False}
    rf = {'type': 'json_schema', 'json_schema': {'name': 'answer', 'schema': schema, 'strict': True}}
    chat = {'model': 'bpe', 'messages': [{'role': 'user', 'content': 'Hi'}], 'max_tokens': 30,
            'response_format': rf}
    for T in (0, 1.0):
        status, body = call(server, 'POST', '/v1/chat/completions', {**chat, 'temperature': T, 'seed': 3})
        assert status == 200 and body['choices'][0]['finish_reason'] == 'stop', body
        jsonschema.validate(json.loads(body['choices'][0]['message']['content']), schema)
    evs = events(call(server, 'POST', '/v1/chat/completions', {**chat, 'stream': True, 'temperature': 0.7})[1])
    text = ''.join(c['choices'][0]['delta'].get('content', '') for c in evs[:-1] if c['choices'])
    jsonschema.validate(json.loads(text), schema)
    status, body = call(server, 'POST', '/v1/completions', {'model': 'bpe', 'prompt': 'x', 'max_tokens': 40,
                                                            'response_format': {'type': 'json_object'}})
    # any object: a random model may not close it within the budget ('length'); what it wrote is one's start
    (c,) = body['choices']
    assert status == 200 and c['text'].startswith('{')
    assert c['finish_reason'] == 'length' or isinstance(json.loads(c['text']), dict)
    for bad in [{'type': 'yaml'}, 'json', {'type': 'json_schema'}, {'type': 'json_schema', 'json_schema': {
            'schema': {'type': 'objectx'}}}, {'type': 'json_schema', 'json_schema': {'schema': {'enum': ['x' * 99] * 400}}}]:
        status, body = call(server, 'POST', '/v1/chat/completions', {**chat, 'response_format': bad})
        assert status == 400 and body['error']['param'] == 'response_format', (bad, body)


def test_the_openai_clients_parse_helper_gets_an_object(server):
    """The official openai client's structured-output helper against the server: chat.completions.parse with a
    Pydantic model (its schema: titles, required fields, no extra properties) returns a parsed object from a random
    model, whole and streamed."""
    openai = pytest.importorskip('openai')
    from pydantic import BaseModel, Field

    class Answer(BaseModel):  # bounded, so a random model's answer ends within max_tokens
        ok: bool
        level: int = Field(ge=0, le=9)

    client = openai.OpenAI(base_url=f'http://127.0.0.1:{server.server_address[1]}/v1', api_key='unused', max_retries=0)
    parse = getattr(client.chat.completions, 'parse', None) or client.beta.chat.completions.parse
    reply = parse(model='bpe', messages=[{'role': 'user', 'content': 'Hi'}], response_format=Answer, max_tokens=40,
                  temperature=0)
    got = reply.choices[0].message.parsed
    assert isinstance(got, Answer) and reply.choices[0].finish_reason == 'stop'
    stream_ = getattr(client.chat.completions, 'stream', None) or client.beta.chat.completions.stream
    with stream_(model='bpe', messages=[{'role': 'user', 'content': 'Hi'}], response_format=Answer, max_tokens=40,
                 temperature=0) as s:
        final = s.get_final_completion()
    assert final.choices[0].message.parsed == got


@pytest.fixture(scope='module')
def gpt2_server(tmp_path_factory):
    """serve.py over one tiny random model on GPT-2's vocabulary with a 512-token context: room for a tool list."""
    from model import GPT, GPTConfig
    from nanolab.tokenizer import TiktokenTokenizer
    d = tmp_path_factory.mktemp('gpt2runs')
    torch.manual_seed(0)
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=512, vocab_size=50304)).save_pretrained(
        d / 'gpt2', TiktokenTokenizer('gpt2'))
    with serving(d, source=d / 'gpt2') as srv:
        yield srv


def test_tool_calls_round_trip(gpt2_server, server):
    """tools by constrained decoding, through the official openai client: a required call parses into the Pydantic
    model of its tool (parse's parsed_arguments), whole and streamed (the deltas add up to the same call); the call
    and its result go back in (an assistant message with tool_calls, then a tool message) and the model answers; a
    named tool_choice calls that tool, parallel_tool_calls false makes one call; the raw-socket side: every bad
    tools, tool_choice, parallel_tool_calls, logit_bias or grammar is a 400 naming its field."""
    openai = pytest.importorskip('openai')
    from pydantic import BaseModel, Field

    class GetWeather(BaseModel):
        city: str = Field(max_length=8)
        days: int = Field(ge=1, le=7)

    class Noon(BaseModel):
        hour: int = Field(ge=0, le=23)

    tools = [openai.pydantic_function_tool(GetWeather), openai.pydantic_function_tool(Noon)]
    client = openai.OpenAI(base_url=f'http://127.0.0.1:{gpt2_server.server_address[1]}/v1', api_key='unused', max_retries=0)
    parse = getattr(client.chat.completions, 'parse', None) or client.beta.chat.completions.parse
    msgs = [{'role': 'developer', 'content': 'Use tools.'}, {'role': 'user', 'content': 'Weather in Oslo?'}]
    reply = parse(model='gpt2', messages=msgs, tools=tools, tool_choice='required', max_tokens=120, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == 'tool_calls' and choice.message.content is None, choice
    calls = choice.message.tool_calls
    assert calls and all(type(c.function.parsed_arguments).__name__ == c.function.name for c in calls)
    stream_ = getattr(client.chat.completions, 'stream', None) or client.beta.chat.completions.stream
    with stream_(model='gpt2', messages=msgs, tools=tools, tool_choice='required', max_tokens=120,
                 temperature=0) as st:
        final = st.get_final_completion()
    assert [(c.function.name, c.function.arguments) for c in final.choices[0].message.tool_calls] == \
        [(c.function.name, c.function.arguments) for c in calls]
    # the round trip: the call, its result, then an answer in text
    msgs += [choice.message.model_dump(exclude_none=True, include={'role', 'content', 'tool_calls'}),
             {'role': 'tool', 'tool_call_id': calls[0].id, 'content': '{"temperature": 21}'}]
    answer = client.chat.completions.create(model='gpt2', messages=msgs, tools=tools, tool_choice='none', max_tokens=8)
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].finish_reason in ('stop', 'length')
    base = {'model': 'gpt2', 'messages': msgs[:2], 'tools': tools, 'max_tokens': 120}
    for T in (0, 1.5):
        one = call(gpt2_server, 'POST', '/v1/chat/completions', {
            **base, 'temperature': T, 'seed': 1, 'parallel_tool_calls': False,
            'tool_choice': {'type': 'function', 'function': {'name': 'Noon'}}})[1]['choices'][0]
        if one['finish_reason'] == 'tool_calls':
            (c,) = one['message']['tool_calls']
            assert c['function']['name'] == 'Noon' and 0 <= json.loads(c['function']['arguments'])['hour'] <= 23
    for seed in range(4):  # auto: a call, or a text that does not start like one
        m = call(gpt2_server, 'POST', '/v1/chat/completions', {**base, 'temperature': 1.5, 'seed': seed,
                                                               'max_tokens': 40})[1]['choices'][0]['message']
        assert all(c['function']['name'] in ('GetWeather', 'Noon') for c in m['tool_calls']) if m.get('tool_calls') \
            else not m['content'].startswith('{'), m
    bad = [({'tools': 'x'}, 'tools'), ({'tools': [{'type': 'function', 'function': {'name': 'a b'}}]}, 'tools'),
           ({'tools': tools + tools[:1]}, 'tools'), ({'tool_choice': 'required', 'tools': None}, 'tool_choice'),
           ({'tool_choice': {'type': 'function', 'function': {'name': 'Nope'}}}, 'tool_choice'),
           ({'tool_choice': 'always'}, 'tool_choice'), ({'parallel_tool_calls': 'yes'}, 'parallel_tool_calls'),
           ({'tools': [{'type': 'function', 'function': {'name': 'f', 'parameters': {'type': 'objectx'}}}]}, 'tools'),
           ({'response_format': {'type': 'json_object'}}, 'tools'), ({'grammar': 'start: "a"'}, 'tools'),
           ({'tools': None, 'logit_bias': {'x': 1}}, 'logit_bias'), ({'tools': None, 'logit_bias': {'1': 101}},
                                                                     'logit_bias'),
           ({'tools': None, 'grammar': 5}, 'grammar'), ({'tools': None, 'grammar': 'start: ('}, 'grammar'),
           ({'messages': msgs[:2] + [{'role': 'assistant', 'tool_calls': [{'function': {'name': 'f',
                                                                                       'arguments': '{'}}]}]},
            'messages')]
    for extra, param in bad:
        body = {k: v for k, v in {**base, **extra}.items() if v is not None}
        status, got = call(gpt2_server, 'POST', '/v1/chat/completions', body)
        assert status == 400 and got['error']['param'] == param, (extra, got)
    # the char model's vocabulary has no '{': a call cannot be written, and the 400 says so
    status, got = call(server, 'POST', '/v1/chat/completions', {**base, 'model': 'char', 'messages': [
        {'role': 'user', 'content': 'Hi'}], 'tools': [{'type': 'function', 'function': {'name': 'f'}}], 'max_tokens': 5})
    assert status == 400 and got['error']['param'] == 'tools' and 'vocabulary' in got['error']['message'], got


def test_attention_maps(server):
    status, body = call(server, 'POST', '/v1/attention', {'model': 'char', 'prompt': 'abcd'})
    assert status == 200 and body['tokens'] == list('abcd')
    att = torch.tensor(body['attentions'])  # (n_layer, n_head, T, T)
    assert att.shape == (2, 4, 4, 4)
    assert torch.allclose(att.sum(-1), torch.ones(2, 4, 4), atol=1e-3) and att.triu(1).abs().max() == 0


def test_inspect_logit_lens_and_flow(server, ref):
    """/v1/inspect against the model itself: the lens's last layer is its own next-token distribution (top ids and
    probabilities), every layer's top predictions come in order, and the flow has a number per layer and position."""
    model, tok = ref['char']
    status, body = call(server, 'POST', '/v1/inspect', {'model': 'char', 'prompt': 'To be', 'top': 3})
    assert status == 200 and body['tokens'] == list('To be')
    L, T = model.config.n_layer, 5
    assert len(body['lens']) == L and all(len(row) == T and all(len(c) == 3 for c in row) for row in body['lens'])
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([tok.encode('To be')]))[0][0], -1)  # (T, V)
    p, i = probs.topk(3, dim=-1)
    assert [[c['id'] for c in cell] for cell in body['lens'][-1]] == i.tolist()
    assert torch.allclose(torch.tensor([[c['prob'] for c in cell] for cell in body['lens'][-1]]), p, atol=1e-3)
    assert all(cell[0]['prob'] >= cell[1]['prob'] >= cell[2]['prob'] for row in body['lens'] for cell in row)
    assert all(c['token'] == tok.decode([c['id']]) for cell in body['lens'][0] for c in cell)
    flow = body['flow']
    assert len(flow['embed']) == T and all(len(flow[k]) == L and len(flow[k][0]) == T for k in ('resid', 'attn', 'mlp'))
    assert len(flow['entropy']) == L and len(flow['entropy'][0]) == model.config.n_head
    assert all(e[0] == 0 for layer in flow['entropy'] for e in layer)  # the first token can only attend to itself
    status, body = call(server, 'POST', '/v1/inspect', {'model': 'char', 'prompt': 'x' * 500})
    assert status == 400 and body['error']['param'] == 'prompt'


BAD = [  # (method, path, body or raw bytes, status, param)
    ('POST', '/v1/completions', b'{"prompt": "a", ', 400, None),
    ('POST', '/v1/completions', [1, 2], 400, None),
    ('POST', '/v1/completions', {'prompt': 5}, 400, 'prompt'),
    ('POST', '/v1/completions', {'prompt': []}, 400, 'prompt'),
    ('POST', '/v1/completions', {'model': 'char', 'prompt': [9999]}, 400, 'prompt'),
    ('POST', '/v1/completions', {'model': 'char', 'prompt': 'ünïcode'}, 400, 'prompt'),
    ('POST', '/v1/completions', {'model': 'nope', 'prompt': 'a'}, 404, 'model'),
    ('POST', '/v1/completions', {'model': 'char', 'prompt': 'a', 'temperature': 3}, 400, 'temperature'),
    ('POST', '/v1/completions', {'model': 'char', 'prompt': 'a', 'temperature': -0.5}, 400, 'temperature'),
    ('POST', '/v1/completions', {'model': 'char', 'prompt': 'a', 'temperature': 'hot'}, 400, 'temperature'),
    ('POST', '/v1/completions', {'model': 'char', 'prompt': 'a', 'top_p': 0}, 400, 'top_p'),
    ('POST', '/v1/completions', {'model': 'char', 'prompt': 'a', 'top_p': 1.5}, 400, 'top_p'),
    ('POST', '/v1/completions', {'model': 'char', 'prompt': 'a', 'n': 0}, 400, 'n'),
    ('POST', '/v1/completions', {'model': 'char', 'prompt': 'a', 'n': 1000}, 400, 'n'),
    ('POST', '/v1/completions', {'model': 'char', 'prompt': 'a', 'max_tokens': -1}, 400, 'max_tokens'),
    ('POST', '/v1/completions', {'model': 'char', 'prompt': 'a', 'max_tokens': 10 ** 9}, 400, 'max_tokens'),
    ('POST', '/v1/completions', {'model': 'char', 'prompt': 'a', 'max_tokens': 1.5}, 400, 'max_tokens'),
    ('POST', '/v1/completions', {'model': 'char', 'prompt': 'a' * 250, 'max_tokens': 10}, 400, 'prompt'),
    ('POST', '/v1/completions', {'model': 'char', 'prompt': 'a', 'temprature': 0}, 400, 'temprature'),
    ('POST', '/v1/completions', {'model': 'char', 'prompt': 'a', 'stop': ['a', 'b', 'c', 'd', 'e']}, 400, 'stop'),
    ('POST', '/v1/completions', {'model': 'char', 'prompt': 'a', 'logprobs': 100}, 400, 'logprobs'),
    ('POST', '/v1/completions', {'model': 'char', 'prompt': 'a', 'presence_penalty': 5}, 400, 'presence_penalty'),
    ('POST', '/v1/completions', {'model': 'char', 'prompt': 'a', 'echo': 'yes'}, 400, 'echo'),
    ('POST', '/v1/chat/completions', {'model': 'char'}, 400, 'messages'),
    ('POST', '/v1/chat/completions', {'model': 'char', 'messages': [{'role': 'robot', 'content': 'hi'}]}, 400,
     'messages'),
    ('POST', '/v1/chat/completions', {'model': 'char', 'messages': [{'role': 'user', 'content': 'hi'}],
                                      'top_logprobs': 2}, 400, 'top_logprobs'),
    ('POST', '/tokenize', {'model': 'char', 'prompt': 5}, 400, 'prompt'),
    ('POST', '/detokenize', {'model': 'char', 'tokens': [1, 9999]}, 400, 'tokens'),
    ('GET', '/v1/nothing', None, 404, None),
    ('GET', '/v1/completions', None, 405, None),
    ('GET', '/../serve.py', None, 400, None),
    ('GET', '/%2e%2e/serve.py', None, 400, None),
    ('GET', '/no_such_file.html', None, 404, None),
]


def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server):
    for method, path, body, want, param in BAD:
        status, err = call(server, method, path, raw=body if isinstance(body, bytes) else None,
                           body=None if isinstance(body, bytes) else body)
        assert status == want, (path, body, err)
        assert set(err['error']) == {'message', 'type', 'param', 'code'} and err['error']['param'] == param, err
    status, err = call(server, 'POST', '/v1/completions', {'model': 'char', 'prompt': 'a' * 250, 'max_tokens': 10})
    assert err['error']['code'] == 'context_length_exceeded' and '256' in err['error']['message']
    status, err = call(server, 'POST', '/v1/completions', {'model': 'char', 'prompt': 'a', 'temprature': 0})
    assert 'temperature' in err['error']['message']
    # a body over 1 MB: refused from its Content-Length alone, before it is read
    conn = http.client.HTTPConnection('127.0.0.1', server.server_address[1], timeout=30)
    conn.putrequest('POST', '/v1/completions')
    conn.putheader('Content-Length', str(2 << 20))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and json.loads(r.read())['error']['code'] == 'request_too_large'
    conn.close()
    status, body = call(server, 'POST', '/v1/completions', {'model': 'char', 'prompt': 'a', 'max_tokens': 3})
    assert status == 200 and body['usage']['completion_tokens'] == 3


def test_api_key(server):
    with pytest.raises(ValueError, match='api_key'):
        make_server(server.engines, host='0.0.0.0')
    keyed = make_server(server.engines, port=0, api_key='sekrit')  # the same workers behind a second door
    threading.Thread(target=keyed.serve_forever, daemon=True).start()
    try:
        for headers in ({}, {'Authorization': 'Bearer wrong'}, {'Authorization': 'sekrit'}):
            status, err = call(keyed, 'GET', '/v1/models', headers=headers)
            assert status == 401 and err['error']['code'] == 'invalid_api_key'
        assert call(keyed, 'GET', '/v1/models', headers={'Authorization': 'Bearer sekrit'})[0] == 200
        assert call(keyed, 'GET', '/')[0] == 200  # the page itself is public; it asks for the key
    finally:
        keyed.shutdown()
        keyed.server_close()


@pytest.mark.parametrize('stream', [True, False])
def test_a_client_that_disconnects_frees_its_slot(server, stream):
    w = server.engines['char']
    before = dict(w.stats)
    body = json.dumps({'model': 'char', 'prompt': 'a', 'max_tokens': 250, 'stream': stream}).encode()
    s = socket.create_connection(('127.0.0.1', server.server_address[1]))
    s.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n'
              b'Content-Length: %d\r\n\r\n%s' % (len(body), body))
    if stream:
        got = b''
        while b'data: ' not in got:  # the stream has started
            got += s.recv(4096)
    else:
        while not any(w.slots):  # decoding has started
            time.sleep(0.001)
    s.close()
    deadline = time.time() + 10
    while w.busy() and time.time() < deadline:
        time.sleep(0.01)
    assert not any(w.slots) and not w.waiting
    assert w.stats['rows_cancelled'] == before['rows_cancelled'] + 1
    assert w.stats['rows_finished'] == before['rows_finished']  # it was dropped, not run to the end


def test_an_error_in_the_worker_fails_its_request_not_the_server(server, monkeypatch):
    w = server.engines['char']

    def boom(rows):
        raise RuntimeError('out of memory (simulated)')
    monkeypatch.setattr(w, '_forward', boom)
    status, err = call(server, 'POST', '/v1/completions', {'model': 'char', 'prompt': 'ab', 'max_tokens': 5, 'n': 2})
    assert status == 500 and err['error']['type'] == 'server_error' and 'simulated' in err['error']['message']
    assert not w.busy()
    monkeypatch.undo()
    assert call(server, 'POST', '/v1/completions', {'model': 'char', 'prompt': 'ab', 'max_tokens': 5})[0] == 200


def test_int8_logits_close_to_fp32_and_weights_at_most_half(ref):
    for name, prompt in (('char', 'To be, or not to be'), ('bpe', 'The cat sat on the mat')):  # tied, untied head
        model, tok = ref[name]
        q = quantize.quantize_int8(copy.deepcopy(model))
        assert isinstance(q.lm_head, quantize.Int8Linear) and q.transformer.wte.weight.dtype == torch.int8
        x = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            want, got = model(x)[0], q(x)[0]
            other = q(torch.cat([x, x.flip(1)]))[0][:1]  # the same row next to another one
        # these sharp random weights (std 0.3) amplify rounding: 7-8% here; trained runs lose < 0.2% perplexity
        assert (got - want).norm() < 0.12 * want.norm() and (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.8
        assert torch.equal(other, got)  # per-row activation scales: a row's logits do not depend on its batch
        assert quantize.state_bytes(q) <= quantize.state_bytes(model) / 2 and q.num_params() == model.num_params()
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96)
    x = torch.randn(5, 3, 256)
    with torch.no_grad():
        want, got = lin(x), quantize.Int8Linear(lin)(x)
    assert got.shape == want.shape and (got - want).norm() < 0.02 * want.norm()  # one layer: ~1%
    with pytest.raises(ValueError, match='for CPU serving'):
        quantize.quantize_int8(copy.deepcopy(ref['char'][0]).to('meta'))


def test_int8_server_serves_what_the_int8_model_generates(runs, ref):
    engines = load_engines(str(runs / 'char'), 'cpu', torch.float32, 'int8', max_batch=2)
    srv = make_server(engines, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        model, tok = ref['char']
        want = generate(quantize.quantize_int8(copy.deepcopy(model)), tok.encode('To be'), 30, temperature=0.0,
                        tokenizer=tok)[0]
        status, body = call(srv, 'POST', '/v1/completions', {'prompt': 'To be', 'max_tokens': 30, 'temperature': 0})
        assert status == 200 and body['choices'][0]['text'] == want.text
    finally:
        srv.shutdown()
        srv.server_close()
        engines['char'].stop()
    out = subprocess.run([sys.executable, 'serve.py', '--quantize=int3'], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1 and 'int8' in out.stderr


def test_models_load_and_unload_at_run_time(tmp_path):
    """POST /v1/models/load puts a run beside the served one (its greedy reply is generate's); a stream on a model
    being unloaded finishes; unload frees it; GET /v1/registry lists runs_dir's models, checkpoints and evals; bad
    sources, names, a full server and cross-site pages are refused with 4xx."""
    d = two_runs(tmp_path)
    for name in ('char', 'bpe'):  # checkpoints as train.py writes them: with their iteration
        ckpt = torch.load(d / name / 'ckpt.pt', weights_only=True)
        save_checkpoint({**ckpt, 'iter_num': 10}, str(d / name / 'ckpt.pt'))
    (d / 'bpe' / 'metrics.jsonl').write_text('{"iter": 10, "val_loss": 3.5}\n')
    with serving(d, source=d / 'char', max_models=2) as srv:
        engines = srv.engines
        status, body = call(srv, 'POST', '/v1/models/load', {'source': 'bpe'})  # under runs_dir
        assert status == 200 and body['id'] == 'bpe' and body['arch'] == 'llama'
        assert [m['id'] for m in call(srv, 'GET', '/v1/models')[1]['data']] == ['char', 'bpe']
        model, tok, _ = load_model(str(d / 'bpe'))
        want = generate(model, tok.encode('Hello'), 12, temperature=0.0, tokenizer=tok)[0].text
        req = {'model': 'bpe', 'prompt': 'Hello', 'max_tokens': 12, 'temperature': 0}
        assert call(srv, 'POST', '/v1/completions', req)[1]['choices'][0]['text'] == want
        reg = {e['name']: e for e in call(srv, 'GET', '/v1/registry')[1]['data']}
        assert reg['bpe']['served'] == 'bpe' and reg['char']['served'] == 'char' and reg['bpe']['tokenizer'] == 'tiktoken'
        assert reg['bpe']['n_params'] == model.num_params(non_embedding=False)
        (c,) = reg['bpe']['checkpoints']
        assert (c['file'], c['iter'], c['val_loss']) == ('ckpt.pt', 10, 3.5)
        assert (reg['bpe']['model_name'], c['model_name']) == ('bpe', 'bpe-10')  # what the page serves them as
        # refusals: a full server, a name in use, a missing source, bad fields, a cross-site page
        for bad, status_, code in [({'source': 'char'}, 409, 'too_many_models'), ({'source': 5}, 400, 'invalid_source')]:
            got = call(srv, 'POST', '/v1/models/load', bad)
            assert got[0] == status_ and got[1]['error']['code'] == code, got
        srv.max_models = 3
        for bad, status_, code in [({'source': 'char'}, 409, 'model_exists'), ({'source': 'nope/x'}, 400, 'invalid_source'),
                                   ({'source': 'char', 'name': '../x'}, 400, 'invalid_name')]:
            got = call(srv, 'POST', '/v1/models/load', bad)
            assert got[0] == status_ and got[1]['error']['code'] == code, got
        assert 'not in the Hugging Face cache' in call(srv, 'POST', '/v1/models/load', {'source': 'nope/x'})[1]['error']['message']
        assert call(srv, 'POST', '/v1/models/load', {'source': 'char', 'name': 'c2'},
                    headers={'Origin': 'https://evil.example'})[0] == 403
        # unload while a stream runs on it: the stream ends whole; then the model is gone and let go
        conn = http.client.HTTPConnection('127.0.0.1', srv.server_address[1], timeout=60)
        conn.request('POST', '/v1/completions', json.dumps({**req, 'stream': True}), {'Content-Type': 'application/json'})
        r = conn.getresponse()
        assert call(srv, 'POST', '/v1/models/unload', {'model': 'bpe'}) == (200, {'id': 'bpe', 'object': 'model', 'unloaded': True})
        got = events(r.read())
        conn.close()
        assert got[-1] == '[DONE]' and ''.join(e['choices'][0]['text'] for e in got[:-1] if e['choices']) == want
        assert call(srv, 'POST', '/v1/completions', req)[0] == 404
        old = engines['char'].pool
        deadline = time.time() + 10
        while any(e.model.config.arch == 'llama' for e in old) and time.time() < deadline:
            time.sleep(0.02)
        assert [e.model.config.arch for e in old] == ['gpt2']  # the engine thread let it go
        assert call(srv, 'POST', '/v1/models/unload', {'model': 'char'})[1]['error']['code'] == 'last_model'
        assert call(srv, 'POST', '/v1/models/unload', {'model': 'bpe'})[0] == 404


@pytest.mark.parametrize('text', ['run', '_x', '.hidden', 'a b/c', 'café-3', '---', '', '9' * 80, 'ü'])
def test_a_run_name_becomes_a_model_name_the_server_accepts(text):
    """GET /v1/registry's model_name (the name the page loads a run under) is what POST /v1/models/load accepts,
    whatever the directory is called: one rule, the server's."""
    from nanolab.checkpoint import MODEL_NAME, model_name
    name = model_name(text)
    assert MODEL_NAME.fullmatch(name) and len(name) <= 64
    assert name == text or not MODEL_NAME.fullmatch(text)  # a valid name is kept as it is


def test_a_tiny_temperature_is_greedy_and_broken_logits_fail_only_their_request(runs, monkeypatch):
    """temperature 1e-40 (inside the accepted range) once made NaN and failed every request in the batch; now it is
    greedy. A row whose logits are NaN (an fp16 overflow, injected here for one request) fails that request with a
    500 naming why, while a request decoding beside it in the same steps finishes with generate's text."""
    ref = {'char': load_model(str(runs / 'char'))[:2]}
    want = greedy(ref, 'char', 'To be', 30).text
    with serving(runs, source=runs / 'char') as srv:
        status, body = call(srv, 'POST', '/v1/completions', {'prompt': 'To be', 'max_tokens': 30, 'temperature': 1e-40})
        assert status == 200 and body['choices'][0]['text'] == want
        w = srv.engines['char']
        sample_ = w._sample

        def corrupt(rows, logits):  # the request with seed 666 gets a NaN logit at its 5th token
            logits = logits.clone()
            for b, r in enumerate(rows):
                if r.req.settings.seed == 666 and len(r.tokens) - r.n_prompt == 4:
                    logits[b, 3] = float('nan')
            return sample_(rows, logits)
        monkeypatch.setattr(w, '_sample', corrupt)
        out = {}

        def ask(name, body):
            out[name] = call(srv, 'POST', '/v1/completions', body)
        with slow(w, 0.01):  # both requests in flight together, decoded in the same steps
            ts = [threading.Thread(target=ask, args=('bad', {'prompt': 'To be', 'max_tokens': 30, 'seed': 666})),
                  threading.Thread(target=ask, args=('good', {'prompt': 'To be', 'max_tokens': 30, 'temperature': 0}))]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        assert out['bad'][0] == 500 and out['bad'][1]['error']['code'] == 'numerical_error'
        assert 'not finite' in out['bad'][1]['error']['message']
        assert out['good'][0] == 200 and out['good'][1]['choices'][0]['text'] == want
        assert call(srv, 'POST', '/v1/completions', {'prompt': 'To be', 'max_tokens': 30, 'temperature': 0})[1][
            'choices'][0]['text'] == want  # and the engine serves on
