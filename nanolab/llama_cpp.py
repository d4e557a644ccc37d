"""
llama.cpp beside nanolab: where a build of it is (one environment variable, NANOLAB_LLAMA_CPP,
names the directory that holds bin/llama-server), its tools, and its verdict on a GGUF file we
wrote (export.py --check_with, tests/test_export.py, bench.py --which=llamacpp).

    r = check_llama_cpp('model-f32.gguf', model, tok, build_dir(), 'ROMEO:\n')  # vs ours

A build: `bash ../shared/tools/build-llama-cpp.sh DIR` on the development machines
(llama-cpp-python's sdist, about 10 minutes on 2 cores), or llama.cpp's own README.
"""
import json
import os
import socket
import subprocess
import time
import urllib.request

import torch

from nanolab.generation import generate

# the directory of a llama.cpp build (bin/llama-server, bin/llama-bench, convert.sh)
ENV = 'NANOLAB_LLAMA_CPP'
# how to get a build
HOW = 'bash ../shared/tools/build-llama-cpp.sh DIR, or llama.cpp\'s own README'


def build_dir(given=''):
    """The llama.cpp build to use: `given`, else $NANOLAB_LLAMA_CPP, else '' (none)."""
    return given or os.environ.get(ENV, '')


def tools(d):
    """A build's tools -> {name: path}, or None when d holds none of llama-bench, llama-server and
    convert.sh."""
    found = {t: os.path.join(d or '', 'bin', t)
             for t in ('llama-bench', 'llama-batched-bench', 'llama-server')}
    found['convert'] = os.path.join(d or '', 'convert.sh')
    if not d or not all(os.path.exists(found[t])
                        for t in ('llama-bench', 'llama-server', 'convert')):
        return None
    return found


def check_llama_cpp(path, model, tok, llama_dir, prompt, n=100):
    """Serve path with llama.cpp's llama-server and compare: its tokens for prompt, and its greedy
    continuation (temperature 0, eos ignored) with generate's, up to n tokens inside the context.
    -> {'tokenize_equal', 'agree' (leading tokens equal), 'n' (compared), 'text' (llama.cpp's)}.
    With f32 weights the two agree token for token (tests/test_export.py)."""
    server_bin = os.path.join(llama_dir, 'bin', 'llama-server')
    if not os.path.exists(server_bin):
        raise ValueError(f"no llama-server in {llama_dir}/bin; build llama.cpp "
                         f"({HOW}), then --check_with=DIR")
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([server_bin, '-m', path, '--port', str(port), '-t',
                               str(torch.get_num_threads()), '-np', '1', '-c',
                               str(model.config.block_size)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def post(route, body):
        req = urllib.request.Request(f'http://127.0.0.1:{port}{route}', json.dumps(body).encode(),
                                     {'Content-Type': 'application/json'})
        return json.load(urllib.request.urlopen(req, timeout=120))
    try:
        for _ in range(300):  # up to 30 s to load
            if server.poll() is not None:
                raise ValueError("llama-server could not load "
                                 f"{path}:\n{server.stderr.read()[-1500:]}")
            try:
                urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        ids = tok.encode(prompt)
        # llama.cpp stops where its context ends; we would slide on
        n = min(n, model.config.block_size - len(ids))
        if n < 1:
            raise ValueError("the check's prompt fills the model's "
                             f"{model.config.block_size}-token context; "
                             "give a shorter --check_prompt")
        same = post('/tokenize', {'content': prompt})['tokens'] == ids
        theirs = post('/completion', {'prompt': ids, 'n_predict': n, 'temperature': 0,
                                      'ignore_eos': True, 'return_tokens': True,
                                      'cache_prompt': False})['tokens']
        ours = generate(model, ids, n, temperature=0, stop_tokens=())[0].tokens
        agree = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b),
                     min(len(theirs), len(ours)))
        return {'tokenize_equal': same, 'agree': agree, 'n': n, 'text': tok.decode(theirs)}
    finally:
        server.kill()
        server.wait()
