// overview: the page's landing tab. Behind its text, the served model's token embeddings in 3-D
// (POST /v1/embedding_map), turning slowly until a drag (mouse or finger) turns them; `embed` is
// exported for the browser tests.
import {api} from './api.js';
import {$, guard, onTab, tabOpen, visible} from './dom.js';
import {hidpi} from './canvas.js';
import {model, onModel} from './models.js';

export const embed = {points: [], tokens: [], yaw: 0.6, pitch: 0.3, drag: null, spin: true};

async function loadEmbeddings() {
  const j = await api('/v1/embedding_map', {model: model(), n: 512});
  Object.assign(embed, {points: j.points, tokens: j.tokens});
  $('embed-info').textContent = `${j.points.length} tokens of ${model()}; the three axes hold ` +
    `${j.explained.map(x => (100 * x).toFixed(0) + '%').join(', ')} of the variance`;
}
onTab('overview', () => guard($('embed-info'), loadEmbeddings));
onModel(() => { if (tabOpen('overview')) guard($('embed-info'), loadEmbeddings); });

// a token's colour by what it is: letters, digits, spaces and newlines, punctuation, the rest
const kindColour = t => /^\s+$/.test(t) ? '#999' : /\d/.test(t) ? '#16a34a' :
  /^[A-Z]/.test(t.trim()) ? '#d62728' : /[a-z]/i.test(t) ? '#2563eb' : '#9333ea';

function drawEmbeddings() {
  if (!tabOpen('overview') || !embed.points.length) return;
  const {ctx, W, H} = hidpi($('embed3d'));
  const [cy, sy] = [Math.cos(embed.yaw), Math.sin(embed.yaw)];
  const [cp, sp] = [Math.cos(embed.pitch), Math.sin(embed.pitch)];
  const R = Math.min(W, H) * 0.42, label = embed.points.length <= 128;
  // rotate about the vertical axis (yaw), then the horizontal (pitch); perspective; far ones first
  const proj = embed.points.map(([x, y, z], i) => {
    const x1 = cy * x + sy * z, z1 = -sy * x + cy * z, y1 = cp * y - sp * z1, z2 = sp * y + cp * z1;
    const f = 2.5 / (2.5 + z2);
    return [W * 0.62 + R * x1 * f, H / 2 - R * y1 * f, f, i];
  }).sort((a, b) => a[2] - b[2]);
  ctx.font = '11px ui-monospace, monospace';
  for (const [x, y, f, i] of proj) {
    ctx.fillStyle = ctx.strokeStyle = kindColour(embed.tokens[i]);
    ctx.globalAlpha = Math.min(1, 0.35 + 0.5 * f);
    ctx.beginPath();
    ctx.arc(x, y, 2.2 * f, 0, 2 * Math.PI);
    ctx.fill();
    if (label) ctx.fillText(visible(embed.tokens[i]), x + 4, y - 3);
  }
  ctx.globalAlpha = 1;
}

(function animate() {  // a slow turn until the user takes hold of it
  if (embed.spin && !embed.drag) embed.yaw += 0.003;
  drawEmbeddings();
  requestAnimationFrame(animate);
})();

const cv = $('embed3d');
cv.onpointerdown = e => {
  embed.drag = [e.clientX, e.clientY];
  embed.spin = false;
  cv.setPointerCapture(e.pointerId);
};
cv.onpointermove = e => {
  if (!embed.drag) return;
  embed.yaw += (e.clientX - embed.drag[0]) * 0.01;
  embed.pitch = Math.max(-1.5, Math.min(1.5, embed.pitch + (e.clientY - embed.drag[1]) * 0.01));
  embed.drag = [e.clientX, e.clientY];
};
cv.onpointerup = cv.onpointercancel = () => { embed.drag = null; };
