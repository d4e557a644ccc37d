// inspect: how text becomes tokens (/tokenize, /detokenize, /tokenizer_info), where each token
// attends (the heatmap, /v1/attention), the logit lens and activation flow (/v1/inspect), and the
// same text under three tokenizers (/v1/tokenizers).
import {api} from './api.js';
import {$, el, fmt, guard, shade, visible} from './dom.js';
import {grid, hidpi} from './canvas.js';
import {model} from './models.js';

// the text to inspect: plain, or wrapped in the chat template as one user message
const inspectBody = () => $('as-chat').checked ? {model: model(),
  messages: [{role: 'user', content: $('inspect-text').value}], add_generation_prompt: true} :
  {model: model(), prompt: $('inspect-text').value};
const chip = i => `hsl(${(i * 47) % 360}, 70%, 88%)`;  // token i's colour, unlike its neighbours'

// -----------------------------------------------------------------------------
// 1) tokens

async function tokenize() {
  const j = await api('/tokenize', inspectBody());
  const back = (await api('/detokenize', {model: model(), tokens: j.tokens})).prompt;  // round trip
  const info = await api('/tokenizer_info?model=' + encodeURIComponent(model()));
  $('tokens').replaceChildren(...j.tokens.map((id, i) => {
    const s = el('span', {title: `token ${i}: id ${id}`}, visible(j.token_strs[i]),
                 el('sub', {}, id));
    s.dataset.id = id;
    s.style.background = chip(i);
    return s;
  }));
  const plain = !$('as-chat').checked, text = $('inspect-text').value;
  const eos = info.eos_token_id == null ? '' :
    `, end of text ${JSON.stringify(info.eos_token)} (${info.eos_token_id})`;
  const perToken = (back.length / Math.max(j.count, 1)).toFixed(2);
  $('tok-info').textContent = `${j.count} tokens, ${perToken} characters per token · ` +
    `${info.kind} tokenizer, vocabulary ${info.vocab_size}${eos}` +
    (plain ? ` · the ids decode back to the text: ${back === text ? 'yes' : 'NO'}` : '') +
    ' · · is a space, ↵ a newline';
}
$('tokenize').onclick = () => guard($('tok-info'), tokenize);

// -----------------------------------------------------------------------------
// 2) the attention heatmap

let attn = null;  // the last /v1/attention answer: tokens and attentions[layer][head][query][key]
const LABEL = 70;  // pixels kept left of and above the grid for token labels

async function attend() {
  // the ids of the text, in the chat template when ticked
  const ids = (await api('/tokenize', inspectBody())).tokens;
  attn = await api('/v1/attention', {model: model(), prompt: ids});
  const t1 = performance.now(), L = attn.attentions.length, H = attn.attentions[0].length;
  $('layer').replaceChildren(...Array.from({length: L}, (_, l) => new Option(l, l)));
  $('head').replaceChildren(new Option('mean of heads', 'mean'),
                            ...Array.from({length: H}, (_, h) => new Option(h, h)));
  $('attn-box').hidden = false;
  drawHeatmap();
  $('attn-box').dataset.ms = Math.round(performance.now() - t1);  // drawn after the data came
}
$('attend').onclick = () => guard($('tok-info'), attend);
$('layer').onchange = $('head').onchange = () => drawHeatmap();

function heatmapMatrix() {
  const maps = attn.attentions[Number($('layer').value)], h = $('head').value;
  if (h !== 'mean') return maps[Number(h)];
  const mean = (q, k) => maps.reduce((s, m) => s + m[q][k], 0) / maps.length;
  return maps[0].map((row, q) => row.map((_, k) => mean(q, k)));
}

// a square of LABEL + cell x T pixels, which CSS scales to its box
function drawHeatmap() {
  const A = heatmapMatrix(), T = A.length, cell = Math.max(4, Math.floor(520 / T));
  const cv = $('heatmap');
  const size = LABEL + cell * T, {ctx} = hidpi(cv, size, size);
  ctx.fillStyle = '#fff';
  ctx.fillRect(0, 0, size, size);
  // each row is a query token's attention over the keys (sums to 1; causal, so the upper triangle
  // is 0). sqrt brightens small weights, which would otherwise all look white next to the large
  // first-token weights
  for (let q = 0; q < T; q++) {
    for (let k = 0; k <= q; k++) {
      ctx.fillStyle = `hsl(220, 80%, ${100 - 65 * Math.sqrt(A[q][k])}%)`;
      ctx.fillRect(LABEL + k * cell, LABEL + q * cell, cell, cell);
    }
  }
  if (cell >= 9) {  // token labels when they fit: queries down the left, keys along the top
    ctx.fillStyle = '#333';
    ctx.font = `${Math.min(cell - 2, 12)}px monospace`;
    ctx.textBaseline = 'middle';
    attn.tokens.forEach((t, i) => {
      const s = visible(t).slice(0, 8);
      ctx.textAlign = 'right';
      ctx.fillText(s, LABEL - 3, LABEL + (i + 0.5) * cell);
      ctx.save();
      ctx.translate(LABEL + (i + 0.5) * cell, LABEL - 3);
      ctx.rotate(-Math.PI / 2);
      ctx.textAlign = 'left';
      ctx.fillText(s, 0, 0);
      ctx.restore();
    });
  }
  Object.assign(cv, {cell, size});
}

