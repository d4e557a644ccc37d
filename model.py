"""
The nanolab model: one GPT with selectable blocks, plus everything that touches its weights.

    arch='gpt2'   learned positions, LayerNorm, GELU MLP, tied embeddings   (GPT-2, Radford et al. 2019)
    arch='llama'  RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, no biases   (Touvron et al. 2023)
    positions     'learned' (gpt2's), 'rope' (llama's) or 'sinusoidal' (Vaswani et al. 2017), with either arch

Also here, because every script needs them exactly once:
  1) device / dtype selection and the autocast context
  2) a KV cache for incremental decoding of a batch of prompts of different lengths
  3) parameter, FLOP and MFU counts
  4) Hugging Face import (`GPT.from_pretrained`) and export (`model.save_pretrained`)
  5) atomic checkpoint save/load, and `load_model`, the one function that opens any model source

Quick check (CPU, random weights):
    python -c "from model import *; m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64)); print(m.num_params())"
"""
import json
import math
import os
import sys
import threading
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F

ARCHS = ('gpt2', 'llama')
POSITIONS = ('learned', 'rope', 'sinusoidal')
DTYPES = ('auto', 'float32', 'bfloat16', 'float16')  # the dtype setting of every script (resolve_dtype)

# -----------------------------------------------------------------------------
# 1) device and dtype: chosen once here, used by every script

def resolve_device(device='auto'):
    """'auto' picks cuda, then mps, then cpu. An explicit device that is not there is an error. On CUDA it also
    turns TF32 on for fp32 matmuls (Ampere and later: ~8x the fp32 rate, 10-bit mantissas; nanoGPT does the same),
    for every script, since every script comes through here."""
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else \
            'mps' if hasattr(torch.backends, 'mps') and torch.backends.mps.is_available() else 'cpu'
    kind = device.split(':')[0]
    if kind == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f"device='{device}' but CUDA is not available here; use --device=cpu (or --device=auto)")
    if kind == 'mps' and not (hasattr(torch.backends, 'mps') and torch.backends.mps.is_available()):
        raise ValueError(f"device='{device}' but MPS is not available here; use --device=cpu (or --device=auto)")
    if kind not in ('cpu', 'cuda', 'mps'):
        raise ValueError(f"unknown device '{device}'; use auto, cpu, cuda, cuda:N or mps")
    if kind == 'cuda':
        torch.set_float32_matmul_precision('high')
    return device

def resolve_dtype(dtype, device):
    """'auto' = bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU and MPS.
    subtle: bf16 is ~8x slower than fp32 on our 2-core dev CPU (SPEC: measured), so CPU stays fp32."""
    kind = device.split(':')[0]
    if dtype == 'auto':
        if kind == 'cuda':
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    table = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype '{dtype}'; use auto, float32, bfloat16 or float16")
    if table[dtype] is torch.bfloat16 and kind == 'cuda' and not torch.cuda.is_bf16_supported():
        raise ValueError("dtype='bfloat16' but this GPU does not support it; use --dtype=float16")
    if table[dtype] is torch.float16 and kind == 'cpu':
        raise ValueError("dtype='float16' is not supported for CPU compute; use --dtype=float32 (or bfloat16)")
    return table[dtype]

# dense peak FLOP/s by GPU (the vendors' datasheets): (bf16/fp16 tensor cores, fp32 matmuls with TF32 on).
# MFU divides by these; an unlisted GPU gives None and the trainers print no MFU until --peak_flops says its peak.
PEAK_FLOPS = {'H200': (989e12, 495e12), 'H100': (989e12, 495e12), 'A100': (312e12, 156e12), 'L40S': (362e12, 183e12),
              'L4': (121e12, 60e12), 'A10': (125e12, 62e12), 'RTX 4090': (165e12, 83e12),
              'RTX 3090': (71e12, 36e12), 'V100': (125e12, 16e12), 'T4': (65e12, 8e12)}
CPU_PEAK_FLOPS = 163e9  # this project's 2-core development CPU, fp32 matmuls, measured (README, Training)

def peak_flops(device, dtype):
    """The peak FLOP/s MFU is measured against on device with dtype: the GPU's row of PEAK_FLOPS (by its name),
    None for an unlisted GPU, CPU_PEAK_FLOPS on a CPU (a stand-in: every CPU differs; pass your own)."""
    if not str(device).startswith('cuda'):
        return CPU_PEAK_FLOPS
    name = torch.cuda.get_device_name(torch.device(device))
    half = dtype in (torch.float16, torch.bfloat16)
    return next((v[0 if half else 1] for k, v in PEAK_FLOPS.items() if k in name), None)

