"""
A real model's size on this machine: what `bench.py --which=real` measures for a Hugging Face
directory of a 1B-shaped model (Llama 3.2 1B's shape, random bf16 weights written once into a
temporary directory): load time, peak resident memory and greedy decode tokens/s, each format in a
fresh process, so one's memory never counts against another's; and llama.cpp's decode on the same
weights (Q8_0, Q4_0) where a build is named (NANOLAB_LLAMA_CPP).

    write_random_hf(dir, LLAMA_1B, tok)          # ~2.5 GB of bf16 safetensors
    row = measure(dir, quantize='int4')          # {'load s', 'peak RSS GB', 'decode tok/s', ...}
    rows = llama_cpp_rows(build, dir, threads)   # llama.cpp's Q8_0 and Q4_0 of the same weights

format_rows(model, ids, ['bf16', 'bf16+int4/32'], ...) is bench.py --which=quantize's table of one
model in several formats (quantize.in_format): bytes, KL and top-1 against bf16, perplexity, tok/s.
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
import json, sys, time
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
# VmHWM, this process's own peak: ru_maxrss would carry the parent's over exec (Linux's
# exec_mmap folds the old mm's high-water mark in, and subprocess's vfork shares the parent's)
hwm = next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM'))
now = next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmRSS'))
print(json.dumps({'load s': load, 'peak RSS GB': hwm / 2**20, 'RSS after GB': now / 2**20,
                  'decode tok/s': tps, 'dtype': dtype}))
'''


def measure(src, quantize='', tokens=32):
    """One format of the model at src, in a fresh process -> {'load s', 'peak RSS GB' (VmHWM: the
    process's whole peak, interpreter and torch included), 'RSS after GB' (VmRSS at the end: mapped
    file pages that were read count until the kernel reclaims them), 'decode tok/s' (batch 1, greedy,
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


def format_rows(base, ids, formats, prompt_len, n_new, repeats, T=256):
    """Each of formats (quantize.in_format, e.g. 'bf16+int4/32') of the CPU model base -> ({format:
    {'bytes', 'kl', 'top1', 'ppl' (quantize.logit_stats of its next-token distributions against
    bf16's on the token stream ids, in rows of T), 'tok/s' (greedy, batch 1, n_new tokens after a
    random prompt_len-token prompt, best of `repeats`, the formats interleaved)}}, rows, T)."""
    import time
    from nanolab import quantize
    from nanolab.generation import generate
    T = min(T, base.config.block_size)
    n = (len(ids) - 1) // T
    x, y = ids[:n * T].view(n, T), ids[1:n * T + 1].view(n, T)
    models = {f: quantize.in_format(base, f) for f in formats}
    with torch.no_grad():
        ref = quantize.in_format(base, 'bf16')(x)[0]
        rows = {f: {'bytes': quantize.state_bytes(m), **quantize.logit_stats(m(x)[0], ref, y)}
                for f, m in models.items()}
    p = torch.randint(0, base.config.vocab_size, (1, prompt_len)).tolist()
    best = dict.fromkeys(formats, float('inf'))
    for _ in range(repeats):
        for f, m in models.items():
            t0 = time.perf_counter()
            generate(m, p, n_new, temperature=0.0, stop_tokens=())
            best[f] = min(best[f], time.perf_counter() - t0)
    for f in formats:
        rows[f]['tok/s'] = n_new / best[f]
    return rows, n, T


def bench_real(src, formats, build, threads):
    """bench.py --which=real: the model at src (a Hugging Face directory; '' = LLAMA_1B with random
    weights and GPT-2's tokenizer, written to a temporary directory) in each of formats (measure's
    quantize), beside llama.cpp's Q8_0 and Q4_0 of it when build is one -> a printed table."""
    import tempfile
    from nanolab import llama_cpp
    from nanolab.tokenizer import TiktokenTokenizer
    with tempfile.TemporaryDirectory() as tmp:
        path = src or os.path.join(tmp, 'llama-1b')
        if not src:
            write_random_hf(path, LLAMA_1B, TiktokenTokenizer('gpt2'))
        print(f"real: {path}, {weights_gb(path):.2f} GB of weights; each format loaded in a fresh "
              "process (load time, its peak RSS, greedy decode at batch 1 after 16 tokens)")
        rows = [(q or 'as stored', measure(path, q)) for q in formats]
        theirs = llama_cpp_rows(build, path, threads)
    print("\n| format | dtype | load s | peak RSS GB | RSS after GB | decode tok/s |\n"
          "|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| nanolab {name} | {r['dtype']} | {r['load s']:.1f} | {r['peak RSS GB']:.2f} "
              f"| {r['RSS after GB']:.2f} | {r['decode tok/s']:.2f} |")
    for t, r in theirs.items():
        print(f"| llama.cpp {t} ({r['GB']:.2f} GB file, mmap) | | | | | {r['decode tok/s']:.2f} |")
    if not theirs:
        print(f"llama.cpp: not measured, {llama_cpp.ENV} names no build ({llama_cpp.HOW})")


# one LoRA step of LLAMA_1B (r=16 on every block matrix; batch 1, 512 tokens; forward, backward,
# AdamW) in a fresh interpreter; memory is VmHWM reset just before the step (clear_refs), so
# building the random model and quantizing it do not count
LORA_CHILD = r'''
import json, sys, time
import torch
from model import GPT, GPTConfig, position_tables
from nanolab.bench_models import LLAMA_1B
from nanolab.lora import add_lora
from nanolab.training import configure_optimizer, use_grad_checkpoint
mode = sys.argv[1]
status = lambda key: next(int(l.split()[1]) for l in open('/proc/self/status')
                          if l.startswith(key)) / 2**20
cfg = GPTConfig(**LLAMA_1B)
with torch.device('meta'):
    model = GPT(cfg)
model = model.to_empty(device='cpu').to(torch.bfloat16)
torch.manual_seed(0)
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0, 0.02)
for name, table in position_tables(cfg).items():
    model.register_buffer(name, table, persistent=False)
model = add_lora(model, 16, 32.0, 0.0, 'c_attn,c_proj,c_fc', quantize='nf4' if 'nf4' in mode else '')
if 'ckpt' in mode:
    use_grad_checkpoint(model)
opt = configure_optimizer(model.train(), 0.0, 1e-4, (0.9, 0.99), 'cpu')
x, y = torch.randint(0, cfg.vocab_size, (2, 1, 512), generator=torch.Generator().manual_seed(0))
before = status('VmRSS')
open('/proc/self/clear_refs', 'w').write('5')  # VmHWM := VmRSS
t0 = time.perf_counter()
_, loss = model(x, y)
loss.backward()
opt.step()
print(json.dumps({'before GiB': before, 'peak GiB': status('VmHWM'), 'loss': loss.item(),
                  'step s': time.perf_counter() - t0}))
'''


def bench_lora(modes):
    """bench.py --which=lora: one LoRA step of LLAMA_1B per mode ('bf16', 'bf16+ckpt', 'nf4',
    'nf4+ckpt': the frozen base in bf16 or bitsandbytes' nf4, with or without gradient
    checkpointing), each in a fresh process -> a printed table of RSS before and peak in the step."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    print("lora: one LoRA step (r=16 on c_attn, c_proj, c_fc; batch 1 x 512 tokens; AdamW) of a "
          "Llama 3.2 1B-shaped model with random weights; peak = VmHWM during the step\n\n"
          "| base | RSS before GiB | peak in step GiB | step s | loss |\n|---|---|---|---|---|")
    for mode in modes:
        r = subprocess.run([sys.executable, '-c', LORA_CHILD, mode], cwd=root, capture_output=True,
                           text=True)
        if r.returncode:
            print(f"| {mode} | failed: {r.stderr.strip().splitlines()[-1][:120]} | | | |")
            continue
        d = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"| {mode} | {d['before GiB']:.2f} | {d['peak GiB']:.2f} | {d['step s']:.0f} | "
              f"{d['loss']:.3f} |", flush=True)


# a fresh process's RSS growth from building (or loading) a model, int8 or not, and generating once
RSS_PROBE = r'''
import json, os, sys, torch
from model import GPT, GPTConfig
from nanolab import quantize
from nanolab.checkpoint import load_model
from nanolab.generation import generate
rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
base = rss()
src, quant = sys.argv[1], sys.argv[2] == 'int8'
m = GPT(GPTConfig(**json.loads(src))).eval() if src.startswith('{') else load_model(src)[0]
if quant:
    quantize.quantize_int8(m)
generate(m, [[0] * 8], 8, temperature=0.0, stop_tokens=())
print(rss() - base)
'''


def int8_row(fp, arg, tok, dataset, prompt_len, new_tokens, best_of):
    """bench.py --which=quantize's fp32 -> int8 row for model fp (arg: its source, or its shape as
    JSON, for the RSS probe): {'bytes', 'rss', 'tps1', 'tps8': [fp32, int8] each, and 'ppl' on
    the run's val set (dataset) or, for random weights, 'agree' (greedy tokens' agreement)}."""
    import copy
    from nanolab import quantize
    from nanolab.generation import generate
    q = quantize.quantize_int8(copy.deepcopy(fp))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # 1) bytes: the state dict, and the RSS a fresh process adds by loading the model and
    #    generating once
    row = {'bytes': [quantize.state_bytes(m) for m in (fp, q)],
           'rss': [int(subprocess.run([sys.executable, '-c', RSS_PROBE, arg, k], cwd=root,
                                      capture_output=True, text=True, check=True)
                       .stdout.split()[-1]) for k in ('fp32', 'int8')]}
    # 2) greedy decode tok/s, batch 1 and 8, interleaved
    V, T = fp.config.vocab_size, fp.config.block_size
    n = min(new_tokens, T - prompt_len)
    for B in (1, 8):
        x = torch.randint(0, V, (B, prompt_len)).tolist()
        t = best_of([lambda m=m: generate(m, x, n, temperature=0.0, stop_tokens=())
                     for m in (fp, q)])
        row[f'tps{B}'] = [B * n / s for s in t]
    # 3) perplexity on the run's validation set; for random weights, the greedy tokens' agreement
    if dataset:
        from nanolab.likelihood import run_perplexity
        row['ppl'] = [run_perplexity(m, tok, dataset)['metrics']['perplexity'] for m in (fp, q)]
    else:
        x = torch.randint(0, V, (4, prompt_len)).tolist()
        a, b = (generate(m, x, 32, temperature=0.0, stop_tokens=()) for m in (fp, q))
        row['agree'] = sum(i == j for c, d in zip(a, b)
                           for i, j in zip(c.tokens, d.tokens)) / (4 * 32)
    return row


# -----------------------------------------------------------------------------
# a decode step against the memory limit (bench.py --which=decode_profile)

# the ops that multiply by weights (their self time is "matmul kernels"); everything else is "other"
MATMUL_OPS = ('aten::mm', 'aten::addmm', 'aten::bmm', 'aten::matmul', 'aten::linear',
              'quantized::linear_dynamic', 'aten::_weight_int4pack_mm_for_cpu',
              'aten::_weight_int4pack_mm', 'mkldnn::_linear_pointwise')


def read_bandwidth(mb=512, repeats=7):
    """This machine's DRAM read rate in bytes/s: the best of `repeats` sums over an mb-MB fp32
    tensor (torch.sum runs on every core; far larger than any cache)."""
    import time
    x = torch.ones(mb * 2**20 // 4)
    best = float('inf')
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def weights_read(model):
    """The bytes a decode step reads whole: the blocks, the final norm and the output head
    (quantize.state_bytes; the token embedding gives only its rows, and the fp32 CPU head's
    transposed copy counts as the head)."""
    from nanolab.quantize import PackedLinear, TransposedHead, state_bytes
    head = model.lm_head
    return state_bytes(model.transformer.h) + state_bytes(model.transformer.ln_f) + \
        (head.weight_t.nbytes if isinstance(head, TransposedHead) else head.nbytes
         if isinstance(head, PackedLinear) else state_bytes(head))


def decode_profile(model, batch, prompt_len=16, n_new=64, repeats=3):
    """One decode step of model at `batch` rows: {'step ms' (the wall time of a greedy token after
    the prompt: generate of n_new+1 tokens less generate of 1, best of repeats, per token), and
    torch.profiler's split of 32 steps per step: 'matmul ms' (MATMUL_OPS' self time), 'other ms'
    (every other op's), 'unaccounted ms' (the wall time no op holds: Python, the engine)}."""
    import time
    from nanolab.generation import generate
    x = torch.randint(0, model.config.vocab_size, (batch, prompt_len)).tolist()
    run = lambda n: generate(model, x, n, temperature=0.0, stop_tokens=())  # noqa: E731
    run(4)  # warm-up: allocator, kernels' first calls
    best = float('inf')
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(1)
        t1 = time.perf_counter()
        run(n_new + 1)
        best = min(best, (time.perf_counter() - t1 - (t1 - t0)) / n_new)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        run(33)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e3 / 33  # ms a step
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / 1e3 / 33
    return {'step ms': best * 1e3, 'matmul ms': matmul, 'other ms': total - matmul,
            'unaccounted ms': wall * 1e3 / 33 - total}


def bench_decode_profile(shapes, formats, batches, repeats, compiled=True):
    """bench.py --which=decode_profile: each shape (GPTConfig arguments by name) in each format
    (quantize.in_format; with compiled, also torch.compile'd: sample.py --compile) at each batch:
    the weights' bytes, their read time at this machine's bandwidth, the step's wall time and their
    ratio (1.0 = the memory limit), and the profiler's split -> a printed table."""
    from model import GPT, GPTConfig
    from nanolab import engine
    from nanolab.quantize import in_format
    bw = read_bandwidth()
    print(f"decode_profile: read bandwidth {bw / 1e9:.1f} GB/s (best torch.sum over 512 MB, "
          f"{torch.get_num_threads()} threads)\n\n| model | format | batch | weights MB | read ms "
          "| step ms | step / read | matmul ms | other ops ms | unaccounted ms |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for name, shape in shapes.items():
        torch.manual_seed(0)
        base = GPT(GPTConfig(**shape)).eval()
        for fmt in formats:
            model = in_format(base, fmt)
            nbytes = weights_read(model)
            torch._dynamo.reset()  # each model's compiled steps alone in dynamo's cache
            for label, m in [(fmt, model)] + [(f'{fmt} compiled', engine.compiled(model))] * compiled:
                for B in batches:
                    r = decode_profile(m, B, repeats=repeats)
                    read = nbytes / bw * 1e3
                    print(f"| {name} | {label} | {B} | {nbytes / 1e6:.0f} | {read:.2f} | "
                          f"{r['step ms']:.2f} | {r['step ms'] / read:.2f} | {r['matmul ms']:.2f} "
                          f"| {r['other ms']:.2f} | {r['unaccounted ms']:.2f} |", flush=True)
            del model
