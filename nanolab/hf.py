"""
Hugging Face interop, in one place: reading and writing Hugging Face directories of GPT-2 and Llama
models (config.json, tensor names, safetensors or bin weights, the hub) and writing our tokenizers
as the files transformers.AutoTokenizer loads with the same ids (tokenizer.HFTokenizer reads such
files back).
It speaks in plain values: a model's config is the dict of GPTConfig's arguments and its weights a
state dict under our names, so GPT.from_pretrained and save_pretrained (model.py) are thin calls
into read_pretrained and write_pretrained. tests/test_model.py and tests/test_tokenizer.py check
both directions against transformers.

    config, state_dict = read_pretrained('path/to/hf_dir')  # or a hub name such as 'gpt2' (online)
    write_pretrained('out/hf', config, state_dict, tokenizer)
"""
import glob
import json
import os
import sys

import torch

from nanolab.files import replacing, write_json, write_text
from nanolab.mapped import MappedTensors
from nanolab.tokenizer import (EOT, GPT2_REGEX_ENCODINGS, GPT2_SPLIT_PATTERN,
                               BPETokenizer, bytes_to_unicode, check_fits)

# -----------------------------------------------------------------------------
# 1) models: config and tensor names. Ours: lm_head and
#    transformer.{wte,wpe,h.N.{ln_1,attn.c_attn,attn.c_proj,ln_2,mlp.c_fc,mlp.c_proj},ln_f}

def config_from_hf(hf):
    """A Hugging Face config.json (a dict) -> the arguments of GPTConfig."""
    mt = hf.get('model_type')
    if mt == 'gpt2':
        if hf.get('activation_function', 'gelu_new') not in ('gelu_new', 'gelu_pytorch_tanh'):
            raise ValueError(f"unsupported GPT-2 activation '{hf['activation_function']}'; "
                             "only gelu_new is implemented")
        return dict(arch='gpt2', block_size=hf['n_positions'], vocab_size=hf['vocab_size'],
                    n_layer=hf['n_layer'], n_head=hf['n_head'], n_embd=hf['n_embd'],
                    ffn_hidden=hf.get('n_inner') or 0, bias=True,
                    tie_embeddings=hf.get('tie_word_embeddings', True),
                    norm_eps=hf.get('layer_norm_epsilon', 1e-5))
    if mt in LLAMA_FAMILIES:
        return _llama_family_config(hf)
    raise ValueError(f"unsupported Hugging Face model_type '{mt}'; nanolab reads gpt2, "
                     f"{', '.join(LLAMA_FAMILIES)} checkpoints")

# the families that are Llama blocks plus a few options of model.py's GPTConfig
LLAMA_FAMILIES = ('llama', 'mistral', 'qwen2', 'qwen3')

