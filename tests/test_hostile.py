"""
serve.py against what a hostile web page or client sends, over raw sockets: each request is refused with
a 4xx (never a 5xx, never a completion), and the server serves normally afterwards.
"""
import json
import socket

import pytest

from test_serve import call, serving, two_runs  # tests/ is on sys.path while pytest collects it


@pytest.fixture(scope='module')
def srv(tmp_path_factory):
    d = two_runs(tmp_path_factory.mktemp('runs'))
    (d / 'char' / 'metrics.jsonl').write_text('{"iter": 0, "loss": 4.1}\n')
    with serving(d) as s:
        yield s


def raw(s, data, timeout=10):
    """Send bytes on a fresh connection; read until the server closes it (or timeout) -> (responses' status lines,
    whether the server closed the connection)."""
    with socket.create_connection(('127.0.0.1', s.server_address[1]), timeout=timeout) as c:
        c.sendall(data)
        got, closed = b'', False
        try:
            while True:
                chunk = c.recv(65536)
                if not chunk:
                    closed = True
                    break
                got += chunk
        except socket.timeout:
            pass
    return [line.split()[1].decode() for line in got.split(b'\r\n') if line.startswith(b'HTTP/1.')], closed


def post(path, body, headers):
    data = json.dumps(body).encode()
    head = ''.join(f'{k}: {v}\r\n' for k, v in headers.items())
    return f'POST {path} HTTP/1.1\r\n{head}Content-Length: {len(data)}\r\n\r\n'.encode() + data


COMPLETION = {'prompt': 'ab', 'max_tokens': 2}


def test_a_cross_site_page_cannot_run_completions(srv):
    port = srv.server_address[1]
    local = {'Host': f'127.0.0.1:{port}'}
    # what any page can send without a preflight: text/plain, its own Origin, Sec-Fetch-Site
    for extra in [{'Content-Type': 'text/plain', 'Origin': 'https://evil.example', 'Sec-Fetch-Site': 'cross-site'},
                  {'Content-Type': 'text/plain'},  # even without the browser's headers: not JSON, not served
                  {'Content-Type': 'application/json', 'Origin': 'https://evil.example'},
                  {'Content-Type': 'application/json', 'Sec-Fetch-Site': 'same-site'},  # another localhost port
                  {'Content-Type': 'application/json', 'Origin': 'null'}]:  # sandboxed frames, file:// pages
        status, _ = raw(srv, post('/v1/completions', COMPLETION, {**local, **extra, 'Connection': 'close'}))
        assert status and status[0] in ('403', '415'), (extra, status)
    # the page itself (same origin) and plain clients work as before
    same = {**local, 'Content-Type': 'application/json', 'Origin': f'http://127.0.0.1:{port}',
            'Sec-Fetch-Site': 'same-origin', 'Connection': 'close'}
    assert raw(srv, post('/v1/completions', COMPLETION, same))[0] == ['200']
    assert call(srv, 'POST', '/v1/completions', COMPLETION)[0] == 200


def test_dns_rebinding_cannot_read_runs(srv):
    port = srv.server_address[1]
    get = lambda host: f'GET /runs HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n'.encode()
    assert raw(srv, get(f'rebind.evil.example:{port}'))[0] == ['403']
    for host in [f'127.0.0.1:{port}', f'localhost:{port}', f'[::1]:{port}', '127.0.0.1']:
        assert raw(srv, get(host))[0] == ['200'], host
    srv.allowed_hosts.add('mybox.lan')  # --allowed_hosts=mybox.lan
    try:
        assert raw(srv, get(f'mybox.lan:{port}'))[0] == ['200']
    finally:
        srv.allowed_hosts.discard('mybox.lan')


