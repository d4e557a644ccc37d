// nanolab's page: plain JavaScript over serve.py's API, read top to bottom like the Python scripts.
//   1) helpers: the JSON API, server-sent events, downloads
//   2) models and tabs
//   3) chat: settings, conversations in localStorage, streaming replies, token probabilities, export
//   4) inspect: tokens (/tokenize, /detokenize), the attention heatmap (/v1/attention), the logit lens and the
//      activation flow (/v1/inspect), three tokenizers side by side (/v1/tokenizers)
//   5) compare: one prompt under several decoding strategies (/v1/completions, in parallel), and the beam tree
//   6) model: the served model's blocks, and a calculator of parameters, FLOPs, memory and time for any shape
//   8) overview: the token embeddings in 3-D behind the pipeline (/v1/embedding_map)
//  10) prompts: the template library, variables, few-shot examples, the exact prompt and its token count
//   9) arena: two replies shown blind, a vote and ratings (/v1/arena/*), the ratings and agreement so far
//   7) runs: loss curves from /runs (polled while a run trains), chosen runs compared, the models on disk and their
//      checkpoints (/v1/registry, served with /v1/models/load), and the leaderboard (/leaderboard)
'use strict';

// -----------------------------------------------------------------------------
// 1) helpers

const $ = id => document.getElementById(id);
const el = (tag, props = {}, ...kids) => {  // el('b', {className: 'x'}, 'text', child) -> a new element
  const e = Object.assign(document.createElement(tag), props);
  e.append(...kids);
  return e;
};
const fmt = (x, d = 3) => x == null ? '' : Number(x).toFixed(d);

// fetch with the server's API key (serve.py --api_key): asked for when the server answers 401, then kept for this
// browser session (sessionStorage: gone when the tab closes) and sent as 'Authorization: Bearer <key>'
async function keyedFetch(path, init) {
  for (;;) {
    const key = sessionStorage.getItem('nanolab_api_key');
    const r = await fetch(path, {...init, headers: {...init.headers, ...(key ? {Authorization: `Bearer ${key}`} : {})}});
    if (r.status !== 401) return r;
    const typed = prompt('This server needs its API key (the --api_key it was started with):');
    if (!typed) return r;
    sessionStorage.setItem('nanolab_api_key', typed);
  }
}

// POST body (or GET when body is undefined) -> the parsed JSON; an API error body becomes a thrown Error
async function api(path, body, signal) {
  const init = body === undefined ? {signal, headers: {}} :
    {method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body), signal};
  const r = await keyedFetch(path, init);
  const j = await r.json();
  if (!r.ok || j.error) throw new Error(j.error ? j.error.message : r.statusText);
  return j;
}

// POST with "stream": true -> yields each server-sent event's JSON until "data: [DONE]". fetch + ReadableStream
// rather than EventSource, which can only GET. Aborting `signal` closes the connection; serve.py notices the
// closed socket between tokens and frees the request's batch slot.
async function* sse(path, body, signal) {
  const r = await keyedFetch(path, {method: 'POST', headers: {'Content-Type': 'application/json'},
                                    body: JSON.stringify(body), signal});
  if (!r.ok) throw new Error((await r.json()).error.message);
  const reader = r.body.getReader(), decoder = new TextDecoder();
  let buf = '';
  for (;;) {
    const {done, value} = await reader.read();
    // a stream that ends without data: [DONE] was cut (the server failed or the connection dropped): not finished
    if (done) throw new Error('the stream ended before it was complete (no [DONE]); try again');
    // subtle: a network read may end mid-event (or mid-character: {stream: true} keeps the partial bytes), so
    // only the complete events before the last blank line are parsed; the rest waits for the next read
    buf += decoder.decode(value, {stream: true});
    const events = buf.split('\n\n');
    buf = events.pop();
    for (const e of events) {
      const data = e.replace(/^data: /, '');
      if (data === '[DONE]') return;
      const j = JSON.parse(data);
      if (j.error) throw new Error(j.error.message);  // an error after the stream began comes as an event
      yield j;
    }
  }
}

