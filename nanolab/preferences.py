"""
Preference pairs ({prompt, chosen, rejected}) as the preference trainers use them: where the files
are, how a pair becomes token ids (the chat template, truncated to fit), batches of responses with
their log-probabilities, the order pairs are read in, and the DPO / IPO loss. dpo.py trains with
them; reward.py reads the same pairs; rl.py scores sampled answers with the same response
log-probabilities.

    pairs, counts = load_pairs('data/tasks/pref_train.jsonl', tok, max_len=65)
    x, y = collate(pairs[:16])            # (32, T): the chosen responses, then the rejected ones
    logps = response_logps(model, x, y)   # (32,): each response's summed log-probability
    losses, stats = preference_loss(logps[:16], logps[16:], ref[:16], ref[16:], beta=0.1)

The rules (the module docstring of dpo.py has the math): prompt = render_chat(prompt messages,
add_generation_prompt=True); response = the tokens that render_chat adds for the assistant's answer
(its content and end-of-turn token), exactly as SFT saw them. Truncation to max_len tokens: 1) the
prompt loses tokens from the left (its oldest turns) until it fits next to the longer response, but
keeps at least half the budget; 2) each response is cut from the right to what is left. Pairs whose
two responses become identical are skipped and counted; so are the pairs formats.py skips.
"""
import functools
import os
from collections import Counter

import torch
import torch.nn.functional as F

from nanolab import datasets
from nanolab.formats import read_preferences


