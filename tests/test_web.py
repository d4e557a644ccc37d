"""The web page (web/) in a real headless Chromium, driven by selenium, against serve.py running in this process
on two tiny random models (tests/test_serve.py's runs): the page loads without console errors; a chat reply streams
token by token and equals the API's greedy reply; switching models; stop frees the server's slot; the token
inspector shows /tokenize's ids; the attention heatmap draws; the compare view's greedy and beam columns equal the
API's, and so does each column of its models side by side, to that column's own history; the runs tab draws loss
curves, refreshes while a run trains, and shows the leaderboard. About 20 s.
The browser tests skip when Chromium or chromedriver is not installed (.ci/run installs Debian's chromium and
chromium-driver); GET /leaderboard is checked without a browser."""
import json
import re
import shutil
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

import pytest

from nanolab import results, server
from test_serve import call, serving, slow, two_runs  # tests/ is on sys.path while pytest collects it
from test_data_api import tiny_datasets

CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
CHROMEDRIVER = shutil.which('chromedriver')


@pytest.fixture(scope='module')
def site(tmp_path_factory):
    """serve.py on port 0 over a directory of two runs, with metrics and evaluation results to show."""
    d = two_runs(tmp_path_factory.mktemp('runs'))
    (d / 'char' / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in [
        {'iter': 0, 'loss': 4.1}, {'iter': 0, 'val_loss': 4.0}, {'iter': 10, 'loss': 3.2}, {'iter': 10, 'val_loss': 3.3}]))
    for name, em in (('char', 0.25), ('bpe', 0.75)):  # the leaderboard puts bpe first
        results.save_result(str(d / name), {'model': name, 'checkpoint': str(d / name / 'ckpt.pt'), 'iter': 10,
                                             'task': 'benchmark:demo', 'metrics': {'exact_match': em}, 'n': 4})
    data = tiny_datasets(tmp_path_factory.mktemp('data'))  # the Data tab's
    with serving(d, server={'data_dir': str(data)}) as srv:
        srv.url, srv.dir, srv.data = f'http://127.0.0.1:{srv.server_address[1]}/', d, data
        yield srv


@pytest.fixture(scope='module')
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip('needs Chromium and chromedriver: apt-get install chromium chromium-driver (as .ci/run does)')
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu', '--window-size=1200,900'):
        opts.add_argument(arg)  # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
    opts.set_capability('goog:loggingPrefs', {'browser': 'ALL'})  # the console, read back by console_errors()
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


@pytest.fixture
def page(site, browser):
    """The page, freshly loaded with empty localStorage, its model list filled in."""
    browser.get(site.url + '#chat')  # subtle: a first visit would land on the overview and put #overview in the URL
    browser.execute_script("localStorage.clear(); localStorage.setItem('nanolab.visited', '1')")  # lands on the chat
    browser.refresh()  # subtle: not get(url + '#chat'), which only scrolls the page it is on
    wait(lambda: len(js(browser, "return [...document.querySelectorAll('#model option')]")) == 2)
    yield browser
    assert console_errors(browser) == []


def js(driver, script, *args):
    return driver.execute_script(script, *args)


def wait(cond, timeout=20, every=0.02):
    """cond() until it is truthy -> its value; fails after timeout seconds."""
    end = time.time() + timeout
    while time.time() < end:
        v = cond()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f'timed out after {timeout} s waiting for {cond}')


def module(driver, name, expr, *args):
    """expr evaluated on m, the page's module web/js/<name>.js: import() gives the instance the page runs."""
    return js(driver, f"return import('/js/{name}.js').then(m => {expr})", *args)


def console_errors(driver):
    return [e['message'] for e in driver.get_log('browser') if e['level'] == 'SEVERE']


def set_value(driver, id_, value):
    """Set an input as a user would (the page listens to 'input' and 'change')."""
    js(driver, "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
               "e.dispatchEvent(new Event('input')); e.dispatchEvent(new Event('change'))", id_, value)


def click(driver, id_):
    driver.find_element('id', id_).click()


def reply_done(driver):
    """The last assistant message once its reply has finished (it gets a meta line), else None."""
    return js(driver, "const m = [...document.querySelectorAll('#messages .msg.assistant')].pop();"
                      "return m && m.querySelector('.meta') && !document.getElementById('send').disabled ? "
                      "m.querySelector('.text').textContent : null")


def widest(driver, css):
    """The widest element matching css (a token such as a newline can be zero pixels wide, and cannot be hovered)."""
    return js(driver, "return [...document.querySelectorAll(arguments[0])].reduce((a, b) => "
                      "b.getBoundingClientRect().width > a.getBoundingClientRect().width ? b : a)", css)


def hover(driver, element, shown, tries=5):
    """Move the mouse onto element, as a user would, until shown() is truthy -> its value.
    subtle: scrolling it into view fires a scroll event a frame later (the page hides its tooltip on scroll), and
    a pointer already resting there sends no new mouseover; so wait two frames, come in from elsewhere, retry."""
    from selenium.webdriver import ActionChains
    for _ in range(tries):
        js(driver, "arguments[0].scrollIntoView({block: 'center'})", element)  # not under the sticky header
        driver.execute_async_script("const done = arguments[arguments.length - 1];"
                                    "requestAnimationFrame(() => requestAnimationFrame(() => done()))")
        ActionChains(driver).move_to_element(driver.find_element('tag name', 'header')).move_to_element(element).perform()
        try:
            return wait(shown, timeout=2)
        except AssertionError:
            pass
    raise AssertionError(f'hovering {element.get_attribute("outerHTML")[:80]} never showed what was waited for')


def test_leaderboard_endpoint(site):
    """GET /leaderboard (what the Runs tab reads): each run's latest result per task, without per-item scores."""
    status, body = call(site, 'GET', '/leaderboard')
    assert status == 200 and 'loss' in body['lower_is_better'] and body['skipped'] == 0
    got = [(r['model'], r['task'], r['iter'], r['metrics']['exact_match']['value'], r['test']) for r in body['rows']]
    assert got == [('bpe', 'benchmark:demo', 10, 0.75, 'best'), ('char', 'benchmark:demo', 10, 0.25, None)]
    assert all('items' not in r and 'config' not in r for r in body['rows']) and body['history'] == []


def test_the_page_is_small_es_modules(site):
    """index.html loads one entry module; every module under web/js is imported from it (directly or through
    another), says what it is in its first line, and stays under 400 lines; serve.py sends them as JavaScript,
    which a browser needs before it runs a module."""
    web = Path(server.WEB_DIR)
    html = (web / 'index.html').read_text()
    assert re.findall(r'<script\b[^>]*>', html) == ['<script type="module" src="js/main.js">']
    mods = {p.name: p.read_text() for p in (web / 'js').glob('*.js')}
    seen, todo = set(), ['main.js']
    while todo:  # the import graph from main.js
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += re.findall(r"^import (?:.* from )?'\./([\w.]+)';$", mods[name], re.M)
    assert seen == set(mods) and len(mods) >= 10
    for name, text in mods.items():
        lines = text.splitlines()
        assert lines[0].startswith('// ' + name[:-3] + ': '), name
        assert len(lines) <= 400, (name, len(lines))
    with urllib.request.urlopen(site.url + 'js/main.js') as r:
        assert r.headers['Content-Type'] in ('text/javascript', 'application/javascript')
        assert r.read().decode() == mods['main.js']


def test_page_loads_every_tab(page):
    for tab in ('overview', 'inspect', 'compare', 'arch', 'prompts', 'arena', 'train', 'runs', 'data', 'chat'):
        page.find_element('css selector', f'#tabs button[data-tab={tab}]').click()
        assert js(page, f"return document.getElementById('{tab}').offsetHeight > 0")
    assert js(page, "return document.getElementById('params').querySelectorAll('input[type=range]').length") == 8
    assert console_errors(page) == []


def test_settings_stay_across_reloads(page):
    """The sliders, the system prompt and the shading are kept in localStorage, through any number of reloads."""
    set_value(page, 'p-temperature', '0.3')
    set_value(page, 'system', 'Be brief.')
    click(page, 'shade')
    for _ in range(2):
        page.refresh()
        wait(lambda: len(js(page, "return [...document.querySelectorAll('#model option')]")) == 2)
        assert js(page, "const $ = id => document.getElementById(id); return [$('p-temperature').value, "
                        "$('system').value, $('shade').checked]") == ['0.3', 'Be brief.', True]


