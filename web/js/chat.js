// chat: conversations kept in localStorage, replies streamed token by token (/v1/chat/completions),
// each reply's generation path with branches from any alternative, and export as JSON or Markdown.
import {api, download, sse} from './api.js';
import {$, el, fmt, shade, visible} from './dom.js';
import {model, models} from './models.js';
import {params, saveSettings} from './settings.js';
import {TOP_LOGPROBS, tokenSpan} from './tokens.js';

// -----------------------------------------------------------------------------
// 1) conversations: [{title, messages: [{role, content, tokens?, meta?, versions?, v?}]}];
//    a reply's `tokens` are [text shown, token, logprob, [[alternative, logprob, allowed], ...],
//    allowed tokens] per token (the last two under a JSON schema: whether its grammar allowed each
//    alternative, and how many tokens it allowed at that step).

let convs = JSON.parse(localStorage.getItem('nanolab.convs') || '[]'), cur = 0;
if (!convs.length) convs.push({title: 'New chat', messages: []});

// a conversation's messages as the API takes them: role and content, without the error lines
const apiMessages = conv => conv.messages.filter(m => m.role !== 'error')
  .map(({role, content}) => ({role, content}));

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
$('new-chat').onclick = () => {
  convs.unshift({title: 'New chat', messages: []});
  cur = 0;
  saveConvs();
  renderChat();
};
$('del-chat').onclick = () => {
  convs.splice(cur, 1);
  if (!convs.length) convs.push({title: 'New chat', messages: []});
  cur = 0;
  saveConvs();
  renderChat();
};

// -----------------------------------------------------------------------------
// 2) drawing the conversation

function renderMessage(m, mi) {
  const text = el('span', {className: 'text'});
  if (m.tokens) text.append(...m.tokens.map((t, k) => Object.assign(tokenSpan(t), {k})));
  else text.textContent = m.content;
  const div = el('div', {className: 'msg ' + m.role}, text);
  div.mi = mi;
  if (m.versions) {  // a reply with branches: < 2/3 >
    const last = m.versions.length - 1;
    const step = d => () => switchVersion(mi, m.v + d);
    div.append(el('span', {className: 'versions'},
      el('button', {textContent: '<', disabled: m.v === 0, onclick: step(-1)}),
      ` version ${m.v + 1}/${m.versions.length} `,
      el('button', {textContent: '>', disabled: m.v === last, onclick: step(1)})));
  }
  if (m.meta) div.append(el('span', {className: 'meta', textContent: m.meta}));
  return div;
}

function renderChat() {
  renderConvs();
  $('messages').replaceChildren(...convs[cur].messages.map(renderMessage));
  $('path-box').hidden = true;
}
$('shade').onchange = () => { saveSettings(); renderChat(); };

// -----------------------------------------------------------------------------
// 3) streaming a reply

let controller = null;  // the AbortController of the reply being streamed

async function send(content) {
  const conv = convs[cur];
  conv.messages.push({role: 'user', content});
  if (conv.title === 'New chat') conv.title = content.slice(0, 40);
  renderChat();
  await streamReply(conv, {role: 'assistant', content: '', tokens: [], meta: ''});
}