def encode_responses(tok, prompt, answers, max_len):
    """(prompt ids, [each answer's response ids], truncated) for answers (strings) to one prompt
    (chat messages), cut to max_len tokens by the rule in the module docstring (the longest answer
    sets the prompt's budget)."""
    p = tok.render_chat(prompt, add_generation_prompt=True)[0]
    responses = []
    for answer in answers:
        ids = tok.render_chat(prompt + [{'role': 'assistant', 'content': answer}])[0]
        # the template must render a prompt the same way with or without its answer
        if ids[:len(p)] != p:
            raise ValueError(f'the chat template renders the prompt {prompt!r:.80} '
                             'differently before an answer')
        responses.append(ids[len(p):])
    longest = max(map(len, responses))
    if len(p) + longest <= max_len:
        return p, responses, False
    p = p[-max(max_len - longest, max_len // 2):]  # 1) the prompt, from the left
    return p, [r[:max_len - len(p)] for r in responses], True  # 2) the responses, from the right

def encode_pair(tok, row, max_len):
    """(prompt ids, chosen ids, rejected ids, truncated) for one {prompt, chosen, rejected} row,
    cut to max_len tokens (encode_responses)."""
    p, (c, r), cut = encode_responses(tok, row['prompt'], [row['chosen'], row['rejected']],
                                      max_len)
    return p, c, r, cut

def collate_responses(seqs, device='cpu'):
    """[(prompt ids, response ids)] -> inputs x and targets y, both (N, T), right-padded. y is the
    next token at response positions and -1 (ignored) at prompt and padding positions, so only the
    response's log-probabilities count (dpo.py's pairs, rl.py's samples)."""
    T = max(len(p) + len(s) for p, s in seqs) - 1
    x = torch.zeros(len(seqs), T, dtype=torch.long)
    y = torch.full((len(seqs), T), -1, dtype=torch.long)
    for i, (p, s) in enumerate(seqs):
        ids = torch.tensor(p + s)
        x[i, :len(ids) - 1] = ids[:-1]
        # position t predicts token t+1: the response's tokens
        y[i, len(p) - 1:len(ids) - 1] = ids[len(p):]
    return x.to(device), y.to(device)

def collate(pairs, device='cpu'):
    """[(prompt, chosen, rejected) ids] -> x and y (2B, T) of collate_responses: rows 0..B-1 the
    chosen sequences, rows B..2B-1 the rejected ones."""
    return collate_responses([(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs], device)

def token_logps(logits, y):
    """log p(y_t | x_<=t) at every position, (N, T): exactly 0 where y == -1 (prompt, padding)."""
    logp = -F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1,
                            reduction='none')
    return logp.view(y.shape)

def response_logps(model, x, y):
    """Sum of log p(y_t | x_<=t) over the positions where y != -1: one log-probability per row,
    (2B,)."""
    return token_logps(model(x)[0], y).sum(1)  # ignored positions contribute exactly 0

LOSS_TYPES = ('sigmoid', 'ipo', 'ipo_mean')

def preference_loss(pi_c, pi_r, ref_c, ref_r, beta, loss_type='sigmoid', label_smoothing=0.0,
                    n_c=None, n_r=None):
    """Per-pair losses (B,) and per-pair statistics (trl's names, plus kl) from summed log-probs
    (B,) each; n_c, n_r: the responses' token counts (B,), which 'ipo_mean' needs.
    Against trl 1.16 on the same log-probs: 'sigmoid' is the same at label_smoothing=0; above it
    ours is conservative DPO (Mitchell 2023: the label flipped with probability label_smoothing),
    where trl's 'sigmoid' ignores label_smoothing (its 'robust' loss rescales it by 1/(1-2e)).
    'ipo' regresses the summed log-ratios, as the IPO paper writes it; 'ipo_mean' averages them
    per response token first, as trl's 'ipo' does (which the paper's reported results used, by
    trl's account): beta then means the same whatever the responses' lengths."""
    # how much more the policy prefers y_w over y_l than the reference does
    h = (pi_c - ref_c) - (pi_r - ref_r)
    if loss_type == 'sigmoid':
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - \
            label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type in ('ipo', 'ipo_mean'):
        if loss_type == 'ipo_mean':
            if n_c is None or n_r is None:
                raise ValueError("loss_type='ipo_mean' needs the responses' token counts n_c, n_r")
            h = (pi_c - ref_c) / n_c.clamp(min=1) - (pi_r - ref_r) / n_r.clamp(min=1)
        # regress h onto the margin 1/(2 beta) rather than push it to infinity
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type '{loss_type}'; use one of {', '.join(LOSS_TYPES)}")
    # DPO's implicit rewards
    rc, rr = beta * (pi_c - ref_c).detach(), beta * (pi_r - ref_r).detach()
    stats = {'rewards/chosen': rc, 'rewards/rejected': rr,
             'rewards/accuracies': (rc > rr).float() + 0.5 * (rc == rr).float(),
             'rewards/margins': rc - rr, 'logps/chosen': pi_c.detach(),
             'logps/rejected': pi_r.detach(), 'kl': (pi_c - ref_c).detach()}
    return losses, stats

def load_pairs(path, tok, max_len):
    """Encoded pairs of a preference file. Skipped, counted and reported: what formats.py skips (an
    empty answer, chosen == rejected, hh-rlhf prompts that differ), pairs that truncation makes
    identical, and pairs with text the tokenizer cannot encode (a char-level vocabulary meeting a
    new character)."""
    counts, pairs, truncated, why = Counter(), [], 0, ''
    for row in read_preferences(path, counts):
        try:
            p, c, r, cut = encode_pair(tok, row, max_len)
        except ValueError as e:
            counts['skipped_unencodable'] += 1
            why = why or f' (first: {e})'
            continue
        if c == r:
            counts['skipped_identical_after_truncation'] += 1
            continue
        pairs.append((p, c, r))
        truncated += cut
    print(f'{path}: {len(pairs)} pairs, {truncated} truncated to {max_len} tokens' +
          (f', skipped {dict(counts)}{why}' if counts else ''))
    return pairs, counts

def preference_files(data_dir, dataset, train_file='', val_file=''):
    """[train path, val path] of preference pairs: train_file/val_file if they are paths (with a
    '/'), else those names, else pref_{split}.jsonl (the tasks suite) or {split}.jsonl, in
    data_dir/dataset, which data.py prepares when the folder is missing. ValueError if a file is
    not there. reward.py reads its pairs the same way."""
    folder = os.path.join(data_dir, dataset)
    pick = lambda f, split: f if '/' in f else os.path.join(folder, f or (
        f'pref_{split}.jsonl' if os.path.exists(os.path.join(folder, f'pref_{split}.jsonl'))
        else f'{split}.jsonl'))
    # (only the JSONL sets: a token corpus holds no pairs, and a Hub one would start streaming)
    if not os.path.isdir(folder) and '/' not in train_file + val_file \
            and dataset in datasets.JSONL_SETS:
        datasets.prepare(dataset, data_dir=data_dir)
    paths = [pick(train_file, 'train'), pick(val_file, 'val')]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise ValueError(f'no preference file {missing[0]}; prepare it with `python data.py '
                         f'{dataset}` or set train_file/val_file')
    return paths

@functools.lru_cache(maxsize=4)
def _epoch_order(n, epoch, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()

def pair_order(n, it, micro_step, batch_size, accum, seed):
    """Indices of the pairs of a micro-step: all n pairs in a fresh random order each epoch (seed +
    epoch), read in turn. A function of the iteration alone, so exact resume needs no sampler state
    (dpo.py, reward.py)."""
    start = (it * accum + micro_step) * batch_size
    return [_epoch_order(n, k // n, seed)[k % n] for k in range(start, start + batch_size)]
