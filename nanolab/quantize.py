"""
Inference-time module swaps, applied explicitly by whoever serves a model (for_inference): int8 or
int4 weights for CPU serving (`python serve.py --quantize=int8|int4`, `python bench.py
--which=quantize`), and in fp32 on the CPU the output head in a transposed layout (TransposedHead).
Training never sees them: forward computes the same function in every mode, and a swapped model is
for decoding only. Either format quantizes from the weights' own dtype (fp32, bf16 or fp16; scales
computed in fp32) and each swapped module returns the model's dtype, so the rest of the model
(norms, attention, the KV cache) runs as it did.

int8: every nn.Linear (the blocks' and lm_head) keeps int8 weights with one scale per output
channel, symmetric: scale = max|w_row| / 127, q = round(w / scale). The token embedding is int8 too
(per row, the same scales when tied to lm_head): without it GPT-2-124M shrinks only to ~49%.
Position embeddings and norms keep the model's dtype (under 1% of the bytes).
Which kernel, measured per matmul on the 2-core AVX2 dev CPU at batch 1, 8 and 16: aten's
weight-only int8 matmul (torch._weight_int8pack_mm) takes 5-30x as long as fp32's, torch._int_mm
10-45x, and dequantizing on the fly (int8 -> fp32 copy, then F.linear) 1.1-10x; only fbgemm's
dynamic int8 linear beats fp32 on GPT-2's shapes, up to 4x (end to end: bench.py --which=quantize).
On a 128-wide model, whose 3 MB of weights sit in cache, every int8 path is slower than fp32: there
int8 only saves memory. fbgemm quantizes the activations too, with one scale for the whole input,
which would make a row's result depend on the other rows of the batch; so each row is first divided
by its own max |x|, and two fixed columns holding +1 and -1 (with zero weights) are appended: every
row is then quantized on the same grid (per-token activations, 128 levels over [-1, 1]) whatever
the batch, even alone, the int32 sums are exact, and a row's output is bitwise the same whatever
shares its batch (tests/test_serve.py). Perplexity: +0.04% to +0.13% on the Shakespeare runs.
fbgemm takes fp32 only: a bf16 model's int8 layers cast their input up and their output back.

int4 (Int4Linear): the blocks' linears keep 4-bit weights in groups of `group_size` inputs (32 by
default; 64, 128, 256 coarser), asymmetric as the kernel wants: w ~= (q - 8) * scale + zero, q in
0..15, the group's min on level 0 and its max on level 15, scale and zero in bf16 (4 bytes a group:
5 bits a weight at 32, 4.25 at 128). The output head and the token embedding stay int8 (as above):
llama.cpp's Q4_0 files likewise keep output.weight at higher precision (Q6_K) by default, because
the head's errors go straight into the logits; and a row lookup is simple in int8. The cost: a
tied, large-vocabulary model keeps two int8 copies of its embedding (GPT-2-124M: 77 of its 133 MB
in int4). Kernel: aten's tinygemm-layout CPU matmul (_convert_weight_to_int4pack_for_cpu +
_weight_int4pack_mm_for_cpu), fed bf16 activations whatever the model's dtype: given fp32 or fp16
activations the same op takes 30-100x as long. _dyn_quant_matmul_4bit (KleidiAI) is for Arm: on
x86 its reference path keeps ~2 bytes a weight and is 50-120x slower. Where the kernel is absent
(another PyTorch, or a layer whose out_features is not a multiple of 16) the layer keeps plain
nibbles and dequantizes them before F.linear each call: correct, ~50x slower. On CUDA the kernel
is aten's _weight_int4pack_mm (bf16, sm80+; untested here), and head and embedding keep the
model's dtype (fbgemm is CPU-only).
Measured per matmul on 2 cores shared with other jobs (AMD EPYC, AVX-512 with avx512_bf16, 32 MiB
L3, torch 2.13), each format cycling through copies of its weight worth 160 MB, as a decode step
reads weights from memory; microseconds, 20th percentile of 6 interleaved rounds, two runs agreed:
    in x out, rows   fp32   bf16   int8 (fbgemm)   int4 g32   int4 g128
    2048x2048, 1     1100    540             195        150         140
    2048x2048, 8     1800    550             250        450         430
    2048x8192, 1     3650   1750             610        490         455
    2048x8192, 8     8600   2000             630       1700        1630
int4 is the fastest at batch 1 (1.25-1.4x int8) and the smallest; int8 is 1.7-2.7x faster at batch 8
(the int4 kernel's time grows with the rows), so a busy server is better served int8. End to end
(bench.py --which=quantize, batch-1 greedy tok/s, fp32 -> bf16 -> int8 -> int4 g32): GPT-2-124M
25 -> 39 -> 77 -> 96 (g128: 109), a 4 x 512 Llama 152 -> 237 -> 397 -> 515. Against bf16's
next-token distributions, mean KL: int8 3e-4 to 1.1e-3 nats, int4 g32 5.8e-3 to 7.1e-3, g128
9.4e-3 to 1.2e-2: groups of 32 cost 0.75 bits a weight and up to ~10% of the batch-1 speed for 40%
less KL, hence the default. Perplexity on the Shakespeare char run's val tokens: bf16 4.803, int8 4.800, int4 g32
4.845 (+0.9%), g128 4.870 (+1.4%).
"""
import copy
import itertools
import math
import sys
import warnings
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanolab import kernels, mapped

