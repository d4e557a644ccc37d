"""The Data tab's endpoints (nanolab/data_api.py) over real HTTP: GET /v1/datasets and /v1/datasets/{name} against
the datasets' own meta.json and .bin files (a tiny `text` corpus with every cleaning step at work, a JSONL set, a
damaged one), names that lead out of the data directory, and POST /v1/uploads's size cap, names, atomic write and
deadline (time for the body's size: slow uploads arrive, stalled ones are cut). CPU, about 7 s."""
import http.client
import json
import random

import numpy as np
import pytest

from nanolab import data_api, datasets
from test_serve import call, serving, two_runs  # tests/ is on sys.path while pytest collects it


def tiny_datasets(d):
    """d/tiny: a `text` corpus of 64 lines in which cleaning drops one duplicate, one near-duplicate and one short
    line and scrubs one e-mail address; d/pairs: a JSONL set; d/broken: a meta.json without its files. test_web.py
    uses it too."""
    rng = random.Random(0)
    words = ('the and of to in it is was that with for on as at by river garden window morning silver quietly '
             'village harbour lantern engine captain yellow marble thunder blanket orchard whisper candle meadow '
             'journey').split()
    docs = [' '.join(rng.choice(words) for _ in range(40)).capitalize() + '.' for _ in range(60)]
    near = docs[1].split()
    near[5] = 'pebble'
    docs += [docs[0], ' '.join(near), 'Too short to keep.', docs[2][:-1] + ' write to bob@example.com today.']
    (d / 'corpus.txt').write_text('\n'.join(docs) + '\n')
    datasets.prepare('text', data_dir=str(d), input=str(d / 'corpus.txt'), out_name='tiny', doc_split='line',
                     num_proc=1)
    (d / 'pairs').mkdir()
    for split, n in (('train', 5), ('val', 2)):
        (d / 'pairs' / f'{split}.jsonl').write_text(''.join(json.dumps({'prompt': f'{split} {i}', 'response': 'ok'})
                                                            + '\n' for i in range(n)))
    (d / 'pairs' / 'meta.json').write_text(json.dumps({'name': 'pairs', 'format': 'sft', 'train_rows': 5,
                                                       'val_rows': 2}))
    (d / 'broken').mkdir()
    (d / 'broken' / 'meta.json').write_text('{"name": "broken", "train_tokens": 10, "val_tokens": 1}')
    return d


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    data = tiny_datasets(tmp_path_factory.mktemp('data'))
    with serving(two_runs(tmp_path_factory.mktemp('runs')), server={'data_dir': str(data)}) as srv:
        srv.data = data
        yield srv


def test_datasets_and_their_details_match_meta_and_the_token_files(server):
    status, j = call(server, 'GET', '/v1/datasets')
    assert status == 200 and [d['name'] for d in j['data']] == ['pairs', 'tiny'] and j['skipped'] == ['broken']
    meta = json.loads((server.data / 'tiny' / 'meta.json').read_text())
    tiny = j['data'][1]
    assert (tiny['train_tokens'], tiny['val_tokens'], tiny['vocab_size'], tiny['tokenizer']) == \
        (meta['train_tokens'], meta['val_tokens'], meta['vocab_size'], 'tiktoken')
    status, one = call(server, 'GET', '/v1/datasets/tiny?k=2&seed=5')
    assert status == 200 and one['cleaning'] == meta['cleaning'] and one['cleaning']['dedup']['removed'] == 1
    assert one['cleaning']['near_dedup']['removed'] == 1 and one['cleaning']['pii']['email'] == 1
    # the histogram: every document of the (bounded) prefix of train.bin counted once, in the bin of its length
    ids = np.fromfile(server.data / 'tiny' / 'train.bin', np.uint16)[:data_api.HIST_TOKENS]
    hist = one['histogram']
    n_docs = int((ids == hist['eot']).sum()) + 1
    assert hist['tokens_read'] == len(ids) == meta['train_tokens'] and sum(hist['counts']) == hist['documents'] == n_docs
    lengths = np.diff(np.concatenate([[-1], np.flatnonzero(ids == hist['eot']), [len(ids)]])) - 1
    assert hist['counts'] == np.bincount(np.log2(lengths).astype(int)).tolist()
    assert len(one['samples']['train']) == len(one['samples']['val']) == 2 and all(
        s['text'] for s in one['samples']['train'])
    assert call(server, 'GET', '/v1/datasets/tiny?k=2&seed=5')[1]['samples'] == one['samples']  # seeded
    status, rows = call(server, 'GET', '/v1/datasets/pairs?k=9')
    assert status == 200 and rows['train_rows'] == 5 and len(rows['samples']['train']) == 5 and \
        len(rows['samples']['val']) == 2 and 'histogram' not in rows


@pytest.mark.parametrize('name', ['..', '%2e%2e', '%2E%2E', '%2Fetc', '%2e%2e%2fdata', '_uploads', 'nope', 'broken'])
def test_a_name_outside_the_data_directory_or_a_damaged_dataset_is_a_4xx(server, name):
    status, j = call(server, 'GET', f'/v1/datasets/{name}')
    assert 400 <= status < 500 and j['error']['message'], (name, status)
    assert call(server, 'GET', '/v1/datasets/tiny?k=11')[0] == 400


