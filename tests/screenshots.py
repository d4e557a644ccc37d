"""Screenshots of each view of the page for the README (assets/view_*.png), and the time each view takes to draw
after its data arrives on the real model: serve.py on out-shakespeare-char (`python train.py` first), in this
process, driven in headless Chromium. Not a test (pytest does not collect it):

    python tests/screenshots.py assets

The Runs pictures compare the runs of the README's other recipes (out-shakespeare-gpt2, out-sft-tasks,
out-rl-tasks; the leaderboard's out-tasks-base and out-dpo-tasks, evaluated with configs/eval_tasks_suite.py)
where they are in this directory; without them those views show what there is, and the leaderboard pictures
are left out.

The Train pictures follow a 20-iteration job of configs/shakespeare_char.py started from the tab; its run
(out-screenshot-train) and its folder in _jobs/ are removed at the end. Models side by side is the one model
served, at two temperatures; the Data tab shows data/shakespeare_char (`python data.py shakespeare_char`).
"""
import os, shutil, sys, threading, time
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)
import torch
from nanolab.server import load_engines, make_server
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
torch.set_num_threads(2)
engines = load_engines('out-shakespeare-char', 'cpu', torch.float32, max_batch=8, max_rows=64, max_prompt_tokens=4096, prefill_chunk=64)
srv = make_server(engines, port=0, runs_dir='.')
threading.Thread(target=srv.serve_forever, daemon=True).start()
url = f'http://127.0.0.1:{srv.server_address[1]}/'
opts = webdriver.ChromeOptions()
opts.binary_location = shutil.which('chromium') or shutil.which('chromium-browser')
for a in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu', '--window-size=1280,1000', '--hide-scrollbars'):
    opts.add_argument(a)
opts.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
d = webdriver.Chrome(service=Service(shutil.which('chromedriver')), options=opts)
js = d.execute_script
def wait(cond, t=30):
    end = time.time() + t
    while time.time() < end:
        try:
            v = cond()
        except Exception:
            v = None
        if v:
            return v
        time.sleep(0.1)
    raise SystemExit(f'timeout {cond}')
def setv(i, v):
    js("const e = document.getElementById(arguments[0]); e.value = arguments[1]; e.dispatchEvent(new Event('input')); e.dispatchEvent(new Event('change'))", i, v)
def tab(name):
    d.find_element('css selector', f'#tabs button[data-tab={name}]').click()
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
d.get(url + '#overview')
wait(lambda: 'tokens of' in d.find_element('id', 'embed-info').text)
time.sleep(1.5)
d.save_screenshot(f'{out}/view_overview.png')
# chat: a reply, then its generation path. A base model (train.py's) opens in Complete mode; Chat is picked here
js("localStorage.setItem('nanolab.visited', '1')")
tab('chat'); setv('p-temperature', '0.8'); setv('p-max_tokens', '120')
d.find_element('id', 'mode-chat').click()
d.find_element('id', 'input').send_keys('ROMEO:\n')
wait(lambda: js("const m = [...document.querySelectorAll('#messages .msg.assistant')].pop(); return m && m.querySelector('.meta') && !document.getElementById('send').disabled"))
js("document.getElementById('shade').click()")
d.find_elements('css selector', '.msg.assistant .tk')[8].click()
wait(lambda: d.find_element('id', 'path-box').is_displayed())
d.save_screenshot(f'{out}/view_chat_path.png')
# inspect: lens and flow
tab('inspect'); text64 = 'ROMEO:\nWhat light through yonder window breaks? It is the east!!'
assert len(text64) == 64, len(text64)
setv('inspect-text', text64)
js("document.getElementById('attend').click()")
wait(lambda: d.find_element('id', 'attn-box').is_displayed())
print('attention drawn in', js("return document.getElementById('attn-box').dataset.ms"), 'ms (64 tokens)')
js("document.getElementById('lens-btn').click()")
wait(lambda: d.find_element('id', 'lens-box').is_displayed())
time.sleep(0.5)
js("document.getElementById('lens-box').scrollIntoView()")
d.save_screenshot(f'{out}/view_lens_flow.png')
print('lens+flow drawn in', js("return document.getElementById('lens-box').dataset.ms"), 'ms (64 tokens)')
js("document.getElementById('tokcmp-btn').click()")
wait(lambda: d.find_element('id', 'tokcmp').is_displayed() and d.find_elements('css selector', '#tokcmp .tokcol'))
time.sleep(0.3)
js("document.getElementById('tokcmp').scrollIntoView()")
d.save_screenshot(f'{out}/view_tokenizers.png')
# compare + beam tree
tab('compare'); setv('compare-prompt', 'ROMEO:'); setv('compare-max', '10')
js("document.getElementById('run-compare').click()")
wait(lambda: d.find_element('id', 'beam-box').is_displayed())
time.sleep(1)
js("document.getElementById('beam-box').scrollIntoView()")
d.save_screenshot(f'{out}/view_beam_tree.png')
print('beam tree drawn in', js("return document.getElementById('beam-box').dataset.ms"), 'ms')
# runs: three Shakespeare runs compared, then the models on disk with a checkpoint browser open
tab('runs')
wait(lambda: d.find_elements('css selector', '.run .cmp-tick') and d.find_elements('css selector', '#registry table'))
for name in ('out-shakespeare-char', 'out-shakespeare-gpt2', 'out-sft-tasks', 'out-rl-tasks'):
    for tick in d.find_elements('css selector', f'.run[data-name="{name}"] .cmp-tick'):  # the runs there are
        tick.click()
