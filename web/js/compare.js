// compare: one prompt under several decoding strategies, one /v1/completions request each, all at
// once; and the beam search's tree ("beam_tree": true, engine.beam_tree) as SVG, step by step.
import {api} from './api.js';
import {$, el, fmt, guard, visible} from './dom.js';
import {model, models} from './models.js';
import {TOP_LOGPROBS, tokenSpan} from './tokens.js';

// [name, sampling fields]; the sampled columns share one seed, so a rerun repeats them
const STRATEGIES = [
  ['greedy', {temperature: 0}],
  ['temperature 0.8', {temperature: 0.8}],
  ['top-k 40', {temperature: 1, top_k: 40}],
  ['top-p 0.9', {temperature: 1, top_p: 0.9}],
  ['min-p 0.1', {temperature: 1, min_p: 0.1}],
  ['beam search (4)', {temperature: 0, num_beams: 4, beam_tree: true}],
];

async function compare() {
  const name = model(), prompt = $('compare-prompt').value;
  const n = (await api('/tokenize', {model: name, prompt})).count;
  const room = models[name].max_model_len - n;
  const max_tokens = Math.max(1, Math.min(Number($('compare-max').value), room));
  $('columns').replaceChildren(...STRATEGIES.map(([title, s]) => {
    const col = el('div', {className: 'col'}, el('h4', {}, title),
                   el('span', {className: 'dim'}, JSON.stringify(s)), el('pre', {textContent: '…'}),
                   el('div', {className: 'dim meta'}));
    run(col, s);
    return col;
  }));

  async function run(col, s) {
    const t0 = performance.now(), pre = col.querySelector('pre'), meta = col.querySelector('.meta');
    try {
      const body = {model: name, prompt, max_tokens, seed: Number($('compare-seed').value),
                    logprobs: TOP_LOGPROBS, ...s};
      const c = (await api('/v1/completions', body)).choices[0], lp = c.logprobs;
      if (c.beam_tree) drawBeamTree(c.beam_tree);
      // tokens with their probabilities when their pieces spell the text (a split UTF-8 character
      // would not)
      if (lp && lp.tokens.join('') === c.text) {
        pre.replaceChildren(...lp.tokens.map((t, i) =>
          tokenSpan([t, t, lp.token_logprobs[i], Object.entries(lp.top_logprobs[i] || {})])));
      } else {
        pre.textContent = c.text;
      }
      const sum = lp ? lp.token_logprobs.reduce((a, b) => a + b, 0) : null;
      const sec = (performance.now() - t0) / 1000;
      meta.textContent = `${lp ? lp.tokens.length : '?'} tokens, ${sec.toFixed(2)} s` +
        (lp && lp.tokens.length ? ` · mean logprob ${fmt(sum / lp.tokens.length)}` : '') +
        ` · ${c.finish_reason}`;
    } catch (e) {
      pre.textContent = e.message;
      pre.classList.add('err');
    }
  }
}
$('run-compare').onclick = () => guard($('columns'), compare);

// the beam tree as SVG: x = step, y = the node's rank by score within its step; edges to the parent
const SVG = 'http://www.w3.org/2000/svg';
const svgEl = (tag, attrs, text) => {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text != null) e.textContent = text;
  return e;
};

function drawBeamTree(nodes) {
  const t0 = performance.now();
  const steps = Math.max(...nodes.map(n => n.step)) + 1, DX = 110, DY = 34, at = {};
  for (let s = 0; s < steps; s++) {
    nodes.filter(n => n.step === s).sort((a, b) => b.score - a.score).forEach((n, r) => {
      at[n.id] = [60 + s * DX, 20 + r * DY];
    });
  }
  const rows = Math.max(...Object.values(at).map(p => p[1])) + 24, svg = $('beam-tree');
  svg.setAttribute('width', 60 + steps * DX);
  svg.setAttribute('height', rows);
  const kids = [svgEl('text', {x: 4, y: 24}, 'prompt')];
  for (const n of nodes) {
    const [x, y] = at[n.id], [px, py] = n.parent == null ? [40, 20] : at[n.parent];
    const cls = [n.best ? 'best' : '', n.pruned ? 'pruned' : ''].join(' ').trim();
    const g = svgEl('g', {class: cls, 'data-step': n.step, 'data-id': n.id});
    const mark = n.finished ? svgEl('rect', {x: x - 5, y: y - 5, width: 10, height: 10}) :
      svgEl('circle', {cx: x, cy: y, r: 5});
    const title = `step ${n.step}: ${JSON.stringify(n.text)} logprob ${fmt(n.logprob)}, ` +
      `sum ${fmt(n.cum_logprob)}, score ${fmt(n.score)}` + (n.finished ? ' (finished)' : '') +
      (n.pruned ? ' (dropped)' : '') + (n.best ? ' (returned)' : '');
    g.append(svgEl('line', {x1: px + 6, y1: py, x2: x - 6, y2: y}), mark,
             svgEl('text', {x: x + 8, y: y - 2}, visible(n.text ?? String(n.token))),
             svgEl('text', {x: x + 8, y: y + 10, fill: '#777'}, fmt(n.score, 2)),
             svgEl('title', {}, title));
    kids.push(g);
  }
  svg.replaceChildren(...kids);
  $('beam-step').max = steps - 1;
  $('beam-step').value = steps - 1;
  showBeamSteps();
  $('beam-box').hidden = false;
  $('beam-box').dataset.ms = Math.round(performance.now() - t0);
}

function showBeamSteps() {
  const s = Number($('beam-step').value);
  for (const g of $('beam-tree').querySelectorAll('g')) {
    g.style.display = Number(g.dataset.step) <= s ? '' : 'none';
  }
  $('beam-step-n').textContent = `${s + 1} of ${Number($('beam-step').max) + 1}`;
}
$('beam-step').oninput = showBeamSteps;
