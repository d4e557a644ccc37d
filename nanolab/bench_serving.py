"""
The serving benchmarks of bench.py (python bench.py --which=serve|fairness|llamacpp; the settings
are bench.py's): serve.py, and llama.cpp's own llama-server and llama-bench on the same weights,
each server in a process of its own and the clients as threads here, parsing as little of each
stream as they can so the server keeps the CPU.

serve: rounds of N concurrent streaming clients against serve.py (/v1/completions, temperature 0.8,
  a seed per request, `serve_tokens` tokens each, `requests_per_client` requests one after
  another): aggregate tokens/s over the round, and p50/p95 time to first token (request sent ->
  first chunk).
fairness: one streaming client on the Shakespeare default model while other clients flood the
  server with requests of many prompts, wide beam searches, long prompts being prefilled, twenty
  heavy scoring requests at once from a second loopback address (127.0.0.2), or a model of 85M
  parameters loaded and unloaded without pause: the streaming client's time to first token and its
  largest gap between two tokens, against the same client alone.
llamacpp: each of LLAMA_SHAPES (GPT-2 124M, a ~60M Llama with grouped-query attention, a ~70M Qwen3
  with q/k norms; random weights, written with save_pretrained and converted by llama.cpp's own
  convert.sh to GGUF F32, BF16 and Q8_0): llama-bench against generate (generation.py), eager and
  torch.compile'd, at batch 1 and 8 (decode tok/s, 64 new tokens after a 16-token prompt;
  llama-batched-bench for batch 8) and prefill tok/s of a 256-token prompt; then llama-server -np
  16 against serve.py (--compile) on GPT-2 124M at 1, 4 and 16 streaming clients, int8 against
  Q8_0. Needs a llama.cpp build (llama_cpp.py: NANOLAB_LLAMA_CPP); without one bench.py skips it,
  saying how to get one.
"""
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

from nanolab import llama_cpp

# where serve.py is, run as its own process
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# each <= 16 chars
PROMPTS = ['ROMEO:', 'JULIET:\nO ', 'First Citizen:\n', 'KING HENRY:\n', 'To be, or not',
           'MENENIUS:\n']


def stream_once(port, body, path='/v1/completions'):
    """One streaming request -> (seconds to the first chunk, completion tokens, seconds in all,
    largest gap between two chunks in seconds)."""
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=600)
    t0 = time.perf_counter()
    conn.request('POST', path,
                 json.dumps({**body, 'stream': True, 'stream_options': {'include_usage': True}}),
                 {'Content-Type': 'application/json'})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f'HTTP {r.status}: {r.read()[:300]}')
    ttft, tokens, last, gap = None, 0, None, 0.0
    # subtle: only the usage chunk is parsed, so the clients take little of the CPU from the server
    # (the chunks before it say "usage": null, as OpenAI's do)
    for line in r:
        if line.startswith(b'data: {'):
            now = time.perf_counter()
            ttft = now - t0 if ttft is None else ttft
            gap, last = max(gap, now - last) if last is not None else gap, now
            if b'"usage"' in line and b'"usage": null' not in line:
                tokens = (json.loads(line[6:])['usage'] or {}).get('completion_tokens', tokens)
    conn.close()
    return ttft, tokens, time.perf_counter() - t0, gap


