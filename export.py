"""
Export a model for the tools people run next to nanolab: a Hugging Face directory (transformers, vLLM, peft, and
llama.cpp's own convert_hf_to_gguf.py), a GGUF file that llama.cpp loads directly (Ollama reads GGUF too), or
weights-only safetensors (the weights and what it takes to rebuild the model; no optimizer state).

    python export.py --init_from=out-shakespeare-char --format=gguf      # -> out-shakespeare-char/model-f32.gguf
    python export.py --init_from=out-tasks-base --format=gguf --outtype=q8_0 --out=tasks.gguf
    python export.py --init_from=out-shakespeare-char --format=hf --out=hf-shakespeare  # AutoModelForCausalLM loads it
    python export.py --init_from=out-tinystories-15m --format=safetensors --outtype=bf16  # --init_from=FILE reads it
    python export.py --init_from=out-shakespeare-char --check_with=LLAMA_CPP_DIR   # + llama.cpp's greedy vs ours
    llama-server -m out-shakespeare-char/model-f32.gguf --port 8080                 # llama.cpp (Ollama reads GGUF too)

Any model source load_model reads goes in (a run directory, a ckpt.pt, a Hugging Face directory or hub name).
What each format holds:
  hf           config.json (every key transformers and llama.cpp's converter read, n_ctx included), model.safetensors,
               the tokenizer files with the chat template as Jinja, and the run's model card as README.md.
  gguf         GGUF v3 through the `gguf` package (llama.cpp's own writer): the architecture's keys, the tokenizer
               as a byte-level BPE ('gpt2' model, 'gpt-2' pre-tokenizer: GPT-2's regex, which ours is), the chat
               template, and the tensors under llama.cpp's names. Llama blocks' q/k rows are permuted from the
               'rotate half' RoPE layout we (and Hugging Face) use to the interleaved pairs llama.cpp rotates.
               outtype f32 | f16 | bf16 | q8_0: norms and biases stay f32, as llama.cpp's converter keeps them;
               a matrix whose rows are not a multiple of q8_0's 32-value block falls back to f16.
  safetensors  our own tensor names plus a 'nanolab' metadata entry (model args, tokenizer, where it came from);
               load_model, and so every script's --init_from, reads the file back.
Refused, with the reason: a tokenizer with ids beyond the embedding (chat tokens above vocab_size), positions that
the target architecture does not have (sinusoidal), a tokenizer llama.cpp's byte-level BPE cannot express, and an
existing --out unless --overwrite=True. tests/test_export.py reads the GGUF back with `gguf` and compares every
tensor, and loads the HF directory with transformers; llama.cpp itself is checked with a local build: --check_with.
"""
import json
import os
import shutil
import sys
from dataclasses import asdict

import numpy as np
import torch

# -----------------------------------------------------------------------------
init_from = 'out-shakespeare-char'  # model source: out_dir, ckpt.pt, HF dir or hub name, export.py's .safetensors
format = 'gguf'               # hf | gguf | safetensors
outtype = 'f32'               # f32 | f16 | bf16 | q8_0 (gguf only): the weights' precision in the file
out = ''                      # output path; '' = inside init_from: model-<outtype>.gguf, hf/, model.safetensors
overwrite = False             # replace an existing --out
check_with = ''               # gguf: a llama.cpp build (DIR/bin/llama-server): compare its tokens and greedy text
check_prompt = 'ROMEO:\n'     # the prompt of that check
check_tokens = 100            # greedy tokens compared
# -----------------------------------------------------------------------------

FORMATS = ('hf', 'gguf', 'safetensors')
OUTTYPES = ('f32', 'f16', 'bf16', 'q8_0')
TORCH_DTYPES = {'f32': torch.float32, 'f16': torch.float16, 'bf16': torch.bfloat16}


# -----------------------------------------------------------------------------
# 1) GGUF: llama.cpp's names and keys for our two architectures

