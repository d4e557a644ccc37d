"""
The nanolab model: one GPT with selectable blocks, and nothing else (nanoGPT's model.py, grown by
two architectures and the options of the Llama-like families).

    arch='gpt2'   learned positions, LayerNorm, GELU MLP, tied embeddings (Radford et al. 2019)
    arch='llama'  RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, no biases (Touvron+ 2023)
                  + Llama 3's rope_scaling, Mistral's sliding_window, Qwen2's qkv_bias, Qwen3's
                  qk_norm and head_dim
    positions     'learned' (gpt2's), 'rope' (llama's) or 'sinusoidal' (Vaswani+ 2017), any arch

    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64))
    logits, loss = model(idx, targets)   # idx, targets (B, T) -> logits (B, T, vocab), mean loss
    model = GPT.from_pretrained('gpt2')  # a Hugging Face directory or hub name (nanolab/hf.py)
    model.save_pretrained('out/hf')      # ... that transformers loads with the same logits

What the engine and the page's views need beyond forward has its own method or argument:
hidden_states (a reward model's input), forward's logits_at (logits at chosen positions only) and
step (a KV-cache step: nanolab/kv_cache.py), trace (what each block does: nanolab/interpret.py
reads it). Checkpoints and model sources are nanolab/checkpoint.py's, devices nanolab/device.py's.

Quick check (CPU, random weights):
    python -c "from model import *; m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64)); print(m.num_params())"
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

ARCHS = ('gpt2', 'llama')
POSITIONS = ('learned', 'rope', 'sinusoidal')

# -----------------------------------------------------------------------------
# the configuration, and the pieces of a block

@dataclass
class GPTConfig:
    arch: str = 'gpt2'           # 'gpt2' | 'llama'
    block_size: int = 1024       # max context length (tokens)
    vocab_size: int = 50304      # GPT-2's 50257 padded up to a multiple of 64 for speed (nanoGPT)
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 0           # key/value heads (grouped-query attention); 0 = n_head
    n_embd: int = 768
    ffn_hidden: int = 0          # MLP width; 0 = 4*n_embd (gpt2) or ~8/3*n_embd (llama)
    dropout: float = 0.0
    bias: bool = True            # biases in Linear and LayerNorm (gpt2 only; llama has none)
    tie_embeddings: bool = None  # share embedding and head; None = the arch's (gpt2 yes, llama no)
    positions: str = None        # 'learned' | 'rope' | 'sinusoidal'; None = the arch's own
    rope_theta: float = 10000.0  # RoPE base (the sinusoids' base is always 10000)
    norm_eps: float = 1e-5       # LayerNorm / RMSNorm epsilon
    # the options of the Llama-like families (nanolab/hf.py maps each family's config.json)
    head_dim: int = 0            # width of a head; 0 = n_embd // n_head (Qwen3's is wider)
    qkv_bias: bool = False       # biases on q, k and v only (Qwen2)
    qk_norm: bool = False        # RMSNorm on each head's q and k before RoPE (Qwen3)
    sliding_window: int = 0      # a token sees itself and the window-1 before it (Mistral); 0 = all
    rope_scaling: dict = None    # {'rope_type': 'linear' | 'llama3', 'factor': ..} (Llama 3.x)

    def __post_init__(self):
        # a checkpoint's or a client's values: types and signs before any arithmetic on them
        for k, lo in [('block_size', 1), ('vocab_size', 1), ('n_layer', 1), ('n_head', 1),
                      ('n_kv_head', 0), ('n_embd', 1), ('ffn_hidden', 0), ('dropout', 0.0),
                      ('rope_theta', 1e-12), ('norm_eps', 0.0), ('head_dim', 0),
                      ('sliding_window', 0)]:
            v, kind = getattr(self, k), int if isinstance(lo, int) else (int, float)
            if isinstance(v, bool) or not isinstance(v, kind) or not lo <= v < math.inf:
                raise ValueError(f"{k} must be {'an integer' if kind is int else 'a number'} "
                                 f"of at least {lo}, got {v!r}")
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch '{self.arch}'; use one of {ARCHS}")
        self.n_kv_head = self.n_kv_head or self.n_head
        if not self.positions:  # None or '' (a script's setting)
            self.positions = 'learned' if self.arch == 'gpt2' else 'rope'
        if self.positions not in POSITIONS:
            raise ValueError(f"unknown positions '{self.positions}'; use one of {POSITIONS}")
        if self.tie_embeddings is None:  # GPT-2 ties them (Press & Wolf 2017); Llama does not
            self.tie_embeddings = self.arch == 'gpt2'
        if self.head_dim == 0 and self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head} "
                             "(or set head_dim)")
        need = {'linear': ['factor'], 'llama3': ['factor', 'low_freq_factor', 'high_freq_factor',
                                                 'original_max_position_embeddings']}
        rs = self.rope_scaling if isinstance(self.rope_scaling, dict) else {}
        if self.rope_scaling is not None and not all(type(rs.get(k)) in (int, float) and rs[k] > 0
                                                     for k in need.get(rs.get('rope_type'), [0])):
            raise ValueError(f"rope_scaling must be None or {{'rope_type': 'linear' | 'llama3', "
                             f"{', '.join(need['llama3'])}}} (numbers > 0), got {rs!r:.120}")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head={self.n_head} must be a multiple of "
                             f"n_kv_head={self.n_kv_head}")
        if self.arch == 'llama':
            self.bias = False  # Llama blocks have no biases by definition (Qwen2's: qkv_bias)
        elif self.n_kv_head != self.n_head or self.head_dim or self.qk_norm or self.qkv_bias:
            raise ValueError("grouped-query attention (n_kv_head < n_head), head_dim, qk_norm and "
                             "qkv_bias: each needs arch='llama'")
        if self.positions == 'rope' and self.head_size % 2 != 0:
            raise ValueError("RoPE needs an even head size; change n_embd or n_head")
        if self.positions == 'sinusoidal' and self.n_embd % 2 != 0:
            raise ValueError("sinusoidal positions need an even n_embd (sine and cosine pairs)")
        self.ffn_hidden = self.ffn_hidden or (4 * self.n_embd if self.arch == 'gpt2' else
                                              64 * math.ceil(8 * self.n_embd / 3 / 64))

    @property
    def head_size(self):
        return self.head_dim or self.n_embd // self.n_head


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019). Computed in fp32, as Llama does, for
    stability."""
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_frequencies(config):
    """RoPE's angle per position for each pair of a head's dims (hs/2,), rope_scaling applied."""
    hs = config.head_size
    exponents = torch.arange(0, hs, 2, dtype=torch.int64).float() / hs  # (hs/2,)
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    scaling = config.rope_scaling or {}
    if scaling.get('rope_type') == 'linear':  # positions stretched by factor (Chen+ 2023)
        inv_freq = inv_freq / scaling['factor']
    elif scaling.get('rope_type') == 'llama3':
        # Llama 3.1's: wavelengths longer than the original context / low_freq_factor are
        # stretched by factor, shorter than context / high_freq_factor kept, blended between
        ctx, lo, hi = (scaling[k] for k in ('original_max_position_embeddings',
                                            'low_freq_factor', 'high_freq_factor'))
        wavelen = 2 * math.pi / inv_freq
        keep = ((ctx / wavelen - lo) / (hi - lo)).clamp(0, 1)  # 1 = high frequency: kept
        inv_freq = keep * inv_freq + (1 - keep) * inv_freq / scaling['factor']
    return inv_freq

