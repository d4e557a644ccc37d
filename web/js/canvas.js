// canvas: the one HiDPI set-up every canvas on the page draws through, and the drawings that more
// than one view shares: a line chart (loss curves), a layers x positions grid, a radar chart.

export const PALETTE = ['#1f77b4', '#d62728', '#2ca02c', '#9467bd', '#ff7f0e', '#8c564b', '#e377c2',
                        '#17becf'];

// a canvas ready to draw on in CSS pixels, W x H (by default the size CSS gives it), sharp on a
// HiDPI screen: its bitmap holds devicePixelRatio pixels per CSS pixel, and the context is scaled
// to match. -> {ctx, W, H}, the canvas cleared
export function hidpi(cv, W = cv.clientWidth, H = cv.clientHeight) {
  const dpr = devicePixelRatio || 1;
  if (cv.width !== Math.round(W * dpr) || cv.height !== Math.round(H * dpr)) {
    cv.width = Math.round(W * dpr);
    cv.height = Math.round(H * dpr);
  }
  const ctx = cv.getContext('2d');
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, W, H);
  return {ctx, W, H};
}

// the charts sized by CSS draw again whenever their box changes size (a phone turned sideways, a tab
// shown, a window narrowed), each by its redraw; a bitmap drawn for another width would be stretched,
// its labels too small or blurred. Only canvases whose CSS sets their height: resizing the bitmap then
// leaves the box as it is
const resized = new ResizeObserver(entries => {
  for (const {target} of entries) if (target.redraw && target.offsetWidth) target.redraw();
});

// a line chart: series [{name, color, dash, points: [[x, y], ...]}], with axes, ticks and a legend
export function plot(cv, series) {
  cv.series = series;  // what the tests read
  if (!cv.redraw) resized.observe(cv);  // once: observing again would report its size anew (a loop)
  cv.redraw = () => plot(cv, series);
  const {ctx, W, H} = hidpi(cv);
  const pts = series.flatMap(s => s.points);
  if (pts.length < 2) return;
  const m = {l: 44, r: 8, t: 8, b: 22};  // margins for the tick labels
  const [x0, x1] = [Math.min(...pts.map(p => p[0])), Math.max(...pts.map(p => p[0]))];
  const [y0, y1] = [Math.min(...pts.map(p => p[1])), Math.max(...pts.map(p => p[1]))];
  const X = x => m.l + (x - x0) / ((x1 - x0) || 1) * (W - m.l - m.r);
  const Y = y => H - m.b - (y - y0) / ((y1 - y0) || 1) * (H - m.t - m.b);
  ctx.font = '11px system-ui';
  ctx.fillStyle = '#777';
  ctx.strokeStyle = '#eee';
  for (let i = 0; i <= 4; i++) {  // 5 ticks on each axis, with grid lines
    const y = y0 + (y1 - y0) * i / 4, x = x0 + (x1 - x0) * i / 4;
    ctx.beginPath(); ctx.moveTo(m.l, Y(y)); ctx.lineTo(W - m.r, Y(y)); ctx.stroke();
    ctx.textAlign = 'right';
    ctx.fillText(y.toFixed(2), m.l - 4, Y(y) + 4);
    ctx.textAlign = i === 4 ? 'right' : 'center';  // the last x label ends at the right edge
    ctx.fillText(Math.round(x), X(x), H - 6);
  }
  series.forEach((s, i) => {
    ctx.strokeStyle = ctx.fillStyle = s.color;
    ctx.setLineDash(s.dash || []);
    ctx.beginPath();
    s.points.forEach(([x, y], j) => j ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y)));
    ctx.stroke();
    ctx.setLineDash([]);
    ctx.textAlign = 'right';
    ctx.fillText(s.name, W - m.r - 4, m.t + 12 + 14 * i);
  });
}

// a layers x positions grid of numbers m[layer][position], the top row the last layer; darker =
// larger within the grid. CSS scales it to its box; onCell(layer, position) names the cell under
// the pointer.
export function grid(cv, m, onCell) {
  const L = m.length, T = m[0].length, cell = Math.max(6, Math.min(24, Math.floor(520 / T)));
  const max = Math.max(...m.flat(), 1e-9);
  const {ctx} = hidpi(cv, T * cell, L * cell);
  m.forEach((row, l) => row.forEach((v, t) => {
    ctx.fillStyle = `hsl(20, 85%, ${97 - 60 * v / max}%)`;
    ctx.fillRect(t * cell, (L - 1 - l) * cell, cell, cell);
  }));
  cv.onmousemove = e => {
    const r = cv.getBoundingClientRect();
    const t = Math.floor((e.clientX - r.left) / r.width * T);
    const l = L - 1 - Math.floor((e.clientY - r.top) / r.height * L);
    if (m[l]?.[t] != null) onCell(l, t);
  };
}

// a radar chart: one axis per label, clockwise from the top; series [{name, color, points: [v per
// axis]}] with each v in [0, 1], 0 at the centre and 1 at the rim
export function radar(cv, labels, series) {
  cv.series = series;  // what the tests read
  if (!cv.redraw) resized.observe(cv);  // once: observing again would report its size anew (a loop)
  cv.redraw = () => radar(cv, labels, series);
  const {ctx, W, H} = hidpi(cv);
  const cx = W / 2, cy = H / 2 + 10, R = Math.min(W, H) / 2 - 70, n = labels.length;
  const at = (k, r) => {  // axis k, r from the centre
    const a = 2 * Math.PI * k / n;
    return [cx + r * Math.sin(a), cy - r * Math.cos(a)];
  };
  ctx.strokeStyle = '#ddd';
  ctx.font = '11px system-ui';
  for (const ring of [0.25, 0.5, 0.75, 1]) {  // the grid: rings and spokes
    ctx.beginPath();
    for (let k = 0; k <= n; k++) ctx[k ? 'lineTo' : 'moveTo'](...at(k % n, R * ring));
    ctx.stroke();
  }
  labels.forEach((label, k) => {
    ctx.beginPath(); ctx.moveTo(cx, cy); ctx.lineTo(...at(k, R)); ctx.stroke();
    const [x, y] = at(k, R + 14);
    ctx.fillStyle = '#555';
    ctx.textAlign = Math.abs(x - cx) < 5 ? 'center' : x > cx ? 'left' : 'right';
    ctx.fillText(label, x, y + 4);
  });
  series.forEach((s, i) => {
    ctx.strokeStyle = ctx.fillStyle = s.color;
    ctx.beginPath();
    s.points.forEach((v, k) => ctx[k ? 'lineTo' : 'moveTo'](...at(k, R * v)));
    ctx.closePath();
    ctx.globalAlpha = 0.15; ctx.fill(); ctx.globalAlpha = 1; ctx.stroke();
    ctx.textAlign = 'left';
    ctx.fillText(s.name, 8, 16 + 14 * i);
  });
}