def autocast_ctx(device, dtype):
    """Mixed precision for the forward pass; a no-op in fp32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.split(':')[0], dtype=dtype)

# -----------------------------------------------------------------------------
# the model

@dataclass
class GPTConfig:
    arch: str = 'gpt2'           # 'gpt2' | 'llama'
    block_size: int = 1024       # max context length (tokens)
    vocab_size: int = 50304      # GPT-2's 50257 padded up to a multiple of 64 for speed (nanoGPT)
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 0           # key/value heads for grouped-query attention; 0 = n_head (plain multi-head)
    n_embd: int = 768
    ffn_hidden: int = 0          # MLP width; 0 = 4*n_embd (gpt2) or 8/3*n_embd rounded up to 64 (llama)
    dropout: float = 0.0
    bias: bool = True            # biases in Linear and LayerNorm (gpt2 only; llama has none)
    tie_embeddings: bool = None  # share the token embedding with the output head; None = arch default (gpt2 yes, llama no)
    positions: str = None        # 'learned' | 'rope' | 'sinusoidal'; None = the arch's (gpt2 learned, llama rope)
    rope_theta: float = 10000.0  # RoPE base (and the sinusoids' base is 10000, as the original Transformer's)
    norm_eps: float = 1e-5       # LayerNorm / RMSNorm epsilon

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch '{self.arch}'; use one of {ARCHS}")
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if not self.positions:  # None or '' (a script's setting)
            self.positions = 'learned' if self.arch == 'gpt2' else 'rope'
        if self.positions not in POSITIONS:
            raise ValueError(f"unknown positions '{self.positions}'; use one of {POSITIONS}")
        if self.tie_embeddings is None:  # GPT-2 ties them (Press & Wolf 2017); Llama keeps a separate head
            self.tie_embeddings = self.arch == 'gpt2'
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.arch == 'llama':
            self.bias = False  # Llama blocks have no biases by definition
        elif self.n_kv_head != self.n_head:
            raise ValueError("grouped-query attention (n_kv_head < n_head) needs arch='llama'")
        if self.positions == 'rope' and (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError("RoPE needs an even head size; change n_embd or n_head")
        if self.positions == 'sinusoidal' and self.n_embd % 2 != 0:
            raise ValueError("sinusoidal positions need an even n_embd (sine and cosine pairs)")
        if self.ffn_hidden == 0:
            self.ffn_hidden = 4 * self.n_embd if self.arch == 'gpt2' else 64 * math.ceil(8 * self.n_embd / 3 / 64)

    @property
    def head_size(self):
        return self.n_embd // self.n_head


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019). Computed in fp32, as Llama does, for stability."""
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(config):
    """cos/sin tables for rotary embeddings (Su et al. 2021), (block_size, head_size) each.
    We use the 'rotate half' layout of the Hugging Face Llama code, so its weights load unpermuted."""
    hs = config.head_size
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.int64).float() / hs))
    t = torch.arange(config.block_size, dtype=torch.int64).float()
    freqs = torch.outer(t, inv_freq)              # (T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)       # (T, hs)
    return emb.cos(), emb.sin()

def sinusoid_table(config):
    """The original Transformer's fixed positions (Vaswani et al. 2017, 3.5), (block_size, n_embd): dimension 2i of
    position p is sin(p / 10000^(2i/C)), dimension 2i+1 its cos. Nothing to learn; added to the token embedding."""
    C = config.n_embd
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, C, 2, dtype=torch.int64).float() / C))  # (C/2,)
    angles = torch.outer(torch.arange(config.block_size, dtype=torch.int64).float(), inv_freq)  # (T, C/2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1)  # (T, C): sin, cos interleaved