function download(name, text, type) {
  const a = el('a', {href: URL.createObjectURL(new Blob([text], {type})), download: name});
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

// run an async action from a button; its error goes to a status line instead of the console
async function guard(statusEl, fn) {
  try {
    statusEl.textContent = '';
    statusEl.classList.remove('err');
    await fn();
  } catch (e) {
    statusEl.textContent = e.message;
    statusEl.classList.add('err');
  }
}

// -----------------------------------------------------------------------------
// 2) models and tabs

const models = {};  // id -> its /v1/models entry (max_model_len, arch, n_params, tokenizer)
const model = () => $('model').value;

// the model menu from /v1/models, again after a load or an unload (select: the model to pick, if it is there)
async function loadModels(select) {
  const data = (await api('/v1/models')).data;
  for (const k of Object.keys(models)) delete models[k];
  for (const m of data) models[m.id] = m;
  $('model').replaceChildren(...data.map(m => new Option(m.id, m.id)));
  const want = select || localStorage.getItem('nanolab.model');
  if (want in models) $('model').value = want;
  if ($('arena-m1').options.length) arenaModels();
  showModel();
}
$('model-add').onclick = () => { showTab('runs'); $('load-source').focus(); };
$('model-remove').onclick = () => guard($('model-info'), async () => {
  await api('/v1/models/unload', {model: model()});  // the server keeps at least one
  await loadModels();
});

// POST /v1/models/load: the source (a path under the server's runs_dir, or a hub name) joins the model menu
async function serveModel(source, name) {
  const m = await api('/v1/models/load', name ? {source, name} : {source});
  await loadModels(m.id);
  await refreshRegistry();
  $('registry-status').textContent = `serving ${m.id}: it is the model menu's choice now`;
}
$('load-btn').onclick = () => guard($('registry-status'), () => serveModel($('load-source').value.trim()));

function showModel() {
  const m = models[model()];
  setMode(m.chat ? 'chat' : 'complete');  // a base model continues text; a fine-tuned one chats
  if ($('overview').classList.contains('on')) guard($('embed-info'), loadEmbeddings);
  localStorage.setItem('nanolab.model', m.id);
  $('model-info').textContent = `${m.arch}, ${(m.n_params / 1e6).toFixed(2)}M parameters, ` +
    `${m.tokenizer} tokenizer, context ${m.max_model_len}`;
}
$('model').onchange = showModel;

function showTab(name) {
  for (const b of document.querySelectorAll('#tabs button')) b.classList.toggle('on', b.dataset.tab === name);
  for (const s of document.querySelectorAll('.tab')) s.classList.toggle('on', s.id === name);
  history.replaceState(null, '', '#' + name);  // a reload comes back to this tab
  if (name === 'runs') guard($('runs-status'), refreshRuns);
  if (name === 'arch') showArch();
  if (name === 'prompts' && !Object.keys(templates).length) guard($('tpl-count'), loadTemplates);
  if (name === 'arena') { if (!$('arena-m1').options.length) arenaModels(); guard($('arena-status'), arenaStats); }
  if (name === 'overview') guard($('embed-info'), loadEmbeddings);
}
for (const b of document.querySelectorAll('#tabs button')) b.onclick = () => showTab(b.dataset.tab);

// -----------------------------------------------------------------------------
// 3) chat

// [field sent to the API, label, min, max, step, default]; serve.py checks the same ranges (_read_request)
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
const TOP_LOGPROBS = 5;  // alternatives kept per generated token, for the tooltip

// each parameter: a slider and a number box that mirror each other
for (const [name, label, min, max, step, dflt] of PARAMS) {
  const range = el('input', {type: 'range', min, max, step, value: dflt, id: 'p-' + name});
  const box = el('input', {type: 'number', min, max, step, value: dflt});
  range.oninput = () => { box.value = range.value; saveSettings(); };
  box.oninput = () => { range.value = box.value; saveSettings(); };
  $('params').append(el('label', {className: 'param'}, label, box, range));
}
const params = () => Object.fromEntries(PARAMS.map(([name]) => [name, Number($('p-' + name).value)]));

function saveSettings() {
  localStorage.setItem('nanolab.settings', JSON.stringify({params: params(), system: $('system').value,
                                                          shade: $('shade').checked}));
}
function loadSettings(s) {
  for (const [name, , , , , dflt] of PARAMS) {
    const range = $('p-' + name);
    range.value = s.params?.[name] ?? dflt;
    range.oninput();
  }
  $('system').value = s.system || '';
  $('shade').checked = !!s.shade;
}
loadSettings(JSON.parse(localStorage.getItem('nanolab.settings') || '{}'));
$('system').oninput = saveSettings;
$('shade').onchange = () => { saveSettings(); renderChat(); };
$('reset-params').onclick = () => { loadSettings({system: $('system').value}); saveSettings(); };

// Conversations stay in this browser (localStorage): [{title, messages: [{role, content, tokens?, meta?}]}].
// A reply's `tokens` are [text shown, token, logprob, [[alternative, logprob], ...]] per generated token.
let convs = JSON.parse(localStorage.getItem('nanolab.convs') || '[]'), cur = 0;
if (!convs.length) convs.push({title: 'New chat', messages: []});

function saveConvs() {
  try {
    localStorage.setItem('nanolab.convs', JSON.stringify(convs));
  } catch (e) {  // over the browser's quota (~5 MB): keep going, unsaved
    $('chat-status').textContent = 'history too large to save; delete old conversations';
  }
}

function renderConvs() {
  $('convs').replaceChildren(...convs.map((c, i) => new Option(c.title, i)));
  $('convs').value = cur;
}
$('convs').onchange = () => { cur = Number($('convs').value); renderChat(); };
$('new-chat').onclick = () => { convs.unshift({title: 'New chat', messages: []}); cur = 0; saveConvs(); renderChat(); };
$('del-chat').onclick = () => {
  convs.splice(cur, 1);
  if (!convs.length) convs.push({title: 'New chat', messages: []});
  cur = 0;
  saveConvs();
  renderChat();
};

// one generated token as a span: its probability shades it (when asked) and shows on hover or tap
function tokenSpan(t) {
  const s = el('span', {className: 'tk', textContent: t[0]});
  s.tok = t;
  if ($('shade').checked && t[2] != null) s.style.background = `hsl(${120 * Math.exp(t[2])}, 75%, 85%)`;
  return s;
}

function renderMessage(m, mi) {
  const text = el('span', {className: 'text'});
  if (m.tokens) text.append(...m.tokens.map((t, k) => Object.assign(tokenSpan(t), {k})));
  else text.textContent = m.content;
  const div = el('div', {className: 'msg ' + m.role}, text);
  div.mi = mi;
  if (m.versions) {  // a reply with branches: < 2/3 >
    const nav = el('span', {className: 'versions'},
      el('button', {textContent: '<', disabled: m.v === 0, onclick: () => switchVersion(mi, m.v - 1)}),
      ` version ${m.v + 1}/${m.versions.length} `,
      el('button', {textContent: '>', disabled: m.v === m.versions.length - 1, onclick: () => switchVersion(mi, m.v + 1)}));
    div.append(nav);
  }
  if (m.meta) div.append(el('span', {className: 'meta', textContent: m.meta}));
  return div;
}

function renderChat() {
  renderConvs();
  $('messages').replaceChildren(...convs[cur].messages.map(renderMessage));
  $('path-box').hidden = true;
}

// the tooltip: a token, its probability, and the alternatives the model weighed at that step
function showTip(e) {
  const t = e.target.tok;
  if (!t) return hideTip();
  const lines = [`${JSON.stringify(t[1])}  p=${fmt(Math.exp(t[2]))}  logprob=${fmt(t[2])}`, 'top alternatives:',
                 ...t[3].map(([tok, lp]) => `  ${JSON.stringify(tok).padEnd(14)} ${fmt(Math.exp(lp))}`)];
  $('tip').textContent = lines.join('\n');
  $('tip').hidden = false;
  const r = e.target.getBoundingClientRect();  // below the token, kept on screen
  $('tip').style.left = Math.max(0, Math.min(r.left, innerWidth - $('tip').offsetWidth - 4)) + 'px';
  $('tip').style.top = (r.bottom + 4) + 'px';
}
const hideTip = () => { $('tip').hidden = true; };
for (const box of [$('messages'), $('columns'), $('complete-out')]) {
  box.addEventListener('mouseover', showTip);
  box.addEventListener('mouseout', hideTip);
  box.addEventListener('click', showTip);  // a phone has no hover: tap a token
}
$('messages').addEventListener('click', e => {  // a reply's token: its generation path, to branch from
  const msg = e.target.closest('.msg.assistant');
  if (e.target.tok && msg && msg.mi != null) showPath(msg.mi, e.target.k);
});
$('path-close').onclick = () => { $('path-box').hidden = true; };
document.addEventListener('scroll', hideTip);

let controller = null;  // the AbortController of the reply being streamed

async function send(content) {
  const conv = convs[cur];
  conv.messages.push({role: 'user', content});
  if (conv.title === 'New chat') conv.title = content.slice(0, 40);
  renderChat();
  await streamReply(conv, {role: 'assistant', content: '', tokens: [], meta: ''});
}

// stream an assistant reply into msg. A new reply is added to the conversation when it ends; a branch (msg already
// the conversation's last message, holding the start of its reply) is continued where it stops, with the chat API's
// continue_final_message, so the model writes on from the token the user chose.
async function streamReply(conv, msg) {
  const name = model(), p = params(), branch = conv.messages.at(-1) === msg;
  const history = conv.messages.filter(m => m.role !== 'error').map(({role, content}) => ({role, content}));
  if ($('system').value.trim()) history.unshift({role: 'system', content: $('system').value});
  const div = branch ? $('messages').lastChild : renderMessage(msg), text = div.querySelector('.text');
  if (!branch) $('messages').append(div);
  div.classList.add('pending');  // the model is working before its first token: the page says so
  controller = new AbortController();
  $('send').disabled = true;
  $('stop').disabled = false;
  const t0 = performance.now(), tokens0 = msg.tokens.length;
  let finish = 'stopped';
  try {
    // 1) the prompt's tokens + max_tokens must fit the model's context: count them through the same chat template
    //    as /v1/chat/completions, and shorten max_tokens to the room left
    const shape = branch ? {continue_final_message: true} : {add_generation_prompt: true};
    const n = (await api('/tokenize', {model: name, messages: history, ...shape})).count;
    const room = models[name].max_model_len - n;
    if (room < 1) throw new Error(`the conversation is ${n} tokens, the whole context of ${name}; start a new chat`);
    // 2) stream the reply: one event per token, each with its logprob and top alternatives
    const body = {...p, model: name, messages: history, max_tokens: Math.min(p.max_tokens, room), stream: true,
                  logprobs: true, top_logprobs: TOP_LOGPROBS, ...(branch ? {continue_final_message: true} : {})};
    for await (const chunk of sse('/v1/chat/completions', body, controller.signal)) {
      const c = chunk.choices[0];
      if (!c) continue;
      const delta = c.delta.content || '', lp = c.logprobs?.content[0];
      if (delta || lp) {
        // subtle: the text of a token may come later than the token (a UTF-8 character split over tokens, or text
        // held back while it could be the start of a stop string), so a span shows the text that arrived with it
        const t = [delta, lp ? lp.token : '', lp ? lp.logprob : null,
                   lp ? lp.top_logprobs.map(a => [a.token, a.logprob]) : []];
        msg.tokens.push(t);
        msg.content += delta;
        div.classList.remove('pending');
        text.append(tokenSpan(t));
      }
      if (c.finish_reason) finish = c.finish_reason;
    }
  } catch (e) {
    if (e.name !== 'AbortError') {
      conv.messages.push({role: 'error', content: e.message});
      finish = 'error';
    }
  } finally {
    const s = (performance.now() - t0) / 1000, k = msg.tokens.slice(tokens0).filter(t => t[2] != null).length;
    msg.meta = `${name} · ${k} tokens in ${s.toFixed(1)} s (${(k / s).toFixed(1)} tok/s) · ${finish}` +
      (branch ? ` · a branch from token ${tokens0}` : '');
    if (!branch && msg.tokens.length) conv.messages.splice(conv.messages.length - (finish === 'error' ? 1 : 0), 0, msg);
    if (msg.versions) Object.assign(msg.versions[msg.v], {content: msg.content, tokens: msg.tokens, meta: msg.meta});
    controller = null;
    $('send').disabled = false;
    $('stop').disabled = true;
    saveConvs();
    renderChat();
  }
}

// the generation path of a reply: each step's chosen token among the alternatives the model weighed, as columns;
// an alternative is a button that branches the conversation there ("what if the model had chosen this")
function showPath(mi, k) {
  const m = convs[cur].messages[mi];
  $('path').replaceChildren(...m.tokens.map((t, i) => {
    const col = el('div', {className: 'step' + (i === k ? ' at' : '')});
    const alts = t[3].length ? t[3] : [[t[1], t[2]]];
    for (const [tok, lp] of alts) {
      const chosen = tok === t[1], b = el('button', {className: chosen ? 'chosen' : '', disabled: chosen || !!controller,
        title: chosen ? 'the token the model chose' : 'continue from here with this token instead'},
        visible(tok), el('small', {}, fmt(Math.exp(lp), 2)));
      b.style.background = shade(Math.exp(lp));
      b.onclick = () => branchAt(mi, i, tok, lp, t[3]);
      col.append(b);
    }
    return col;
  }));
  $('path-box').hidden = false;
  $('path-box').dataset.message = mi;
  $('path').children[k]?.scrollIntoView({block: 'nearest', inline: 'center'});
}

// a new version of reply mi: its first i tokens, then tok, then whatever the model writes next. The versions of a
// reply, each with the messages that followed it, are kept, and the arrows on the reply switch between them.
function branchAt(mi, i, tok, lp, alts) {
  const conv = convs[cur], m = conv.messages[mi];
  if (controller) return;
  if (!m.versions) { m.versions = [{content: m.content, tokens: m.tokens, meta: m.meta}]; m.v = 0; }
  m.versions[m.v].after = conv.messages.slice(mi + 1);  // what followed this version, back when it is chosen again
  const tokens = [...m.tokens.slice(0, i), [tok, tok, lp, alts]];
  m.versions.push({content: tokens.map(t => t[0]).join(''), tokens, meta: ''});
  switchVersion(mi, m.versions.length - 1);
  $('path-box').hidden = true;
  streamReply(conv, m);
}

function switchVersion(mi, v) {
  const conv = convs[cur], m = conv.messages[mi];
  m.versions[m.v].after = conv.messages.slice(mi + 1);
  m.v = v;
  Object.assign(m, {content: m.versions[v].content, tokens: [...m.versions[v].tokens], meta: m.versions[v].meta});
  conv.messages = [...conv.messages.slice(0, mi + 1), ...(m.versions[v].after || [])];
  saveConvs();
  renderChat();
}

$('chat-form').onsubmit = e => {
  e.preventDefault();
  const content = $('input').value;
  if (!content.trim() || controller) return;
  $('input').value = '';
  send(content);
};
$('input').onkeydown = e => {  // Enter sends, Shift+Enter is a new line
  if (e.key === 'Enter' && !e.shiftKey) {
    e.preventDefault();  // subtle: else the Enter's newline lands in the box just emptied, and starts the next message
    $('chat-form').requestSubmit();
  }
};
$('stop').onclick = () => controller?.abort();

// completion mode, for base models: the text so far, which the model continues through /v1/completions (a model
// that was never fine-tuned has not seen the chat template, so its chat replies are noise; GET /v1/models' chat
// flag says which is which, and the mode follows the model until the user picks one)
let completer = null;  // the AbortController of the completion being streamed
function setMode(mode) {
  $('mode-' + mode).checked = true;
  $('complete-box').hidden = mode !== 'complete';
  $('chat-box').hidden = mode === 'complete';
  const m = models[model()];
  $('mode-hint').textContent = m && !m.chat ? `${m.id} was not fine-tuned (${m.stage || 'not a nanolab run'}): ` +
    'it continues text; in Chat it would see a template it never learned' : m ? `${m.id} was fine-tuned (${m.stage})` : '';
}
for (const mode of ['chat', 'complete']) $('mode-' + mode).onchange = () => setMode(mode);

async function complete() {
  const out = $('complete-out').querySelector('.text'), typed = $('complete-input').value;
  if (typed) out.append(el('span', {className: 'typed', textContent: typed}));
  $('complete-input').value = '';
  const prompt = out.textContent, name = model(), p = params();
  if (!prompt) throw new Error('type the start of a text first');
  completer = new AbortController();
  $('complete-go').disabled = true;
  $('complete-stop').disabled = false;
  const t0 = performance.now();
  let k = 0, finish = 'stopped', note = '';
  try {
    // the text and max_tokens must fit the model's context (the API refuses more): a long text is sent as its last
    // tokens, keeping at least half the context for what the model writes
    const L = models[name].max_model_len, ids = (await api('/tokenize', {model: name, prompt})).tokens;
    const maxTok = Math.min(p.max_tokens, Math.max(L - ids.length, Math.floor(L / 2)));
    const sent = ids.length + maxTok > L ? ids.slice(ids.length - (L - maxTok)) : ids;
    if (sent.length < ids.length) note = ` · it saw the last ${sent.length} of the text's ${ids.length} tokens ` +
      `(its context is ${L})`;
    const body = {...p, model: name, prompt: sent, max_tokens: maxTok, stream: true, logprobs: TOP_LOGPROBS};
    for await (const chunk of sse('/v1/completions', body, completer.signal)) {
      const c = chunk.choices[0];
      if (!c) continue;
      const lp = c.logprobs;
      if (c.text || lp?.tokens?.length) {
        const top = lp?.top_logprobs?.[0] || {};
        const t = [c.text, lp?.tokens?.[0] ?? '', lp?.token_logprobs?.[0] ?? null, Object.entries(top)];
        out.append(tokenSpan(t));
        k += 1;
      }
      if (c.finish_reason) finish = c.finish_reason;
    }
  } catch (e) {
    if (e.name !== 'AbortError') throw e;
  } finally {
    const sec = (performance.now() - t0) / 1000;
    $('complete-status').textContent = `${name} · ${k} tokens in ${sec.toFixed(1)} s · ${finish}${note}`;
    completer = null;
    $('complete-go').disabled = false;
    $('complete-stop').disabled = true;
  }
}
$('complete-form').onsubmit = e => {
  e.preventDefault();
  if (!completer) guard($('complete-status'), complete);
};
$('complete-input').onkeydown = e => {
  if (e.key === 'Enter' && !e.shiftKey) {
    e.preventDefault();
    $('complete-form').requestSubmit();
  }
};
$('complete-stop').onclick = () => completer?.abort();
$('complete-clear').onclick = () => { $('complete-out').querySelector('.text').replaceChildren(); };

// export: JSON (the messages as the API takes them, plus settings) or Markdown (for reading)
function exportChat(kind) {
  const c = convs[cur], msgs = c.messages.filter(m => m.role !== 'error').map(({role, content}) => ({role, content}));
  const stem = c.title.replace(/[^\w-]+/g, '_').slice(0, 40) || 'chat';
  if (kind === 'json') {
    download(stem + '.json', JSON.stringify({model: model(), system: $('system').value, settings: params(),
                                             messages: msgs}, null, 1), 'application/json');
  } else {
    const sys = $('system').value ? `*system:* ${$('system').value}\n\n` : '';
    download(stem + '.md', `# ${c.title}\n\nmodel: ${model()}\n\n` + sys +
             msgs.map(m => `**${m.role}:**\n\n${m.content}\n`).join('\n'), 'text/markdown');
  }
}
$('export-json').onclick = () => exportChat('json');
$('export-md').onclick = () => exportChat('md');

// -----------------------------------------------------------------------------
// 4) inspect: tokens and attention

// the text to inspect: plain, or wrapped in the chat template as one user message
const inspectBody = () => $('as-chat').checked ?
  {model: model(), messages: [{role: 'user', content: $('inspect-text').value}], add_generation_prompt: true} :
  {model: model(), prompt: $('inspect-text').value};
const visible = s => s.replace(/ /g, '·').replace(/\n/g, '↵').replace(/\t/g, '→');  // whitespace made visible

async function tokenize() {
  const j = await api('/tokenize', inspectBody());
  const back = (await api('/detokenize', {model: model(), tokens: j.tokens})).prompt;  // the round trip
  const info = await api('/tokenizer_info?model=' + encodeURIComponent(model()));
  $('tokens').replaceChildren(...j.tokens.map((id, i) => {
    const s = el('span', {title: `token ${i}: id ${id}`}, visible(j.token_strs[i]), el('sub', {}, id));
    s.dataset.id = id;
    s.style.background = `hsl(${(i * 47) % 360}, 70%, 88%)`;  // neighbours get distinct colours
    return s;
  }));
  const plain = !$('as-chat').checked, text = $('inspect-text').value;
  $('tok-info').textContent = `${j.count} tokens, ${(back.length / Math.max(j.count, 1)).toFixed(2)} characters per ` +
    `token · ${info.kind} tokenizer, vocabulary ${info.vocab_size}` +
    (info.eos_token_id == null ? '' : `, end of text ${JSON.stringify(info.eos_token)} (${info.eos_token_id})`) + (plain ? ` · the ids decode back to the text: ${back === text ? 'yes' : 'NO'}` : '') +
    ' · · is a space, ↵ a newline';
}
$('tokenize').onclick = () => guard($('tok-info'), tokenize);

let attn = null;  // the last /v1/attention answer: tokens and attentions[layer][head][query][key]

async function attend() {
  const ids = (await api('/tokenize', inspectBody())).tokens;  // the chat template's ids too, when ticked
  attn = await api('/v1/attention', {model: model(), prompt: ids});
  const t1 = performance.now(), L = attn.attentions.length, H = attn.attentions[0].length;
  $('layer').replaceChildren(...Array.from({length: L}, (_, l) => new Option(l, l)));
  $('head').replaceChildren(new Option('mean of heads', 'mean'), ...Array.from({length: H}, (_, h) => new Option(h, h)));
  $('attn-box').hidden = false;
  drawHeatmap();
  $('attn-box').dataset.ms = Math.round(performance.now() - t1);  // drawn this long after the data came
}
$('attend').onclick = () => guard($('tok-info'), attend);
$('layer').onchange = $('head').onchange = () => drawHeatmap();

const LABEL = 70;  // pixels kept left of and above the grid for token labels

function heatmapMatrix() {
  const maps = attn.attentions[Number($('layer').value)], h = $('head').value;
  if (h !== 'mean') return maps[Number(h)];
  return maps[0].map((row, q) => row.map((_, k) => maps.reduce((s, m) => s + m[q][k], 0) / maps.length));
}

function drawHeatmap() {
  const A = heatmapMatrix(), T = A.length, cell = Math.max(4, Math.floor(520 / T));
  const cv = $('heatmap'), ctx = cv.getContext('2d');
  cv.width = cv.height = LABEL + cell * T;
  ctx.fillStyle = '#fff';
  ctx.fillRect(0, 0, cv.width, cv.height);
  // each row is a query token's attention over the keys (sums to 1; causal, so the upper triangle is 0).
  // sqrt brightens small weights, which would otherwise all look white next to the large first-token weights
  for (let q = 0; q < T; q++) {
    for (let k = 0; k <= q; k++) {
      ctx.fillStyle = `hsl(220, 80%, ${100 - 65 * Math.sqrt(A[q][k])}%)`;
      ctx.fillRect(LABEL + k * cell, LABEL + q * cell, cell, cell);
    }
  }
  if (cell >= 9) {  // token labels when they fit: queries down the left, keys along the top
    ctx.fillStyle = '#333';
    ctx.font = `${Math.min(cell - 2, 12)}px monospace`;
    ctx.textBaseline = 'middle';
    attn.tokens.forEach((t, i) => {
      const s = visible(t).slice(0, 8);
      ctx.textAlign = 'right';
      ctx.fillText(s, LABEL - 3, LABEL + (i + 0.5) * cell);
      ctx.save();
      ctx.translate(LABEL + (i + 0.5) * cell, LABEL - 3);
      ctx.rotate(-Math.PI / 2);
      ctx.textAlign = 'left';
      ctx.fillText(s, 0, 0);
      ctx.restore();
    });
  }
  cv.cell = cell;
}

$('heatmap').onmousemove = e => {  // name the cell under the pointer
  const cv = $('heatmap'), r = cv.getBoundingClientRect(), scale = cv.width / r.width;
  const k = Math.floor(((e.clientX - r.left) * scale - LABEL) / cv.cell);
  const q = Math.floor(((e.clientY - r.top) * scale - LABEL) / cv.cell);
  const A = heatmapMatrix();
  if (q >= 0 && k >= 0 && q < A.length && k <= q) {
    $('attn-cell').textContent = `${JSON.stringify(attn.tokens[q])} (${q}) attends to ` +
      `${JSON.stringify(attn.tokens[k])} (${k}) with weight ${fmt(A[q][k])}`;
  }
};

// the logit lens and the activation flow, from one /v1/inspect call (one traced forward pass)
const shade = p => `hsl(${220 - 220 * p}, 80%, ${92 - 40 * p}%)`;  // a probability in [0, 1]: pale blue to red

async function inspectModel() {
  const ids = (await api('/tokenize', inspectBody())).tokens;
  const t0 = performance.now(), j = await api('/v1/inspect', {model: model(), prompt: ids, top: 3});
  const t1 = performance.now();
  // 1) the lens: a table, the last layer on top (the stack grows upward), the input tokens along the bottom
  const L = j.lens.length, rows = [];
  for (let l = L - 1; l >= 0; l--) {
    rows.push(el('tr', {}, el('th', {}, l === L - 1 ? `layer ${l} (output)` : `layer ${l}`), ...j.lens[l].map(cell => {
      const td = el('td', {textContent: visible(cell[0].token), title: cell.map(c =>
        `${JSON.stringify(c.token)} ${fmt(c.prob)}`).join('\n')});
      td.style.background = shade(cell[0].prob);
      td.dataset.id = cell[0].id;
      return td;
    })));
  }
  rows.push(el('tr', {}, el('th', {}, 'input'), ...j.tokens.map(t => el('th', {}, visible(t)))));
  $('lens').replaceChildren(el('table', {}, ...rows));
  // 2) the flow: one grid per quantity, layers up the side, positions along
  const f = j.flow, grids = [['residual stream norm', f.resid], ['attention adds', f.attn], ['MLP adds', f.mlp]];
  f.entropy[0].forEach((_, h) => grids.push([`head ${h} attention entropy (nats)`, f.entropy.map(layer => layer[h])]));
  $('flow').replaceChildren(...grids.map(([title, m]) => {
    const cv = el('canvas');
    const box = el('div', {}, el('h4', {}, title), cv);
    drawGrid(cv, m, j.tokens, title);
    return box;
  }));
  $('lens-box').hidden = false;
  $('lens-box').dataset.ms = Math.round(performance.now() - t1);  // render time after the data came (the tests read it)
  $('tok-info').textContent = `logit lens and flow: ${L} layers x ${j.tokens.length} positions, ` +
    `answered in ${Math.round(t1 - t0)} ms, drawn in ${$('lens-box').dataset.ms} ms`;
}
$('lens-btn').onclick = () => guard($('tok-info'), inspectModel);

// a layers x positions grid of numbers on a canvas, the top row the last layer; darker = larger within the grid
function drawGrid(cv, m, tokens, title) {
  const L = m.length, T = m[0].length, cell = Math.max(6, Math.min(24, Math.floor(520 / T)));
  const max = Math.max(...m.flat(), 1e-9);
  cv.width = T * cell;
  cv.height = L * cell;
  const ctx = cv.getContext('2d');
  m.forEach((row, l) => row.forEach((v, t) => {
    ctx.fillStyle = `hsl(20, 85%, ${97 - 60 * v / max}%)`;
    ctx.fillRect(t * cell, (L - 1 - l) * cell, cell, cell);
  }));
  cv.onmousemove = e => {
    const r = cv.getBoundingClientRect();
    const t = Math.floor((e.clientX - r.left) / r.width * T), l = L - 1 - Math.floor((e.clientY - r.top) / r.height * L);
    if (m[l]?.[t] != null) $('flow-cell').textContent = `${title}: layer ${l}, position ${t} ` +
      `(${JSON.stringify(tokens[t])}): ${fmt(m[l][t])}`;
  };
}

// the same text under three tokenizers: one character per token, GPT-2's BPE (tiktoken), and the model's own
async function compareTokenizers() {
  const j = await api('/v1/tokenizers', {model: model(), text: $('inspect-text').value});
  $('tokcmp').replaceChildren(...j.data.map(r => el('div', {className: 'tokcol'},
    el('h4', {}, r.name), el('div', {className: 'dim'}, r.error ? r.error :
      `${r.count} tokens · ${fmt(r.bytes_per_token, 2)} bytes per token · vocabulary ${r.vocab_size}`),
    el('div', {className: 'tokens'}, ...(r.tokens || []).map((t, i) => {
      const s = el('span', {}, visible(t));
      s.style.background = `hsl(${(i * 47) % 360}, 70%, 88%)`;
      return s;
    })))));
  $('tokcmp').hidden = false;
}
$('tokcmp-btn').onclick = () => guard($('tok-info'), compareTokenizers);

// -----------------------------------------------------------------------------
// 5) compare decoding strategies: the same prompt, one request per strategy, all at once

const STRATEGIES = [  // [name, sampling fields]; sampled columns share one seed, so a rerun repeats them
  ['greedy', {temperature: 0}],
  ['temperature 0.8', {temperature: 0.8}],
  ['top-k 40', {temperature: 1, top_k: 40}],
  ['top-p 0.9', {temperature: 1, top_p: 0.9}],
  ['min-p 0.1', {temperature: 1, min_p: 0.1}],
  ['beam search (4)', {temperature: 0, num_beams: 4, beam_tree: true}],
];

async function compare() {
  const name = model(), prompt = $('compare-prompt').value;
  const n = (await api('/tokenize', {model: name, prompt})).count;
  const max_tokens = Math.max(1, Math.min(Number($('compare-max').value), models[name].max_model_len - n));
  $('columns').replaceChildren(...STRATEGIES.map(([title, s]) => {
    const col = el('div', {className: 'col'}, el('h4', {}, title), el('span', {className: 'dim'}, JSON.stringify(s)),
                   el('pre', {textContent: '…'}), el('div', {className: 'dim meta'}));
    run(col, s);
    return col;
  }));

  async function run(col, s) {
    const t0 = performance.now(), [pre, meta] = [col.querySelector('pre'), col.querySelector('.meta')];
    try {
      const body = {model: name, prompt, max_tokens, seed: Number($('compare-seed').value), logprobs: TOP_LOGPROBS, ...s};
      const c = (await api('/v1/completions', body)).choices[0], lp = c.logprobs;
      if (c.beam_tree) drawBeamTree(c.beam_tree);
      // tokens with their probabilities when their pieces spell the text (a split UTF-8 character would not)
      if (lp && lp.tokens.join('') === c.text) {
        pre.replaceChildren(...lp.tokens.map((t, i) =>
          tokenSpan([t, t, lp.token_logprobs[i], Object.entries(lp.top_logprobs[i] || {})])));
      } else {
        pre.textContent = c.text;
      }
      const sum = lp ? lp.token_logprobs.reduce((a, b) => a + b, 0) : null;
      meta.textContent = `${lp ? lp.tokens.length : '?'} tokens, ${((performance.now() - t0) / 1000).toFixed(2)} s` +
        (lp && lp.tokens.length ? ` · mean logprob ${fmt(sum / lp.tokens.length)}` : '') + ` · ${c.finish_reason}`;
    } catch (e) {
      pre.textContent = e.message;
      pre.classList.add('err');
    }
  }
}
$('run-compare').onclick = () => guard($('columns'), compare);

// the beam tree as SVG: x = step, y = the node's rank by score within its step; edges to the parent
const SVG = 'http://www.w3.org/2000/svg';
const svgEl = (tag, attrs, text) => {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text != null) e.textContent = text;
  return e;
};
let beamNodes = [];

