// sidebyside: the Compare tab's second mode, one conversation with two to four models at once (or one
// model at different settings). Each column has its own model and sampling settings (the chat's at
// its making, temperature, top-p and max_tokens edited in the column) and its own history (its
// model's replies, not the others'), kept in localStorage across reloads; a message goes to every
// column, and every column streams /v1/chat/completions at the same time (the server batches them),
// each token with its probability (tokens.js) and each column's tokens/s. "Send to arena" hands the
// first two columns' last replies to the Arena tab, to be judged blind (arena.js judgePair).
import {api, sse} from './api.js';
import {$, el, guard} from './dom.js';
import {judgePair} from './arena.js';
import {models, onModels} from './models.js';
import {params} from './settings.js';
import {TOP_LOGPROBS, tokenSpan} from './tokens.js';

// one per column: {model, settings: the request's sampling fields, messages: [{role, content, tokens?,
// meta?}], box}; the columns as they were left, without their boxes
const KEY = 'nanolab.sideBySide', KEEP = 40;  // messages kept per column
const stored = () => { try { return JSON.parse(localStorage.getItem(KEY) || '[]'); } catch { return []; } };
const cols = [].concat(stored()).filter(c => c?.settings && Array.isArray(c.messages)).slice(0, 4);
if (cols.length >= 2) $('sbs-n').value = String(cols.length);
let busy = 0;  // columns still streaming

function save() {
  const kept = cols.map(({box, ...c}) => ({...c, messages: c.messages.slice(-KEEP)}));
  try {
    localStorage.setItem(KEY, JSON.stringify(kept));
  } catch (e) {  // over the browser's quota (~5 MB): keep going, unsaved
    $('sbs-status').textContent = 'these conversations are too large to save; start a new one';
  }
}

$('mode-strategies').onchange = $('mode-models').onchange = () => {
  const sbs = $('mode-models').checked;
  $('sbs').hidden = !sbs;
  $('strategies').hidden = sbs;
  if (sbs && !$('sbs-cols').children.length) setColumns();
};

// a new column starts from the chat's sampling settings (settings.js params(), without a JSON schema)
// and the next served model
function addColumn(i) {
  const names = Object.keys(models), settings = params();
  delete settings.response_format;
  cols.push({model: names[i % names.length], settings, messages: []});
}

function setColumns() {
  const n = Number($('sbs-n').value);
  while (cols.length < n) addColumn(cols.length);
  cols.length = n;
  $('sbs-cols').replaceChildren(...cols.map(column));
  canJudge();
  save();
}
$('sbs-n').onchange = setColumns;
onModels(() => {  // a model unloaded: its columns take the first one served
  for (const c of cols) if (!(c.model in models)) c.model = Object.keys(models)[0];
  if ($('sbs-cols').children.length) setColumns();
});
$('sbs-new').onclick = () => {
  for (const c of cols) c.messages = [];
  setColumns();
};

// a column: its model and settings (fields of c, changed in place), then its conversation; the
// settings it does not show are in its heading's tooltip
function column(c, i) {
  const num = (key, label, min, step) => el('label', {}, label, el('input', {type: 'number', min, step,
    value: c.settings[key], className: 'sbs-' + key,
    oninput: e => { c.settings[key] = Number(e.target.value); save(); }}));
  const pick = el('select', {className: 'sbs-model', onchange: e => { c.model = e.target.value; save(); }},
                  ...Object.keys(models).map(m => new Option(m, m)));
  pick.value = c.model;
  c.box = el('div', {className: 'sbs-msgs'}, ...c.messages.map(message));
  const rest = Object.entries(c.settings).map(([k, v]) => `${k} ${v}`).join(', ');
  return el('div', {className: 'col'}, el('h4', {title: rest}, `column ${i + 1}`),
            el('div', {className: 'row'}, pick, num('temperature', 'temp ', 0, 0.05),
               num('top_p', 'top-p ', 0.01, 0.01), num('max_tokens', 'max ', 1, 1)), c.box);
}

function message(m) {
  const text = el('span', {className: 'text'});
  if (m.tokens) text.append(...m.tokens.map(tokenSpan));
  else text.textContent = m.content;
  const div = el('div', {className: 'msg ' + m.role}, text);
  if (m.meta != null) div.append(el('span', {className: 'meta', textContent: m.meta}));
  return div;
}

