"""
LoRA (Hu et al. 2021) through peft, the same way for every trainer (finetune.py, dpo.py,
reward.py): inject the adapter, find its layers, keep its weights for resume, fold it into plain
weights for the checkpoint, and switch it off for a reference (dpo.py). peft is imported only when
a model has LoRA.

    # only A and B train
    model = add_lora(model, r=8, alpha=16.0, dropout=0.0, targets='c_attn,c_proj,c_fc')
    sd = merged_state_dict(model)  # W + (alpha/r) B A under the plain model's names: any loader

QLoRA (Dettmers et al. 2023): add_lora(..., quantize='nf4') first stores every Linear weight of the
transformer blocks as a frozen 4-bit NormalFloat bitsandbytes Linear4bit (0.5 bytes a weight, plus
~0.13 bits of scales), which peft then wraps in its 4-bit LoRA layer; A and B stay in full precision
and train as before. The embeddings, norms and output head keep their dtype (as transformers' 4-bit
loading does: the head is sensitive, and a tied head is the embedding). merged_state_dict writes
the dequantized base with the update folded in, in the base's own dtype, so every loader reads a
QLoRA checkpoint as a plain model; it is the model that trained (dequant(nf4(W)) + (alpha/r) B A),
not W + (alpha/r) B A. bitsandbytes >= 0.46 runs 4-bit on CPU as well as CUDA (measured with
0.50.2: forward and backward equal the dequantized weight's matmul).
"""
import logging
from contextlib import contextmanager

import torch

QUANTIZE = ('', 'nf4')  # add_lora's quantize: '' = the base as it is, 'nf4' = QLoRA's 4-bit base
# bitsandbytes (which peft imports whenever it is installed) warns at import that an optional CPU
# inference kernel (the `kernels` package, fetched from the Hugging Face Hub) is missing; training
# never uses that kernel, so the line would only alarm every LoRA run
logging.getLogger('bitsandbytes.backends.cpu.ops').setLevel(logging.ERROR)

def add_lora(model, r, alpha, dropout, targets, quantize='', device='cpu'):
    """Inject peft LoRA layers (W + (alpha/r) B A) into the Linear layers named in `targets`, a
    comma list of module names or name suffixes (c_attn, attn.c_proj, lm_head); every other weight
    is frozen. ValueError, naming the model's Linear modules, if a target matches none; and for
    lm_head when it shares the embedding's weight (the update could not be merged).
    quantize='nf4': QLoRA, the blocks' Linear weights first quantized on `device` (quantize_base)."""
    from peft import LoraConfig, inject_adapter_in_model
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    names = [t.strip() for t in targets.split(',') if t.strip()]
    missing = [t for t in names if not any(n == t or n.endswith('.' + t) for n in linear)]
    if missing or not names:
        raise ValueError(f"lora_targets {missing or targets!r} name no Linear module of this "
                         "model; its Linear modules are "
                         f"{sorted({n.rsplit('.', 1)[-1] for n in linear})} (full names like "
                         f"{linear[0]}): e.g. --lora_targets=c_attn,c_proj,c_fc")
    if 'lm_head' in names and model.config.tie_embeddings:
        raise ValueError('lm_head shares its weight with the token embedding in this model '
                         '(tie_embeddings), so a LoRA on it could not be merged; leave '
                         'lm_head out of lora_targets')
    for p in model.parameters():
        p.requires_grad_(False)
    if quantize:
        quantize_base(model, quantize, device)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names)
    model = inject_adapter_in_model(cfg, model)
    # peft makes A and B in the base layer's dtype; on a bf16 base they still train in fp32 (AdamW's
    # small updates vanish in bf16's 8-bit mantissa), and peft casts their input to match
    for n, p in model.named_parameters():
        if 'lora_' in n:
            p.data = p.data.float()
    return model

