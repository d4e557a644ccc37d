// runs: the Runs tab. Each training run's loss curves from GET /runs (polled every 5 s while the
// tab is open, so a run being trained draws itself), with its progress; the runs ticked "compare"
// side by side (their curves on one chart, the settings their config.json differ in, their latest
// evals); then the models on disk (registry.js) and the leaderboard (leaderboard.js).
import {api} from './api.js';
import {$, el, finite, fmt, guard, onTab, tabOpen} from './dom.js';
import {PALETTE, plot} from './canvas.js';
import {leaderboard, lowerBetter} from './leaderboard.js';
import {refreshRegistry, registry} from './registry.js';

let runsData = [];  // the last GET /runs
const chosen = new Set(JSON.parse(localStorage.getItem('nanolab.compare') || '[]'));  // ticked runs
const th = text => el('th', {}, text);

// -----------------------------------------------------------------------------
// 1) a card per run

// a run short of its max_iters: how far it is, and while metrics.jsonl still grows (written in the
// last minute) the time left at the pace of its logged rows (progress.py's ETA, from the rows'
// iteration and training seconds)
function runProgress(r) {
  const max = r.config?.max_iters, rows = r.metrics.filter(x => finite(x.iter) && finite(x.time));
  if (!max || !rows.length || rows.at(-1).iter >= max) return '';
  const a = rows[0], b = rows.at(-1);
  const done = `${b.iter}/${max} (${Math.round(100 * b.iter / max)}%)`;
  if (Date.now() / 1000 - r.updated > 60) return ` · stopped at ${done}`;
  const rate = (b.iter - a.iter) / ((b.time - a.time) || Infinity);  // iterations a second
  const left = rate > 0 ? (max - b.iter) / rate : null, s = Math.round(left);
  const eta = left == null ? '?' : `${Math.floor(s / 60)}:${String(s % 60).padStart(2, '0')}`;
  return ` · training: ${done}, ETA ${eta}`;
}

// a run's card: its name, a "compare" tick, its curves and a line of numbers; kept on a refresh
function runCard(r) {
  const found = document.querySelector(`.run[data-name="${CSS.escape(r.name)}"]`);
  if (found) return found;
  const tick = el('input', {type: 'checkbox', checked: chosen.has(r.name), className: 'cmp-tick'});
  tick.onchange = () => {
    tick.checked ? chosen.add(r.name) : chosen.delete(r.name);
    localStorage.setItem('nanolab.compare', JSON.stringify([...chosen]));
    drawComparison();
  };
  const card = el('div', {className: 'run'},
                  el('h4', {}, el('span'), el('label', {}, tick, ' compare')),
                  el('canvas'), el('div', {className: 'dim'}));
  card.dataset.name = r.name;
  $('run-list').append(card);
  return card;
}

async function refreshRuns() {
  const runs = runsData = (await api('/runs')).data;
  $('runs-status').textContent = `${runs.length} runs with metrics.jsonl · ` +
    `updated ${new Date().toLocaleTimeString()}`;
  for (const r of runs) {
    const card = runCard(r);
    // the same two curves as common.plot_loss_svg: train loss (log rows) and val loss (eval rows)
    const train = r.metrics.filter(x => finite(x.loss)).map(x => [x.iter, x.loss]);
    const val = r.metrics.filter(x => finite(x.val_loss)).map(x => [x.iter, x.val_loss]);
    card.querySelector('h4 span').textContent = r.name + (r.served ? ' (served)' : '');
    plot(card.querySelector('canvas'), [{name: 'train loss', color: '#1f77b4', points: train},
                                        {name: 'val loss', color: '#d62728', points: val}]);
    const last = r.metrics[r.metrics.length - 1] || {}, best = Math.min(...val.map(p => p[1]));
    card.querySelector('.dim').textContent = `iter ${last.iter ?? '-'} · ` +
      `train loss ${fmt(train.at(-1)?.[1])} · best val loss ${val.length ? fmt(best) : '-'}` +
      (r.config?.dataset ? ` · ${r.config.dataset}` : '') + runProgress(r);
  }
  await leaderboard();  // first: it says which metrics are better lower, for the best evals below
  await refreshRegistry();
  drawComparison();
}
onTab('runs', () => guard($('runs-status'), refreshRuns));