def _llama_family_config(hf):
    """config.json of a Llama, Mistral, Qwen2/2.5 or Qwen3 model -> GPTConfig's arguments; what the
    model cannot compute (another activation, RoPE scaling, a per-layer window, MLP biases) is
    refused by name."""
    mt = hf['model_type']
    if hf.get('hidden_act', 'silu') != 'silu':
        raise ValueError(f"{mt} with hidden_act '{hf['hidden_act']}' is not supported; only silu")
    if hf.get('mlp_bias') or (hf.get('attention_bias') and mt != 'qwen2'):
        raise ValueError(f"{mt} checkpoints with attention_bias/mlp_bias are not supported "
                         "(Qwen2's q/k/v biases are)")
    # RoPE: transformers 5 writes rope_parameters (with rope_theta); older files rope_scaling
    rope = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
    kind = rope.get('rope_type', rope.get('type', 'default'))
    if kind not in ('default', 'linear', 'llama3'):
        raise ValueError(f"RoPE scaling '{kind}' is not supported; model.py computes plain, "
                         "'linear' and 'llama3' RoPE")
    if rope.get('partial_rotary_factor', hf.get('partial_rotary_factor', 1.0)) != 1.0:
        raise ValueError(f"{mt} with partial_rotary_factor is not supported; RoPE on the whole "
                         "head only")
    scaling = None if kind == 'default' else {'rope_type': kind, **{
        k: rope[k] for k in ('factor', 'low_freq_factor', 'high_freq_factor',
                             'original_max_position_embeddings') if k in rope}}
    # a sliding window: Mistral's on every layer; Qwen's only with use_sliding_window, where the
    # window may cover some layers (layer_types), which one model.py setting cannot say
    window = hf.get('sliding_window') or 0
    if mt in ('qwen2', 'qwen3'):
        layers = hf.get('layer_types') or []
        sliding = [t == 'sliding_attention' for t in layers] if layers else \
            [bool(hf.get('use_sliding_window'))] * hf['num_hidden_layers']
        if any(sliding) and not all(sliding):
            raise ValueError(f"{mt} with a sliding window on some layers only (layer_types / "
                             "max_window_layers) is not supported; model.py has one window for all")
        window = window if any(sliding) else 0
    elif mt == 'llama':
        window = 0
    n_head = hf['num_attention_heads']
    return dict(arch='llama', block_size=hf.get('max_position_embeddings', 2048),
                vocab_size=hf['vocab_size'], n_layer=hf['num_hidden_layers'], n_head=n_head,
                n_kv_head=hf.get('num_key_value_heads') or n_head, n_embd=hf['hidden_size'],
                # explicit only where it differs from hidden / heads (Qwen3): 0 is model.py's default
                head_dim=0 if (hf.get('head_dim') or 0) * n_head in (0, hf['hidden_size'])
                else hf['head_dim'],
                ffn_hidden=hf['intermediate_size'], bias=False,
                qkv_bias=mt == 'qwen2', qk_norm=mt == 'qwen3', sliding_window=window,
                rope_scaling=scaling, tie_embeddings=hf.get('tie_word_embeddings', False),
                rope_theta=rope.get('rope_theta', hf.get('rope_theta', 10000.0)),
                norm_eps=hf.get('rms_norm_eps', 1e-6))

def family(c):
    """The Hugging Face model_type that holds a llama-arch config c (GPTConfig's fields)."""
    return 'qwen3' if c['qk_norm'] else 'qwen2' if c['qkv_bias'] else \
        'mistral' if c['sliding_window'] else 'llama'

def config_to_hf(c, eot=None):
    """GPTConfig's fields (a dict, as dataclasses.asdict gives them) -> a Hugging Face config.json;
    ValueError for what Hugging Face's architecture cannot hold."""
    if c['positions'] != ('learned' if c['arch'] == 'gpt2' else 'rope'):
        raise ValueError(f"Hugging Face's {c['arch']} has no positions='{c['positions']}'; export "
                         "a model with its arch's own positions "
                         f"({'learned' if c['arch'] == 'gpt2' else 'rope'})")
    eot = eot if eot is not None and eot < c['vocab_size'] else None
    if c['arch'] == 'gpt2':
        return dict(architectures=['GPT2LMHeadModel'], model_type='gpt2',
                    vocab_size=c['vocab_size'], n_positions=c['block_size'],
                    # llama.cpp's converter reads n_ctx (older GPT-2 configs have both)
                    n_ctx=c['block_size'],
                    n_embd=c['n_embd'], n_layer=c['n_layer'], n_head=c['n_head'],
                    n_inner=c['ffn_hidden'], activation_function='gelu_new',
                    layer_norm_epsilon=c['norm_eps'], tie_word_embeddings=c['tie_embeddings'],
                    resid_pdrop=0.0, embd_pdrop=0.0,
                    attn_pdrop=0.0, bos_token_id=eot, eos_token_id=eot)
    mt = family(c)
    if c['qk_norm'] and c['qkv_bias']:
        raise ValueError("no Hugging Face family has both qk_norm and qkv_bias; export a model "
                         "with one of them (Qwen3's or Qwen2's)")
    rope = {'rope_type': 'default', 'rope_theta': c['rope_theta'], **(c['rope_scaling'] or {})}
    out = dict(architectures=[{'llama': 'Llama', 'mistral': 'Mistral', 'qwen2': 'Qwen2',
                               'qwen3': 'Qwen3'}[mt] + 'ForCausalLM'], model_type=mt,
               vocab_size=c['vocab_size'], hidden_size=c['n_embd'],
               intermediate_size=c['ffn_hidden'], num_hidden_layers=c['n_layer'],
               num_attention_heads=c['n_head'], num_key_value_heads=c['n_kv_head'],
               head_dim=c['head_dim'] or c['n_embd'] // c['n_head'],
               max_position_embeddings=c['block_size'],
               rms_norm_eps=c['norm_eps'], rope_theta=c['rope_theta'], rope_parameters=rope,
               hidden_act='silu', tie_word_embeddings=c['tie_embeddings'], attention_bias=False,
               mlp_bias=False, bos_token_id=eot, eos_token_id=eot)
    if c['rope_scaling']:  # older transformers and llama.cpp's converter read rope_scaling
        out['rope_scaling'] = dict(c['rope_scaling'])
    if mt == 'mistral':
        out['sliding_window'] = c['sliding_window']
    if mt in ('qwen2', 'qwen3'):
        out.update(attention_bias=mt == 'qwen2', use_sliding_window=bool(c['sliding_window']),
                   sliding_window=c['sliding_window'] or None, max_window_layers=0,
                   layer_types=[('sliding' if c['sliding_window'] else 'full') + '_attention'] *
                   c['n_layer'])
    return out

