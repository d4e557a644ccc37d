"""
Export a model for the tools people run next to nanolab: a Hugging Face directory (transformers,
vLLM, peft, and llama.cpp's own convert_hf_to_gguf.py), a GGUF file that llama.cpp loads directly
(Ollama reads GGUF too), or weights-only safetensors (the weights and what it takes to rebuild the
model; no optimizer state).

    python export.py --init_from=out-shakespeare-char --format=gguf  # -> out-.../model-f32.gguf
    python export.py --init_from=out-tasks-base --format=gguf --outtype=q8_0 --out=tasks.gguf
    python export.py --init_from=Qwen/Qwen2.5-0.5B-Instruct --format=gguf --outtype=q4_0 --out=qwen.gguf
    # a directory that AutoModelForCausalLM loads; a file that --init_from=FILE reads
    python export.py --init_from=out-shakespeare-char --format=hf --out=hf-shakespeare
    python export.py --init_from=out-tinystories-15m --format=safetensors --outtype=bf16
    # also llama.cpp's greedy text against ours
    python export.py --init_from=out-shakespeare-char --check_with=$NANOLAB_LLAMA_CPP
    llama-server -m out-shakespeare-char/model-f32.gguf --port 8080  # llama.cpp; Ollama reads it

Any model source load_model reads goes in (a run directory, a ckpt.pt, a .gguf file, a Hugging Face directory or
hub name). What each format holds:
  hf           config.json (every key transformers and llama.cpp's converter read, n_ctx included),
               model.safetensors, the tokenizer files with the chat template as Jinja, and the
               run's model card as README.md.
  gguf         GGUF v3 through the `gguf` package (llama.cpp's own writer): the architecture's
               keys, the tokenizer as a byte-level BPE, the chat template, and the tensors under
               llama.cpp's names (nanolab/gguf_export.py). outtype f32 | f16 | bf16 | q8_0 | q4_0: norms
               and biases stay f32.
  safetensors  our own tensor names plus a 'nanolab' metadata entry (model args, tokenizer, where
               it came from); load_model, and so every script's --init_from, reads the file back.
Refused, with the reason: a tokenizer with ids beyond the embedding (chat tokens above vocab_size),
positions that the target architecture does not have (sinusoidal), a tokenizer llama.cpp's
byte-level BPE cannot express, and an existing --out unless --overwrite=True. tests/test_export.py
reads the GGUF back with `gguf` and compares every tensor, and loads the HF directory with
transformers; llama.cpp itself is checked with a local build: --check_with.
"""
import os
import shutil
import sys

import torch

from nanolab import hf
from nanolab.checkpoint import load_model, write_safetensors
from nanolab.configurator import cli_errors, configure, fail
from nanolab.files import remove_stale
from nanolab.gguf_export import OUTTYPES, write_gguf
from nanolab.llama_cpp import check_llama_cpp
from nanolab.tokenizer import check_fits

# -----------------------------------------------------------------------------
init_from = 'out-shakespeare-char'  # model source: out_dir, ckpt.pt, HF dir or hub name, export.py's .safetensors
format = 'gguf'               # hf | gguf | safetensors
outtype = 'f32'               # f32 | f16 | bf16 | q8_0 | q4_0 (gguf only): the weights' precision in the file
out = ''                      # output path; '' = inside init_from: model-<outtype>.gguf, hf/, model.safetensors
overwrite = False             # replace an existing --out
check_with = ''               # gguf: a llama.cpp build (DIR/bin/llama-server): compare its tokens and greedy text
check_prompt = 'ROMEO:\n'     # the prompt of that check
check_tokens = 100            # greedy tokens compared
# -----------------------------------------------------------------------------
CHOICES = {'format': ('hf', 'gguf', 'safetensors'), 'outtype': OUTTYPES}
TORCH_DTYPES = {'f32': torch.float32, 'f16': torch.float16, 'bf16': torch.bfloat16}
configure(globals(), choices=CHOICES)
if outtype in ('q8_0', 'q4_0') and format != 'gguf':
    fail(f"--outtype={outtype} is a GGUF block format; for hf and safetensors use f32, f16 or bf16")
if check_with and format != 'gguf':
    fail("--check_with runs llama.cpp on a GGUF file: use it with --format=gguf")
if not out and not os.path.isdir(init_from) and not init_from.endswith('.pt'):
    fail(f"give --out=PATH: init_from={init_from!r} is not a run directory to write next to")
# the default --out sits inside the run: model-<outtype>.gguf, hf/, model.safetensors
run_dir = init_from if os.path.isdir(init_from) else os.path.dirname(init_from) or '.'
path = out or os.path.join(run_dir, {'gguf': f'model-{outtype}.gguf', 'hf': 'hf',
                                     'safetensors': 'model.safetensors'}[format])
if os.path.exists(path) and not overwrite:
    fail(f"{path} already exists; pass --overwrite=True to replace it, or another --out")

with cli_errors():
    model, tok, ckpt = load_model(init_from)
    if tok is None and format != 'safetensors':
        raise ValueError(f"{init_from} has no tokenizer, and a {format} export needs one; export "
                         "--format=safetensors, or use a source with tokenizer files")
    check_fits(tok, model.config.vocab_size)  # for every format, before anything is written
    if format == 'gguf':
        write_gguf(model, tok, path, outtype, name=os.path.basename(os.path.normpath(init_from)))
        if tok.eot is None:
            print("note: this vocabulary has no end-of-text token, and llama.cpp stops at its "
                  "default eos (id 11); run llama.cpp with --ignore-eos", file=sys.stderr)
    elif format == 'safetensors':
        write_safetensors(model, tok, path, TORCH_DTYPES[outtype], source=init_from)
    else:  # hf: a directory, written beside path and renamed into place when whole
        if tok.kind not in ('hf', 'char'):  # a char vocabulary of any chars has an HF form
            # refuses, with the reason, a tokenizer Hugging Face's files cannot hold
            hf.byte_level_vocab(tok)
        tmp = f'{path}.{os.getpid()}.tmp'
        remove_stale(os.path.dirname(os.path.abspath(path)))  # what a killed export left
        try:
            model.to(TORCH_DTYPES[outtype]).save_pretrained(tmp, tokenizer=tok)
            card = os.path.join(init_from, 'README.md')
            if ckpt and os.path.isfile(card):
                shutil.copyfile(card, os.path.join(tmp, 'README.md'))
            # --overwrite: the old directory goes only once the new one is whole
            if os.path.exists(path):
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            os.replace(tmp, path)
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp)
    if check_with:
        r = check_llama_cpp(path, model, tok, check_with, check_prompt, check_tokens)
        print("llama.cpp: tokenizes the prompt "
              f"{'the same' if r['tokenize_equal'] else 'DIFFERENTLY'}; greedy continuation: the "
              f"first {r['agree']} of {r['n']} tokens equal ours; its text: {r['text'][:80]!r}")
size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs) \
    if os.path.isdir(path) else os.path.getsize(path)
print(f'wrote {path} ({format}, {outtype}, {size / 1e6:.1f} MB, '
      f'{model.num_params(False) / 1e6:.2f}M parameters)')