function drawBeamTree(nodes) {
  const t0 = performance.now();
  beamNodes = nodes;
  const steps = Math.max(...nodes.map(n => n.step)) + 1, DX = 110, DY = 34, at = {};
  for (let s = 0; s < steps; s++) {
    nodes.filter(n => n.step === s).sort((a, b) => b.score - a.score).forEach((n, r) => {
      at[n.id] = [60 + s * DX, 20 + r * DY];
    });
  }
  const rows = Math.max(...Object.values(at).map(p => p[1])) + 24, svg = $('beam-tree');
  svg.setAttribute('width', 60 + steps * DX);
  svg.setAttribute('height', rows);
  const kids = [svgEl('text', {x: 4, y: 24}, 'prompt')];
  for (const n of nodes) {
    const [x, y] = at[n.id], [px, py] = n.parent == null ? [40, 20] : at[n.parent];
    const g = svgEl('g', {class: [n.best ? 'best' : '', n.pruned ? 'pruned' : ''].join(' ').trim(), 'data-step': n.step,
                         'data-id': n.id});
    g.append(svgEl('line', {x1: px + 6, y1: py, x2: x - 6, y2: y}),
             n.finished ? svgEl('rect', {x: x - 5, y: y - 5, width: 10, height: 10}) : svgEl('circle', {cx: x, cy: y, r: 5}),
             svgEl('text', {x: x + 8, y: y - 2}, visible(n.text ?? String(n.token))),
             svgEl('text', {x: x + 8, y: y + 10, fill: '#777'}, fmt(n.score, 2)),
             svgEl('title', {}, `step ${n.step}: ${JSON.stringify(n.text)} logprob ${fmt(n.logprob)}, ` +
                                `sum ${fmt(n.cum_logprob)}, score ${fmt(n.score)}` + (n.finished ? ' (finished)' : '') +
                                (n.pruned ? ' (dropped)' : '') + (n.best ? ' (returned)' : '')));
    kids.push(g);
  }
  svg.replaceChildren(...kids);
  $('beam-step').max = steps - 1;
  $('beam-step').value = steps - 1;
  showBeamSteps();
  $('beam-box').hidden = false;
  $('beam-box').dataset.ms = Math.round(performance.now() - t0);
}