def _hf_names(c):
    """(our name, HF name or list of HF names concatenated along dim 0, transpose?) for every
    tensor."""
    rows = [('transformer.wte.weight', 'transformer.wte.weight' if c['arch'] == 'gpt2'
             else 'model.embed_tokens.weight', False)]
    for i in range(c['n_layer']):
        o = f'transformer.h.{i}.'
        # GPT-2 stores its linears as Conv1D: (in, out), the transpose of nn.Linear
        if c['arch'] == 'gpt2':
            h = f'transformer.h.{i}.'
            for name, t in [('ln_1.weight', 0), ('ln_1.bias', 0), ('attn.c_attn.weight', 1),
                            ('attn.c_attn.bias', 0), ('attn.c_proj.weight', 1),
                            ('attn.c_proj.bias', 0), ('ln_2.weight', 0), ('ln_2.bias', 0),
                            ('mlp.c_fc.weight', 1), ('mlp.c_fc.bias', 0), ('mlp.c_proj.weight', 1),
                            ('mlp.c_proj.bias', 0)]:
                rows.append((o + name, h + name, bool(t)))
        else:
            h = f'model.layers.{i}.'
            rows.append((o + 'ln_1.weight', h + 'input_layernorm.weight', False))
            # q, k, v (and Qwen2's biases) fused into c_attn; Qwen3's per-head norms
            rows += [(o + f'attn.c_attn.{p}', [h + f'self_attn.{x}_proj.{p}' for x in 'qkv'], False)
                     for p in ('weight', 'bias') if p == 'weight' or c.get('qkv_bias')]
            rows += [(o + f'attn.{x}_norm.weight', h + f'self_attn.{x}_norm.weight', False)
                     for x in 'qk' if c.get('qk_norm')]
            rows += [(o + 'attn.c_proj.weight', h + 'self_attn.o_proj.weight', False),
                     (o + 'ln_2.weight', h + 'post_attention_layernorm.weight', False),
                     (o + 'mlp.c_fc.weight',
                      [h + 'mlp.gate_proj.weight', h + 'mlp.up_proj.weight'], False),
                     (o + 'mlp.c_proj.weight', h + 'mlp.down_proj.weight', False)]
    if c['arch'] == 'gpt2':
        rows += [('transformer.wpe.weight', 'transformer.wpe.weight', False),
                 ('transformer.ln_f.weight', 'transformer.ln_f.weight', False),
                 ('transformer.ln_f.bias', 'transformer.ln_f.bias', False)]
    else:
        rows += [('transformer.ln_f.weight', 'model.norm.weight', False)]
    if not c['tie_embeddings']:
        rows.append(('lm_head.weight', 'lm_head.weight', False))
    return rows

