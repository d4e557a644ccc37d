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


def load_checkpoint(path, map_location='cpu'):
    """Read a checkpoint we wrote, with errors that say what is wrong and what to do."""
    if os.path.isdir(path):
        path = os.path.join(path, 'ckpt.pt')
    if not os.path.exists(path):
        raise ValueError(f"no checkpoint at {path}; train one first (python train.py) or point "
                         "init_from at an out_dir that holds ckpt.pt")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
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


def model_from_checkpoint(ckpt, path='checkpoint'):
    """Build the GPT that a checkpoint describes and load its weights, naming any mismatch."""
    known = {f.name for f in fields(GPTConfig)}
    unknown = set(ckpt['model_args']) - known
    if unknown:
        raise ValueError(f"{path} has model args {sorted(unknown)} that this "
                         "version of model.py does not know")
    model = GPT(GPTConfig(**ckpt['model_args']))
    sd = {k.removeprefix('_orig_mod.'): v for k, v in ckpt['model'].items()}
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs config {tuple(expected[k].shape)}"
              for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if missing or extra or shapes:
        raise ValueError(f"weights in {path} do not match its model args: " +
                         '; '.join(filter(None, [missing and f"missing {missing[:4]}",
                                                 extra and f"unexpected {extra[:4]}",
                                                 shapes and ', '.join(shapes[:4])])))
    model.load_state_dict(sd)
    return model


def load_model(source, device='cpu', dtype=torch.float32):
    """The one function that opens any model source, with its tokenizer (None if it has none):
      - an out_dir holding ckpt.pt, or a .pt file, that nanolab wrote; or export.py's .safetensors
      - a Hugging Face directory (config.json + safetensors/bin) of GPT-2 or Llama weights
      - a hub name such as 'gpt2' (needs the network)
    Returns (model in eval mode, tokenizer, checkpoint dict or {} for HF sources)."""
    # export.py's weights-only file
    weights_only = source.endswith('.safetensors') and os.path.isfile(source)
    is_ckpt = source.endswith('.pt') or (os.path.isdir(source)
                                         and os.path.exists(os.path.join(source, 'ckpt.pt')))
    if is_ckpt or weights_only:
        ckpt = load_weights_file(source) if weights_only else load_checkpoint(source)
        model = model_from_checkpoint(ckpt, source)
        tok = from_spec(ckpt['tokenizer']) if ckpt.get('tokenizer') else None
    elif os.path.isdir(source) and not os.path.exists(os.path.join(source, 'config.json')):
        raise ValueError(f"{source} is a directory but holds neither ckpt.pt (a nanolab "
                         "run) nor config.json (a Hugging Face model); check the path, "
                         "or train a model into it first")
    elif not os.path.isdir(source) and (source.startswith(('.', '/', '~'))
                                        or source.startswith('out')):
        raise ValueError(f"model source '{source}' does not exist; give an out_dir with ckpt.pt, "
                         "a .pt file, a Hugging Face directory, or a hub name like 'gpt2'")
    else:
        path = hf.local_dir(source)
        model, ckpt = GPT.from_pretrained(path), {}
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