function showBeamSteps() {
  const s = Number($('beam-step').value);
  for (const g of $('beam-tree').querySelectorAll('g')) g.style.display = Number(g.dataset.step) <= s ? '' : 'none';
  $('beam-step-n').textContent = `${s + 1} of ${Number($('beam-step').max) + 1}`;
}
$('beam-step').oninput = showBeamSteps;

// -----------------------------------------------------------------------------
// 6) the model: its blocks from its config, and a calculator of what a shape costs

// model.py's arithmetic for a GPTConfig-like object: parameters (tied weights once), FLOPs, memory, time.
// tests/test_web.py checks params, params_non_embedding and flops_per_token against GPT(config) for many configs.
function calc(c) {
  const llama = c.arch === 'llama', C = c.n_embd, L = c.n_layer, H = c.n_head, KV = c.n_kv_head || H, hs = C / H;
  const V = c.vocab_size, T = c.block_size, bias = !llama && c.bias;
  const F = c.ffn_hidden || (llama ? 64 * Math.ceil(8 * C / 3 / 64) : 4 * C);
  const tie = c.tie_embeddings ?? !llama, b = n => bias ? n : 0;
  const norm = C + b(C);  // LayerNorm: weight (+ bias); RMSNorm: weight
  const attn = C * (H + 2 * KV) * hs + b((H + 2 * KV) * hs) + C * C + b(C);
  const mlp = C * (llama ? 2 : 1) * F + b((llama ? 2 : 1) * F) + F * C + b(C);
  const pos = c.positions || (llama ? 'rope' : 'learned'), wte = V * C, wpe = pos === 'learned' ? T * C : 0;
  const params = wte + wpe + L * (2 * norm + attn + mlp) + norm + (tie ? 0 : V * C);
  const flops = 6 * (params - wpe) + 12 * L * C * T;  // training FLOPs per token (PaLM, appendix B)
  const bytes = {float32: 4, bfloat16: 2}[c.dtype || 'float32'], B = c.batch_size || 1;
  // activations kept for the backward pass (Korthikanti et al. 2022, no recomputation): 34C + 5HT values of 2 bytes
  // per token and layer in 16-bit, twice that in fp32; plus the logits and their gradient
  const act = L * B * T * (34 * C + 5 * H * T) * bytes / 2 + 2 * B * T * V * 4;
  return {params, params_non_embedding: params - wte - wpe, flops_per_token: flops,
          kv_bytes_per_token: 2 * L * KV * hs * bytes, kv_bytes_context: 2 * L * KV * hs * bytes * T,
          train_bytes: params * (bytes + 4 + 8) + act,  // weights, fp32 grads, AdamW's two moments; activations
          ms_per_iter: 1000 * flops * B * T / ((c.peak_gflops || 163) * 1e9 * (c.mfu || 50) / 100)};
}
window.calc = calc;  // for the browser tests

const human = (n, unit = '') => n >= 1e12 ? `${(n / 1e12).toFixed(2)} T${unit}` : n >= 1e9 ? `${(n / 1e9).toFixed(2)} G${unit}` :
  n >= 1e6 ? `${(n / 1e6).toFixed(2)} M${unit}` : n >= 1e3 ? `${(n / 1e3).toFixed(1)} k${unit}` : `${Math.round(n)} ${unit}`;

