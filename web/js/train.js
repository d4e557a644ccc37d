// train: the Train tab. Pick a stage (one of the job scripts) and a recipe in configs/, edit the
// settings in a form built from the script's own settings block (GET /v1/recipes: defaults,
// comments, types, allowed values), with model.py's parameter count beside them (POST /v1/shape);
// Start posts a job (POST /v1/jobs). While it runs: its state, the log's tail, the loss curve from
// the run's metrics.jsonl (GET /runs, the Runs tab's curve), the ETA its log prints; Stop, then
// Resume, "Serve it" (POST /v1/models/load) and "Evaluate it" (an evaluate.py job).
import {api} from './api.js';
import {$, el, finite, guard, onTab} from './dom.js';
import {plot} from './canvas.js';
import {loadModels} from './models.js';

// the settings shown first; the rest fold into "all settings"
const FIRST = ['max_iters', 'batch_size', 'block_size', 'n_layer', 'n_head', 'n_embd', 'learning_rate',
               'device', 'out_dir', 'init_from', 'dataset'];
const SHAPE = ['arch', 'positions', 'n_layer', 'n_head', 'n_kv_head', 'n_embd', 'ffn_hidden', 'block_size',
               'vocab_size', 'tie_embeddings', 'bias'];
const ENDED = ['done', 'failed', 'stopped', 'lost'];
let book = null;   // the last GET /v1/recipes
let base = {};     // the form's starting values: the defaults with the recipe over them
let job = null;    // the job this tab follows (its id kept across reloads)
let log = '', offset = 0, asked = 0;

const rows = () => book.scripts[$('train-script').value];
const recipe = () => book.data.find(r => r.config === $('train-recipe').value);
const show = v => v === null ? '' : Array.isArray(v) ? JSON.stringify(v) : String(v);

// -----------------------------------------------------------------------------
// 1) the form: one input per setting, typed by its default, the comment as its title

function input(r, v) {
  const id = 't-' + r.name;
  if (r.type === 'bool') return el('input', {type: 'checkbox', id, checked: v});
  if (r.choices) {
    const s = el('select', {id}, ...r.choices.map(c => new Option(c === '' ? "''" : c, c)));
    s.value = v;
    return s;
  }
  const num = r.type === 'int' || r.type === 'float';
  return el('input', {id, type: num ? 'number' : 'text', step: r.type === 'int' ? 1 : 'any', value: show(v)});
}

function buildForm() {
  const rec = recipe();
  base = Object.fromEntries(rows().map(r => [r.name, r.default]));
  Object.assign(base, rec?.values || {});
  $('train-about').textContent = rec ? rec.about : 'The script\'s defaults.';
  const field = r => {
    const box = input(r, base[r.name]);
    box.oninput = box.onchange = showShape;
    return el('label', {title: r.comment}, r.name, box);
  };
  const first = FIRST.map(k => rows().find(r => r.name === k)).filter(Boolean);
  $('train-main').replaceChildren(...first.map(field));
  $('train-more').replaceChildren(...rows().filter(r => !first.includes(r)).map(field));
  showShape();
}

// the form's value of a setting, as the JSON the configurator reads
function value(r) {
  const e = $('t-' + r.name);
  if (r.type === 'bool') return e.checked;
  if (r.type === 'int' || r.type === 'float') return e.value === '' ? null : Number(e.value);
  if (r.type === 'str' || r.choices) return e.value;
  try { return JSON.parse(e.value || 'null'); } catch { return e.value; }  // lists, None
}

// what the job sends: the settings that differ from the recipe's, and the lines "key=value" typed below
function settings() {
  const out = {};
  for (const r of rows()) {
    const v = value(r);
    if (JSON.stringify(v) !== JSON.stringify(base[r.name])) out[r.name] = v;
  }
  for (const line of $('train-extra').value.split('\n').map(s => s.trim().replace(/^--/, '')).filter(Boolean)) {
    const at = line.indexOf('=');
    if (at < 1) throw new Error(`"${line}": write one setting a line, as key=value`);
    out[line.slice(0, at)] = line.slice(at + 1);
  }
  return out;
}

// model.py's parameter count of the form's shape, and what it implies for one iteration
async function showShape() {
  const names = rows().map(r => r.name), n = ++asked;
  if (!names.includes('n_layer')) return $('train-calc').replaceChildren();
  const shape = Object.fromEntries(SHAPE.filter(k => names.includes(k)).map(k =>
    [k, value(rows().find(r => r.name === k))]));
  const guessed = !shape.vocab_size;  // 0: the dataset's, unknown here; shakespeare_char's 65 for the estimate
  if (guessed) shape.vocab_size = 65;
  let lines;
  try {
    const r = await api('/v1/shape', shape);
    if (r.invalid) throw new Error(r.invalid);
    const B = value(rows().find(x => x.name === 'batch_size')) || 1, T = r.config.block_size;
    lines = [['parameters' + (guessed ? ' (vocabulary 65 assumed)' : ''), (r.params / 1e6).toFixed(3) + ' M'],
             ['without the embeddings', (r.params_non_embedding / 1e6).toFixed(3) + ' M'],
             ['tokens per iteration', (B * T).toLocaleString('en')],
             ['weights + AdamW, fp32', (r.params * 16 / 1e6).toFixed(1) + ' MB'],
             ['training FLOPs per iteration', (r.flops_per_token * B * T / 1e9).toFixed(2) + ' G']];
    $('train-calc').dataset.params = r.params;
  } catch (e) {
    lines = [['this shape is not valid', e.message]];
  }
  if (n === asked) $('train-calc').replaceChildren(...lines.map(([k, v]) =>
    el('tr', {}, el('td', {}, k), el('td', {}, v))));
}

