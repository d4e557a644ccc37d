"""Soak: serve.py under CLIENTS concurrent clients for SOAK_SECONDS, on 127.0.0.1 only: good requests (streamed and
not, completions and chat, n > 1), bad ones, hostile ones (HOSTILE), and clients that drop the connection
mid-stream or before the answer.
Afterwards: no 5xx, every decode slot free and the queue empty, every connection thread gone, and RSS flat (after
the warm-up vs at the end). The full soak is 60 s; the default suite runs 15 s on 2 cores, `SOAK_SECONDS=60 pytest
tests/test_soak.py` runs the full soak."""
import http.client
import json
import os
import random
import socket
import threading
import time

import torch

from nanolab.server import load_engines, make_server
from model import GPTConfig
from test_serve import CHARS, save_run  # the same tiny random char model as tests/test_serve.py
from nanolab.tokenizer import CharTokenizer

SOAK_SECONDS = float(os.environ.get('SOAK_SECONDS', 15))
CLIENTS = 50
WARMUP = 0.25            # the first quarter of the soak: threads, malloc arenas and caches reach their size
RSS_SLACK = 48 << 20     # bytes RSS may grow between the end of the warm-up and the end (measured: under ~10 MB)
BAD = [b'{"prompt": "a", ', b'[1, 2]', b'{"prompt": "a", "temprature": 0}', b'{"prompt": "a", "temperature": 3}',
       b'{"prompt": "' + b'a' * 300 + b'"}', b'{"prompt": "a", "model": "nope"}', b'{"prompt": "\xc3\xbc"}']


def rss():
    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def request(port, body, raw=None):
    """One request -> (status, body bytes); a streamed body is read to its end."""
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=60)
    conn.request('POST', '/v1/chat/completions' if 'messages' in body else '/v1/completions',
                 raw if raw is not None else json.dumps(body), {'Content-Type': 'application/json'})
    r = conn.getresponse()
    payload = r.read()
    conn.close()
    return r.status, payload


def drop(port, body, after_first_chunk):
    """Send a request and close the socket: after the first streamed chunk, or at once."""
    data = json.dumps(body).encode()
    s = socket.create_connection(('127.0.0.1', port), timeout=60)
    s.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n'
              b'Content-Length: %d\r\n\r\n%s' % (len(data), data))
    got = b''
    while after_first_chunk and b'data: ' not in got:
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
    s.close()


HOSTILE = [  # what a web page or a hostile client sends: each gets a 4xx, the server keeps serving
    b'POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\nOrigin: https://evil.example\r\n'
    b'Sec-Fetch-Site: cross-site\r\nContent-Length: 15\r\n\r\n{"prompt": "a"}',
    b'GET /runs HTTP/1.1\r\nHost: rebind.evil.example\r\n\r\n',
    b'POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n'
    b'Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\nGET /v1/models HTTP/1.1\r\n\r\n',
    b'POST /v1/nope HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 28\r\n\r\n'
    b'GET /v1/models HTTP/1.1\r\n\r\n']


def hostile(port, data):
    """Send one attack, read the answer until the server closes -> the status of its (only) response."""
    with socket.create_connection(('127.0.0.1', port), timeout=60) as s:
        s.sendall(data)
        got = b''
        while chunk := s.recv(65536):
            got += chunk
    return [int(line.split()[1]) for line in got.split(b'\r\n') if line.startswith(b'HTTP/1.1 ')]


def client(i, port, deadline, log):
    rng = random.Random(i)
    while time.time() < deadline:
        kind = rng.choice(['stream', 'reply', 'chat', 'bad', 'drop', 'drop_early', 'hostile'])
        prompt = ''.join(rng.choice(CHARS) for _ in range(rng.randint(1, 40)))
        body = {'prompt': prompt, 'max_tokens': rng.randint(1, 40), 'temperature': rng.choice([0, 0.8, 1.0]),
                'seed': rng.randint(0, 99)}
        if kind == 'stream':
            status, payload = request(port, {**body, 'stream': True})
            ok = status == 200 and payload.rstrip().endswith(b'data: [DONE]')
        elif kind == 'reply':
            status, payload = request(port, {**body, 'n': rng.randint(1, 3), 'top_p': 0.9})
            ok = status == 200 and len(json.loads(payload)['choices']) >= 1
        elif kind == 'chat':
            status, payload = request(port, {'messages': [{'role': 'user', 'content': prompt}], 'max_tokens': 20})
            ok = status == 200
        elif kind == 'hostile':  # one answer, a 4xx, and the connection closed (no smuggled second answer)
            statuses = hostile(port, rng.choice(HOSTILE))
            status, ok = (statuses or [None])[0], len(statuses) == 1 and 400 <= statuses[0] < 500
        elif kind == 'bad':
            status, payload = request(port, {}, raw=rng.choice(BAD))
            ok = 400 <= status < 500 and 'error' in json.loads(payload)
        else:
            drop(port, {**body, 'max_tokens': 200, 'stream': kind == 'drop'}, kind == 'drop')
            status, ok = None, True
        log.append((kind, status, ok))


def test_soak(tmp_path):
    save_run(tmp_path / 'char', GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=256, vocab_size=len(CHARS)),
             CharTokenizer(chars=''.join(sorted(CHARS))))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engines = load_engines(str(tmp_path / 'char'), 'cpu', torch.float32, max_batch=16)
    srv = make_server(engines, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    w, port, idle_threads = engines['char'], srv.server_address[1], threading.active_count()
    try:
        log, start = [], time.time()
        clients = [threading.Thread(target=client, args=(i, port, start + SOAK_SECONDS, log)) for i in range(CLIENTS)]
        for t in clients:
            t.start()
        time.sleep(SOAK_SECONDS * WARMUP)
        rss_warm = rss()
        for t in clients:
            t.join(timeout=SOAK_SECONDS + 120)
        assert not any(t.is_alive() for t in clients), 'a client hung'
        # 1) every answer as expected, no 5xx; each kind of request happened
        assert [x for x in log if not x[2] or (x[1] or 0) >= 500] == []
        assert {k for k, _, _ in log} == {'stream', 'reply', 'chat', 'bad', 'drop', 'drop_early', 'hostile'}
        # 2) no stuck slot: the dropped rows leave, the batch empties, and every connection's thread ends
        deadline = time.time() + 15
        while (w.busy() or threading.active_count() > idle_threads) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(w.slots) and not w.waiting and not w.inbox and w.cache.lengths == [0] * 16
        assert threading.active_count() <= idle_threads
        assert w.stats['rows_cancelled'] > 0 and w.stats['peak_batch'] == 16
        # 3) memory flat
        grown = rss() - rss_warm
        print(f"soak {SOAK_SECONDS:.0f} s: {len(log)} requests, {w.stats['steps']} steps, peak batch "
              f"{w.stats['peak_batch']}, RSS {rss_warm / 2**20:.0f} -> {rss() / 2**20:.0f} MB")
        assert grown < RSS_SLACK, f'RSS grew by {grown / 2**20:.1f} MB during the soak'
        # 4) and the server still serves
        status, payload = request(port, {'prompt': 'abc', 'max_tokens': 5, 'temperature': 0})
        assert status == 200 and json.loads(payload)['usage']['completion_tokens'] == 5
    finally:
        srv.shutdown()
        srv.server_close()
        w.stop()
        torch.set_num_threads(threads)
