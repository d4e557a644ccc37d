"""Jobs through the HTTP API (nanolab/jobs.py): real train.py processes started by the server, with tiny settings on
a tiny char dataset. A job runs to its end and its log streams from any offset; a stopped one ends as the trainer's
Ctrl-C does, with a checkpoint that a second job resumes, while a third waits its turn; bad settings, paths that lead
out, foreign scripts and cross-site requests start nothing; a killed server takes its job with it, and a restart
reads that job as lost. CPU, about 40 seconds on 2 cores."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from model import GPTConfig
from nanolab import jobs
from nanolab.checkpoint import load_checkpoint
from nanolab.configurator import configure, read_choices, read_settings
from nanolab.tokenizer import CharTokenizer
from test_serve import CHARS, call, events, save_run, serving  # tests/ is on sys.path while pytest collects it

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = 'configs/shakespeare_char.py'
# the recipe, made tiny: one 32-wide layer over 32 tokens, a batch of 2, one batch per loss estimate
TINY = {'dataset': 'tiny', 'device': 'cpu', 'compile': False, 'n_layer': 1, 'n_head': 2, 'n_kv_head': 1,
        'n_embd': 32, 'block_size': 32, 'batch_size': 2, 'eval_iters': 1, 'log_interval': 1, 'warmup_iters': 1}


@pytest.fixture(scope='module')
def dirs(tmp_path_factory):
    """(runs, data): a run to serve, and a 16-character dataset as data.py writes one (a Markov chain)."""
    runs, data = tmp_path_factory.mktemp('runs'), tmp_path_factory.mktemp('data')
    save_run(runs / 'char', GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=len(CHARS)),
             CharTokenizer(chars=''.join(sorted(CHARS))))
    chars = 'abcdefghijklmnop'
    ids = np.zeros(6000, dtype=np.uint16)
    for i in range(1, len(ids)):
        ids[i] = (3 * ids[i - 1] + i % 2) % len(chars)
    (data / 'tiny').mkdir()
    ids[:5000].tofile(data / 'tiny' / 'train.bin')
    ids[5000:].tofile(data / 'tiny' / 'val.bin')
    (data / 'tiny' / 'meta.json').write_text(json.dumps(
        {'name': 'tiny', 'tokenizer': {'kind': 'char', 'chars': chars}, 'vocab_size': len(chars), 'dtype': 'uint16',
         'train_tokens': 5000, 'val_tokens': 1000}))
    return runs, data


@pytest.fixture(scope='module')
def srv(dirs):
    runs, data = dirs
    with serving(runs, server={'data_dir': str(data), 'max_jobs': 1}) as srv:
        yield srv


def start(srv, settings, script='train.py', config=RECIPE):
    status, job = call(srv, 'POST', '/v1/jobs', {'script': script, 'config': config, 'settings': settings})
    assert status == 200, job
    return job


def wait(srv, job_id, until, timeout=60):
    """Poll GET /v1/jobs/{id} until until(record); fail with the record and its log after timeout seconds."""
    end = time.time() + timeout
    while True:
        job = call(srv, 'GET', f'/v1/jobs/{job_id}')[1]
        if until(job):
            return job
        if time.time() > end:
            pytest.fail(f"{job}\n{call(srv, 'GET', f'/v1/jobs/{job_id}/log')[1]['text']}")
        time.sleep(0.1)


def ended(job):
    return job['state'] in jobs.ENDED


def job_ids(srv):
    return [j['id'] for j in call(srv, 'GET', '/v1/jobs')[1]['data']]


def test_a_tiny_training_job_runs_to_its_end_and_its_log_streams_from_any_offset(srv, dirs):
    runs, _ = dirs
    job = start(srv, {**TINY, 'out_dir': 'job-a', 'max_iters': 4, 'lr_decay_iters': 4})
    assert job['state'] == 'queued' and job['id'] in job_ids(srv)
    assert job['argv'][:3] == [sys.executable, os.path.join(ROOT, 'train.py'), os.path.join(ROOT, RECIPE)]
    assert '--max_iters=4' in job['argv'] and job['run_dir'] == os.path.realpath(runs / 'job-a')
    done = wait(srv, job['id'], ended)
    assert (done['state'], done['exit_code']) == ('done', 0), done
    assert load_checkpoint(str(runs / 'job-a' / 'ckpt.pt'))['iter_num'] == 4
    assert done['started'] >= done['created'] and done['ended'] >= done['started']
    # the record on disk says the same; the log is the script's own output
    with open(runs / '_jobs' / job['id'] / 'job.json') as f:
        assert json.load(f)['state'] == 'done'
    whole = open(done['log'], 'rb').read().decode()
    assert 'step 4: train loss' in whole
    status, part = call(srv, 'GET', f"/v1/jobs/{job['id']}/log?offset=0")
    assert status == 200 and part['text'] == whole and part['done'] and part['next_offset'] == len(whole.encode())
    # resumed from a byte offset; and streamed, from another one: the same bytes
    cut = len(whole.encode()) // 2
    assert call(srv, 'GET', f"/v1/jobs/{job['id']}/log?offset={cut}")[1]['text'] == whole.encode()[cut:].decode()
    status, payload = call(srv, 'GET', f"/v1/jobs/{job['id']}/log?offset={cut}&stream=true")
    parts = events(payload)
    assert status == 200 and parts[-1] == '[DONE]' and parts[-2]['done']
    assert ''.join(p['text'] for p in parts[:-1]) == whole.encode()[cut:].decode()


def test_a_stopped_job_leaves_a_checkpoint_that_resumes_while_the_next_job_waits(srv, dirs):
    runs, _ = dirs
    long = start(srv, {**TINY, 'out_dir': 'job-long', 'max_iters': 100_000, 'lr_decay_iters': 100_000,
                       'eval_interval': 100_000})
    short = start(srv, {**TINY, 'out_dir': 'job-b', 'max_iters': 2, 'lr_decay_iters': 2})
    running = wait(srv, long['id'], lambda j: j['state'] == 'running')
    # max_jobs=1: the second waits; the first runs niced, in a process group of its own
    assert call(srv, 'GET', f"/v1/jobs/{short['id']}")[1]['state'] == 'queued'
    pid = running['pid']
    assert os.getpgid(pid) == pid and os.getpriority(os.PRIO_PROCESS, pid) >= jobs.NICE
    # once the trainer is in its loop, stop: SIGINT, as Ctrl-C
    wait(srv, long['id'], lambda j: re.search(r'^iter \d+/',
                                              call(srv, 'GET', f"/v1/jobs/{j['id']}/log")[1]['text'], re.M))
    status, stopping = call(srv, 'POST', f"/v1/jobs/{long['id']}/stop", {})
    assert status == 200 and stopping['signals'] == ['SIGINT'] and stopping['stop_requested']
    stopped = wait(srv, long['id'], ended)
    log = open(stopped['log']).read()
    assert (stopped['state'], stopped['exit_code']) == ('stopped', 0), log
    assert 'SIGINT: stopping after this step' in log and '--init_from=resume' in log
    at = load_checkpoint(str(runs / 'job-long' / 'ckpt.pt'))['iter_num']
    assert 0 < at < 100_000
    assert call(srv, 'POST', f"/v1/jobs/{long['id']}/stop", {})[0] == 409
    # the waiting job runs next; then a third job goes on from the stopped one's checkpoint
    assert wait(srv, short['id'], ended)['state'] == 'done'
    resumed = start(srv, {**TINY, 'out_dir': 'job-long', 'init_from': 'resume', 'max_iters': at + 2,
                          'lr_decay_iters': 100_000, 'eval_interval': 100_000})
    assert wait(srv, resumed['id'], ended)['state'] == 'done'
    assert load_checkpoint(str(runs / 'job-long' / 'ckpt.pt'))['iter_num'] == at + 2


def configurator_error(script, settings):
    """What the script's own configurator says of these settings on its command line."""
    path = os.path.join(ROOT, script)
    with pytest.raises(SystemExit) as e:
        configure(read_settings(path), [f'--{k}={v}' for k, v in settings.items()], choices=read_choices(path),
                  verbose=False)
    return str(e.value)