// the blocks of a config, bottom (embeddings) to top (the head), as nested boxes; the repeated block once, xL
function drawArch(c) {
  const llama = c.arch === 'llama', box = (cls, title, ...lines) =>
    el('div', {className: 'blk ' + cls}, el('b', {}, title), ...lines.map(t => el('div', {className: 'dim'}, t)));
  const norm = llama ? 'RMSNorm' : 'LayerNorm', hs = c.n_embd / c.n_head, pos = c.positions || (llama ? 'rope' : 'learned');
  const block = el('div', {className: 'blk rep'},
    el('b', {}, `Block × ${c.n_layer}  (model.py Block)`),
    box('norm', `${norm} (ln_1)`),
    box('attn', 'CausalSelfAttention', `${c.n_head} query heads` + (c.n_kv_head !== c.n_head ?
      `, ${c.n_kv_head} key/value heads (grouped-query)` : '') + ` of size ${hs}`,
      (pos === 'rope' ? 'RoPE rotates q and k by position; ' : '') + 'causal softmax(q k^T / sqrt(hs)) v',
      '+ back into the residual stream'),
    box('norm', `${norm} (ln_2)`),
    box('mlp', llama ? 'MLP: SwiGLU' : 'MLP: GELU', llama ? `silu(gate) * up: ${c.n_embd} -> 2x${c.ffn_hidden} -> ${c.n_embd}`
      : `${c.n_embd} -> ${c.ffn_hidden} -> ${c.n_embd}`, '+ back into the residual stream'));
  $('arch-view').replaceChildren(
    box('', 'token embedding (wte)', `${c.vocab_size} tokens x ${c.n_embd}`),
    ...(pos === 'learned' ? [box('', '+ learned positions (wpe)', `${c.block_size} positions x ${c.n_embd}`)] :
        pos === 'sinusoidal' ? [box('', '+ sinusoidal positions (fixed)', `sin/cos of position / 10000^(2i/${c.n_embd})`)] : []),
    block, box('norm', `final ${norm} (ln_f)`),
    box('', 'LM head', `${c.n_embd} -> ${c.vocab_size} logits` + (c.tie_embeddings ? ', the embedding\'s weight (tied)' : '')));
}

// the calculator's fields: [key, label, default]; the served model's config fills them in
const CALC = [['arch', 'arch', 'gpt2'], ['positions', 'positions', 'learned'], ['n_layer', 'layers', 4], ['n_head', 'heads', 4], ['n_kv_head', 'kv heads', 4],
              ['n_embd', 'width', 128], ['ffn_hidden', 'MLP width (0 = default)', 0], ['block_size', 'context', 64],
              ['vocab_size', 'vocabulary', 65], ['batch_size', 'batch (training)', 12], ['dtype', 'dtype', 'float32'],
              ['peak_gflops', 'peak GFLOP/s', 163], ['mfu', 'MFU %', 50]];
for (const [k, label, d] of CALC) {
  const choices = {arch: ['gpt2', 'llama'], positions: ['learned', 'rope', 'sinusoidal'], dtype: ['float32', 'bfloat16']}[k];
  const input = choices ? el('select', {id: 'c-' + k}, ...choices.map(v => new Option(v, v))) :
    el('input', {type: 'number', id: 'c-' + k, value: d, min: 0});
  input.value = d;
  input.oninput = input.onchange = showCalc;
  $('calc-form').append(el('label', {}, label, input));
}
$('calc-form').append(el('label', {}, el('input', {type: 'checkbox', id: 'c-tie', checked: true, onchange: showCalc}),
                         ' tie embedding and head'), el('label', {}, el('input', {type: 'checkbox', id: 'c-bias',
                         onchange: showCalc}), ' biases (gpt2)'));

function calcConfig() {
  const c = Object.fromEntries(CALC.map(([k, , d]) => [k, typeof d === 'string' ? $('c-' + k).value : Number($('c-' + k).value)]));
  return {...c, tie_embeddings: $('c-tie').checked, bias: $('c-bias').checked};
}

function showCalc() {
  const c = calcConfig(), r = calc(c), hs = c.n_embd / c.n_head;
  const bad = !(hs % 1 === 0 && c.n_head % (c.n_kv_head || c.n_head) === 0 && (c.arch === 'llama' || !c.n_kv_head ||
               c.n_kv_head === c.n_head) && (c.arch !== 'llama' || hs % 2 === 0));
  const rows = bad ? [['this shape is not valid', 'width must divide into heads, heads into kv heads (llama: even head size)']] : [
    ['parameters', human(r.params)], ['without the embeddings', human(r.params_non_embedding)],
    ['training FLOPs per token', human(r.flops_per_token, 'FLOP')],
    ['KV cache per token', human(r.kv_bytes_per_token, 'B')], ['KV cache, full context', human(r.kv_bytes_context, 'B')],
    ['training memory (batch)', human(r.train_bytes, 'B')], ['time per iteration (batch)', `${fmt(r.ms_per_iter, 1)} ms`]];
  $('calc-out').replaceChildren(...rows.map(([k, v]) => el('tr', {}, el('td', {}, k), el('td', {}, v))));
  $('calc-out').dataset.params = bad ? '' : r.params;
}

function showArch() {
  const c = models[model()].config;
  drawArch(c);
  for (const [k] of CALC) if (k in c) $('c-' + k).value = c[k];
  $('c-tie').checked = c.tie_embeddings;
  $('c-bias').checked = c.bias;
  showCalc();
}

// -----------------------------------------------------------------------------
// 10) prompts: the template library (GET /v1/templates), one's own templates (localStorage), the variables, few-shot
// examples and chain of thought, rendered by the server (POST /v1/templates/render: the ids the model sees)

let templates = {};  // name -> the /v1/templates entry, or {own: true, template: text, variables}
const ownTemplates = () => JSON.parse(localStorage.getItem('nanolab.templates') || '{}');

async function loadTemplates() {
  templates = Object.fromEntries((await api('/v1/templates')).data.map(t => [t.name, t]));
  for (const [name, text] of Object.entries(ownTemplates())) {
    templates['my:' + name] = {name: 'my:' + name, own: true, template: text, kind: 'your own', description: 'saved in this browser',
                               variables: [...new Set([...text.matchAll(/\{(\w+)\}/g)].map(m => m[1]))], cot: false, example: {}};
  }
  const keep = $('tpl').value;
  $('tpl').replaceChildren(...Object.values(templates).map(t => new Option(`${t.name} (${t.kind})`, t.name)));
  if (keep in templates) $('tpl').value = keep;
  showTemplate();
}

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
  if (k > 0) examples = $('tpl-examples').value.split('\n').filter(l => l.trim()).map(l => JSON.parse(l));
  return {model: model(), variables, cot: $('tpl-cot').checked, shots: {examples, k, seed: Number($('tpl-seed').value)},
          ...(t.own ? {text: t.template} : {template: t.name})};
}

async function previewTemplate() {
  const j = await api('/v1/templates/render', templateBody());
  $('tpl-preview').textContent = j.chat ? j.prompt.map(m => `[${m.role}]\n${m.content}`).join('\n\n') : j.prompt;
  $('tpl-preview').dataset.tokens = JSON.stringify(j.tokens);
  $('tpl-count').textContent = `${j.count} tokens of ${model()}'s ${j.max_model_len}` +
    (j.count >= j.max_model_len ? ': too long for its context' : '');
  return j;
}
$('tpl-preview-btn').onclick = () => guard($('tpl-count'), previewTemplate);

