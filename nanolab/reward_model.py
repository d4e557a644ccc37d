"""
The reward model: a GPT's transformer with a scalar head on the last token of prompt + response,
trained by reward.py with the Bradley-Terry loss (Stiennon et al. 2020, Ouyang et al. 2022); rl.py
and the arena's judge score answers with it.

    rm, tok = load_reward_model('out-reward-tasks')
    rm.score(tok, prompt_messages, answers)   # -> one reward per answer

r(x, y) = w . h_T + b, where h_T is the final norm's output at the last token of the chat
template's prompt and answer (its end-of-turn token: the whole answer is in view) and the head
starts at zero, so every reward starts at 0, the loss at exactly log 2 and the accuracy at 0.5
(ties count half).
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanolab.checkpoint import load_checkpoint, load_model
from nanolab.preferences import encode_responses


class RewardModel(nn.Module):
    """A GPT's final hidden state at one position of each row, through a scalar head: (B, T) ids ->
    (B,) rewards."""
    def __init__(self, gpt):
        super().__init__()
        self.gpt, self.head = gpt, nn.Linear(gpt.config.n_embd, 1)
        # every reward starts at 0: the loss at log 2, no pair preferred
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x, last):
        """x (B, T) right-padded ids, last (B,) the index of each row's last real token -> rewards
        (B,)."""
        h = self.gpt.hidden_states(x)  # (B, T, C), after the final norm
        return self.head(h[torch.arange(x.size(0), device=x.device), last]).squeeze(-1).float()

    @torch.no_grad()
    def score(self, tok, prompt, answers):
        """Rewards of answers (strings) to one prompt (a list of chat messages), each rendered and
        cut to the model's context as in training (preferences.encode_responses: a long prompt
        loses its oldest tokens, a long answer its last)."""
        p, responses, _ = encode_responses(tok, prompt, answers, self.gpt.config.block_size)
        x, last = pad([p + r for r in responses], next(self.parameters()).device)
        return self(x, last).tolist()

def pad(seqs, device='cpu'):
    """Token lists -> (x (N, T) right-padded with 0, last (N,) the index of each one's last
    token)."""
    T = max(map(len, seqs))
    x = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.tensor(s)
    return x.to(device), torch.tensor([len(s) - 1 for s in seqs], device=device)

def collate(pairs, device='cpu'):
    """[(prompt, chosen, rejected) ids] -> x, last over 2B rows: the chosen sequences, then the
    rejected ones."""
    return pad([p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs], device)

def bt_loss(r_chosen, r_rejected):
    """Per-pair Bradley-Terry losses -log sigmoid(r_w - r_l) (B,) and per-pair statistics."""
    d = r_chosen - r_rejected
    return -F.logsigmoid(d), {'accuracy': (d > 0).float() + 0.5 * (d == 0).float(),
                              'margin': d.detach(), 'reward/chosen': r_chosen.detach(),
                              'reward/rejected': r_rejected.detach()}

def load_reward_model(source, device='cpu'):
    """(RewardModel, tokenizer) of a reward.py run (its out_dir or ckpt.pt)."""
    path = source if source.endswith('.pt') else os.path.join(source, 'ckpt.pt')
    ckpt = load_checkpoint(path)
    if 'reward_head' not in ckpt:
        raise ValueError(f'{path} is not a reward model (no '
                         'reward_head); train one with reward.py')
    gpt, tok, _ = load_model(source, device)
    rm = RewardModel(gpt)
    rm.head.load_state_dict(ckpt['reward_head'])
    return rm.to(device).eval(), tok
