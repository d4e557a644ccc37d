"""
The KV cache of the decoding engine: keys and values of every layer for a batch of sequences
("slots"), each with its own length, kept between forward passes so each new token costs O(T)
attention instead of O(T^2).

    cache = KVCache(model.config, slots=4, max_len=64, device='cpu', dtype=torch.float32)
    step = cache.schedule(chunks=[(0, 12), (1, 7)])  # 12 prompt tokens for slot 0, 7 for slot 1
    logits, _ = model(ids, step=step)                # ids (1, 19), one flat row; the model calls
                                                     # step.attend in every layer
    step = cache.schedule(decode=2)                  # then one new token for each of slots 0 and 1
    logits, _ = model(next_ids, step=step)           # next_ids (1, 2) (or (2, 1): one per slot)

The caller lays out each forward pass (schedule), and the model stores and attends through the Step
it is given; nothing is read from or written to the cache behind the caller's back.
"""
import torch
import torch.nn.functional as F

from model import attention


class KVCache:
    """Keys and values of every layer for `slots` sequences. engine.py keeps one per model; slot s
    holds one row's context. A forward pass feeds a flat list of new tokens, laid out by
    schedule():
      - decode: one token for each slot in [0, decode), batched into one attention call (slots with
        no real row in that range compute a throwaway token that is never kept: cheaper than
        gathering the others together)
      - chunks: (slot, T) runs of T tokens appended to one slot (a prompt being prefilled),
        attention per chunk
    so a step can prefill prompts and decode every other row in the same matrix multiplies.
    static=True (a compiled decode step, engine.py): every decode step attends over the whole
    storage, masked, so its shapes change only when the storage grows or the number of decoding
    slots changes, and torch.compile does not compile again for every new length.
    """
    def __init__(self, config, slots, max_len, device, dtype, static=False):
        self.config, self.device, self.dtype, self.static = config, device, dtype, static
        # tokens held by each slot, counting those of the last scheduled step
        self.lengths = [0] * slots
        self.k, self.v, self.max_len = [], [], 0
        self.reserve(max_len)

    def reserve(self, n):
        """Room for n tokens in every slot (at most block_size): grows the storage (doubling),
        keeping its contents."""
        if n > self.config.block_size:
            raise ValueError(f"KV cache of {n} tokens exceeds "
                             f"block_size={self.config.block_size}; generate fewer "
                             "tokens or shorten the prompt")
        if n <= self.max_len:
            return
        size = min(self.config.block_size, max(n, 2 * self.max_len))
        shape = (len(self.lengths), self.config.n_kv_head, size, self.config.head_size)
        # subtle: zeros, not empty: masked-out slots still enter attention as 0 * V, and garbage
        # could be NaN
        grow = lambda old: torch.cat([old, torch.zeros(*shape[:2], size - self.max_len, shape[3],
                                                       device=self.device, dtype=self.dtype)],
                                     dim=2) if old is not None else \
            torch.zeros(shape, device=self.device, dtype=self.dtype)
        n_layer = self.config.n_layer
        self.k = [grow(self.k[i] if self.k else None) for i in range(n_layer)]
        self.v = [grow(self.v[i] if self.v else None) for i in range(n_layer)]
        self.max_len = size

    def copy(self, src, dst, n=None):
        """Slots dst take the first n (default: all) cached tokens of slots src (a fork, or a
        beam-search reorder)."""
        n = max(self.lengths[s] for s in src) if n is None else n
        si, di = torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device)
        for kv in (self.k, self.v):
            for t in kv:
                # subtle: the right side is gathered first, so src and dst may overlap
                t[di, :, :n] = t[si, :, :n]
        lengths = [min(n, self.lengths[s]) for s in src]
        for d, m in zip(dst, lengths):
            self.lengths[d] = m

    def schedule(self, decode=0, real=None, chunks=()):
        """Lay out the next forward's tokens: one for each slot in [0, decode) (real[s] False: a
        throwaway token), then each (slot, T) chunk -> the Step to pass to the model. Grows the
        storage if the tokens need room; masks are built here, once for all layers, and the slots'
        lengths count the new tokens from here on.
        subtle: all the bookkeeping is here, outside the forward, so a compiled forward reads no
        Python number that changes every step (torch.compile would guard on it and compile
        again)."""
        real = [True] * decode if real is None else real
        self.reserve(max([self.lengths[s] + 1 for s in range(decode) if real[s]] +
                         [self.lengths[s] + T for s, T in chunks], default=0))
        starts = [min(self.lengths[s], self.max_len - 1) for s in range(decode)]
        # a compiled decode step (a step with chunks runs eagerly)
        static = self.static and not chunks
        S = self.max_len if static else max(starts, default=-1) + 1
        dmask, W = None, self.config.sliding_window
        # rows of different lengths: each sees only its own keys; with a sliding window (Mistral)
        # only the last W of them. subtle: the storage keeps every key (no ring buffer), so a
        # window saves compute, not memory
        if decode and (static or min(starts) != S - 1 or 0 < W < S):
            keys = torch.arange(S, device=self.device)[None, :]
            last = torch.tensor(starts, device=self.device)[:, None]
            dmask = ((keys <= last) & (keys > last - W if W else True)).view(decode, 1, 1, S)
        segs = []
        for slot, T in chunks:
            c = self.lengths[slot]
            mask = None if c == 0 and not 0 < W < T else \
                torch.ones(T, c + T, dtype=torch.bool, device=self.device).tril(c)
            if mask is not None and W:  # token c+i sees keys j with c+i-W < j <= c+i
                mask = mask.triu(c - W + 1)
            segs.append((slot, c, T, mask))
        pos = starts + [p for _, c, T, _ in segs for p in range(c, c + T)]
        step = Step(self, decode, torch.arange(decode, device=self.device),
                    torch.tensor(starts, dtype=torch.long, device=self.device), S, dmask, segs,
                    torch.tensor([pos], dtype=torch.long, device=self.device))
        for s in range(decode):  # throwaway tokens are not kept
            self.lengths[s] += bool(real[s])
        for slot, T in chunks:
            self.lengths[slot] += T
        return step


