// prompts: the template library (GET /v1/templates) and one's own templates (kept in localStorage),
// with their variables, few-shot examples and chain of thought, rendered by the server (POST
// /v1/templates/render: the ids the model sees); "Use in chat" puts the result in the chat's system
// prompt and message box.
import {api} from './api.js';
import {$, el, guard, onTab, showTab} from './dom.js';
import {model} from './models.js';
import {saveSettings} from './settings.js';

// name -> the /v1/templates entry, or {own: true, template: text, variables, ...}
let templates = {};
const ownTemplates = () => JSON.parse(localStorage.getItem('nanolab.templates') || '{}');

async function loadTemplates() {
  templates = Object.fromEntries((await api('/v1/templates')).data.map(t => [t.name, t]));
  for (const [name, text] of Object.entries(ownTemplates())) {
    const variables = [...new Set([...text.matchAll(/\{(\w+)\}/g)].map(m => m[1]))];
    templates['my:' + name] = {name: 'my:' + name, own: true, template: text, kind: 'your own',
                               description: 'saved in this browser', variables, cot: false,
                               example: {}};
  }
  const keep = $('tpl').value;
  $('tpl').replaceChildren(...Object.values(templates).map(t =>
    new Option(`${t.name} (${t.kind})`, t.name)));
  if (keep in templates) $('tpl').value = keep;
  showTemplate();
}
onTab('prompts', () => {
  if (!Object.keys(templates).length) guard($('tpl-count'), loadTemplates);
});

function showTemplate() {
  const t = templates[$('tpl').value];
  if (!t) return;
  $('tpl-desc').textContent = t.description + (t.chat ? ' · a chat template' : '');
  $('tpl-cot').disabled = !t.cot;
  if (!t.cot) $('tpl-cot').checked = false;
  $('tpl-vars').replaceChildren(...t.variables.map(v => el('label', {}, v,
    el('textarea', {rows: 1, value: t.example[v] ?? '', className: 'tpl-var', name: v}))));
  if (t.own) { $('own-name').value = t.name.slice(3); $('own-text').value = t.template; }
}
$('tpl').onchange = showTemplate;

function templateBody() {
  const t = templates[$('tpl').value], variables = {};
  for (const e of document.querySelectorAll('.tpl-var')) variables[e.name] = e.value;
  let examples = [];
  const k = Number($('tpl-k').value);
  if (k > 0) {
    examples = $('tpl-examples').value.split('\n').filter(l => l.trim()).map(l => JSON.parse(l));
  }
  const shots = {examples, k, seed: Number($('tpl-seed').value)};
  return {model: model(), variables, cot: $('tpl-cot').checked, shots,
          ...(t.own ? {text: t.template} : {template: t.name})};
}

async function previewTemplate() {
  const j = await api('/v1/templates/render', templateBody());
  $('tpl-preview').textContent = !j.chat ? j.prompt :
    j.prompt.map(m => `[${m.role}]\n${m.content}`).join('\n\n');
  $('tpl-preview').dataset.tokens = JSON.stringify(j.tokens);
  $('tpl-count').textContent = `${j.count} tokens of ${model()}'s ${j.max_model_len}` +
    (j.count >= j.max_model_len ? ': too long for its context' : '');
  return j;
}
$('tpl-preview-btn').onclick = () => guard($('tpl-count'), previewTemplate);

// into the chat: the system turn as its system prompt, the last user turn in its message box
$('tpl-use').onclick = () => guard($('tpl-count'), async () => {
  const j = await previewTemplate();
  const msgs = j.chat ? j.prompt : [{role: 'user', content: j.prompt}];
  const system = msgs.find(m => m.role === 'system');
  $('system').value = system ? system.content : $('system').value;
  saveSettings();
  $('input').value = msgs.filter(m => m.role === 'user').at(-1).content;
  showTab('chat');
});

$('own-save').onclick = () => guard($('tpl-count'), async () => {
  const name = $('own-name').value.trim(), text = $('own-text').value;
  if (!/^\w+$/.test(name)) throw new Error('name your template with letters, digits or _');
  if (!text.trim()) throw new Error('write the template text, with {variables}');
  localStorage.setItem('nanolab.templates', JSON.stringify({...ownTemplates(), [name]: text}));
  await loadTemplates();
  $('tpl').value = 'my:' + name;
  showTemplate();
});
$('own-delete').onclick = () => guard($('tpl-count'), async () => {
  const own = ownTemplates();
  delete own[$('own-name').value.trim()];
  localStorage.setItem('nanolab.templates', JSON.stringify(own));
  await loadTemplates();
});