$('heatmap').onmousemove = e => {  // name the cell under the pointer
  const cv = $('heatmap'), r = cv.getBoundingClientRect(), scale = cv.size / r.width;
  const k = Math.floor(((e.clientX - r.left) * scale - LABEL) / cv.cell);
  const q = Math.floor(((e.clientY - r.top) * scale - LABEL) / cv.cell);
  const A = heatmapMatrix();
  if (q >= 0 && k >= 0 && q < A.length && k <= q) {
    $('attn-cell').textContent = `${JSON.stringify(attn.tokens[q])} (${q}) attends to ` +
      `${JSON.stringify(attn.tokens[k])} (${k}) with weight ${fmt(A[q][k])}`;
  }
};

// -----------------------------------------------------------------------------
// 3) the logit lens and the activation flow, from one /v1/inspect call (one traced forward pass)

async function inspectModel() {
  const ids = (await api('/tokenize', inspectBody())).tokens;
  const t0 = performance.now(), j = await api('/v1/inspect', {model: model(), prompt: ids, top: 3});
  const t1 = performance.now();
  // 1) the lens: a table, the last layer on top (the stack grows upward), the input tokens along
  //    the bottom
  const L = j.lens.length, rows = [];
  for (let l = L - 1; l >= 0; l--) {
    rows.push(el('tr', {}, el('th', {}, l === L - 1 ? `layer ${l} (output)` : `layer ${l}`),
      ...j.lens[l].map(cell => {
        const td = el('td', {textContent: visible(cell[0].token), title: cell.map(c =>
          `${JSON.stringify(c.token)} ${fmt(c.prob)}`).join('\n')});
        td.style.background = shade(cell[0].prob);
        td.dataset.id = cell[0].id;
        return td;
      })));
  }
  rows.push(el('tr', {}, el('th', {}, 'input'), ...j.tokens.map(t => el('th', {}, visible(t)))));
  $('lens').replaceChildren(el('table', {}, ...rows));
  // 2) the flow: one grid per quantity, layers up the side, positions along
  const f = j.flow;
  const grids = [['residual stream norm', f.resid], ['attention adds', f.attn],
                 ['MLP adds', f.mlp]];
  f.entropy[0].forEach((_, h) => {
    grids.push([`head ${h} attention entropy (nats)`, f.entropy.map(layer => layer[h])]);
  });
  $('flow').replaceChildren(...grids.map(([title, m]) => {
    const cv = el('canvas');
    const box = el('div', {}, el('h4', {}, title), cv);
    grid(cv, m, (l, t) => {
      $('flow-cell').textContent = `${title}: layer ${l}, position ${t} ` +
        `(${JSON.stringify(j.tokens[t])}): ${fmt(m[l][t])}`;
    });
    return box;
  }));
  $('lens-box').hidden = false;
  // drawn this long after the data came (the tests read it)
  $('lens-box').dataset.ms = Math.round(performance.now() - t1);
  $('tok-info').textContent = `logit lens and flow: ${L} layers x ${j.tokens.length} positions, ` +
    `answered in ${Math.round(t1 - t0)} ms, drawn in ${$('lens-box').dataset.ms} ms`;
}
$('lens-btn').onclick = () => guard($('tok-info'), inspectModel);

// -----------------------------------------------------------------------------
// 4) the same text under three tokenizers: one character per token, GPT-2's BPE (tiktoken), and the
//    model's own

async function compareTokenizers() {
  const j = await api('/v1/tokenizers', {model: model(), text: $('inspect-text').value});
  $('tokcmp').replaceChildren(...j.data.map(r => el('div', {className: 'tokcol'},
    el('h4', {}, r.name), el('div', {className: 'dim'}, r.error ? r.error :
      `${r.count} tokens · ${fmt(r.bytes_per_token, 2)} bytes per token · ` +
      `vocabulary ${r.vocab_size}`),
    el('div', {className: 'tokens'}, ...(r.tokens || []).map((t, i) => {
      const s = el('span', {}, visible(t));
      s.style.background = chip(i);
      return s;
    })))));
  $('tokcmp').hidden = false;
}
$('tokcmp-btn').onclick = () => guard($('tok-info'), compareTokenizers);