def refused(srv, body, status=400, headers=None):
    """POST /v1/jobs answers status and starts nothing -> the error body."""
    before = job_ids(srv)
    code, answer = call(srv, 'POST', '/v1/jobs', body, headers=headers)
    assert code == status, answer
    assert job_ids(srv) == before
    return answer['error']


def test_bad_settings_are_refused_with_the_configurators_words_before_anything_starts(srv):
    for settings in [{'max_iter': 4}, {'max_iters': 'four'}, {'dtype': 'float64'}, {'compile': 1}]:
        error = refused(srv, {'script': 'train.py', 'config': RECIPE, 'settings': settings})
        assert error['message'] == configurator_error('train.py', settings)
        assert error['message'].startswith('config error: ')
    assert 'Did you mean max_iters' in refused(srv, {'script': 'train.py', 'settings': {'max_iter': 4}})['message']


def test_paths_that_lead_out_scripts_that_are_not_nanolabs_and_malformed_jobs_are_refused(srv, dirs, tmp_path):
    runs, _ = dirs
    (runs / 'link').symlink_to(tmp_path)  # a link inside the runs directory that leads out of it
    (runs / 'trap').mkdir()
    (runs / 'trap' / 'metrics.jsonl').symlink_to(tmp_path / 'metrics.jsonl')  # a run whose log leads out
    (runs / 'old').mkdir()
    (runs / 'old' / 'config.json').write_text('{"dataset": "/etc"}')  # resumed, it would read its saved dataset
    for script, settings, name in [
            ('train.py', {'out_dir': str(tmp_path)}, 'out_dir'), ('train.py', {'out_dir': '../x'}, 'out_dir'),
            ('train.py', {'out_dir': 'link/run'}, 'out_dir'), ('train.py', {'out_dir': '~/run'}, 'out_dir'),
            ('train.py', {'out_dir': 'trap'}, 'out_dir'),
            ('train.py', {'out_dir': 'old', 'init_from': 'resume'}, 'dataset'),
            ('train.py', {'init_from': '/etc'}, 'init_from'), ('train.py', {'data_dir': str(tmp_path)}, 'data_dir'),
            ('train.py', {'dataset': '../../etc'}, 'dataset'), ('finetune.py', {'dataset': '/etc/passwd'}, 'dataset'),
            ('data.py', {'dataset': 'text', 'input': 'link/*.txt'}, 'input'),
            ('data.py', {'dataset': 'text', 'input': 'a.txt,/etc/*'}, 'input'),
            ('dpo.py', {'train_file': '/etc/x.jsonl'}, 'train_file'), ('rl.py', {'reward': 'link'}, 'reward'),
            ('evaluate.py', {'init_from': 'char', 'leaderboard': 'char,/tmp'}, 'leaderboard'),
            ('evaluate.py', {'include_path': 'char'}, 'include_path'),
            ('evaluate.py', {'confirm_run_unsafe_code': True}, 'confirm_run_unsafe_code'),
            ('export.py', {'init_from': 'char', 'check_with': 'char'}, 'check_with'),
            ('export.py', {'init_from': str(tmp_path / 'ckpt.pt')}, 'init_from')]:
        error = refused(srv, {'script': script, 'settings': settings})
        assert error['param'] == name and name in error['message'], (settings, error)
    for script in ['../train.py', 'bash', 'sample.py', 'serve.py', os.path.join(ROOT, 'train.py'), 'train.py ', None]:
        assert refused(srv, {'script': script})['param'] == 'script'
    for config in ['../configs/shakespeare_char.py', '/etc/passwd', 'configs/../train.py', 'configs/nope.py', 3]:
        assert refused(srv, {'script': 'train.py', 'config': config})['param'] == 'config'
    for body in [{'script': 'train.py', 'settings': ['max_iters']},
                 {'script': 'train.py', 'settings': {f'k{i}': 1 for i in range(jobs.MAX_SETTINGS + 1)}},
                 {'script': 'train.py', 'settings': {'wandb_run_name': 'x' * (jobs.MAX_VALUE + 1)}},
                 {'script': 'train.py', 'settings': {k: 'x' * 4000 for k in ['wandb_project', 'wandb_run_name',
                                                                            'arch', 'optim', 'positions']}},
                 {'script': 'train.py', 'settings': {'max_iters': {'a': 1}}},
                 {'script': 'train.py', 'settings': {'--max_iters': 1}}, {'script': 'train.py', 'shell': 'ls'}]:
        refused(srv, body)


