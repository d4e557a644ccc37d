"""
Log-likelihoods of text under a model: perplexity and bits per byte of a token stream (a sliding
window), and the log-probability of continuations (multiple-choice benchmarks, lm-eval's
loglikelihood requests).

    r = run_perplexity(model, tok, 'shakespeare_char')   # the dataset's val.bin, or a text file
    r['metrics']   # {'loss', 'perplexity', 'bits_per_byte'}
    score_continuations(model, [(context_ids, continuation_ids), ...])  # [(logprob, is_greedy)]
"""
import math
import os

import torch
import torch.nn.functional as F

from nanolab import datasets


def _rows_per_forward(model, T, batch_size):
    """Rows per forward pass, capped so the fp32 logits (rows x T x vocab, and their log-softmax: 8
    bytes an element) fit: in a quarter of the GPU's free memory on CUDA (torch.cuda.mem_get_info),
    in ~1 GB elsewhere."""
    p = next(model.parameters())
    budget = torch.cuda.mem_get_info(p.device)[0] // 4 if p.is_cuda else 1 << 30
    return max(1, min(batch_size, budget // (8 * max(1, T * model.config.vocab_size))))

def perplexity_of(model, ids, stride=0, batch_size=16, ctx=None):
    """Sliding-window negative log-likelihood of a token stream `ids` (1-D), every token but the
    first scored once. Windows hold block_size + 1 tokens and start every `stride` tokens (the last
    one is moved back to end at the stream's end, so every window is full); a window scores only
    the tokens no earlier window scored, so with stride = block_size each token sees the context
    since its window began (fast), and with a smaller stride each token sees at least block_size -
    stride tokens of context (tighter, block_size / stride times slower). Returns {'nll': summed
    nats, 'tokens': scored tokens, 'windows': windows}."""
    T = model.config.block_size
    stride = stride or T
    if not 0 < stride <= T:
        raise ValueError(f'stride={stride} must be between 1 and the block size {T}')
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    N = len(ids)
    if N < 2:
        raise ValueError(f'perplexity needs at least 2 tokens, got {N}')
    wins, done, begin = [], 1, 0  # done: the first position not yet scored
    while done < N:
        begin = min(begin, max(0, N - T - 1))
        end = min(begin + T + 1, N)
        wins.append((begin, end, done))
        done, begin = end, begin + stride
    device = next(model.parameters()).device
    nll, rows = 0.0, _rows_per_forward(model, T, batch_size)
    with torch.no_grad(), (ctx or torch.autocast('cpu', enabled=False)):
        for i in range(0, len(wins), rows):
            chunk = wins[i:i + rows]
            # same length: every window is full
            x = torch.stack([ids[b:e - 1] for b, e, _ in chunk]).to(device)
            y = torch.stack([ids[b + 1:e] for b, e, _ in chunk]).to(device)
            for r, (b, _, first) in enumerate(chunk):
                y[r, :first - b - 1] = -1  # already scored by an earlier window
            logits, _ = model(x)
            nll += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1,
                                   reduction='sum').item()
    return {'nll': nll, 'tokens': N - 1, 'windows': len(wins)}

def score_continuations(model, requests, batch_size=16, ctx=None):
    """log p(continuation | context) for (context_ids, continuation_ids) pairs: [(summed logprob,
    is_greedy)], is_greedy = every continuation token is the argmax. A pair longer than block_size
    + 1 tokens loses context from the left (its continuation must fit in block_size); the number so
    truncated is score_continuations.truncated. Pairs run longest first, so each batch pads little
    (lm-eval's HF backend orders its requests the same way)."""
    T = model.config.block_size
    device = next(model.parameters()).device
    out, truncated = [None] * len(requests), 0
    seqs = []
    for i, (c, k) in enumerate(requests):
        if not k:
            raise ValueError(f'request {i}: the continuation is empty')
        if len(k) > T:
            raise ValueError(f'request {i}: the continuation is {len(k)} tokens, '
                             f'more than the block size {T}')
        s = (list(c) + list(k))[-(T + 1):]
        truncated += len(c) + len(k) > T + 1
        seqs.append((i, s, len(k)))
    seqs.sort(key=lambda t: -len(t[1]))
    j = 0
    with torch.no_grad(), (ctx or torch.autocast('cpu', enabled=False)):
        while j < len(seqs):
            L = len(seqs[j][1]) - 1  # the longest in the chunk: rows are sorted longest first
            chunk = seqs[j:j + _rows_per_forward(model, L, batch_size)]
            j += len(chunk)
            x = torch.zeros(len(chunk), L, dtype=torch.long)
            for r, (_, s, _) in enumerate(chunk):
                x[r, :len(s) - 1] = torch.tensor(s[:-1])
            # logits only from the first position that predicts a continuation token: the output
            # head and log_softmax over the context positions are most of the cost of scoring short
            # answers
            p0 = min(len(s) - 1 - n for _, s, n in chunk)
            logp = F.log_softmax(model(x.to(device), logits_at=slice(p0, None))[0].float(), dim=-1)
            for r, (i, s, n) in enumerate(chunk):
                # the positions that predict the continuation
                lp = logp[r, len(s) - 1 - n - p0:len(s) - 1 - p0]
                k = torch.tensor(s[-n:], device=lp.device)
                out[i] = (lp.gather(1, k[:, None]).sum().item(), bool((lp.argmax(-1) == k).all()))
    score_continuations.truncated = truncated
    return out
score_continuations.truncated = 0

def stream_tokens(source, tok, data_dir='data'):
    """(token ids, UTF-8 bytes they decode to, description) of a perplexity source: a dataset name
    (its val.bin, which must be in the model's tokenizer) or a text file (encoded with the model's
    tokenizer)."""
    import numpy as np
    if os.path.isfile(source):
        with open(source, encoding='utf-8', errors='strict') as f:
            text = f.read()
        try:
            ids = tok.encode(text)
        except (KeyError, ValueError) as e:
            raise ValueError(f"{source}: the model's tokenizer cannot encode this "
                             f"text ({e}); a char-level model only knows the "
                             "characters of its training text") from None
        return np.asarray(ids, dtype=np.int64), len(text.encode('utf-8')), source
    folder = os.path.join(data_dir, source)
    meta = datasets.load_meta(folder)  # a clear error naming `python data.py NAME` when missing
    if meta['tokenizer'] != tok.spec():
        raise ValueError(f"{folder} was tokenized with {meta['tokenizer'].get('kind')} (vocab "
                         f"{meta['vocab_size']}), not the model's tokenizer "
                         f"({tok.spec().get('kind')}, vocab {tok.vocab_size}); pass "
                         "--perplexity=FILE.txt to score raw text with the model's own tokenizer")
    path = os.path.join(folder, 'val.bin')
    if not os.path.exists(path):
        raise ValueError(f'{folder} has no val.bin (an SFT or preference set?); pass '
                         '--perplexity=DATASET or a text file')
    ids = np.fromfile(path, dtype=np.dtype(meta['dtype'])).astype(np.int64)
    return ids, None, f'{source}/val.bin'

def run_perplexity(model, tok, source, stride=0, max_tokens=0, batch_size=16, data_dir='data',
                   ctx=None):
    """Perplexity and bits per byte of a model on a perplexity source (see stream_tokens), as a
    result dict's metrics. Bits per byte = summed nats / ln 2 / the UTF-8 bytes of the scored
    tokens, so it compares across tokenizers, where perplexity does not."""
    ids, n_bytes, what = stream_tokens(source, tok, data_dir)
    if max_tokens and len(ids) > max_tokens + 1:
        ids, n_bytes = ids[:max_tokens + 1], None
    r = perplexity_of(model, ids, stride, batch_size, ctx)
    first = len(tok.decode_bytes([int(ids[0])]))
    scored_bytes = (n_bytes if n_bytes is not None
                    else len(tok.decode_bytes(ids.tolist()))) - first
    loss = r['nll'] / r['tokens']
    return {'task': f'perplexity:{what}', 'metrics': {'loss': loss, 'perplexity': math.exp(loss),
            'bits_per_byte': r['nll'] / math.log(2) / max(1, scored_bytes)},
            'n': r['tokens'], 'settings': {'stride': stride or model.config.block_size,
                                           'windows': r['windows'],
                                            'bytes': scored_bytes, 'max_tokens': max_tokens}}

