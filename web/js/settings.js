// settings: the chat's sampling sliders, system prompt, JSON schema and shading, kept in
// localStorage; params() is what a chat or completion request sends.
import {$, el} from './dom.js';

// [field sent to the API, label, min, max, step, default]: the sliders' ranges, a comfortable span
// of what serve.py accepts (it checks each field itself, and answers 400 outside its own limits)
const PARAMS = [
  ['temperature', 'temperature (0 = greedy)', 0, 2, 0.05, 0.8],
  ['top_k', 'top-k (0 = off)', 0, 200, 1, 0],
  ['top_p', 'top-p (1 = off)', 0.01, 1, 0.01, 1],
  ['min_p', 'min-p (0 = off)', 0, 0.99, 0.01, 0],
  ['max_tokens', 'max tokens', 1, 2048, 1, 200],
  ['repetition_penalty', 'repetition penalty (1 = off)', 0.5, 2, 0.01, 1],
  ['presence_penalty', 'presence penalty', -2, 2, 0.05, 0],
  ['frequency_penalty', 'frequency penalty', -2, 2, 0.05, 0],
];

// each parameter: a slider and a number box that mirror each other
for (const [name, label, min, max, step, dflt] of PARAMS) {
  const range = el('input', {type: 'range', min, max, step, value: dflt, id: 'p-' + name});
  const box = el('input', {type: 'number', min, max, step, value: dflt});
  range.oninput = () => { box.value = range.value; saveSettings(); };
  box.oninput = () => { range.value = box.value; saveSettings(); };
  $('params').append(el('label', {className: 'param'}, label, box, range));
}
// structured output: with a JSON schema, every reply follows it (response_format: the server
// constrains each token to what the schema allows; the generation path shows what it allowed)
export function params() {
  const p = Object.fromEntries(PARAMS.map(([name]) => [name, Number($('p-' + name).value)]));
  const text = $('schema').value.trim();
  if (!text) return p;
  let schema = text;  // not JSON: sent as it is, and the server's 400 says what is wrong
  try { schema = JSON.parse(text); } catch (e) { /* the hint below says so already */ }
  return {...p, response_format: {type: 'json_schema', json_schema: {name: 'page', schema}}};
}
function checkSchema() {
  const text = $('schema').value.trim();
  try {
    if (text) JSON.parse(text);
    $('schema-hint').textContent = '';
  } catch (e) {
    $('schema-hint').textContent = 'the schema is not JSON: ' + e.message;
  }
}

export function saveSettings() {
  const settings = {params: params(), system: $('system').value, schema: $('schema').value,
                    shade: $('shade').checked};
  localStorage.setItem('nanolab.settings', JSON.stringify(settings));
}

// subtle: the system prompt and shading first, since each slider's oninput saves all the settings
function loadSettings(s) {
  $('system').value = s.system || '';
  $('schema').value = s.schema || '';
  checkSchema();
  $('shade').checked = !!s.shade;
  for (const [name, , , , , dflt] of PARAMS) {
    const range = $('p-' + name);
    range.value = s.params?.[name] ?? dflt;
    range.oninput();
  }
}
loadSettings(JSON.parse(localStorage.getItem('nanolab.settings') || '{}'));
$('system').oninput = saveSettings;
$('schema').oninput = () => { checkSchema(); saveSettings(); };
$('reset-params').onclick = () => {
  loadSettings({system: $('system').value, schema: $('schema').value});
  saveSettings();
};