def test_cors_origins_lets_one_origin_in(srv):
    port = srv.server_address[1]
    srv.cors_origins.add('https://app.example')  # --cors_origins=https://app.example
    try:
        head = {'Host': f'127.0.0.1:{port}', 'Origin': 'https://app.example', 'Connection': 'close'}
        pre = ''.join(f'{k}: {v}\r\n' for k, v in head.items())
        with socket.create_connection(('127.0.0.1', port), timeout=10) as c:
            c.sendall(f'OPTIONS /v1/completions HTTP/1.1\r\n{pre}Access-Control-Request-Method: POST\r\n\r\n'.encode())
            answer = c.recv(65536).decode()
        assert answer.startswith('HTTP/1.1 204') and 'Access-Control-Allow-Origin: https://app.example' in answer
        assert raw(srv, post('/v1/completions', COMPLETION, {**head, 'Content-Type': 'application/json'}))[0] == ['200']
        other = {**head, 'Origin': 'https://evil.example', 'Content-Type': 'application/json'}
        assert raw(srv, post('/v1/completions', COMPLETION, other))[0] == ['403']
    finally:
        srv.cors_origins.discard('https://app.example')


def test_no_request_smuggling(srv):
    inner = b'GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n'
    # an error answered before the body is read closes the connection: the body is never parsed as a request
    for head in [b'POST /v1/nope HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n',
                 b'POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n',
                 b'GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n']:
        statuses, closed = raw(srv, head + b'Content-Length: %d\r\n\r\n' % len(inner) + inner)
        assert len(statuses) == 1 and closed, (head, statuses)
    # Content-Length together with Transfer-Encoding (or chunked alone): 400, closed
    for te in [b'Transfer-Encoding: chunked\r\nContent-Length: 4\r\n', b'Transfer-Encoding: chunked\r\n']:
        statuses, closed = raw(srv, b'POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n'
                                    b'Content-Type: application/json\r\n' + te + b'\r\n0\r\n\r\n' + inner)
        assert statuses == ['400'] and closed, (te, statuses)


def test_lengths_and_nesting_the_parser_cannot_take_are_400s(srv):
    head = b'POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n'
    body = json.dumps(COMPLETION).encode()
    # a superscript digit passes str.isdigit; 4,301 digits are past int()'s limit
    for length in [b'\xb2', '\u00b2'.encode(), b'1' * 4301, b'-1', b'+12', b'0x10', b' ', b'99999999999']:
        statuses, closed = raw(srv, head + b'Content-Length: ' + length + b'\r\n\r\n' + body)
        assert statuses == ['400'] and closed, (length[:20], statuses)
    # two lengths, even agreeing ones: refused (a proxy in front may have framed by the other)
    for second in [b'Content-Length: 4\r\n', b'Content-Length: %d\r\n' % len(body)]:
        statuses, closed = raw(srv, head + second + b'Content-Length: %d\r\n\r\n' % len(body) + body)
        assert statuses == ['400'] and closed, (second, statuses)
    # nesting: deeper than the parser's stack, and just past the bound: 400 naming it; within the bound, served
    for depth, nested in [(100_000, True), (64, True), (63, False)]:  # the object itself is one level
        status, out = call(srv, 'POST', '/v1/completions',
                           raw=b'{"prompt": "ab", "user": %s}' % (b'[' * depth + b']' * depth))
        assert (status, 'nests' in str(out)) == ((400, True) if nested else (200, False)), (depth, out)
    assert call(srv, 'POST', '/v1/completions', COMPLETION)[0] == 200


def test_an_early_413_reaches_a_client_that_sends_its_whole_body_first(srv):
    # http.client (and requests, urllib3) send the whole body before reading: without a lingering close they get
    # a broken pipe instead of the 413
    import http.client
    for size in [2 << 20, 3 << 20]:
        c = http.client.HTTPConnection('127.0.0.1', srv.server_address[1], timeout=30)
        c.request('POST', '/v1/completions', body=b'{"prompt": "' + b'a' * size + b'"}',
                  headers={'Content-Type': 'application/json'})
        r = c.getresponse()
        assert r.status == 413 and 'byte limit' in json.loads(r.read())['error']['message']
        c.close()
    assert call(srv, 'POST', '/v1/completions', COMPLETION)[0] == 200


