"""
Device and dtype, chosen in one place for every script, and the peak FLOP/s that MFU is measured
against.

    device = resolve_device('auto')        # cuda, then mps, then cpu; an absent device is an error
    dtype = resolve_dtype('auto', device)  # bf16 on GPUs that have it, fp16 on older ones, or fp32
    with autocast_ctx(device, dtype): ...  # mixed precision for the forward pass; nothing in fp32
"""
from contextlib import nullcontext
from functools import cache

import torch

# the dtype setting of every script (resolve_dtype)
DTYPES = ('auto', 'float32', 'bfloat16', 'float16')


def resolve_device(device='auto'):
    """'auto' picks cuda, then mps, then cpu. An explicit device that is not there is an error. On
    CUDA it also turns TF32 on for fp32 matmuls (Ampere and later: ~8x the fp32 rate, 10-bit
    mantissas; nanoGPT does the same), for every script, since every script comes through here."""
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else \
            'mps' if hasattr(torch.backends, 'mps') and torch.backends.mps.is_available() else \
            'cpu'
    kind = device.split(':')[0]
    if kind == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f"device='{device}' but CUDA is not available here; use "
                         "--device=cpu (or --device=auto)")
    if kind == 'mps' and not (hasattr(torch.backends, 'mps')
                              and torch.backends.mps.is_available()):
        raise ValueError(f"device='{device}' but MPS is not available here; use "
                         "--device=cpu (or --device=auto)")
    if kind not in ('cpu', 'cuda', 'mps'):
        raise ValueError(f"unknown device '{device}'; use auto, cpu, cuda, cuda:N or mps")
    if kind == 'cuda':
        torch.set_float32_matmul_precision('high')
    return device


@cache  # the CPU does not change under a process: /proc/cpuinfo is read once
def cpu_info():
    """(this CPU's model name, its instruction-set flags) from Linux's /proc/cpuinfo; ('', ()) where
    there is none to read."""
    fields = {}
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:  # every core repeats them: the first core's
                key, _, value = line.partition(':')
                fields.setdefault(key.strip(), value)
    except OSError:
        return '', ()
    return ' '.join(fields.get('model name', '').split()), tuple(fields.get('flags', '').split())


def cpu_has_bf16():
    """Whether this CPU computes bf16 in hardware (AVX512_BF16 or AMX, cpu_info's flags); elsewhere
    bf16 matmuls are emulated, ~8x slower than fp32 (measured on an AVX2 EPYC: 20 vs 163 GFLOP/s
    for a 2048^2 matmul)."""
    flags = cpu_info()[1]
    return 'avx512_bf16' in flags or 'amx_bf16' in flags


def resolve_dtype(dtype, device, stored=None):
    """'auto' = bf16 on GPUs that support it, fp16 on older GPUs, fp32 on MPS; on a CPU fp32, unless
    the weights are stored in 16 bits (stored: their dtype, as load_model finds it) and the CPU has
    bf16 instructions (cpu_has_bf16): then bf16, so a 1B model's weights take 2.5 GB, not 5, and a
    decode step reads half the bytes."""
    kind = device.split(':')[0]
    if dtype == 'auto':
        if kind == 'cuda':
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if kind == 'cpu' and stored in (torch.bfloat16, torch.float16) and cpu_has_bf16():
            return torch.bfloat16
        return torch.float32
    table = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype '{dtype}'; use auto, float32, bfloat16 or float16")
    if table[dtype] is torch.bfloat16 and kind == 'cuda' and not torch.cuda.is_bf16_supported():
        raise ValueError("dtype='bfloat16' but this GPU does not support it; use --dtype=float16")
    if table[dtype] is torch.float16 and kind == 'cpu':
        raise ValueError("dtype='float16' is not supported for CPU compute; use "
                         "--dtype=float32 (or bfloat16)")
    return table[dtype]


def autocast_ctx(device, dtype):
    """Mixed precision for the forward pass; a no-op in fp32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.split(':')[0], dtype=dtype)


# dense peak FLOP/s by GPU (the vendors' datasheets): (bf16/fp16 tensor cores, fp32 matmuls with
# TF32 on). MFU divides by these; an unlisted GPU gives None and the trainers print no MFU until
# --peak_flops says its peak.
PEAK_FLOPS = {'H200': (989e12, 495e12), 'H100': (989e12, 495e12), 'A100': (312e12, 156e12),
              'L40S': (362e12, 183e12), 'L4': (121e12, 60e12), 'A10': (125e12, 62e12),
              'RTX 4090': (165e12, 83e12), 'RTX 3090': (71e12, 36e12), 'V100': (125e12, 16e12),
              'T4': (65e12, 8e12)}
CPU_PEAK_FLOPS = 163e9  # a 2-core development CPU, fp32 matmuls, measured (docs/training.md)


def peak_flops(device, dtype):
    """The peak FLOP/s MFU is measured against on device with dtype: the GPU's row of PEAK_FLOPS
    (by its name), None for an unlisted GPU, CPU_PEAK_FLOPS on a CPU (a stand-in: every CPU
    differs; pass your own)."""
    if not str(device).startswith('cuda'):
        return CPU_PEAK_FLOPS
    name = torch.cuda.get_device_name(torch.device(device))
    half = dtype in (torch.float16, torch.bfloat16)
    return next((v[0 if half else 1] for k, v in PEAK_FLOPS.items() if k in name), None)


def free_memory(device='cpu'):
    """Bytes that new tensors on device can take now, or None where that cannot be told: the
    driver's free memory on a GPU; on the CPU the kernel's MemAvailable (free memory plus the page
    cache it can drop), or what is left under this process's cgroup limit (a container's) if less.
    """
    if str(device).startswith('cuda'):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    if str(device) != 'cpu':
        return None
    free = None
    try:
        with open('/proc/meminfo') as f:
            free = next(int(line.split()[1]) * 1024 for line in f
                        if line.startswith('MemAvailable:'))
        with open('/sys/fs/cgroup/memory.max') as f:
            limit = f.read().strip()
        with open('/sys/fs/cgroup/memory.current') as f:
            used = int(f.read())
        if limit != 'max':
            free = min(free, max(0, int(limit) - used))
    except (OSError, ValueError, StopIteration):
        pass
    return free
