// leaderboard: the Runs tab's evaluation grid (GET /leaderboard, results.leaderboard_rows), a model
// x benchmark table sortable by any column, each cell its value, 95% interval and paired test
// against the column's best; the models ticked in it on a radar chart; each run's checkpoints, with
// a flag on every metric that dropped significantly (results.checkpoint_history); and the arena's
// ratings. Which metrics are better lower comes with the answer (lower_is_better), and
// lowerBetter() gives it to the rest of the tab.
import {api} from './api.js';
import {$, el, finite, fmt} from './dom.js';
import {PALETTE, radar} from './canvas.js';
import {arenaStats} from './arena.js';

let board = null;  // the last GET /leaderboard
// col: a task (sorted by its sorted_by metric), or 'model'; dir: 1 best first
const boardSort = {col: null, dir: 1};
const radarPick = new Set(JSON.parse(localStorage.getItem('nanolab.radar') || '[]'));
const RADAR_HINT = 'Tick models in the grid to compare them on a radar chart.';

export const lowerBetter = metric => !!board?.lower_is_better.includes(metric);

export async function leaderboard() {
  await arenaStats();  // the arena's ratings show here too
  $('runs-arena').replaceChildren(...[...$('arena-stats').childNodes].map(n => n.cloneNode(true)));
  board = await api('/leaderboard');
  drawBoard();
  drawHistory();
}

const big = v => Math.abs(v) >= 1e6 ? v.toExponential(3) : fmt(v, 4);  // a word perplexity: 1e18
// a row's model, with its checkpoint's file unless that is the run's own (ckpt.pt, best.pt)
const rowLabel = r => r.model +
  (/\/(ckpt|best)\.pt$/.test(r.checkpoint) || !r.checkpoint.endsWith('.pt') ? '' :
    ' ' + r.checkpoint.split('/').pop()) + (r.iter != null ? ` @${r.iter}` : '');

// -----------------------------------------------------------------------------
// 1) the grid

function drawBoard() {
  if (!board.rows.length) {
    $('leaderboard').textContent =
      'No evaluations yet: python evaluate.py --init_from=RUN writes them to RUN/eval/.';
    $('radar').hidden = true;
    return;
  }
  // one column per task, a group's before its subtasks
  const tasks = [...new Map(board.rows.map(r => [r.task, r])).values()];
  const cell = new Map(board.rows.map(r => [rowLabel(r) + '\t' + r.task, r]));
  const value = (m, t) => cell.get(m + '\t' + t.task)?.metrics[t.sorted_by]?.value;
  const models = [...new Set(board.rows.map(rowLabel))];
  if (boardSort.col === 'model') models.sort((a, b) => boardSort.dir * a.localeCompare(b));
  else if (boardSort.col) {
    const t = tasks.find(x => x.task === boardSort.col), sign = lowerBetter(t.sorted_by) ? 1 : -1;
    // best first (dir 1) or worst first; models without the result last either way
    models.sort((a, b) => {
      const va = value(a, t), vb = value(b, t);
      return va == null ? 1 : vb == null ? -1 : boardSort.dir * sign * (va - vb);
    });
  }
  const sorter = (col, text, title) => {
    const arrow = boardSort.col === col ? (boardSort.dir > 0 ? ' ▼' : ' ▲') : '';
    const th = el('th', {className: 'sort', title}, text + arrow);
    th.onclick = () => {
      boardSort.dir = boardSort.col === col ? -boardSort.dir : 1;
      boardSort.col = col;
      drawBoard();
    };
    return th;
  };
  const head = el('tr', {}, sorter('model', 'model', 'sort by name'), el('th', {}, 'radar'),
    ...tasks.map(t => sorter(t.task, '↳ '.repeat(t.depth ? 1 : 0) + t.task.replace(/^\w+:/, ''),
      `${t.task}: ${t.sorted_by} (${lowerBetter(t.sorted_by) ? 'lower' : 'higher'} is better)` +
      (t.group ? `, in ${t.group}` : ''))));
  const units = el('tr', {}, el('th', {}), el('th', {}),
                   ...tasks.map(t => el('th', {className: 'dim'}, t.sorted_by)));
  const rows = models.map(m => {
    const tick = el('input', {type: 'checkbox', checked: radarPick.has(m),
                              className: 'radar-tick'});
    tick.onchange = () => {
      tick.checked ? radarPick.add(m) : radarPick.delete(m);
      localStorage.setItem('nanolab.radar', JSON.stringify([...radarPick]));
      drawRadar(tasks, value);
    };
    return el('tr', {}, el('td', {}, m), el('td', {}, tick), ...tasks.map(t => {
      const r = cell.get(m + '\t' + t.task), s = r?.metrics[t.sorted_by];
      if (!s) return el('td', {});
      const ci = s.ci95 ? `[${fmt(s.ci95[0], 3)}, ${fmt(s.ci95[1], 3)}]` :
        s.stderr != null ? `± ${fmt(s.stderr, 3)}` : '';
      const vs = r.test === 'best' ? 'best' :
        r.p_vs_best != null ? `p=${r.p_vs_best.toPrecision(2)} vs best` : '';
      const title = r.test && r.test !== 'best' ? r.test : '';
      return el('td', {className: r.test === 'best' ? 'best' : '', title},
                big(s.value), el('small', {}, ci), el('small', {}, vs));
    }));
  });
  $('leaderboard').replaceChildren(el('table', {}, head, units, ...rows));
  drawRadar(tasks, value);
}

