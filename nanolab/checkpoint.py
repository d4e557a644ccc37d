"""
Checkpoints and model sources: the one loader every script opens a model with.

    model, tok, ckpt = load_model('out-shakespeare-char')  # or a .pt, export.py's .safetensors,
                                                           # a Hugging Face directory, 'gpt2'
    save_checkpoint(ckpt, 'out-x/ckpt.pt')  # atomic: a crash leaves the previous file whole

A checkpoint (out_dir/ckpt.pt) is a dict with at least 'model_args' (GPTConfig's fields) and
'model' (the uncompiled model's state dict); the trainers add the optimizer, iteration, best val
loss, config, tokenizer spec and RNG states (training.checkpoint_dict). It is read with
torch.load(weights_only=True), so a crafted file cannot run code.
"""
import json
import os
import re
from dataclasses import asdict, fields

import torch

from model import GPT, GPTConfig
from nanolab import hf
from nanolab.device import free_memory, resolve_dtype
from nanolab.files import write_atomic
from nanolab.tokenizer import HFTokenizer, from_spec

# the script that wrote a checkpoint: train, finetune, dpo, rl, reward
# what the server accepts as a model's name (POST /v1/models/load): a letter or digit, then up to 63 more of
# letters, digits, '.', '_' and '-'
MODEL_NAME = re.compile(r'[A-Za-z0-9][\w.\-]{0,63}')

STAGES = ('pretrain', 'sft', 'dpo', 'rl', 'reward')
TUNED = ('sft', 'dpo', 'rl')  # stages after which a model answers in the chat template


def save_checkpoint(ckpt, path):
    """Atomically write a checkpoint dict (files.write_atomic): a crash mid-write leaves the
    previous file intact. Holds at least 'model_args' and 'model' (the uncompiled model's state
    dict, no '_orig_mod.' keys)."""
    if any(k.startswith('_orig_mod.') for k in ckpt['model']):
        raise ValueError("refusing to save a compiled model's state dict; save the "
                         "uncompiled raw_model instead")
    write_atomic(path, lambda f: torch.save(ckpt, f))


def load_checkpoint(path, map_location='cpu', mmap=False):
    """Read a checkpoint we wrote, with errors that say what is wrong and what to do. mmap: map the
    file instead of reading it, so only the tensors used are read (a model's weights, not its
    optimizer state), and while they are used the file's old contents stay mapped even if a new
    save replaces it."""
    if os.path.isdir(path):
        path = os.path.join(path, 'ckpt.pt')
    if not os.path.exists(path):
        raise ValueError(f"no checkpoint at {path}; train one first (python train.py) or point "
                         "init_from at an out_dir that holds ckpt.pt")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is corrupt or truncated "
                         f"({type(e).__name__}: {str(e).split('. ')[0][:160]}); "
                         "retrain, or restore it from a backup") from None
    if not isinstance(ckpt, dict) or 'model_args' not in ckpt or 'model' not in ckpt:
        raise ValueError(f"{path} is not a nanolab checkpoint (it has no "
                         "'model_args'/'model' entries)")
    return ckpt


def write_safetensors(model, tok, path, dtype=torch.float32, source=''):
    """The weights alone as one .safetensors file (in dtype), with a 'nanolab' metadata entry
    (model args, tokenizer, where it came from) that load_weights_file reads back: export.py
    --format=safetensors."""
    from safetensors.torch import save
    sd = {k: v.detach().to(dtype).contiguous().cpu() for k, v in model.state_dict().items()}
    # one tensor under two names: safetensors stores it once, as wte
    if model.config.tie_embeddings:
        del sd['lm_head.weight']
    meta = {'nanolab': json.dumps({'model_args': asdict(model.config),
                                   'tokenizer': tok.spec() if tok else None, 'source': source})}
    write_atomic(path, lambda f: f.write(save(sd, metadata=meta)))


