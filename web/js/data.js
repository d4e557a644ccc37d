// data: the Data tab. The prepared datasets under the server's --data_dir (GET /v1/datasets), and for
// the chosen one (GET /v1/datasets/NAME) its tokenizer and counts from meta.json, what cleaning
// removed or changed (data.py text corpora), a histogram of document lengths in tokens and decoded
// samples of train and val; then a file of one's own, uploaded (POST /v1/uploads) and prepared by
// `data.py text` as a job (POST /v1/jobs), whose log line shows here until it ends.
import {api, upload as send} from './api.js';
import {$, el, guard, onTab} from './dom.js';
import {hidpi} from './canvas.js';

const n = x => x == null ? '' : Number(x).toLocaleString('en');
const row = (k, v) => el('tr', {}, el('th', {}, k), el('td', {}, v));

let limit = Infinity;  // the server's largest upload (GET /v1/datasets says)

async function list(keep) {
  const j = await api('/v1/datasets');
  limit = j.upload_bytes;
  const sel = $('data-name'), want = keep || sel.value;
  sel.replaceChildren(...j.data.map(d => el('option', {value: d.name}, d.name)));
  if (j.data.some(d => d.name === want)) sel.value = want;
  $('data-status').textContent = j.data.length ? (j.skipped.length ? `skipped (damaged): ${j.skipped.join(', ')}` : '')
    : 'No prepared datasets in the data directory yet: python data.py shakespeare_char, or upload a file below.';
  if (sel.value) await show(sel.value);
}

// 1) the numbers of meta.json
function metaTable(d) {
  const tok = d.tokenizer ? `${d.tokenizer}${d.tokenizer_name ? ` (${d.tokenizer_name})` : ''}` : '—';
  const rows = d.train_tokens != null
    ? [row('tokenizer', tok), row('vocabulary', n(d.vocab_size)), row('train tokens', n(d.train_tokens)),
       row('val tokens', n(d.val_tokens))]
    : [row('format', d.format), row('train rows', n(d.train_rows)), row('val rows', n(d.val_rows))];
  if (d.created) rows.push(row('prepared', d.created));
  $('data-meta').replaceChildren(...rows);
}

// 2) cleaning.py's report: one row per step, what it removed or changed ('off' when it did not run)
function cleaningTable(c) {
  const box = $('data-cleaning');
  box.classList.toggle('dim', !c);
  if (!c) {
    box.replaceChildren('Only ', el('code', {}, 'data.py text'), ' corpora are cleaned.');
    return;
  }
  const rows = [row('documents in', n(c.docs_in))];
  for (const [step, v] of Object.entries(c)) {
    if (step === 'docs_in' || step === 'docs_out' || (step === 'empty' && !Object.keys(v).length)) continue;
    rows.push(row(step, typeof v === 'string' ? v : Object.entries(v).map(([k, x]) => `${k} ${n(x)}`).join(', ')));
  }
  rows.push(row('documents out', n(c.docs_out)));
  box.replaceChildren(el('table', {id: 'data-clean-table'}, ...rows));
}

// 3) document lengths, power-of-two bins, as bars with their counts
function histogram(h) {
  const cv = $('data-hist');
  cv.hidden = !h;
  $('data-hist-note').textContent = !h ? 'JSONL sets are rows, not a token stream.'
    : `${n(h.documents)} document${h.documents === 1 ? '' : 's'} in the first ${n(h.tokens_read)} train tokens` +
      (h.tokens_read >= h.limit ? ` (read at most ${n(h.limit)})` : '') + `, mean ${h.mean.toFixed(0)} tokens` +
      (h.eot == null ? '; no end-of-text token (char-level): one stream' : '');
  if (!h) return;
  cv.redraw = () => histogram(h);
  const first = Math.max(0, h.counts.findIndex(c => c > 0));  // no empty bars before the shortest
  const counts = h.counts.slice(first), bins = h.bins.slice(first);
  const {ctx, W, H} = hidpi(cv), m = {l: 8, r: 8, t: 16, b: 30}, k = counts.length;
  const top = Math.max(1, ...counts), bw = (W - m.l - m.r) / Math.max(1, k);
  ctx.font = '11px system-ui';
  ctx.textAlign = 'center';
  counts.forEach((c, i) => {
    const bh = (H - m.t - m.b) * c / top, x = m.l + i * bw;
    ctx.fillStyle = '#60a5fa';
    ctx.fillRect(x + 2, H - m.b - bh, bw - 4, bh);
    ctx.fillStyle = '#333';
    if (c) ctx.fillText(n(c), x + bw / 2, H - m.b - bh - 3);
    ctx.fillStyle = '#777';
    const [lo, hi] = bins[i];
    if (bw > 34 || i % 2 === 0) ctx.fillText(lo === hi ? `${lo}` : `${n(lo)}–${n(hi)}`, x + bw / 2, H - m.b + 14);
  });
  ctx.fillText('tokens per document', W / 2, H - 3);
}