def apply_rope(x, cos, sin):
    """x: (B, nh, T, hs); cos/sin: (B, 1, T, hs), already gathered at each token's position."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


def attention(q, k, v, mask=None, causal=False, dropout=0.0):
    """SDPA of q (B, nh, T, hs) over k, v (B, nkv, S, hs), with grouped-query attention (nkv < nh) on a fast kernel.
    On CUDA, SDPA's enable_gqa is taken by the flash kernel alone, which refuses masks and fp32: there (half
    precision, no mask) it is used, and otherwise keys and values are expanded to nh heads first (expand_kv), so the
    memory-efficient kernel applies instead of the math one. On the CPU, SDPA takes enable_gqa in its own kernels,
    as before (so CPU runs stay bit for bit what they were)."""
    nh, nkv = q.size(1), k.size(1)
    if nh != nkv and q.is_cuda and not (q.dtype in (torch.float16, torch.bfloat16) and mask is None):
        k, v = expand_kv(k, v, nh)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout,
                                          enable_gqa=nh != k.size(1))

def expand_kv(k, v, nh):
    """Keys and values (B, nkv, S, hs) repeated to nh heads, each serving its group of query heads."""
    return k.repeat_interleave(nh // k.size(1), dim=1), v.repeat_interleave(nh // k.size(1), dim=1)


class KVCache:
    """Keys and values of every layer for `slots` sequences, each with its own length, kept between forward calls so
    each new token costs O(T), not O(T^2). engine.py keeps one per model; slot s holds one row's context.

    A forward pass with a cache feeds a flat list of new tokens, laid out by schedule():
      - decode: one token for each slot in [0, decode), batched into one attention call (slots with no real row
        in that range compute a throwaway token that is never kept: cheaper than gathering the others together)
      - chunks: (slot, T) runs of T tokens appended to one slot (a prompt being prefilled), attention per chunk
    so a step can prefill prompts and decode every other row in the same matrix multiplies. Without schedule(), a
    (B, T) input appends T tokens to each of slots 0..B-1.
    static=True (a compiled decode step, engine.py): every decode step attends over the whole storage, masked, so
    its shapes change only when the storage grows or the number of decoding slots changes, and torch.compile does
    not compile again for every new length.
    """
    def __init__(self, config, slots, max_len, device, dtype, static=False):
        self.config, self.device, self.dtype, self.static = config, device, dtype, static
        self.lengths = [0] * slots  # tokens held by each slot, counting those of the scheduled forward
        self.k, self.v, self.max_len, self.plan, self.pos = [], [], 0, None, None
        self.reserve(max_len)

    def reserve(self, n):
        """Room for n tokens in every slot (at most block_size): grows the storage (doubling), keeping its contents."""
        if n > self.config.block_size:
            raise ValueError(f"KV cache of {n} tokens exceeds block_size={self.config.block_size}; "
                             "generate fewer tokens or shorten the prompt")
        if n <= self.max_len:
            return
        size = min(self.config.block_size, max(n, 2 * self.max_len))
        shape = (len(self.lengths), self.config.n_kv_head, size, self.config.head_size)
        # subtle: zeros, not empty: masked-out slots still enter attention as 0 * V, and garbage could be NaN
        grow = lambda old: torch.cat([old, torch.zeros(*shape[:2], size - self.max_len, shape[3], device=self.device,
                                                       dtype=self.dtype)], dim=2) if old is not None else \
            torch.zeros(shape, device=self.device, dtype=self.dtype)
        n_layer = self.config.n_layer
        self.k = [grow(self.k[i] if self.k else None) for i in range(n_layer)]
        self.v = [grow(self.v[i] if self.v else None) for i in range(n_layer)]
        self.max_len = size

    def copy(self, src, dst, n=None):
        """Slots dst take the first n (default: all) cached tokens of slots src (a fork, or a beam-search reorder)."""
        n = max(self.lengths[s] for s in src) if n is None else n
        si, di = torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device)
        for kv in (self.k, self.v):
            for t in kv:
                t[di, :, :n] = t[si, :, :n]  # subtle: the right side is gathered first, so src and dst may overlap
        lengths = [min(n, self.lengths[s]) for s in src]
        for d, m in zip(dst, lengths):
            self.lengths[d] = m

    def schedule(self, decode=0, real=None, chunks=()):
        """Lay out the next forward's tokens: one for each slot in [0, decode) (real[s] False: a throwaway token),
        then each (slot, T) chunk -> positions (1, N) of those tokens. Grows the storage if the tokens need room;
        masks are built here, once for all layers, and the slots' lengths count the new tokens from here on.
        subtle: all the bookkeeping is here, outside the forward, so a compiled forward reads no Python number that
        changes every step (torch.compile would guard on it and compile again)."""
        real = [True] * decode if real is None else real
        self.reserve(max([self.lengths[s] + 1 for s in range(decode) if real[s]] +
                         [self.lengths[s] + T for s, T in chunks], default=0))
        starts = [min(self.lengths[s], self.max_len - 1) for s in range(decode)]
        static = self.static and not chunks  # a compiled decode step (a step with chunks runs eagerly)
        S = self.max_len if static else max(starts, default=-1) + 1
        dmask = None
        if decode and (static or min(starts) != S - 1):  # rows of different lengths: each sees only its own keys
            dmask = torch.arange(S, device=self.device)[None, :] <= torch.tensor(starts, device=self.device)[:, None]
            dmask = dmask.view(decode, 1, 1, S)
        segs = []
        for slot, T in chunks:
            c = self.lengths[slot]
            mask = None if c == 0 else torch.ones(T, c + T, dtype=torch.bool, device=self.device).tril(c)
            segs.append((slot, c, T, mask))
        rows = torch.arange(decode, device=self.device)
        self.plan = (decode, rows, torch.tensor(starts, dtype=torch.long, device=self.device), S, dmask, segs)
        pos = starts + [p for _, c, T, _ in segs for p in range(c, c + T)]
        self.pos = torch.tensor([pos], dtype=torch.long, device=self.device)
        for s in range(decode):  # throwaway tokens are not kept
            self.lengths[s] += bool(real[s])
        for slot, T in chunks:
            self.lengths[slot] += T
        return self.pos

    def attend(self, layer, q, k, v):
        """Store this step's keys/values and attend over each row's own context. q (1, nh, N, hs), k/v (1, nkv, N, hs)
        -> (1, nh, N, hs)."""
        decode, rows, starts, S, dmask, segs = self.plan
        K, V, ys, off = self.k[layer], self.v[layer], [], decode
        if decode:
            if dmask is None:  # all at one position (S - 1): a slice write, cheaper than index_put
                K[:decode, :, S - 1] = k[0, :, :decode].transpose(0, 1)  # (decode, nkv, hs)
                V[:decode, :, S - 1] = v[0, :, :decode].transpose(0, 1)
            else:
                K[rows, :, starts] = k[0, :, :decode].transpose(0, 1)  # each at its own position
                V[rows, :, starts] = v[0, :, :decode].transpose(0, 1)
            nh, nkv = q.size(1), K.size(1)
            # grouped-query decode as one plain attention: the g = nh / nkv query heads that share a key/value head
            # become g query positions of that head (one token each, the same keys and mask), so no kernel needs
            # enable_gqa (only CUDA's flash kernel takes it, and flash refuses masks and fp32) and nothing is copied
            qd = q[0, :, :decode].transpose(0, 1).reshape(decode, nkv, nh // nkv, -1)  # (decode, nkv, g, hs)
            y = F.scaled_dot_product_attention(qd, K[:decode, :, :S], V[:decode, :, :S], attn_mask=dmask)
            ys.append(y.reshape(decode, nh, -1).transpose(0, 1).unsqueeze(0))  # (1, nh, decode, hs)
        for slot, c, T, mask in segs:
            K[slot, :, c:c + T] = k[0, :, off:off + T]
            V[slot, :, c:c + T] = v[0, :, off:off + T]
            # subtle: is_causal aligns top-left, which is right only when the chunk starts the slot (c == 0)
            ys.append(attention(q[:, :, off:off + T], K[slot:slot + 1, :, :c + T], V[slot:slot + 1, :, :c + T],
                                mask, mask is None and T > 1))
            off += T
        return torch.cat(ys, dim=2) if len(ys) > 1 else ys[0]


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.hs = config.n_head, config.n_kv_head, config.head_size
        # q, k, v in one matmul: n_head query heads, n_kv_head key and value heads
        self.c_attn = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * self.hs, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        self.arch = config.arch

    def forward(self, x, rope, cache, layer, need_weights=False):
        B, T, C = x.size()  # batch, time, channels
        q, k, v = self.c_attn(x).split([self.n_head * self.hs, self.n_kv_head * self.hs, self.n_kv_head * self.hs], dim=2)
        q = q.view(B, T, self.n_head, self.hs).transpose(1, 2)     # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        gqa, att = self.n_kv_head != self.n_head, None
        if cache is not None:  # incremental decoding: each row attends over its own slot (KVCache.attend)
            y = cache.attend(layer, q, k, v)
        elif need_weights:  # the explicit path, for attention heatmaps
            if gqa:
                k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
                v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            att = (q @ k.transpose(-2, -1)) / math.sqrt(self.hs)       # (B, nh, T, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = F.softmax(att.masked_fill(~causal, float('-inf')).float(), dim=-1).to(q.dtype)
            y = att @ v
        else:  # flash attention on GPU, fused kernels on CPU
            y = attention(q, k, v, None, T > 1, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y)), att


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.swiglu = config.arch == 'llama'
        # llama: gate and up projections in one matmul (SwiGLU, Shazeer 2020); gpt2: one GELU layer
        self.c_fc = nn.Linear(config.n_embd, (2 if self.swiglu else 1) * config.ffn_hidden, bias=config.bias)
        self.c_proj = nn.Linear(config.ffn_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        if self.swiglu:
            gate, up = self.c_fc(x).chunk(2, dim=-1)
            x = F.silu(gate) * up
        else:
            x = F.gelu(self.c_fc(x), approximate='tanh')  # GPT-2's "gelu_new"
        return self.dropout(self.c_proj(x))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        norm = (lambda: RMSNorm(config.n_embd, config.norm_eps)) if config.arch == 'llama' else \
               (lambda: nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias))
        self.ln_1, self.attn, self.ln_2, self.mlp = norm(), CausalSelfAttention(config), norm(), MLP(config)

    def forward(self, x, rope, cache, layer, trace=None):
        a, att = self.attn(self.ln_1(x), rope, cache, layer, need_weights=trace is not None)
        x = x + a
        m = self.mlp(self.ln_2(x))
        x = x + m
        if trace is not None:  # what the page's learning views draw (GPT.trace)
            for k, v in (('att', att), ('attn_out', a), ('mlp_out', m), ('resid', x)):
                trace.setdefault(k, []).append(v)
        return x


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=RMSNorm(config.n_embd, config.norm_eps) if config.arch == 'llama'
                 else nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias),
        ))
        if config.positions == 'learned':
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        elif config.positions == 'sinusoidal':
            self.register_buffer('sinusoids', sinusoid_table(config), persistent=False)
        else:
            cos, sin = rope_tables(config)
            self.register_buffer('rope_cos', cos, persistent=False)
            self.register_buffer('rope_sin', sin, persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # https://paperswithcode.com/method/weight-tying
        # init: N(0, 0.02), residual projections scaled down by depth (GPT-2 paper)
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, cache=None, trace=None, logits_from=0, logits_at=None, hidden=False):
        """idx (B, T) token ids -> (logits, loss).
        targets: (B, T) next-token ids, -1 = ignored (prompt tokens in SFT, padding).
        cache: a KVCache to read and extend (incremental decoding, engine.py): the tokens go where cache.schedule()
          laid them out, or, without a schedule, T more tokens for each of slots 0..B-1.
        logits_from: compute logits for positions logits_from.. only (scoring a continuation: saves a (T, vocab) matmul).
        logits_at: compute logits only at these flat positions of idx.view(-1) -> (1, len, vocab) (the engine).
        trace: a dict that collects, per block, lists of 'att' (B, nh, T, T) attention weights (the explicit path:
          the same function as SDPA), 'attn_out' and 'mlp_out' (B, T, C) (what each adds to the residual stream) and
          'resid' (B, T, C) (the stream after the block); and 'embed' (B, T, C), the stream entering the first.
        hidden: return the final norm's output (B, T, C) in place of the logits, and no loss (reward.py's head)."""
        B, T = idx.size()
        # 1) positions: from the cache's layout (each slot continues its own row), else 0..T-1
        if cache is not None:
            if trace is not None:
                raise ValueError("trace records a whole context's activations; call it without a cache")
            if cache.plan is None:
                cache.schedule(chunks=[(b, T) for b in range(B)]) if T > 1 else cache.schedule(decode=B)
            pos = cache.pos  # (1, B*T)
            idx = idx.reshape(1, B * T)  # one flat row of tokens; the cache keeps the rows apart in attention
        else:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds block_size={self.config.block_size}; "
                                 "crop the input to the last block_size tokens")
            pos = torch.arange(T, device=idx.device).unsqueeze(0)  # (1, T)
        # 2) embeddings
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.config.positions == 'learned':
            x = x + self.transformer.wpe(pos)
        elif self.config.positions == 'sinusoidal':
            x = x + self.sinusoids[pos].to(x.dtype)
        else:
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # (1, T, hs)
            rope = (cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype))  # (1, 1, T, hs)
        x = self.transformer.drop(x)
        if trace is not None:
            trace['embed'] = x
        # 3) the blocks
        for layer, block in enumerate(self.transformer.h):
            x = block(x, rope, cache, layer, trace)
        if cache is not None:
            cache.plan = None  # the layout is spent: the next forward needs its own schedule()
        x = self.transformer.ln_f(x)
        if hidden:
            return x, None
        # 4) logits and loss
        if logits_at is not None:
            x = x.view(1, -1, x.size(-1))[:, logits_at]
        elif logits_from:
            x = x[:, logits_from:, :]
        logits = self.lm_head(x)
        if cache is not None and logits_at is None:
            logits = logits.view(B, T, -1)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    # -------------------------------------------------------------------------
    # inside the model: what the page's views show (serve.py /v1/attention, /v1/inspect)

    @torch.no_grad()
    def trace(self, idx):
        """One forward pass of idx (B, T) -> (logits, the trace dict that forward's `trace` describes)."""
        trace = {}
        logits, _ = self(idx, trace=trace)
        return logits, trace

    def attention_maps(self, idx):
        """Attention weights of every layer for one forward pass: a list of (B, n_head, T, T) tensors."""
        return self.trace(idx)[1]['att']

    @torch.no_grad()
    def logit_lens(self, idx, trace=None):
        """The logit lens (nostalgebraist 2020): each block's output read through the final norm and the LM head, as if
        the model ended there -> log-probabilities (n_layer, B, T, vocab). The last layer is log_softmax of the model's
        own logits. trace: a trace of idx already computed (GPT.trace), to read instead of running the model again."""
        trace = trace if trace is not None else self.trace(idx)[1]
        resid = torch.stack(trace['resid'])  # (L, B, T, C)
        return F.log_softmax(self.lm_head(self.transformer.ln_f(resid)).float(), dim=-1)

    @torch.no_grad()
    def activation_flow(self, idx, trace=None):
        """How information moves up the stack, per layer and position: {'resid', 'attn', 'mlp': (L, B, T) L2 norms of
        the residual stream after each block and of what its attention and MLP add; 'entropy': (L, B, nh, T) the
        entropy in nats of each head's attention distribution at each position; 'embed': (B, T) the input's norm}."""
        trace = trace if trace is not None else self.trace(idx)[1]
        norm = lambda key: torch.stack(trace[key]).float().norm(dim=-1)
        att = torch.stack(trace['att']).float()  # (L, B, nh, T, T)
        entropy = -(att * att.clamp_min(1e-30).log()).sum(-1)  # masked weights are exactly 0 and add nothing
        return {'embed': trace['embed'].float().norm(dim=-1), 'resid': norm('resid'), 'attn': norm('attn_out'),
                'mlp': norm('mlp_out'), 'entropy': entropy}

    # -------------------------------------------------------------------------
    # 3) counting

    def num_params(self, non_embedding=True):
        """Parameter count; tied weights count once. non_embedding drops the token and position tables
        (the convention of Kaplan et al. 2020), unless the output head is separate, which is kept."""
        n = sum(p.numel() for p in self.parameters())
        n += sum(getattr(m, 'swapped_weights', 0) for m in self.modules())  # quantize.py's swapped weights: buffers
        if non_embedding:
            n -= self.transformer.wte.weight.numel()
            if self.config.positions == 'learned':
                n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, T=None):
        """Training FLOPs per token (forward + backward = 3x forward): 6N for the matmuls
        plus 12*L*C*T for attention (PaLM paper, appendix B). T defaults to block_size."""
        cfg = self.config
        T = T or cfg.block_size
        N = self.num_params(non_embedding=False) - (self.transformer.wpe.weight.numel() if cfg.positions == 'learned' else 0)
        return 6 * N + 12 * cfg.n_layer * cfg.n_embd * T

    def estimate_mfu(self, tokens_per_sec, peak_flops, T=None):
        """Model FLOPs utilization: achieved training FLOP/s as a fraction of the peak the caller gives
        (e.g. 989e12 for an H100's bf16 dense, ~163e9 for our 2-core dev CPU in fp32, measured)."""
        return self.flops_per_token(T) * tokens_per_sec / peak_flops

    # -------------------------------------------------------------------------
    # 4) Hugging Face import and export

    @classmethod
    def from_pretrained(cls, name_or_dir, dtype=torch.float32):
        """A GPT built from a Hugging Face GPT-2 or Llama checkpoint: a local directory
        (config.json + safetensors/bin) or, when online, a hub name such as 'gpt2'."""
        from nanolab import hf
        path = hf.local_dir(name_or_dir)
        config = hf.config_from_hf(json.load(open(os.path.join(path, 'config.json'))))
        model = cls(config)
        model.load_state_dict(hf.state_dict_from_hf(hf.read_weights(path), config), strict=True)
        return model.to(dtype)

    def save_pretrained(self, out_dir, tokenizer=None):
        """Write a Hugging Face directory that transformers.AutoModelForCausalLM.from_pretrained loads
        with the same logits, plus tokenizer files for BPE tokenizers (so AutoTokenizer works too)."""
        from safetensors.torch import save_file
        from nanolab import hf
        hf_config = hf.config_to_hf(self.config, eot=getattr(tokenizer, 'eot', None))  # refuses what HF can't hold
        check_tokenizer_fits(self.config, tokenizer)
        os.makedirs(out_dir, exist_ok=True)
        hf_config['torch_dtype'] = hf_config['dtype'] = str(next(self.parameters()).dtype).replace('torch.', '')
        sd = {k: v.contiguous() for k, v in hf.state_dict_to_hf(self.state_dict(), self.config).items()}
        save_file(sd, os.path.join(out_dir, 'model.safetensors.tmp'), metadata={'format': 'pt'})
        os.replace(os.path.join(out_dir, 'model.safetensors.tmp'), os.path.join(out_dir, 'model.safetensors'))
        write_json(os.path.join(out_dir, 'config.json'), hf_config)
        if tokenizer is not None:
            try:
                hf.save_tokenizer_files(tokenizer, out_dir)
            except ValueError as e:  # a char vocabulary of multi-byte chars has no HF form; the weights are still good
                if tokenizer.kind != 'char':
                    raise
                print(f'note: {out_dir} gets no tokenizer files: {e}', file=sys.stderr)