def test_a_cross_site_post_is_refused_and_bad_job_paths_are_4xx(srv):
    body = {'script': 'train.py', 'config': RECIPE, 'settings': {**TINY, 'max_iters': 1}}
    for headers in [{'Origin': 'https://evil.example'}, {'Sec-Fetch-Site': 'cross-site'}, {'Host': 'evil.example'}]:
        assert refused(srv, body, 403, headers)['code'] in ('origin_not_allowed', 'host_not_allowed')
    job_id = job_ids(srv)[0]
    for method, path, status in [('GET', '/v1/jobs/20250101-000000-abcdef', 404), ('GET', '/v1/jobs/..', 404),
                                 ('POST', '/v1/jobs/x/stop', 404), ('GET', f'/v1/jobs/{job_id}/log?offset=-1', 400),
                                 ('GET', f'/v1/jobs/{job_id}/log?offset=1e3', 400),
                                 ('GET', f'/v1/jobs/{job_id}/log?stream=maybe', 400),
                                 ('POST', f'/v1/jobs/{job_id}', 405), ('GET', f'/v1/jobs/{job_id}/stop', 405),
                                 ('GET', f'/v1/jobs/{job_id}/other', 404)]:
        code, answer = call(srv, method, path, {} if method == 'POST' else None)
        assert code == status and answer['error']['message'], (path, answer)
    # past the end of the log: nothing, and done
    assert call(srv, 'GET', f'/v1/jobs/{job_id}/log?offset=99999999')[1]['text'] == ''


