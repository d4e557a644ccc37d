// arena: two replies to one prompt, from two models or two settings, shown blind in random order;
// the vote (and optional 1-5 ratings) goes to POST /v1/arena/judgments, then the names show. "Judge
// an item again" serves an item another annotator judged, with the same replies, so agreement can
// be measured (evaluate.py --arena). arenaStats() draws the ratings so far, here and (copied) on
// the Runs tab.
import {api, sse} from './api.js';
import {$, el, fmt, guard, onTab, showTab} from './dom.js';
import {models, onModels} from './models.js';

const PROMPTS = ['ROMEO:', 'JULIET:\nO Romeo,', 'First Citizen:', 'KING RICHARD III:',
                 'Reverse kfeo', 'Add 1 to 49', 'Uppercase mvrq', 'Sort bdca',
                 'The cup is zunt. What is the cup?'];
// {id, prompt, sides: [{model, text, settings}, {...}], done}: sides[0] shows as A, sides[1] as B
let duel = null;
const NO_NAME = 'write your name first: judgments are matched by annotator';

function arenaModels() {
  const names = Object.keys(models);
  for (const id of ['arena-m1', 'arena-m2']) {
    $(id).replaceChildren(...names.map(m => new Option(m, m)));
  }
  if (names.length > 1) $('arena-m2').selectedIndex = 1;
  $('annotator').value = localStorage.getItem('nanolab.annotator') || '';
}
onModels(() => { if ($('arena-m1').options.length) arenaModels(); });  // once filled, it follows
onTab('arena', () => {
  if (!$('arena-m1').options.length) arenaModels();
  guard($('arena-status'), arenaStats);
});
$('annotator').oninput = () => localStorage.setItem('nanolab.annotator', $('annotator').value);
$('arena-draw').onclick = () => {
  $('arena-prompt').value = PROMPTS[Math.floor(Math.random() * PROMPTS.length)];
};

function showDuel(d) {  // blind: the headers say A and B until the vote
  duel = d;
  d.sides.forEach((s, i) => { $('arena-h' + i).textContent = 'AB'[i]; });
  $('arena-text0').textContent = d.sides[0].text;
  $('arena-text1').textContent = d.sides[1].text;
  $('rate-a').value = $('rate-b').value = '';
  for (const b of document.querySelectorAll('.vote')) b.disabled = !d.done;
}

async function arenaGo() {
  if (!$('annotator').value.trim()) throw new Error(NO_NAME);
  const prompt = $('arena-prompt').value, messages = [{role: 'user', content: prompt}];
  const sides = [[$('arena-m1').value, Number($('arena-temp1').value)],
                 [$('arena-m2').value, Number($('arena-temp2').value)]]
    .map(([model, temperature]) => ({model, text: '', settings: {temperature, max_tokens: 120}}));
  if (Math.random() < 0.5) sides.reverse();  // which one is A is chance
  const id = crypto.randomUUID ? crypto.randomUUID() : String(Date.now()) + Math.random();
  const d = {id, prompt, sides, done: false};
  showDuel(d);
  $('arena-status').textContent = 'writing both replies...';
  await Promise.all(d.sides.map(async (s, i) => {  // streamed side by side
    const shape = {model: s.model, messages, add_generation_prompt: true};
    const n = (await api('/tokenize', shape)).count;
    const room = models[s.model].max_model_len - n;
    const body = {model: s.model, messages, stream: true, ...s.settings,
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

// a pair written elsewhere (the Compare tab's models side by side): [{model, text, settings}] x 2,
// shown blind here in random order, to be voted on as one the arena wrote itself
export function judgePair(prompt, pair) {
  const sides = pair.map(({model, text, settings}) => ({model, text, settings}));
  if (Math.random() < 0.5) sides.reverse();
  const id = crypto.randomUUID ? crypto.randomUUID() : String(Date.now()) + Math.random();
  showTab('arena');
  $('arena-prompt').value = prompt;
  showDuel({id, prompt, sides, done: true});
  $('arena-status').textContent = 'a pair from Compare: which is better? (the names show after your vote)';
}

async function arenaAgain() {
  const annotator = $('annotator').value.trim();
  if (!annotator) throw new Error(NO_NAME);
  const j = await api('/v1/arena/items?annotator=' + encodeURIComponent(annotator));
  if (!j.data.length) throw new Error('no item left that someone else judged and you have not');
  const it = j.data[Math.floor(Math.random() * j.data.length)], sides = [it.a, it.b];
  if (Math.random() < 0.5) sides.reverse();
  $('arena-prompt').value = it.prompt;
  showDuel({id: it.id, prompt: it.prompt, sides, done: true});
  $('arena-status').textContent =
    `an item judged before (${j.remaining} left for you): which is better?`;
}
$('arena-again').onclick = () => guard($('arena-status'), arenaAgain);

async function vote(winner) {
  if (!$('annotator').value.trim()) throw new Error(NO_NAME);
  const d = duel, ratings = {};
  if ($('rate-a').value) ratings.a = Number($('rate-a').value);
  if ($('rate-b').value) ratings.b = Number($('rate-b').value);
  await api('/v1/arena/judgments', {id: d.id, prompt: d.prompt, a: d.sides[0], b: d.sides[1],
                                    winner, annotator: $('annotator').value.trim(),
                                    ...(Object.keys(ratings).length ? {ratings} : {})});
  for (const b of document.querySelectorAll('.vote')) b.disabled = true;
  d.sides.forEach((s, i) => {  // the reveal
    $('arena-h' + i).textContent = `${'AB'[i]}: ${s.model} (temperature ${s.settings.temperature})`;
  });
  const said = winner === 'both_bad' ? 'both bad' : winner === 'tie' ? 'a tie' :
    winner.toUpperCase() + ' won';
  $('arena-status').textContent = `saved: ${said}`;
  await arenaStats();
}
for (const w of ['a', 'b', 'tie', 'both_bad']) {
  $('vote-' + w).onclick = () => guard($('arena-status'), () => vote(w));
}

// the ratings so far (Bradley-Terry, as Chatbot Arena's, with 95% intervals) and the annotators'
// agreement
export async function arenaStats() {
  const s = await api('/v1/arena/stats');
  if (!s.judgments) return;
  const rows = Object.entries(s.bradley_terry).map(([m, r]) => el('tr', {}, el('td', {}, m),
    el('td', {}, fmt(r.rating, 0)),
    el('td', {}, r.ci95 ? `${fmt(r.ci95[0], 0)} to ${fmt(r.ci95[1], 0)}` : ''),
    el('td', {}, s.ratings[m] ? `${fmt(s.ratings[m].mean, 2)} (${s.ratings[m].n})` : '')));
  const kappas = Object.entries(s.cohen_kappa).map(([k, v]) =>
    `Cohen's kappa ${k.replace('|', ' & ')}: ${fmt(v.kappa, 2)} over ${v.items} items`);
  const fleiss = s.fleiss_kappa;
  if (fleiss) kappas.push(`Fleiss' kappa: ${fmt(fleiss.kappa, 2)} over ${fleiss.items} items`);
  const head = ['model', 'rating', '95% interval', 'mean 1-5 (n)'].map(h => el('th', {}, h));
  $('arena-stats').replaceChildren(el('table', {}, el('tr', {}, ...head), ...rows),
    el('p', {}, `${s.judgments} judgments of ${s.items} items. ` + kappas.join('; ')));
}
