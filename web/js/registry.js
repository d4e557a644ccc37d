// registry: the Runs tab's models on disk (GET /v1/registry): each run with its size, shape, evals and exports,
// and a checkpoint browser under it; "serve" loads one beside the served models (POST /v1/models/load) and the
// model menu picks it; "evaluate" gives the command that evaluates it.
import {api} from './api.js';
import {$, el, fmt, guard} from './dom.js';
import {loadModels} from './models.js';

export let registry = [];  // the last GET /v1/registry: the runs' latest evals, which the comparison reads
const opened = new Set();  // runs whose checkpoint list is open: it stays open as the registry refreshes
const mb = n => n == null ? '' : n >= 1e9 ? (n / 1e9).toFixed(2) + ' GB' : (n / 1e6).toFixed(1) + ' MB';
const safe = s => s.replace(/[^\w.-]/g, '_').slice(0, 64);  // a source's name as a model name
const evalsText = evals => Object.entries(evals).map(([t, m]) => `${t}: ` + Object.entries(m).slice(0, 2)
  .map(([k, v]) => `${k} ${fmt(v, 4)}`).join(', ')).join('; ');  // each task's first two metrics

// the source (a path under the server's runs_dir, or a hub name) joins the model menu, which picks it
async function serveModel(source, name) {
  const m = await api('/v1/models/load', name ? {source, name} : {source});
  await loadModels(m.id);
  await refreshRegistry();
  $('registry-status').textContent = `serving ${m.id}: it is the model menu's choice now`;
}
$('load-btn').onclick = () => guard($('registry-status'), () => serveModel($('load-source').value.trim()));

function serveButton(source, name, served, kind) {
  const title = served ? `served as ${served}` : kind === 'reward' ? 'a reward model scores text, it does not ' +
    'write it' : `load it beside the served models, as ${name}`;
  const b = el('button', {className: 'small', textContent: served ? 'served' : 'serve',
                          disabled: !!served || kind === 'reward', title});
  b.onclick = () => guard($('registry-status'), () => serveModel(source, name));
  return b;
}

function evaluateButton(path) {
  const b = el('button', {className: 'small', textContent: 'evaluate', title: 'the command that evaluates it'});
  b.onclick = () => {  // evaluation runs as its own process; the page gives its command, copied
    const cmd = `python evaluate.py --init_from=${path}   # add --benchmark=FILE or --tasks=NAME`;
    navigator.clipboard?.writeText(cmd).catch(() => {});
    $('registry-status').textContent = cmd;
  };
  return b;
}

// a run's checkpoints as a <details> table, or '' when it has none
function checkpointBrowser(e) {
  if (!e.checkpoints.length) return '';
  const rows = e.checkpoints.map(c => el('tr', {}, el('td', {}, c.file), el('td', {}, String(c.iter ?? '-')),
    el('td', {}, fmt(c.val_loss, 4)), el('td', {}, evalsText(c.evals)),
    el('td', {}, serveButton(c.path, safe(`${e.name}-${c.iter}`), c.served, e.kind), ' ', evaluateButton(c.path))));
  const n = e.checkpoints.length;
  const browser = el('details', {open: opened.has(e.name)}, el('summary', {}, `${n} checkpoint` + (n > 1 ? 's' : '')),
    el('table', {}, el('tr', {}, ...['file', 'iter', 'val loss', 'evals', ''].map(h => el('th', {}, h))), ...rows));
  browser.ontoggle = () => browser.open ? opened.add(e.name) : opened.delete(e.name);  // kept open
  return browser;
}

export async function refreshRegistry() {
  registry = (await api('/v1/registry')).data;
  const rows = registry.map(e => {
    const exports = e.exports.map(x => `${x.path.split('/').pop()} (${x.format}, ${mb(x.size)})`).join(', ');
    return el('tr', {}, el('td', {}, el('b', {}, e.name), checkpointBrowser(e)),
      el('td', {}, serveButton(e.path, safe(e.name), e.served, e.kind), ' ', evaluateButton(e.path)),
      el('td', {}, e.kind), el('td', {}, mb(e.size)), el('td', {}, e.n_params ? (e.n_params / 1e6).toFixed(2) + 'M' : ''),
      el('td', {}, [e.arch, e.tokenizer, e.block_size].filter(x => x != null).join(' · ')),
      el('td', {}, String(e.iter ?? '')), el('td', {}, evalsText(e.evals || {})), el('td', {}, exports));
  });
  const head = ['model', '', 'kind', 'on disk', 'params', 'arch · tokenizer · context', 'iter', 'latest evals',
                'exports'];
  $('registry').replaceChildren(registry.length ? el('table', {}, el('tr', {}, ...head.map(h => el('th', {}, h))),
    ...rows) : el('span', {className: 'dim'}, "No runs under the server's runs_dir (python serve.py --runs_dir=DIR)."));
}