# the string settings of the job scripts that name no file or folder; every other one is in jobs.PATHS (or refused)
NOT_PATHS = {'kind', 'text_field', 'encoding', 'on_bad_file', 'doc_split', 'wandb_project', 'wandb_run_name', 'arch',
             'positions', 'optim', 'lr_schedule', 'device', 'dtype', 'backend', 'em_normalize', 'lora_targets',
             'quantize_base', 'loss_type', 'bench_metrics', 'template', 'shots', 'normalize', 'pass_k', 'tasks',
             'sort_by', 'format', 'outtype', 'check_prompt'}


@pytest.mark.parametrize('script', jobs.SCRIPTS)
def test_every_setting_that_could_name_a_path_is_checked(script):
    """A string setting added to a script must be classified here: a path (jobs.PATHS, checked) or not."""
    strings = {k for k, v in read_settings(os.path.join(ROOT, script)).items() if isinstance(v, str)}
    assert strings - NOT_PATHS - set(jobs.PATHS) - set(jobs.REFUSED) == set()


def test_a_restart_reads_the_newest_records_as_they_were_and_trusts_no_path_in_them(tmp_path, monkeypatch):
    monkeypatch.setattr(jobs, 'KEEP', 3)
    for i, state in enumerate(['done', 'failed', 'stopped', 'running']):
        folder = tmp_path / '_jobs' / f'20250101-00000{i}-abcdef'
        folder.mkdir(parents=True)
        # a server that is gone (above Linux's largest pid), and a log path that is not the job's
        (folder / 'job.json').write_text(json.dumps({'id': folder.name, 'state': state, 'created': i,
                                                     'server_pid': 2 ** 22 + 1, 'log': '/etc/passwd'}))
        (folder / 'log.txt').write_text(f'log {i}')
    (tmp_path / '_jobs' / '20250101-000009-abcdef').mkdir()
    (tmp_path / '_jobs' / '20250101-000009-abcdef' / 'job.json').write_text('{"id": "20250101-0')  # torn
    records = jobs.Jobs(tmp_path, tmp_path).list()
    assert [(r['id'][-8], r['state']) for r in records] == [('3', 'lost'), ('2', 'stopped')]
    assert jobs.Jobs(tmp_path, tmp_path).log(records[0]['id'], 0)['text'] == 'log 3'


