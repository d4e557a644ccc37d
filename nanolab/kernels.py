"""
Which matmul kernel a CPU decode uses, chosen by measuring on the CPU in front of us: an AVX2 and an
AVX-512 CPU, or a model in cache and one streamed from memory, want different kernels, and no fixed
rule picks right everywhere. For fp32 and bf16 linears the candidates are

    mkl       F.linear on the weight as stored (an fp32 output head: its transposed copy)
    onednn/1  oneDNN's linear on a weight packed once for it, in the layout oneDNN picks for 1 row
    onednn/8  the same, in the layout it picks for 8 rows

and the probe times each on the model's own linears (every shape as many times as the model holds
it, so a 3 MB model is timed in cache and a 500 MB one from memory; copies capped at PROBE_BYTES),
one pass of them at 1 and at 8 rows, best of 3, and keeps the candidate whose two times, each over
the best candidate's, sum lowest. Measured on the 2-core AMD EPYC (AVX-512, avx512_bf16): fp32
GPT-2 124M, oneDNN/1 reads 26-29 GB/s at 1 row but 17-18 at 8; oneDNN/8 22-28 at both (10% slower
at 1 row, 1.4-1.7x faster at 8); MKL's one-row product runs on one core (~13 GB/s); the 3 MB
Shakespeare model is fastest on MKL (oneDNN's per-call cost). int8 has one kernel on x86, fbgemm's
(oneDNN's int8 linear was 1.03-1.5x slower per GPT-2 matrix here), int4 aten's; they are not probed.

The choice is saved per CPU (model name and instruction sets), thread count, torch version, dtype
and the model's linear shapes, in $NANOLAB_KERNELS (default ~/.cache/nanolab/kernels.json), so
sample.py, serve.py and bench.py decode a model with the same kernels on one machine, and a seeded
request gives the same text in each. NANOLAB_KERNELS=off skips the probe: oneDNN/8 where oneDNN is
built in (the EPYC's choice for GPT-2 124M in fp32 and a 1B Llama in bf16; GPT-2 in bf16 tied it
within 1% with oneDNN/1).

    kernel, line = linear_kernel(model)    # 'mkl' | 'onednn/1' | 'onednn/8', and what to print
"""
import json
import os
import time
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanolab import files
from nanolab.device import cpu_info

CANDIDATES = ('mkl', 'onednn/1', 'onednn/8')
PROBE_BYTES = 128 << 20  # the probe's copies of the weights at most: far past any cache
MAX_FILE = 1 << 20       # a saved-choices file larger than this is not read (nor kept)
MAX_ENTRIES = 64         # choices kept, the most recent
ONEDNN = hasattr(torch.ops.mkldnn, '_linear_pointwise') and torch.backends.mkldnn.is_available()
# the instruction sets that decide which kernel wins, as the printed line names them
FLAGS = ('avx2', 'avx512f', 'avx512_vnni', 'avx512_bf16', 'amx_bf16', 'amx_int8')


def path():
    """Where choices are saved ('' = nowhere: NANOLAB_KERNELS=off)."""
    p = os.environ.get('NANOLAB_KERNELS', '')
    if p.lower() in ('off', '0', 'false', 'no'):
        return ''
    return p or os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'),
                             'nanolab', 'kernels.json')


def cpu_line():
    """'AMD EPYC (avx2 avx512f ...; 2 threads)': the CPU as the choice's key and the printed line
    name it."""
    name, flags = cpu_info()
    return f"{name or 'unknown CPU'} ({' '.join(f for f in FLAGS if f in flags) or 'no AVX2'}; " \
           f"{torch.get_num_threads()} threads)"


def shapes(model):
    """The model's plain linears as sorted [(in, out, count)] (the output head once, even tied)."""
    c = Counter((m.in_features, m.out_features) for m in model.modules() if type(m) is nn.Linear)
    return sorted((i, o, n) for (i, o), n in c.items())


def _load(p):
    try:
        if os.path.getsize(p) > MAX_FILE:
            raise ValueError(f'over {MAX_FILE} bytes')
        with open(p) as f:
            saved = json.load(f)
        if not isinstance(saved, dict):
            raise ValueError('not a JSON object')
        return {k: v for k, v in saved.items() if isinstance(v, dict) and v.get('kernel') in
                CANDIDATES}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # unreadable or damaged: probe again, and write it anew
        print(f"note: ignoring saved kernel choices in {p} ({e}); probing again")
        return {}


