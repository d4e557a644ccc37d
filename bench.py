"""
Benchmarks that print figures (speed targets live here, never in timed tests).

    python bench.py                                  # decode, CPU, ~6 minutes on 2 cores
    python bench.py --models=llama_56m --batch_sizes=1 --repeats=1   # a quick look
    python bench.py --device=cuda --dtype=bfloat16   # on a GPU
    python bench.py --which=train                    # train steps (~6 min), default vs nanoGPT (~4)
    python bench.py --which=train --train_models=cpu_default --compile_modes=False --train_runs=
    python bench.py --which=harness                  # lm-eval: our LM vs its own hf backend, ~3 min
    python bench.py --which=serve                    # serve.py under 1-16 streaming clients, ~30 s
    python bench.py --which=quantize                 # fp32/bf16/int8/int4: bytes, RSS, tok/s, KL, ~5 min
    python bench.py --which=fairness                 # a stream beside a flood, beams, long prompts
    python bench.py --which=structured               # response_format's cost at 1-16 clients, ~5 min
    python bench.py --which=decode_profile           # a decode step against reading its weights once
    python bench.py --which=real                     # a 1B-shaped Llama: load s, peak RSS, tok/s, ~5 min
    python bench.py --which=lora                     # its LoRA / QLoRA step's peak memory, ~5 min
    NANOLAB_LLAMA_CPP=DIR python bench.py --which=llamacpp   # vs llama.cpp, 3 models x 3 formats, ~20 min

decode: tokens/s of greedy decoding with the KV cache (generate, sample.py's API) for a
GPT-2-124M-shaped and a Llama-shaped model with random weights, side by side with Hugging Face
`generate` on identical weights (written with save_pretrained), at each batch size; the speed-up
over no-cache generation at `nocache_tokens` new tokens; and time to first token for a
`ttft_prompt`-token prompt. With decode_compile, also sample.py --compile's path: the same generate
on a torch.compile'd model (decode steps compiled, prefill eager). Ours and theirs run interleaved, best of `repeats`, so both
see the same machine state.

train: ms/iter, tokens/s and MFU of train.py's training step (forward, backward, clip, fused AdamW)
on random tokens, for the CPU default config (configs/shakespeare_char.py: Llama blocks 4x4x128,
block 64, batch 16, Muon), nanoGPT's CPU config (GPT-2 blocks 4x4x128, batch 12, AdamW) and its
baby GPT (6x6x384, block 256, batch 64, dropout 0.2), with torch.compile off and on.
MFU divides by 163 GFLOP/s on CPU (an fp32 2048^2 matmul, measured on the 2-core development CPU)
or, on CUDA, by the GPU's dense peak for the dtype (device.PEAK_FLOPS: 989 TFLOP/s for an H100 in
bf16).
Then whole runs of train.py back to back (`train_runs`), each in a fresh process into a temporary
out_dir: `default` is `python train.py` as a user types it; `nanogpt` is nanoGPT's documented CPU
run (its README: shakespeare_char, --device=cpu --compile=False --eval_iters=20 --log_interval=1
--block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
--lr_decay_iters=2000 --dropout=0.0, over its config's lr 1e-3, min_lr 1e-4, beta2 0.99, warmup
100, eval every 250) run by our train.py. Printed: wall time (start to exit, what a user waits),
the final val loss, and when (training seconds, from metrics.jsonl) val first reached 1.70.

harness: requests/s end to end through lm_eval.simple_evaluate (tokenizing, scoring or generating,
metrics) of our model as an lm-eval LM (evaluate.py) and of lm-eval's own `hf` backend, on
identical random weights of a 4x256 GPT-2-shaped model (block 1024, GPT-2 vocabulary), batch 8, on
local tasks written to a temporary directory: multiple choice (100 questions x 4 choices), rolling
perplexity (16 documents of 50-1200 words) and greedy generation (32 answers of up to 32 tokens).
Best of `repeats`, interleaved; progress bars go to stderr.

serve, fairness, llamacpp: see nanolab/bench_serving.py's docstring. Targets: 16 clients >= 3x the
single client's tokens/s and p95 time to first token < 500 ms at 10 clients; beside a flood, a beam
search or a long prompt, a streaming client's first token < 1 s and its gaps < 250 ms; against
llama-server on the same weights, int8 >= 1.0x Q8_0 at 16 clients and >= 0.75x at 1.

quantize: each of `quantize_models` in fp32 and int8 (serve.py --quantize=int8): state-dict bytes,
RSS of a fresh process holding the model after one generation, greedy decode tok/s at batch 1 and 8
(interleaved, best of `repeats`), and perplexity on the run's own dataset
(likelihood.run_perplexity on val.bin) for trained runs; for the random-weight shapes, the
agreement of greedy tokens instead. Then per model a table of `quantize_formats` (quantize.in_format:
fp32, bf16, int8, int4 in groups of 128 and 32): weight bytes, mean KL and top-1 agreement of the
next-token distributions against the bf16 model's on a fixed token stream (the run's val.bin, or
random tokens for random weights, where perplexity means little), perplexity on it, and batch-1
greedy decode tok/s (interleaved, best of `repeats`).

real: a model of Llama 3.2 1B's shape (16 x 2048, 8 KV heads, vocab 128256, tied) with random bf16
weights, written as a Hugging Face directory (or --real_model=DIR), loaded in a fresh process per
format as sample.py loads it (dtype='auto': bf16 where the CPU has bf16 instructions): load time,
the process's peak RSS, greedy decode tok/s at batch 1; beside llama.cpp's Q8_0 and Q4_0 of the
same weights (its converter and llama-quantize) where a build is named (nanolab/bench_models.py).

lora: the peak memory of one LoRA step (r=16, batch 1 x 512 tokens, AdamW) on that shape with the
frozen base in bf16 or nf4 (QLoRA, bitsandbytes), with and without --grad_checkpoint, each in a
fresh process (nanolab/bench_models.py).

decode_profile: this machine's read bandwidth (the best torch.sum over 512 MB), and for each of
`models` in each of `profile_formats` at batch 1 and 8: the bytes a decode step reads, their read
time at that bandwidth, the step's wall time, their ratio (1.0 = the memory limit), and
torch.profiler's split of a step into matmul kernels, other ops and time no op accounts for.
"""
import json
import logging
import math
import os
import random
import subprocess
import sys
import tempfile
import time