def test_malformed_parts_are_400s_not_500s(srv):
    for path, body in [('/v1/completions', {'model': [], 'prompt': 'a'}),
                       ('/v1/chat/completions', {'messages': [{'role': 'user', 'content': [{'type': 'text', 'text': 5}]}]}),
                       ('/v1/chat/completions', {'messages': [{'role': 'user', 'content': ['hi']}]})]:
        status, out = call(srv, 'POST', path, body)
        assert 400 <= status < 500 and 'error' in out, (body, status, out)
    status, out = call(srv, 'POST', '/v1/chat/completions',
                       {'messages': [{'role': 'user', 'content': [{'type': 'text', 'text': 'ab'}]}], 'max_tokens': 2})
    assert status == 200 and out['choices'][0]['message']['content'] is not None


def test_runs_survive_a_diverged_run_a_half_written_config_and_a_link_out(srv, tmp_path):
    root = srv.runs_dir
    import os
    os.makedirs(os.path.join(root, 'diverged'))
    with open(os.path.join(root, 'diverged', 'metrics.jsonl'), 'w') as f:
        f.write('{"iter": 0, "loss": 4.1}\n{"iter": 10, "loss": NaN, "val_loss": Infinity}\n')
    os.makedirs(os.path.join(root, 'starting'))
    open(os.path.join(root, 'starting', 'metrics.jsonl'), 'w').write('{"iter": 0, "loss": 4.0}\n')
    open(os.path.join(root, 'starting', 'config.json'), 'w').write('')  # being written
    outside = tmp_path / 'secret'
    outside.mkdir()
    (outside / 'metrics.jsonl').write_text('{"secret": 1}\n')
    os.symlink(outside, os.path.join(root, 'link'))
    status, payload = call(srv, 'GET', '/runs')
    body = json.loads(payload) if isinstance(payload, bytes) else payload
    assert status == 200
    runs = {r['name']: r for r in body['data']}
    assert runs['diverged']['metrics'][1] == {'iter': 10, 'loss': None, 'val_loss': None}  # JSON null, not NaN
    assert 'starting' not in runs and 'link' not in runs and sorted(body['skipped']) == ['link', 'starting']
    assert 'char' in runs  # the good runs are still there


def test_idle_and_trickling_connections_cannot_lock_others_out(srv):
    import time
    port = srv.server_address[1]
    srv.max_connections, srv.read_timeout = 20, 1.0  # --max_connections=20 --read_timeout=1
    try:
        idle = [socket.create_connection(('127.0.0.1', port), timeout=10) for _ in range(20)]
        for c in idle:
            c.sendall(b'GET /v1/mo')  # half a request line, then nothing
        time.sleep(0.2)
        statuses, closed = raw(srv, b'GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n', timeout=3)
        assert statuses == ['503'] and closed  # at once, not after a wait
        t0 = time.monotonic()
        for c in idle:  # each is cut at its deadline
            assert c.recv(100) == b''
            c.close()
        assert time.monotonic() - t0 < 3
        trickle = socket.create_connection(('127.0.0.1', port), timeout=10)
        t0, cut = time.monotonic(), False
        for ch in b'GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ' + b'a' * 40:
            try:
                trickle.sendall(bytes([ch]))
            except OSError:
                cut = True
                break
            time.sleep(0.1)
            if time.monotonic() - t0 > 3:
                break
        cut = cut or trickle.recv(100) == b''
        assert cut and time.monotonic() - t0 < 3  # sending a byte now and then does not extend the deadline
        trickle.close()
        assert call(srv, 'GET', '/v1/models')[0] == 200
    finally:
        srv.max_connections, srv.read_timeout = 256, 10.0