QUANTIZE = ('', 'int8', 'int4')  # for_inference's choices, as the scripts' --quantize lists them
INT4_GROUP = 32                  # int4's default group size (the module docstring says why)


def int8_rows(w, rows=4096):
    """w (out, in), any float dtype -> (q int8 (out, in), scale fp32 (out,)) with
    w ~= q * scale[:, None]. Done `rows` rows at a time: a 128k-vocabulary embedding in fp32 at once
    is 1 GB per temporary (Llama 3's: the peak of a quantized load was 5.2 GB, not the weights')."""
    q, scale = torch.empty(w.shape, dtype=torch.int8), torch.empty(len(w))
    for i in range(0, len(w), rows):
        c = w[i:i + rows].detach().float()
        scale[i:i + rows] = c.abs().amax(dim=1).clamp(min=1e-12) / 127
        q[i:i + rows] = torch.round(c / scale[i:i + rows, None]).clamp(-127, 127)
    return q, scale

# subtle: the op's Python wrapper checks every call for fake script objects (torch.compile's),
# which costs more than some of the small ops around it at batch 1; its C++ entry point (_op) skips
# that. Public wrapper as the fallback.
LINEAR_DYNAMIC = getattr(torch.ops.quantized.linear_dynamic.default, '_op',
                         torch.ops.quantized.linear_dynamic.default)

# fbgemm's packed weights are a TorchScript object, which torch.compile cannot take as an argument;
# so a compiled decode step (engine.py) calls them through one opaque op, nanolab::int8_linear,
# that names a layer's weights by a number in PACKED. The op adds ~1.5 us a call over fbgemm's
# own ~15 us (measured on a 64x64 matrix).
PACKED = {}
_PACKED_IDS = itertools.count()
_LIB = torch.library.Library('nanolab', 'DEF')
_LIB.define('int8_linear(Tensor x, int weights, int out_features) -> Tensor')
_LIB.impl('int8_linear', lambda x, weights, out_features: LINEAR_DYNAMIC(x, PACKED[weights], True),
          'CPU')
torch.library.register_fake('nanolab::int8_linear')(
    lambda x, weights, out_features: x.new_empty(x.size(0), out_features))

# oneDNN's packed linear, opaque to torch.compile in the same way: inductor lowers
# mkldnn._linear_pointwise only for weights it packed itself
_LIB.define('packed_linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor')
_LIB.impl('packed_linear', lambda x, packed, bias, out_features: torch.ops.mkldnn._linear_pointwise(
    x, packed, bias, 'none', [], ''), 'CompositeExplicitAutograd')
torch.library.register_fake('nanolab::packed_linear')(
    lambda x, packed, bias, out_features: x.new_empty(x.size(0), out_features))