def test_overview_is_the_first_visit_and_its_embeddings_turn(site, page):
    """A first visit lands on the overview (later ones on the chat); its background is the served model's token
    embeddings from /v1/embedding_map, drawn in 3-D, and a drag turns them."""
    js(page, "localStorage.clear()")
    page.get(site.url)  # no #tab in the address, nothing in localStorage: a first visit
    wait(lambda: js(page, "return document.getElementById('overview').classList.contains('on')"))
    set_value(page, 'model', 'char')
    j = call(site, 'POST', '/v1/embedding_map', {'model': 'char', 'n': 512})[1]
    assert len(j['points']) == len(j['tokens']) == site.engines['char'].V and all(len(p) == 3 for p in j['points'])
    wait(lambda: 'tokens of char' in page.find_element('id', 'embed-info').text)  # 'loading' until then
    def pixels():
        return js(page, "const c = document.getElementById('embed3d');"
                        "return [...c.getContext('2d').getImageData(0, 0, c.width, c.height).data].filter((v, i) => i % 4 == 3 && v > 0).length")
    assert wait(pixels) > 100
    from selenium.webdriver import ActionChains
    before = module(page, 'overview', 'm.embed.yaw')
    cv = page.find_element('id', 'embed3d')  # grab it right of the text column (which takes its own clicks)
    ActionChains(page).move_to_element_with_offset(cv, cv.size['width'] // 2 - 60, 0).click_and_hold() \
        .move_by_offset(-80, 10).release().perform()
    assert abs(module(page, 'overview', 'm.embed.yaw') - before) > 0.5
    assert module(page, 'overview', 'm.embed.spin') is False
    page.get(site.url)  # a second visit: the chat
    wait(lambda: js(page, "return document.getElementById('chat').classList.contains('on')"))


def test_chat_streams_the_greedy_reply_then_another_model(site, page):
    # 1) char model, greedy: watch the reply grow, token by token
    set_value(page, 'model', 'char')
    set_value(page, 'p-temperature', '0')
    set_value(page, 'p-max_tokens', '40')
    js(page, """window.lens = [];
        new MutationObserver(() => {
          const t = document.querySelector('#messages .msg.assistant:last-child .text');
          if (t) window.lens.push(t.textContent.length);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});""")
    with slow(site.engines['char'], 0.02):
        page.find_element('id', 'input').send_keys('Hi there\n')  # Enter sends
        text = wait(lambda: reply_done(page))
    want = call(site, 'POST', '/v1/chat/completions', {'model': 'char', 'messages': [{'role': 'user', 'content': 'Hi there'}],
                                                       'temperature': 0, 'max_tokens': 40})[1]
    assert text == want['choices'][0]['message']['content'] and len(text) > 5
    lens = js(page, 'return window.lens')
    assert len(set(lens)) > 10 and lens == sorted(lens)  # many partial replies, each longer than the last
    # 2) each token has its probability and alternatives, shown on hover
    tok = js(page, "return document.querySelector('#messages .msg.assistant .tk').tok")
    assert tok[2] <= 0 and len(tok[3]) == 5
    assert 'top alternatives' in hover(page, widest(page, '#messages .msg.assistant .tk'),
                                       lambda: js(page, "const t = document.getElementById('tip'); return !t.hidden && t.textContent"))
    # 3) the other model, second turn of the same conversation: the history goes along; max_tokens is cut to fit
    #    bpe's 64-token context
    set_value(page, 'model', 'bpe')
    page.find_element('id', 'input').send_keys('Hello\n')
    text = wait(lambda: len(page.find_elements('css selector', '.msg.assistant')) == 2 and reply_done(page))
    msgs = [{'role': 'user', 'content': 'Hi there'}, {'role': 'assistant', 'content': want['choices'][0]['message']['content']},
            {'role': 'user', 'content': 'Hello'}]
    n = call(site, 'POST', '/tokenize', {'model': 'bpe', 'messages': msgs, 'add_generation_prompt': True})[1]['count']
    want = call(site, 'POST', '/v1/chat/completions', {'model': 'bpe', 'messages': msgs, 'temperature': 0,
                                                       'max_tokens': min(40, 64 - n)})[1]
    assert text == want['choices'][0]['message']['content']
    assert page.find_elements('css selector', '.msg.assistant .meta')[1].text.startswith('bpe')
    # 4) the conversation is kept in localStorage across a reload, and exports as JSON and Markdown
    page.refresh()
    wait(lambda: len(page.find_elements('css selector', '#messages .msg')) == 4)
    js(page, "HTMLAnchorElement.prototype.click = function () { window.saved = [this.download, this.href]; }")
    saved = ("return fetch(window.saved[1]).then(r => r.text().then(t => "  # the file's name, type and text
             "[window.saved[0], r.headers.get('Content-Type'), t]))")
    click(page, 'export-json')
    name, kind, text = js(page, saved)
    assert name == 'Hi_there.json' and kind == 'application/json'
    assert [m['content'] for m in json.loads(text)['messages']][::2] == ['Hi there', 'Hello']
    click(page, 'export-md')
    name, kind, text = js(page, saved)
    assert name == 'Hi_there.md' and kind == 'text/markdown' and '**user:**\n\nHello\n' in text


def test_pending_reply_generation_path_and_branches(site, page):
    """While the model works before its first token the reply says so; a reply's token opens its generation path;
    choosing an alternative branches: the new version is the reply up to there, that token, then the API's greedy
    continuation of it (continue_final_message); the arrows switch back to the first version."""
    set_value(page, 'model', 'char')
    set_value(page, 'p-temperature', '0')
    set_value(page, 'p-max_tokens', '12')
    with slow(site.engines['char'], 0.3):
        page.find_element('id', 'input').send_keys('Hi\n')
        wait(lambda: js(page, "const m = document.querySelector('.msg.assistant.pending');"
                              "return m && !m.querySelector('.tk')"))  # pending, no token yet
    first = wait(lambda: reply_done(page))
    assert not page.find_elements('css selector', '.msg.pending')
    js(page, "arguments[0].click()", page.find_elements('css selector', '.msg.assistant .tk')[2])  # under the sticky header, maybe
    wait(lambda: page.find_element('id', 'path-box').is_displayed())
    assert len(page.find_elements('css selector', '#path .step')) == 12
    alt = js(page, "return [...document.querySelectorAll('#path .step')[2].querySelectorAll('button')]"
                   ".findIndex(b => !b.disabled)")
    button = page.find_elements('css selector', '#path .step')[2].find_elements('css selector', 'button')[alt]
    tok = js(page, "return arguments[0].firstChild.textContent", button).replace('·', ' ').replace('↵', '\n')
    button.click()
    versions = "const v = document.querySelector('.msg.assistant .versions'); return v ? v.textContent : ''"
    wait(lambda: 'version 2/2' in js(page, versions) and reply_done(page))  # js: the reply re-renders as it streams
    second = reply_done(page)
    kept = first[:2] + tok  # char model: one token per character
    assert second.startswith(kept) and second != first
    want = call(site, 'POST', '/v1/chat/completions', {'model': 'char', 'temperature': 0, 'max_tokens': 12,
                                                       'continue_final_message': True, 'messages': [
        {'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': kept}]})[1]
    assert second == kept + want['choices'][0]['message']['content']
    page.find_element('css selector', '.msg.assistant .versions button').click()  # '<': version 1 again
    wait(lambda: 'version 1/2' in js(page, versions))
    assert reply_done(page) == first


def test_a_json_schema_reply_and_what_its_grammar_allowed(site, page):
    """With a JSON schema in the settings the reply follows it; its generation path says at each step how many
    tokens the grammar allowed and strikes out the alternatives it did not allow (they cannot be chosen); branching
    from an allowed alternative continues under the grammar, so the new version follows the schema too."""
    jsonschema = pytest.importorskip('jsonschema')
    schema = {'type': 'object', 'properties': {'name': {'type': 'string', 'maxLength': 6}},
              'required': ['name'], 'additionalProperties': False}
    set_value(page, 'model', 'bpe')
    set_value(page, 'p-temperature', '0')
    set_value(page, 'p-max_tokens', '30')
    set_value(page, 'schema', 'nope')
    assert 'not JSON' in page.find_element('id', 'schema-hint').text
    set_value(page, 'schema', json.dumps(schema))
    assert page.find_element('id', 'schema-hint').text == ''
    page.find_element('id', 'input').send_keys('Hi\n')
    first = wait(lambda: reply_done(page))
    jsonschema.validate(json.loads(first), schema)
    js(page, "arguments[0].click()", page.find_elements('css selector', '.msg.assistant .tk')[0])
    wait(lambda: page.find_element('id', 'path-box').is_displayed())
    steps = page.find_elements('css selector', '#path .step')
    labels = [s.find_element('css selector', '.allowed').text for s in steps]
    assert all(re.fullmatch(r'\d+ ok', x) for x in labels) and labels[0] == '1 ok', labels  # only '{"' can open it
    refused = page.find_elements('css selector', '#path button.refused')
    assert refused and all(not b.is_enabled() for b in refused)
    at = js(page, "return [...document.querySelectorAll('#path .step')].findIndex("
                  "s => [...s.querySelectorAll('button')].some(b => !b.disabled))")
    page.save_screenshot('/tmp/schema_path.png')
    assert at > 0  # inside the string the grammar allows many tokens
    js(page, "[...document.querySelectorAll('#path .step')[arguments[0]].querySelectorAll('button')]"
             ".find(b => !b.disabled).click()", at)
    versions = "const v = document.querySelector('.msg.assistant .versions'); return v ? v.textContent : ''"
    wait(lambda: 'version 2/2' in js(page, versions) and reply_done(page))
    second = reply_done(page)
    assert second != first
    jsonschema.validate(json.loads(second), schema)
    set_value(page, 'schema', '')


def test_stop_ends_the_stream_and_frees_the_slot(site, page):
    w = site.engines['char']
    set_value(page, 'model', 'char')
    set_value(page, 'p-max_tokens', '200')
    before = w.stats['rows_cancelled']
    with slow(w, 0.05):
        page.find_element('id', 'input').send_keys('Go\n')
        wait(lambda: len(page.find_elements('css selector', '.msg.assistant .tk')) >= 3)
        click(page, 'stop')
        text = wait(lambda: reply_done(page))
        # the server noticed the closed connection and let the row go
        wait(lambda: w.stats['rows_cancelled'] == before + 1 and not any(w.slots), timeout=5)
    assert 0 < len(text) < 200 and 'stopped' in page.find_element('css selector', '.msg.assistant .meta').text


def test_inspector_tokens_and_attention(site, page):
    page.find_element('css selector', '#tabs button[data-tab=inspect]').click()
    set_value(page, 'model', 'bpe')
    text = 'Hello world, tokens!\nNew line'
    set_value(page, 'inspect-text', text)
    click(page, 'tokenize')
    want = call(site, 'POST', '/tokenize', {'model': 'bpe', 'prompt': text})[1]['tokens']
    ids = wait(lambda: js(page, "return [...document.querySelectorAll('#tokens span')].map(s => +s.dataset.id)"))
    assert ids == want
    assert 'decode back to the text: yes' in page.find_element('id', 'tok-info').text
    # the heatmap: a layer and a head selector, and a canvas that is not blank
    click(page, 'attend')
    wait(lambda: page.find_element('id', 'attn-box').is_displayed())
    assert len(page.find_elements('css selector', '#layer option')) == 2
    assert len(page.find_elements('css selector', '#head option')) == 5  # the mean, then 4 heads
    set_value(page, 'layer', '1')
    set_value(page, 'head', '2')
    coloured = js(page, """const c = document.getElementById('heatmap');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 0; i < d.length; i += 4) n += d[i] < 250; return n;""")
    assert coloured > 100


def run_compare(page, max_tokens):
    """The compare tab on the char model's 'ROMEO:', every strategy at once."""
    page.find_element('css selector', '#tabs button[data-tab=compare]').click()
    set_value(page, 'model', 'char')
    set_value(page, 'compare-prompt', 'ROMEO:')
    set_value(page, 'compare-max', str(max_tokens))
    click(page, 'run-compare')


def test_compare_columns(site, page):
    run_compare(page, 30)

    def columns():  # [meta line, text] per column, once every column has its answer
        c = js(page, "return [...document.querySelectorAll('.col')].map(c => "
                     "[c.querySelector('.meta').textContent, c.querySelector('pre').textContent])")
        return c if c and all(meta for meta, _ in c) else None
    cols = wait(columns)
    assert len(cols) == 6
    for i, extra in ((0, {}), (5, {'num_beams': 4})):  # greedy and beam search, as the API gives them
        body = {'model': 'char', 'prompt': 'ROMEO:', 'max_tokens': 30, 'temperature': 0, **extra}
        assert cols[i][1] == call(site, 'POST', '/v1/completions', body)[1]['choices'][0]['text']


def set_in(driver, element, value):
    """set_value for an element without an id (a side-by-side column's model menu and settings)."""
    js(driver, "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'));"
               "arguments[0].dispatchEvent(new Event('change'))", element, value)


def sbs_replies(driver):
    """[(text, meta)] of each side-by-side column's last reply once every column has finished, else None."""
    return js(driver, """if (document.getElementById('sbs-send').disabled) return null;
        const r = [...document.querySelectorAll('#sbs-cols .col')].map(c => {
          const m = [...c.querySelectorAll('.msg')].pop();
          return m && m.classList.contains('assistant') && m.querySelector('.meta').textContent ?
            [m.querySelector('.text').textContent, m.querySelector('.meta').textContent] : null; });
        return r.length && r.every(x => x) ? r : null""")


def test_models_side_by_side_and_send_to_arena(site, page):
    """The Compare tab's second mode: one message streams into two columns at once (char and bpe, greedy), and each
    column's reply equals the API's greedy reply to that column's own history, on the first turn and on the second
    (each history holds its own model's replies); each token carries its probability, each column its tokens/s;
    "send to arena" shows the last pair blind in the Arena tab, and the vote stores it with both models' names."""
    from nanolab import arena
    page.find_element('css selector', '#tabs button[data-tab=compare]').click()
    click(page, 'mode-models')
    assert not page.find_element('id', 'run-compare').is_displayed()
    cols = page.find_elements('css selector', '#sbs-cols .col')
    assert len(cols) == 2
    for col, name in zip(cols, ('char', 'bpe')):
        set_in(page, col.find_element('css selector', '.sbs-model'), name)
        set_in(page, col.find_element('css selector', '.sbs-temperature'), '0')
        set_in(page, col.find_element('css selector', '.sbs-max_tokens'), '30')
    histories = {'char': [], 'bpe': []}
    for turn in ('Hi there', 'Hello'):
        page.find_element('id', 'sbs-input').send_keys(turn + '\n')  # Enter sends, to every column
        got = wait(lambda: sbs_replies(page))
        for (text, meta), name in zip(got, ('char', 'bpe')):
            msgs = histories[name] + [{'role': 'user', 'content': turn}]
            n = call(site, 'POST', '/tokenize', {'model': name, 'messages': msgs, 'add_generation_prompt': True})[1]['count']
            room = {'char': 256, 'bpe': 64}[name] - n  # each model's context (test_serve checks /v1/models says so)
            kept = js(page, "return JSON.parse(localStorage.getItem('nanolab.sideBySide'))")  # what each column sends
            settings = next(c['settings'] for c in kept if c['model'] == name)
            assert settings['temperature'] == 0 and settings['max_tokens'] == 30 and 'top_p' in settings
            want = call(site, 'POST', '/v1/chat/completions', {**settings, 'model': name, 'messages': msgs,
                                                               'max_tokens': min(30, room)})[1]
            assert text == want['choices'][0]['message']['content'] and text, (name, turn)
            assert meta.startswith(name) and 'tok/s' in meta
            histories[name] = msgs + [{'role': 'assistant', 'content': text}]
    assert histories['char'][1] != histories['bpe'][1]  # two models, two histories
    # the columns outlive a reload: models, settings and conversations
    page.refresh()
    page.find_element('css selector', '#tabs button[data-tab=compare]').click()
    click(page, 'mode-models')
    assert wait(lambda: sbs_replies(page)) == got
    assert [c.find_element('css selector', '.sbs-model').get_attribute('value')
            for c in page.find_elements('css selector', '#sbs-cols .col')] == ['char', 'bpe']
    toks = js(page, "return [...document.querySelectorAll('#sbs-cols .col')].map(c => c.querySelector('.msg.assistant .tk').tok)")
    assert all(t[2] <= 0 and len(t[3]) == 5 for t in toks)
    # send to arena: the last two replies, blind, then a vote that names them
    path = site.dir / 'arena' / 'judgments.jsonl'
    before = len(arena.read_judgments(str(path))) if path.exists() else 0
    click(page, 'sbs-arena')
    wait(lambda: js(page, "return document.getElementById('arena').classList.contains('on')"))
    assert [page.find_element('id', f'arena-h{i}').text for i in (0, 1)] == ['A', 'B']
    shown = js(page, "return [0, 1].map(i => document.getElementById('arena-text' + i).textContent)")
    assert sorted(shown) == sorted(h[-1]['content'] for h in histories.values())
    set_value(page, 'annotator', 'ann-sbs')
    click(page, 'vote-a')
    wait(lambda: 'saved' in page.find_element('id', 'arena-status').text)
    judged = arena.read_judgments(str(path))
    assert len(judged) == before + 1
    j = judged[-1]
    assert j['prompt'] == 'Hello' and j['winner'] == 'a' and j['a']['text'] == shown[0]
    assert {j['a']['model'], j['b']['model']} == {'char', 'bpe'} and j['a']['settings']['temperature'] == 0


def test_logit_lens_flow_and_tokenizers(site, page):
    """The lens's top row is the model's own argmax at each position (the API's, and a plain forward's); the flow
    draws a grid per quantity and head; the tokenizer columns equal each tokenizer's own encoding."""
    import torch
    page.find_element('css selector', '#tabs button[data-tab=inspect]').click()
    set_value(page, 'model', 'char')
    text = 'To be, or not to be: that is the question, said the pr'  # 56 tokens
    set_value(page, 'inspect-text', text)
    click(page, 'lens-btn')
    wait(lambda: page.find_element('id', 'lens-box').is_displayed())
    top = js(page, "return [...document.querySelector('#lens tr').querySelectorAll('td')].map(td => +td.dataset.id)")
    w = site.engines['char']
    with torch.no_grad():
        want = w.model(torch.tensor([w.tok.encode(text)]))[0][0].argmax(-1).tolist()
    assert top == want
    layers = js(page, "return document.querySelectorAll('#lens tr').length")
    assert layers == w.model.config.n_layer + 1  # a row per layer, then the input tokens
    assert len(page.find_elements('css selector', '#flow canvas')) == 3 + w.model.config.n_head
    ms = int(js(page, "return document.getElementById('lens-box').dataset.ms"))
    print(f'logit lens + flow, {len(text)} tokens: drawn in {ms} ms after the data came')
    assert ms < 500
    # the tokenizer comparison: characters, GPT-2 (tiktoken), the model's own
    set_value(page, 'model', 'bpe')
    click(page, 'tokcmp-btn')
    cols = wait(lambda: js(page, "return [...document.querySelectorAll('#tokcmp .tokcol')].map(c => "
                                 "[...c.querySelectorAll('.tokens span')].length)"))
    gpt2 = site.engines['bpe'].tok
    assert cols == [len(text), len(gpt2.encode(text)), len(gpt2.encode(text))]


def test_beam_tree_view(site, page):
    """The compare tab's beam column draws the API's tree: its red path spells the beam column's text."""
    run_compare(page, 12)
    wait(lambda: page.find_element('id', 'beam-box').is_displayed())
    body = {'model': 'char', 'prompt': 'ROMEO:', 'max_tokens': 12, 'temperature': 0, 'num_beams': 4, 'beam_tree': True}
    tree = call(site, 'POST', '/v1/completions', body)[1]['choices'][0]
    drawn = js(page, "return [...document.querySelectorAll('#beam-tree g')].map(g => [+g.dataset.id, g.classList.contains('best'),"
                     " g.classList.contains('pruned')])")
    assert sorted(drawn) == sorted([n['id'], n['best'], n['pruned']] for n in tree['beam_tree'])
    best = sorted((n for n in tree['beam_tree'] if n['best']), key=lambda n: n['step'])
    assert ''.join(n['text'] for n in best) == tree['text']
    set_value(page, 'beam-step', '2')  # step by step: later steps hide
    shown = js(page, "return [...document.querySelectorAll('#beam-tree g')].filter(g => g.style.display !== 'none')"
                     ".map(g => +g.dataset.step)")
    assert shown and max(shown) == 2
    assert int(js(page, "return document.getElementById('beam-box').dataset.ms")) < 100


def test_architecture_view_and_calculator(site, page):
    """The Model tab draws the served model's blocks; the calculator's counts (POST /v1/shape) equal model.py's for
    many configs, and a shape model.py refuses is refused with model.py's reason, and only then."""
    import random
    from model import GPT, GPTConfig
    page.find_element('css selector', '#tabs button[data-tab=arch]').click()
    set_value(page, 'model', 'bpe')
    page.find_element('css selector', '#tabs button[data-tab=arch]').click()
    view = wait(lambda: page.find_element('id', 'arch-view').text)
    assert 'Block × 2' in view and '4 query heads, 2 key/value heads' in view and 'SwiGLU' in view and 'RMSNorm' in view
    want = site.engines['bpe'].model.num_params(non_embedding=False)  # the calculator opens on the served shape
    wait(lambda: js(page, "return document.getElementById('calc-out').dataset.params") == str(want))
    rng = random.Random(0)
    for _ in range(40):
        arch, n_head = rng.choice(['gpt2', 'llama']), rng.choice([1, 2, 4, 8])
        cfg = dict(arch=arch, n_layer=rng.randint(1, 6), n_head=n_head, n_embd=n_head * 2 * rng.randint(1, 12),
                   block_size=rng.choice([16, 64, 100]), vocab_size=rng.randint(10, 500), bias=rng.random() < 0.5,
                   tie_embeddings=rng.random() < 0.5, ffn_hidden=rng.choice([0, 0, 24, 100]),
                   positions=rng.choice(['', 'learned', 'rope', 'sinusoidal']),
                   n_kv_head=rng.choice([k for k in (1, 2, 4, 8) if n_head % k == 0]) if arch == 'llama' else 0)
        m = GPT(GPTConfig(**cfg))
        status, got = call(site, 'POST', '/v1/shape', cfg)
        assert status == 200 and got['config'] == asdict(m.config), cfg
        assert got['params'] == m.num_params(non_embedding=False), cfg
        assert got['params_non_embedding'] == m.num_params(), cfg
        assert got['flops_per_token'] == m.flops_per_token(), cfg
    set_value(page, 'c-n_layer', '8')  # the calculator follows its inputs
    want = GPT(GPTConfig(**{**asdict(site.engines['bpe'].model.config), 'n_layer': 8})).num_params(non_embedding=False)
    wait(lambda: js(page, "return document.getElementById('calc-out').dataset.params") == str(want))
    # llama blocks with learned positions and an odd head size are a valid shape; with RoPE they are not (its
    # rotation pairs a head's dimensions), and the page says model.py's reason
    for k, v in (('c-arch', 'llama'), ('c-positions', 'learned'), ('c-n_embd', '12'), ('c-n_head', '4'),
                 ('c-n_kv_head', '2')):
        set_value(page, k, v)
    want = GPT(GPTConfig(**{**asdict(site.engines['bpe'].model.config), 'n_layer': 8, 'arch': 'llama',
                            'positions': 'learned', 'n_embd': 12, 'n_head': 4, 'n_kv_head': 2})).num_params(False)
    wait(lambda: js(page, "return document.getElementById('calc-out').dataset.params") == str(want))
    set_value(page, 'c-positions', 'rope')
    wait(lambda: 'RoPE needs an even head size' in page.find_element('id', 'calc-out').text)


def test_every_view_fits_a_phone(site, page):
    """At a phone's 390 px, each tab's views stack in one column: nothing is wider than the screen except the boxes
    that scroll on their own (the lens table, the beam tree, the generation path)."""
    page.set_window_size(390, 844)
    try:
        set_value(page, 'model', 'char')
        for tab, button in (('overview', None), ('inspect', 'lens-btn'), ('compare', 'run-compare'), ('arch', None),
                            ('train', None)):
            page.find_element('css selector', f'#tabs button[data-tab={tab}]').click()
            if button:
                set_value(page, 'compare-max', '8')
                click(page, button)
                wait(lambda: page.find_element('id', 'lens-box' if tab == 'inspect' else 'beam-box').is_displayed())
            assert js(page, f"return document.getElementById('{tab}').offsetHeight > 0")
            assert js(page, "return document.documentElement.scrollWidth") <= 390, tab
        set_value(page, 'p-max_tokens', '8')  # the side-by-side columns start from the chat's settings
        page.find_element('css selector', '#tabs button[data-tab=compare]').click()
        click(page, 'mode-models')
        page.find_element('id', 'sbs-input').send_keys('Hi\n')
        wait(lambda: sbs_replies(page))
        assert js(page, "return document.documentElement.scrollWidth") <= 390, 'models side by side'
    finally:
        page.set_window_size(1200, 900)


def test_arena_blind_vote_and_judging_again(site, page):
    """Two replies stream side by side with the names hidden; the vote writes one judgment line in arena.py's format
    and then shows the names; another annotator judges the same item again; the ratings and kappa come back."""
    from nanolab import arena
    path = site.dir / 'arena' / 'judgments.jsonl'
    if path.exists():
        path.unlink()
    page.find_element('css selector', '#tabs button[data-tab=arena]').click()
    set_value(page, 'annotator', 'ann1')
    set_value(page, 'arena-m1', 'char')
    set_value(page, 'arena-m2', 'bpe')
    set_value(page, 'arena-prompt', 'Hello')
    click(page, 'arena-go')
    wait(lambda: not page.find_element('id', 'vote-a').get_attribute('disabled'))
    heads = [page.find_element('id', f'arena-h{i}').text for i in (0, 1)]
    assert heads == ['A', 'B']  # blind
    texts = [page.find_element('id', f'arena-text{i}').text for i in (0, 1)]
    set_value(page, 'rate-a', '4')
    click(page, 'vote-a')
    wait(lambda: 'saved' in page.find_element('id', 'arena-status').text)
    judged = arena.read_judgments(str(path))
    assert len(judged) == 1 and judged[0]['winner'] == 'a' and judged[0]['annotator'] == 'ann1'
    assert judged[0]['ratings'] == {'a': 4} and {judged[0]['a']['model'], judged[0]['b']['model']} == {'char', 'bpe'}
    assert [judged[0]['a']['text'].strip(), judged[0]['b']['text'].strip()] == [t.strip() for t in texts]
    assert page.find_element('id', 'arena-h0').text.startswith('A: ' + judged[0]['a']['model'])  # the reveal
    # another annotator, the same item, the same two replies (in a new random order)
    set_value(page, 'annotator', 'ann2')
    click(page, 'arena-again')
    wait(lambda: not page.find_element('id', 'vote-a').get_attribute('disabled'))
    shown = sorted(page.find_element('id', f'arena-text{i}').text.strip() for i in (0, 1))
    assert shown == sorted(t.strip() for t in texts)
    first = page.find_element('id', 'arena-text0').text.strip()
    click(page, 'vote-a' if first == judged[0]['a']['text'].strip() else 'vote-b')  # agrees with ann1
    wait(lambda: 'saved' in page.find_element('id', 'arena-status').text)
    judged = arena.read_judgments(str(path))
    assert [j['id'] for j in judged] == [judged[0]['id']] * 2 and judged[1]['annotator'] == 'ann2'
    assert judged[1][judged[1]['winner']]['text'] == judged[0]['a']['text']
    stats = call(site, 'GET', '/v1/arena/stats')[1]
    assert stats['judgments'] == 2 and stats['cohen_kappa']['ann1|ann2']['items'] == 1
    wait(lambda: 'Cohen' in page.find_element('id', 'arena-stats').text)  # refreshed after the second vote
    status, body = call(site, 'POST', '/v1/arena/judgments', {'id': 'x', 'prompt': 'p', 'winner': 'maybe'})
    assert status == 400 and 'bad judgment' in body['error']['message']


def test_prompt_templates_on_the_page(site, page):
    """The template picker: its variable fields, a preview whose token ids are prompts.prompt_ids' in Python (and
    /tokenize's), few-shot examples picked by the seed as prompts.few_shot picks them, one's own template saved in
    the browser, and Use in chat."""
    from nanolab import prompts
    tok = site.engines['bpe'].tok
    page.find_element('css selector', '#tabs button[data-tab=prompts]').click()
    set_value(page, 'model', 'bpe')
    wait(lambda: len(page.find_elements('css selector', '#tpl option')) >= 20)
    set_value(page, 'tpl', 'translate')
    names = js(page, "return [...document.querySelectorAll('.tpl-var')].map(e => e.name)")
    assert names == prompts.variables('translate')
    values = {'source': 'English', 'target': 'French', 'text': 'Good morning'}
    for i, v in enumerate(names):
        js(page, "document.querySelectorAll('.tpl-var')[arguments[0]].value = arguments[1]", i, values[v])
    click(page, 'tpl-preview-btn')
    ids = wait(lambda: js(page, "return document.getElementById('tpl-preview').dataset.tokens"))
    assert json.loads(ids) == prompts.prompt_ids(tok, 'translate', values)
    assert json.loads(ids) == call(site, 'POST', '/tokenize', {'model': 'bpe', 'template': 'translate', 'variables': values})[1]['tokens']
    assert page.find_element('id', 'tpl-preview').text == prompts.render('translate', **values)
    # few-shot: k examples picked by the seed, as prompts.few_shot does in Python
    set_value(page, 'tpl', 'qa')
    js(page, "document.querySelector('.tpl-var').value = 'Sort dcba'")
    set_value(page, 'tpl-k', '2')
    set_value(page, 'tpl-seed', '5')
    click(page, 'tpl-preview-btn')
    examples = [json.loads(line) for line in js(page, "return document.getElementById('tpl-examples').value").splitlines()]
    want = prompts.few_shot(examples, 2, 5) + '\n\n' + prompts.render('qa', question='Sort dcba')
    wait(lambda: page.find_element('id', 'tpl-preview').text == want)
    # one's own template, kept in localStorage; then into the chat box
    set_value(page, 'tpl-k', '0')
    set_value(page, 'own-name', 'mine')
    set_value(page, 'own-text', 'Word: {word}\nRhymes with:')
    js(page, "document.getElementById('own-save').closest('details').open = true")  # as a user opens it
    click(page, 'own-save')
    wait(lambda: js(page, "return document.getElementById('tpl').value") == 'my:mine')
    js(page, "document.querySelector('.tpl-var').value = 'cat'")
    click(page, 'tpl-use')
    wait(lambda: js(page, "return document.getElementById('chat').classList.contains('on')"))
    assert js(page, "return document.getElementById('input').value") == 'Word: cat\nRhymes with:'
    assert 'mine' in js(page, "return localStorage.getItem('nanolab.templates')")


def test_runs_curves_refresh_and_leaderboard(site, page):
    page.find_element('css selector', '#tabs button[data-tab=runs]').click()
    card = wait(lambda: page.find_elements('css selector', '.run[data-name=char]'))[0]
    assert 'iter 10' in card.text and 'best val loss 3.300' in card.text
    assert js(page, "const c = document.querySelector('.run canvas');"
                    "return [...c.getContext('2d').getImageData(0, 0, c.width, c.height).data].some(v => v > 0)")
    rows = wait(lambda: [r.text for r in page.find_elements('css selector', '#leaderboard tr')])  # a request later
    assert rows[2].startswith('bpe @10 0.7500') and rows[3].startswith('char @10 0.2500')  # best first
    (site.dir / 'char' / 'config.json').write_text(json.dumps({'max_iters': 100}))
    with open(site.dir / 'char' / 'metrics.jsonl', 'a') as f:  # the run trains on: the page polls every 5 s
        f.write(json.dumps({'iter': 20, 'loss': 2.5, 'time': 2.0}) + '\n' + json.dumps({'iter': 30, 'loss': 2.4, 'time': 3.0}) + '\n')
    wait(lambda: 'iter 30' in card.text, timeout=8)  # and its progress: 10 iterations a second, 70 to go
    assert 'training: 30/100 (30%), ETA 0:07' in card.text


def test_data_tab_shows_meta_cleaning_lengths_and_samples_and_prepares_an_upload(site, page, tmp_path):
    """The Data tab's counts equal meta.json's, its cleaning table cleaning.py's report, its histogram the API's;
    samples of train and val show; it fits a phone; a file uploaded from it is prepared by a `data.py text` job."""
    meta = json.loads((site.data / 'tiny' / 'meta.json').read_text())
    page.find_element('css selector', '#tabs button[data-tab=data]').click()
    wait(lambda: js(page, "return [...document.querySelectorAll('#data-name option')].map(o => o.value)") == ['pairs', 'tiny'])
    set_value(page, 'data-name', 'tiny')
    cells = lambda id_: dict(js(page, f"return [...document.querySelectorAll('#{id_} tr')].map(r => "
                                      "[r.cells[0].textContent, r.cells[1].textContent])"))
    wait(lambda: 'train tokens' in cells('data-meta'))
    got = cells('data-meta')
    assert (got['train tokens'], got['val tokens'], got['vocabulary']) == \
        tuple(f'{meta[k]:,}' for k in ('train_tokens', 'val_tokens', 'vocab_size'))
    clean = cells('data-clean-table')
    assert clean['documents in'] == str(meta['cleaning']['docs_in']) and clean['documents out'] == str(meta['cleaning']['docs_out'])
    assert clean['dedup'] == 'removed 1' and clean['near_dedup'] == 'removed 1' and 'email 1' in clean['pii']
    api = call(site, 'GET', '/v1/datasets/tiny')[1]['histogram']
    assert f"{api['documents']} documents" in page.find_element('id', 'data-hist-note').text
    assert js(page, "return document.getElementById('data-hist').offsetHeight") > 100
    samples = js(page, "return [...document.querySelectorAll('#data-samples > div')].map(d => d.querySelectorAll('pre').length)")
    assert samples == [3, 3] and all(p.text.strip() for p in page.find_elements('css selector', '#data-samples pre'))
    page.set_window_size(390, 844)
    try:
        assert js(page, "return document.documentElement.scrollWidth") <= 390
    finally:
        page.set_window_size(1200, 900)
    set_value(page, 'data-name', 'pairs')  # a JSONL set: rows, no histogram
    wait(lambda: cells('data-meta').get('train rows') == '5')
    # a file of one's own: uploaded, then prepared by data.py text as a job, its meta.json like the original's
    def prepare(path, name, split, field='text'):
        page.find_element('id', 'upload-file').send_keys(str(path))
        for box, v in (('upload-name', name), ('upload-split', split), ('upload-field', field)):
            set_value(page, box, v)
        click(page, 'upload-btn')
        status = lambda: page.find_element('id', 'upload-status')
        wait(lambda: f'prepared {name}' in status().text or 'err' in status().get_attribute('class'), timeout=90)
        assert f'prepared {name}' in status().text, status().text
        assert json.loads((site.data / name / 'meta.json').read_text())['train_tokens'] == meta['train_tokens']
    (tmp_path / 'mine.txt').write_text((site.data / 'corpus.txt').read_text())
    prepare(tmp_path / 'mine.txt', 'mine', 'line')
    wait(lambda: cells('data-meta').get('train tokens') == f"{meta['train_tokens']:,}")
    # JSON lines whose text is in another field, each row a document: the same documents, the same tokens
    lines = (site.data / 'corpus.txt').read_text().splitlines()
    (tmp_path / 'rows.jsonl').write_text(''.join(json.dumps({'id': i, 'body': t}) + '\n' for i, t in enumerate(lines)))
    prepare(tmp_path / 'rows.jsonl', 'rows', 'file', 'body')


def test_train_tab_starts_a_job_follows_it_and_serves_the_run(site, page):
    """The Train tab's form is train.py's settings over the recipe's; a misspelled setting comes back as the
    configurator's 400 on the page, before anything starts; a tiny run started from the form reaches done with its
    log and loss curve on the page, and "serve it" puts it in the model menu. It fits a phone."""
    page.find_element('css selector', '#tabs button[data-tab=train]').click()
    wait(lambda: js(page, "return document.getElementById('t-max_iters')?.value") == '1000')
    assert js(page, "return document.getElementById('train-recipe').value") == 'configs/shakespeare_char.py'
    assert js(page, "return document.getElementById('t-max_iters').parentNode.title") == 'total optimizer steps'
    assert js(page, "return document.getElementById('t-warmup_iters').closest('details') !== null")
    wait(lambda: js(page, "return document.getElementById('train-calc').dataset.params"))
    # a misspelled setting: refused by the configurator, its words on the page
    set_value(page, 'train-extra', 'max_iter=4')
    click(page, 'train-start')
    wait(lambda: 'err' in page.find_element('id', 'train-status').get_attribute('class'))
    assert "max_iter" in page.find_element('id', 'train-status').text and "max_iters" in page.find_element('id', 'train-status').text
    assert all('400' in e for e in console_errors(page))  # the refused POST, and nothing else
    set_value(page, 'train-extra', '')
    tiny = {'max_iters': 4, 'n_layer': 1, 'n_head': 2, 'n_kv_head': 1, 'n_embd': 32, 'block_size': 32, 'batch_size': 2,
            'eval_iters': 1, 'eval_interval': 2, 'log_interval': 1, 'warmup_iters': 1, 'device': 'cpu',
            'dataset': 'tiny', 'out_dir': 'train-tab'}
    for k, v in tiny.items():
        set_value(page, 't-' + k, str(v))
    js(page, "document.getElementById('t-compile').checked = false")
    click(page, 'train-start')
    wait(lambda: re.search(r': (done|failed|lost)', page.find_element('id', 'train-state').text), timeout=120)
    state = page.find_element('id', 'train-state').text
    assert ': done' in state, (state, page.find_element('id', 'train-log').text)
    assert 'iter' in page.find_element('id', 'train-log').text
    points = js(page, "return document.getElementById('train-curve').series.map(s => s.points.length)")
    assert points[0] >= 2 and points[1] >= 2, points
    page.save_screenshot('/tmp/train_desktop.png')
    js(page, "document.getElementById('train-state').scrollIntoView()")
    page.save_screenshot('/tmp/train_desktop_job.png')
    page.set_window_size(390, 844)
    try:
        assert js(page, "return document.documentElement.scrollWidth <= document.documentElement.clientWidth")
        js(page, "document.getElementById('train-state').scrollIntoView()")
        page.save_screenshot('/tmp/train_phone_job.png')
        js(page, "window.scrollTo(0, 0)")
        page.save_screenshot('/tmp/train_phone.png')
    finally:
        page.set_window_size(1200, 900)
    click(page, 'train-serve')
    wait(lambda: 'train-tab' in js(page, "return [...document.querySelectorAll('#model option')].map(o => o.value)"))
    assert js(page, "return document.getElementById('model').value") == 'train-tab'
    entry = next(e for e in call(site, 'GET', '/v1/registry')[1]['data'] if e['name'] == 'train-tab')
    assert entry['served'] == 'train-tab' and entry['kind'] == 'run'  # the Runs tab's models on disk
    assert call(site, 'POST', '/v1/models/unload', {'model': 'train-tab'})[0] == 200  # the other tests see two models
    # "evaluate it": an evaluate.py job on the run, whose perplexity then is in the leaderboard
    click(page, 'train-eval')
    wait(lambda: re.search(r'evaluate\.py \S+: (done|failed|lost)', page.find_element('id', 'train-state').text),
         timeout=120)
    assert ': done' in page.find_element('id', 'train-state').text, page.find_element('id', 'train-log').text
    assert 'leaderboard' in page.find_element('id', 'train-status').text
    rows = [r for r in call(site, 'GET', '/leaderboard')[1]['rows'] if 'train-tab' in r['checkpoint']]
    assert rows and 'perplexity' in rows[0]['metrics'], rows


def test_train_tab_stops_a_run_and_resumes_it_from_its_checkpoint(site, page):
    """Stop is the trainer's Ctrl-C: the job ends 'stopped' with a checkpoint, Resume starts train.py again with
    init_from=resume and the same settings, and it goes on from that checkpoint's iteration. The estimate beside the
    form grows with max_iters."""
    from nanolab.checkpoint import load_checkpoint
    page.find_element('css selector', '#tabs button[data-tab=train]').click()
    wait(lambda: js(page, "return document.getElementById('t-max_iters')?.value"))
    long = {'max_iters': 100000, 'lr_decay_iters': 100000, 'n_layer': 1, 'n_head': 2, 'n_kv_head': 1, 'n_embd': 32,
            'block_size': 32, 'batch_size': 2, 'eval_iters': 1, 'eval_interval': 5, 'log_interval': 1,
            'warmup_iters': 1, 'device': 'cpu', 'dataset': 'tiny', 'out_dir': 'train-tab-long'}
    for k, v in long.items():
        set_value(page, 't-' + k, str(v))
    estimate = lambda: float(js(page, "return document.getElementById('train-calc').dataset.seconds") or 0)
    wait(lambda: estimate() > 0)
    whole = estimate()
    set_value(page, 't-max_iters', '1000')
    wait(lambda: 0 < estimate() < whole / 50)  # a hundredth of the iterations (and evals): a hundredth of the time
    set_value(page, 't-max_iters', '100000')
    click(page, 'train-start')
    ckpt = site.dir / 'train-tab-long' / 'ckpt.pt'
    wait(lambda: ckpt.exists() and re.search(r'^iter \d+', page.find_element('id', 'train-log').text, re.M),
         timeout=120)
    # the curve while it runs: the val loss of the evals so far
    wait(lambda: js(page, "return document.getElementById('train-curve').series?.[1]?.points.length >= 2"), timeout=60)
    assert ': running' in page.find_element('id', 'train-state').text
    click(page, 'train-stop')
    wait(lambda: ': stopped' in page.find_element('id', 'train-state').text, timeout=120)
    assert 'go on with --init_from=resume' in page.find_element('id', 'train-log').text
    at = load_checkpoint(str(ckpt))['iter_num']
    assert 0 < at < 100000 and page.find_element('id', 'train-resume').is_enabled()
    click(page, 'train-resume')
    wait(lambda: ': running' in page.find_element('id', 'train-state').text, timeout=60)
    job = call(site, 'GET', '/v1/jobs')[1]['data'][0]
    assert job['settings']['init_from'] == 'resume' and job['settings']['out_dir'] == 'train-tab-long'
    wait(lambda: load_checkpoint(str(ckpt))['iter_num'] > at, timeout=120)  # written at each eval, atomically
    click(page, 'train-stop')
    wait(lambda: ': stopped' in page.find_element('id', 'train-state').text, timeout=120)
    assert load_checkpoint(str(ckpt))['iter_num'] > at
    # a post-training stage: the estimate is of the model init_from names, from the models on disk
    set_value(page, 'train-script', 'finetune.py')
    set_value(page, 't-init_from', 'train-tab-long')
    cells = lambda: [r.text for r in page.find_elements('css selector', '#train-calc td')]
    wait(lambda: 'starts from' in page.find_element('id', 'train-calc-title').text and 'parameters' in ''.join(cells()))
    n_params = next(e for e in call(site, 'GET', '/v1/registry')[1]['data'] if e['name'] == 'train-tab-long')['n_params']
    assert cells()[1] == (f'{n_params / 1e6:.2f} M' if n_params >= 1e6 else f'{n_params / 1e3:.1f} k') + ' parameters'
    full = cells()[cells().index(next(c for c in cells() if c.startswith('memory'))) + 1]
    set_value(page, 't-lora_r', '8')  # adapters only: no gradients or AdamW state for the base
    wait(lambda: any('LoRA' in c for c in cells()))
    lora = cells()[cells().index(next(c for c in cells() if c.startswith('memory'))) + 1]
    assert float(lora.split()[0]) * 3.5 < float(full.split()[0]), (full, lora)
    set_value(page, 'train-script', 'train.py')


def test_runs_compared_and_a_checkpoint_served_from_the_registry(tmp_path, browser):
    """Two runs ticked: their curves overlaid, the settings they differ in, their evals side by side; the models on
    disk with a checkpoint browser; 'serve' loads a run beside the served one (the model menu picks it), '-' unloads."""
    import torch
    from nanolab.checkpoint import save_checkpoint
    d = two_runs(tmp_path)
    (d / 'char2').mkdir()
    ckpt = torch.load(d / 'char' / 'ckpt.pt', weights_only=True)
    for name, lr, em, ppl in (('char', 3e-3, 0.25, 5.0), ('char2', 1e-3, 0.5, 7.0)):
        save_checkpoint({**ckpt, 'iter_num': 10}, str(d / name / 'ckpt.pt'))
        (d / name / 'config.json').write_text(json.dumps({'learning_rate': lr, 'n_layer': 2, 'batch_size': 4,
                                                          'block_size': 16}))
        (d / name / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in [
            {'iter': 0, 'loss': 4.1, 'time': 0.0}, {'iter': 0, 'val_loss': 4.0, 'time': 0.1},
            {'iter': 10, 'loss': 3.0 + em, 'time': 1.0}, {'iter': 10, 'val_loss': 3.1 + em, 'time': 1.1}]))
        results.save_result(str(d / name), {'model': name, 'checkpoint': str(d / name / 'ckpt.pt'), 'iter': 10,
                                             'task': 'benchmark:demo', 'metrics': {'exact_match': em}, 'n': 4})
        results.save_result(str(d / name), {'model': name, 'checkpoint': str(d / name / 'ckpt.pt'), 'iter': 10,
                                             'task': 'perplexity:val', 'metrics': {'perplexity': ppl}, 'n': 4})
    with serving(d, source=d / 'char') as srv:
        browser.get(f'http://127.0.0.1:{srv.server_address[1]}/#runs')
        js(browser, "localStorage.clear(); localStorage.setItem('nanolab.visited', '1')")
        browser.refresh()
        for name in ('char', 'char2'):
            wait(lambda: browser.find_elements('css selector', f'.run[data-name={name}] .cmp-tick'))[0].click()
        wait(lambda: js(browser, "const c = document.getElementById('cmp-plot'); return c.classList.contains('on') && "
                                 "c.series.length == 2 && [...c.getContext('2d').getImageData(0, 0, c.width, c.height)"
                                 ".data].some(v => v > 0)"))  # val loss of both runs
        cells = [r.text for r in browser.find_elements('css selector', '#cmp-config tr')]
        assert cells == ['config: 1 of 4 settings differ char char2', 'learning_rate 0.003 0.001']
        evals = wait(lambda: [r.text for r in browser.find_elements('css selector', '#cmp-evals tr')])
        assert evals[1] == 'benchmark:demo exact_match 0.2500 0.5000'
        assert evals[2] == 'perplexity:val perplexity 5.0000 7.0000'
        # the best in bold: the higher exact match, the lower perplexity (GET /leaderboard's lower_is_better)
        assert js(browser, "return [...document.querySelectorAll('#cmp-evals td.best')].map(td => td.textContent)") \
            == ['0.5000', '5.0000']
        set_value(browser, 'cmp-x', 'tokens')  # iteration x batch_size x block_size: the last point at 640
        assert wait(lambda: js(browser, "return Math.max(...document.getElementById('cmp-plot').series"
                                        ".flatMap(s => s.points.map(p => p[0])))")) == 640
        # the checkpoint browser: char2's ckpt.pt at iteration 10, its val loss and eval; then serve it
        row = wait(lambda: [r for r in browser.find_elements('css selector', '#registry > table > tr')
                            if r.text.startswith('char2')])[0]
        row.find_element('tag name', 'summary').click()
        assert 'ckpt.pt 10 3.6000 benchmark:demo: exact_match 0.5000' in row.text
        row.find_element('css selector', 'details button').click()  # that checkpoint's "serve"
        wait(lambda: js(browser, "return document.getElementById('model').value") == 'char2-10')
        assert [m['id'] for m in call(srv, 'GET', '/v1/models')[1]['data']] == ['char', 'char2-10']
        wait(lambda: js(browser, "return [...document.querySelectorAll('#registry details[open] button')]"
                                 ".map(b => b.textContent)") == ['served', 'evaluate'])  # still open, refreshed
        click(browser, 'model-remove')  # unload what the menu shows
        wait(lambda: js(browser, "return [...document.querySelectorAll('#model option')].map(o => o.value)") == ['char'])
        assert console_errors(browser) == []