// the history as the API takes it: role and content, without the error lines
const history = c => c.messages.filter(m => m.role !== 'error')
  .map(({role, content}) => ({role, content}));

// stream column c's reply to its own history, into a new message drawn as it grows
async function stream(c) {
  const msg = {role: 'assistant', content: '', tokens: [], meta: ''}, div = message(msg);
  const text = div.querySelector('.text'), meta = div.querySelector('.meta');
  c.box.append(div);
  const name = c.model, messages = history(c), t0 = performance.now();
  let finish = 'error';
  try {
    // 1) the prompt + max_tokens must fit the model's context: max_tokens is cut to the room left
    const n = (await api('/tokenize', {model: name, messages, add_generation_prompt: true})).count;
    const room = models[name].max_model_len - n;
    if (room < 1) throw new Error(`the history is ${n} tokens, the whole context of ${name}`);
    const settings = {...c.settings, max_tokens: Math.max(1, Math.min(c.settings.max_tokens, room))};
    const body = {model: name, messages, ...settings, stream: true, logprobs: true,
                  top_logprobs: TOP_LOGPROBS};
    // 2) one event per token: its text, logprob and alternatives (as chat.js draws them)
    for await (const chunk of sse('/v1/chat/completions', body)) {
      const ch = chunk.choices[0];
      if (!ch) continue;
      const delta = ch.delta.content || '', lp = ch.logprobs?.content[0];
      if (delta || lp) {
        const alts = lp ? lp.top_logprobs.map(a => [a.token, a.logprob]) : [];
        const t = [delta, lp ? lp.token : '', lp ? lp.logprob : null, alts];
        msg.tokens.push(t);
        msg.content += delta;
        text.append(tokenSpan(t));
      }
      if (ch.finish_reason) finish = ch.finish_reason;
    }
    const s = (performance.now() - t0) / 1000, k = msg.tokens.filter(t => t[2] != null).length;
    msg.meta = `${name} · temperature ${settings.temperature} · ${k} tokens in ${s.toFixed(1)} s ` +
      `(${(k / s).toFixed(1)} tok/s) · ${finish}`;
    // what wrote it, for the arena (the column's menu may change before the pair is sent)
    Object.assign(msg, {model: name, settings});
    c.messages.push(msg);
  } catch (e) {
    c.messages.push({role: 'error', content: e.message});
    div.replaceWith(message(c.messages.at(-1)));
    return;
  } finally {
    save();
  }
  meta.textContent = msg.meta;
}

async function send() {
  const content = $('sbs-input').value;
  if (!content.trim() || busy) return;
  $('sbs-input').value = '';
  for (const c of cols) {
    c.messages.push({role: 'user', content});
    c.box.append(message(c.messages.at(-1)));
  }
  busy = cols.length;
  $('sbs-send').disabled = true;
  canJudge();
  // every column at once; each one's end (or error) is its own
  await Promise.all(cols.map(c => stream(c).finally(() => { busy -= 1; })));
  $('sbs-send').disabled = false;
  canJudge();
}
$('sbs-form').onsubmit = e => { e.preventDefault(); guard($('sbs-status'), send); };
$('sbs-input').onkeydown = e => {  // Enter sends, Shift+Enter is a new line
  if (e.key === 'Enter' && !e.shiftKey) {
    e.preventDefault();
    $('sbs-form').requestSubmit();
  }
};

// the first two columns' last replies, when both answered the last message
const lastPair = () => cols.slice(0, 2).map(c => c.messages.at(-1))
  .every(m => m?.role === 'assistant') ? cols.slice(0, 2) : null;
function canJudge() { $('sbs-arena').disabled = busy > 0 || !lastPair(); }

// subtle: an arena item has one prompt, so the pair is judged as replies to the last message; in a
// longer conversation each reply also followed its own column's earlier replies
$('sbs-arena').onclick = () => {
  const pair = lastPair();
  if (!pair) return;
  const prompt = pair[0].messages.at(-2).content;
  judgePair(prompt, pair.map(c => {
    const m = c.messages.at(-1);
    return {model: m.model, text: m.content, settings: m.settings};
  }));
};
