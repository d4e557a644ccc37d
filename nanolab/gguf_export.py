"""
GGUF, the file format of llama.cpp and Ollama, written through the `gguf` package (llama.cpp's own
writer): the architecture's keys, the tokenizer as a byte-level BPE ('gpt2' model, 'gpt-2'
pre-tokenizer: GPT-2's regex, which ours is), the chat template, and the tensors under llama.cpp's
names. export.py --format=gguf calls write_gguf.

    write_gguf(model, tok, 'model-q8_0.gguf', outtype='q8_0')   # llama-server -m model-q8_0.gguf

The llama-arch options map to llama.cpp's architectures as its converter maps Hugging Face's
families: qkv_bias -> 'qwen2' (attn_q/k/v biases), qk_norm -> 'qwen3' (attn_q_norm/attn_k_norm),
else 'llama', whose q/k rows are permuted from the 'rotate half' RoPE layout we (and Hugging
Face and qwen2/3) use to the interleaved pairs llama.cpp rotates for it. head_dim is written as
key/value_length; linear RoPE scaling as rope.scaling.type/factor, llama3's as the rope_freqs
tensor of per-frequency factors (llama.cpp reads it for 'llama' only). A sliding window is written
as metadata, which llama.cpp's llama/qwen2/qwen3 do not apply (as for the Mistral files its own
converter writes): past the window its answers differ from ours. gguf_import.py reads it all back.

outtype f32 | f16 | bf16 | q8_0 | q4_0: norms, biases and rope_freqs stay f32, as llama.cpp keeps
them; a matrix whose rows are not a multiple of the 32-value q8_0/q4_0 block falls back to f16.
"""
from dataclasses import asdict, replace

import numpy as np
import torch

from model import rope_frequencies
from nanolab import hf
from nanolab.files import replacing

OUTTYPES = ('f32', 'f16', 'bf16', 'q8_0', 'q4_0')


def gguf_arch(c):
    """llama.cpp's architecture for config c, or ValueError for what none of them computes."""
    if c.arch == 'gpt2':
        return 'gpt2'
    if c.qk_norm and c.qkv_bias:
        raise ValueError("llama.cpp has no architecture with both qk_norm and qkv_bias; export a "
                         "model with one of them (Qwen3's or Qwen2's)")
    arch = 'qwen3' if c.qk_norm else 'qwen2' if c.qkv_bias else 'llama'
    if (c.rope_scaling or {}).get('rope_type') == 'llama3' and arch != 'llama':
        raise ValueError(f"llama.cpp's {arch} has no llama3 RoPE scaling (its rope_freqs tensor "
                         "is read for 'llama' only); export without qk_norm/qkv_bias, or to hf")
    return arch


def llama3_rope_factors(c):
    """llama3 RoPE scaling as llama.cpp holds it: one factor per frequency (the rope_freqs tensor
    its converter writes), by which the frequency is divided."""
    return rope_frequencies(replace(c, rope_scaling=None)) / rope_frequencies(c)