import torch

from model import GPT, GPTConfig
from nanolab import bench_models, bench_serving, engine, llama_cpp
from nanolab.checkpoint import load_model
from nanolab.configurator import configure, fail
from nanolab.device import DTYPES, autocast_ctx, peak_flops, resolve_device, resolve_dtype
from nanolab.generation import generate
from nanolab.likelihood import stream_tokens
from nanolab.harness import harness_lm_class
from nanolab.quantize import for_inference
from nanolab.runs import read_metrics
from nanolab.tokenizer import TiktokenTokenizer
from nanolab.training import configure_optimizer, optimizer_step

# -----------------------------------------------------------------------------
which = 'decode'              # 'decode' | 'decode_profile' | 'train' | 'harness' | 'serve' | 'fairness' | 'structured' | 'llamacpp' | 'quantize' | 'real' | 'lora'
models = 'gpt2_124m,llama_56m'  # comma list of the shapes below
batch_sizes = '1,8'           # comma list of batch sizes for the decode comparison
new_tokens = 64               # tokens generated per decode measurement
prompt_len = 16               # prompt tokens per row for the decode measurement
nocache_tokens = 256          # new tokens for the cache vs no-cache comparison (batch 1)
ttft_prompt = 256             # prompt length for time to first token (batch 1)
repeats = 2                   # best of this many runs, ours and Hugging Face interleaved
hf = True                     # also time Hugging Face generate on identical weights
decode_compile = True         # decode: also time sample.py --compile's path (torch.compile'd decode steps)
device = 'cpu'                # 'cpu' | 'cuda' | 'auto'
dtype = 'float32'             # 'auto' | 'float32' | 'bfloat16' | 'float16'
seed = 1337                   # weights and prompts
train_models = 'cpu_default,nanogpt_cpu,baby_gpt'  # train: comma list of TRAIN_SHAPES
compile_modes = 'False,True'  # train: time the step without and with torch.compile
train_runs = 'nanogpt,default'  # train: whole runs timed back to back after the steps (TRAIN_RUNS); '' = none
serve_model = 'out-shakespeare-char'  # serve: the model served (an out_dir; `python train.py` writes this one)
serve_quantize = ''           # serve: '' | 'int8' | 'int4', passed to serve.py --quantize
clients = '1,4,10,16'         # serve: concurrent streaming clients, one round each
requests_per_client = 4       # serve: requests each client sends, one after another (a round sends >= 16 in all)
serve_tokens = 48             # serve: max_tokens per request (the default model's block_size is 64)
quantize_models = 'out-shakespeare-char,out-shakespeare-llama,llama_4x512,gpt2_124m'  # quantize: out_dirs and/or SHAPES names
quantize_formats = 'fp32,bf16,fp32+int8,bf16+int8,bf16+int4/128,bf16+int4/32'  # quantize: DTYPE[+QUANTIZE[/GROUP]] (quantize.in_format)
llama_cpp_dir = ''            # llamacpp: a llama.cpp build (bin/, convert.sh); '' = $NANOLAB_LLAMA_CPP
llama_threads = 0             # llamacpp: threads for both sides; 0 = torch's default (one per core)
llama_clients = '1,4,16'      # llamacpp: concurrent streaming clients, one round each
llama_models = 'gpt2_124m,llama_60m,qwen3_70m'  # llamacpp: bench_serving.LLAMA_SHAPES names, each against llama-bench
llama_formats = 'fp32,bf16,int8'  # llamacpp: ours against llama.cpp's F32, BF16, Q8_0 of the same weights
llama_compile = True          # llamacpp: also time sample.py --compile's path
llama_servers = 'int8'        # llamacpp: serve.py against llama-server on GPT-2 124M in these formats ('' = none)
llama_server_compile = True   # llamacpp: serve.py --compile
real_model = ''               # real: a Hugging Face dir to measure; '' = Llama 3.2 1B's shape, random bf16 weights (2.5 GB in a temp dir)
real_formats = ',int8,int4'   # real: the --quantize of each load ('' = the stored dtype, bf16 where the CPU has it)
lora_modes = 'bf16,bf16+ckpt,nf4,nf4+ckpt'  # lora: the frozen base (bf16 or nf4) and +ckpt for --grad_checkpoint
profile_formats = 'fp32,bf16,fp32+int8'  # decode_profile: quantize.in_format names, at batch 1 and 8
profile_compile = True        # decode_profile: each format also torch.compile'd (sample.py/serve.py --compile)
# -----------------------------------------------------------------------------
CHOICES = {'which': ('decode', 'decode_profile', 'train', 'harness', 'serve', 'fairness', 'structured',
                     'llamacpp', 'quantize', 'real', 'lora'),
           'dtype': DTYPES}
