"""
Reading a model's insides from one traced forward pass (GPT.trace in model.py): what the page's
inspect view draws.

    logits, trace = model.trace(idx)
    lens = logit_lens(model, trace)       # (n_layer, B, T, vocab) log-probabilities
    flow = activation_flow(trace)         # norms and attention entropies per layer and position
"""
import torch
from torch.nn import functional as F


@torch.no_grad()
def logit_lens(model, trace):
    """The logit lens (nostalgebraist 2020): each block's output read through the final norm and
    the LM head, as if the model ended there -> log-probabilities (n_layer, B, T, vocab); the last
    is the model's own."""
    resid = torch.stack(trace['resid'])  # (L, B, T, C)
    return F.log_softmax(model.lm_head(model.transformer.ln_f(resid)).float(), dim=-1)


@torch.no_grad()
def activation_flow(trace):
    """How information moves up the stack, per layer and position: {'resid', 'attn', 'mlp': (L, B,
    T) L2 norms of the residual stream after each block and of what its attention and MLP add;
    'entropy': (L, B, nh, T) the entropy in nats of each head's attention distribution at each
    position; 'embed': (B, T) the input's norm}."""
    norm = lambda key: torch.stack(trace[key]).float().norm(dim=-1)  # noqa: E731
    att = torch.stack(trace['att']).float()  # (L, B, nh, T, T)
    entropy = -(att * att.clamp_min(1e-30).log()).sum(-1)  # masked weights: 0, add nothing
    return {'embed': trace['embed'].float().norm(dim=-1), 'resid': norm('resid'),
            'attn': norm('attn_out'), 'mlp': norm('mlp_out'), 'entropy': entropy}
