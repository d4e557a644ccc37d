"""
LoRA (Hu et al. 2021) through peft, the same way for every trainer (finetune.py, dpo.py,
reward.py): inject the adapter, find its layers, keep its weights for resume, fold it into plain
weights for the checkpoint, and switch it off for a reference (dpo.py). peft is imported only when
a model has LoRA.

    # only A and B train
    model = add_lora(model, r=8, alpha=16.0, dropout=0.0, targets='c_attn,c_proj,c_fc')
    sd = merged_state_dict(model)  # W + (alpha/r) B A under the plain model's names: any loader
"""
from contextlib import contextmanager

import torch

def add_lora(model, r, alpha, dropout, targets):
    """Inject peft LoRA layers (W + (alpha/r) B A) into the Linear layers named in `targets`, a
    comma list of module names or name suffixes (c_attn, attn.c_proj, lm_head); every other weight
    is frozen. ValueError, naming the model's Linear modules, if a target matches none; and for
    lm_head when it shares the embedding's weight (the update could not be merged)."""
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
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names)
    return inject_adapter_in_model(cfg, model)

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
    under the plain model's names; without LoRA, its state dict."""
    layers = lora_layers(model)
    if not layers:
        return model.state_dict()
    sd = {k.replace('.base_layer.', '.'): v for k, v in model.state_dict().items()
          if '.lora_' not in k}
    for name, m in layers:
        sd[name + '.weight'] = (m.base_layer.weight + m.get_delta_weight('default')).detach()
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
