"""
GGUF in: a llama.cpp file of a gpt2, llama (Mistral too: GGUF stores it as 'llama'), qwen2 or qwen3
model as the plain values the Hugging Face path already reads (hf.config_from_hf,
hf.state_dict_from_hf, tokenizer.HFTokenizer), so load_model('x.gguf') is that path fed from
another file.

    hf_config, tensors, tokenizer_files = read_gguf('model-q4_k_m.gguf')

hf_config is a config.json dict; tensors a lazy mapping under Hugging Face's names (a tensor is read
and dequantized when asked for: F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0 and the k-quants Q2_K..Q6_K,
through gguf-py's own dequantize); tokenizer_files the tokenizer.json, tokenizer_config.json and
generation_config.json a Hugging Face directory would hold, built by transformers' own GGUF
tokenizer converter. llama.cpp's converter permutes Llama's q/k rows for its interleaved RoPE
(qwen2/qwen3 use 'rotate half' and are not permuted); that is undone here, the inverse of
gguf_export's permute.

The header is parsed here, not by gguf.GGUFReader: a file from the internet is checked (counts,
lengths, types, shapes, every tensor's bytes inside the file) before anything it claims is
allocated, so a truncated or crafted file is one ValueError; and GGUFReader takes 3 s over a
50k-token vocabulary where this takes 0.07 s. Names come from gguf-py's TensorNameMap.
"""
import json
import math
import mmap
import os
import struct
from collections.abc import Mapping

import numpy as np
import torch

ARCHS = ('gpt2', 'llama', 'qwen2', 'qwen3')
QUANT_TYPES = ('F32', 'F16', 'BF16', 'Q4_0', 'Q4_1', 'Q5_0', 'Q5_1', 'Q8_0', 'Q2_K', 'Q3_K', 'Q4_K',
               'Q5_K', 'Q6_K')
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
_SCALAR = {0: '<B', 1: '<b', 2: '<H', 3: '<h', 4: '<I', 5: '<i', 6: '<f', 7: '<?', 10: '<Q',
           11: '<q', 12: '<d'}  # GGUFValueType -> struct format; 8 is a string, 9 an array


class _Bad(Exception):
    """What is wrong with the file, said in a few words; read_gguf makes it a ValueError."""


class _Cursor:
    """Reads the header from the mapped file; every read is checked against the file's end first."""

    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, n, what):
        if n < 0 or self.pos + n > len(self.buf):
            raise _Bad(f'{what} runs past the end of the file at byte {self.pos}: it is truncated')
        self.pos += n
        return self.pos - n

    def scalar(self, fmt, what='a value'):
        v = struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]
        # a float32 as its shortest decimal: norm_eps 1e-05, not 9.999999747378752e-06
        return float(str(np.float32(v))) if fmt == '<f' else v

    def string(self, what='a string'):
        n = self.scalar('<Q', what)
        start = self.take(n, what)  # a length beyond the file is refused before it is sliced
        return self.buf[start:start + n].decode('utf-8', errors='replace')

    def value(self, vtype, what, depth=0):
        if vtype in _SCALAR:
            return self.scalar(_SCALAR[vtype], what)
        if vtype == 8:
            return self.string(what)
        if vtype != 9 or depth >= 2:  # an array of arrays at most; llama.cpp writes none deeper
            raise _Bad(f'{what} has value type {vtype}, which GGUF does not define')
        etype, count = self.scalar('<I', what), self.scalar('<Q', what)
        if etype in _SCALAR:  # fixed size: one bounded read
            size = struct.calcsize(_SCALAR[etype])
            start = self.take(count * size, what)
            return np.frombuffer(self.buf, _SCALAR[etype], count, start).tolist()
        if count > (len(self.buf) - self.pos) // 8:  # each element needs at least its 8-byte length
            raise _Bad(f'{what} claims {count} elements, more than the file can hold')
        if etype != 8:
            return [self.value(etype, what, depth + 1) for _ in range(count)]
        out, buf, pos, end = [], self.buf, self.pos, len(self.buf)  # a vocabulary: the hot loop
        for _ in range(count):
            n = struct.unpack_from('<Q', buf, pos)[0] if pos + 8 <= end else end
            if pos + 8 + n > end:
                raise _Bad(f'{what} runs past the end of the file: it is truncated')
            out.append(buf[pos + 8:pos + 8 + n].decode('utf-8', errors='replace'))
            pos += 8 + n
        self.pos = pos
        return out