def rope_tables(config):
    """cos/sin tables for rotary embeddings (Su et al. 2021), (block_size, head_size) each, in
    the 'rotate half' layout of the Hugging Face Llama code, so its weights load unpermuted."""
    freqs = torch.outer(torch.arange(config.block_size).float(), rope_frequencies(config))
    emb = torch.cat((freqs, freqs), dim=-1)       # (T, hs): each pair's angle, both halves
    return emb.cos(), emb.sin()

def sinusoid_table(config):
    """The original Transformer's fixed positions (Vaswani+ 2017, 3.5), (block_size, n_embd), added
    to the token embedding: dimension 2i of position p is sin(p / 10000^(2i/C)), 2i+1 its cos."""
    C = config.n_embd
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, C, 2, dtype=torch.int64).float() / C))  # (C/2,)
    t = torch.arange(config.block_size, dtype=torch.int64).float()
    angles = torch.outer(t, inv_freq)  # (T, C/2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1)  # (T, C), interleaved

def position_tables(config):
    """{buffer name: table} of the fixed positions a config uses (none for learned ones)."""
    if config.positions == 'sinusoidal':
        return {'sinusoids': sinusoid_table(config)}
    if config.positions == 'rope':
        cos, sin = rope_tables(config)
        return {'rope_cos': cos, 'rope_sin': sin}
    return {}