setInterval(() => {  // poll while the Runs tab is open, so a run being trained draws itself
  if (tabOpen('runs') && $('live').checked) guard($('runs-status'), refreshRuns);
}, 5000);

// -----------------------------------------------------------------------------
// 2) the chosen runs side by side: their curves on one chart (by iteration, tokens seen or time),
//    the settings in which their config.json differ, and their latest evals

function drawComparison() {
  const runs = runsData.filter(r => chosen.has(r.name));
  $('cmp-plot').classList.toggle('on', runs.length > 0);
  $('cmp-hint').textContent = !runs.length ? 'Tick "compare" on two or more runs above.' :
    `${runs.length} runs: ${runs.map(r => r.name).join(', ')}`;
  if (!runs.length) {
    $('cmp-config').replaceChildren();
    return $('cmp-evals').replaceChildren();
  }
  // x: the iteration; tokens = iteration x batch_size x block_size x accumulation (train.py's
  // tokens per iteration on one process); time = the seconds of training the row logged
  const xs = $('cmp-x').value, ys = $('cmp-y').value;
  const perIter = c => (c?.batch_size || 0) * (c?.block_size || 0) *
    (c?.gradient_accumulation_steps || 1);
  const X = (r, row) => xs === 'time' ? row.time : xs === 'tokens' ? row.iter * perIter(r.config) :
    row.iter;
  const series = [];
  runs.forEach((r, i) => {
    for (const [key, label, dash] of [['val_loss', 'val', []], ['loss', 'train', [4, 3]]]) {
      if (ys !== 'both' && ys !== label) continue;
      const points = r.metrics.filter(row => finite(row[key]) && finite(X(r, row)))
        .map(row => [X(r, row), row[key]]);
      const color = PALETTE[i % PALETTE.length];
      if (points.length) series.push({name: `${r.name} ${label}`, color, dash, points});
    }
  });
  plot($('cmp-plot'), series);
  drawConfigDiff(runs);
  drawEvals(runs);
}
$('cmp-x').onchange = $('cmp-y').onchange = drawComparison;

// every key of config.json whose value is not the same in all the runs
function drawConfigDiff(runs) {
  const keys = [...new Set(runs.flatMap(r => Object.keys(r.config || {})))].sort();
  const show = v => v === undefined ? '(none)' : JSON.stringify(v);
  const differ = keys.filter(k => new Set(runs.map(r => show(r.config?.[k]))).size > 1);
  $('cmp-config').replaceChildren(el('table', {},
    el('tr', {}, th(`config: ${differ.length} of ${keys.length} settings differ`),
       ...runs.map(r => th(r.name))),
    ...differ.map(k => el('tr', {}, el('td', {}, k),
                          ...runs.map(r => el('td', {className: 'diff'}, show(r.config?.[k])))))));
}

// the registry's latest result per task, one column per run, the best in bold
function drawEvals(runs) {
  const evals = Object.fromEntries(registry.map(e => [e.name, e.evals || {}]));
  const rows = [...new Set(runs.flatMap(r => Object.entries(evals[r.name] || {}).flatMap(
    ([task, m]) => Object.keys(m).map(k => `${task}\t${k}`))))].sort();
  if (!rows.length) {
    const none = 'No evaluations of these runs yet (python evaluate.py --init_from=RUN).';
    return $('cmp-evals').replaceChildren(el('span', {className: 'dim'}, none));
  }
  $('cmp-evals').replaceChildren(el('table', {},
    el('tr', {}, th('task'), th('metric'), ...runs.map(r => th(r.name))),
    ...rows.map(row => {
      const [task, k] = row.split('\t'), vals = runs.map(r => evals[r.name]?.[task]?.[k]);
      const known = vals.filter(finite);
      const best = known.length ? (lowerBetter(k) ? Math.min(...known) : Math.max(...known)) : null;
      const mark = v => v === best && known.length > 1 ? 'best' : '';
      return el('tr', {}, el('td', {}, task), el('td', {}, k),
                ...vals.map(v => el('td', {className: mark(v)}, fmt(v, 4))));
    })));
}