def test_attention_maps_are_bounded(srv, monkeypatch):
    from nanolab import page_api
    body = {'model': 'char', 'prompt': 'abcd'}  # 2 layers x 4 heads x 4 x 4 = 128 numbers
    full = call(srv, 'POST', '/v1/attention', body)[1]['attentions']
    monkeypatch.setattr(page_api, 'ATTENTION_VALUES', 100)
    status, out = call(srv, 'POST', '/v1/attention', body)
    assert status == 400 and "'layer'" in out['error']['message']
    status, out = call(srv, 'POST', '/v1/attention', {**body, 'layer': 1})
    assert status == 200 and out['layer'] == 1 and out['attentions'] == full[1:2]
    assert call(srv, 'POST', '/v1/attention', {**body, 'layer': 2})[0] == 400  # the model has layers 0 and 1


def test_a_failure_mid_stream_sends_an_error_event_and_no_done(srv, monkeypatch):
    from test_serve import events
    w, calls = srv.engines['char'], []
    forward = w._forward

    def fails_on_the_third(rows):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError('out of memory (simulated)')
        return forward(rows)
    monkeypatch.setattr(w, '_forward', fails_on_the_third)
    status, payload = call(srv, 'POST', '/v1/completions', {'model': 'char', 'prompt': 'ab', 'max_tokens': 8,
                                                           'temperature': 0, 'stream': True})
    got = events(payload)
    assert status == 200 and any('choices' in e for e in got[:-1])  # it had started
    assert 'simulated' in got[-1]['error']['message'] and '[DONE]' not in got


def test_json_writers_write_non_finite_numbers_as_null(tmp_path):
    import math
    from nanolab import files, results
    from nanolab.tracking import MetricsLogger
    strict = lambda text: json.loads(text, parse_constant=lambda c: pytest.fail(f'bare {c} in JSON'))
    log = MetricsLogger(str(tmp_path / 'metrics.jsonl'))
    log.log(iter=10, loss=math.nan, val_loss=math.inf, lr=3e-4)
    log.close()
    assert strict((tmp_path / 'metrics.jsonl').read_text()) == {'iter': 10, 'loss': None, 'val_loss': None, 'lr': 3e-4}
    path = results.save_result(str(tmp_path), {'model': 'm', 'task': 't', 'metrics': {'perplexity': math.inf}, 'n': 1})
    assert strict(open(path).read())['metrics'] == {'perplexity': None}
    assert strict(files.dumps({'a': [1.5, -math.inf]})) == {'a': [1.5, None]}


def test_text_is_bounded_in_characters_before_it_is_tokenized(srv):
    cap = 8 * srv.engines['char'].max_prompt_tokens
    status, out = call(srv, 'POST', '/v1/completions', {'model': 'char', 'prompt': 'a' * (cap + 1), 'max_tokens': 1})
    assert status == 400 and out['error']['param'] == 'prompt' and 'characters' in out['error']['message']
    assert call(srv, 'POST', '/tokenize', {'model': 'bpe', 'prompt': 'x' * (cap + 1)})[0] == 400


