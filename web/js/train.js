// train: the Train tab. Pick a stage (one of the job scripts) and a recipe in configs/, edit the
// settings in a form built from the script's own settings block (GET /v1/recipes: defaults,
// comments, types, allowed values), with model.py's parameter count beside them (POST /v1/shape)
// and the Model tab calculator's memory and time estimates; Start posts a job (POST /v1/jobs).
// While it runs: its state, the log's tail, the loss curve from the run's metrics.jsonl (GET /runs,
// the Runs tab's curve), the ETA its log prints; Stop, then Resume, "Serve it" (POST
// /v1/models/load) and "Evaluate it" (an evaluate.py job, its scores then in the leaderboard).
import {api} from './api.js';
import {$, el, finite, guard, onTab} from './dom.js';
import {plot} from './canvas.js';
import {loadModels} from './models.js';
import {estimates, human, peak} from './arch.js';

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
// seconds as m:ss, or h:mm:ss
const clock = s => s >= 3600 ? `${Math.floor(s / 3600)}:${clock(s % 3600).padStart(5, '0')}` :
  `${Math.floor(s / 60)}:${String(Math.floor(s % 60)).padStart(2, '0')}`;
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

// model.py's parameter count of the form's shape, and what it implies (arch.js estimates, at the Model
// tab calculator's peak and MFU): memory for one micro-batch, time per iteration and for the run
async function showShape() {
  const names = rows().map(r => r.name), n = ++asked;
  if (!names.includes('n_layer')) return $('train-calc').replaceChildren();
  const get = k => names.includes(k) ? value(rows().find(r => r.name === k)) : null;
  const shape = Object.fromEntries(SHAPE.filter(k => names.includes(k)).map(k => [k, get(k)]));
  const guessed = !shape.vocab_size;  // 0: the dataset's, unknown here; shakespeare_char's 65 for the estimate
  if (guessed) shape.vocab_size = 65;
  let lines, note = '';
  try {
    const r = await api('/v1/shape', shape);
    if (r.invalid) throw new Error(r.invalid);
    const B = get('batch_size') || 1, T = r.config.block_size, accum = get('gradient_accumulation_steps') || 1;
    // dtype 'auto' is fp32 on a CPU (the server's device is not known here); peak_flops 0 = the calculator's
    const {peak_gflops, mfu} = peak(), flops = get('peak_flops');
    const c = {batch_size: B, dtype: ['bfloat16', 'float16'].includes(get('dtype')) ? 'bfloat16' : 'float32',
               peak_gflops: flops ? flops / 1e9 : peak_gflops, mfu};
    const e = estimates(r, c), iter = e.ms_per_iter * accum;
    // each eval: eval_iters batches of train and of val, forward only (~1/3 of a training step's FLOPs)
    const iters = get('max_iters') || 0, every = get('eval_interval');
    const evals = every ? Math.floor(iters / every) + 1 : 0;
    const total = (iters * iter + evals * 2 * (get('eval_iters') || 0) * e.ms_per_iter / 3) / 1000;
    const ms = iter < 10 ? iter.toFixed(1) : Math.round(iter);
    lines = [['parameters' + (guessed ? ' (vocabulary 65 assumed)' : ''), human(r.params)],
             ['without the embeddings', human(r.params_non_embedding)],
             ['tokens per iteration', (B * T * accum).toLocaleString('en')],
             ['FLOPs per iteration', human(r.flops_per_token * B * T * accum, 'FLOP')],
             [`memory (${c.dtype})`, human(e.train_bytes, 'B')],
             ['time per iteration', `${ms} ms`],
             [`time: ${iters} iterations, ${evals} evals`, clock(total)]];
    note = `memory: weights, gradients, AdamW's moments and one micro-batch's activations; time: at ` +
      `${c.peak_gflops} GFLOP/s x ${mfu}% MFU (the Model tab's calculator), which small models fall ` +
      `short of: the log prints the measured MFU and ETA`;
    $('train-calc').dataset.params = r.params;
    $('train-calc').dataset.seconds = total;
  } catch (e) {
    lines = [['this shape is not valid', e.message]];
  }
  if (n === asked) $('train-calc').replaceChildren(...lines.map(([k, v]) =>
    el('tr', {}, el('td', {}, k), el('td', {}, v))), el('caption', {className: 'dim'}, note));
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
    const ended = ENDED.includes(job.state), done = ['done', 'stopped'].includes(job.state);
    $('train-stop').disabled = ended;
    $('train-resume').disabled = !(job.state === 'stopped' && job.script === 'train.py');
    $('train-serve').disabled = $('train-eval').disabled = !(done && job.run_dir && job.script !== 'data.py');
    if (ended && job.script === 'evaluate.py' && job.state === 'done') {
      st().textContent = 'evaluated: its scores are in the Runs tab\'s leaderboard';
    }
    await curve();
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