// -----------------------------------------------------------------------------
// 2) the radar: one axis per benchmark, one polygon per ticked model; each axis from 0 to its best
//    value among all models (a score in [0, 1] such as accuracy is drawn as is; a lower-is-better
//    metric as best / value)

function drawRadar(tasks, value) {
  const cv = $('radar');
  const picked = [...radarPick].filter(m => board.rows.some(r => rowLabel(r) === m));
  cv.hidden = picked.length === 0;
  $('radar-hint').textContent = !picked.length ? RADAR_HINT : `radar: ${picked.join(', ')} ` +
    '(each axis: 0 at the centre, the best model at the rim; scores in [0, 1] as they are)';
  if (cv.hidden) return;
  const all = [...new Set(board.rows.map(rowLabel))];
  const scale = t => {  // value -> [0, 1] on this axis
    const vs = all.map(m => value(m, t)).filter(finite);
    if (lowerBetter(t.sorted_by)) {
      const best = Math.min(...vs);
      return v => v > 0 ? best / v : 0;
    }
    const unit = vs.every(v => v >= 0 && v <= 1), best = Math.max(...vs);
    return v => unit ? v : best > 0 ? v / best : 0;
  };
  const scales = tasks.map(scale);
  radar(cv, tasks.map(t => t.task.replace(/^\w+:/, '')), picked.map((m, i) => ({
    name: m, color: PALETTE[i % PALETTE.length],
    points: tasks.map((t, k) => finite(value(m, t)) ? scales[k](value(m, t)) : 0)})));
}

// -----------------------------------------------------------------------------
// 3) each run's results across its checkpoints, a flag on each metric that dropped significantly
//    from the one before

function drawHistory() {
  if (!board.history.length) return;
  $('history').classList.remove('dim');
  $('history').replaceChildren(...board.history.map(h => {
    const metrics = [...new Set(h.points.flatMap(p => Object.keys(p.metrics)))];
    const flag = (it, m) => h.flags.find(f => f.to_iter === it && f.metric === m);
    const n = h.flags.length;
    const cellOf = (p, m) => {
      const f = flag(p.iter, m);
      if (!f) return el('td', {className: '', title: ''}, fmt(p.metrics[m], 4), '');
      const p2 = f.p.toPrecision(2);
      const title = `dropped from ${fmt(f.before, 4)} at ${f.from_iter}: p=${p2} (${f.test})`;
      return el('td', {className: 'drop', title}, '▼ ' + fmt(p.metrics[m], 4),
                el('small', {}, `p=${p2} vs ${f.from_iter}`));
    };
    return el('div', {className: 'scroll'}, el('b', {}, `${h.run.split('/').pop()} · ${h.task}`),
      n ? el('span', {className: 'err'}, `  ${n} significant drop` + (n > 1 ? 's' : '')) :
        el('span', {className: 'dim'}, '  no significant drop (paired tests, p < 0.05)'),
      el('table', {}, el('tr', {}, el('th', {}, 'iter'), ...metrics.map(m => el('th', {}, m))),
        ...h.points.map(p => el('tr', {}, el('td', {}, String(p.iter)),
                                ...metrics.map(m => cellOf(p, m))))));
  }));
}