# -----------------------------------------------------------------------------
# 5) checkpoints and model sources

def check_tokenizer_fits(config, tokenizer):
    """ValueError when the tokenizer has ids the embedding has no rows for (e.g. chat tokens above GPT-2's 50257 on
    a 50257-row model): an export would write tokens without weights. None (no tokenizer) passes."""
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer has ids up to {tokenizer.vocab_size - 1}, beyond the model's embedding of "
                         f"{config.vocab_size} rows, so those tokens have no weights; train with vocab_size >= the "
                         "tokenizer's (50304 pads GPT-2's 50257 with room for the chat tokens), or drop them")

def write_atomic(path, write):
    """Write a file so that a crash, or a second writer, never leaves it half-written: write(f) fills a temp file of
    this process and thread's own (binary), which is flushed and fsynced, then renamed over path."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = f'{path}.{os.getpid()}.{threading.get_ident()}.tmp'
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def write_json(path, obj):
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))

def save_checkpoint(ckpt, path):
    """Atomically write a checkpoint dict (write_atomic): a crash mid-write leaves the previous file intact.
    Holds at least 'model_args' and 'model' (the uncompiled model's state dict, no '_orig_mod.' keys)."""
    if any(k.startswith('_orig_mod.') for k in ckpt['model']):
        raise ValueError("refusing to save a compiled model's state dict; save the uncompiled raw_model instead")
    write_atomic(path, lambda f: torch.save(ckpt, f))

def load_checkpoint(path, map_location='cpu'):
    """Read a checkpoint we wrote, with errors that say what is wrong and what to do."""
    if os.path.isdir(path):
        path = os.path.join(path, 'ckpt.pt')
    if not os.path.exists(path):
        raise ValueError(f"no checkpoint at {path}; train one first (python train.py) or point init_from at "
                         "an out_dir that holds ckpt.pt")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {str(e).split('. ')[0][:160]}); "
                         "retrain, or restore it from a backup") from None
    if not isinstance(ckpt, dict) or 'model_args' not in ckpt or 'model' not in ckpt:
        raise ValueError(f"{path} is not a nanolab checkpoint (it has no 'model_args'/'model' entries)")
    return ckpt