config = configure(globals(), choices=CHOICES)

# GPT-2 124M and a 56M Llama: the decode figures of docs/benchmarks.md are at these sizes
SHAPES = {
    'gpt2_124m': dict(arch='gpt2', n_layer=12, n_head=12, n_embd=768, block_size=1024,
                      vocab_size=50257),
    'llama_56m': dict(arch='llama', n_layer=8, n_head=8, n_kv_head=4, n_embd=512, block_size=1024,
                      vocab_size=32000),
    # quantize's small model (20M: 4 Llama blocks x 512, 8k vocabulary)
    'llama_4x512': dict(arch='llama', n_layer=4, n_head=8, n_kv_head=4, n_embd=512, block_size=512,
                        vocab_size=8192),
}
device = resolve_device(device)
ptdtype = resolve_dtype(dtype, device)


def timed(fn):
    if device.startswith('cuda'):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.startswith('cuda'):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def best_of(fns):
    """Run each function `repeats` times, interleaved; return each one's best time."""
    best = [float('inf')] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], timed(fn))
    return best


def hf_generate(hf_model, x, n):
    with torch.inference_mode():
        # min_new_tokens: random weights may emit the eos id; both sides must produce exactly n
        # tokens
        return hf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=0)


def bench_decode(name):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**SHAPES[name])).to(device=device, dtype=ptdtype).eval()
    print(f"\n{name}: {model.num_params(non_embedding=False) / 1e6:.1f}M "
          f"parameters, {device}, {ptdtype}")
    hf_model = None
    if hf:
        import transformers
        transformers.logging.set_verbosity_error()
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            hf_model = transformers.AutoModelForCausalLM.from_pretrained(
                d, dtype=ptdtype).to(device).eval()
    # what sample.py and serve.py decode with (on a CPU, the linears' kernel kernels.py chose), and
    # sample.py --compile's path (the same kernels, the step compiled around them)
    for_inference(model, report=True)
    V = model.config.vocab_size
    torch._dynamo.reset()  # each model's compiled steps alone in dynamo's cache
    compiled = engine.compiled(model) if decode_compile else None
    rows = []
    # 1) decode tokens/s at each batch size (greedy, no stop token so every row makes new_tokens)
    for B in [int(b) for b in batch_sizes.split(',')]:
        x = torch.randint(0, V, (B, prompt_len), device=device)
        ours = lambda m=model: generate(m, x.tolist(), new_tokens, temperature=0.0, stop_tokens=())
        fns = [ours] + ([lambda: hf_generate(hf_model, x, new_tokens)] if hf_model else [])
        # compiled once per batch size, untimed (the storage grows past 64 tokens: twice)
        if compiled is not None:
            print(f"decode B={B}: torch.compile "
                  f"{timed(lambda: ours(compiled)):.1f} s (first call)")
            fns.append(lambda: ours(compiled))
        t = best_of(fns)
        tps = [B * new_tokens / s for s in t]
        row = f"decode B={B}: ours {tps[0]:.1f} tok/s"
        if hf_model:
            row += f", HF generate {tps[1]:.1f} tok/s, ratio {tps[0] / tps[1]:.2f}x"
        rows.append((name, f'decode tok/s, batch {B}', tps[0], tps[1] if hf_model else None))
        if compiled is not None:
            row += f", compiled {tps[-1]:.1f} tok/s ({tps[-1] / tps[0]:.2f}x eager)"
            rows.append((name, f'decode tok/s, batch {B}, compiled', tps[-1],
                         tps[1] if hf_model else None))
        print(row)
    # 2) KV cache vs recomputing the whole context every step
    x = torch.randint(0, V, (1, prompt_len), device=device).tolist()
    t_cache, t_nocache = best_of([lambda: generate(model, x, nocache_tokens, temperature=0.0,
                                                   stop_tokens=()),
                                  lambda: generate(model, x, nocache_tokens, temperature=0.0,
                                                   stop_tokens=(), use_cache=False)])
    print(f"{nocache_tokens} new tokens, batch 1: cache {t_cache:.2f} s, no cache {t_nocache:.2f} "
          f"s, speed-up {t_nocache / t_cache:.1f}x")
    rows.append((name, f'speed-up over no cache, {nocache_tokens} tokens', t_nocache / t_cache,
                 None))
    # 3) time to first token: the prefill of a long prompt plus one sampled token
    x = torch.randint(0, V, (1, ttft_prompt), device=device)
    fns = [lambda: generate(model, x.tolist(), 1, temperature=0.0, stop_tokens=())]
    if hf_model:
        fns.append(lambda: hf_generate(hf_model, x, 1))
    t = best_of(fns)
    print(f"time to first token, {ttft_prompt}-token prompt: ours {t[0] * 1e3:.0f} ms" +
          (f", HF {t[1] * 1e3:.0f} ms" if hf_model else ''))
    rows.append((name, f'time to first token (ms), {ttft_prompt}-token prompt', t[0] * 1e3,
                 t[1] * 1e3 if hf_model else None))
    return rows


