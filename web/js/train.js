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
import {BYTES, estimates, human, msFor, peak} from './arch.js';

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

// beside the form: what the run will take (arch.js estimates, at the Model tab calculator's peak and
// MFU). train.py: model.py's count of the form's shape; a post-training stage: the model its init_from
// names, from the models on disk (GET /v1/registry)
const POST = {'finetune.py': 1, 'dpo.py': 2, 'reward.py': 2, 'rl.py': 1};  // sequences per batch item
let disk = null;  // GET /v1/registry's entries, fetched once a stage is picked

async function showShape() {
  const names = rows().map(r => r.name), n = ++asked, script = $('train-script').value;
  const get = k => names.includes(k) ? value(rows().find(r => r.name === k)) : null;
  let title = '', lines = [], note = '';
  if ($('train-calc').dataset.script !== script) {  // another stage's estimate is not this one's
    $('train-calc-title').textContent = '';
    $('train-calc').replaceChildren();
  }
  try {
    if (names.includes('n_layer')) {
      title = "This shape (model.py's count)";
      [lines, note] = await shapeLines(get);
    } else if (script in POST) {
      title = 'The model it starts from (init_from)';
      [lines, note] = await sourceLines(get, script);
    }
  } catch (e) {
    lines = [['no estimate', e.message]];
  }
  if (n !== asked) return;
  $('train-calc').dataset.script = script;
  $('train-calc-title').textContent = title;
  $('train-calc').replaceChildren(...lines.map(([k, v]) => el('tr', {}, el('td', {}, k), el('td', {}, v))),
                                  el('caption', {className: 'dim'}, note));
}

// the calculator's peak (or the form's peak_flops) and MFU; dtype 'auto' is fp32 on a CPU (the server's
// device is not known here)
function speed(get) {
  const {peak_gflops, mfu} = peak(), flops = get('peak_flops');
  return {peak_gflops: flops ? flops / 1e9 : peak_gflops, mfu,
          dtype: get('dtype') in BYTES ? get('dtype') : 'float32'};
}
const ms = t => t < 10 ? `${t.toFixed(1)} ms` : `${Math.round(t)} ms`;
const at = c => `at ${c.peak_gflops} GFLOP/s x ${c.mfu}% MFU (the Model tab's calculator), which small models ` +
  'fall short of: the log prints the measured MFU and ETA';

async function shapeLines(get) {
  const shape = Object.fromEntries(SHAPE.filter(k => get(k) !== null).map(k => [k, get(k)]));
  const guessed = !shape.vocab_size;  // 0: the dataset's, unknown here; shakespeare_char's 65 for the estimate
  if (guessed) shape.vocab_size = 65;
  const r = await api('/v1/shape', shape);
  if (r.invalid) throw new Error(r.invalid);
  const B = get('batch_size') || 1, T = r.config.block_size, accum = get('gradient_accumulation_steps') || 1;
  const c = {...speed(get), batch_size: B}, e = estimates(r, c), iter = e.ms_per_iter * accum;
  // each eval: eval_iters batches of train and of val, forward only (~1/3 of a training step's FLOPs)
  const iters = get('max_iters') || 0, every = get('eval_interval');
  const evals = every ? Math.floor(iters / every) + 1 : 0;
  const total = (iters * iter + evals * 2 * (get('eval_iters') || 0) * e.ms_per_iter / 3) / 1000;
  $('train-calc').dataset.params = r.params;
  $('train-calc').dataset.seconds = total;
  return [[['parameters' + (guessed ? ' (vocabulary 65 assumed)' : ''), human(r.params)],
           ['without the embeddings', human(r.params_non_embedding)],
           ['tokens per iteration', (B * T * accum).toLocaleString('en')],
           ['FLOPs per iteration', human(r.flops_per_token * B * T * accum, 'FLOP')],
           [`memory (${c.dtype})`, human(e.train_bytes, 'B')],
           ['time per iteration', ms(iter)],
           [`time: ${iters} iterations, ${evals} evals`, clock(total)]],
          `memory: weights, gradients, AdamW's moments and one micro-batch's activations; time: ${at(c)}`];
}

// a post-training stage: at most batch_size x block_size tokens an iteration (shorter rows are shorter),
// 6 FLOPs per parameter and token (forward and backward), DPO's frozen reference one forward more; LoRA
// trains adapters only, so no gradients or AdamW state for the base (nor a reference copy in DPO)
async function sourceLines(get, script) {
  disk = disk || (await api('/v1/registry')).data;
  const from = String(get('init_from') || ''), name = from.replace(/[\\/]+$/, '').split(/[\\/]/).pop();
  const m = disk.find(x => x.name === name || x.path === from);
  if (!m?.n_params) return [[['init_from', `${from}: not a run on disk here, so no count`]], ''];
  const T = Math.min(get('block_size') || m.block_size, m.block_size);
  const tokens = (get('batch_size') || 1) * T * (get('gradient_accumulation_steps') || 1) * POST[script];
  const c = speed(get), lora = get('lora_r') > 0, bytes = BYTES[c.dtype];
  const reference = script === 'dpo.py' && !lora;  // with LoRA the reference is the base, adapters off
  const flops = 6 * m.n_params * tokens * (script === 'dpo.py' ? 4 / 3 : 1);
  const iter = msFor(flops, c), iters = get('max_iters') || 0;
  const lines = [[`${m.name} (${m.arch}, context ${m.block_size})`, human(m.n_params) + ' parameters'],
                 ['tokens per iteration, at most', tokens.toLocaleString('en')],
                 [`memory (${c.dtype}${lora ? ', LoRA' : ''})`,
                  human(m.n_params * ((lora ? bytes : bytes + 12) + (reference ? bytes : 0)), 'B')]];
  if (script !== 'rl.py') {
    lines.push(['time per iteration', ms(iter)],
               [`time: ${iters} iterations, evals aside`, clock(iters * iter / 1000)]);
  }
  return [lines, `memory: the weights${lora ? '' : ", fp32 gradients and AdamW's moments"}` +
    `${reference ? ", and the frozen reference's copy" : ''}, without activations; ` +
    (script === 'rl.py' ? "rl.py's time is mostly its sampling, not estimated here" : `time: ${at(c)}`)];
}

function pickScript() {
  const s = $('train-script').value;
  disk = null;  // runs may have ended since
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
