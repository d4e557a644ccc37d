// dom: the small helpers every tab uses (find, build and format elements, run a button's action
// with its error on a status line), and the tabs, which each tab's module hooks with onTab.

export const $ = id => document.getElementById(id);

// el('b', {className: 'x'}, 'text', child) -> a new element
export const el = (tag, props = {}, ...kids) => {
  const e = Object.assign(document.createElement(tag), props);
  e.append(...kids);
  return e;
};

export const fmt = (x, d = 3) => x == null ? '' : Number(x).toFixed(d);

// a number, and not NaN or inf (which a diverged run logs)
export const finite = v => typeof v === 'number' && isFinite(v);

// whitespace made visible, for tokens shown on their own
export const visible = s => s.replace(/ /g, '·').replace(/\n/g, '↵').replace(/\t/g, '→');

// a probability in [0, 1] as a colour: pale blue to red
export const shade = p => `hsl(${220 - 220 * p}, 80%, ${92 - 40 * p}%)`;

// run an async action from a button; its error goes to a status line instead of the console
export async function guard(statusEl, fn) {
  try {
    statusEl.textContent = '';
    statusEl.classList.remove('err');
    await fn();
  } catch (e) {
    statusEl.textContent = e.message;
    statusEl.classList.add('err');
  }
}

// the tabs: the buttons in #tabs name the sections; onTab(name, fn) runs fn each time one opens
const opening = {};
export const onTab = (name, fn) => { opening[name] = fn; };
const tabButtons = () => [...document.querySelectorAll('#tabs button')];
export const tabNames = () => tabButtons().map(b => b.dataset.tab);
export const tabOpen = name => $(name).classList.contains('on');

export function showTab(name) {
  for (const b of tabButtons()) b.classList.toggle('on', b.dataset.tab === name);
  for (const s of document.querySelectorAll('.tab')) s.classList.toggle('on', s.id === name);
  history.replaceState(null, '', '#' + name);  // a reload comes back to this tab
  opening[name]?.();
}
for (const b of tabButtons()) b.onclick = () => showTab(b.dataset.tab);