def load_weights_file(path):
    """A weights-only .safetensors file that write_safetensors wrote, as a checkpoint dict
    (model_args, model, tokenizer)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    try:
        with safe_open(path, 'pt') as f:
            meta = f.metadata() or {}
        sd = load_file(path)
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file "
                         f"({type(e).__name__}: {str(e)[:120]}); export it again "
                         "(python export.py --format=safetensors)") from None
    if 'nanolab' not in meta:
        raise ValueError(f"{path} has no 'nanolab' metadata, so it was not written by "
                         "export.py and says nothing of the model's shape; for a Hugging "
                         "Face model, give its directory instead")
    info = json.loads(meta['nanolab'])
    sd = {k: v.float() for k, v in sd.items()}
    if GPTConfig(**info['model_args']).tie_embeddings:  # stored once, as the token embedding
        sd['lm_head.weight'] = sd['transformer.wte.weight']
    return {'model_args': info['model_args'], 'model': sd, 'tokenizer': info.get('tokenizer'),
            'source': info.get('source')}


def model_config(args, source):
    """A source's model args (GPTConfig's arguments) as the GPTConfig they describe, or a
    ValueError that names the source and the field."""
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise ValueError(f"{source} has model args that are not GPTConfig's fields by name")
    unknown = set(args) - {f.name for f in fields(GPTConfig)}
    if unknown:
        raise ValueError(f"{source} has model args {sorted(unknown)[:8]} that this "
                         "version of model.py does not know")
    try:
        return GPTConfig(**args)
    except ValueError as e:
        raise ValueError(f"{source} describes a model that model.py refuses: {e}") from None


def check_size(config, source, n_tensors, device='cpu', dtype=torch.float32):
    """Before any weights are read: config's layers must be in a file of n_tensors tensors, and its
    weights in dtype must fit in the memory free on device now (device.free_memory). Counted on a
    model laid out on the meta device (no memory), which is returned: its state dict holds the
    names and shapes the weights must have."""
    if config.n_layer > n_tensors:
        raise ValueError(f"{source} describes {config.n_layer} layers but holds "
                         f"{n_tensors} tensors: its model args do not match its weights")
    with torch.device('meta'):
        skeleton = GPT(config)
    numel = sum(t.numel() for t in [*skeleton.parameters(), *skeleton.buffers()])
    need, free = numel * dtype.itemsize, free_memory(device)
    if free is not None and need > free:
        raise ValueError(f"{source} needs {need / 2**30:.2f} GiB for {numel / 1e9:.2f}B "
                         f"weights in {str(dtype).removeprefix('torch.')}, and {device} has "
                         f"{free / 2**30:.2f} GiB free; free some memory, or load it in a "
                         "smaller dtype (--dtype=bfloat16)")
    return skeleton


def model_from_checkpoint(ckpt, path='checkpoint', device='cpu', dtype=torch.float32):
    """Build the GPT that a checkpoint describes around its weights (cast to dtype), naming any
    mismatch; nothing is built until its model args, tensor names and shapes and its size (against
    the memory free on device) are checked."""
    config = model_config(ckpt['model_args'], path)
    sd = ckpt['model']
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} has a 'model' entry that is not a dict of tensors")
    sd = {str(k).removeprefix('_orig_mod.'): v for k, v in sd.items()}
    expected = check_size(config, path, len(sd), device, dtype).state_dict()
    missing, extra = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs config {tuple(expected[k].shape)}"
              for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if missing or extra or shapes:
        raise ValueError(f"weights in {path} do not match its model args: " +
                         '; '.join(filter(None, [missing and f"missing {missing[:4]}",
                                                 extra and f"unexpected {extra[:4]}",
                                                 shapes and ', '.join(shapes[:4])])))
    cast = {}  # by tensor: the tied embedding is one tensor under two names, cast once
    sd = {k: cast.setdefault(id(v), v.to(dtype).contiguous()) for k, v in sd.items()}
    return GPT.from_state_dict(config, sd)


def load_model(source, device='cpu', dtype=torch.float32):
    """The one function that opens any model source, with its tokenizer (None if it has none):
      - an out_dir holding ckpt.pt, or a .pt file, that nanolab wrote; or export.py's .safetensors
      - a Hugging Face directory (config.json + safetensors/bin) of GPT-2 or Llama weights
      - a llama.cpp .gguf file of a gpt2, llama/Mistral, qwen2 or qwen3 model (gguf_import.py)
      - a hub name such as 'gpt2' (needs the network)
    Returns (model in eval mode, tokenizer, checkpoint dict or {} for HF sources). Its model args,
    tensors and size are checked before anything is built (model_from_checkpoint, check_size), and
    the weights are read straight into dtype: the peak is about the model's size in dtype.
    dtype: a torch dtype, or a script's setting ('auto', 'bfloat16', ...), which
    device.resolve_dtype decides with the dtype the source stores (a bf16 model stays bf16 on a
    CPU with bf16 instructions)."""
    auto = lambda stored: resolve_dtype(dtype, device, stored) if isinstance(dtype, str) \
        else dtype  # noqa: E731
    # export.py's weights-only file
    weights_only = source.endswith('.safetensors') and os.path.isfile(source)
    is_ckpt = source.endswith('.pt') or (os.path.isdir(source)
                                         and os.path.exists(os.path.join(source, 'ckpt.pt')))
    if source.endswith('.gguf') and os.path.isfile(source):
        # llama.cpp's file, read as the Hugging Face config and tensors it stands for
        from nanolab.gguf_import import read_gguf
        hf_config, tensors, files = read_gguf(source)
        dtype = auto(torch.float32 if hf_config['torch_dtype'] == 'float32' else torch.bfloat16)
        try:
            args = hf.config_from_hf(hf_config)
        except ValueError as e:  # what model.py cannot compute, said for this file
            raise ValueError(f'{source}: {e}') from None
        config = model_config(args, source)
        check_size(config, source, len(tensors), device, dtype)
        model, ckpt = GPT.from_state_dict(config, hf.state_dict_from_hf(tensors, args, dtype)), {}
        tok = HFTokenizer(source, files=files) if files else None
    elif is_ckpt or weights_only:
        ckpt = load_weights_file(source) if weights_only else load_checkpoint(source, mmap=True)
        stored = next(iter(ckpt['model'].values()), None) if isinstance(ckpt.get('model'), dict) \
            else None
        dtype = auto(stored.dtype if isinstance(stored, torch.Tensor) else None)
        model = model_from_checkpoint(ckpt, source, device, dtype)
        tok = from_spec(ckpt['tokenizer']) if ckpt.get('tokenizer') else None
    elif os.path.isdir(source) and not os.path.exists(os.path.join(source, 'config.json')):
        raise ValueError(f"{source} is a directory but holds neither ckpt.pt (a nanolab "
                         "run) nor config.json (a Hugging Face model); check the path, "
                         "or train a model into it first")
    elif not os.path.isdir(source) and (source.startswith(('.', '/', '~', 'out'))
                                        or source.endswith('.gguf')):  # not a hub name
        raise ValueError(f"model source '{source}' does not exist; give an out_dir with ckpt.pt, "
                         "a .pt file, a .gguf file, a Hugging Face directory, or a hub name like "
                         "'gpt2'")
    else:
        path = hf.local_dir(source)
        args = hf.read_config(path)
        dtype = auto(hf.stored_dtype(path))
        config = model_config(args, os.path.join(path, 'config.json'))
        sd = hf.read_state_dict(path, args, dtype,
                                check=lambda n: check_size(config, path, n, device, dtype))
        try:
            model, ckpt = GPT.from_state_dict(config, sd), {}
        except RuntimeError as e:  # load_state_dict's list of missing and mis-shaped tensors
            raise ValueError(f"the weights in {path} do not match its config.json: "
                             f"{' '.join(str(e).split())[:400]}") from None
        tok = HFTokenizer(path) if any(os.path.exists(os.path.join(path, f)) for f in
                                       ('tokenizer.json', 'vocab.json')) else None
    model.to(device=device, dtype=dtype).eval()
    return model, tok, ckpt


def checkpoint_stage(ckpt):
    """Which trainer wrote a checkpoint (its 'stage'; a checkpoint without one by the settings its
    config holds), or None for a source that is not ours (a Hugging Face model)."""
    if not ckpt:
        return None
    if ckpt.get('stage') in STAGES:
        return ckpt['stage']
    cfg = ckpt.get('config') or {}
    return ('reward' if 'reward_head' in ckpt else 'rl' if 'kl_coef' in cfg
            else 'dpo' if 'beta' in cfg else 'sft' if 'em_rows' in cfg else 'pretrain')


def model_name(text):
    """text (a run's directory name, say) as a name MODEL_NAME accepts: other characters become '_', and the
    leading ones that cannot start a name go."""
    return re.sub(r'^[^A-Za-z0-9]+', '', re.sub(r'[^\w.\-]', '_', text))[:64] or 'model'


def model_sources(spec):
    """init_from -> [(name, source)]: comma-separated sources, where a directory that is neither a
    run nor a Hugging Face model stands for every subdirectory holding ckpt.pt. A model's name is
    its directory's name."""
    out = []
    for s in [x.strip() for x in spec.split(',') if x.strip()]:
        if os.path.isdir(s) and not any(os.path.exists(os.path.join(s, f))
                                        for f in ('ckpt.pt', 'config.json')):
            runs = sorted(d for d in os.listdir(s)
                          if os.path.isfile(os.path.join(s, d, 'ckpt.pt')))
            if not runs:
                raise ValueError(f"{s} holds no ckpt.pt, no config.json and no run directories "
                                 "with ckpt.pt; train a model into it first (python train.py "
                                 "--out_dir=...), or fix the path")
            out += [(d, os.path.join(s, d)) for d in runs]
        else:
            out.append((os.path.basename(os.path.normpath(s)) if os.path.exists(s) else s, s))
    names = [n for n, _ in out]
    if not out or len(set(names)) < len(names):
        raise ValueError(f"init_from={spec!r} gives "
                         f"{'no models' if not out else f'two models named alike: {names}'}; give "
                         "one or more distinct sources, comma-separated")
    return out