# -----------------------------------------------------------------------------
# training step

TRAIN_SHAPES = {  # model, batch, optimizer and timed steps (after `warmup` untimed ones)
    'cpu_default': dict(model=dict(arch='llama', n_layer=4, n_head=4, n_kv_head=2, n_embd=128,
                                   block_size=64, vocab_size=65, tie_embeddings=True),
                        batch_size=16, optim='muon', ns_steps=3, warmup=10, iters=100),
    'nanogpt_cpu': dict(model=dict(arch='gpt2', n_layer=4, n_head=4, n_embd=128, block_size=64,
                                   vocab_size=65, bias=False),
                        batch_size=12, warmup=10, iters=100),
    'baby_gpt': dict(model=dict(arch='gpt2', n_layer=6, n_head=6, n_embd=384, block_size=256,
                                vocab_size=65, bias=False,
                                dropout=0.2), batch_size=64, warmup=1, iters=3),
}


def bench_train(name):
    """train.py's step: forward and backward, gradient norm and clipping at 1.0, the optimizer
    (fused AdamW, or Muon for the blocks' matrices with AdamW for the rest)."""
    shape = TRAIN_SHAPES[name]
    B, T = shape['batch_size'], shape['model']['block_size']
    # device.PEAK_FLOPS; an unlisted GPU: MFU nan
    peak = peak_flops(device, ptdtype) or float('nan')
    rows = []
    for comp in [m.strip() == 'True' for m in compile_modes.split(',')]:
        torch.manual_seed(seed)
        raw_model = GPT(GPTConfig(**shape['model'])).to(device)
        model = torch.compile(raw_model) if comp else raw_model
        optimizer = configure_optimizer(raw_model, 0.1, 1e-3, (0.9, 0.99), device.split(':')[0],
                                        shape.get('optim', 'adamw'), shape.get('ns_steps', 5))
        scaler = torch.amp.GradScaler(enabled=False)  # fp32 and bf16: no loss scaling, as train.py
        ctx = autocast_ctx(device, ptdtype)
        x, y = (torch.randint(0, shape['model']['vocab_size'], (B, T), device=device)
                for _ in range(2))

        def step():
            with ctx:
                loss = model(x, y)[1]
            loss.backward()
            # train.py's
            optimizer_step(raw_model.parameters(), optimizer, scaler, 1.0, device.split(':')[0])
        t_first = timed(step)  # with compile: the compilation
        for _ in range(shape['warmup'] - 1):
            step()
        times = sorted(timed(step) for _ in range(shape['iters']))
        dt = times[len(times) // 2]  # the median step
        mfu = raw_model.estimate_mfu(B * T / dt, peak, T=T)
        print(f"{name} ({raw_model.num_params() / 1e6:.2f}M, batch {B}x{T}), compile={comp}: "
              f"{dt * 1e3:.1f} ms/iter, {B * T / dt:,.0f} tok/s, MFU "
              f"{mfu * 100:.1f}%" + (f" (first step, compiling: {t_first:.1f} s)" if comp else ''))
        rows.append((name, comp, dt * 1e3, B * T / dt, mfu * 100))
    return rows


TRAIN_RUNS = {  # train.py's arguments for each whole run
    'default': [],
    'nanogpt': ['--arch=gpt2', '--device=cpu', '--compile=False', '--eval_iters=20',
                '--log_interval=1', '--block_size=64', '--batch_size=12', '--n_layer=4',
                '--n_head=4', '--n_embd=128', '--max_iters=2000', '--lr_decay_iters=2000',
                '--dropout=0.0', '--learning_rate=1e-3', '--min_lr=1e-4', '--beta2=0.99',
                '--warmup_iters=100', '--eval_interval=250', '--optim=adamw', '--weight_decay=0.1',
                '--grad_clip=1.0', '--bias=False', '--tie_embeddings=True', '--n_kv_head=0',
                '--lr_schedule=cosine'],
}


def bench_train_run(name):
    """One whole `python train.py` run in a fresh process: (wall s, final val loss, training s when
    val <= 1.70 first)."""
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, 'train.py', *TRAIN_RUNS[name], f'--out_dir={d}/out']
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.time() - t0
        if r.returncode:
            fail(f'{" ".join(cmd)} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}')
        evals = [row for row in read_metrics(f'{d}/out/metrics.jsonl') if 'val_loss' in row]
    reached = next((row['time'] for row in evals if row['val_loss'] <= 1.70), None)
    print(f"{name}: {wall:.1f} s wall, val loss {evals[-1]['val_loss']:.4f} at iteration "
          f"{evals[-1]['iter']}, val <= 1.70 "
          f"{'never' if reached is None else f'after {reached:.1f} s of training'}")
    return name, wall, evals[-1]['val_loss'], reached