def load_weights_file(path):
    """A weights-only .safetensors file that export.py wrote, as a checkpoint dict (model_args, model, tokenizer)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    try:
        with safe_open(path, 'pt') as f:
            meta = f.metadata() or {}
        sd = load_file(path)
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {str(e)[:120]}); "
                         "export it again (python export.py --format=safetensors)") from None
    if 'nanolab' not in meta:
        raise ValueError(f"{path} has no 'nanolab' metadata, so it was not written by export.py and says nothing of "
                         "the model's shape; for a Hugging Face model, give its directory instead")
    info = json.loads(meta['nanolab'])
    sd = {k: v.float() for k, v in sd.items()}
    if GPTConfig(**info['model_args']).tie_embeddings:  # stored once, as the token embedding
        sd['lm_head.weight'] = sd['transformer.wte.weight']
    return {'model_args': info['model_args'], 'model': sd, 'tokenizer': info.get('tokenizer'), 'source': info.get('source')}

def model_from_checkpoint(ckpt, path='checkpoint'):
    """Build the GPT that a checkpoint describes and load its weights, naming any mismatch."""
    known = {f.name for f in fields(GPTConfig)}
    unknown = set(ckpt['model_args']) - known
    if unknown:
        raise ValueError(f"{path} has model args {sorted(unknown)} that this version of model.py does not know")
    model = GPT(GPTConfig(**ckpt['model_args']))
    sd = {k.removeprefix('_orig_mod.'): v for k, v in ckpt['model'].items()}
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs config {tuple(expected[k].shape)}"
              for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if missing or extra or shapes:
        raise ValueError(f"weights in {path} do not match its model args: " +
                         '; '.join(filter(None, [missing and f"missing {missing[:4]}", extra and f"unexpected {extra[:4]}",
                                                 shapes and ', '.join(shapes[:4])])))
    model.load_state_dict(sd)
    return model

def load_model(source, device='cpu', dtype=torch.float32):
    """The one function that opens any model source, with its tokenizer (None if the source has none):
      - an out_dir holding ckpt.pt, or a .pt file, that nanolab wrote; or export.py's weights-only .safetensors
      - a Hugging Face directory (config.json + safetensors/bin) of GPT-2 or Llama weights
      - a hub name such as 'gpt2' (needs the network)
    Returns (model in eval mode, tokenizer, checkpoint dict or {} for HF sources)."""
    from nanolab import tokenizer as tok_lib
    weights_only = source.endswith('.safetensors') and os.path.isfile(source)  # export.py's weights-only file
    is_ckpt = source.endswith('.pt') or (os.path.isdir(source) and os.path.exists(os.path.join(source, 'ckpt.pt')))
    if is_ckpt or weights_only:
        ckpt = load_weights_file(source) if weights_only else load_checkpoint(source)
        model = model_from_checkpoint(ckpt, source)
        tok = tok_lib.from_spec(ckpt['tokenizer']) if ckpt.get('tokenizer') else None
    elif os.path.isdir(source) and not os.path.exists(os.path.join(source, 'config.json')):
        raise ValueError(f"{source} is a directory but holds neither ckpt.pt (a nanolab run) nor config.json "
                         "(a Hugging Face model); check the path, or train a model into it first")
    elif not os.path.isdir(source) and (source.startswith(('.', '/', '~')) or source.startswith('out')):
        raise ValueError(f"model source '{source}' does not exist; give an out_dir with ckpt.pt, a .pt file, "
                         "a Hugging Face directory, or a hub name like 'gpt2'")
    else:
        from nanolab import hf
        path = hf.local_dir(source)
        model, ckpt = GPT.from_pretrained(path), {}
        tok = hf.HFTokenizer(path) if any(os.path.exists(os.path.join(path, f)) for f in
                                               ('tokenizer.json', 'vocab.json')) else None
    model.to(device=device, dtype=dtype).eval()
    return model, tok, ckpt

STAGES = ('pretrain', 'sft', 'dpo', 'rl', 'reward')  # the script that wrote a checkpoint: train, finetune, dpo, rl, reward
TUNED = ('sft', 'dpo', 'rl')  # stages after which a model answers in the chat template

def checkpoint_stage(ckpt):
    """Which trainer wrote a checkpoint ('stage', written since issue 18; older ones by the settings their config
    holds), or None for a source that is not ours (a Hugging Face model)."""
    if not ckpt:
        return None
    if ckpt.get('stage') in STAGES:
        return ckpt['stage']
    cfg = ckpt.get('config') or {}
    return ('reward' if 'reward_head' in ckpt else 'rl' if 'kl_coef' in cfg else 'dpo' if 'beta' in cfg
            else 'sft' if 'em_rows' in cfg else 'pretrain')

def model_sources(spec):
    """init_from -> [(name, source)]: comma-separated sources, where a directory that is neither a run nor a Hugging
    Face model stands for every subdirectory holding ckpt.pt. A model's name is its directory's name."""
    out = []
    for s in [x.strip() for x in spec.split(',') if x.strip()]:
        if os.path.isdir(s) and not any(os.path.exists(os.path.join(s, f)) for f in ('ckpt.pt', 'config.json')):
            runs = sorted(d for d in os.listdir(s) if os.path.isfile(os.path.join(s, d, 'ckpt.pt')))
            if not runs:
                raise ValueError(f"{s} holds no ckpt.pt, no config.json and no run directories with ckpt.pt; "
                                 "train a model into it first (python train.py --out_dir=...), or fix the path")
            out += [(d, os.path.join(s, d)) for d in runs]
        else:
            out.append((os.path.basename(os.path.normpath(s)) if os.path.exists(s) else s, s))
    names = [n for n, _ in out]
    if not out or len(set(names)) < len(names):
        raise ValueError(f"init_from={spec!r} gives {'no models' if not out else f'two models named alike: {names}'}; "
                         "give one or more distinct sources, comma-separated")
    return out