class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T + bias, by fbgemm with per-row int8 activations (see the module
    docstring). The int8 matrix lives only in fbgemm's packed layout (in * out bytes, plus two zero
    columns); the bias keeps its dtype. Computes in fp32, returns the weight's dtype."""
    def __init__(self, linear):
        super().__init__()
        q, scale = int8_rows(linear.weight)
        # the two fixed columns weigh nothing
        q = torch.cat([q, torch.zeros(len(q), 2, dtype=torch.int8)], dim=1)
        zero = torch.zeros(len(scale), dtype=torch.long)
        self.packed = torch.ops.quantized.linear_prepack(
            torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0), None)
        self.in_features, self.out_features, self.bias = linear.in_features, linear.out_features, \
            linear.bias
        self.dtype = linear.weight.dtype
        self.swapped_weights = self.in_features * self.out_features  # GPT.num_params counts them
        # the scaled input, grown as batches need (one thread)
        self.buf = torch.zeros(0, self.in_features + 2)
        self._register()
        self.register_buffer('ends', torch.tensor([[1.0, -1.0]]), persistent=False)

    def _register(self):
        """This layer's weights in PACKED, under a number of its own, for as long as it lives."""
        self.weights = next(_PACKED_IDS)
        PACKED[self.weights] = self.packed
        weakref.finalize(self, PACKED.pop, self.weights)

    def __setstate__(self, state):  # a copy (copy.deepcopy) is a layer of its own
        super().__setstate__(state)
        self._register()

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features).float()  # (M, in); a no-op in fp32
        M, K = x2.shape
        if torch.compiler.is_compiling():  # the same numbers, as one fused kernel and the op
            r = torch.amax(torch.abs(x2), 1, True).clamp(min=1e-12)
            y = torch.ops.nanolab.int8_linear(torch.cat([x2 / r, self.ends.expand(M, 2)], 1),
                                              self.weights, self.out_features)
            y = y * r if self.bias is None else torch.addcmul(self.bias, y, r)
            return y.to(self.dtype).view(*x.shape[:-1], self.out_features)
        if self.buf.size(0) < M:
            self.buf = torch.zeros(M, K + 2)
            # every row holds +1 and -1: its range is exactly [-1, 1]
            self.buf[:, K:] = torch.tensor([1.0, -1.0])
        buf = self.buf[:M]
        # (M, 1) row ranges (faster than vector_norm inf)
        r = torch.amax(torch.abs(x2), 1, True).clamp_(min=1e-12)
        torch.div(x2, r, out=buf[:, :K])
        # reduce_range: 7-bit activations, which fbgemm's AVX2 kernel needs to not saturate its
        # int16 sums
        y = LINEAR_DYNAMIC(buf, self.packed, True)  # (M, out), rows on one grid
        y = y.mul_(r) if self.bias is None else torch.addcmul(self.bias, y, r)
        return y.to(self.dtype).view(*x.shape[:-1], self.out_features)

class Int8Embedding(nn.Module):
    """Rows of an int8 matrix times their scales, in the original weight's dtype. Tied to lm_head,
    it is a second int8 copy of the head's matrix (fbgemm's packed layout cannot be indexed by row),
    so GPT.num_params does not count it twice."""
    def __init__(self, weight, tied):
        super().__init__()
        q, scale = int8_rows(weight)
        self.register_buffer('weight', q)
        self.register_buffer('scale', scale)
        self.dtype = weight.dtype
        self.swapped_weights = 0 if tied else q.numel()

    def forward(self, idx):
        # (B, T, C)
        return (self.weight[idx].float() * self.scale[idx].unsqueeze(-1)).to(self.dtype)

def _check_float(model, what):
    """-> the model's first parameter, after refusing a non-float model."""
    p = next(model.parameters())
    if not p.dtype.is_floating_point:
        raise ValueError(f"quantize={what} quantizes float weights; this model is {p.dtype}: load "
                         "it in float32, bfloat16 or float16")
    return p