def state_dict_from_hf(hf_sd, c, dtype=None):
    """A Hugging Face state dict (any mapping: read_state_dict's reads a tensor when it is asked
    for) -> ours, for the model of config c (GPTConfig's fields), each tensor contiguous and in
    dtype (None: as stored), made before the next is read."""
    # hub 'gpt2' omits the prefix
    bare = c['arch'] == 'gpt2' and not any(k.startswith('transformer.') for k in hf_sd)
    sd = {}
    for ours, theirs, transpose in _hf_names(c):
        names = [n.removeprefix('transformer.') if bare else n
                 for n in (theirs if isinstance(theirs, list) else [theirs])]
        missing = [n for n in names if n not in hf_sd]
        if missing:
            raise ValueError(f"Hugging Face checkpoint lacks tensor(s) {missing}; it does "
                             "not match its config.json")
        parts = [hf_sd[n] for n in names]
        if any(p.dim() != parts[0].dim() or p.shape[1:] != parts[0].shape[1:] for p in parts):
            raise ValueError(f"Hugging Face tensors {names} have shapes "
                             f"{[tuple(p.shape) for p in parts]} that do not fit together")
        w = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        w = w.t() if transpose else w
        sd[ours] = w.to(dtype or w.dtype).contiguous()
        if hasattr(hf_sd, 'release') and sd[ours].data_ptr() != parts[0].data_ptr():
            for n in names:  # copied (fused, transposed or cast): its mapped pages can go
                hf_sd.release(n)
    if c['tie_embeddings']:
        sd['lm_head.weight'] = sd['transformer.wte.weight']
    return sd

def state_dict_to_hf(sd, c):
    """Our state dict -> Hugging Face's names and shapes, for the model of config c (GPTConfig's
    fields)."""
    hf = {}
    for ours, theirs, transpose in _hf_names(c):
        if ours not in sd:  # gpt2 with bias=False: HF GPT-2 always has biases, so write zeros
            if not ours.endswith('.bias'):
                raise KeyError(ours)
            # Linear (out, in) and LayerNorm (C,) alike
            w = torch.zeros(sd[ours[:-4] + 'weight'].shape[0])
        else:
            w = sd[ours].t() if transpose else sd[ours]
        if isinstance(theirs, list):  # split a fused matrix back into HF's separate projections
            if '.c_attn.' in ours:  # weight or (Qwen2) bias
                hs = c['head_dim'] or c['n_embd'] // c['n_head']
                sizes = [c['n_head'] * hs, c['n_kv_head'] * hs, c['n_kv_head'] * hs]
            else:
                sizes = [c['ffn_hidden'], c['ffn_hidden']]
            for n, part in zip(theirs, w.split(sizes, dim=0)):
                hf[n] = part.clone()
        else:
            hf[theirs] = w.clone()
    return hf

def local_dir(name_or_dir):
    """A local HF directory as is; otherwise download a hub snapshot (needs the network)."""
    if os.path.isdir(name_or_dir):
        if not os.path.exists(os.path.join(name_or_dir, 'config.json')):
            raise ValueError(f"{name_or_dir} has no config.json, so it is not a "
                             "Hugging Face model directory")
        return name_or_dir
    return download(name_or_dir)