def _header(buf):
    """(metadata dict, {tensor name: (torch-order shape, ggml type, start byte, byte count)})."""
    import gguf
    c = _Cursor(buf)
    c.take(4, 'the magic')
    if buf[:4] != b'GGUF':
        raise _Bad("it does not start with GGUF's magic bytes")
    version = c.scalar('<I', 'the version')
    if version not in (2, 3):
        raise _Bad('it is big-endian, which nanolab does not read' if version >> 24 in (2, 3)
                   else f'it is GGUF version {version}; nanolab reads versions 2 and 3')
    n_tensors, n_kv = c.scalar('<Q', 'the tensor count'), c.scalar('<Q', 'the key count')
    # the smallest entries: a tensor (8 + 4 + 8 + 4 + 8 bytes, empty name), a key (8 + 4 + 1)
    if n_tensors > len(buf) // 32 or n_kv > len(buf) // 13:
        raise _Bad(f'it claims {n_tensors} tensors and {n_kv} keys, more than its '
                   f'{len(buf)} bytes can hold')
    md = {}
    for _ in range(n_kv):
        key = c.string('a metadata key')
        if key in md:
            raise _Bad(f'it has the key {key[:60]!r} twice')
        what = f'key {key[:60]!r}'  # !r: a crafted name's control characters stay escaped
        md[key] = c.value(c.scalar('<I', what), what)
    align = md.get('general.alignment', gguf.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or isinstance(align, bool) or not 0 < align <= 1 << 20 \
            or align & (align - 1):
        raise _Bad(f'its general.alignment {align!r} is not a power of two')
    raw = []
    for _ in range(n_tensors):
        name = c.string('a tensor name')
        what = f'tensor {name[:60]!r}'
        n_dims = c.scalar('<I', what)
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Bad(f'{what} has {n_dims} dimensions (ggml allows 1 to {MAX_DIMS})')
        dims = [c.scalar('<Q', what) for _ in range(n_dims)]
        raw.append((name, dims, c.scalar('<I', what), c.scalar('<Q', what)))
    data_start = -(-c.pos // align) * align
    tensors, total = {}, 0
    for name, dims, qtype, offset in raw:
        what = f'tensor {name[:60]!r}'
        try:
            qtype = gguf.GGMLQuantizationType(qtype)
        except ValueError:
            raise _Bad(f'{what} has ggml type {qtype}, which does not exist') from None
        if qtype.name not in QUANT_TYPES:
            raise ValueError(f"{what} is stored as {qtype.name}, which nanolab cannot dequantize "
                             f"(it reads {', '.join(QUANT_TYPES)}); get a file quantized to one of "
                             "those")
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        if name in tensors or min(dims) < 1 or dims[0] % block or offset % align:
            raise _Bad(f'{what} is listed twice, has an empty or misaligned shape {dims}, or a '
                       f'misaligned offset {offset}')
        numel = math.prod(dims)  # Python ints: no overflow, bounded next by the file's size
        nbytes = numel // block * size
        total += nbytes
        if data_start + offset + nbytes > len(buf) or total > len(buf):
            raise _Bad(f'{what} ({dims}, {qtype.name}) lies past the end of the file: it is '
                       'truncated')
        tensors[name] = (tuple(reversed(dims)), qtype, data_start + offset, nbytes)
    return md, tensors


def _read(buf, info):
    """One tensor of the file, as a torch tensor in its (torch-order) shape: F32/F16/BF16 as stored,
    quantized blocks dequantized to float32 by gguf-py."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize
    shape, qtype, start, nbytes = info
    raw = np.frombuffer(buf, np.uint8, nbytes, start)
    if qtype == Q.F32 or qtype == Q.F16:  # copied: the mapping is read-only, the tensor is not
        t = torch.from_numpy(raw.view(np.float32 if qtype == Q.F32 else np.float16).copy())
    elif qtype == Q.BF16:
        t = torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16)
    else:
        with np.errstate(all='ignore'):  # crafted NaN scales make NaN weights, not a crash
            t = torch.from_numpy(dequantize(raw.reshape(math.prod(shape[:-1]), -1), qtype).copy())
    return t.reshape(shape)


def _unpermute(w, n_head):
    """llama.cpp's interleaved-pair q/k rows (per head) -> 'rotate half' rows, Hugging Face's."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2) \
        .reshape(w.shape)


class GGUFTensors(Mapping):
    """The model's tensors under Hugging Face names, each read, dequantized and un-permuted only
    when asked for, so the peak while building a model is the model and one tensor."""

    def __init__(self, buf, plan):
        self.buf, self.plan = buf, plan  # {hf name: (gguf name, info, fix or None)}

    def __getitem__(self, hf_name):
        gguf_name, info, fix = self.plan[hf_name]
        t = _read(self.buf, info)
        return (fix(t) if fix else t).contiguous()

    def __iter__(self):
        return iter(self.plan)

    def __len__(self):
        return len(self.plan)


def _get(md, key, kind=int, lo=1, hi=1 << 31, default=None):
    """A metadata number of the type and range a model's settings need (a crafted file's is checked
    before any arithmetic on it), or _Bad naming it."""
    v = md.get(key, default)
    if v is None:
        raise _Bad(f"it has no '{key}', which a GGUF model of its kind holds")
    if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int) \
            or not lo <= v <= hi:  # NaN fails this too
        raise _Bad(f"its '{key}' is {str(v)[:40]!r}, not {kind.__name__} in [{lo}, {hi}]")
    return v


def _llama3_rope(factors, theta, head_dim, original):
    """llama.cpp's rope_freqs tensor (its converter's llama3 factor per frequency) -> the Hugging
    Face rope_scaling dict that makes the same factors. The factors only fix low/high_freq_factor
    relative to original_max_position_embeddings, so that is taken as written (default 8192, what
    llama.cpp's converter assumes) and the other two solved for: factor 1/f = (1 - s)/F + s with s =
    clip(a*u - b, 0, 1) over u = 1/wavelength, a line through the points between the plateaus."""
    f = factors.double()
    if not torch.isfinite(f).all() or float(f.min()) <= 0:
        raise _Bad('its rope_freqs tensor holds factors that are not positive numbers')
    u = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim) / (2 * math.pi)
    F = float(f.max())
    if F <= 1 + 1e-6 or float(f.min()) >= F * (1 - 1e-6):
        return None if F <= 1 + 1e-6 else {'rope_type': 'linear', 'factor': F}
    s = (1 / f - 1 / F) / (1 - 1 / F)  # 0 at F, 1 where unscaled
    mid, ones, tops = (s > 1e-6) & (s < 1 - 1e-6), s >= 1 - 1e-6, s <= 1e-6
    if mid.sum() >= 2:
        a, b = (float(x) for x in np.polyfit(u[mid].numpy(), s[mid].numpy(), 1))
        b = -b
    else:  # one point or none between the plateaus: the steepest line the plateaus allow
        lo = (float(u[tops].max()), 0.0) if tops.any() else None
        hi = (float(u[ones].min()), 1.0) if ones.any() else None
        p = (float(u[mid][0]), float(s[mid][0])) if mid.any() else lo
        a = max([(x[1] - p[1]) / (x[0] - p[0]) for x in (lo, hi) if x and x != p], default=0)
        b = a * p[0] - p[1]
    fit = (b * original / a, (1 + b) * original / a) if a > 0 and b > 0 else (1.0, 4.0)
    for lo, hi in ((1.0, 4.0), tuple(float(f'{x:.6g}') for x in fit), fit):  # Llama 3.1's first
        sm = ((original * u - lo) / (hi - lo)).clamp(0, 1)  # u: 1 / wavelength
        if torch.allclose(1 / ((1 - sm) / F + sm), f, rtol=1e-5):
            return {'rope_type': 'llama3', 'factor': F, 'low_freq_factor': lo,
                    'high_freq_factor': hi, 'original_max_position_embeddings': original}
    raise ValueError("its rope_freqs tensor is not the llama3 RoPE scaling of llama.cpp's "
                     'converter; nanolab reads linear and llama3 scaling only')