def _int8_head(model):
    """lm_head -> Int8Linear and the token embedding -> Int8Embedding, in place."""
    model.transformer.wte = Int8Embedding(model.transformer.wte.weight,
                                          model.config.tie_embeddings)
    # torch deprecates quantized tensors; the one Int8Linear builds is only handed to fbgemm
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model.lm_head = Int8Linear(model.lm_head)

def _swap_linears(model, make):
    """Every nn.Linear child below model -> make(child), in place; the replaced weight's pages go
    back as it goes, where it was a mapped file's (mapped.release_pages)."""
    # subtle: only the parents are listed, so each replaced Linear (and a fused weight's copy) is
    # freed as the loop moves on, not all of them at the end (a 1B model's peak held every one)
    slots = [(mod, name) for mod in model.modules() for name, child in mod.named_children()
             if type(child) is nn.Linear]
    for mod, name in slots:
        child = getattr(mod, name)
        setattr(mod, name, make(child))
        mapped.release_pages(child.weight)
        del child

def quantize_int8(model):
    """Make a CPU model int8, in place -> model (see the module docstring). The model may be
    fp32, bf16 or fp16: its weights are quantized from that dtype, and it keeps computing in it."""
    p = _check_float(model, 'int8')
    if p.device.type != 'cpu':
        raise ValueError(f"quantize=int8 is for CPU serving (this model is on {p.device.type}); on "
                         "a GPU serve bf16 (--dtype=auto) or --quantize=int4 instead")
    if torch.backends.quantized.engine not in ('x86', 'fbgemm'):
        raise ValueError("quantize=int8 needs PyTorch's x86 (fbgemm) int8 kernels; this machine "
                         f"has {torch.backends.quantized.engine}: serve without --quantize")
    _int8_head(model)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        _swap_linears(model, Int8Linear)
    return model

# -----------------------------------------------------------------------------
# int4

INT4_CPU = hasattr(torch.ops.aten, '_weight_int4pack_mm_for_cpu')