# -----------------------------------------------------------------------------
# lm-eval harness: our model as an lm-eval LM (evaluate.py) against lm-eval's own `hf` backend

# 4x256, GPT-2's (padded) vocabulary
HARNESS_SHAPE = dict(arch='gpt2', n_layer=4, n_head=4, n_embd=256, block_size=1024,
                     vocab_size=50304)
HARNESS_BATCH = 8  # requests per forward, both backends


def write_harness_tasks(d):
    """Local lm-eval tasks on random words in d -> {task: (requests per run, what a request
    is)}."""
    rng = random.Random(seed)
    words = ('the cat dog sat on a mat red blue green sun moon star tree river hill and of to in '
             'is was for').split()

    def text(lo, hi):
        return ' '.join(rng.choice(words) for _ in range(rng.randint(lo, hi)))
    tasks = {  # name: (rows, YAML body, requests per run)
        'bench_mc': ([{'q': text(10, 40) + ':', 'choices': [text(1, 6) for _ in range(4)], 'a': 0}
                      for _ in range(100)],
                     'output_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: choices\n'
                     'doc_to_target: a\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n',
                     (400, 'choices, 4 per question')),
        'bench_ppl': ([{'text': text(50, 1200)} for _ in range(16)],
                      "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
                      "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n"
                      "  - metric: bits_per_byte\n", (16, 'documents')),
        'bench_gen': ([{'q': text(5, 30), 'a': 'cat'} for _ in range(32)],
                      "output_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: a\n"
                      "generation_kwargs:\n  until: ['\\n\\n\\n']\n  max_gen_toks: 32\n"
                      "  do_sample: false\nmetric_list:\n  - metric: exact_match\n",
                      (32, 'answers of up to 32 tokens')),
    }
    for name, (rows, body, _) in tasks.items():
        with open(f'{d}/{name}.jsonl', 'w') as f:
            f.writelines(json.dumps(r) + '\n' for r in rows)
        with open(f'{d}/{name}.yaml', 'w') as f:
            f.write(f'task: {name}\ndataset_path: json\ntest_split: train\ndataset_kwargs:\n'
                    f'  data_files: {d}/{name}.jsonl\n  cache_dir: {d}/cache\n' + body)
    return {name: n for name, (_, _, n) in tasks.items()}