def quantize_base(model, kind, device='cpu'):
    """Replace every Linear of model.transformer.h by a frozen bitsandbytes Linear4bit holding its
    weight in `kind` ('nf4': blocks of 64 weights, their absmax scales quantized again), quantized
    on `device`, one layer at a time (the full-precision weight is freed as it goes); it computes in
    its input's dtype (bitsandbytes' rule for fp32 and bf16). ValueError naming the fix for an unknown
    kind, a device bitsandbytes can't run 4-bit on, or no (or too old a) bitsandbytes."""
    if kind not in QUANTIZE[1:]:
        raise ValueError(f"quantize_base={kind!r} is not one of {', '.join(map(repr, QUANTIZE))}")
    if device.split(':')[0] not in ('cpu', 'cuda'):
        raise ValueError(f"4-bit bases (bitsandbytes) run on CPU and CUDA, not {device}; give "
                         "--device=cpu or a CUDA GPU, or leave quantize_base off")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ValueError(f"quantize_base={kind!r} needs bitsandbytes, which runs 4-bit on CPU "
                         "from 0.46 and on CUDA GPUs: pip install bitsandbytes==0.50.2") from None
    if tuple(int(v) for v in bnb.__version__.split('.')[:2]) < (0, 46):
        raise ValueError(f"bitsandbytes {bnb.__version__} has no CPU backend for 4-bit; "
                         "pip install bitsandbytes==0.50.2")
    for block in model.transformer.h:
        for name, lin in list(block.named_modules()):
            if type(lin) is not torch.nn.Linear:
                continue
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  quant_type=kind, device='meta')
            q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type=kind,
                                         module=q)
            if lin.bias is not None:
                q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
            # subtle: on CPUs with AVX512-BF16, bitsandbytes repacks the weight for its inference
            # kernel at the first no-grad forward in eval(); a later training step then computes
            # through that kernel with no autograd formula (a wrong gradient, torch warns), and
            # widths not divisible by 32 fail. One layout: the dequantize-and-matmul path always
            q.support_avx512bf16_for_cpu = False
            parent, _, leaf = name.rpartition('.')
            setattr(block.get_submodule(parent) if parent else block, leaf, q.to(device))
    # peft's signal (transformers sets it on 4-bit models) to wrap Linear4bit in its 4-bit layer
    model.is_loaded_in_4bit = True
    return model

def quantized_layers(model):
    """[(name, bitsandbytes Linear4bit)] of a model; [] if none (bitsandbytes not imported)."""
    if not getattr(model, 'is_loaded_in_4bit', False):
        return []
    import bitsandbytes as bnb
    return [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]

def n_weights(model):
    """The number of weights in a model's parameters; a 4-bit one holds two per stored byte."""
    return sum(p.quant_state.shape.numel() if getattr(p, 'quant_state', None) is not None
               else p.numel() for p in model.parameters())

def lora_layers(model):
    """[(name, peft LoraLayer)] of a model; [] without LoRA (peft is then not even imported)."""
    if not any('.lora_' in n for n, _ in model.named_parameters()):
        return []
    from peft.tuners.lora import LoraLayer
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]

def lora_state(model):
    """The LoRA weights alone (A and B of every layer), what a checkpoint needs to resume them."""
    return {k: v for k, v in model.state_dict().items() if '.lora_' in k}

def merged_state_dict(model):
    """The model's state dict with each LoRA update folded into its weight, W + (alpha/r) B A,
    under the plain model's names; without LoRA, its state dict. A 4-bit base (QLoRA) is written
    dequantized, in the dtype it was quantized from, without bitsandbytes' scale entries."""
    layers, quantized = lora_layers(model), quantized_layers(model)
    if not layers and not quantized:
        return model.state_dict()
    sd = {k.replace('.base_layer.', '.'): v for k, v in model.state_dict().items()
          if '.lora_' not in k}
    if quantized:
        import bitsandbytes as bnb
    for name, m in quantized:
        name = name.replace('.base_layer', '')
        for k in [k for k in sd if k.startswith(name + '.weight.')]:  # absmax, quant_map, ...
            del sd[k]
        sd[name + '.weight'] = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
    for name, m in layers:
        sd[name + '.weight'] = (sd[name + '.weight'] + m.get_delta_weight('default')).detach()
    return sd

@contextmanager
def lora_disabled(model):
    """The model as it was before add_lora, for the block's duration: every LoRA update off
    (dpo.py's reference)."""
    layers = [m for _, m in lora_layers(model)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)
