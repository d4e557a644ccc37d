"""
A real model's size on this machine: what `bench.py --which=real` measures for a Hugging Face
directory of a 1B-shaped model (Llama 3.2 1B's shape, random bf16 weights written once into a
temporary directory): load time, peak resident memory and greedy decode tokens/s, each format in a
fresh process, so one's memory never counts against another's; and llama.cpp's decode on the same
weights (Q8_0, Q4_0) where a build is named (NANOLAB_LLAMA_CPP).

    write_random_hf(dir, LLAMA_1B, tok)          # ~2.5 GB of bf16 safetensors
    row = measure(dir, quantize='int4')          # {'load s', 'peak RSS GB', 'decode tok/s', ...}
    rows = llama_cpp_rows(build, dir, threads)   # llama.cpp's Q8_0 and Q4_0 of the same weights
"""
import json
import os
import subprocess
import sys

import torch

# Llama 3.2 1B's config.json, in GPTConfig's words: 16 layers of 2048, 32 heads sharing 8 KV heads,
# the 128k vocabulary, tied embeddings, llama3 RoPE scaling
LLAMA_1B = dict(arch='llama', block_size=131072, vocab_size=128256, n_layer=16, n_head=32,
                n_kv_head=8, n_embd=2048, ffn_hidden=8192, tie_embeddings=True,
                rope_theta=500000.0, norm_eps=1e-5,
                rope_scaling={'rope_type': 'llama3', 'factor': 32.0, 'low_freq_factor': 1.0,
                              'high_freq_factor': 4.0, 'original_max_position_embeddings': 8192})


def write_random_hf(out_dir, shape, tok=None, dtype=torch.bfloat16, seed=0):
    """A Hugging Face directory of the model `shape` (GPTConfig's arguments) with random weights
    (N(0, 0.02), norms 1) in dtype, made one tensor at a time (the peak is the model in dtype), and
    tok's files (llama.cpp's converter wants a tokenizer)."""
    from model import GPT, GPTConfig
    from nanolab import hf
    config = GPTConfig(**shape)
    with torch.device('meta'):
        skeleton = GPT(config)
    gen, sd = torch.Generator().manual_seed(seed), {}
    for name, p in skeleton.state_dict().items():
        if name == 'lm_head.weight' and config.tie_embeddings:
            continue
        sd[name] = torch.ones(p.shape, dtype=dtype) if p.dim() == 1 else \
            (torch.randn(p.shape, generator=gen) * 0.02).to(dtype)
    if config.tie_embeddings:
        sd['lm_head.weight'] = sd['transformer.wte.weight']
    from dataclasses import asdict
    hf.write_pretrained(out_dir, asdict(config), sd, tok)


# run in a fresh interpreter: load, one warm-up token, then a timed greedy decode
CHILD = r'''
import json, resource, sys, time
import torch
from nanolab.checkpoint import load_model
from nanolab.generation import generate
from nanolab.quantize import for_inference
src, quantize, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
t0 = time.perf_counter()
model, _, _ = load_model(src, 'cpu', 'auto')
model = for_inference(model, quantize)
load = time.perf_counter() - t0
prompt = list(range(100, 116))
generate(model, prompt, 2, temperature=0.0, stop_tokens=())
t0 = time.perf_counter()
generate(model, prompt, n, temperature=0.0, stop_tokens=())
tps = n / (time.perf_counter() - t0)
dtype = str(next(p for p in model.parameters()).dtype).replace('torch.', '')
print(json.dumps({'load s': load, 'peak RSS GB': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                  / 2**20, 'decode tok/s': tps, 'dtype': dtype}))
'''


def measure(src, quantize='', tokens=32):
    """One format of the model at src, in a fresh process -> {'load s', 'peak RSS GB' (ru_maxrss:
    the process's whole peak, interpreter and torch included), 'decode tok/s' (batch 1, greedy,
    after a 16-token prompt), 'dtype' (the weights' dtype as loaded)}."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, '-c', CHILD, src, quantize, str(tokens)], cwd=root,
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"measuring {src} ({quantize or 'as stored'}) failed:\n"
                           f"{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def weights_gb(src):
    """The bytes of a Hugging Face directory's weight files, in GB."""
    from nanolab.hf import weight_files
    return sum(os.path.getsize(f) for f in weight_files(src)) / 1e9


def llama_cpp_rows(build, src, threads, types=('Q8_0', 'Q4_0')):
    """llama.cpp on the same weights: its converter writes a bf16 GGUF of the Hugging Face directory
    src, llama-quantize makes each of types, and llama-bench decodes 32 tokens at batch 1 ->
    {type: {'GB': file size, 'decode tok/s'}}; {} without a build."""
    import tempfile
    from nanolab import llama_cpp
    tools = llama_cpp.tools(build)
    if tools is None:
        return {}
    out = {}
    # convert.sh runs `python`: this one, which has torch and numpy, comes first on PATH
    env = {**os.environ, 'PATH': os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH']}
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([tools['convert'], src, f'{d}/bf16.gguf', 'bf16'], env=env, check=True,
                       capture_output=True)
        for t in types:
            path = f'{d}/{t}.gguf'
            subprocess.run([os.path.join(build, 'bin', 'llama-quantize'), f'{d}/bf16.gguf', path, t],
                           check=True, capture_output=True)
            r = subprocess.run([tools['llama-bench'], '-m', path, '-t', str(threads), '-p', '0',
                                '-n', '32', '-r', '2', '-o', 'json'], check=True,
                               capture_output=True, text=True)
            out[t] = {'GB': os.path.getsize(path) / 1e9,
                      'decode tok/s': json.loads(r.stdout)[0]['avg_ts']}
            os.remove(path)
    return out