$('tpl-use').onclick = () => guard($('tpl-count'), async () => {  // into the chat: system turn and message
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

// -----------------------------------------------------------------------------
// 9) the arena: two replies to one prompt, from two models or two settings, shown blind in random order; the vote
// (and optional 1-5 ratings) goes to POST /v1/arena/judgments, then the names show. "Judge an item again" serves an
// item another annotator judged, with the same replies, so agreement can be measured (evaluate.py --arena).

const PROMPTS = ['ROMEO:', 'JULIET:\nO Romeo,', 'First Citizen:', 'KING RICHARD III:', 'Reverse kfeo', 'Add 1 to 49',
                 'Uppercase mvrq', 'Sort bdca', 'The cup is zunt. What is the cup?'];
let duel = null;  // {id, prompt, sides: [{model, text, settings}, {...}]}: sides[0] is shown as A, sides[1] as B

function arenaModels() {
  for (const id of ['arena-m1', 'arena-m2']) $(id).replaceChildren(...Object.keys(models).map(m => new Option(m, m)));
  if (Object.keys(models).length > 1) $('arena-m2').selectedIndex = 1;
  $('annotator').value = localStorage.getItem('nanolab.annotator') || '';
}
$('annotator').oninput = () => localStorage.setItem('nanolab.annotator', $('annotator').value);
$('arena-draw').onclick = () => { $('arena-prompt').value = PROMPTS[Math.floor(Math.random() * PROMPTS.length)]; };

function showDuel(d) {  // blind: the headers say A and B until the vote
  duel = d;
  d.sides.forEach((s, i) => { $('arena-h' + i).textContent = 'AB'[i]; });
  $('arena-text0').textContent = d.sides[0].text;
  $('arena-text1').textContent = d.sides[1].text;
  $('rate-a').value = $('rate-b').value = '';
  for (const b of document.querySelectorAll('.vote')) b.disabled = !d.done;
}

async function arenaGo() {
  if (!$('annotator').value.trim()) throw new Error('write your name first: judgments are matched by annotator');
  const prompt = $('arena-prompt').value;
  const sides = [[$('arena-m1').value, Number($('arena-temp1').value)], [$('arena-m2').value, Number($('arena-temp2').value)]]
    .map(([model, temperature]) => ({model, text: '', settings: {temperature, max_tokens: 120}}));
  if (Math.random() < 0.5) sides.reverse();  // which one is A is chance
  const d = {id: crypto.randomUUID ? crypto.randomUUID() : String(Date.now()) + Math.random(), prompt, sides, done: false};
  showDuel(d);
  $('arena-status').textContent = 'writing both replies...';
  await Promise.all(d.sides.map(async (s, i) => {  // streamed side by side
    const room = models[s.model].max_model_len - (await api('/tokenize', {model: s.model,
      messages: [{role: 'user', content: prompt}], add_generation_prompt: true})).count;
    const body = {model: s.model, messages: [{role: 'user', content: prompt}], stream: true, ...s.settings,
                  max_tokens: Math.max(1, Math.min(s.settings.max_tokens, room))};
    for await (const chunk of sse('/v1/chat/completions', body)) {
      s.text += chunk.choices[0]?.delta?.content || '';
      $(i ? 'arena-text1' : 'arena-text0').textContent = s.text;
    }
  }));
  d.done = true;
  showDuel(d);
  $('arena-status').textContent = 'which is better? (the names show after your vote)';
}
$('arena-go').onclick = () => guard($('arena-status'), arenaGo);

async function arenaAgain() {
  if (!$('annotator').value.trim()) throw new Error('write your name first: judgments are matched by annotator');
  const j = await api('/v1/arena/items?annotator=' + encodeURIComponent($('annotator').value.trim()));
  if (!j.data.length) throw new Error('no item left that someone else judged and you have not');
  const it = j.data[Math.floor(Math.random() * j.data.length)], sides = [it.a, it.b];
  if (Math.random() < 0.5) sides.reverse();
  $('arena-prompt').value = it.prompt;
  showDuel({id: it.id, prompt: it.prompt, sides, done: true});
  $('arena-status').textContent = `an item judged before (${j.remaining} left for you): which is better?`;
}
$('arena-again').onclick = () => guard($('arena-status'), arenaAgain);

async function vote(winner) {
  const d = duel, ratings = {};
  if ($('rate-a').value) ratings.a = Number($('rate-a').value);
  if ($('rate-b').value) ratings.b = Number($('rate-b').value);
  await api('/v1/arena/judgments', {id: d.id, prompt: d.prompt, a: d.sides[0], b: d.sides[1], winner,
                                    annotator: $('annotator').value.trim(), ...(Object.keys(ratings).length ? {ratings} : {})});
  for (const b of document.querySelectorAll('.vote')) b.disabled = true;
  d.sides.forEach((s, i) => {  // the reveal
    $('arena-h' + i).textContent = `${'AB'[i]}: ${s.model} (temperature ${s.settings.temperature})`;
  });
  $('arena-status').textContent = `saved: ${winner === 'both_bad' ? 'both bad' : winner === 'tie' ? 'a tie' : winner.toUpperCase() + ' won'}`;
  await arenaStats();
}
for (const w of ['a', 'b', 'tie', 'both_bad']) $('vote-' + w).onclick = () => guard($('arena-status'), () => vote(w));

// the ratings so far (Bradley-Terry, as Chatbot Arena's, with 95% intervals) and the annotators' agreement
async function arenaStats() {
  const s = await api('/v1/arena/stats');
  if (!s.judgments) return;
  const rows = Object.entries(s.bradley_terry).map(([m, r]) => el('tr', {}, el('td', {}, m), el('td', {}, fmt(r.rating, 0)),
    el('td', {}, r.ci95 ? `${fmt(r.ci95[0], 0)} to ${fmt(r.ci95[1], 0)}` : ''),
    el('td', {}, s.ratings[m] ? `${fmt(s.ratings[m].mean, 2)} (${s.ratings[m].n})` : '')));
  const kappas = Object.entries(s.cohen_kappa).map(([k, v]) => `Cohen's kappa ${k.replace('|', ' & ')}: ${fmt(v.kappa, 2)} ` +
    `over ${v.items} items`);
  if (s.fleiss_kappa) kappas.push(`Fleiss' kappa: ${fmt(s.fleiss_kappa.kappa, 2)} over ${s.fleiss_kappa.items} items`);
  $('arena-stats').replaceChildren(el('table', {}, el('tr', {}, ...['model', 'rating', '95% interval', 'mean 1-5 (n)']
    .map(h => el('th', {}, h))), ...rows), el('p', {}, `${s.judgments} judgments of ${s.items} items. ` + kappas.join('; ')));
}

// -----------------------------------------------------------------------------
// 8) the overview's background: the token embeddings in 3-D (POST /v1/embedding_map), turned by drag or finger

const embed = {points: [], tokens: [], yaw: 0.6, pitch: 0.3, drag: null, spin: true};

async function loadEmbeddings() {
  const j = await api('/v1/embedding_map', {model: model(), n: 512});
  Object.assign(embed, {points: j.points, tokens: j.tokens});
  $('embed-info').textContent = `${j.points.length} tokens of ${model()}; the three axes hold ` +
    `${j.explained.map(x => (100 * x).toFixed(0) + '%').join(', ')} of the variance`;
}

// a token's colour by what it is: letters, digits, spaces and newlines, punctuation, the rest
const kindColour = t => /^\s+$/.test(t) ? '#999' : /\d/.test(t) ? '#16a34a' : /^[A-Z]/.test(t.trim()) ? '#d62728' :
  /[a-z]/i.test(t) ? '#2563eb' : '#9333ea';

function drawEmbeddings() {
  const cv = $('embed3d');
  if (!$('overview').classList.contains('on') || !embed.points.length) return;
  const dpr = devicePixelRatio || 1, W = cv.clientWidth, H = cv.clientHeight;
  if (cv.width !== W * dpr || cv.height !== H * dpr) { cv.width = W * dpr; cv.height = H * dpr; }
  const ctx = cv.getContext('2d');
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, W, H);
  const [cy, sy, cp, sp] = [Math.cos(embed.yaw), Math.sin(embed.yaw), Math.cos(embed.pitch), Math.sin(embed.pitch)];
  const R = Math.min(W, H) * 0.42, label = embed.points.length <= 128;
  // rotate about the vertical axis (yaw), then the horizontal (pitch); perspective; far points first
  const proj = embed.points.map(([x, y, z], i) => {
    const x1 = cy * x + sy * z, z1 = -sy * x + cy * z, y1 = cp * y - sp * z1, z2 = sp * y + cp * z1, f = 2.5 / (2.5 + z2);
    return [W * 0.62 + R * x1 * f, H / 2 - R * y1 * f, f, i];
  }).sort((a, b) => a[2] - b[2]);
  ctx.font = '11px ui-monospace, monospace';
  for (const [x, y, f, i] of proj) {
    ctx.fillStyle = ctx.strokeStyle = kindColour(embed.tokens[i]);
    ctx.globalAlpha = Math.min(1, 0.35 + 0.5 * f);
    ctx.beginPath();
    ctx.arc(x, y, 2.2 * f, 0, 2 * Math.PI);
    ctx.fill();
    if (label) ctx.fillText(visible(embed.tokens[i]), x + 4, y - 3);
  }
  ctx.globalAlpha = 1;
}

(function animate() {  // a slow turn until the user takes hold of it
  if (embed.spin && !embed.drag) embed.yaw += 0.003;
  drawEmbeddings();
  requestAnimationFrame(animate);
})();
$('embed3d').onpointerdown = e => { embed.drag = [e.clientX, e.clientY]; embed.spin = false; $('embed3d').setPointerCapture(e.pointerId); };
$('embed3d').onpointermove = e => {
  if (!embed.drag) return;
  embed.yaw += (e.clientX - embed.drag[0]) * 0.01;
  embed.pitch = Math.max(-1.5, Math.min(1.5, embed.pitch + (e.clientY - embed.drag[1]) * 0.01));
  embed.drag = [e.clientX, e.clientY];
};
$('embed3d').onpointerup = $('embed3d').onpointercancel = () => { embed.drag = null; };

// -----------------------------------------------------------------------------
// 7) runs: loss curves and the leaderboard

const finite = v => typeof v === 'number' && isFinite(v);  // a diverged run logs NaN/inf: left out

// a line chart on a canvas: series [{name, color, dash, points: [[x, y], ...]}], with axes, ticks and a legend
function plot(cv, series) {
  cv.series = series;  // kept, to draw again at a new size (a phone turned sideways)
  const dpr = devicePixelRatio || 1, W = cv.clientWidth, H = cv.clientHeight;
  cv.width = W * dpr;
  cv.height = H * dpr;
  const ctx = cv.getContext('2d');
  ctx.scale(dpr, dpr);
  const pts = series.flatMap(s => s.points);
  if (pts.length < 2) return;
  const m = {l: 44, r: 8, t: 8, b: 22};  // margins for the tick labels
  const [x0, x1] = [Math.min(...pts.map(p => p[0])), Math.max(...pts.map(p => p[0]))];
  const [y0, y1] = [Math.min(...pts.map(p => p[1])), Math.max(...pts.map(p => p[1]))];
  const X = x => m.l + (x - x0) / ((x1 - x0) || 1) * (W - m.l - m.r);
  const Y = y => H - m.b - (y - y0) / ((y1 - y0) || 1) * (H - m.t - m.b);
  ctx.font = '11px system-ui';
  ctx.fillStyle = '#777';
  ctx.strokeStyle = '#eee';
  for (let i = 0; i <= 4; i++) {  // 5 ticks on each axis, with grid lines
    const y = y0 + (y1 - y0) * i / 4, x = x0 + (x1 - x0) * i / 4;
    ctx.beginPath(); ctx.moveTo(m.l, Y(y)); ctx.lineTo(W - m.r, Y(y)); ctx.stroke();
    ctx.textAlign = 'right';
    ctx.fillText(y.toFixed(2), m.l - 4, Y(y) + 4);
    ctx.textAlign = i === 4 ? 'right' : 'center';  // the last x label ends at the right edge
    ctx.fillText(Math.round(x), X(x), H - 6);
  }
  series.forEach((s, i) => {
    ctx.strokeStyle = ctx.fillStyle = s.color;
    ctx.setLineDash(s.dash || []);
    ctx.beginPath();
    s.points.forEach(([x, y], j) => j ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y)));
    ctx.stroke();
    ctx.setLineDash([]);
    ctx.textAlign = 'right';
    ctx.fillText(s.name, W - m.r - 4, m.t + 12 + 14 * i);
  });
}

// a run short of its max_iters: how far it is, and while metrics.jsonl still grows (written in the last minute) the
// time left at the pace of its logged rows (progress.py's ETA, from the rows' iteration and training seconds)
function runProgress(r) {
  const max = r.config?.max_iters, rows = r.metrics.filter(x => finite(x.iter) && finite(x.time));
  if (!max || !rows.length || rows.at(-1).iter >= max) return '';
  const a = rows[0], b = rows.at(-1), done = `${b.iter}/${max} (${Math.round(100 * b.iter / max)}%)`;
  if (Date.now() / 1000 - r.updated > 60) return ` · stopped at ${done}`;
  const rate = (b.iter - a.iter) / ((b.time - a.time) || Infinity);  // iterations per second of training
  const left = rate > 0 ? (max - b.iter) / rate : null, s = Math.round(left);
  return ` · training: ${done}, ETA ` + (left == null ? '?' : `${Math.floor(s / 60)}:${String(s % 60).padStart(2, '0')}`);
}