// 4) decoded samples (or JSONL rows) of train and val
function samples(s) {
  $('data-samples').replaceChildren(...['train', 'val'].map(split => el('div', {},
    el('h4', {}, split),
    ...(s[split] || []).map(x => typeof x === 'string' ? el('pre', {className: 'sample'}, x)
      : el('pre', {className: 'sample', title: `tokens from offset ${n(x.offset)}`}, x.text)))));
}

async function show(name) {
  const d = await api(`/v1/datasets/${encodeURIComponent(name)}?k=3&seed=${Date.now() % 1000}`);
  if (name !== $('data-name').value) return;  // another was chosen while this one loaded
  metaTable(d);
  cleaningTable(d.cleaning);
  histogram(d.histogram);
  samples(d.samples);
}

// 5) upload a file, then `data.py text --input=FILE --out_name=NAME` as a job, followed until it ends
async function upload() {
  const file = $('upload-file').files[0], name = $('upload-name').value.trim(), st = $('upload-status');
  if (!file) throw new Error('choose a .txt, .md, .jsonl or .json file first');
  if (!/^[A-Za-z0-9_-]+$/.test(name)) throw new Error('the dataset name: letters, digits, - and _');
  if (file.size > limit) throw new Error(`the file has ${n(file.size)} bytes, over this server's ` +
    `${n(limit)} byte upload limit: prepare it with python data.py text --input=FILE`);
  const safe = file.name.replace(/[^A-Za-z0-9_.-]/g, '_').replace(/^[._]+/, '');
  const mb = x => (x / 1e6).toFixed(1), progress = sent =>
    st.textContent = `uploading ${mb(sent)} of ${mb(file.size)} MB (${Math.floor(100 * sent / (file.size || 1))}%)…`;
  progress(0);
  const r = await send(`/v1/uploads?name=${encodeURIComponent(safe)}`, file, progress);
  if (!r.ok) throw new Error(r.json ? r.json.error.message : `the upload failed (HTTP ${r.status})`);
  const up = r.json;
  let job = await api('/v1/jobs', {script: 'data.py', settings: {dataset: 'text', input: up.path, out_name: name,
    doc_split: $('upload-split').value, text_field: $('upload-field').value.trim() || 'text'}});
  while (!['done', 'failed', 'stopped', 'lost'].includes(job.state)) {
    st.textContent = `job ${job.id}: ${job.state}…`;
    await new Promise(ok => setTimeout(ok, 1000));
    job = await api(`/v1/jobs/${job.id}`);
  }
  if (job.state !== 'done') {
    const log = await api(`/v1/jobs/${job.id}/log?offset=0`);
    throw new Error(`data.py ${job.state}: ${log.text.trim().split('\n').slice(-2).join(' ')}`);
  }
  st.textContent = `prepared ${name} (job ${job.id})`;
  await list(name);
}

$('data-name').onchange = () => guard($('data-status'), () => show($('data-name').value));
$('data-refresh').onclick = () => guard($('data-status'), () => list());
$('upload-btn').onclick = () => guard($('upload-status'), upload);
onTab('data', () => guard($('data-status'), () => list()));