def gguf_tensors(model):
    """[(llama.cpp tensor name, float32 numpy array)] for model, shaped as llama.cpp's converter
    writes them: numpy (out, in) for a matrix (ggml lists the dimensions the other way round: ne =
    (in, out))."""
    c = model.config
    arch = gguf_arch(c)
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    # GPT-2 with bias=False: llama.cpp's gpt2 requires biases, so zeros stand in
    zeros = lambda n: torch.zeros(n)  # noqa: E731
    rows = [('token_embd.weight', sd['transformer.wte.weight'])]
    if c.arch == 'gpt2':
        rows.append(('position_embd.weight', sd['transformer.wpe.weight']))

    def permute(w, n):
        """'rotate half' rows (per head: first halves, then second halves) -> interleaved pairs
        (llama.cpp's RoPE)."""
        if arch != 'llama':  # qwen2/qwen3 rotate halves, as we do
            return w
        return w.reshape(n, 2, c.head_size // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)

    if (c.rope_scaling or {}).get('rope_type') == 'llama3':
        rows.append(('rope_freqs.weight', llama3_rope_factors(c)))

    for i in range(c.n_layer):
        o, b = f'transformer.h.{i}.', f'blk.{i}.'
        names = [('ln_1', 'attn_norm'), ('attn.c_proj', 'attn_output'), ('ln_2', 'ffn_norm'),
                 ('mlp.c_proj', 'ffn_down')]
        if c.arch == 'gpt2':
            names += [('attn.c_attn', 'attn_qkv'), ('mlp.c_fc', 'ffn_up')]
            for ours, theirs in names:
                w = sd[o + ours + '.weight']
                bias = sd.get(o + ours + '.bias', zeros(w.shape[0]))
                rows += [(b + theirs + '.weight', w), (b + theirs + '.bias', bias)]
        else:
            rows += [(b + theirs + '.weight', sd[o + ours + '.weight']) for ours, theirs in names]
            sizes = [c.n_head * c.head_size, c.n_kv_head * c.head_size, c.n_kv_head * c.head_size]
            for p in ('weight', 'bias') if c.qkv_bias else ('weight',):
                q, k, v = sd[o + 'attn.c_attn.' + p].split(sizes)
                rows += [(b + 'attn_q.' + p, permute(q, c.n_head)),
                         (b + 'attn_k.' + p, permute(k, c.n_kv_head)), (b + 'attn_v.' + p, v)]
            if c.qk_norm:  # one (head_dim,) RMSNorm weight each, shared by the heads
                rows += [(b + f'attn_{x}_norm.weight', sd[o + f'attn.{x}_norm.weight'])
                         for x in 'qk']
            gate, up = sd[o + 'mlp.c_fc.weight'].split([c.ffn_hidden, c.ffn_hidden])
            rows += [(b + 'ffn_gate.weight', gate), (b + 'ffn_up.weight', up)]
    rows.append(('output_norm.weight', sd['transformer.ln_f.weight']))
    if c.arch == 'gpt2':
        rows.append(('output_norm.bias', sd.get('transformer.ln_f.bias', zeros(c.n_embd))))
    if not c.tie_embeddings:  # tied: llama.cpp reuses token_embd as the output head
        rows.append(('output.weight', sd['lm_head.weight']))
    return [(name, t.contiguous().numpy()) for name, t in rows]


def write_gguf(model, tok, path, outtype='f32', name='nanolab'):
    """model + tok as one GGUF file at path (written to a temp file, fsynced, renamed:
    files.replacing); outtype one of OUTTYPES."""
    import gguf
    c = model.config
    arch = gguf_arch(c)
    # refuses positions the architecture lacks (GGUF's gpt2 is learned, its llama RoPE)
    hf.config_to_hf(asdict(c))
    # refuses what it cannot say
    text_of, merges, specials = hf.byte_level_vocab(tok, unlisted_merges=True)
    # 1) the tokenizer: every embedding row gets a token; rows past the tokenizer's ids are padding
    control = set(specials.values())
    special_text = {i: t for t, i in specials.items()}
    tokens = [text_of.get(i) or special_text.get(i) or f'[PAD{i}]' for i in range(c.vocab_size)]
    types = [gguf.TokenType.CONTROL if i in control else gguf.TokenType.NORMAL if i in text_of
             else gguf.TokenType.UNUSED for i in range(c.vocab_size)]
    with replacing(path) as tmp:  # the writer fills tmp; it is fsynced and renamed when whole
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(name)
        w.add_file_type({'f32': gguf.LlamaFileType.ALL_F32, 'f16': gguf.LlamaFileType.MOSTLY_F16,
                         'bf16': gguf.LlamaFileType.MOSTLY_BF16,
                         'q8_0': gguf.LlamaFileType.MOSTLY_Q8_0,
                         'q4_0': gguf.LlamaFileType.MOSTLY_Q4_0}[outtype])
        w.add_context_length(c.block_size)
        w.add_embedding_length(c.n_embd)
        w.add_block_count(c.n_layer)
        w.add_feed_forward_length(c.ffn_hidden)
        w.add_head_count(c.n_head)
        w.add_head_count_kv(c.n_kv_head)
        if c.arch == 'gpt2':
            w.add_layer_norm_eps(c.norm_eps)
        else:
            w.add_layer_norm_rms_eps(c.norm_eps)
            w.add_rope_freq_base(c.rope_theta)
            w.add_rope_dimension_count(c.head_size)
            w.add_key_length(c.head_size)
            w.add_value_length(c.head_size)
            w.add_vocab_size(c.vocab_size)
            scaling = c.rope_scaling or {}
            if scaling.get('rope_type') == 'linear':
                w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
                w.add_rope_scaling_factor(scaling['factor'])
            elif scaling.get('rope_type') == 'llama3':  # the factors are the rope_freqs tensor
                w.add_rope_scaling_orig_ctx_len(scaling['original_max_position_embeddings'])
            if c.sliding_window:
                w.add_sliding_window(c.sliding_window)
        w.add_tokenizer_model('gpt2')
        w.add_tokenizer_pre('gpt-2')
        w.add_token_list(tokens)
        w.add_token_types(types)
        # llama.cpp needs the key, and gguf writes no empty array: an ASCII char vocabulary gets a
        # merge of two 0xff bytes, which UTF-8 text never holds
        w.add_token_merges([f'{a} {b}' for a, b in merges] or ['ÿ ÿ'])
        # without one (char vocabularies) llama.cpp's default eos is id 11: pass --ignore-eos
        if tok.eot is not None:
            w.add_bos_token_id(tok.eot)
            w.add_eos_token_id(tok.eot)
        if '<|end|>' in specials:
            w.add_eot_token_id(specials['<|end|>'])  # a chat reply ends at the end of its turn
        w.add_add_bos_token(False)  # we never prepend one
        w.add_chat_template(tok.chat_jinja())
        # 2) the tensors: 1-D (norms, biases, rope_freqs) in f32, matrices in outtype
        for tname, a in gguf_tensors(model):
            if a.ndim == 1 or outtype == 'f32':
                w.add_tensor(tname, a)
            elif outtype == 'f16' or (outtype in ('q8_0', 'q4_0') and a.shape[-1] % 32):
                w.add_tensor(tname, a.astype(np.float16))
            else:
                qtype = getattr(gguf.GGMLQuantizationType, outtype.upper())
                w.add_tensor(tname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