def bench_harness():
    """Requests/s end to end (lm_eval.simple_evaluate, tokenizing, scoring, metrics) on identical
    random weights."""
    import lm_eval  # lm-eval and transformers: only for this benchmark
    import transformers
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    # lm-eval warns about every default it fills in, for every run
    logging.disable(logging.WARNING)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**HARNESS_SHAPE)).to(device=device, dtype=ptdtype).eval()
    tok = TiktokenTokenizer('gpt2')
    print(f"harness: GPT-2-shaped {model.num_params(non_embedding=False) / 1e6:.1f}M parameters "
          f"({HARNESS_SHAPE['n_layer']}x{HARNESS_SHAPE['n_embd']}, block "
          f"{HARNESS_SHAPE['block_size']}), random weights, batch {HARNESS_BATCH}, {device}, "
          f"{ptdtype}")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tasks = write_harness_tasks(d)
        model.save_pretrained(f'{d}/hf', tok)
        ours = harness_lm_class()(model, tok, batch_size=HARNESS_BATCH,
                                  ctx=autocast_ctx(device, ptdtype))
        theirs = HFLM(pretrained=f'{d}/hf', batch_size=HARNESS_BATCH, device=device,
                      dtype=ptdtype) if hf else None
        manager = TaskManager(include_path=d, include_defaults=False)
        manager.load(list(tasks))  # builds the datasets' caches, so no timed run pays for it
        for task, (n, what) in tasks.items():
            out = {}
            def run(name, lm):
                out[name] = lm_eval.simple_evaluate(lm, tasks=[task], task_manager=manager,
                                                    bootstrap_iters=0)['results'][task]
            t = best_of([lambda: run('ours', ours)]
                        + ([lambda: run('hf', theirs)] if theirs else []))
            rps = [n / s for s in t]
            row = f"{task} ({n} {what}): ours {rps[0]:.1f} requests/s"
            if theirs:
                # the same scores, or the speed would compare different work (generation may
                # differ: HF can pick the padded vocabulary's ids past the tokenizer's, which
                # generate never emits)
                agree = all(math.isclose(v, out['hf'][k], rel_tol=1e-4)
                            for k, v in out['ours'].items()
                            if k.endswith(',none') and isinstance(v, float))
                row += (f", lm-eval hf {rps[1]:.1f} requests/s, ratio {rps[0] / rps[1]:.2f}x"
                        f" (metrics {'agree' if agree else 'differ'})")
            print(row)
            rows.append((task, rps[0], rps[1] if theirs else None))
    return rows


# -----------------------------------------------------------------------------
# int8 against fp32 (serve.py --quantize=int8)