def probe(shape_counts, dtype, candidates=CANDIDATES, rows=(1, 8), repeats=3):
    """Seconds of one pass over a model's linears (shape_counts: [(in, out, count)]) at each of
    `rows` rows -> {candidate: [seconds, ...]}. Timed on copies: each shape `count` times, all
    scaled down together to PROBE_BYTES, and a shape one copy of which is over a quarter of that
    (a large vocabulary's head) cut to fewer output rows; each shape's time is scaled back up to
    the model's, so the probe adds at most PROBE_BYTES (twice, packed) to a big model's load."""
    size = dtype.itemsize
    scale = min(1.0, PROBE_BYTES / max(sum(i * o * n for i, o, n in shape_counts) * size, 1))
    gen = torch.Generator().manual_seed(0)
    groups = []  # (in, copies of the shape, the factor from their time to the model's)
    for i, o, n in shape_counts:
        rows_kept = min(o, max(16, PROBE_BYTES // 4 // (i * size)))
        k = max(1, round(n * scale))
        groups.append((i, [torch.randn(rows_kept, i, generator=gen).mul_(0.02).to(dtype)
                           for _ in range(k)], n * o / (k * rows_kept)))
    out = {}
    for cand in candidates:
        if cand.startswith('onednn'):
            hint = int(cand.split('/')[1])
            mats = [[torch.ops.mkldnn._reorder_linear_weight(w, hint) for w in ws]
                    for _, ws, _ in groups]
            fn = lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, 'none', [], '')  # noqa: E731
        else:
            mats, fn = [ws for _, ws, _ in groups], F.linear
        times = []
        for M in rows:
            xs = [torch.randn(M, i, generator=gen).to(dtype) for i, _, _ in groups]
            best = float('inf')
            for _ in range(repeats + 1):  # the first pass warms up
                total = 0.0
                for x, ws, (_, _, factor) in zip(xs, mats, groups):
                    t0 = time.perf_counter()
                    for w in ws:
                        fn(x, w)
                    total += (time.perf_counter() - t0) * factor
                best = min(best, total)
            times.append(best)
        out[cand] = times
        del mats
    return out


def pick(times):
    """The candidate whose times, each over the best candidate's at that row count, sum lowest."""
    best = [min(t[j] for t in times.values()) for j in range(len(next(iter(times.values()))))]
    return min(times, key=lambda c: sum(t / b for t, b in zip(times[c], best)))


def linear_kernel(model):
    """The kernel for this CPU model's fp32/bf16 linears -> (kernel, a line to print saying what
    and why). Probes once per CPU, thread count, torch, dtype and shapes; then reads the choice."""
    dtype = next(model.parameters()).dtype
    if not ONEDNN:
        return 'mkl', 'kernels: MKL (this PyTorch has no oneDNN linear)'
    sc = shapes(model)
    key = json.dumps([cpu_line(), torch.__version__, str(dtype), sc])
    p = path()
    if not p:
        return 'onednn/8', 'kernels: oneDNN packed for 8 rows (NANOLAB_KERNELS=off: not probed)'
    saved = _load(p)
    if key in saved:
        c = saved[key]
        return c['kernel'], f"kernels on {cpu_line()}: {c['kernel']} for {str(dtype)[6:]} " \
                            f"linears (probed {c.get('when', 'before')}, saved in {p})"
    t0 = time.perf_counter()
    times = probe(sc, dtype)
    kernel = pick(times)
    ms = ', '.join(f"{c} {t[0] * 1e3:.1f}/{t[1] * 1e3:.1f}" for c, t in times.items())
    saved[key] = dict(kernel=kernel, ms={c: [round(x * 1e3, 3) for x in t] for c, t in
                                         times.items()}, when=time.strftime('%Y-%m-%d'))
    try:
        os.makedirs(os.path.dirname(p) or '.', exist_ok=True)
        files.write_json(p, dict(list(saved.items())[-MAX_ENTRIES:]))
        where = f'saved in {p}'
    except OSError as e:
        where = f'not saved: {e}'
    return kernel, (f"kernels on {cpu_line()}: {kernel} for {str(dtype)[6:]} linears (probe, "
                    f"{time.perf_counter() - t0:.1f} s: a step's linears at 1/8 rows, ms: {ms}; "
                    f"{where})")
