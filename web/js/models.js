// models: the header's model menu over GET /v1/models, which every tab reads (model(), models), and
// its "-" button (POST /v1/models/unload). Tabs follow the menu through onModels and onModel.
import {api} from './api.js';
import {$, guard, showTab} from './dom.js';

// id -> its /v1/models entry (max_model_len, arch, n_params, tokenizer, config, stage, chat)
export const models = {};
export const model = () => $('model').value;

const listChanged = [], picked = [];
export const onModels = fn => listChanged.push(fn);  // fn() after the list of models changes
export const onModel = fn => picked.push(fn);  // fn(entry) when the menu's model (or list) changes

// the model menu from /v1/models, again after a load or an unload (select: the model to pick)
export async function loadModels(select) {
  const data = (await api('/v1/models')).data;
  for (const k of Object.keys(models)) delete models[k];
  for (const m of data) models[m.id] = m;
  $('model').replaceChildren(...data.map(m => new Option(m.id, m.id)));
  const want = select || localStorage.getItem('nanolab.model');
  if (want in models) $('model').value = want;
  for (const fn of listChanged) fn();
  showModel();
}

function showModel() {
  const m = models[model()];
  for (const fn of picked) fn(m);
  localStorage.setItem('nanolab.model', m.id);
  $('model-info').textContent = `${m.arch}, ${(m.n_params / 1e6).toFixed(2)}M parameters, ` +
    `${m.tokenizer} tokenizer, context ${m.max_model_len}`;
}
$('model').onchange = showModel;

$('model-add').onclick = () => {  // the Runs tab lists the models on disk
  showTab('runs');
  $('load-source').focus();
};
$('model-remove').onclick = () => guard($('model-info'), async () => {
  await api('/v1/models/unload', {model: model()});  // the server keeps at least one
  await loadModels();
});