setv('cmp-y', 'both')
time.sleep(0.5)
js("document.getElementById('cmp-hint').scrollIntoView(); scrollBy(0, -100)")
d.save_screenshot(f'{out}/view_compare_runs.png')
js("const b = document.querySelector('#registry details'); if (b) b.open = true;"
   "document.getElementById('registry').scrollIntoView(); scrollBy(0, -140)")
time.sleep(0.3)
d.save_screenshot(f'{out}/view_registry.png')
# the leaderboard: the tasks models on configs/eval_tasks_suite.py's five benchmarks, four of them on the radar
wait(lambda: d.find_element('id', 'leaderboard').text)  # the grid, or the line that says there is none
tasks = [row for row in d.find_elements('css selector', '#leaderboard tr')
         if row.text.split(' ')[0] in ('out-tasks-base', 'out-sft-tasks', 'out-dpo-tasks', 'out-rl-tasks')]
for row in tasks:
    row.find_element('css selector', '.radar-tick').click()
if tasks:
    time.sleep(0.5)
    js("document.getElementById('leaderboard').scrollIntoView(); scrollBy(0, -120)")
    d.save_screenshot(f'{out}/view_leaderboard.png')
    js("document.getElementById('radar').scrollIntoView(); scrollBy(0, -100)")
    d.save_screenshot(f'{out}/view_radar_history.png')
else:
    print('leaderboard and radar left out: no evaluated out-*-tasks runs here')
# model
tab('arch')
wait(lambda: js("return document.getElementById('calc-out').dataset.params"))  # the counts arrived
time.sleep(0.3)
d.save_screenshot(f'{out}/view_model.png')
# train: the form on configs/shakespeare_char.py, and a 20-iteration job it starts and follows to its end.
# subtle: jobs write under runs_dir ('.'), so the run and the job's folder are removed at the end
tab('train')
wait(lambda: d.find_elements('id', 't-max_iters') and js("return document.getElementById('train-calc').dataset.params"))
for k, v in (('max_iters', '20'), ('eval_interval', '10'), ('eval_iters', '2'), ('device', 'cpu'),
             ('out_dir', 'out-screenshot-train')):
    setv('t-' + k, v)
js("document.getElementById('t-compile').checked = false")
d.find_element('id', 'train-start').click()
wait(lambda: not d.find_element('id', 'train-serve').get_property('disabled'), 300)  # done, or failed: a timeout
train_job = js("return localStorage.getItem('nanolab.trainJob')")
d.set_window_size(1280, 1500)  # the form, its estimates and the job's curve in one picture
time.sleep(0.5)
d.save_screenshot(f'{out}/view_train.png')
d.set_window_size(1280, 1000)
# compare, models side by side: the one model served, at temperatures 0.2 and 1.2
tab('compare'); d.find_element('id', 'mode-models').click()
wait(lambda: len(d.find_elements('css selector', '#sbs-cols .col')) == 2)
for i, t in enumerate(('0.2', '1.2')):
    js("const c = document.querySelectorAll('#sbs-cols .col')[arguments[0]];"
       "for (const [k, v] of [['temperature', arguments[1]], ['max_tokens', '80']]) {"
       "  const e = c.querySelector('.sbs-' + k); e.value = v; e.dispatchEvent(new Event('input')); }", i, t)
setv('sbs-input', 'ROMEO:')
js("document.getElementById('sbs-form').requestSubmit()")
wait(lambda: js("const m = document.querySelectorAll('#sbs-cols .msg.assistant .meta');"
                "return m.length == 2 && [...m].every(x => x.textContent) && !document.getElementById('sbs-send').disabled"), 60)
time.sleep(0.3)
d.save_screenshot(f'{out}/view_side_by_side.png')
# data: shakespeare_char under the server's data_dir ('data'): its counts, the length histogram and samples
tab('data')
wait(lambda: d.find_elements('css selector', '#data-name option'))
setv('data-name', 'shakespeare_char')
wait(lambda: d.find_elements('css selector', '#data-meta tr') and d.find_element('id', 'data-samples').text)
d.set_window_size(1280, 1500)  # down to the upload row
time.sleep(0.5)
d.save_screenshot(f'{out}/view_data.png')
d.set_window_size(1280, 1000)
# phone: the chat and the lens; the train job, the two columns and the data at 390 wide
d.set_window_size(390, 844)
for view, scroll, name in [
        ('inspect', "document.getElementById('lens-box').scrollIntoView()", 'view_phone_lens'),
        ('train', "document.getElementById('train-state').scrollIntoView(); scrollBy(0, -60)",
         'view_train_phone'),
        ('compare', "document.getElementById('sbs').scrollIntoView()", 'view_side_by_side_phone'),
        ('data', "scrollTo(0, 0)", 'view_data_phone')]:
    tab(view); time.sleep(0.5)
    js(scroll)
    d.save_screenshot(f'{out}/{name}.png')
errors = [e['message'] for e in d.get_log('browser') if e['level'] == 'SEVERE']
d.quit()
shutil.rmtree('out-screenshot-train', ignore_errors=True)
shutil.rmtree(os.path.join('_jobs', train_job or '-'), ignore_errors=True)
if os.path.isdir('_jobs') and not os.listdir('_jobs'):
    os.rmdir('_jobs')
print('done' if not errors else 'done, with console errors:\n' + '\n'.join(errors))
