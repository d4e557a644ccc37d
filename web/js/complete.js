// complete: the chat tab's Complete mode, for base models: the text so far, which the model
// continues through /v1/completions. A model that was never fine-tuned has not seen the chat
// template, so its chat replies are noise; GET /v1/models' chat flag says which is which, and the
// mode follows the model until the user picks one.
import {api, sse} from './api.js';
import {$, el, guard} from './dom.js';
import {model, models, onModel} from './models.js';
import {params} from './settings.js';
import {TOP_LOGPROBS, tokenSpan} from './tokens.js';

function setMode(mode) {
  $('mode-' + mode).checked = true;
  $('complete-box').hidden = mode !== 'complete';
  $('chat-box').hidden = mode === 'complete';
  const m = models[model()];
  $('mode-hint').textContent = !m ? '' : m.chat ? `${m.id} was fine-tuned (${m.stage})` :
    `${m.id} was not fine-tuned (${m.stage || 'not a nanolab run'}): it continues text; ` +
    'in Chat it would see a template it never learned';
}
for (const mode of ['chat', 'complete']) $('mode-' + mode).onchange = () => setMode(mode);
// a base model continues text; a fine-tuned one chats
onModel(m => setMode(m.chat ? 'chat' : 'complete'));

let completer = null;  // the AbortController of the completion being streamed

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
    // the text and max_tokens must fit the model's context (the API refuses more): a long text is
    // sent as its last tokens, keeping at least half the context for what the model writes
    const L = models[name].max_model_len;
    const ids = (await api('/tokenize', {model: name, prompt})).tokens;
    const maxTok = Math.min(p.max_tokens, Math.max(L - ids.length, Math.floor(L / 2)));
    const sent = ids.length + maxTok > L ? ids.slice(ids.length - (L - maxTok)) : ids;
    if (sent.length < ids.length) {
      note = ` · it saw the last ${sent.length} of the text's ${ids.length} tokens ` +
        `(its context is ${L})`;
    }
    const body = {...p, model: name, prompt: sent, max_tokens: maxTok, stream: true,
                  logprobs: TOP_LOGPROBS};
    for await (const chunk of sse('/v1/completions', body, completer.signal)) {
      const c = chunk.choices[0];
      if (!c) continue;
      const lp = c.logprobs;
      if (c.text || lp?.tokens?.length) {
        const top = lp?.top_logprobs?.[0] || {};
        const t = [c.text, lp?.tokens?.[0] ?? '', lp?.token_logprobs?.[0] ?? null,
                   Object.entries(top)];
        out.append(tokenSpan(t));
        k += 1;
      }
      if (c.finish_reason) finish = c.finish_reason;
    }
  } catch (e) {
    if (e.name !== 'AbortError') throw e;
  } finally {
    const sec = (performance.now() - t0) / 1000;
    $('complete-status').textContent =
      `${name} · ${k} tokens in ${sec.toFixed(1)} s · ${finish}${note}`;
    completer = null;
    $('complete-go').disabled = false;
    $('complete-stop').disabled = true;
  }
}

$('complete-form').onsubmit = e => {
  e.preventDefault();
  if (!completer) guard($('complete-status'), complete);
};
$('complete-input').onkeydown = e => {  // Enter continues, Shift+Enter is a new line
  if (e.key === 'Enter' && !e.shiftKey) {
    e.preventDefault();
    $('complete-form').requestSubmit();
  }
};
$('complete-stop').onclick = () => completer?.abort();
$('complete-clear').onclick = () => { $('complete-out').querySelector('.text').replaceChildren(); };