def test_a_shape_is_checked_field_by_field_before_any_model_is_built(srv):
    """POST /v1/shape (the Model tab's calculator): malformed fields are a 400 naming the field, a shape model.py
    refuses is answered with its reason, and no input makes a 5xx. Random bodies over the fields' whole ranges (and
    past them) too, beside a normal request."""
    import random
    for body, field in [({'n_head': 0}, 'n_head'), ({'n_layer': 10 ** 9}, 'n_layer'), ({'n_embd': 'x'}, 'n_embd'),
                        ({'nope': 1}, 'nope'), ({'arch': 5}, 'arch'), ({'positions': 'alibi'}, 'positions'),
                        ({'bias': 'yes'}, 'bias'), ({'dropout': 2}, 'dropout'), ({'rope_theta': 0}, 'rope_theta'),
                        ({'vocab_size': 1.5}, 'vocab_size'), ({'n_kv_head': -1}, 'n_kv_head')]:
        status, out = call(srv, 'POST', '/v1/shape', body)
        assert status == 400 and out['error']['param'] == field, (body, out)
    status, out = call(srv, 'POST', '/v1/shape', {'arch': 'gpt2', 'n_head': 4, 'n_kv_head': 2})
    assert status == 200 and 'needs arch' in out['invalid'] and 'params' not in out
    rng = random.Random(0)
    values = [0, 1, 2, 3, 7, 64, 1000, 1 << 12, 1 << 30, -1, 0.5, None, True, 'x', [], {}]
    fields = ['arch', 'positions', 'n_layer', 'n_head', 'n_kv_head', 'n_embd', 'ffn_hidden', 'block_size',
              'vocab_size', 'bias', 'tie_embeddings', 'dropout', 'rope_theta', 'norm_eps']
    for _ in range(150):
        body = {f: rng.choice(values + (['gpt2', 'llama', 'rope', ''] if f in ('arch', 'positions') else []))
                for f in rng.sample(fields, rng.randint(1, 6))}
        status, out = call(srv, 'POST', '/v1/shape', body)
        assert status in (200, 400), (body, status, out)
    assert call(srv, 'POST', '/v1/completions', {'model': 'char', **COMPLETION})[0] == 200


def test_a_top_p_that_is_zero_in_float32_fails_no_stream(srv):
    """top_p 1e-300 passes the range check (0 < p <= 1) and is 0 in the logits' float32: it once emptied the
    distribution and failed all 8 streams in flight. Now the likeliest token stays, so the request is greedy, and
    the 8 streams beside it (same model, same steps) each equal generate's text."""
    import threading
    from test_serve import events as sse_events
    from nanolab.checkpoint import load_model
    from sample import generate
    model, tok, _ = load_model(str(srv.runs_dir + '/char'))
    want = [generate(model, tok.encode(p), 20, temperature=0.8, seed=i, tokenizer=tok)[0].text
            for i, p in enumerate(['To be', 'ROMEO:'] * 4)]
    got = [None] * 9

    def stream(i, body):
        got[i] = call(srv, 'POST', '/v1/completions', {'model': 'char', 'max_tokens': 20, 'stream': True, **body})
    threads = [threading.Thread(target=stream, args=(i, {'prompt': p, 'temperature': 0.8, 'seed': i}))
               for i, p in enumerate(['To be', 'ROMEO:'] * 4)]
    threads.append(threading.Thread(target=stream, args=(8, {'prompt': 'To be', 'top_p': 1e-300, 'seed': 5})))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    texts = []
    for status, payload in got:
        evs = sse_events(payload)
        assert status == 200 and evs[-1] == '[DONE]', evs[-2:]
        texts.append(''.join(e['choices'][0]['text'] for e in evs[:-1] if e.get('choices')))
    assert texts[:8] == want
    assert texts[8] == generate(model, tok.encode('To be'), 20, temperature=0.0, tokenizer=tok)[0].text


def test_templates_are_filled_by_name_only_and_bounded(srv):
    """A client's template text reads no attribute of the server's objects and cannot make a huge prompt: each is a
    400 naming the problem, answered at once (no 1 GB format spec is expanded); variables named like render()'s own
    arguments (cot, name) are unknown variables, not a crash; a few-shot k of Infinity is a 400."""
    import time
    for text in ['{x.__class__.__init__.__globals__}', '{x:>400000000}{x:>400000000}{x:>400000000}', '{}', '{0}',
                 '{x[99]}']:
        t0 = time.time()
        status, out = call(srv, 'POST', '/v1/templates/render', {'model': 'char', 'text': text, 'variables': {'x': 'a'}})
        assert status == 400 and 'is not a template variable' in out['error']['message'] and time.time() - t0 < 5
    for path in ('/v1/completions', '/v1/chat/completions'):
        status, out = call(srv, 'POST', path, {'model': 'char', 'template': 'qa',
                                               'variables': {'question': 'q', 'cot': 'x', 'name': 'y'}})
        assert status == 400 and 'unknown cot, name' in out['error']['message'], out
    status, out = call(srv, 'POST', '/v1/templates/render', raw=b'{"model": "char", "template": "qa", '
                       b'"variables": {"question": "q"}, "shots": {"examples": [], "k": Infinity}}')
    assert status == 400 and out['error']['param'] == 'k'