def alive(pid):
    """Whether pid runs (a zombie, ended but not yet reaped by whoever adopted it, does not)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except FileNotFoundError:
        return False


def gone(pid, seconds):
    """Whether pid has ended within seconds."""
    end = time.time() + seconds
    while alive(pid) and time.time() < end:
        time.sleep(0.02)
    return not alive(pid)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='the parent-death signal is Linux-only')
def test_a_killed_server_takes_its_job_with_it_and_a_restart_reads_it_as_lost(dirs, tmp_path):
    runs, data = dirs
    server = subprocess.Popen([sys.executable, 'serve.py', f"--init_from={runs / 'char'}", f'--runs_dir={tmp_path}',
                               f'--data_dir={data}', '--port=0', '--device=cpu', '--threads=1'],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in server.stdout:
            if line.startswith('serving '):
                break
        port = int(re.search(r':(\d+) ', line).group(1))
        srv = type('Server', (), {'server_address': ('127.0.0.1', port)})
        job = start(srv, {**TINY, 'out_dir': 'job', 'max_iters': 100_000, 'lr_decay_iters': 100_000,
                          'eval_interval': 100_000})
        wait(srv, job['id'], lambda j: re.search(r'^iter \d+/', open(j['log']).read(), re.M))
        pid = call(srv, 'GET', f"/v1/jobs/{job['id']}")[1]['pid']
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
    if not gone(pid, 20):
        os.killpg(pid, signal.SIGKILL)
        pytest.fail('the job outlived its server')
    # the parent-death signal is SIGTERM, which the trainer takes as Ctrl-C: it wrote its checkpoint
    assert 'SIGTERM: stopping after this step' in open(job['log']).read()
    assert load_checkpoint(str(tmp_path / 'job' / 'ckpt.pt'))['iter_num'] > 0
    assert jobs.Jobs(tmp_path, data).get(job['id'])['state'] == 'lost'


def test_recipes_and_settings_read_without_running_anything(srv):
    """GET /v1/recipes (the Train tab's form): each job script's settings block as the configurator reads it (name,
    default, comment, type, allowed values), and each recipe in configs/ with its script, header and values."""
    status, body = call(srv, 'GET', '/v1/recipes')
    assert status == 200 and set(body['scripts']) == set(jobs.SCRIPTS)
    train = {r['name']: r for r in body['scripts']['train.py']}
    assert list(train) == list(read_settings(os.path.join(ROOT, 'train.py')))
    assert train['max_iters'] == {'name': 'max_iters', 'default': read_settings(os.path.join(ROOT, 'train.py'))['max_iters'],
                                  'type': 'int', 'comment': 'total optimizer steps', 'choices': None}
    assert train['arch']['choices'] == list(read_choices(os.path.join(ROOT, 'train.py'))['arch'])
    recipes = {r['config']: r for r in body['data']}
    char = recipes[RECIPE]
    assert char['script'] == 'train.py' and char['about'].startswith('Char-level Shakespeare on a laptop CPU')
    # the recipe's values over the defaults are what the configurator resolves from the recipe file
    resolved = configure(read_settings(os.path.join(ROOT, 'train.py')), [os.path.join(ROOT, RECIPE)], verbose=False)
    assert {**{k: r['default'] for k, r in train.items()}, **char['values']} == resolved
    assert recipes['configs/sft_tasks.py']['script'] == 'finetune.py' and recipes['configs/dpo_tasks.py']['script'] == 'dpo.py'
    assert call(srv, 'GET', '/v1/recipes')[1] == body  # cached: the same answer until a file changes


@pytest.fixture
def bare(tmp_path, monkeypatch):
    """Jobs whose job is `python -c settings['code']` instead of a nanolab script: for what any process does."""
    monkeypatch.setattr(jobs.Jobs, '_command', lambda self, script, config, settings:
                        ([sys.executable, '-c', settings['code']], None))
    bare = jobs.Jobs(tmp_path, tmp_path)
    yield bare
    bare.close()


def test_a_log_past_its_cap_keeps_its_head_and_newest_lines_and_a_reader_follows_the_cut(bare, monkeypatch):
    monkeypatch.setattr(jobs, 'LOG_CAP', 64 << 10)
    monkeypatch.setattr(jobs, 'LOG_TAIL', 8 << 10)
    monkeypatch.setattr(jobs, 'POLL', 0.01)  # many cuts, as a long job gets
    head = jobs.LOG_CAP // 2
    # 8000 numbered 97-byte lines in bursts of 100, one write each: 776 kB, about 12 times the cap
    code = ("import os, time\n"
            "for b in range(80):\n"
            "    os.write(1, b''.join(b'%05d %s\\n' % (i, b'x' * 90) for i in range(b * 100, b * 100 + 100)))\n"
            "    time.sleep(0.01)\n")
    whole = b''.join(b'%05d %s\n' % (i, b'x' * 90) for i in range(8000))
    job = bare.submit('train.py', None, {'code': code})
    # a reader as the page's: from next_offset on, while the log grows and is cut under it
    text, offset, biggest, end = '', 0, 0, time.time() + 60
    while True:
        part = bare.log(job['id'], offset)
        text, offset = text + part['text'], part['next_offset']
        biggest = max(biggest, os.path.getsize(job['log']) if os.path.exists(job['log']) else 0)
        if part['done'] or time.time() > end:
            break
        time.sleep(0.005)
    job = bare.get(job['id'])
    log = open(job['log'], 'rb').read()
    assert job['state'] == 'done' and len(log) <= jobs.LOG_CAP and biggest < 4 * jobs.LOG_CAP, (job, biggest)
    assert log[:head] == whole[:head] and log.endswith(b'07999 ' + b'x' * 90 + b'\n')
    # the marker, where the record says, with the bytes the record counts; those are the lines missing
    # from the log (but a burst written between a cut's read and its truncate is lost uncounted)
    at = job['log_cut_at']
    marker = f"\n[nanolab: {job['log_cut']:,} bytes of this job's output were cut here;".encode()
    assert log[at:].startswith(marker), log[at:][:200]
    newest = log[log.index(b']\n', at) + 2:]
    missing = len(whole) - at - len(newest)  # the output's bytes not in the log
    assert missing - 2 * 9700 <= job['log_cut'] <= missing, (missing, job['log_cut'])
    # after the marker: whole lines, in order
    numbers = [int(n) for n in re.findall(rb'^(\d{5}) x{90}$', newest, re.M)]
    assert len(numbers) * 97 == len(newest) and numbers == sorted(set(numbers))
    assert text.endswith('07999 ' + 'x' * 90 + '\n') and "of this job's output were cut here" in text
    # a reader whose offset the cut left past the end reads on from the marker
    part = bare.log(job['id'], jobs.LOG_CAP + 1)
    assert part['offset'] == job['log_cut_at'] and part['text'].startswith(marker.decode())
    assert part['next_offset'] == len(log) and part['done']


def test_what_a_job_leaves_running_in_its_process_group_ends_with_it(bare):
    code = ("import subprocess, sys\n"
            "print(subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']).pid)\n")
    job = bare.submit('train.py', None, {'code': code})
    end = time.time() + 30
    while not ended(job) and time.time() < end:
        time.sleep(0.02)
        job = bare.get(job['id'])
    assert job['state'] == 'done', job
    pid = int(open(job['log']).read())
    if not gone(pid, 2):
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the job's child outlived it")