def serve_round(port, n, per_client, max_tokens, seed=1337, extra=None):
    """n clients at once, each sending per_client requests one after another (more when n is small,
    so that every round sends at least 16 and lasts long enough to time), each body with extra's
    fields -> (tokens/s over the round, sorted times to first token)."""
    results, barrier, per_client = [], threading.Barrier(n + 1), max(per_client, -(-16 // n))

    def client(c):
        barrier.wait()
        for r in range(per_client):
            body = {'prompt': PROMPTS[(c + r) % len(PROMPTS)], 'max_tokens': max_tokens,
                    'temperature': 0.8, 'seed': seed + 1000 * c + r, **(extra or {})}
            results.append(stream_once(port, body))
    threads = [threading.Thread(target=client, args=(c,)) for c in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if len(results) < n * per_client:
        raise SystemExit('error: some clients failed (see the tracebacks above)')
    return sum(r[1] for r in results) / wall, sorted(r[0] for r in results)


class Process:
    """A server in a subprocess, up once it answers on its port; its log is shown if something
    fails."""
    def __init__(self, cmd, port=None, ready=None):
        self.cmd, self.port, self.ready = cmd, port, ready

    def __enter__(self):
        self.log = tempfile.TemporaryFile('w+')
        self.proc = subprocess.Popen(self.cmd,
                                     stdout=subprocess.PIPE if self.port is None else self.log,
                                     stderr=self.log, text=True)
        if self.port is None:  # serve.py prints its port: 'serving NAME on http://HOST:PORT ...'
            for line in self.proc.stdout:
                if line.startswith('serving '):
                    self.port = int(line.split('http://')[1].split()[0].rsplit(':', 1)[1])
                    break
        deadline = time.time() + 300
        while time.time() < deadline and self.proc.poll() is None:
            try:
                conn = http.client.HTTPConnection('127.0.0.1', self.port, timeout=5)
                conn.request('GET', self.ready or '/v1/models')
                if conn.getresponse().status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        self.show()
        raise SystemExit(f"error: {' '.join(self.cmd[:3])} did not come up")

    def show(self):
        self.log.seek(0)
        print(''.join(self.log.readlines()[-30:]))

    def __exit__(self, kind, value, tb):
        if kind is not None and kind is not KeyboardInterrupt:
            self.show()
        self.proc.terminate()
        self.proc.wait()


def serve_cmd(model, device, quantize='', threads=0, extra=()):
    cmd = [sys.executable, os.path.join(ROOT, 'serve.py'), f'--init_from={model}', '--port=0',
           '--max_batch=16', f'--device={device}']
    return cmd + ([f'--quantize={quantize}'] if quantize else []) + \
        ([f'--threads={threads}'] if threads else []) + list(extra)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def rounds(servers, clients, per_client, max_tokens, repeats=1):
    """Rounds of n concurrent clients for each n, after a warm-up round, against each server {name:
    port} in turn (interleaved, so all see the same machine; best of `repeats` by tokens/s) ->
    {name: [(n, tok/s, p50 ttft ms, p95 ttft ms)]}."""
    run = lambda target, *a: target(*a) if callable(target) else serve_round(target, *a)
    for target in servers.values():
        # warm-up: first-call costs of the server, the allocator and the sockets
        run(target, 2, 1, 8)
    out = {name: [] for name in servers}
    for n in clients:
        best = {}
        for _ in range(repeats):
            for name, target in servers.items():
                if callable(target) and n != 1:
                    continue
                tps, ttft = run(target, n, per_client, max_tokens)
                q = lambda f: ttft[min(len(ttft) - 1, int(f * len(ttft)))] * 1e3
                if tps > best.get(name, (0,))[0]:
                    best[name] = (tps, q(0.5), q(0.95))
        for name in best:
            tps, p50, p95 = best[name]
            out[name].append((n, tps, p50, p95))
            print(f"  {name}, {n} clients: {tps:.0f} tok/s, time to first token p50 "
                  f"{p50:.0f} ms, p95 {p95:.0f} ms", flush=True)
    return out


def bench_serve(model, device, quantize, clients, per_client, tokens):
    """serve.py on `model` under rounds of each number of concurrent streaming `clients`, each
    sending `per_client` requests of `tokens` tokens -> rounds()'s rows."""
    print(f"serve: {model}{' int8' if quantize else ''}, {tokens} tokens a request, at least "
          f"{per_client} requests a client and 16 a round, temperature 0.8, streaming")
    with Process(serve_cmd(model, device, quantize)) as p:
        return rounds({'serve.py': p.port}, clients, per_client, tokens)['serve.py']


# bench_structured's schema: fields of each kind, the last a free text, so an answer (of a random
# model) runs to max_tokens as a plain one does and the two rounds decode the same number of tokens
SCHEMA = {'type': 'object', 'properties': {
    'age': {'type': 'integer', 'minimum': 0, 'maximum': 120},
    'tags': {'type': 'array', 'items': {'enum': ['red', 'green', 'blue']}, 'maxItems': 4},
    'notes': {'type': 'string'}}, 'required': ['age', 'tags', 'notes'], 'additionalProperties': False}
# Shakespeare's 65 characters have no '{' or '"', so no JSON: its row follows a grammar of a play's
# speech instead (a speaker's name, a colon, then free lines), through the same masks
SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SPEECH = 'start: NAME ":\\n" TEXT\nNAME: /[A-Z][A-Z ]{0,15}/\nTEXT: /[^:]*/\n'


def bench_structured(clients, per_client, tokens, repeats, seed):
    """Constrained decoding's cost: serve.py on nanoGPT's Shakespeare model (6 x 384 over its 65
    characters) with SPEECH's grammar, and on GPT-2 124M with response_format (SCHEMA), both random
    weights written with save_pretrained, under rounds of each number of streaming clients, every
    request constrained against none, rounds interleaved, best of repeats -> printed tables
    (tokens/s counts each answer's tokens, however short)."""
    import torch
    from model import GPT, GPTConfig
    from nanolab import grammar
    from nanolab.tokenizer import CharTokenizer, TiktokenTokenizer
    rows = [('Shakespeare (char, 6 x 384, block 256)', CharTokenizer(chars=SHAKESPEARE_CHARS),
             dict(n_layer=6, n_head=6, n_embd=384, block_size=256), {'grammar': SPEECH},
             lambda: grammar.lark_grammar(SPEECH), 'grammar'),
            ('GPT-2 124M', TiktokenTokenizer('gpt2'),
             dict(arch='gpt2', n_layer=12, n_head=12, n_embd=768, block_size=1024),
             {'response_format': {'type': 'json_schema',
                                  'json_schema': {'name': 'person', 'schema': SCHEMA}}},
             lambda: grammar.schema_grammar(SCHEMA), 'response_format')]
    for name, tok, shape, extra, build, field in rows:
        V = 50304 if tok.kind != 'char' else tok.vocab_size
        t0 = time.perf_counter()
        grammar.vocabulary(tok, V)
        t1 = time.perf_counter()
        build()
        print(f"\nstructured: {name}, random weights, {min(tokens, shape['block_size'] - 16)} tokens "
              f"a request at most, temperature 0.8; llguidance's table of the vocabulary "
              f"{t1 - t0:.2f} s (once per tokenizer), the grammar of its {field} field "
              f"{(time.perf_counter() - t1) * 1e3:.1f} ms\n\n"
              f"| clients | plain tok/s | {field} tok/s | ratio |\n|---|---|---|---|")
        with tempfile.TemporaryDirectory() as d:
            torch.manual_seed(seed)
            GPT(GPTConfig(**shape, vocab_size=V)).save_pretrained(d, tok)
            n_tokens = min(tokens, shape['block_size'] - 16)
            with Process(serve_cmd(d, 'cpu')) as p:
                serve_round(p.port, 2, 1, 8, extra=extra)  # warm-up: the vocabulary table
                for n in clients:
                    best = [0.0, 0.0]
                    for _ in range(repeats):
                        for i, x in enumerate((None, extra)):
                            best[i] = max(best[i], serve_round(p.port, n, per_client, n_tokens,
                                                               extra=x)[0])
                    print(f"| {n} | {best[0]:.0f} | {best[1]:.0f} | {best[1] / best[0]:.2f}x |",
                          flush=True)


# -----------------------------------------------------------------------------
# fairness: one streaming client against hostile load

def post(port, body, path='/v1/completions', source='127.0.0.1', answer=False, method='POST'):
    """-> the status (answer=True: and the parsed JSON answer)."""
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=600, source_address=(source, 0))
    conn.request(method, path, None if body is None else json.dumps(body),
                 {'Content-Type': 'application/json'})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return (r.status, json.loads(data)) if answer else r.status


def training_job(port):
    """Start a training job on the server (configs/shakespeare_char.py, running until stopped) and
    wait until it trains -> its id."""
    status, job = post(port, {'script': 'train.py', 'config': 'configs/shakespeare_char.py',
                              'settings': {'max_iters': 10 ** 6, 'eval_interval': 10 ** 6,
                                           'device': 'cpu', 'compile': False,
                                           'out_dir': 'fairness-job'}}, '/v1/jobs', answer=True)
    if status != 200:
        raise SystemExit(f'error: the training job was refused: {job}')
    for _ in range(600):  # its first iterations logged: training is under way
        _, log = post(port, None, f"/v1/jobs/{job['id']}/log", answer=True, method='GET')
        if 'iter 1' in log.get('text', '') or log.get('done'):
            break
        time.sleep(0.5)
    return job['id']


def loads(block):
    """The hostile loads -> {name: (clients, their address, [(path, body)] each sends one after
    another without pause while the stream runs)}. The stream comes from 127.0.0.1."""
    long = 'To be, or not to be, that is the question: ' * 8
    complete = lambda *bodies: [('/v1/completions', b) for b in bodies]
    return {
        'a flood of prompts (256 a request, and 3000: refused)': (2, '127.0.0.1', complete(
            {'prompt': ['First Citizen:'] * 256, 'max_tokens': 16},
            {'prompt': ['a'] * 3000, 'max_tokens': 16})),
        'a wide beam search (16 prompts x 8 beams, n=8)': (2, '127.0.0.1', complete(
            {'prompt': ['ROMEO:'] * 16, 'num_beams': 8, 'n': 8, 'max_tokens': block // 2})),
        f'long prompts being prefilled (128 x {block - 2} tokens, scored)': (
            2, '127.0.0.1', complete({'prompt': [long[:block - 2]] * 128, 'max_tokens': 0,
                                      'echo': True, 'logprobs': 1})),
        f'many heavy requests from one client (20 at once from 127.0.0.2: 16 x {block - 2} tokens '
        'scored, 5 top logprobs each)': (20, '127.0.0.2', complete(
            {'prompt': [long[:block - 2]] * 16, 'max_tokens': 0, 'echo': True, 'logprobs': 5})),
        'a model loading (85M parameters, loaded and unloaded without pause)': (1, '127.0.0.1', [
            ('/v1/models/load', {'source': 'big', 'name': 'big'}),
            ('/v1/models/unload', {'model': 'big'})]),
    }


def big_run(runs_dir):
    """A run of GPT-2 124M's shape over characters (85M parameters, random weights) in
    runs_dir/big: what the loading row loads."""
    from dataclasses import asdict
    from model import GPT, GPTConfig
    from nanolab.checkpoint import save_checkpoint
    from nanolab.tokenizer import CharTokenizer
    tok = CharTokenizer(chars=''.join(chr(c) for c in range(32, 97)))
    model = GPT(GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024,
                          vocab_size=tok.vocab_size))
    save_checkpoint({'model_args': asdict(model.config), 'model': model.state_dict(),
                     'tokenizer': tok.spec()}, os.path.join(runs_dir, 'big', 'ckpt.pt'))
    del model


def bench_fairness(model, device, quantize, tokens):
    """A streaming client's time to first token and largest gap between tokens, alone and under
    each hostile load on `model` (the targets: first token < 1 s, gap < 250 ms)."""
    from nanolab.checkpoint import load_checkpoint
    block = load_checkpoint(model)['model_args']['block_size']
    tokens, streams = min(tokens, block - 8), 6
    print(f"fairness: {model} (block {block}), a client streaming {streams} "
          f"requests of {tokens} tokens one after another, alone and while other "
          "clients send each load without pause")
    rows = []
    with tempfile.TemporaryDirectory() as runs_dir:
        big_run(runs_dir)
        with Process(serve_cmd(model, device, quantize, extra=[f'--runs_dir={runs_dir}'])) as p:
            def stream_client():
                out = [stream_once(p.port, {'prompt': PROMPTS[i % len(PROMPTS)],
                                            'max_tokens': tokens, 'temperature': 0.8, 'seed': i})
                       for i in range(streams)]
                return (max(r[0] for r in out), max(r[3] for r in out),
                        sum(r[1] for r in out) / sum(r[2] for r in out))
            stream_client()  # warm-up
            rows.append(('alone', *stream_client(), 0))
            for name, (n, source, requests) in loads(block).items():
                stop, sent = threading.Event(), []

                def hostile():
                    while not stop.is_set():
                        for path, body in requests:
                            sent.append(post(p.port, body, path, source))
                threads = [threading.Thread(target=hostile) for _ in range(n)]
                for t in threads:
                    t.start()
                time.sleep(0.5)  # the load is under way
                ttft, gap, tps = stream_client()
                stop.set()
                for t in threads:
                    t.join()
                rows.append((name, ttft, gap, tps, len(sent)))
                print(f"  {name}: first token {ttft * 1e3:.0f} ms, largest gap "
                      f"{gap * 1e3:.0f} ms, {tps:.0f} tok/s ({len(sent)} load requests, "
                      f"statuses {sorted(set(sent))})", flush=True)
            # a training job, the server's own child (jobs.py: nice 10, half the cores' threads)
            job = training_job(p.port)
            ttft, gap, tps = stream_client()
            post(p.port, {}, f'/v1/jobs/{job}/stop')
            name = 'a training job (train.py, configs/shakespeare_char.py, from POST /v1/jobs)'
            rows.append((name, ttft, gap, tps, 1))
            print(f"  {name}: first token {ttft * 1e3:.0f} ms, largest gap {gap * 1e3:.0f} ms, "
                  f"{tps:.0f} tok/s", flush=True)
    print("\n| load | worst time to first token | worst gap between tokens | stream tok/s "
          "| load requests |\n|---|---|---|---|---|")
    for name, ttft, gap, tps, n in rows:
        ok = ttft < 1.0 and gap < 0.25
        print(f"| {name} | {ttft * 1e3:.0f} ms | {gap * 1e3:.0f} ms | {tps:.0f} | {n} | "
              f"{'met' if ok else 'MISSED'}")
    return rows


# -----------------------------------------------------------------------------
# llama.cpp on the same weights

# GPT-2 124M
# the models compared with llama.cpp: GPT-2 124M, a ~60M Llama with grouped-query attention and a
# ~70M Qwen3 (q/k norms, heads wider than n_embd / n_head). Not Qwen2: transformers 5 loads any
# qwen2 directory's tokenizer as Qwen2Tokenizer, whose pre-tokenizer is not GPT-2's, and llama.cpp's
# converter then refuses the vocabulary it cannot identify. subtle: vocab 50304 (nanoGPT's padding), not 50257: our tokenizer
# files carry the chat tokens 50257-50260, and llama.cpp's converter wants every token id inside the
# model's vocabulary
LLAMA_SHAPES = {
    'gpt2_124m': dict(arch='gpt2', n_layer=12, n_head=12, n_embd=768, block_size=1024,
                      vocab_size=50304),
    'llama_60m': dict(arch='llama', n_layer=8, n_head=8, n_kv_head=4, n_embd=512, block_size=1024,
                      vocab_size=50304, tie_embeddings=True),
    'qwen3_70m': dict(arch='llama', n_layer=8, n_head=8, n_kv_head=4, n_embd=512, head_dim=128,
                      block_size=1024, vocab_size=50304, tie_embeddings=True, qk_norm=True,
                      rope_theta=1e6, norm_eps=1e-6),
}
# our format -> llama.cpp's GGUF type of the same weights, and the name its tables give it
GGUF_TYPES = {'fp32': ('f32', 'F32'), 'bf16': ('bf16', 'BF16'), 'int8': ('q8_0', 'Q8_0')}


def llama_bench_rows(tools, ggufs, threads):
    """llama-batched-bench (decode at batch 1 and 8 after a 16-token prompt) when built, else
    llama-bench (batch 1), and llama-bench's prefill of 256 tokens -> {(kind, measure): tok/s}."""
    out = {}
    for kind, path in ggufs.items():
        r = subprocess.run([tools['llama-bench'], '-m', path, '-t', str(threads), '-p', '256',
                            '-n', '64', '-r', '3', '-o', 'json'],
                           capture_output=True, text=True, check=True)
        for row in json.loads(r.stdout):
            key = 'prefill 256' if row['n_prompt'] else 'decode batch 1'
            out[kind, key] = row['avg_ts']
        if os.path.exists(tools['llama-batched-bench']):
            r = subprocess.run([tools['llama-batched-bench'], '-m', path, '-t', str(threads), '-c',
                                '2048', '-npp', '16', '-ntg', '64', '-npl', '1,8',
                                '--output-format', 'jsonl'], capture_output=True, text=True,
                               check=True)
            for line in r.stdout.splitlines():
                if line.startswith('{'):
                    row = json.loads(line)
                    out[kind, f"decode batch {row['pl']}"] = row['speed_tg']
    return out


def alone(model, tok):
    """generation.generate_stream in this process, one request after another, as serve_round's one
    client -> a callable for rounds(): the library's own speed on the same requests, with no HTTP
    between."""
    from nanolab.generation import generate_stream

    def round_(n, per_client, max_tokens, seed=1337):
        results, t0 = [], time.perf_counter()
        for r in range(max(per_client, 16)):
            start, first, count = time.perf_counter(), None, 0
            for ev in generate_stream(model, tok.encode(PROMPTS[r % len(PROMPTS)]), max_tokens,
                                      temperature=0.8, seed=seed + r, tokenizer=tok):
                first = time.perf_counter() - start if first is None else first
                count += ev.token is not None
            results.append((first, count))
        return (sum(c for _, c in results) / (time.perf_counter() - t0),
                sorted(f for f, _ in results))
    return round_


def ours_decode_rows(hf_dir, fmt, repeats, compiled=False):
    """generation.generate on the same weights in format fmt (fp32, bf16, int8), torch.compile'd
    or not: greedy decode tok/s at batch 1 and 8 (64 tokens after 16), and prefill tok/s of a
    256-token prompt (time to the first token), best of `repeats` after one untimed run (which
    compiles)."""
    import torch
    from model import GPT
    from nanolab import engine
    from nanolab.quantize import for_inference
    from nanolab.generation import generate
    model = GPT.from_pretrained(hf_dir).eval()
    model = for_inference(model.to(torch.bfloat16) if fmt == 'bf16' else model,
                          'int8' if fmt == 'int8' else '')
    torch._dynamo.reset()  # each model's compiled steps alone in dynamo's cache
    model = engine.compiled(model) if compiled else model
    out, gen = {}, torch.Generator().manual_seed(0)

    def best(fn):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)
    for B in (1, 8):
        x = torch.randint(0, 50257, (B, 16), generator=gen).tolist()
        out[f'decode batch {B}'] = \
            B * 64 / best(lambda: generate(model, x, 64, temperature=0.0, stop_tokens=()))
    x = torch.randint(0, 50257, (1, 256), generator=gen).tolist()
    out['prefill 256'] = 256 / best(lambda: generate(model, x, 1, temperature=0.0, stop_tokens=()))
    return out


def convert(tools, hf_dir, out, gtype):
    """llama.cpp's own converter: a save_pretrained directory -> a GGUF of type gtype at out."""
    # convert.sh runs `python`: this one, which has torch and numpy, comes first on PATH
    env = {**os.environ, 'PATH': os.path.dirname(sys.executable) + os.pathsep
           + os.environ.get('PATH', '')}
    p = subprocess.run([tools['convert'], hf_dir, out, gtype], capture_output=True, text=True,
                       env=env)
    if p.returncode:
        raise SystemExit(f"llamacpp: {tools['convert']} failed on our Hugging Face export:\n"
                         f"{p.stderr[-2000:]}\nrun it by hand on a save_pretrained directory to "
                         "see why")


def bench_llamacpp(build, threads, clients, per_client, repeats, seed, shapes=('gpt2_124m',),
                   formats=('fp32', 'int8'), compiled=True, server_formats=('int8', 'fp32'),
                   server_compile=False):
    """Side by side with llama.cpp (the build at `build`) on identical weights (the module
    docstring): each of `shapes` (LLAMA_SHAPES) in each of `formats` (GGUF_TYPES), ours eager and
    (compiled) torch.compile'd; then the servers on GPT-2 124M in `server_formats` (serve.py
    --compile with server_compile). `threads` for both sides (0 = torch's default), rounds of each
    number of `clients` -> printed tables."""
    tools = llama_cpp.tools(build)
    import torch
    from nanolab import engine
    from nanolab.engine_thread import keep_freed_memory
    from model import GPT, GPTConfig
    from nanolab.quantize import for_inference
    from nanolab.tokenizer import TiktokenTokenizer
    # as the server's engine thread does (engine_thread.start), so 'alone' and 'served' run on the same
    # allocator
    keep_freed_memory()
    llama_threads, threads = threads, threads or torch.get_num_threads()
    tok = TiktokenTokenizer('gpt2')
    with tempfile.TemporaryDirectory() as d:
        print(f"llamacpp: random weights, llama.cpp's GGUF of the same weights ({', '.join(GGUF_TYPES[f][1] for f in formats)}) "
              f"against nanolab ({', '.join(formats)}), {threads} threads, one thing running at a "
              "time; tok/s")
        for name in shapes:
            torch.manual_seed(seed)
            model = GPT(GPTConfig(**LLAMA_SHAPES[name]))
            n_params = model.num_params(non_embedding=False)
            model.save_pretrained(f'{d}/{name}', tok)
            del model
            ggufs = {}
            for fmt in formats:
                ggufs[fmt] = f'{d}/{name}-{GGUF_TYPES[fmt][0]}.gguf'
                convert(tools, f'{d}/{name}', ggufs[fmt], GGUF_TYPES[fmt][0])
            # 1) the library: generate against llama-bench / llama-batched-bench
            theirs = llama_bench_rows(tools, ggufs, threads)
            print(f"\n{name} ({n_params / 1e6:.0f}M parameters)\n\n| format | measure | "
                  "llama.cpp | nanolab | ratio" + " | compiled | ratio" * compiled +
                  " |\n|---|---|---|---|---|" + "---|---|" * compiled)
            for fmt in formats:
                ours = [ours_decode_rows(f'{d}/{name}', fmt, repeats, c)
                        for c in (False, True)[:1 + compiled]]
                for m in ('decode batch 1', 'decode batch 8', 'prefill 256'):
                    t = theirs.get((fmt, m))
                    cells = [f'{GGUF_TYPES[fmt][1]} / {fmt}', m, f'{t:.1f}' if t else 'n/a']
                    for o in ours:
                        cells += [f'{o[m]:.1f}', f'{o[m] / t:.2f}x' if t else '']
                    print('| ' + ' | '.join(cells) + ' |', flush=True)
        if not server_formats:
            return
        torch.manual_seed(seed)
        GPT(GPTConfig(**LLAMA_SHAPES['gpt2_124m'])).save_pretrained(f'{d}/hf', tok)
        ggufs = {}
        for kind in server_formats:
            ggufs[kind] = f'{d}/gpt2-{GGUF_TYPES[kind][0]}.gguf'
            convert(tools, f'{d}/hf', ggufs[kind], GGUF_TYPES[kind][0])
        # 2) the servers: llama-server -np 16 against serve.py, streaming clients
        table = {}
        for kind in server_formats:  # both servers up at once, their rounds interleaved
            port = free_port()
            cmd = [tools['llama-server'], '-m', ggufs[kind], '-t', str(threads), '-np', '16', '-c',
                   str(16 * 256), '--port', str(port), '--no-webui']
            name = 'llama-server ' + GGUF_TYPES[kind][1]
            model = GPT.from_pretrained(f'{d}/hf').eval()
            model = for_inference(model.to(torch.bfloat16) if kind == 'bf16' else model,
                                  'int8' if kind == 'int8' else '')
            model = engine.compiled(model) if server_compile else model
            with Process(cmd, port, ready='/health') as lp, \
                    Process(serve_cmd(f'{d}/hf', 'cpu', 'int8' if kind == 'int8' else '',
                                      llama_threads, ['--compile=True'] * server_compile
                                      + ['--dtype=bfloat16'] * (kind == 'bf16'))) as sp:
                got = rounds({name: lp.port, f'serve.py {kind}': sp.port,
                              f'sample.generate {kind}': alone(model, tok)},
                             clients, per_client, 64, repeats)
            del model
            table['llama.cpp', kind], table['nanolab', kind] = got[name], got[f'serve.py {kind}']
            table['alone', kind] = got[f'sample.generate {kind}']
        print("\n| server | clients | tok/s | x llama-server | TTFT p50 ms "
              "| TTFT p95 ms |\n|---|---|---|---|---|---|")
        for kind in server_formats:
            for who in ('llama.cpp', 'nanolab'):
                for (n, tps, p50, p95), (_, ref, _, _) in zip(table[who, kind],
                                                               table['llama.cpp', kind]):
                    name = (f"{'llama-server' if who == 'llama.cpp' else 'serve.py'} "
                            f"{kind if who == 'nanolab' else GGUF_TYPES[kind][1]}")
                    print(f"| {name} | {n} | {tps:.0f} | {tps / ref:.2f}x | {p50:.0f} "
                          f"| {p95:.0f} |")
        for kind in server_formats:
            one, lib = table['nanolab', kind][0][1], table['alone', kind][0][1]
            print(f"serve.py {kind} at {clients[0]} client: {one:.0f} tok/s = "
                  f"{one / lib:.2f}x sample.generate_stream alone on the same requests "
                  f"({lib:.0f} tok/s, interleaved)")