def test_leaderboard_grid_radar_and_regression_flag(tmp_path, browser):
    """Results files for three models on three benchmarks, and one run at two checkpoints that lost 10 of 40
    items: the grid shows each value with the interval and paired test results.leaderboard_rows computes, sorts by
    a column both ways, draws the ticked models on the radar (each axis scaled as the page says), and the history
    flags the drop with McNemar's p."""
    from nanolab import results as res
    d = two_runs(tmp_path)

    def result(model, task, metric, scores=None, value=None, it=100, ckpt='ckpt.pt'):
        v = sum(scores) / len(scores) if scores else value
        return {'model': model, 'checkpoint': str(d / model / ckpt), 'iter': it, 'task': task, 'n': len(scores or [1]),
                'metrics': {metric: v}, **({'items': {metric: scores}, 'item_ids': [str(i) for i in range(len(scores))]}
                                           if scores else {})}
    rs = []
    for m, em, acc, ppl in (('a', 30, 12, 9.0), ('b', 20, 16, 6.0), ('c', 26, 8, 12.0)):
        rs += [result(m, 'benchmark:qa', 'exact_match', [1.0] * em + [0.0] * (40 - em)),
               result(m, 'lm_eval:choice', 'acc', [1.0] * acc + [0.0] * (20 - acc)),
               result(m, 'perplexity:val', 'perplexity', value=ppl)]
    rs.append(result('c', 'benchmark:qa', 'exact_match', [1.0] * 36 + [0.0] * 4, it=50,
                     ckpt='checkpoints/ckpt_50.pt'))  # c at iteration 50: 36 of 40; at 100: 26 of 40 (a subset)
    for r in rs:
        (d / r['model']).mkdir(exist_ok=True)
        res.save_result(str(d / r['model']), r)
    want = {(r['model'], r['task']): r for r in res.leaderboard_rows(res.read_results(
        [str(p) for p in d.glob('*/eval/*.json')])[0])}
    with serving(d, source=d / 'char') as srv:
        browser.get(f'http://127.0.0.1:{srv.server_address[1]}/#runs')
        js(browser, "localStorage.clear(); localStorage.setItem('nanolab.visited', '1')")
        browser.refresh()
        grid = lambda: [[c.text for c in r.find_elements('css selector', 'td')]  # noqa: E731
                        for r in browser.find_elements('css selector', '#leaderboard tr')][2:]
        rows = wait(lambda: len(grid()) == 4 and grid())
        assert {r[0] for r in rows} == {'a @100', 'b @100', 'c @100', 'c ckpt_50.pt @50'}
        heads = [h.text for h in browser.find_elements('css selector', '#leaderboard tr:first-child th')][2:]
        assert heads == ['qa', 'choice', 'val']  # benchmark:qa, lm_eval:choice, perplexity:val: by task name
        for row in rows:  # a qa cell: value, interval, and the test against the best, as leaderboard_rows has them
            if row[0] in ('a @100', 'b @100'):
                r = want[(row[0][0], 'benchmark:qa')]
                (lo, hi), p = r['metrics']['exact_match']['ci95'], r['p_vs_best']
                shown = js(browser, 'return arguments[0].toPrecision(2)', p)
                assert row[2].split('\n') == [f"{r['metrics']['exact_match']['value']:.4f}", f'[{lo:.3f}, {hi:.3f}]',
                                               f'p={shown} vs best'], row
        # sort by qa: best first (c@50 36/40, a 30, c 26, b 20), then worst first
        browser.find_elements('css selector', '#leaderboard tr:first-child th')[2].click()
        assert [r[0] for r in grid()] == ['c ckpt_50.pt @50', 'a @100', 'c @100', 'b @100']
        browser.find_elements('css selector', '#leaderboard tr:first-child th')[2].click()
        assert [r[0] for r in grid()] == ['b @100', 'c @100', 'a @100', 'c ckpt_50.pt @50']
        # the radar: a and b, on qa (exact match as is), choice (acc as is), val (perplexity: best / value)
        for label in ('a @100', 'b @100'):
            row = [r for r in browser.find_elements('css selector', '#leaderboard tr') if r.text.startswith(label)][0]
            row.find_element('css selector', '.radar-tick').click()
        series = wait(lambda: js(browser, "const c = document.getElementById('radar'); return !c.hidden && c.series"))
        assert [s['name'] for s in series] == ['a @100', 'b @100']
        assert series[0]['points'] == pytest.approx([30 / 40, 12 / 20, 6.0 / 9.0])
        assert series[1]['points'] == pytest.approx([20 / 40, 16 / 20, 1.0])
        assert js(browser, "const c = document.getElementById('radar'); return [...c.getContext('2d')"
                           ".getImageData(0, 0, c.width, c.height).data].some(v => v > 0)")
        # the history: c's exact match fell from 36/40 to 26/40 on the same items: McNemar p = P(10 of 10 one way)
        flagged = wait(lambda: browser.find_elements('css selector', '#history td.drop'))
        assert len(flagged) == 1 and flagged[0].text.startswith('▼ 0.6500')
        shown = js(browser, 'return arguments[0].toPrecision(2)', res.mcnemar_p(0, 10))
        assert f'p={shown} (McNemar)' in flagged[0].get_attribute('title') and 'at 50' in flagged[0].get_attribute('title')
        assert console_errors(browser) == []


