"""
Inference-time module swaps, applied explicitly by whoever serves a model (for_inference): int8
weights for CPU serving (`python serve.py --quantize=int8`, `python bench.py --which=quantize`),
and in fp32 on the CPU the output head in a transposed layout (TransposedHead). Training never sees
them: forward computes the same function in every mode, and a swapped model is for decoding only.

Every nn.Linear (the blocks' and lm_head) keeps int8 weights with one scale per output channel,
symmetric: scale = max|w_row| / 127, q = round(w / scale). The token embedding is int8 too (per
row, the same scales when tied to lm_head): without it GPT-2-124M shrinks only to ~49%. Position
embeddings and norms stay fp32 (under 1% of the bytes).
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
"""
import warnings

import torch
import torch.nn as nn


def int8_rows(w):
    """w (out, in) -> (q int8 (out, in), scale fp32 (out,)) with w ~= q * scale[:, None]."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale

# subtle: the op's Python wrapper checks every call for fake script objects (torch.compile's),
# which costs more than some of the small ops around it at batch 1; its C++ entry point (_op) skips
# that. Public wrapper as the fallback.
LINEAR_DYNAMIC = getattr(torch.ops.quantized.linear_dynamic.default, '_op',
                         torch.ops.quantized.linear_dynamic.default)

class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T + bias, by fbgemm with per-row int8 activations (see the module
    docstring). The int8 matrix lives only in fbgemm's packed layout (in * out bytes, plus two zero
    columns); the bias stays fp32."""
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
        self.swapped_weights = self.in_features * self.out_features  # GPT.num_params counts them
        # the scaled input, grown as batches need (one thread)
        self.buf = torch.zeros(0, self.in_features + 2)

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features)  # (M, in)
        M, K = x2.shape
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
        return y.view(*x.shape[:-1], self.out_features)

class Int8Embedding(nn.Module):
    """Rows of an int8 matrix times their scales. Tied to lm_head, it is a second int8 copy of the
    head's matrix (fbgemm's packed layout cannot be indexed by row), so GPT.num_params does not
    count it twice."""
    def __init__(self, weight, tied):
        super().__init__()
        q, scale = int8_rows(weight)
        self.register_buffer('weight', q)
        self.register_buffer('scale', scale)
        self.swapped_weights = 0 if tied else q.numel()

    def forward(self, idx):
        return self.weight[idx].float() * self.scale[idx].unsqueeze(-1)  # (B, T, C)

def quantize_int8(model):
    """Make a CPU fp32 model int8, in place -> model (see the module docstring)."""
    p = next(model.parameters())
    if p.device.type != 'cpu' or p.dtype != torch.float32:
        raise ValueError(f"quantize=int8 is for CPU fp32 serving (this model is {p.device.type}, "
                         f"{p.dtype}); on a GPU serve bf16 (--dtype=auto) instead")
    if torch.backends.quantized.engine not in ('x86', 'fbgemm'):
        raise ValueError("quantize=int8 needs PyTorch's x86 (fbgemm) int8 kernels; this machine "
                         f"has {torch.backends.quantized.engine}: serve without --quantize")
    model.transformer.wte = Int8Embedding(model.transformer.wte.weight,
                                          model.config.tie_embeddings)
    # torch deprecates quantized tensors; the one above is only handed to fbgemm
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for mod in list(model.modules()):
            for name, child in list(mod.named_children()):
                if type(child) is nn.Linear:
                    setattr(mod, name, Int8Linear(child))
    return model

def state_bytes(model):
    """Bytes of the model's weights: its state dict (a tensor under two names, tied, counted once),
    plus 1 byte per weight of the fbgemm-packed int8 matrices, which are not tensors of the state
    dict."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}
    # int8 + fp32 scales
    return sum(seen.values()) + sum(m.in_features * m.out_features + 4 * m.out_features
                                    for m in model.modules() if isinstance(m, Int8Linear))

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

def for_inference(model, quantize=''):
    """The model's inference-time swaps, in place -> model: dropout becomes Identity, and
    quantize='int8' (quantize_int8), else on a CPU in fp32 the transposed head. Call it on a model
    that only decodes (serve.py, sample.py, bench.py), never on one in training: the swapped
    modules hold copies of the weights."""
    if quantize not in ('', 'int8'):
        raise ValueError(f"unknown quantize={quantize!r}; use '' (off) or int8")
    # dropout is the identity at inference; Identity skips F.dropout's call
    for mod in list(model.modules()):
        for name, child in mod.named_children():
            if isinstance(child, nn.Dropout):
                setattr(mod, name, nn.Identity())
    if quantize == 'int8':
        return quantize_int8(model)
    p = next(model.parameters())
    if p.device.type == 'cpu' and p.dtype == torch.float32 and type(model.lm_head) is nn.Linear:
        model.lm_head = TransposedHead(model.lm_head, model.config.tie_embeddings)
    return model