// stream an assistant reply into msg. A new reply is added to the conversation when it ends; a
// branch (msg already the conversation's last message, holding the start of its reply) is continued
// where it stops, with the chat API's continue_final_message, so the model writes on from the token
// the user chose.
async function streamReply(conv, msg) {
  const name = model(), p = params(), branch = conv.messages.at(-1) === msg;
  const history = apiMessages(conv);
  if ($('system').value.trim()) history.unshift({role: 'system', content: $('system').value});
  const div = branch ? $('messages').lastChild : renderMessage(msg);
  const text = div.querySelector('.text');
  if (!branch) $('messages').append(div);
  div.classList.add('pending');  // the model is working before its first token: the page says so
  controller = new AbortController();
  $('send').disabled = true;
  $('stop').disabled = false;
  const t0 = performance.now(), tokens0 = msg.tokens.length;
  let finish = 'stopped';
  try {
    // 1) the prompt's tokens + max_tokens must fit the model's context: count them through the same
    //    chat template as /v1/chat/completions, and shorten max_tokens to the room left
    const shape = branch ? {continue_final_message: true} : {add_generation_prompt: true};
    const n = (await api('/tokenize', {model: name, messages: history, ...shape})).count;
    const room = models[name].max_model_len - n;
    if (room < 1) {
      throw new Error(`the conversation is ${n} tokens, the whole context of ${name}; ` +
                      'start a new chat');
    }
    // 2) stream the reply: one event per token, each with its logprob and top alternatives
    const body = {...p, model: name, messages: history, max_tokens: Math.min(p.max_tokens, room),
                  stream: true, logprobs: true, top_logprobs: TOP_LOGPROBS,
                  ...(branch ? {continue_final_message: true} : {})};
    for await (const chunk of sse('/v1/chat/completions', body, controller.signal)) {
      const c = chunk.choices[0];
      if (!c) continue;
      const delta = c.delta.content || '', lp = c.logprobs?.content[0];
      if (delta || lp) {
        // subtle: the text of a token may come later than the token (a UTF-8 character split over
        // tokens, or text held back while it could be the start of a stop string), so a span shows
        // the text that arrived with it
        const alts = lp ? lp.top_logprobs.map(a => [a.token, a.logprob, a.allowed]) : [];
        // under a JSON schema, also the likeliest tokens its grammar allowed: what it chose among
        for (const a of lp?.allowed_top_logprobs || []) {
          if (!alts.some(x => x[0] === a.token)) alts.push([a.token, a.logprob, true]);
        }
        alts.sort((x, y) => y[1] - x[1]);
        const t = [delta, lp ? lp.token : '', lp ? lp.logprob : null, alts, lp?.allowed_tokens];
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
    const s = (performance.now() - t0) / 1000;
    const k = msg.tokens.slice(tokens0).filter(t => t[2] != null).length;
    msg.meta = `${name} · ${k} tokens in ${s.toFixed(1)} s (${(k / s).toFixed(1)} tok/s) · ` +
      finish + (branch ? ` · a branch from token ${tokens0}` : '');
    if (!branch && msg.tokens.length) {
      conv.messages.splice(conv.messages.length - (finish === 'error' ? 1 : 0), 0, msg);
    }
    const {content, tokens, meta} = msg;
    if (msg.versions) Object.assign(msg.versions[msg.v], {content, tokens, meta});
    controller = null;
    $('send').disabled = false;
    $('stop').disabled = true;
    saveConvs();
    renderChat();
  }
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
    // subtle: else the Enter's newline lands in the box just emptied, and starts the next message
    e.preventDefault();
    $('chat-form').requestSubmit();
  }
};
$('stop').onclick = () => controller?.abort();

// -----------------------------------------------------------------------------
// 4) the generation path of a reply, and branches

// each step's chosen token among the alternatives the model weighed, as columns; an alternative is
// a button that branches the conversation there ("what if the model had chosen this"). Under a
// JSON schema, a step also says how many tokens the grammar allowed, and the alternatives it did
// not allow are struck through (the model weighed them; the grammar ruled them out).
function showPath(mi, k) {
  const m = convs[cur].messages[mi];
  $('path').replaceChildren(...m.tokens.map((t, i) => {
    const col = el('div', {className: 'step' + (i === k ? ' at' : '')});
    if (t[4] != null) {
      col.append(el('small', {className: 'allowed', title: 'tokens the grammar allowed here'},
                    `${t[4]} ok`));
    }
    const alts = t[3].some(a => a[0] === t[1]) ? t[3] : [...t[3], [t[1], t[2]]];
    for (const [tok, lp, ok] of alts) {
      const chosen = tok === t[1], refused = ok === false;
      const b = el('button', {className: chosen ? 'chosen' : refused ? 'refused' : '',
        disabled: chosen || refused || !!controller,
        title: chosen ? 'the token the model chose' : refused ? 'the grammar did not allow this token'
          : 'continue from here with this token instead'},
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
$('messages').addEventListener('click', e => {  // a reply's token: its generation path
  const msg = e.target.closest('.msg.assistant');
  if (e.target.tok && msg && msg.mi != null) showPath(msg.mi, e.target.k);
});
$('path-close').onclick = () => { $('path-box').hidden = true; };

// a new version of reply mi: its first i tokens, then tok, then whatever the model writes next. The
// versions of a reply, each with the messages that followed it, are kept, and the arrows on the
// reply switch between them.
function branchAt(mi, i, tok, lp, alts) {
  const conv = convs[cur], m = conv.messages[mi];
  if (controller) return;
  if (!m.versions) { m.versions = [{content: m.content, tokens: m.tokens, meta: m.meta}]; m.v = 0; }
  // what followed this version, back when it is chosen again
  m.versions[m.v].after = conv.messages.slice(mi + 1);
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
  const {content, tokens, meta} = m.versions[v];
  Object.assign(m, {content, tokens: [...tokens], meta});
  conv.messages = [...conv.messages.slice(0, mi + 1), ...(m.versions[v].after || [])];
  saveConvs();
  renderChat();
}

// -----------------------------------------------------------------------------
// 5) export: JSON (the messages as the API takes them, plus settings) or Markdown (for reading)

function exportChat(kind) {
  const c = convs[cur], msgs = apiMessages(c);
  const stem = c.title.replace(/[^\w-]+/g, '_').slice(0, 40) || 'chat';
  if (kind === 'json') {
    const saved = {model: model(), system: $('system').value, settings: params(), messages: msgs};
    download(stem + '.json', JSON.stringify(saved, null, 1), 'application/json');
  } else {
    const sys = $('system').value ? `*system:* ${$('system').value}\n\n` : '';
    download(stem + '.md', `# ${c.title}\n\nmodel: ${model()}\n\n` + sys +
             msgs.map(m => `**${m.role}:**\n\n${m.content}\n`).join('\n'), 'text/markdown');
  }
}
$('export-json').onclick = () => exportChat('json');
$('export-md').onclick = () => exportChat('md');

// -----------------------------------------------------------------------------
// 6) start: on a phone the conversation comes first, the settings folded

if (matchMedia('(max-width: 760px)').matches) $('settings').open = false;
renderChat();
