// arch: the Model tab. The served model's blocks drawn from its GPTConfig (GET /v1/models' config),
// and a calculator of parameters, FLOPs, memory and time for any shape: model.py's own rules and
// counts come from the server (POST /v1/shape), the page adds what they imply.
import {api} from './api.js';
import {$, el, fmt, onTab} from './dom.js';
import {model, models} from './models.js';

// what a shape implies beyond model.py's counts (POST /v1/shape sends those, and the shape with
// every field resolved): memory and time for training, and the KV cache (the Train tab's too)
export function estimates(r, c) {
  const m = r.config, L = m.n_layer, H = m.n_head, hs = m.n_embd / H, T = m.block_size;
  const bytes = BYTES[c.dtype || 'float32'], B = c.batch_size || 1;
  // activations kept for the backward pass (Korthikanti et al. 2022, no recomputation): 34C + 5HT
  // values of 2 bytes per token and layer in 16-bit, twice that in fp32; plus the logits and their
  // gradient
  const act = L * B * T * (34 * m.n_embd + 5 * H * T) * bytes / 2 + 2 * B * T * m.vocab_size * 4;
  const kv = 2 * L * m.n_kv_head * hs * bytes;  // keys and values, per token
  return {kv_bytes_per_token: kv, kv_bytes_context: kv * T,
          train_bytes: r.params * (bytes + 4 + 8) + act,  // weights, fp32 grads, AdamW's m and v; act
          ms_per_iter: msFor(r.flops_per_token * B * T, c)};
}
export const BYTES = {float32: 4, bfloat16: 2, float16: 2};  // per value
// milliseconds for `flops` at c.peak_gflops x c.mfu percent
export const msFor = (flops, c) => 1000 * flops / ((c.peak_gflops || 163) * 1e9 * (c.mfu || 50) / 100);

export const human = (n, unit = '') => n >= 1e12 ? `${(n / 1e12).toFixed(2)} T${unit}` :
  n >= 1e9 ? `${(n / 1e9).toFixed(2)} G${unit}` : n >= 1e6 ? `${(n / 1e6).toFixed(2)} M${unit}` :
  n >= 1e3 ? `${(n / 1e3).toFixed(1)} k${unit}` : `${Math.round(n)} ${unit}`;

// -----------------------------------------------------------------------------
// 1) the blocks of a config, bottom (embeddings) to top (the head), as nested boxes; the repeated
//    block once, xL

function drawArch(c) {
  const llama = c.arch === 'llama';
  const box = (cls, title, ...lines) => el('div', {className: 'blk ' + cls},
    el('b', {}, title), ...lines.map(t => el('div', {className: 'dim'}, t)));
  const norm = llama ? 'RMSNorm' : 'LayerNorm', hs = c.n_embd / c.n_head;
  const pos = c.positions || (llama ? 'rope' : 'learned');
  const gqa = c.n_kv_head !== c.n_head ? `, ${c.n_kv_head} key/value heads (grouped-query)` : '';
  const block = el('div', {className: 'blk rep'},
    el('b', {}, `Block × ${c.n_layer}  (model.py Block)`),
    box('norm', `${norm} (ln_1)`),
    box('attn', 'CausalSelfAttention', `${c.n_head} query heads${gqa} of size ${hs}`,
      (pos === 'rope' ? 'RoPE rotates q and k by position; ' : '') +
        'causal softmax(q k^T / sqrt(hs)) v',
      '+ back into the residual stream'),
    box('norm', `${norm} (ln_2)`),
    box('mlp', llama ? 'MLP: SwiGLU' : 'MLP: GELU',
      llama ? `silu(gate) * up: ${c.n_embd} -> 2x${c.ffn_hidden} -> ${c.n_embd}` :
        `${c.n_embd} -> ${c.ffn_hidden} -> ${c.n_embd}`, '+ back into the residual stream'));
  const positions = pos === 'learned' ?
    [box('', '+ learned positions (wpe)', `${c.block_size} positions x ${c.n_embd}`)] :
    pos === 'sinusoidal' ? [box('', '+ sinusoidal positions (fixed)',
                                `sin/cos of position / 10000^(2i/${c.n_embd})`)] : [];
  $('arch-view').replaceChildren(
    box('', 'token embedding (wte)', `${c.vocab_size} tokens x ${c.n_embd}`), ...positions,
    block, box('norm', `final ${norm} (ln_f)`),
    box('', 'LM head', `${c.n_embd} -> ${c.vocab_size} logits` +
      (c.tie_embeddings ? ', the embedding\'s weight (tied)' : '')));
}