def test_completion_mode_for_a_base_model_and_the_phone_layout(tmp_path, browser):
    """A model no trainer fine-tuned opens in completion mode, whose text is the prompt plus the API's greedy
    continuation; a fine-tuned one opens in chat. On a phone, the conversation comes first, within the screen,
    with the settings folded below it."""
    from nanolab.tokenizer import CharTokenizer
    from model import GPTConfig
    from test_serve import CHARS, save_run
    d = two_runs(tmp_path)  # char and bpe: fine-tuned ('sft')
    save_run(d / 'base', GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=256, vocab_size=len(CHARS)),
             CharTokenizer(chars=''.join(sorted(CHARS))))  # no 'stage' in the checkpoint: pretrain, by its config
    with serving(d, source=f"{d / 'base'},{d / 'char'}") as srv:
        assert [(m['id'], m['stage'], m['chat']) for m in call(srv, 'GET', '/v1/models')[1]['data']] == \
            [('base', 'pretrain', False), ('char', 'sft', True)]
        browser.get(f'http://127.0.0.1:{srv.server_address[1]}/#chat')
        js(browser, "localStorage.clear(); localStorage.setItem('nanolab.visited', '1')")
        browser.refresh()
        wait(lambda: js(browser, "return document.getElementById('mode-complete').checked"))
        assert js(browser, "return document.getElementById('chat-box').hidden && !document.getElementById('complete-box').hidden")
        assert 'was not fine-tuned' in browser.find_element('id', 'mode-hint').text
        set_value(browser, 'p-temperature', '0')
        set_value(browser, 'p-max_tokens', '20')
        browser.find_element('id', 'complete-input').send_keys('Hello there\n')  # Enter continues
        wait(lambda: 'tokens in' in browser.find_element('id', 'complete-status').text)
        want = call(srv, 'POST', '/v1/completions', {'model': 'base', 'prompt': 'Hello there', 'max_tokens': 20,
                                                     'temperature': 0})[1]['choices'][0]['text']
        assert js(browser, "return document.querySelector('#complete-out .text').textContent") == 'Hello there' + want
        assert js(browser, "return document.querySelectorAll('#complete-out .tk').length") == 20  # a token each
        # a text longer than the context (256): the model sees its last 236 tokens and writes 20 more
        js(browser, "document.getElementById('complete-clear').click()")
        long_text = ('Hello there, friend. ' * 15)[:300]
        set_value(browser, 'complete-input', long_text)
        browser.find_element('id', 'complete-go').click()
        wait(lambda: 'tokens in' in browser.find_element('id', 'complete-status').text)
        assert 'it saw the last 236 of the text' in browser.find_element('id', 'complete-status').text
        ids = call(srv, 'POST', '/tokenize', {'model': 'base', 'prompt': long_text})[1]['tokens'][-236:]
        want = call(srv, 'POST', '/v1/completions', {'model': 'base', 'prompt': ids, 'max_tokens': 20,
                                                     'temperature': 0})[1]['choices'][0]['text']
        assert js(browser, "return document.querySelector('#complete-out .text').textContent") == long_text + want
        set_value(browser, 'model', 'char')  # fine-tuned: the chat
        assert js(browser, "return document.getElementById('mode-chat').checked && !document.getElementById('chat-box').hidden")
        # a phone: the conversation and its input on the first screen, the settings folded below them
        browser.set_window_size(390, 844)
        try:
            browser.refresh()
            wait(lambda: js(browser, "return document.getElementById('mode-chat').checked"))
            box = js(browser, "const r = e => document.getElementById(e).getBoundingClientRect();"
                              "return [r('input').bottom, innerHeight, r('settings').top, r('input').top,"
                              "document.getElementById('settings').open]")
            assert box[0] <= box[1] and box[2] > box[3] and box[4] is False, box
        finally:
            browser.set_window_size(1200, 900)
        assert console_errors(browser) == []


def test_the_page_asks_for_the_api_key_and_sends_it(site, browser):
    import threading
    keyed = server.make_server(site.engines, port=0, api_key='sekrit', runs_dir=str(site.dir))  # a second door
    threading.Thread(target=keyed.serve_forever, daemon=True).start()
    try:
        browser.get(f'http://127.0.0.1:{keyed.server_address[1]}/')
        alert = wait(lambda: _alert(browser))  # the first API call got a 401: the page asks
        alert.send_keys('sekrit')
        alert.accept()
        wait(lambda: len(js(browser, "return [...document.querySelectorAll('#model option')]")) == 2)
        assert js(browser, "return sessionStorage.getItem('nanolab_api_key')") == 'sekrit'
    finally:
        browser.execute_script('sessionStorage.clear()')
        keyed.shutdown()
        keyed.server_close()


def _alert(browser):
    from selenium.common.exceptions import NoAlertPresentException
    try:
        return browser.switch_to.alert
    except NoAlertPresentException:
        return None