def test_the_arena_bounds_judgments_survives_a_full_disk_and_self_play(srv, monkeypatch):
    from nanolab import arena
    j = {'id': 'i', 'prompt': 'p', 'winner': 'a', 'annotator': 'ann',
         'a': {'model': 'char', 'text': 'x', 'settings': {}}, 'b': {'model': 'char', 'text': 'y', 'settings': {}}}
    for bad in [{**j, 'a': {**j['a'], 'model': 'm' * 100_000}}, {**j, 'junk': 'x' * 100_000},
                {**j, 'b': {**j['b'], 'settings': {'s': 'x' * 100_000}}}]:
        status, body = call(srv, 'POST', '/v1/arena/judgments', bad)
        assert status == 400 and 'bad judgment' in body['error']['message']
    # a model judged against itself (two settings of one model) gives no rating, and the statistics still come
    assert call(srv, 'POST', '/v1/arena/judgments', j)[0] == 200
    status, stats = call(srv, 'GET', '/v1/arena/stats')
    assert status == 200 and stats['judgments'] == 1 and stats['bradley_terry'] == {}
    # a disk that takes half a line: 507, and the file is as it was
    import os
    write = os.write
    monkeypatch.setattr(arena.os, 'write', lambda fd, data: write(fd, data[:len(data) // 2]))
    status, body = call(srv, 'POST', '/v1/arena/judgments', {**j, 'id': 'j2'})
    monkeypatch.setattr(arena.os, 'write', write)
    assert status == 507 and 'not stored' in body['error']['message']
    assert call(srv, 'POST', '/v1/arena/judgments', {**j, 'b': {**j['b'], 'model': 'bpe'}})[0] == 200
    status, stats = call(srv, 'GET', '/v1/arena/stats')
    assert status == 200 and stats['judgments'] == 2 and set(stats['bradley_terry']) == {'char', 'bpe'}


def test_one_client_runs_at_most_its_share_of_requests_and_others_go_on(srv):
    """Ten slow streams from one client (one address, no key): at most max_client_requests of them run at once, the
    rest wait their turn and then finish; meanwhile a client at another address (127.0.0.2) and one sending another
    key are served at once."""
    import threading
    import time
    from test_serve import slow
    srv.max_client_requests = 3
    try:
        with slow(srv.engines['char'], 0.02):
            results, peak = [], []

            def stream():
                results.append(call(srv, 'POST', '/v1/completions', {**COMPLETION, 'max_tokens': 12, 'stream': True})[0])
            threads = [threading.Thread(target=stream) for _ in range(10)]
            for t in threads:
                t.start()
            deadline = time.time() + 30
            while len(results) < 10 and time.time() < deadline:
                peak.append(srv.clients.get(('127.0.0.1', ''), 0))
                if len(results) < 4 and len(peak) == 20:  # the others wait: these get through now
                    other = socket.create_connection(('127.0.0.1', srv.server_address[1]), source_address=('127.0.0.2', 0))
                    other.sendall(post('/v1/completions', COMPLETION, {'Content-Type': 'application/json',
                                                                      'Connection': 'close'}))
                    answer = other.recv(65536)
                    other.close()
                    keyed = call(srv, 'POST', '/v1/completions', COMPLETION, headers={'Authorization': 'Bearer other'})
                    assert answer.startswith(b'HTTP/1.1 200') and keyed[0] == 200 and len(results) < 10
                time.sleep(0.01)
            for t in threads:
                t.join()
        assert results == [200] * 10 and max(peak) == 3
    finally:
        srv.max_client_requests = 16