def int4_groups(w, group_size):
    """w (out, in), any float dtype -> (q uint8 (out, in) in 0..15, scale_zero bf16
    (in / group_size, out, 2)) with w ~= (q - 8) * scale + zero per group of group_size inputs
    (the kernel's layout of scales and zeros). q is rounded against the bf16 scale and zero that
    are kept, so it is the nearest level of what the kernel computes."""
    N, K = w.shape
    g = w.detach().float().reshape(N, K // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12).bfloat16()
    zero = (lo + 8 * scale.float()).bfloat16()
    q = torch.round((g - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp_(0, 15)
    scale_zero = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()
    return q.to(torch.uint8).reshape(N, K), scale_zero

def int4_dequantize(q, scale_zero, group_size, dtype=torch.float32):
    """The inverse of int4_groups: (q - 8) * scale + zero, computed in dtype (in fp32 exactly: bf16
    scale and zero, small integers)."""
    N, K = q.shape
    s, z = scale_zero.to(dtype).transpose(0, 1).unsqueeze(-1).unbind(-2)  # (N, K / g, 1) each
    return ((q.view(N, K // group_size, group_size).to(dtype) - 8) * s + z).view(N, K)

class Int4Linear(nn.Module):
    """y = x @ ((q - 8) * scale + zero)^T + bias with 4-bit weights in groups (int4_groups), an
    inference-only swap of an nn.Linear. kernel: 'cpu' (aten's _weight_int4pack_mm_for_cpu, bf16
    activations), 'cuda' (aten's _weight_int4pack_mm, bf16) or '' (plain nibbles, dequantized to
    the input's dtype for F.linear each call: where the kernel is absent, ~50x slower). Returns the
    weight's dtype. group_size halves (down to 32) for a layer whose in_features it does not
    divide."""
    def __init__(self, linear, group_size=INT4_GROUP, kernel=None):
        super().__init__()
        N, K = linear.weight.shape
        g = next((g for g in (group_size, 128, 64, 32) if g <= group_size and K % g == 0), None)
        if group_size not in (32, 64, 128, 256) or g is None:
            raise ValueError(f"int4 needs group_size 32, 64, 128 or 256 dividing in_features "
                             f"(got {group_size}, a {N}x{K} linear); use --quantize=int8 for it")
        cuda = linear.weight.is_cuda
        if kernel is None:
            kernel = 'cuda' if cuda else 'cpu' if INT4_CPU and N % 16 == 0 else ''
        if kernel == 'cuda' and not (hasattr(torch.ops.aten, '_weight_int4pack_mm') and N % 8 == 0
                                     and torch.cuda.get_device_capability(linear.weight.device)
                                     >= (8, 0)):
            raise ValueError("quantize=int4 on CUDA needs PyTorch's _weight_int4pack_mm (an sm80+ "
                             f"GPU, out_features a multiple of 8; this layer is {N}x{K}); serve "
                             "bf16 (--dtype=auto) without --quantize instead")
        q, scale_zero = int4_groups(linear.weight, g)
        if kernel == 'cpu':
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 1)  # (N, K / 2)
        elif kernel == 'cuda':  # even k in the high nibble, as the CUDA op reads it; inner k tiles
            # of 16 * t inputs must divide in_features
            packed = torch.ops.aten._convert_weight_to_int4pack(
                q[:, ::2] << 4 | q[:, 1::2], next(t for t in (8, 4, 2) if K % (16 * t) == 0))
        else:
            packed = q[:, 1::2] << 4 | q[:, ::2]  # (N, K / 2), even k in the low nibble
        self.register_buffer('packed', packed)
        self.register_buffer('scale_zero', scale_zero)
        self.in_features, self.out_features, self.group_size, self.kernel = K, N, g, kernel
        self.bias, self.dtype = linear.bias, linear.weight.dtype
        self.swapped_weights = N * K  # GPT.num_params counts them

    def unpack(self):
        """-> q (out, in) uint8 in 0..15, exactly: a kernel's layout is read back through the
        kernel itself (the identity matrix times unit scales and zero offsets: small integers,
        exact in bf16); K x K x N multiply-adds, for tests, not for serving."""
        if not self.kernel:
            p = self.packed
            return torch.stack([p & 15, p >> 4], -1).reshape(self.out_features, self.in_features)
        unit = torch.zeros_like(self.scale_zero)
        unit[..., 0] = 1
        eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.packed.device)
        return (self._mm(eye, unit).t() + 8).to(torch.uint8)

    def dequantized(self):
        """The weight this layer multiplies by, (out, in) fp32."""
        return int4_dequantize(self.unpack(), self.scale_zero, self.group_size)

    def _mm(self, x, scale_zero):
        if self.kernel == 'cpu':
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size,
                                                               scale_zero)
        return torch.ops.aten._weight_int4pack_mm(x, self.packed, self.group_size, scale_zero)

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features)
        if self.kernel:
            y = self._mm(x2.to(torch.bfloat16).contiguous(), self.scale_zero).to(self.dtype)
        else:
            y = F.linear(x2, int4_dequantize(self.unpack(), self.scale_zero, self.group_size,
                                             x2.dtype)).to(self.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

def quantize_int4(model, group_size=INT4_GROUP):
    """Make a model's block linears int4, in place -> model (see the module docstring): on the CPU
    (fp32, bf16 or fp16) with the output head and token embedding int8; on CUDA (bf16) the head and
    embedding keep the model's dtype."""
    p = _check_float(model, 'int4')
    if p.device.type not in ('cpu', 'cuda'):
        raise ValueError(f"quantize=int4 has kernels for the CPU and CUDA, not {p.device.type}; "
                         "serve without --quantize")
    if p.device.type == 'cpu' and torch.backends.quantized.engine in ('x86', 'fbgemm'):
        _int8_head(model)
    head = model.lm_head
    model.lm_head = nn.Identity()  # kept out of the swap below, whatever its type
    _swap_linears(model, lambda lin: Int4Linear(lin, group_size))
    model.lm_head = head
    return model

def dequantize_int4(model):
    """Each Int4Linear -> an nn.Linear holding its dequantized weight (in the model's dtype), in
    place -> model: the same function up to the kernel's bf16 activations (tests' reference)."""
    def swap(mod):
        for name, child in list(mod.named_children()):
            if isinstance(child, Int4Linear):
                lin = nn.Linear(child.in_features, child.out_features, bias=False,
                                device=child.packed.device, dtype=child.dtype)
                lin.weight.data.copy_(child.dequantized())
                lin.bias = child.bias
                setattr(mod, name, lin)
            else:
                swap(child)
    swap(model)
    return model

def state_bytes(model):
    """Bytes of the model's weights: its state dict (a tensor under two names, tied, counted once;
    int4's packed nibbles, scales and zeros are in it), plus what swapped modules keep outside it:
    the fbgemm-packed int8 matrices (1 byte a weight, fp32 scales) and an untied TransposedHead."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}
    return sum(seen.values()) + sum(
        m.in_features * m.out_features + 4 * m.out_features if isinstance(m, Int8Linear)
        else (m.nbytes if m.swapped_weights else 0) if isinstance(m, PackedLinear)
        else m.swapped_weights * m.weight_t.element_size()
        for m in model.modules() if isinstance(m, (Int8Linear, TransposedHead, PackedLinear)))

class TransposedHead(nn.Module):
    """The output head with its weight stored (in, out), for CPU decoding. MKL's matrix-vector
    product on the vocabulary-sized, cache-cold head is faster in that layout (measured by bench.py
    --which=decode: docs/benchmarks.md); the head is a large part of a small model's decode step.
    Holds a copy: a tied embedding keeps the original."""
    def __init__(self, linear, tied):
        super().__init__()
        self.register_buffer('weight_t', linear.weight.detach().t().contiguous(), persistent=False)
        # GPT.num_params counts it (tied: once, in wte)
        self.swapped_weights = 0 if tied else linear.weight.numel()

    def forward(self, x):
        return x @ self.weight_t

# oneDNN's linear on a weight packed once for it (what inductor's CPU code calls): 2x MKL's
# F.linear at batch 1 and 8 in fp32 and 1.3-1.5x in bf16 on the 2-core EPYC (bench.py
# --which=decode_profile; MKL's fp32 matrix-vector product runs on one core, ~13 GB/s of ~31), but
# slower where weights sit in cache (oneDNN's per-call cost): kernels.py measures which, per CPU
ONEDNN = kernels.ONEDNN

class PackedLinear(nn.Module):
    """An nn.Linear whose weight lives in oneDNN's packed layout (ONEDNN), for CPU decoding in fp32
    or bf16: the same function as F.linear (bf16: bitwise; fp32: to rounding, ~1e-6 relative, as a
    different summation order gives), an explicit inference-only swap like the int8 one. Holds the
    packed copy only; a tied head's embedding keeps the original."""
    def __init__(self, linear, tied=False, rows=8):
        super().__init__()
        w = linear.weight.detach()
        # the layout oneDNN picks for `rows` rows (kernels.py: which reads fastest)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
        self.bias, self.out_features = linear.bias, linear.out_features
        # GPT.num_params counts them (tied: once, in wte)
        self.swapped_weights = 0 if tied else w.numel()
        self.nbytes = w.nbytes

    def forward(self, x):
        x2 = x.reshape(-1, x.size(-1))
        M = len(x2)
        # subtle: oneDNN builds and caches a kernel for every row count it meets, and a server meets
        # every count (measured: RSS +300 MB, still growing in a soak), so rows are padded to a power
        # of two: a handful of shapes. A row's result is the same in any bucket above 1 (tested)
        Mp = 1 << (M - 1).bit_length()
        if Mp != M:
            x2 = torch.cat([x2, x2.new_zeros(Mp - M, x2.size(1))])
        y = torch.ops.nanolab.packed_linear(x2, self.packed, self.bias, self.out_features) \
            if torch.compiler.is_compiling() else \
            torch.ops.mkldnn._linear_pointwise(x2, self.packed, self.bias, 'none', [], '')
        return y[:M].view(*x.shape[:-1], self.out_features)

def for_inference(model, quantize='', group_size=INT4_GROUP, pack=None, report=False):
    """The model's inference-time swaps, in place -> model: dropout becomes Identity, and
    quantize='int8' (quantize_int8) or 'int4' (quantize_int4, groups of group_size), else on a CPU
    in fp32 or bf16 the linears' kernel: pack=None, the one kernels.linear_kernel measured on this
    CPU for this model (report=True prints the choice to stderr); or a kernel by name ('mkl',
    'onednn/1', 'onednn/8'; True: 'onednn/8', False: 'mkl'). oneDNN: every linear packed
    (PackedLinear); MKL: in fp32 the head transposed (TransposedHead). Call it on a model that only
    decodes (serve.py, sample.py, bench.py), never on one in training: the swapped modules hold
    copies of the weights."""
    if quantize not in QUANTIZE:
        raise ValueError(f"unknown quantize={quantize!r}; use '' (off), int8 or int4")
    # dropout is the identity at inference; Identity skips F.dropout's call
    for mod in list(model.modules()):
        for name, child in mod.named_children():
            if isinstance(child, nn.Dropout):
                setattr(mod, name, nn.Identity())
    if quantize:
        model = quantize_int8(model) if quantize == 'int8' else quantize_int4(model, group_size)
        mapped.release_unused(model)  # the pages of the weights just replaced (a mapped file's)
        return model
    p = next(model.parameters())
    if p.device.type != 'cpu' or p.dtype not in (torch.float32, torch.bfloat16):
        return model
    kernel = {True: 'onednn/8', False: 'mkl'}.get(pack, pack)
    if kernel is None:
        kernel, line = kernels.linear_kernel(model)
        if report:
            print(line, file=sys.stderr)
    if kernel not in kernels.CANDIDATES:
        raise ValueError(f"unknown kernel {kernel!r}; use one of {', '.join(kernels.CANDIDATES)}")
    if kernel.startswith('onednn') and ONEDNN:
        rows = int(kernel.split('/')[1])
        model.lm_head = PackedLinear(model.lm_head, model.config.tie_embeddings, rows)
        _swap_linears(model, lambda lin: PackedLinear(lin, rows=rows))
        mapped.release_unused(model)
    elif p.dtype == torch.float32 and type(model.lm_head) is nn.Linear:
        model.lm_head = TransposedHead(model.lm_head, model.config.tie_embeddings)
    return model

def in_format(model, fmt, group_size=INT4_GROUP):
    """A decode-only copy of a CPU model in format fmt = DTYPE[+QUANTIZE[/GROUP]], DTYPE fp32, bf16
    or fp16, QUANTIZE int8 or int4 (GROUP: int4's group size), e.g. 'bf16+int4/32' -> the copy
    (bench.py --which=quantize compares them)."""
    dtype, _, quant = fmt.partition('+')
    quant, _, group = quant.partition('/')
    dtypes = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
    if dtype not in dtypes or quant not in QUANTIZE or not (group.isdigit() or group == ''):
        raise ValueError(f"unknown format {fmt!r}; use DTYPE[+QUANTIZE[/GROUP]] with DTYPE fp32, "
                         "bf16 or fp16 and QUANTIZE int8 or int4, e.g. bf16+int4/32")
    return for_inference(copy.deepcopy(model).to(dtypes[dtype]), quant, int(group or group_size))

def logit_stats(logits, ref, targets):
    """Next-token distributions (..., V) against reference ones at the same positions -> {'kl':
    mean KL(ref || these) in nats, 'top1': how often their argmaxes agree, 'ppl': perplexity of
    targets (...)}."""
    lp, lr = (F.log_softmax(t.float().flatten(0, -2), -1) for t in (logits, ref))
    return {'kl': (lr.exp() * (lr - lp)).sum(-1).mean().item(),
            'top1': (lp.argmax(-1) == lr.argmax(-1)).float().mean().item(),
            'ppl': math.exp(F.nll_loss(lp, targets.flatten()).item())}
