// registry: the Runs tab's models on disk (GET /v1/registry): each run with its size, shape, evals
// and exports, and a checkpoint browser under it; "serve" loads one beside the served models (POST
// /v1/models/load) and the model menu picks it; "evaluate" gives the command that evaluates it.
import {api} from './api.js';
import {$, el, fmt, guard} from './dom.js';
import {loadModels} from './models.js';

// the last GET /v1/registry: the runs' latest evals, which the comparison reads
export let registry = [];
const opened = new Set();  // runs whose checkpoint list is open: it stays open on a refresh
const mb = n => n == null ? '' : n >= 1e9 ? (n / 1e9).toFixed(2) + ' GB' :
  (n / 1e6).toFixed(1) + ' MB';
// each task's first two metrics
const evalsText = evals => Object.entries(evals).map(([t, m]) => `${t}: ` +
  Object.entries(m).slice(0, 2).map(([k, v]) => `${k} ${fmt(v, 4)}`).join(', ')).join('; ');
const row = (...cells) => el('tr', {}, ...cells.map(c => el('td', {}, ...[c].flat())));
const headRow = names => el('tr', {}, ...names.map(h => el('th', {}, h)));

// the source (a path under the server's runs_dir, or a hub name) joins the menu, which picks it
async function serveModel(source, name) {
  const m = await api('/v1/models/load', name ? {source, name} : {source});
  await loadModels(m.id);
  await refreshRegistry();
  $('registry-status').textContent = `serving ${m.id}: it is the model menu's choice now`;
}
$('load-btn').onclick = () => {
  guard($('registry-status'), () => serveModel($('load-source').value.trim()));
};

function serveButton(source, name, served, kind) {
  const title = served ? `served as ${served}` :
    kind === 'reward' ? 'a reward model scores text, it does not write it' :
    `load it beside the served models, as ${name}`;
  const b = el('button', {className: 'small', textContent: served ? 'served' : 'serve',
                          disabled: !!served || kind === 'reward', title});
  b.onclick = () => guard($('registry-status'), () => serveModel(source, name));
  return b;
}

function evaluateButton(path) {
  const b = el('button', {className: 'small', textContent: 'evaluate',
                          title: 'the command that evaluates it'});
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
  const rows = e.checkpoints.map(c => row(c.file, String(c.iter ?? '-'), fmt(c.val_loss, 4),
    evalsText(c.evals), [serveButton(c.path, c.model_name, c.served, e.kind), ' ',
                         evaluateButton(c.path)]));
  const n = e.checkpoints.length;
  const summary = el('summary', {}, `${n} checkpoint` + (n > 1 ? 's' : ''));
  const browser = el('details', {open: opened.has(e.name)}, summary,
    el('table', {}, headRow(['file', 'iter', 'val loss', 'evals', '']), ...rows));
  browser.ontoggle = () => browser.open ? opened.add(e.name) : opened.delete(e.name);  // kept open
  return browser;
}

export async function refreshRegistry() {
  registry = (await api('/v1/registry')).data;
  // the hub models already in the Hugging Face cache: the load box offers their names
  $('hub-models').replaceChildren(...registry.filter(e => e.kind === 'hub')
    .map(e => el('option', {value: e.name})));
  const rows = registry.map(e => {
    const exports = e.exports.map(x => `${x.path.split('/').pop()} (${x.format}, ${mb(x.size)})`);
    return row([el('b', {}, e.name), checkpointBrowser(e)],
      [serveButton(e.path, e.model_name, e.served, e.kind), ' ', evaluateButton(e.path)],
      e.kind, mb(e.size), e.n_params ? (e.n_params / 1e6).toFixed(2) + 'M' : '',
      [e.arch, e.tokenizer, e.block_size].filter(x => x != null).join(' · '),
      String(e.iter ?? ''), evalsText(e.evals || {}), exports.join(', '));
  });
  const head = ['model', '', 'kind', 'on disk', 'params', 'arch · tokenizer · context', 'iter',
                'latest evals', 'exports'];
  const none = "No runs under the server's runs_dir (python serve.py --runs_dir=DIR), and no " +
    'models in the Hugging Face cache.';
  $('registry').replaceChildren(registry.length ? el('table', {}, headRow(head), ...rows) :
    el('span', {className: 'dim'}, none));
}