def download(name):
    """A hub model's snapshot in the standard Hugging Face cache -> its directory: the cached copy
    when there is one (no network), else downloaded with progress bars. Each way it can fail gets
    an error that names the fix: offline (the cache and HF_HUB_OFFLINE), a gated or private model
    (HF_TOKEN), a name the hub does not have."""
    from huggingface_hub import constants, errors, snapshot_download
    patterns = ['*.json', '*.safetensors', '*.txt', '*.model', '*.jinja', 'pytorch_model*.bin']
    try:  # 1) the cache first: a model fetched once opens offline, and no request is made
        return snapshot_download(name, allow_patterns=patterns, local_files_only=True)
    except Exception:  # not cached (or a damaged cache entry): fetch it
        pass
    offline = constants.HF_HUB_OFFLINE
    try:
        if offline:
            raise errors.OfflineModeIsEnabled('HF_HUB_OFFLINE is set')
        return snapshot_download(name, allow_patterns=patterns)
    except errors.GatedRepoError:
        why = (f"'{name}' is a gated model: accept its license on huggingface.co/{name}, then "
               "set HF_TOKEN to an access token (huggingface.co/settings/tokens) or run "
               "`hf auth login`")
    except errors.RepositoryNotFoundError:
        why = (f"the Hugging Face hub has no model '{name}' (or it is private: set HF_TOKEN); "
               "check the name, e.g. Qwen/Qwen2.5-0.5B-Instruct")
    except (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError, OSError) as e:
        why = (f"'{name}' is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
               + ("HF_HUB_OFFLINE=1 forbids the download; unset it, or" if offline else
                  f"could not be downloaded ({type(e).__name__}); go online, or") +
               " copy the model into that cache (or pass a local directory)")
    except Exception as e:  # anything else the hub client raises: its own words, one line
        why = (f"'{name}' could not be fetched from the Hugging Face hub ({type(e).__name__}: "
               f"{str(e).splitlines()[0] if str(e) else ''})")
    raise ValueError(f"{why}. A model source is a local directory (config.json + weights), "
                     "a .gguf file, a run's out_dir, or a hub name.") from None

def cached_models(cache=None):
    """The models in the Hugging Face cache (cache: its directory, default the standard one) that
    look like ones nanolab opens: [{'name': repo id, 'path': its newest snapshot, 'kind': 'hub',
    'size', 'arch', 'block_size', 'tokenizer'}]; for the page's registry and model menu. Read from
    the cache's folders: no network, and a damaged entry is left out."""
    from huggingface_hub import scan_cache_dir
    try:
        repos = scan_cache_dir(cache).repos
    except Exception:  # no cache yet, or one this version cannot read
        return []
    out = []
    for repo in sorted(repos, key=lambda r: r.repo_id):
        revs = sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)
        if repo.repo_type != 'model' or not revs:
            continue
        path = str(revs[0].snapshot_path)
        try:
            with open(os.path.join(path, 'config.json'), encoding='utf-8') as f:
                hf = json.load(f)
            weight_files(path)
        except (OSError, ValueError):
            continue
        if not isinstance(hf, dict) or hf.get('model_type') not in ('gpt2', *LLAMA_FAMILIES):
            continue
        out.append({'name': repo.repo_id, 'path': path, 'kind': 'hub', 'size': revs[0].size_on_disk,
                    'arch': hf.get('model_type'), 'n_params': None,
                    'block_size': hf.get('max_position_embeddings') or hf.get('n_positions'),
                    'tokenizer': 'hf' if os.path.exists(os.path.join(path, 'tokenizer.json'))
                    else None, 'checkpoints': [], 'exports': [], 'evals': {}})
    return out

def read_config(path):
    """config.json of a local Hugging Face directory -> GPTConfig's arguments, or a ValueError that
    names what is missing or wrong."""
    name = os.path.join(path, 'config.json')
    try:
        with open(name, encoding='utf-8') as f:
            raw = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise ValueError(f"{name} is not readable JSON ({type(e).__name__}: {str(e)[:120]}); "
                         "replace it with the model's own config.json") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{name} is not a JSON object of a model's settings")
    try:
        return config_from_hf(raw)
    except KeyError as e:
        raise ValueError(f"{name} has no {e.args[0]!r}, which a {raw.get('model_type')} "
                         "model's config.json holds") from None
    except (TypeError, AttributeError, ZeroDivisionError) as e:
        raise ValueError(f"{name} has a setting of the wrong type or value ({e}); replace it "
                         "with the model's own config.json") from None

def stored_dtype(path):
    """The dtype a local Hugging Face directory's config.json says its weights are stored in
    ('dtype', or the older 'torch_dtype'), or None when it says none we know."""
    try:
        with open(os.path.join(path, 'config.json'), encoding='utf-8') as f:
            raw = json.load(f)
        name = raw.get('dtype') or raw.get('torch_dtype')
    except (OSError, ValueError, AttributeError):
        return None
    return {'float32': torch.float32, 'bfloat16': torch.bfloat16,
            'float16': torch.float16}.get(name) if isinstance(name, str) else None