// -----------------------------------------------------------------------------
// 2) the calculator

// its fields: [key, label, default]; the served model's config fills them in. The Train tab's estimate
// reads its peak and MFU (peak()).
const CALC = [['arch', 'arch', 'gpt2'], ['positions', 'positions', 'learned'],
              ['n_layer', 'layers', 4], ['n_head', 'heads', 4], ['n_kv_head', 'kv heads', 4],
              ['n_embd', 'width', 128], ['ffn_hidden', 'MLP width (0 = default)', 0],
              ['block_size', 'context', 64], ['vocab_size', 'vocabulary', 65],
              ['batch_size', 'batch (training)', 12], ['dtype', 'dtype', 'float32'],
              ['peak_gflops', 'peak GFLOP/s', 163], ['mfu', 'MFU %', 50]];
const CHOICES = {arch: ['gpt2', 'llama'], positions: ['learned', 'rope', 'sinusoidal'],
                 dtype: ['float32', 'bfloat16']};
for (const [k, label, d] of CALC) {
  const input = CHOICES[k] ?
    el('select', {id: 'c-' + k}, ...CHOICES[k].map(v => new Option(v, v))) :
    el('input', {type: 'number', id: 'c-' + k, value: d, min: 0});
  input.value = d;
  input.oninput = input.onchange = showCalc;
  $('calc-form').append(el('label', {}, label, input));
}
$('calc-form').append(
  el('label', {}, el('input', {type: 'checkbox', id: 'c-tie', checked: true, onchange: showCalc}),
     ' tie embedding and head'),
  el('label', {}, el('input', {type: 'checkbox', id: 'c-bias', onchange: showCalc}),
     ' biases (gpt2)'));

export const peak = () => ({peak_gflops: Number($('c-peak_gflops').value) || 163,
                            mfu: Number($('c-mfu').value) || 50});

function calcConfig() {
  const c = Object.fromEntries(CALC.map(([k, , d]) =>
    [k, typeof d === 'string' ? $('c-' + k).value : Number($('c-' + k).value)]));
  return {...c, tie_embeddings: $('c-tie').checked, bias: $('c-bias').checked};
}

// the fields of a GPTConfig, which POST /v1/shape takes; the rest are the estimates' own
const SHAPE = ['arch', 'positions', 'n_layer', 'n_head', 'n_kv_head', 'n_embd', 'ffn_hidden',
               'block_size', 'vocab_size', 'tie_embeddings', 'bias'];
let asked = 0;  // the latest shape sent: an older answer that arrives after it is dropped

async function showCalc() {
  const c = calcConfig(), n = ++asked;
  let rows, params = '';
  try {
    const r = await api('/v1/shape', Object.fromEntries(SHAPE.map(k => [k, c[k]])));
    if (r.invalid) throw new Error(r.invalid);  // model.py refuses the shape, and says why
    const e = estimates(r, c);
    params = r.params;
    rows = [['parameters', human(r.params)], ['without the embeddings', human(r.params_non_embedding)],
            ['training FLOPs per token', human(r.flops_per_token, 'FLOP')],
            ['KV cache per token', human(e.kv_bytes_per_token, 'B')],
            ['KV cache, full context', human(e.kv_bytes_context, 'B')],
            ['training memory (batch)', human(e.train_bytes, 'B')],
            ['time per iteration (batch)', `${fmt(e.ms_per_iter, 1)} ms`]];
  } catch (err) {  // its reason, or a field out of the server's range
    rows = [['this shape is not valid', err.message]];
  }
  if (n !== asked) return;
  $('calc-out').replaceChildren(...rows.map(([k, v]) =>
    el('tr', {}, el('td', {}, k), el('td', {}, v))));
  $('calc-out').dataset.params = params;
}

// the tab opens on the served model: its blocks, and its shape in the calculator
onTab('arch', () => {
  const c = models[model()].config;
  drawArch(c);
  for (const [k] of CALC) if (k in c) $('c-' + k).value = c[k];
  $('c-tie').checked = c.tie_embeddings;
  $('c-bias').checked = c.bias;
  showCalc();
});