def gguf_tensors(model):
    """[(llama.cpp tensor name, float32 numpy array)] for model, shaped as llama.cpp's converter writes them:
    numpy (out, in) for a matrix (ggml lists the dimensions the other way round: ne = (in, out))."""
    c = model.config
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    zeros = lambda n: torch.zeros(n)  # noqa: E731  GPT-2 with bias=False: llama.cpp's gpt2 requires biases
    rows = [('token_embd.weight', sd['transformer.wte.weight'])]
    if c.arch == 'gpt2':
        rows.append(('position_embd.weight', sd['transformer.wpe.weight']))

    def permute(w, n):
        """'rotate half' rows (per head: first halves, then second halves) -> interleaved pairs (llama.cpp's RoPE)."""
        return w.reshape(n, 2, c.head_size // 2, w.shape[-1]).transpose(1, 2).reshape(w.shape)

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
            q, k, v = sd[o + 'attn.c_attn.weight'].split([c.n_head * c.head_size, c.n_kv_head * c.head_size,
                                                          c.n_kv_head * c.head_size])
            gate, up = sd[o + 'mlp.c_fc.weight'].split([c.ffn_hidden, c.ffn_hidden])
            rows += [(b + 'attn_q.weight', permute(q, c.n_head)), (b + 'attn_k.weight', permute(k, c.n_kv_head)),
                     (b + 'attn_v.weight', v), (b + 'ffn_gate.weight', gate), (b + 'ffn_up.weight', up)]
    rows.append(('output_norm.weight', sd['transformer.ln_f.weight']))
    if c.arch == 'gpt2':
        rows.append(('output_norm.bias', sd.get('transformer.ln_f.bias', zeros(c.n_embd))))
    if not c.tie_embeddings:  # tied: llama.cpp reuses token_embd as the output head
        rows.append(('output.weight', sd['lm_head.weight']))
    return [(name, t.contiguous().numpy()) for name, t in rows]


def write_gguf(model, tok, path, outtype='f32', name='nanolab'):
    """model + tok as one GGUF file at path (written to a temp file, fsynced, renamed)."""
    import gguf
    from nanolab import hf
    c = model.config
    hf.config_to_hf(asdict(c))  # refuses positions the architecture lacks (GGUF's gpt2 is learned, its llama RoPE)
    text_of, merges, specials = hf.byte_level_vocab(tok, unlisted_merges=True)  # refuses what it cannot say
    # 1) the tokenizer: every embedding row gets a token; rows past the tokenizer's ids are padding
    control = set(specials.values())
    special_text = {i: t for t, i in specials.items()}
    tokens = [text_of.get(i) or special_text.get(i) or f'[PAD{i}]' for i in range(c.vocab_size)]
    types = [gguf.TokenType.CONTROL if i in control else gguf.TokenType.NORMAL if i in text_of
             else gguf.TokenType.UNUSED for i in range(c.vocab_size)]
    tmp = f'{path}.{os.getpid()}.tmp'
    w = gguf.GGUFWriter(tmp, c.arch)  # 'gpt2' and 'llama' are llama.cpp's names for them too
    w.add_name(name)
    w.add_file_type({'f32': gguf.LlamaFileType.ALL_F32, 'f16': gguf.LlamaFileType.MOSTLY_F16,
                     'bf16': gguf.LlamaFileType.MOSTLY_BF16, 'q8_0': gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
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
        w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model('gpt2')
    w.add_tokenizer_pre('gpt-2')
    w.add_token_list(tokens)
    w.add_token_types(types)
    # llama.cpp needs the key, and gguf writes no empty array: an ASCII char vocabulary gets a merge of two 0xff
    # bytes, which UTF-8 text never holds
    w.add_token_merges([f'{a} {b}' for a, b in merges] or ['ÿ ÿ'])
    if tok.eot is not None:  # without one (char vocabularies) llama.cpp's default eos is id 11: pass --ignore-eos
        w.add_bos_token_id(tok.eot)
        w.add_eos_token_id(tok.eot)
    if '<|end|>' in specials:
        w.add_eot_token_id(specials['<|end|>'])  # a chat reply ends at the end of its turn
    w.add_add_bos_token(False)  # we never prepend one
    w.add_chat_template(hf.chat_jinja(tok))
    # 2) the tensors: 1-D (norms, biases) in f32, matrices in outtype
    for tname, a in gguf_tensors(model):
        if a.ndim == 1 or outtype == 'f32':
            w.add_tensor(tname, a)
        elif outtype == 'f16' or (outtype == 'q8_0' and a.shape[-1] % 32):
            w.add_tensor(tname, a.astype(np.float16))
        else:
            qtype = gguf.GGMLQuantizationType.Q8_0 if outtype == 'q8_0' else gguf.GGMLQuantizationType.BF16
            w.add_tensor(tname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# -----------------------------------------------------------------------------
# 2) weights-only safetensors (model.load_weights_file reads them back)

def write_safetensors(model, tok, path, outtype='f32', source=''):
    from dataclasses import asdict
    from safetensors.torch import save
    from nanolab.files import write_atomic
    sd = {k: v.detach().to(TORCH_DTYPES[outtype]).contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:  # one tensor under two names: safetensors stores it once, as wte
        del sd['lm_head.weight']
    meta = {'nanolab': json.dumps({'model_args': asdict(model.config), 'tokenizer': tok.spec() if tok else None,
                                   'source': source})}
    write_atomic(path, lambda f: f.write(save(sd, metadata=meta)))


# -----------------------------------------------------------------------------
# 3) llama.cpp's verdict on a GGUF file

def check_llama_cpp(path, model, tok, llama_dir, prompt, n=100):
    """Serve path with llama.cpp's llama-server and compare: its tokens for prompt, and its greedy continuation
    (temperature 0, eos ignored) with sample.generate's, up to n tokens inside the context. -> {'tokenize_equal',
    'agree' (leading tokens equal), 'n' (compared), 'text' (llama.cpp's)}. With f32 weights the two agree token for
    token (tests/test_export.py)."""
    import socket
    import subprocess
    import time
    import urllib.request
    from sample import generate
    server_bin = os.path.join(llama_dir, 'bin', 'llama-server')
    if not os.path.exists(server_bin):
        raise ValueError(f"no llama-server in {llama_dir}/bin; build llama.cpp (../shared/tools/build-llama-cpp.sh "
                         "DIR, or llama.cpp's README), then --check_with=DIR")
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([server_bin, '-m', path, '--port', str(port), '-t', str(torch.get_num_threads()),
                               '-np', '1', '-c', str(model.config.block_size)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def post(route, body):
        req = urllib.request.Request(f'http://127.0.0.1:{port}{route}', json.dumps(body).encode(),
                                     {'Content-Type': 'application/json'})
        return json.load(urllib.request.urlopen(req, timeout=120))
    try:
        for _ in range(300):  # up to 30 s to load
            if server.poll() is not None:
                raise ValueError(f"llama-server could not load {path}:\n{server.stderr.read()[-1500:]}")
            try:
                urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        ids = tok.encode(prompt)
        n = min(n, model.config.block_size - len(ids))  # llama.cpp stops where its context ends; we would slide on
        if n < 1:
            raise ValueError(f"the check's prompt fills the model's {model.config.block_size}-token context; give "
                             "a shorter --check_prompt")
        same = post('/tokenize', {'content': prompt})['tokens'] == ids
        theirs = post('/completion', {'prompt': ids, 'n_predict': n, 'temperature': 0, 'ignore_eos': True,
                                      'return_tokens': True, 'cache_prompt': False})['tokens']
        ours = generate(model, ids, n, temperature=0, stop_tokens=())[0].tokens
        agree = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
        return {'tokenize_equal': same, 'agree': agree, 'n': n, 'text': tok.decode(theirs)}
    finally:
        server.kill()
        server.wait()


# -----------------------------------------------------------------------------

def default_out(source, fmt, otype):
    if not os.path.isdir(source) and not source.endswith('.pt'):
        raise ValueError(f"give --out=PATH: init_from={source!r} is not a run directory to write next to")
    d = source if os.path.isdir(source) else os.path.dirname(source) or '.'
    return os.path.join(d, {'gguf': f'model-{otype}.gguf', 'hf': 'hf', 'safetensors': 'model.safetensors'}[fmt])


def main():
    from nanolab import hf
    from nanolab.configurator import configure
    from nanolab.checkpoint import load_model
    from nanolab.tokenizer import check_fits
    configure(globals(), choices={'format': FORMATS, 'outtype': OUTTYPES})
    if outtype == 'q8_0' and format != 'gguf':
        raise ValueError("--outtype=q8_0 is a GGUF block format; for hf and safetensors use f32, f16 or bf16")
    path = out or default_out(init_from, format, outtype)
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"{path} already exists; pass --overwrite=True to replace it, or another --out")
    model, tok, ckpt = load_model(init_from)
    if tok is None and format != 'safetensors':
        raise ValueError(f"{init_from} has no tokenizer, and a {format} export needs one; export --format=safetensors, "
                         "or use a source with tokenizer files")
    check_fits(tok, model.config.vocab_size)  # for every format, before anything is written
    if format == 'gguf':
        write_gguf(model, tok, path, outtype, name=os.path.basename(os.path.normpath(init_from)))
        if tok.eot is None:
            print("note: this vocabulary has no end-of-text token, and llama.cpp stops at its default eos (id 11); "
                  "run llama.cpp with --ignore-eos", file=sys.stderr)
    elif format == 'safetensors':
        write_safetensors(model, tok, path, outtype, source=init_from)
    elif format == 'hf':
        if tok.kind != 'hf':
            hf.byte_level_vocab(tok)  # refuses, with the reason, a tokenizer Hugging Face's files cannot hold
        tmp = f'{path}.{os.getpid()}.tmp'
        model.to(TORCH_DTYPES[outtype]).save_pretrained(tmp, tokenizer=tok)
        card = os.path.join(init_from, 'README.md')
        if ckpt and os.path.isfile(card):
            shutil.copyfile(card, os.path.join(tmp, 'README.md'))
        if os.path.exists(path):  # --overwrite: the old directory goes only once the new one is whole
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        os.replace(tmp, path)
    else:
        raise ValueError(f'unknown format {format!r}')
    if check_with:
        if format != 'gguf':
            raise ValueError("--check_with runs llama.cpp on a GGUF file: use it with --format=gguf")
        r = check_llama_cpp(path, model, tok, check_with, check_prompt, check_tokens)
        print(f"llama.cpp: tokenizes the prompt {'the same' if r['tokenize_equal'] else 'DIFFERENTLY'}; greedy "
              f"continuation: the first {r['agree']} of {r['n']} tokens equal ours; its text: {r['text'][:80]!r}")
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs) if os.path.isdir(path) \
        else os.path.getsize(path)
    print(f'wrote {path} ({format}, {outtype}, {size / 1e6:.1f} MB, {model.num_params(False) / 1e6:.2f}M parameters)')


if __name__ == '__main__':
    try:
        main()
    except ValueError as e:
        raise SystemExit(f'error: {e}')