def apply_rope(x, cos, sin):
    """x: (B, nh, T, hs); cos/sin: (B, 1, T, hs), already gathered at each token's position."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


def attention(q, k, v, mask=None, causal=False, dropout=0.0):
    """SDPA of q (B, nh, T, hs) over k, v (B, nkv, S, hs), grouped-query (nkv < nh) on a fast
    kernel. On CUDA only the flash kernel takes enable_gqa, and it refuses masks and fp32: there
    keys and values are expanded to nh heads first (expand_kv), so the memory-efficient kernel
    applies, not the math one. The CPU's kernels take enable_gqa, unexpanded."""
    nh, nkv = q.size(1), k.size(1)
    if nh != nkv and q.is_cuda and not (q.dtype in (torch.float16, torch.bfloat16)
                                        and mask is None):
        k, v = expand_kv(k, v, nh)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          dropout_p=dropout, enable_gqa=nh != k.size(1))

def expand_kv(k, v, nh):
    """Keys and values (B, nkv, S, hs) repeated to nh heads, each serving its group of query
    heads."""
    return k.repeat_interleave(nh // k.size(1), dim=1), v.repeat_interleave(nh // k.size(1), dim=1)


# -----------------------------------------------------------------------------
# the model

class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.hs = config.n_head, config.n_kv_head, config.head_size
        # q, k, v in one matmul: n_head query heads, n_kv_head key and value heads
        self.c_attn = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * self.hs,
                                bias=config.bias or config.qkv_bias)
        self.c_proj = nn.Linear(config.n_head * self.hs, config.n_embd, bias=config.bias)
        if config.qk_norm:  # one RMSNorm over each head's width, shared by the heads (Qwen3)
            self.q_norm, self.k_norm = (RMSNorm(self.hs, config.norm_eps) for _ in range(2))
        self.qk_norm, self.window = config.qk_norm, config.sliding_window
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout

    def forward(self, x, rope, step, layer, need_weights=False):
        B, T, C = x.size()  # batch, time, channels
        q, k, v = self.c_attn(x).split([self.n_head * self.hs, self.n_kv_head * self.hs,
                                        self.n_kv_head * self.hs], dim=2)
        q = q.view(B, T, self.n_head, self.hs)       # (B, T, nh, hs)
        k = k.view(B, T, self.n_kv_head, self.hs)    # (B, T, nkv, hs)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh, T, hs), (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        causal = None if step is not None else \
            torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        # with a sliding window a token is also blind to keys `window` or more tokens back
        mask = causal.triu(1 - self.window) if causal is not None and 0 < self.window < T else None
        att = None
        if step is not None:  # incremental decoding: each row over its own slot (Step.attend)
            y = step.attend(layer, q, k, v)
        elif need_weights:  # the explicit path, for attention heatmaps
            k, v = expand_kv(k, v, self.n_head)
            att = (q @ k.transpose(-2, -1)) / math.sqrt(self.hs)       # (B, nh, T, T)
            att = att.masked_fill(~(causal if mask is None else mask), float('-inf'))
            att = F.softmax(att.float(), dim=-1).to(q.dtype)
            y = att @ v
        else:  # flash attention on GPU, fused kernels on CPU
            y = attention(q, k, v, mask, mask is None and T > 1,
                          self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.hs)  # heads' outputs side by side
        return self.resid_dropout(self.c_proj(y)), att


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.swiglu = config.arch == 'llama'
        # llama: gate and up projections in one matmul (SwiGLU, Shazeer 2020); gpt2: one GELU layer
        self.c_fc = nn.Linear(config.n_embd, (2 if self.swiglu else 1) * config.ffn_hidden,
                              bias=config.bias)
        self.c_proj = nn.Linear(config.ffn_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        if self.swiglu:
            gate, up = self.c_fc(x).chunk(2, dim=-1)
            x = F.silu(gate) * up
        else:
            x = F.gelu(self.c_fc(x), approximate='tanh')  # GPT-2's "gelu_new"
        return self.dropout(self.c_proj(x))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        norm = (lambda: RMSNorm(config.n_embd, config.norm_eps)) if config.arch == 'llama' else \
               (lambda: nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias))
        self.ln_1, self.attn = norm(), CausalSelfAttention(config)
        self.ln_2, self.mlp = norm(), MLP(config)

    def forward(self, x, rope, step, layer, trace=None):
        a, att = self.attn(self.ln_1(x), rope, step, layer, need_weights=trace is not None)
        x = x + a
        m = self.mlp(self.ln_2(x))
        x = x + m
        if trace is not None:  # what the page's learning views draw (GPT.trace)
            for k, v in (('att', att), ('attn_out', a), ('mlp_out', m), ('resid', x)):
                trace.setdefault(k, []).append(v)
        return x


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=RMSNorm(config.n_embd, config.norm_eps) if config.arch == 'llama'
                 else nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias),
        ))
        if config.positions == 'learned':
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        for name, table in position_tables(config).items():  # computed: never learned or saved
            self.register_buffer(name, table, persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:  # https://paperswithcode.com/method/weight-tying
            self.transformer.wte.weight = self.lm_head.weight
        # init: N(0, 0.02), residual projections scaled down by depth (GPT-2 paper)
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, step=None, logits_at=None):
        """idx (B, T) token ids -> (logits (B, T, vocab), loss or None).
        targets: (B, T) next-token ids, -1 = ignored (SFT's prompt tokens, padding) -> mean loss.
        step: a KV-cache step (KVCache.schedule, nanolab/kv_cache.py): the B*T tokens are its new
          tokens, in its layout; each layer stores their keys and values and attends over each
          row's own slot.
        logits_at: an index into the positions (a slice or 1-D tensor; with a step, into the flat
          row of B*T tokens) -> logits only there."""
        B, T = idx.size()
        if step is not None:
            idx = idx.reshape(1, B * T)  # one flat row; the step keeps the rows apart
        x = self.hidden_states(idx, step)
        if logits_at is not None:
            x = x[:, logits_at]
        logits = self.lm_head(x)
        if step is not None and logits_at is None:
            logits = logits.view(B, T, -1)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=-1)
        return logits, loss

    def hidden_states(self, idx, step=None, trace=None):
        """idx (B, T) -> the final norm's output (B, T, C): the transformer without its output head
        (a reward model's input). step: as forward's. trace: a dict that collects, per block, lists
        of 'att' (B, nh, T, T) attention weights (the explicit path: the same function as SDPA),
        'attn_out' and 'mlp_out' (B, T, C) (what each adds to the residual stream) and
        'resid' (B, T, C) (the stream after the block); and 'embed' (B, T, C), the stream entering
        the first (GPT.trace)."""
        B, T = idx.size()
        # 1) positions: where the step puts each token (a slot continues its row), else 0..T-1
        if step is not None:
            if trace is not None:
                raise ValueError("trace records a whole context's activations; "
                                 "call it without a KV-cache step")
            pos = step.pos  # (1, T)
        else:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds "
                                 f"block_size={self.config.block_size}; crop the input to "
                                 "the last block_size tokens")
            pos = torch.arange(T, device=idx.device).unsqueeze(0)  # (1, T)
        # 2) embeddings
        x, rope = self.transformer.wte(idx), None  # (B, T, C)
        if self.config.positions == 'learned':
            x = x + self.transformer.wpe(pos)
        elif self.config.positions == 'sinusoidal':
            x = x + self.sinusoids[pos].to(x.dtype)
        else:
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # (1, T, hs)
            rope = (cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype))  # (1, 1, T, hs)
        x = self.transformer.drop(x)
        if trace is not None:  # (the stream entering the first block)
            trace['embed'] = x
        # 3) the blocks, then the final norm
        for layer, block in enumerate(self.transformer.h):
            x = block(x, rope, step, layer, trace)
        return self.transformer.ln_f(x)

    @torch.no_grad()
    def trace(self, idx):
        """One forward pass of idx (B, T) -> (logits, the trace dict hidden_states describes): what
        the page's views show (/v1/attention, /v1/inspect; nanolab/interpret.py)."""
        trace = {}
        logits = self.lm_head(self.hidden_states(idx, trace=trace))
        return logits, trace

    # -------------------------------------------------------------------------
    # counting

    def num_params(self, non_embedding=True):
        """Parameter count; tied weights count once. non_embedding drops the token and position
        tables (Kaplan et al. 2020's convention), but keeps a separate output head."""
        n = sum(p.numel() for p in self.parameters())
        n += sum(getattr(m, 'swapped_weights', 0) for m in self.modules())  # quantize.py's buffers
        if non_embedding:
            n -= self.transformer.wte.weight.numel()
            if self.config.positions == 'learned':
                n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, T=None):
        """Training FLOPs per token (forward + backward = 3x forward): 6N for the matmuls
        plus 12*L*C*T for attention (PaLM paper, appendix B). T defaults to block_size."""
        cfg, T = self.config, T or self.config.block_size
        wpe = self.transformer.wpe.weight.numel() if cfg.positions == 'learned' else 0
        N = self.num_params(non_embedding=False) - wpe
        return 6 * N + 12 * cfg.n_layer * cfg.n_head * cfg.head_size * T

    def estimate_mfu(self, tokens_per_sec, peak_flops, T=None):
        """Model FLOPs utilization: training FLOP/s as a fraction of the peak the caller gives (e.g.
        989e12 for an H100's bf16 dense, ~163e9 for our 2-core dev CPU in fp32, measured)."""
        return self.flops_per_token(T) * tokens_per_sec / peak_flops

    # -------------------------------------------------------------------------
    # Hugging Face import and export (nanolab/hf.py does the reading and writing)

    @classmethod
    def from_pretrained(cls, name_or_dir, dtype=torch.float32):
        """A GPT from a Hugging Face model directory or, when online, a hub name such as 'gpt2'."""
        from nanolab import hf
        config, state_dict = hf.read_pretrained(name_or_dir, dtype)
        return cls.from_state_dict(GPTConfig(**config), state_dict).to(dtype)

    @classmethod
    def from_state_dict(cls, config, state_dict):
        """A GPT whose weights are state_dict's tensors themselves (in their final dtype), laid
        out on the meta device first: nothing is initialized, no memory taken but theirs."""
        with torch.device('meta'):
            model = cls(config)
        model.load_state_dict(state_dict, strict=True, assign=True)
        if config.tie_embeddings:  # assign gave each name its own Parameter: one again
            model.transformer.wte.weight = model.lm_head.weight
        for name, table in position_tables(config).items():
            model.register_buffer(name, table, persistent=False)
        return model

    def save_pretrained(self, out_dir, tokenizer=None):
        """Write a Hugging Face directory that transformers.AutoModelForCausalLM loads with the same
        logits, plus a BPE tokenizer's files (so AutoTokenizer works too)."""
        from nanolab import hf
        hf.write_pretrained(out_dir, asdict(self.config), self.state_dict(), tokenizer)

# -----------------------------------------------------------------------------
# names that live in the package: importing one from model.py says where (an ImportError)

MOVED = {'nanolab.device': 'resolve_device resolve_dtype autocast_ctx peak_flops PEAK_FLOPS '
                           'CPU_PEAK_FLOPS DTYPES', 'nanolab.kv_cache': 'KVCache',
         'nanolab.checkpoint': 'load_model save_checkpoint load_checkpoint load_weights_file '
                               'model_from_checkpoint model_sources checkpoint_stage STAGES TUNED',
         'nanolab.files': 'write_atomic write_json', 'nanolab.tokenizer': 'check_tokenizer_fits'}

def __getattr__(name):
    home = next((m for m, names in MOVED.items() if name in names.split()), None)
    if home is None:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    raise ImportError(f"{name} is no longer in model.py, which holds the model alone: from {home} "
                      f"import {'check_fits' if name == 'check_tokenizer_fits' else name}")