class Step:
    """The layout of one forward pass over a KVCache (from KVCache.schedule): `decode` one-token
    rows at positions `starts` of slots 0..decode-1, then the chunks `segs` ((slot, tokens already
    cached, T, mask)), and `pos` (1, N), every new token's position in its slot. The model passes
    each layer's new keys and values to attend."""
    def __init__(self, cache, decode, rows, starts, S, dmask, segs, pos):
        self.cache, self.decode, self.rows, self.starts, self.S, self.dmask, self.segs, \
            self.pos = cache, decode, rows, starts, S, dmask, segs, pos

    def attend(self, layer, q, k, v):
        """Store this step's keys/values of `layer` and attend over each row's own context. q (1,
        nh, N, hs), k/v (1, nkv, N, hs) -> (1, nh, N, hs)."""
        decode, S, dmask = self.decode, self.S, self.dmask
        K, V, ys, off = self.cache.k[layer], self.cache.v[layer], [], decode
        if decode:
            if dmask is None:  # all at one position (S - 1): a slice write, cheaper than index_put
                K[:decode, :, S - 1] = k[0, :, :decode].transpose(0, 1)  # (decode, nkv, hs)
                V[:decode, :, S - 1] = v[0, :, :decode].transpose(0, 1)
            else:
                # each at its own position
                K[self.rows, :, self.starts] = k[0, :, :decode].transpose(0, 1)
                V[self.rows, :, self.starts] = v[0, :, :decode].transpose(0, 1)
            nh, nkv = q.size(1), K.size(1)
            # grouped-query decode as one plain attention: the g = nh / nkv query heads that share
            # a key/value head become g query positions of that head (one token each, the same keys
            # and mask), so no kernel needs enable_gqa (only CUDA's flash kernel takes it, and
            # flash refuses masks and fp32) and nothing is copied; qd is (decode, nkv, g, hs)
            qd = q[0, :, :decode].transpose(0, 1).reshape(decode, nkv, nh // nkv, -1)
            if torch.compiler.is_compiling() and dmask is not None and q.dtype == torch.float32:
                # one query a row: written out, the products and the softmax fuse with their
                # neighbours, cheaper than a call to the flash kernel (~70 us a layer). Not in 16
                # bits: the scores would be rounded to 16 bits before the softmax, where the
                # kernel keeps them in fp32
                att = (qd @ K[:decode, :, :S].transpose(-2, -1)) * qd.size(-1) ** -0.5
                y = att.masked_fill(~dmask, float('-inf')).softmax(-1) @ V[:decode, :, :S]
            else:
                y = F.scaled_dot_product_attention(qd, K[:decode, :, :S], V[:decode, :, :S],
                                                   attn_mask=dmask)
            # (1, nh, decode, hs)
            ys.append(y.reshape(decode, nh, -1).transpose(0, 1).unsqueeze(0))
        for slot, c, T, mask in self.segs:
            K[slot, :, c:c + T] = k[0, :, off:off + T]
            V[slot, :, c:c + T] = v[0, :, off:off + T]
            # subtle: is_causal aligns top-left, which is right only when the chunk starts the slot
            # (c == 0)
            ys.append(attention(q[:, :, off:off + T], K[slot:slot + 1, :, :c + T],
                                V[slot:slot + 1, :, :c + T], mask, mask is None and T > 1))
            off += T
        return torch.cat(ys, dim=2) if len(ys) > 1 else ys[0]