def _config(buf, md, tensors, arch):
    """The Hugging Face config.json dict this file's metadata describes."""
    k = lambda key, **kw: _get(md, f'{arch}.{key}', **kw)  # noqa: E731
    n_embd, n_layer, n_head = k('embedding_length'), k('block_count', hi=1 << 16), \
        k('attention.head_count', hi=1 << 16)
    ctx, ffn = k('context_length'), k('feed_forward_length')
    emb = tensors.get('token_embd.weight')
    if emb is None or len(emb[0]) != 2 or emb[0][1] != n_embd:
        raise _Bad(f"it has no token_embd.weight of {n_embd} columns")
    ids = {t: i for t in ('bos', 'eos') if isinstance(i := md.get(f'tokenizer.ggml.{t}_token_id'),
                                                       int) and 0 <= i < emb[0][0]}
    # the dtype its weights amount to (device.resolve_dtype's 'auto' reads it): 16 bits or fewer
    # unless the embedding is stored in full f32
    common = dict(vocab_size=emb[0][0], tie_word_embeddings='output.weight' not in tensors,
                  bos_token_id=ids.get('bos'), eos_token_id=ids.get('eos'),
                  torch_dtype='float32' if emb[1].name == 'F32' else 'bfloat16')
    if arch == 'gpt2':
        return dict(model_type='gpt2', architectures=['GPT2LMHeadModel'], n_positions=ctx,
                    n_ctx=ctx, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_inner=ffn,
                    activation_function='gelu_new', resid_pdrop=0.0, embd_pdrop=0.0,
                    attn_pdrop=0.0, layer_norm_epsilon=k('attention.layer_norm_epsilon',
                                                         kind=float, lo=0, hi=1), **common)
    head_dim = k('attention.key_length', default=n_embd // n_head)
    if k('attention.value_length', default=head_dim) != head_dim or \
            k('rope.dimension_count', default=head_dim) != head_dim:
        raise ValueError('its value heads or RoPE dimensions differ from its key heads '
                         "(partial RoPE), which nanolab's model does not have")
    theta = k('rope.freq_base', kind=float, lo=1e-6, hi=1e30, default=10000.0)
    kind = md.get(f'{arch}.rope.scaling.type', 'none')
    if kind == 'linear':
        rope = {'rope_type': 'linear',
                'factor': k('rope.scaling.factor', kind=float, lo=1e-6, hi=1e6)}
    elif kind not in ('none', ''):
        raise ValueError(f"its RoPE scaling is {str(kind)[:20]!r}, and nanolab's model has linear "
                         "and llama3 scaling only; pick a model without it")
    elif 'rope_freqs.weight' in tensors:  # llama3 scaling: llama.cpp keeps only the factors
        if tensors['rope_freqs.weight'][0] != (head_dim // 2,):
            raise ValueError(f'its rope_freqs tensor is not of {head_dim // 2} factors')
        rope = _llama3_rope(_read(buf, tensors['rope_freqs.weight']).float(),
                            theta, head_dim, k('rope.scaling.original_context_length',
                                               default=8192))
    else:
        rope = None
    # llama.cpp stores Mistral as 'llama' (transformers tells them apart by name too); a window is
    # metadata to llama.cpp's llama/qwen2/qwen3 (they do not apply it), but it is the model's
    window = k('attention.sliding_window', lo=0, default=0)
    mistral = arch == 'llama' and (window or 'mistral' in str(md.get('general.name', '')).lower())
    model_type = 'mistral' if mistral else arch
    return dict(model_type=model_type, architectures=[model_type.title() + 'ForCausalLM'],
                hidden_size=n_embd, intermediate_size=ffn, num_hidden_layers=n_layer,
                num_attention_heads=n_head,
                num_key_value_heads=k('attention.head_count_kv', default=n_head, hi=n_head),
                head_dim=head_dim, max_position_embeddings=ctx, hidden_act='silu',
                rms_norm_eps=k('attention.layer_norm_rms_epsilon', kind=float, lo=0, hi=1),
                rope_theta=theta, rope_scaling=rope,
                # transformers 5's spelling of the same (hf.config_to_hf writes it)
                rope_parameters={**(rope or {'rope_type': 'default'}), 'rope_theta': theta},
                # llama.cpp's qwen2 always has them; a llama file may
                attention_bias=arch == 'qwen2' or 'blk.0.attn_q.bias' in tensors, mlp_bias=False,
                sliding_window=window or None, use_sliding_window=bool(window), **common)


def _plan(tensors, cfg, arch):
    """{hf name: (gguf name, info, fix)} for every tensor the model needs, each checked to be in the
    file in the shape its metadata implies (so nothing mis-shaped is ever dequantized). The GGUF
    names come from gguf-py's TensorNameMap, the table llama.cpp's converter names tensors by."""
    import gguf
    arch_id = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    names = gguf.get_tensor_name_map(arch_id, cfg.get('n_layer') or cfg['num_hidden_layers'])
    want = []  # (hf name, shape in the file, torch order; fix)
    if arch == 'gpt2':
        C, F, V, L = cfg['n_embd'], cfg['n_inner'], cfg['vocab_size'], cfg['n_positions']
        t = lambda w: w.t()  # noqa: E731  llama.cpp stores GPT-2's Conv1D (in, out) as (out, in)
        want += [('transformer.wte.weight', (V, C), None), ('transformer.wpe.weight', (L, C), None),
                 ('transformer.ln_f.weight', (C,), None), ('transformer.ln_f.bias', (C,), None)]
        for i in range(cfg['n_layer']):
            h = f'transformer.h.{i}.'
            for n, out, inp in [('attn.c_attn', 3 * C, C), ('attn.c_proj', C, C),
                                ('mlp.c_fc', F, C), ('mlp.c_proj', C, F)]:
                want += [(h + n + '.weight', (out, inp), t), (h + n + '.bias', (out,), None)]
            want += [(h + n, (C,), None) for n in ('ln_1.weight', 'ln_1.bias', 'ln_2.weight',
                                                    'ln_2.bias')]
    else:
        C, F, V = cfg['hidden_size'], cfg['intermediate_size'], cfg['vocab_size']
        nh, nkv, hd = cfg['num_attention_heads'], cfg['num_key_value_heads'], cfg['head_dim']
        # llama.cpp permutes Llama's q/k (weights and biases) for its interleaved RoPE; qwen2/3
        # rotate halves, as Hugging Face does, and are stored as they are
        pq, pk = ((lambda w: _unpermute(w, nh)), (lambda w: _unpermute(w, nkv))) \
            if arch == 'llama' else (None, None)
        want += [('model.embed_tokens.weight', (V, C), None), ('model.norm.weight', (C,), None)]
        for i in range(cfg['num_hidden_layers']):
            h = f'model.layers.{i}.'
            a = [('q_proj', nh * hd, pq), ('k_proj', nkv * hd, pk), ('v_proj', nkv * hd, None)]
            want += [(h + 'self_attn.' + n + '.weight', (rows, C), fix) for n, rows, fix in a]
            if cfg['attention_bias']:
                want += [(h + 'self_attn.' + n + '.bias', (rows,), fix) for n, rows, fix in a]
            if arch == 'qwen3':
                want += [(h + f'self_attn.{n}_norm.weight', (hd,), None) for n in 'qk']
            want += [(h + 'self_attn.o_proj.weight', (C, nh * hd), None),
                     (h + 'input_layernorm.weight', (C,), None),
                     (h + 'post_attention_layernorm.weight', (C,), None),
                     (h + 'mlp.gate_proj.weight', (F, C), None),
                     (h + 'mlp.up_proj.weight', (F, C), None),
                     (h + 'mlp.down_proj.weight', (C, F), None)]
    if not cfg['tie_word_embeddings']:
        want.append(('lm_head.weight', (V, C), None))
    plan = {}
    for hf_name, shape, fix in want:
        base, suffix = hf_name.rsplit('.', 1)
        g = f'{names.get_name(base)}.{suffix}'
        if g not in tensors or tensors[g][0] != shape:
            raise _Bad(f"its tensor {g} is {'missing' if g not in tensors else tensors[g][0]}, "
                       f"where its metadata says {shape}")
        plan[hf_name] = (g, tensors[g], fix)
    used = {g for g, _, _ in plan.values()} | {'rope_freqs.weight'}
    extra = sorted(n for n in tensors if n not in used and not n.endswith('.rot_embd'))
    if extra:  # a variant (biases, norms) the model would silently go without
        raise ValueError(f"it holds tensors nanolab's {arch} model has no place for "
                         f"({extra[:4]}); it is a variant nanolab does not read")
    return plan


def _tokenizer_files(md, arch, n_vocab):
    """tokenizer.json (built by transformers' GGUF tokenizer converter: byte-level BPE 'gpt2' and
    SentencePiece 'llama' vocabularies), tokenizer_config.json (special tokens, chat template) and
    generation_config.json (every id that ends a reply), or {} for a file without a vocabulary."""
    tokens = md.get('tokenizer.ggml.tokens')
    if tokens is None:
        return {}
    model = md.get('tokenizer.ggml.model')
    if model not in ('gpt2', 'llama'):
        raise ValueError(f"its tokenizer is {str(model)[:20]!r}; nanolab builds 'gpt2' (byte-level "
                         "BPE) and 'llama' (SentencePiece) tokenizers")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens) \
            or len(tokens) != n_vocab:  # llama.cpp's rule too: an id past the rows would crash
        raise _Bad(f'its tokenizer.ggml.tokens is not a list of {n_vocab} strings, one per '
                   'embedding row')
    from transformers.integrations.gguf import convert_gguf_tokenizer
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING
    given = {name: md[f'tokenizer.{key}'] for key, name in
             GGUF_TOKENIZER_MAPPING['tokenizer'].items() if f'tokenizer.{key}' in md}
    try:
        tokenizer_json = convert_gguf_tokenizer(arch, given)[0].to_str()
    except Exception as e:  # a crafted vocabulary: merges of unknown tokens, scores of a wrong type
        raise _Bad(f'its tokenizer cannot be built: {type(e).__name__}: {str(e)[:100]}') from None

    def token_id(key):
        i = md.get(f'tokenizer.ggml.{key}_token_id')
        return i if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(tokens) \
            else None

    config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'clean_up_tokenization_spaces': False,
              # llama.cpp adds a SentencePiece model's BOS unless the file says otherwise
              'add_bos_token': bool(md.get('tokenizer.ggml.add_bos_token', model == 'llama')),
              'add_eos_token': bool(md.get('tokenizer.ggml.add_eos_token', False))}
    config.update({f'{k}_token': tokens[token_id(k)] for k in ('bos', 'eos', 'unk', 'padding')
                   if token_id(k) is not None})
    if 'padding_token' in config:
        config['pad_token'] = config.pop('padding_token')
    if isinstance(md.get('tokenizer.chat_template'), str):
        config['chat_template'] = md['tokenizer.chat_template']
    # a chat model's turn ends at eot (or eom, after a tool call) and its text at eos: all stop it
    ends = list(dict.fromkeys(i for i in map(token_id, ('eos', 'eot', 'eom')) if i is not None))
    generation = {'bos_token_id': token_id('bos'),
                  'eos_token_id': ends[0] if len(ends) == 1 else ends or None}
    return {'tokenizer.json': tokenizer_json, 'tokenizer_config.json': json.dumps(config, indent=2),
            'generation_config.json': json.dumps(generation, indent=2)}