let runsData = [], registry = [];  // the last GET /runs and GET /v1/registry, for the comparison
const chosen = new Set(JSON.parse(localStorage.getItem('nanolab.compare') || '[]'));  // runs ticked to compare

async function refreshRuns() {
  const runs = runsData = (await api('/runs')).data;
  $('runs-status').textContent = `${runs.length} runs with metrics.jsonl · updated ${new Date().toLocaleTimeString()}`;
  for (const r of runs) {
    let card = document.querySelector(`.run[data-name="${CSS.escape(r.name)}"]`);
    if (!card) {
      const tick = el('input', {type: 'checkbox', checked: chosen.has(r.name), className: 'cmp-tick'});
      tick.onchange = () => {
        tick.checked ? chosen.add(r.name) : chosen.delete(r.name);
        localStorage.setItem('nanolab.compare', JSON.stringify([...chosen]));
        drawComparison();
      };
      card = el('div', {className: 'run'}, el('h4', {}, el('span'), el('label', {}, tick, ' compare')), el('canvas'),
                el('div', {className: 'dim'}));
      card.dataset.name = r.name;
      $('run-list').append(card);
    }
    // the same two curves as common.plot_loss_svg: train loss (log rows) and val loss (eval rows)
    const train = r.metrics.filter(x => finite(x.loss)).map(x => [x.iter, x.loss]);
    const val = r.metrics.filter(x => finite(x.val_loss)).map(x => [x.iter, x.val_loss]);
    card.querySelector('h4 span').textContent = r.name + (r.served ? ' (served)' : '');
    plot(card.querySelector('canvas'), [{name: 'train loss', color: '#1f77b4', points: train},
                                        {name: 'val loss', color: '#d62728', points: val}]);
    const last = r.metrics[r.metrics.length - 1] || {}, best = Math.min(...val.map(p => p[1]));
    card.querySelector('.dim').textContent = `iter ${last.iter ?? '-'} · train loss ${fmt(train.at(-1)?.[1])} · ` +
      `best val loss ${val.length ? fmt(best) : '-'}` + (r.config?.dataset ? ` · ${r.config.dataset}` : '') +
      runProgress(r);
  }
  await refreshRegistry();
  drawComparison();
  await leaderboard();
}

// the chosen runs side by side: their curves on one chart (by iteration, tokens seen or time), the settings in
// which their config.json differ, and their latest evals
const PALETTE = ['#1f77b4', '#d62728', '#2ca02c', '#9467bd', '#ff7f0e', '#8c564b', '#e377c2', '#17becf'];
function drawComparison() {
  const runs = runsData.filter(r => chosen.has(r.name));
  $('cmp-plot').classList.toggle('on', runs.length > 0);
  $('cmp-hint').textContent = runs.length ? `${runs.length} runs: ${runs.map(r => r.name).join(', ')}` :
    'Tick "compare" on two or more runs above.';
  if (!runs.length) {
    $('cmp-config').replaceChildren();
    return $('cmp-evals').replaceChildren();
  }
  // x: the iteration; tokens = iteration x batch_size x block_size x accumulation (train.py's tokens per
  // iteration on one process); time = the seconds of training the row logged
  const xs = $('cmp-x').value, ys = $('cmp-y').value;
  const perIter = c => (c?.batch_size || 0) * (c?.block_size || 0) * (c?.gradient_accumulation_steps || 1);
  const X = (r, row) => xs === 'time' ? row.time : xs === 'tokens' ? row.iter * perIter(r.config) : row.iter;
  const series = [];
  runs.forEach((r, i) => {
    for (const [key, label, dash] of [['val_loss', 'val', []], ['loss', 'train', [4, 3]]]) {
      if (ys !== 'both' && ys !== label) continue;
      const points = r.metrics.filter(row => finite(row[key]) && finite(X(r, row))).map(row => [X(r, row), row[key]]);
      if (points.length) series.push({name: `${r.name} ${label}`, color: PALETTE[i % PALETTE.length], dash, points});
    }
  });
  plot($('cmp-plot'), series);
  // 1) the config diff: every key whose value is not the same in all chosen runs
  const keys = [...new Set(runs.flatMap(r => Object.keys(r.config || {})))].sort();
  const show = v => v === undefined ? '(none)' : JSON.stringify(v);
  const differ = keys.filter(k => new Set(runs.map(r => show(r.config?.[k]))).size > 1);
  $('cmp-config').replaceChildren(el('table', {},
    el('tr', {}, el('th', {}, `config: ${differ.length} of ${keys.length} settings differ`), ...runs.map(r => el('th', {}, r.name))),
    ...differ.map(k => el('tr', {}, el('td', {}, k), ...runs.map(r => el('td', {className: 'diff'}, show(r.config?.[k])))))));
  // 2) the evals: the registry's latest result per task, one column per run, the best in bold
  const evals = Object.fromEntries(registry.map(e => [e.name, e.evals || {}]));
  const rows = [...new Set(runs.flatMap(r => Object.entries(evals[r.name] || {}).flatMap(
    ([task, m]) => Object.keys(m).map(k => `${task}\t${k}`))))].sort();
  $('cmp-evals').replaceChildren(rows.length ? el('table', {},
    el('tr', {}, el('th', {}, 'task'), el('th', {}, 'metric'), ...runs.map(r => el('th', {}, r.name))),
    ...rows.map(row => {
      const [task, k] = row.split('\t'), vals = runs.map(r => evals[r.name]?.[task]?.[k]);
      const known = vals.filter(finite), lower = LOWER.some(w => k.includes(w));
      const best = known.length ? (lower ? Math.min(...known) : Math.max(...known)) : null;
      return el('tr', {}, el('td', {}, task), el('td', {}, k),
                ...vals.map(v => el('td', {className: v === best && known.length > 1 ? 'best' : ''}, fmt(v, 4))));
    })) : el('span', {className: 'dim'}, 'No evaluations of these runs yet (python evaluate.py --init_from=RUN).'));
}
const LOWER = ['loss', 'perplexity', 'bits_per_byte'];  // results.LOWER_IS_BETTER's stems: lower is better
$('cmp-x').onchange = $('cmp-y').onchange = drawComparison;

// the models on disk (GET /v1/registry): each run with its size, shape and evals, and a checkpoint browser under
// it; "serve" loads one beside the served models, "evaluate" gives the command that evaluates it
const opened = new Set();  // runs whose checkpoint list is open: it stays open as the registry refreshes
const mb = n => n == null ? '' : n >= 1e9 ? (n / 1e9).toFixed(2) + ' GB' : (n / 1e6).toFixed(1) + ' MB';
async function refreshRegistry() {
  const j = await api('/v1/registry');
  registry = j.data;
  const serveBtn = (source, name, served, kind) => {
    const b = el('button', {className: 'small', textContent: served ? 'served' : 'serve', disabled: !!served ||
      kind === 'reward', title: served ? `served as ${served}` : kind === 'reward' ? 'a reward model scores text, ' +
      'it does not write it' : `load it beside the served models, as ${name}`});
    b.onclick = () => guard($('registry-status'), () => serveModel(source, name));
    return b;
  };
  const evalBtn = path => {
    const b = el('button', {className: 'small', textContent: 'evaluate', title: 'the command that evaluates it'});
    b.onclick = () => {  // evaluation runs as its own process; the page gives its command, copied
      const cmd = `python evaluate.py --init_from=${path}   # add --benchmark=FILE or --tasks=NAME`;
      navigator.clipboard?.writeText(cmd).catch(() => {});
      $('registry-status').textContent = cmd;
    };
    return b;
  };
  const safe = s => s.replace(/[^\w.-]/g, '_').slice(0, 64);
  const rows = registry.map(e => {
    const evals = Object.entries(e.evals || {}).map(([t, m]) => `${t}: ` + Object.entries(m).slice(0, 2)
      .map(([k, v]) => `${k} ${fmt(v, 4)}`).join(', ')).join('; ');
    const cks = e.checkpoints.map(c => el('tr', {}, el('td', {}, c.file), el('td', {}, String(c.iter ?? '-')),
      el('td', {}, fmt(c.val_loss, 4)), el('td', {}, Object.entries(c.evals).map(([t, m]) => `${t}: ` +
        Object.entries(m).slice(0, 2).map(([k, v]) => `${k} ${fmt(v, 4)}`).join(', ')).join('; ')),
      el('td', {}, serveBtn(c.path, safe(`${e.name}-${c.iter}`), c.served, e.kind), ' ', evalBtn(c.path))));
    const browser = e.checkpoints.length ? el('details', {open: opened.has(e.name)}, el('summary', {},
      `${e.checkpoints.length} checkpoint` + (e.checkpoints.length > 1 ? 's' : '')), el('table', {}, el('tr', {},
        ...['file', 'iter', 'val loss', 'evals', ''].map(h => el('th', {}, h))), ...cks)) : '';
    if (browser) browser.ontoggle = () => browser.open ? opened.add(e.name) : opened.delete(e.name);  // kept open
    const exports = e.exports.map(x => `${x.path.split('/').pop()} (${x.format}, ${mb(x.size)})`).join(', ');
    return el('tr', {}, el('td', {}, el('b', {}, e.name), browser),
      el('td', {}, serveBtn(e.path, safe(e.name), e.served, e.kind), ' ', evalBtn(e.path)), el('td', {}, e.kind),
      el('td', {}, mb(e.size)), el('td', {}, e.n_params ? (e.n_params / 1e6).toFixed(2) + 'M' : ''),
      el('td', {}, [e.arch, e.tokenizer, e.block_size].filter(x => x != null).join(' · ')),
      el('td', {}, String(e.iter ?? '')), el('td', {}, evals), el('td', {}, exports));
  });
  $('registry').replaceChildren(registry.length ? el('table', {}, el('tr', {}, ...['model', '', 'kind', 'on disk',
    'params', 'arch · tokenizer · context', 'iter', 'latest evals', 'exports'].map(h => el('th', {}, h))), ...rows) :
    el('span', {className: 'dim'}, "No runs under the server's runs_dir (python serve.py --runs_dir=DIR)."));
}