function pickScript() {
  const s = $('train-script').value;
  const mine = book.data.filter(r => r.script === s);
  $('train-recipe').replaceChildren(new Option('(none: the defaults)', ''),
    ...mine.map(r => new Option(r.name, r.config)));
  if (s === 'train.py' && mine.some(r => r.name === 'shakespeare_char')) $('train-recipe').value = 'configs/shakespeare_char.py';
  buildForm();
}

// -----------------------------------------------------------------------------
// 2) the job: started, followed (state, log, curve, ETA) until it ends, stopped, resumed, served, evaluated

async function start(script, config, extra) {
  job = await api('/v1/jobs', {script, config: config || null, settings: extra});
  localStorage.setItem('nanolab.trainJob', job.id);
  log = '';
  offset = 0;
  $('train-log').textContent = '';
  plot($('train-curve'), []);
  await follow();
}

const clock = s => `${Math.floor(s / 60)}:${String(Math.round(s % 60)).padStart(2, '0')}`;

async function follow() {
  while (job) {
    const id = job.id;
    job = await api(`/v1/jobs/${id}`);
    for (;;) {  // the log since the last look (64 kB an answer)
      const part = await api(`/v1/jobs/${id}/log?offset=${offset}`);
      log = (log + part.text).slice(-20000);
      if (part.next_offset === offset) break;
      offset = part.next_offset;
    }
    const lines = log.trimEnd().split('\n');
    $('train-log').textContent = lines.slice(-12).join('\n');
    $('train-log').scrollTop = $('train-log').scrollHeight;  // the newest lines in view
    const eta = [...log.matchAll(/ETA (\d+:\d\d(?::\d\d)?)/g)].pop()?.[1];
    const since = job.started ? (job.ended || Date.now() / 1000) - job.started : 0;
    $('train-state').textContent = `${job.script} ${job.id}: ${job.state}` +
      (job.exit_code != null ? ` (exit code ${job.exit_code})` : '') +
      (job.started ? ` · ${clock(since)} elapsed` : '') + (eta && job.state === 'running' ? ` · ETA ${eta}` : '');
    $('train-state').classList.toggle('err', ['failed', 'lost'].includes(job.state));
    await curve();
    const ended = ENDED.includes(job.state), done = ['done', 'stopped'].includes(job.state);
    $('train-stop').disabled = ended;
    $('train-resume').disabled = !(job.state === 'stopped' && job.script === 'train.py');
    $('train-serve').disabled = $('train-eval').disabled = !(done && job.run_dir && job.script !== 'data.py');
    if (ended || id !== job.id) return;
    await new Promise(ok => setTimeout(ok, 1000));
    if (id !== job?.id) return;  // another job was started meanwhile: that one is followed
  }
}

// the run's train and val loss from its metrics.jsonl (GET /runs names runs by their folder)
async function curve() {
  if (!job.run_dir) return;
  const name = job.run_dir.split(/[\\/]/).pop();
  const r = (await api('/runs')).data.find(x => x.name === name);
  if (!r) return;
  const pts = key => r.metrics.filter(x => finite(x[key])).map(x => [x.iter, x[key]]);
  plot($('train-curve'), [{name: 'train loss', color: '#1f77b4', points: pts('loss')},
                          {name: 'val loss', color: '#d62728', points: pts('val_loss')}]);
}

const st = () => $('train-status');
$('train-form').onsubmit = e => {
  e.preventDefault();
  guard(st(), () => start($('train-script').value, $('train-recipe').value, settings()));
};
$('train-stop').onclick = () => guard(st(), async () => { job = await api(`/v1/jobs/${job.id}/stop`, {}); });
$('train-resume').onclick = () => guard(st(), () =>
  start(job.script, job.config, {...job.settings, init_from: 'resume'}));
$('train-serve').onclick = () => guard(st(), async () => {
  const m = await api('/v1/models/load', {source: job.run_dir});
  await loadModels(m.id);
  st().textContent = `serving ${m.id}: it is the model menu's choice now (Chat, Runs)`;
});
$('train-eval').onclick = () => guard(st(), () =>
  start('evaluate.py', null, {init_from: job.run_dir, device: job.settings.device || 'auto'}));
$('train-script').onchange = pickScript;
$('train-recipe').onchange = buildForm;

onTab('train', () => guard(st(), async () => {
  if (book) return;
  book = await api('/v1/recipes');
  $('train-script').replaceChildren(...Object.keys(book.scripts).map(s => new Option(s, s)));
  $('train-script').value = 'train.py';
  pickScript();
  const last = localStorage.getItem('nanolab.trainJob');  // a job started before a reload: followed again
  if (last && !job) {
    job = (await api('/v1/jobs')).data.find(j => j.id === last) || null;
    if (job) await follow();
  }
}));