def test_a_torn_token_file_or_a_meta_that_is_no_object_is_a_400_not_a_500(server):
    torn = server.data / 'torn'
    torn.mkdir()
    (torn / 'meta.json').write_text((server.data / 'tiny' / 'meta.json').read_text())
    (torn / 'train.bin').write_bytes(b'\x01\x02\x03')  # 1.5 uint16 tokens
    (torn / 'val.bin').write_bytes(b'')
    try:
        assert call(server, 'GET', '/v1/datasets/torn')[0] == 400
        (torn / 'meta.json').write_text('[1, 2]')
        assert call(server, 'GET', '/v1/datasets/torn')[0] == 400
        assert 'torn' in call(server, 'GET', '/v1/datasets')[1]['skipped']
    finally:
        for p in torn.iterdir():
            p.unlink()
        torn.rmdir()


def _post(server, path, data, length=None, ctype='application/octet-stream'):
    conn = http.client.HTTPConnection('127.0.0.1', server.server_address[1], timeout=30)
    conn.putrequest('POST', path)
    conn.putheader('Content-Type', ctype)
    conn.putheader('Content-Length', str(len(data) if length is None else length))
    conn.endheaders()
    conn.send(data)
    r = conn.getresponse()
    out = r.status, json.loads(r.read())
    conn.close()
    return out


def test_uploads_are_capped_named_safely_and_written_whole(server):
    status, j = _post(server, '/v1/uploads?name=my-notes_1.txt', b'hello world\n')
    assert status == 200 and j['bytes'] == 12
    assert (server.data / '_uploads' / 'my-notes_1.txt').read_bytes() == b'hello world\n'
    # over the cap: refused from the header, before the body is read
    status, j = _post(server, '/v1/uploads?name=big.txt', b'x' * 10, length=data_api.UPLOAD_BYTES + 1)
    assert status == 413 and not (server.data / '_uploads' / 'big.txt').exists()
    for bad in ('../evil.txt', '..%2fevil.txt', 'a.exe', '.hidden.txt', 'a%00.txt', ''):
        assert _post(server, f'/v1/uploads?name={bad}', b'x')[0] == 400, bad
    assert _post(server, '/v1/uploads?name=plain.txt', b'x', ctype='text/plain')[0] == 415  # a cross-site form's type
    # a cross-site page's POST is refused like every other POST
    conn = http.client.HTTPConnection('127.0.0.1', server.server_address[1], timeout=30)
    conn.request('POST', '/v1/uploads?name=x.txt', body=b'x', headers={
        'Content-Type': 'application/octet-stream', 'Origin': 'https://evil.example'})
    assert conn.getresponse().status == 403 and not (server.data / '_uploads' / 'x.txt').exists()
    assert sorted(p.name for p in (server.data / '_uploads').iterdir()) == ['my-notes_1.txt']  # no temp files left


def test_a_slow_upload_gets_time_for_its_size_and_a_stalled_one_is_cut(server, monkeypatch):
    """read_timeout 0.5 s and UPLOAD_RATE 8 KiB/s: 16 KiB sent steadily over 1.6 s (10 KiB/s) arrives whole; the same
    headers and then silence are cut at read_timeout + n / UPLOAD_RATE (2.5 s), no 5xx, no partial file left."""
    import socket
    import time
    monkeypatch.setattr(server, 'read_timeout', 0.5)
    monkeypatch.setattr(data_api, 'UPLOAD_RATE', 8 << 10)
    data = b''.join(b'line %04d of a slow upload, %s\n' % (i, b'x' * 30) for i in range(256))[:16 << 10]
    conn = http.client.HTTPConnection('127.0.0.1', server.server_address[1], timeout=30)
    conn.putrequest('POST', '/v1/uploads?name=slow.txt')
    conn.putheader('Content-Type', 'application/octet-stream')
    conn.putheader('Content-Length', str(len(data)))
    conn.endheaders()
    t0 = time.monotonic()
    for i in range(0, len(data), 1 << 10):
        time.sleep(0.1)
        conn.send(data[i:i + (1 << 10)])
    assert time.monotonic() - t0 > 3 * server.read_timeout  # without the body's own deadline it would be cut
    r = conn.getresponse()
    assert (r.status, json.loads(r.read())['bytes']) == (200, len(data))
    conn.close()
    assert (server.data / '_uploads' / 'slow.txt').read_bytes() == data
    # the headers, a little of the body, then nothing: cut at its deadline, not left open and not a 5xx
    with socket.create_connection(('127.0.0.1', server.server_address[1]), timeout=10) as s:
        s.sendall(b'POST /v1/uploads?name=stall.txt HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: '
                  b'application/octet-stream\r\nContent-Length: %d\r\n\r\n' % len(data) + data[:100])
        t0, answer = time.monotonic(), b''
        while chunk := s.recv(4096):
            answer += chunk
        waited = time.monotonic() - t0
    deadline = server.read_timeout + len(data) / data_api.UPLOAD_RATE
    assert deadline - 0.3 < waited < deadline + 1.0, waited
    assert not answer.startswith(b'HTTP/1.1 5'), answer[:200]
    t0 = time.monotonic()  # the handler removes its temp file as its read fails, a moment after the cut
    while (left := [p.name for p in (server.data / '_uploads').iterdir() if p.name.startswith('stall')]) \
            and time.monotonic() - t0 < 2:
        time.sleep(0.05)
    assert left == []
    assert call(server, 'GET', '/v1/datasets')[0] == 200
