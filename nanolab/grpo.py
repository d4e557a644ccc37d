"""
GRPO's pieces (Shao et al. 2024), as rl.py uses them: group-relative advantages, the loss (policy
gradient plus a KL penalty to the reference), and the exact KL of an evaluation. rl.py's docstring
has the math.

    adv = group_advantages(rewards, group_size=8)         # (N,), per prompt's group of answers
    loss, stats = grpo_loss(policy(x)[0], ref(x)[0], y, adv, kl_coef=0.05)
"""
import torch
import torch.nn.functional as F

from nanolab.preferences import token_logps


def group_advantages(rewards, group_size):
    """(N,) rewards, N = prompts x group_size in prompt order -> (N,) advantages: (r - group mean)
    / (group std + 1e-4), the population std; a group whose rewards are all equal gets 0 (nothing
    to learn from it)."""
    r = torch.as_tensor(rewards, dtype=torch.float32).view(-1, group_size)
    a = (r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + 1e-4)
    return a.flatten()

def grpo_loss(logits, ref_logits, y, advantages, kl_coef):
    """The loss of the module docstring over a batch of sampled answers (x, y from
    preferences.collate_responses) -> (loss, stats: per-row kl (mean k3), entropy (mean over
    tokens) and length)."""
    mask = (y != -1).float()
    n = mask.sum(1).clamp_min(1)
    logp, ref = token_logps(logits, y), token_logps(ref_logits, y).detach()
    d = (ref - logp) * mask
    k3 = (torch.exp(d) - d - 1) * mask
    pg = -(advantages * (logp * mask).sum(1) / n)
    kl = k3.sum(1) / n
    with torch.no_grad():
        lp = F.log_softmax(logits.float(), -1)
        entropy = (-(lp.exp() * lp).sum(-1) * mask).sum(1) / n
    return (pg + kl_coef * kl).mean(), {'kl': kl.detach(), 'entropy': entropy, 'length': n}

@torch.no_grad()
def exact_kl(model, ref, x, y):
    """Mean over the answers' tokens of KL(pi || ref) between the full next-token distributions:
    the eval's kl."""
    mask = y != -1
    lp, lq = F.log_softmax(model(x)[0].float(), -1), F.log_softmax(ref(x)[0].float(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return kl[mask].mean().item() if mask.any() else 0.0
