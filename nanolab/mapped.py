"""
Weights memory-mapped from safetensors files, as llama.cpp maps GGUF: a tensor kept in its stored
dtype is a view of its file (copy-on-write), so a bf16 model's resident size is its file's, and the
pages of weights that were copied (fused, cast) or replaced (quantized) are given back.

    tensors = MappedTensors(['model.safetensors'])   # name -> tensor, each read when asked for
    w = tensors['lm_head.weight']                    # a view of the file: no copy
    release_unused(model)                            # after quantize swapped weights out

hf.read_state_dict reads Hugging Face directories through it; quantize.py gives pages back.
"""
import json
import math
import mmap
import os
import warnings
import weakref
from collections.abc import Mapping

import torch

# safetensors' dtype names -> torch's
SAFETENSORS_DTYPES = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16,
                      'BF16': torch.bfloat16, 'I64': torch.int64, 'I32': torch.int32,
                      'I16': torch.int16, 'I8': torch.int8, 'U8': torch.uint8, 'BOOL': torch.bool}

# every mapping MappedTensors made: (weak reference to the mmap, {tensor name: (start, end)
# offsets}), so release_unused can give back the pages of weights a model dropped
_MAPS = []

def _advise_away(mm, start, end):
    """MADV_DONTNEED on the whole pages inside [start, end) of mm (an ACCESS_COPY mapping: a page
    nobody wrote is read again from the file if ever touched)."""
    page = mmap.PAGESIZE
    lo, hi = -(-start // page) * page, end // page * page
    if hi > lo and hasattr(mm, 'madvise'):
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

def release_unused(model):
    """Give back the mapped file pages of the weights model no longer holds (quantize.for_inference
    swapped them for int8/int4 copies): without this a quantized 1B model kept its bf16 file's pages
    resident too. Mappings that hold none of model's tensors are another model's, left alone."""
    kept = [t.data_ptr() for t in (*model.parameters(), *model.buffers())]
    for ref, extents in list(_MAPS):
        mm = ref()
        if mm is None:
            _MAPS.remove((ref, extents))
            continue
        base = torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr()
        held = lambda a, b: any(base + a <= p < base + b for p in kept)  # noqa: E731
        if any(held(a, b) for a, b in extents.values()):
            for a, b in extents.values():
                if not held(a, b):
                    _advise_away(mm, a, b)

def release_pages(t):
    """Give back the mapped file pages under tensor t, one a model just dropped (quantize's swaps,
    layer by layer, so a quantized load never holds the whole bf16 file and its copy); a tensor
    that is not a mapped file's is left alone."""
    p = t.data_ptr()
    for ref, _ in _MAPS:
        mm = ref()
        base = torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr() if mm else 0
        if mm and base <= p < base + len(mm):
            _advise_away(mm, p - base, p - base + t.numel() * t.element_size())
            return

class MappedTensors(Mapping):
    """The tensors of safetensors files by name, each a view of its file mapped copy-on-write, as
    llama.cpp maps GGUF: nothing is read until a tensor is used, its pages are the page cache's (a
    bf16 model's resident size is its file's), and a write (fine-tuning) copies only the pages it
    touches. Every header entry is checked against the file's size first; release(tensor) gives
    back the pages of one that was copied (a fused q/k/v), so they stop counting as resident."""
    def __init__(self, files):
        self.where = {}
        for f in files:
            with open(f, 'rb') as fh:
                size = os.fstat(fh.fileno()).st_size
                n = int.from_bytes(fh.read(8), 'little') if size >= 8 else -1
                if not 2 <= n <= min(size - 8, 100 << 20):
                    raise ValueError(f"{f} has no safetensors header of a sane size")
                header = json.loads(fh.read(n))
                # ACCESS_COPY: MAP_PRIVATE, writable; the file itself is never written
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None
            for name, e in header.items():
                if name == '__metadata__':
                    continue
                dtype = SAFETENSORS_DTYPES.get(e.get('dtype')) if isinstance(e, dict) else None
                shape, (b, end) = e['shape'], e['data_offsets']
                numel = math.prod(shape) if all(type(d) is int and d >= 0 for d in shape) else -1
                if dtype is None or numel < 0 or not 0 <= b <= end <= size - 8 - n or \
                        end - b != numel * dtype.itemsize or (8 + n + b) % dtype.itemsize:
                    raise ValueError(f"{f}: tensor {name[:80]!r} has a bad dtype, shape or extent")
                self.where[name] = (mm, 8 + n + b, dtype, shape, numel)
            if mm is not None:
                _MAPS.append((weakref.ref(mm), {k: (o, o + m * t.itemsize) for k, (w, o, t, _, m)
                                                in self.where.items() if w is mm}))

    def __getitem__(self, name):
        mm, offset, dtype, shape, numel = self.where[name]
        if not numel:
            return torch.empty(shape, dtype=dtype)
        # subtle: frombuffer keeps mm alive as long as the tensor (or a view of it) is
        with warnings.catch_warnings():  # torch notes that the buffer is writable: ACCESS_COPY's is
            warnings.simplefilter('ignore')
            return torch.frombuffer(mm, dtype=dtype, count=numel, offset=offset).view(shape)

    def release(self, name):
        """Drop a tensor's pages from this process once its data lives elsewhere (a copy): the
        whole pages inside its extent are advised away (MADV_DONTNEED; mapped copy-on-write, an
        unwritten page is read again from the file if ever touched)."""
        mm, offset, dtype, shape, numel = self.where[name]
        if mm is not None:
            _advise_away(mm, offset, offset + numel * dtype.itemsize)

    def __iter__(self):
        return iter(self.where)

    def __len__(self):
        return len(self.where)