// the leaderboard (GET /leaderboard, results.leaderboard_rows): a model x benchmark grid, sortable by any column,
// each cell its value, 95% interval and paired test against the column's best; the models ticked in it on a radar
// chart; each run's checkpoints, with a flag on every metric that dropped significantly (results.checkpoint_history)
let board = null;
const boardSort = {col: null, dir: 1};  // col: a task (its sorted_by metric), or 'model'; dir: 1 best first
const radarPick = new Set(JSON.parse(localStorage.getItem('nanolab.radar') || '[]'));
async function leaderboard() {
  await arenaStats();  // the arena's ratings show here too
  $('runs-arena').replaceChildren(...[...$('arena-stats').childNodes].map(n => n.cloneNode(true)));
  board = await api('/leaderboard');
  drawBoard();
  drawHistory();
}

const big = v => Math.abs(v) >= 1e6 ? v.toExponential(3) : fmt(v, 4);  // a word perplexity can be 1e18
const rowLabel = r => r.model + (/\/(ckpt|best)\.pt$/.test(r.checkpoint) || !r.checkpoint.endsWith('.pt') ? '' :
  ' ' + r.checkpoint.split('/').pop()) + (r.iter != null ? ` @${r.iter}` : '');
const lowerBetter = m => board.lower_is_better.includes(m);

function drawBoard() {
  if (!board.rows.length) {
    $('leaderboard').textContent = 'No evaluations yet: python evaluate.py --init_from=RUN writes them to RUN/eval/.';
    $('radar').hidden = true;
    return;
  }
  const tasks = [...new Map(board.rows.map(r => [r.task, r])).values()];  // one column each, groups first
  const cell = new Map(board.rows.map(r => [rowLabel(r) + '\t' + r.task, r]));
  const value = (m, t) => cell.get(m + '\t' + t.task)?.metrics[t.sorted_by]?.value;
  const models = [...new Set(board.rows.map(rowLabel))];
  if (boardSort.col === 'model') models.sort((a, b) => boardSort.dir * a.localeCompare(b));
  else if (boardSort.col) {
    const t = tasks.find(x => x.task === boardSort.col), sign = lowerBetter(t.sorted_by) ? 1 : -1;
    models.sort((a, b) => {  // best first (dir 1) or worst first; models without the result last either way
      const va = value(a, t), vb = value(b, t);
      return va == null ? 1 : vb == null ? -1 : boardSort.dir * sign * (va - vb);
    });
  }
  const sorter = (col, text, title) => {
    const th = el('th', {className: 'sort', title}, text + (boardSort.col === col ? (boardSort.dir > 0 ? ' ▼' : ' ▲') : ''));
    th.onclick = () => {
      boardSort.dir = boardSort.col === col ? -boardSort.dir : 1;
      boardSort.col = col;
      drawBoard();
    };
    return th;
  };
  const head = el('tr', {}, sorter('model', 'model', 'sort by name'), el('th', {}, 'radar'),
    ...tasks.map(t => sorter(t.task, '↳ '.repeat(t.depth ? 1 : 0) + t.task.replace(/^\w+:/, ''),
                             `${t.task}: ${t.sorted_by} (${lowerBetter(t.sorted_by) ? 'lower' : 'higher'} is better)` +
                             (t.group ? `, in ${t.group}` : ''))));
  const units = el('tr', {}, el('th', {}), el('th', {}), ...tasks.map(t => el('th', {className: 'dim'}, t.sorted_by)));
  const rows = models.map(m => {
    const tick = el('input', {type: 'checkbox', checked: radarPick.has(m), className: 'radar-tick'});
    tick.onchange = () => {
      tick.checked ? radarPick.add(m) : radarPick.delete(m);
      localStorage.setItem('nanolab.radar', JSON.stringify([...radarPick]));
      drawRadar(tasks, value);
    };
    return el('tr', {}, el('td', {}, m), el('td', {}, tick), ...tasks.map(t => {
      const r = cell.get(m + '\t' + t.task), s = r?.metrics[t.sorted_by];
      if (!s) return el('td', {});
      const ci = s.ci95 ? `[${fmt(s.ci95[0], 3)}, ${fmt(s.ci95[1], 3)}]` : s.stderr != null ? `± ${fmt(s.stderr, 3)}` : '';
      const vs = r.test === 'best' ? 'best' : r.p_vs_best != null ? `p=${r.p_vs_best.toPrecision(2)} vs best` : '';
      return el('td', {className: r.test === 'best' ? 'best' : '', title: r.test && r.test !== 'best' ? r.test : ''},
                big(s.value), el('small', {}, ci), el('small', {}, vs));
    }));
  });
  $('leaderboard').replaceChildren(el('table', {}, head, units, ...rows));
  drawRadar(tasks, value);
}

// the radar: one axis per benchmark, one polygon per ticked model; each axis from 0 to its best value among all
// models (a score in [0, 1] such as accuracy is drawn as is; a lower-is-better metric as best / value)
function drawRadar(tasks, value) {
  const cv = $('radar'), picked = [...radarPick].filter(m => board.rows.some(r => rowLabel(r) === m));
  cv.hidden = picked.length === 0;
  $('radar-hint').textContent = picked.length ? `radar: ${picked.join(', ')} (each axis: 0 at the centre, the best ` +
    'model at the rim; scores in [0, 1] as they are)' : 'Tick models in the grid to compare them on a radar chart.';
  if (cv.hidden) return;
  const all = [...new Set(board.rows.map(rowLabel))];
  const scale = t => {  // value -> [0, 1] on this axis
    const vs = all.map(m => value(m, t)).filter(finite);
    if (lowerBetter(t.sorted_by)) { const best = Math.min(...vs); return v => v > 0 ? best / v : 0; }
    const unit = vs.every(v => v >= 0 && v <= 1), best = Math.max(...vs);
    return v => unit ? v : best > 0 ? v / best : 0;
  };
  const scales = tasks.map(scale);
  const series = picked.map((m, i) => ({name: m, color: PALETTE[i % PALETTE.length],
    points: tasks.map((t, k) => finite(value(m, t)) ? scales[k](value(m, t)) : 0)}));
  cv.series = series;  // kept: what the tests read, and a redraw at a new size
  const dpr = devicePixelRatio || 1, W = cv.clientWidth, H = cv.clientHeight;
  cv.width = W * dpr;
  cv.height = H * dpr;
  const ctx = cv.getContext('2d');
  ctx.scale(dpr, dpr);
  const cx = W / 2, cy = H / 2 + 10, R = Math.min(W, H) / 2 - 70, n = tasks.length;
  const at = (k, r) => [cx + r * Math.sin(2 * Math.PI * k / n), cy - r * Math.cos(2 * Math.PI * k / n)];
  ctx.strokeStyle = '#ddd';
  ctx.font = '11px system-ui';
  for (const ring of [0.25, 0.5, 0.75, 1]) {  // the grid: rings and spokes
    ctx.beginPath();
    for (let k = 0; k <= n; k++) ctx[k ? 'lineTo' : 'moveTo'](...at(k % n, R * ring));
    ctx.stroke();
  }
  tasks.forEach((t, k) => {
    ctx.beginPath(); ctx.moveTo(cx, cy); ctx.lineTo(...at(k, R)); ctx.stroke();
    const [x, y] = at(k, R + 14);
    ctx.fillStyle = '#555';
    ctx.textAlign = Math.abs(x - cx) < 5 ? 'center' : x > cx ? 'left' : 'right';
    ctx.fillText(t.task.replace(/^\w+:/, ''), x, y + 4);
  });
  series.forEach((s, i) => {
    ctx.strokeStyle = ctx.fillStyle = s.color;
    ctx.beginPath();
    s.points.forEach((v, k) => ctx[k ? 'lineTo' : 'moveTo'](...at(k, R * v)));
    ctx.closePath();
    ctx.globalAlpha = 0.15; ctx.fill(); ctx.globalAlpha = 1; ctx.stroke();
    ctx.textAlign = 'left';
    ctx.fillText(s.name, 8, 16 + 14 * i);
  });
}

// each run's results across its checkpoints, a flag on each metric that dropped significantly from the one before
function drawHistory() {
  if (!board.history.length) return;
  $('history').classList.remove('dim');
  $('history').replaceChildren(...board.history.map(h => {
    const metrics = [...new Set(h.points.flatMap(p => Object.keys(p.metrics)))];
    const flag = (it, m) => h.flags.find(f => f.to_iter === it && f.metric === m);
    return el('div', {className: 'scroll'}, el('b', {}, `${h.run.split('/').pop()} · ${h.task}`),
      h.flags.length ? el('span', {className: 'err'}, `  ${h.flags.length} significant drop` + (h.flags.length > 1 ? 's' : ''))
        : el('span', {className: 'dim'}, '  no significant drop (paired tests, p < 0.05)'),
      el('table', {}, el('tr', {}, el('th', {}, 'iter'), ...metrics.map(m => el('th', {}, m))),
        ...h.points.map(p => el('tr', {}, el('td', {}, String(p.iter)), ...metrics.map(m => {
          const f = flag(p.iter, m);
          return el('td', {className: f ? 'drop' : '', title: f ? `dropped from ${fmt(f.before, 4)} at ${f.from_iter}: ` +
                           `p=${f.p.toPrecision(2)} (${f.test})` : ''}, (f ? '▼ ' : '') + fmt(p.metrics[m], 4),
                    f ? el('small', {}, `p=${f.p.toPrecision(2)} vs ${f.from_iter}`) : '');
        })))));
  }));
}

addEventListener('resize', () => {
  for (const cv of document.querySelectorAll('.run canvas, #cmp-plot')) if (cv.series) plot(cv, cv.series);
  if (board && board.rows.length) drawBoard();  // the radar at its new size
});

setInterval(() => {  // poll while the Runs tab is open, so a run being trained draws itself
  if ($('runs').classList.contains('on') && $('live').checked) guard($('runs-status'), refreshRuns);
}, 5000);

// -----------------------------------------------------------------------------
// start

if (matchMedia('(max-width: 760px)').matches) $('settings').open = false;  // a phone: the chat first
renderChat();
guard($('chat-status'), async () => {
  await loadModels();
  // a first visit lands on the overview; later ones on the chat, or on the tab in the address (#inspect)
  const first = !localStorage.getItem('nanolab.visited');
  localStorage.setItem('nanolab.visited', '1');
  const tabs = {overview: 1, chat: 1, inspect: 1, compare: 1, arch: 1, prompts: 1, arena: 1, runs: 1};
  showTab(location.hash.slice(1) in tabs ? location.hash.slice(1) : first ? 'overview' : 'chat');
});