def weight_files(path):
    """The weights of a local Hugging Face directory: the shards its model.safetensors.index.json
    lists (every one must be there), else its *.safetensors files, else its pytorch_model*.bin
    files."""
    index = os.path.join(path, 'model.safetensors.index.json')
    if os.path.isfile(index):
        try:
            with open(index, encoding='utf-8') as f:
                shards = sorted(set(json.load(f)['weight_map'].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is not a readable shard index ({type(e).__name__}); "
                             "download the model again") from None
        files = [os.path.join(path, s) for s in shards]
        if any(os.path.basename(s) != s for s in shards) or not files:
            raise ValueError(f"{index} names shards outside its directory; download the model "
                             "again")
        missing = [os.path.basename(f) for f in files if not os.path.isfile(f)]
        if missing:
            raise ValueError(f"{path} lacks the weight shards {missing[:4]} that its index lists; "
                             "the download was cut short: download the model again")
        return files
    files = sorted(glob.glob(os.path.join(path, '*.safetensors'))) or \
        sorted(glob.glob(os.path.join(path, 'pytorch_model*.bin')))
    if not files:
        raise ValueError(f"{path} has a config.json but no *.safetensors or "
                         "pytorch_model*.bin weights")
    return files

def read_state_dict(path, c, dtype=None, check=None):
    """Our state dict for config c (GPTConfig's arguments) from a local Hugging Face directory's
    weights, in dtype: safetensors are memory-mapped (mapped.py), so a tensor kept as stored is a view
    of its file and the others are made one at a time (the peak is about the model); .bin files are
    read whole (torch.load(weights_only=True): no code runs). check(number of tensors) runs before
    the first tensor is read (checkpoint.check_size)."""
    files = weight_files(path)
    try:
        if files[0].endswith('.safetensors'):
            hf_sd = MappedTensors(files)
        else:
            hf_sd = {}
            for f in files:
                part = torch.load(f, map_location='cpu', weights_only=True)
                if not isinstance(part, dict):
                    raise ValueError(f"{f} holds no dict of tensors")
                hf_sd.update(part)
        if check:
            check(len(hf_sd))
        return state_dict_from_hf(hf_sd, c, dtype)
    except ValueError:
        raise
    except Exception as e:  # a truncated or crafted file: safetensors' or pickle's own errors
        raise ValueError(f"the weights in {path} are not readable ({type(e).__name__}: "
                         f"{str(e)[:160]}); download them again") from None

def read_pretrained(name_or_dir, dtype=None):
    """A Hugging Face directory of a GPT-2 or Llama model (config.json + safetensors/bin), or a hub
    name such as 'gpt2' when online -> (GPTConfig's arguments, the state dict under our names, in
    dtype)."""
    path = local_dir(name_or_dir)
    config = read_config(path)
    return config, read_state_dict(path, config, dtype)

def write_pretrained(out_dir, config, state_dict, tokenizer=None):
    """Write a directory that transformers.AutoModelForCausalLM.from_pretrained loads with the same
    logits: config (GPTConfig's fields) as config.json, the weights as model.safetensors, and
    tokenizer files for BPE tokenizers (so AutoTokenizer works too). Refused before anything is
    written: what Hugging Face's architecture cannot hold, and a tokenizer with ids beyond the
    embedding."""
    from safetensors.torch import save_file
    hf_config = config_to_hf(config, eot=getattr(tokenizer, 'eot', None))
    check_fits(tokenizer, config['vocab_size'])
    if hf_config['model_type'] == 'qwen2' and tokenizer is not None and tokenizer.kind != 'hf':
        raise ValueError("a model with qkv_bias exports as Hugging Face's qwen2, whose directories "
                         "transformers 5 always opens with Qwen2Tokenizer (digits split one by "
                         f"one), which would not encode like this model's {tokenizer.kind} "
                         "tokenizer; export it with --format=gguf, or train with qkv_bias=False")
    os.makedirs(out_dir, exist_ok=True)
    hf_config['torch_dtype'] = hf_config['dtype'] = \
        str(next(iter(state_dict.values())).dtype).replace('torch.', '')
    sd = {k: v.contiguous() for k, v in state_dict_to_hf(state_dict, config).items()}
    with replacing(os.path.join(out_dir, 'model.safetensors')) as tmp:
        save_file(sd, tmp, metadata={'format': 'pt'})
    write_json(os.path.join(out_dir, 'config.json'), hf_config)
    if tokenizer is not None:
        try:
            save_tokenizer_files(tokenizer, out_dir)
        except ValueError as e:  # the weights are still good: say so, and why no tokenizer
            if tokenizer.kind != 'char':
                raise
            print(f'note: {out_dir} gets no tokenizer files: {e}', file=sys.stderr)

# -----------------------------------------------------------------------------
# 2) tokenizers

def byte_level_vocab(tok, unlisted_merges=False):
    """tok as a GPT-2-style byte-level BPE: (text_of {id: token text}, merges [(text, text)] in
    rank order, specials {text: id}), each token's bytes spelled in bytes_to_unicode chars (space
    -> 'Ġ'), as vocab.json + merges.txt and a GGUF file's token list hold them. A char vocabulary
    is such a BPE: its one-byte chars need no merges (the byte-level pre-tokenizer makes each its
    own token, as CharTokenizer does); a char of several bytes is a chain of merges through
    prefixes that have no id, which only a reader that allows unlisted merges (llama.cpp) takes:
    unlisted_merges=True. Hugging Face's BPE requires every merge's parts in the vocabulary."""
    b2u = bytes_to_unicode()
    if tok.kind == 'char':
        wide = [c for c in tok.chars if len(c.encode('utf-8')) > 1]
        if wide and not unlisted_merges:
            raise ValueError("this char vocabulary has chars of more than one byte "
                             f"({''.join(wide[:10])!r}), which a Hugging Face byte-level "
                             "vocabulary cannot hold without ids for their bytes; export "
                             "--format=gguf (llama.cpp takes it), rebuild the vocabulary from "
                             "ASCII text, or train with a BPE (BPETokenizer.train or 'gpt2')")
        spell = lambda bs: ''.join(b2u[b] for b in bs)  # noqa: E731
        merges = {}  # (prefix, next byte) -> None, in order: a char's bytes join left to right
        for c in wide:
            bs = c.encode('utf-8')
            merges.update({(spell(bs[:k]), spell(bs[k:k + 1])): None for k in range(1, len(bs))})
        return {i: spell(c.encode('utf-8')) for i, c in enumerate(tok.chars)}, list(merges), {}
    # a tokenizer.json: only the plain GPT-2 byte-level BPE
    if tok.kind == 'hf' and tok.tk is not None:
        j = json.loads(tok.files['tokenizer.json'])
        pre = j.get('pre_tokenizer') or {}
        if j['model'].get('type') != 'BPE' or pre.get('type') != 'ByteLevel' \
                or not pre.get('use_regex', True):
            raise ValueError(f"{tok.name}'s tokenizer.json is not GPT-2's byte-level BPE (model "
                             f"{j['model'].get('type')}, pre-tokenizer {pre.get('type')}); export "
                             "the model with --format=hf and convert that with llama.cpp's "
                             "convert_hf_to_gguf.py, which knows it")
        text_of = {i: t for t, i in tok.tk.get_vocab(with_added_tokens=False).items()}
        merges = [tuple(m.split(' ', 1)) if isinstance(m, str) else tuple(m)
                  for m in j['model']['merges']]
        return text_of, merges, dict(tok.special_tokens)
    if tok.kind == 'hf':
        bpe = tok.bpe  # vocab.json + merges.txt: GPT-2's own format
    elif tok.kind == 'tiktoken' and tok.name in GPT2_REGEX_ENCODINGS:
        # tiktoken's pattern is a rewrite of GPT-2's regex
        bpe = BPETokenizer.from_tiktoken(tok.enc)
    elif tok.kind == 'bpe' and tok.pattern == GPT2_SPLIT_PATTERN:
        bpe = tok
    else:
        raise ValueError(f"{tok!r} splits text with a regex other than GPT-2's, which HF's "
                         "ByteLevel pre-tokenizer and llama.cpp's 'gpt-2' one don't "
                         "implement; export our BPE, a char vocabulary, or a tiktoken "
                         f"encoding in {GPT2_REGEX_ENCODINGS}")
    text_of = {i: ''.join(b2u[b] for b in bs) for i, bs in bpe.vocab.items()}
    return text_of, [(text_of[a], text_of[b]) for a, b in bpe.merges], dict(bpe.special_tokens)

def save_tokenizer_files(tok, out_dir):
    """Write tok as a Hugging Face tokenizer directory: vocab.json + merges.txt (GPT-2's format),
    tokenizer.json (the `tokenizers` library's), tokenizer_config.json (with the chat template as
    Jinja) and special_tokens_map.json. transformers.AutoTokenizer.from_pretrained(out_dir) then
    encodes exactly like tok.encode (tests/test_tokenizer.py checks it)."""
    os.makedirs(out_dir, exist_ok=True)
    if tok.kind == 'hf':  # HF files already: write them back unchanged
        for name, text in tok.files.items():
            write_text(os.path.join(out_dir, name), text)
        return
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTok
    if tok.kind == 'char' and any(len(c.encode('utf-8')) > 1 for c in tok.chars):
        # 1') a char vocabulary with chars of several bytes, whose bytes have no ids of their own:
        #     not byte-level but one token per char, a WordLevel model over a split into chars
        hf, specials = HFTok(models.WordLevel(vocab={c: i for i, c in enumerate(tok.chars)},
                                              unk_token='[UNK]')), {}
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r'[\s\S]'), behavior='isolated')
        hf.decoder = decoders.Fuse()  # chars join as they are
    else:
        # 1) GPT-2's files: each token's bytes written as bytes_to_unicode chars
        text_of, merges, specials = byte_level_vocab(tok)
        vocab = {s: i for i, s in text_of.items()}
        if len(vocab) != len(text_of):
            raise ValueError('two token ids share the same bytes, which vocab.json cannot '
                             'represent')
        vocab.update(specials)  # as GPT-2's vocab.json lists <|endoftext|>
        write_text(os.path.join(out_dir, 'vocab.json'), json.dumps(vocab, ensure_ascii=False))
        write_text(os.path.join(out_dir, 'merges.txt'),
                   '#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in merges))
        # 2) tokenizer.json: BPE model + ByteLevel pre-tokenizer (its regex is GPT2_SPLIT_PATTERN)
        hf = HFTok(models.BPE(vocab=vocab, merges=merges))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        # ids from vocab
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    # refused rather than written if it would lose text: every char of a char vocabulary, or a
    # sample, must encode to our ids and decode back
    sample = ''.join(tok.chars) if tok.kind == 'char' else \
        'Hello, world!\n  The 2 quick brown foxes, naïve café, 日本語 😀\t<end>'
    if hf.encode(sample).ids != tok.encode(sample) or hf.decode(tok.encode(sample)) != sample:
        raise ValueError(f"{tok!r} has no Hugging Face tokenizer that keeps its text; the model's "
                         "weights export, its tokenizer does not")
    write_text(os.path.join(out_dir, 'tokenizer.json'), hf.to_str())
    # 3) configs: GPT-2's convention is one token for bos, eos and unk; no clean-up, so decode
    #    round-trips
    eot = {'bos_token': EOT, 'eos_token': EOT, 'unk_token': EOT} if EOT in specials else {}
    config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'add_prefix_space': False,
              'clean_up_tokenization_spaces': False, 'chat_template': tok.chat_jinja(), **eot}
    write_text(os.path.join(out_dir, 'tokenizer_config.json'), json.dumps(config, indent=2))
    write_text(os.path.join(out_dir, 'special_tokens_map.json'), json.dumps(eot, indent=2))