def bench_quantize(src):
    torch.manual_seed(seed)
    if src in SHAPES:
        fp, tok, dataset = GPT(GPTConfig(**SHAPES[src])).eval(), None, None
    else:
        fp, tok, ckpt = load_model(src)
        dataset = (ckpt.get('config') or {}).get('dataset')
    print(f"\n{src}: {fp.num_params(non_embedding=False) / 1e6:.2f}M parameters, CPU")
    row = bench_models.int8_row(fp, json.dumps(SHAPES[src]) if src in SHAPES else src, tok,
                                dataset, prompt_len, new_tokens, best_of)
    print(' | '.join(f"{k} {v}" for k, v in row.items()))
    return {'model': src, **row}


def bench_formats(src):
    """quantize_formats of one model: bytes, KL and top-1 against bf16, perplexity, tok/s."""
    torch.manual_seed(seed)
    if src in SHAPES:
        base, ids = GPT(GPTConfig(**SHAPES[src])).eval(), None
    else:
        base, tok, ckpt = load_model(src)
        dataset = (ckpt.get('config') or {}).get('dataset')
        ids = torch.as_tensor(stream_tokens(dataset, tok)[0][:2049]) if dataset else None
    if ids is None:  # random weights: random tokens
        ids = torch.randint(0, base.config.vocab_size, (2049,))
    k = min(new_tokens, base.config.block_size - prompt_len)
    rows, n, T = bench_models.format_rows(base, ids, quantize_formats.split(','), prompt_len, k,
                                          repeats)
    print(f"\n{src}, {n} x {T} tokens ({'random' if src in SHAPES else 'val.bin'}), against "
          f"bf16's logits\n| format | weights MB | mean KL (nats) | top-1 agree | perplexity "
          f"| tok/s batch 1 |\n|---|---|---|---|---|---|")
    for f, r in rows.items():
        print(f"| {f} | {r['bytes'] / 1e6:.1f} | {r['kl']:.2e} | {r['top1'] * 100:.1f}% | "
              f"{r['ppl']:.3f} | {r['tok/s']:.0f} |")


# -----------------------------------------------------------------------------
# the benchmark asked for, and its table

if which == 'llamacpp':
    build = llama_cpp.build_dir(llama_cpp_dir)
    if llama_cpp.tools(build) is None:
        print(f"llamacpp: skipped, {llama_cpp.ENV} (or --llama_cpp_dir) does not point at a "
              f"llama.cpp build. Build one ({llama_cpp.HOW}; about 10 minutes on 2 cores), then "
              f"{llama_cpp.ENV}=DIR python bench.py --which=llamacpp")
    else:
        bench_serving.bench_llamacpp(build, llama_threads,
                                     [int(c) for c in llama_clients.split(',')],
                                     requests_per_client, repeats, seed,
                                     llama_models.split(','), llama_formats.split(','),
                                     llama_compile, [f for f in llama_servers.split(',') if f],
                                     llama_server_compile)

elif which == 'fairness':
    bench_serving.bench_fairness(serve_model, device, serve_quantize, serve_tokens)

elif which == 'structured':  # constrained against none: Shakespeare (a grammar), GPT-2 124M (a schema)
    bench_serving.bench_structured([int(c) for c in clients.split(',')], requests_per_client,
                                   serve_tokens, repeats, seed)

elif which == 'serve':
    rows = bench_serving.bench_serve(serve_model, device, serve_quantize,
                                     [int(c) for c in clients.split(',')], requests_per_client,
                                     serve_tokens)
    print("\n| clients | tokens/s | x single | TTFT p50 ms | TTFT p95 ms |\n|---|---|---|---|---|")
    for n, tps, p50, p95 in rows:
        print(f"| {n} | {tps:.0f} | {tps / rows[0][1]:.1f}x | {p50:.0f} | {p95:.0f} |")
    by = {n: r for n, *r in rows}
    if 1 in by and 16 in by:
        print(f"target: 16 clients >= 3x single: {by[16][0] / by[1][0]:.1f}x "
              f"({'met' if by[16][0] >= 3 * by[1][0] else 'MISSED'})")
    if 10 in by:
        print(f"target: p95 time to first token at 10 clients < 500 ms: {by[10][2]:.0f} ms "
              f"({'met' if by[10][2] < 500 else 'MISSED'})")

elif which == 'real':
    bench_models.bench_real(real_model, real_formats.split(','), llama_cpp.build_dir(llama_cpp_dir),
                            llama_threads or torch.get_num_threads())

