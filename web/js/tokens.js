// tokens: a generated token as a span (chat, completion, compare), shaded by its probability when
// asked, and the tooltip that shows its probability and the alternatives the model weighed, on
// hover or tap.
import {$, el, fmt} from './dom.js';

export const TOP_LOGPROBS = 5;  // alternatives asked for per generated token, for the tooltip

// t: [text shown, token, logprob, [[alternative, logprob, allowed?], ...], allowed tokens?]
export function tokenSpan(t) {
  const s = el('span', {className: 'tk', textContent: t[0]});
  s.tok = t;
  if ($('shade').checked && t[2] != null) {
    s.style.background = `hsl(${120 * Math.exp(t[2])}, 75%, 85%)`;
  }
  return s;
}

function showTip(e) {
  const t = e.target.tok;
  if (!t) return hideTip();
  const lines = [`${JSON.stringify(t[1])}  p=${fmt(Math.exp(t[2]))}  logprob=${fmt(t[2])}`,
                 ...(t[4] != null ? [`the grammar allowed ${t[4]} tokens here`] : []),
                 'top alternatives:',
                 ...t[3].map(([tok, lp, ok]) =>
                   `  ${JSON.stringify(tok).padEnd(14)} ${fmt(Math.exp(lp))}` +
                   (ok === false ? '  (not allowed)' : ''))];
  $('tip').textContent = lines.join('\n');
  $('tip').hidden = false;
  const r = e.target.getBoundingClientRect();  // below the token, kept on screen
  $('tip').style.left = Math.max(0, Math.min(r.left, innerWidth - $('tip').offsetWidth - 4)) + 'px';
  $('tip').style.top = (r.bottom + 4) + 'px';
}
const hideTip = () => { $('tip').hidden = true; };

for (const box of [$('messages'), $('columns'), $('sbs-cols'), $('complete-out')]) {
  box.addEventListener('mouseover', showTip);
  box.addEventListener('mouseout', hideTip);
  box.addEventListener('click', showTip);  // a phone has no hover: tap a token
}
document.addEventListener('scroll', hideTip);