def _line(e):
    """An error's text on one line (a library's may span several)."""
    return ' '.join(str(e).split())[:400]


def read_gguf(path):
    """A GGUF file -> (Hugging Face config.json dict, lazy {Hugging Face name: tensor} mapping,
    {file name: text} of the tokenizer files). ValueError, naming the file, the problem and the fix,
    for a truncated or crafted file and for what nanolab's model does not have."""
    try:
        with open(path, 'rb') as f:  # the mapping outlives the file object; pages load when read
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()) \
                .st_size else b''
    except OSError as e:
        raise ValueError(f'cannot read {path} ({e.strerror or e}); check the path') from None
    try:
        md, tensors = _header(buf)
        arch = md.get('general.architecture')
        if arch not in ARCHS:
            raise ValueError(f"it holds a {str(arch)[:30]!r} model; nanolab reads GGUF files of "
                             f"{', '.join(ARCHS)} (Mistral's are 'llama'), so convert the model "
                             "from its Hugging Face directory instead, if hf.py reads it")
        cfg = _config(buf, md, tensors, arch)
        plan = _plan(tensors, cfg, arch)
        files = _tokenizer_files(md, arch, cfg['vocab_size'])
    except _Bad as e:
        raise ValueError(f'{path} is not a readable GGUF file ({_line(e)}); download it again') \
            from None
    except ValueError as e:
        raise ValueError(f'{path}: {_line(e)}') from None
    return cfg, GGUFTensors(buf, plan), files