elif which == 'decode_profile':
    bench_models.bench_decode_profile({n: SHAPES[n] for n in models.split(',')},
                                      profile_formats.split(','), (1, 8), repeats,
                                      profile_compile)

elif which == 'lora':
    bench_models.bench_lora(lora_modes.split(','))

elif which == 'quantize':
    rows = []
    for src in quantize_models.split(','):
        # a run not trained here yet: say how, measure the rest
        if src not in SHAPES and not os.path.exists(src):
            print(f"{src}: skipped, no such run; train it first (python train.py --out_dir={src}, "
                  "or the config in configs/ whose out_dir it is)")
            continue
        rows.append(bench_quantize(src))
        bench_formats(src)
    print("\n| model | weights fp32 -> int8 | RSS fp32 -> int8 | tok/s batch 1 | tok/s batch 8 "
          "| perplexity |\n|---|---|---|---|---|---|")
    mb = lambda b: f"{b / 1e6:.1f} MB"
    for r in rows:
        ppl = (f"{r['ppl'][0]:.4f} -> {r['ppl'][1]:.4f} "
               f"({(r['ppl'][1] / r['ppl'][0] - 1) * 100:+.2f}%)" if 'ppl' in r
               else f"random weights: {r['agree'] * 100:.0f}% greedy tokens agree")
        print(f"| {r['model']} | {mb(r['bytes'][0])} -> {mb(r['bytes'][1])} "
              f"({r['bytes'][1] / r['bytes'][0] * 100:.0f}%) | {mb(r['rss'][0])} -> "
              f"{mb(r['rss'][1])} | {r['tps1'][0]:.0f} -> {r['tps1'][1]:.0f} | {r['tps8'][0]:.0f} "
              f"-> {r['tps8'][1]:.0f} | {ppl} |")

elif which == 'train':
    torch.manual_seed(seed)
    rows = []
    for name in train_models.split(','):
        if name not in TRAIN_SHAPES:
            fail(f"unknown training shape '{name}'; use one of {', '.join(TRAIN_SHAPES)}")
        rows += bench_train(name)
    print("\n| model | compile | ms/iter | tokens/s | MFU |\n|---|---|---|---|---|")
    for name, comp, ms, tps, mfu in rows:
        print(f"| {name} | {comp} | {ms:.1f} | {tps:,.0f} | {mfu:.1f}% |")
    if bad := [n for n in train_runs.split(',') if n and n not in TRAIN_RUNS]:
        fail(f"unknown training run '{bad[0]}'; use one of {', '.join(TRAIN_RUNS)}")
    # back to back, the order given
    runs = [bench_train_run(n) for n in train_runs.split(',') if n]
    # the machine's speed drifts between runs: compare each with the mean of the nanogpt runs
    if runs:
        walls = [w for n, w, _, _ in runs if n == 'nanogpt']
        base = sum(walls) / len(walls) if walls else None
        print("\n| run | wall s | final val loss | val <= 1.70 after (s) "
              "| wall vs nanogpt's mean |\n|---|---|---|---|---|")
        for n, w, loss, reached in runs:
            print(f"| {n} | {w:.1f} | {loss:.4f} | "
                  f"{'never' if reached is None else f'{reached:.1f}'} | "
                  f"{f'{w / base:.2f}x' if base else ''} |")

elif which == 'harness':
    rows = bench_harness()
    print("\n| task | nanolab requests/s | lm-eval hf requests/s | ratio |\n|---|---|---|---|")
    for task, ours, theirs in rows:
        print(f"| {task} | {ours:.1f} | {'' if theirs is None else f'{theirs:.1f}'} | "
              f"{'' if theirs is None else f'{ours / theirs:.2f}x'} |")

else:  # decode
    torch.manual_seed(seed)
    rows = []
    for name in models.split(','):
        if name not in SHAPES:
            fail(f"unknown model shape '{name}'; use one of {', '.join(SHAPES)}")
        rows += bench_decode(name)
    print("\n| model | measure | nanolab | Hugging Face | ratio |\n|---|---|---|---|---|")
    for name, what, ours, theirs in rows:
        ratio = f"{ours / theirs:.2f}x" if theirs and 'ms' not in what else \
            (f"{theirs / ours:.2f}x faster" if theirs else '')
        print(f"| {name} | {what} | {ours:.1f} | "
              f"{'' if theirs is None else f'{theirs:.1f}'} | {ratio} |")
