"""
Jobs: the server runs nanolab's own scripts (data.py, train.py, ..., export.py) as its child
processes, for the page, and keeps their records and logs in the runs directory.

    jobs = Jobs(runs_dir, data_dir, read_roots, max_jobs=1)  # make_server does this
    job = jobs.submit('train.py', 'configs/shakespeare_char.py', {'max_iters': 100})
    jobs.stop(job['id']); jobs.close()                       # close: as serve.py ends

A job is `python SCRIPT [configs/RECIPE.py] [--key=value ...]`: an argument list, never a shell,
run in the runs directory, so that whatever a script writes to a relative path (mlflow.db, wandb/,
tokenizers/, eval-NAME/) lands there and not in the source tree. Before anything starts, the
settings go through the script's own configurator (unknown keys, types, allowed values: its error
is the 400's message), and every setting that names a file or folder must lead inside the places
its use allows (PATHS below). At most max_jobs run at once, the rest wait their turn (FIFO). A job
runs niced, with a capped thread count, in a process group of its own, and ends with the server
even when the server is killed (Linux: a parent-death signal). Its record
(runs_dir/_jobs/<id>/job.json, written atomically) and log (log.txt beside it) outlive the server:
one that was queued or running when its server died reads as 'lost'. Stopping a job is the
scripts' Ctrl-C: SIGINT to its group (a trainer finishes its step, writes ckpt.pt and prints how
to resume), then SIGTERM after STOP_GRACE seconds (a trainer's second signal: stop now), then
SIGKILL. Whatever a job leaves running in its group when it ends is killed. A log past LOG_CAP
bytes keeps its first half and its newest LOG_TAIL bytes, with a line between them saying so.

The endpoints (page_api.py's, with the same key, Host and Origin checks as the rest of the API):
    POST /v1/jobs {script, config, settings} -> the job's record; GET /v1/jobs: the records
    GET  /v1/jobs/{id}; POST /v1/jobs/{id}/stop
    GET  /v1/jobs/{id}/log?offset=N: at most LOG_READ bytes of the log from byte N, with the offset
         to ask for next; &stream=true: server-sent events of the same until the job ends
"""
import codecs
import ctypes
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque

from nanolab import engine_thread
from nanolab.configurator import configure, read_choices, read_settings
from nanolab.files import inside, link_out, running, write_json
from nanolab.httpd import ApiError

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
SCRIPTS = ('data.py', 'train.py', 'finetune.py', 'dpo.py', 'reward.py', 'rl.py', 'evaluate.py',
           'export.py')
STATES = ('queued', 'running', 'done', 'failed', 'stopped', 'lost')
ENDED = STATES[2:]
MAX_SETTINGS, MAX_VALUE = 64, 4096  # settings a job may set; characters in one value
MAX_FLAGS = 16384                   # characters in all of them: a record stays small
MAX_QUEUED = 16                     # jobs waiting at once; beyond: 429
KEEP = 100                          # job records kept; the oldest ended ones go, with their logs
LOG_READ = 1 << 16                  # log bytes per answer (or per event of a stream)
LOG_CAP, LOG_TAIL = 16 << 20, 1 << 20  # bytes a log may reach on disk; newest ones a cut keeps
STOP_GRACE, KILL_GRACE = 60.0, 10.0  # seconds from SIGINT to SIGTERM, then to SIGKILL
POLL = 0.2                          # seconds between the jobs thread's looks at its children
NICE = 10                           # the jobs' priority below the server's (Unix nice, 0-19)
# torch (OpenMP) threads per job: half the cores, at least one. The other half is the server's:
# two busy OpenMP teams on the same cores make libgomp's workers sleep between ops
# (docs/serving.md), so a job with every core would slow each chat step; on 2 cores this is 1
THREADS = max(1, (os.cpu_count() or 2) // 2)
JOB_ID = re.compile(r'\d{8}-\d{6}-[0-9a-f]{6}')
KEY = re.compile(r'[A-Za-z_]\w{0,63}', re.ASCII)
RECIPE = re.compile(r'configs/[\w.-]{1,100}\.py', re.ASCII)

# The settings of the scripts that name files or folders (a name means the same in every script),
# by where they may lead: 'runs', what a run writes: inside the runs directory; 'data', datasets:
# inside the data directory; 'read': inside either, a --models_dir or the Hugging Face cache (a hub
# name such as 'gpt2' is no path, and stays inside). A comma list is checked item by item. A
# relative path is relative to the runs directory (the jobs' working directory); out_name to
# data_dir (data.py's dataset folder), and UNDER_DATA to both, as the scripts look them up there.
PATHS = {'out_dir': 'runs', 'out': 'runs', 'output_path': 'runs', 'leaderboard_out': 'runs',
         'arena': 'runs', 'arena_to_pairs': 'runs',  # arena: arena.json is written beside it
         'data_dir': 'data', 'out_name': 'data',
         **dict.fromkeys(('init_from', 'reward', 'arena_judge', 'input', 'leaderboard',
                          'shots_file', 'benchmark', 'tokenizer', 'dataset', 'perplexity',
                          'train_file', 'val_file'), 'read')}
UNDER_DATA = ('dataset', 'perplexity', 'train_file', 'val_file')
# settings that run code from outside nanolab: a job must leave them at their (off) defaults
REFUSED = {'include_path': "lm-eval task YAMLs can import Python files (!function)",
           'check_with': 'it runs a llama.cpp binary',
           'confirm_run_unsafe_code': 'it runs programs that a model wrote'}

# Linux's prctl(PR_SET_PDEATHSIG): a signal for the child when its parent ends, looked up here,
# before any fork (the child only calls it)
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith('linux') else None
PR_SET_PDEATHSIG = 1


def _in_child(parent):
    """Runs in each job's process before it becomes the script (Popen's preexec_fn): a lower
    priority, and SIGTERM when its parent ends, as when the server is killed (SIGTERM: a trainer
    writes its checkpoint and exits, where SIGKILL would lose the steps since its last one).
    subtle: the 'parent' is the thread that forked it, so only the jobs thread starts jobs, never
    a request's thread, which ends with its connection"""
    os.nice(NICE)
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the server died before the line above: no signal will come
            os._exit(1)


def _sweep(pid):
    """SIGKILL what is left of a job's process group (its pgid is its pid): data.py's workers, a
    child it started in the background."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # none left
        pass


def _marker(cut, head):
    """The line a cut log holds where its middle was, cut: the bytes dropped so far."""
    return (f"\n[nanolab: {cut:,} bytes of this job's output were cut here; the log keeps its "
            f"first {head / 2**20:g} MiB and its newest output]\n").encode()


def _arg(key, value):
    """One setting from a request's JSON as the `--key=value` argument a user would type: a string
    as it is (the configurator reads it by the setting's type, as it reads a command line), any
    other value as its Python literal."""
    if not isinstance(key, str) or not KEY.fullmatch(key):
        raise ApiError(400, f"settings: {json.dumps(key)[:70]} is not a setting's name", 'settings',
                       'invalid_setting')
    scalar = (str, int, float, bool, type(None))
    if isinstance(value, list) and len(value) <= 64 and all(isinstance(v, scalar) for v in value):
        text = repr(value)
    elif isinstance(value, scalar):
        text = value if isinstance(value, str) else repr(value)
    else:
        raise ApiError(400, f"settings.{key} must be a string, number, boolean, null or a list of "
                       f"them, got {json.dumps(value)[:70]}", f'settings.{key}', 'invalid_setting')
    if len(text) > MAX_VALUE or '\0' in text:
        raise ApiError(400, f"settings.{key} is over {MAX_VALUE} characters or holds a NUL",
                       f'settings.{key}', 'invalid_setting')
    return f'--{key}={text}'


def _configure(script, settings, argv):
    """configure() as the script will run it, in this process: settings (the defaults), the
    recipe and flags in argv -> the resolved config; its error is a 400 with its own words."""
    try:
        return configure(settings, argv, choices=read_choices(script), verbose=False)
    except SystemExit as e:
        raise ApiError(400, str(e), 'settings', 'invalid_setting') from None


class Jobs:
    """The server's jobs: submit, list, get, stop, log, close. One lock guards the records, the
    queue and the processes; one thread (started with the first job) starts and watches them."""
    def __init__(self, runs_dir, data_dir, read_roots=(), max_jobs=1):
        if max_jobs < 1:
            raise ValueError(f"max_jobs={max_jobs}: at least 1 job must be able to run "
                             "(--max_jobs=1 is the default)")
        self.runs_dir, self.data_dir = os.path.realpath(runs_dir), os.path.realpath(data_dir)
        self.max_jobs, self.dir = max_jobs, os.path.join(self.runs_dir, '_jobs')
        self.roots = {'runs': [self.runs_dir], 'data': [self.data_dir],
                      'read': [self.runs_dir, self.data_dir, *map(os.path.realpath, read_roots)]}
        self.lock = threading.Condition()
        self.records, self.queue, self.procs = self._load(), deque(), {}
        self.thread, self.closed = None, False

    # -------------------------------------------------------------------------
    # 1) a request: checked, recorded, queued

    def submit(self, script, config=None, settings=None):
        """A new job -> its record (state 'queued'); bad input is an ApiError and starts nothing."""
        argv, run_dir = self._command(script, config, settings)
        with self.lock:
            if self.closed:
                raise ApiError(503, 'the server is shutting down; start the job again once it is '
                               'back', None, 'shutting_down')
            if len(self.queue) >= MAX_QUEUED:
                raise ApiError(429, f"{len(self.queue)} jobs are waiting already; stop one, or "
                               "wait for them", None, 'too_many_jobs')
            now = time.time()
            job = {'id': f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}",
                   'object': 'job', 'script': script, 'config': config or None,
                   'settings': settings or {}, 'command': shlex.join(argv), 'argv': argv,
                   'cwd': self.runs_dir, 'run_dir': run_dir, 'state': 'queued',
                   'exit_code': None, 'pid': None, 'server_pid': os.getpid(), 'created': now,
                   'started': None, 'ended': None, 'stop_requested': None, 'signals': []}
            job['log'] = self._file(job['id'], 'log.txt')
            try:
                self._save(job)
            except OSError as e:
                raise ApiError(507, f"the job was not recorded ({e.strerror or e}); free some "
                               "disk space under --runs_dir", None, 'insufficient_storage') \
                    from None
            self.records[job['id']] = job
            self.queue.append(job['id'])
            self._prune()
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, daemon=True, name='jobs')
                self.thread.start()
            self.lock.notify_all()
            return dict(job)

    def _command(self, script, config, settings):
        """The checked command line of a job -> (argv, the folder it writes, or None)."""
        if script not in SCRIPTS:
            raise ApiError(400, f"'script' must be one of {', '.join(SCRIPTS)}, got "
                           f"{json.dumps(script)[:70]}", 'script', 'invalid_value')
        path, files = os.path.join(REPO, script), []
        if config not in (None, ''):
            recipes = os.path.join(REPO, 'configs')
            full = os.path.realpath(os.path.join(REPO, config)) if isinstance(config, str) else ''
            if not (RECIPE.fullmatch(str(config)) and inside(full, [recipes])
                    and os.path.isfile(full)):
                raise ApiError(400, f"'config' must be a recipe in configs/, as "
                               f"'configs/shakespeare_char.py', got {json.dumps(config)[:70]}",
                               'config', 'invalid_value')
            files = [full]
        settings = {} if settings is None else settings
        if not isinstance(settings, dict) or len(settings) > MAX_SETTINGS:
            raise ApiError(400, f"'settings' must be an object of at most {MAX_SETTINGS} "
                           "settings {name: value}", 'settings', 'invalid_value')
        flags = [_arg(k, v) for k, v in settings.items()]
        if sum(map(len, flags)) > MAX_FLAGS:
            raise ApiError(400, f"the settings come to over {MAX_FLAGS} characters", 'settings',
                           'invalid_value')
        defaults = read_settings(path)
        # data_dir: the server's data directory unless the job or its recipe says otherwise
        ours = {'data_dir': self.data_dir} if 'data_dir' in defaults else {}
        config = _configure(path, {**defaults, **ours}, files + flags)
        if ours and 'data_dir' not in settings:
            flags.append(f"--data_dir={config['data_dir']}")
        run_dir = self._check_paths(config)
        if config.get('init_from') == 'resume' and run_dir:
            # a resumed run goes on with its saved config, this command line on top
            # (training.resume_config): check the paths of that too
            try:
                with open(os.path.join(run_dir, 'config.json'), encoding='utf-8') as f:
                    saved = json.load(f)
            except (OSError, ValueError):
                saved = {}  # the script says what is wrong with a run it cannot resume
            saved = {k: v for k, v in saved.items() if k in defaults} \
                if isinstance(saved, dict) else {}
            self._check_paths(_configure(path, {**defaults, **saved}, files + flags))
        return [sys.executable, path, *files, *flags], run_dir

    def _check_paths(self, config):
        """Refuse (a 400 naming the setting) a resolved config that would run code from outside
        (REFUSED) or whose paths lead outside the places their use allows (PATHS) -> the folder
        the job writes: its out_dir (export.py's out), else the one beside init_from that
        evaluate.py and export.py write to then, else data.py's dataset folder, else None."""
        for name, why in REFUSED.items():
            if config.get(name):
                raise ApiError(400, f"{name}={config[name]!r} is not run from the server: {why}; "
                               "run that from the command line", name, 'setting_not_allowed')
        data_dir = os.path.join(self.runs_dir, str(config.get('data_dir', '')))
        for name, kind in PATHS.items():
            value = config.get(name)
            if not isinstance(value, str) or not value:  # '': the script's own default place
                continue
            bases = [data_dir] if name == 'out_name' else \
                [self.runs_dir, data_dir] if name in UNDER_DATA else [self.runs_dir]
            for item in filter(None, (x.strip() for x in value.split(','))):
                for base in bases:
                    self._check_path(name, value, item, os.path.join(base, item), kind)
        out = config.get('out_dir') or config.get('out')
        source = config.get('init_from')
        if out:
            return os.path.realpath(os.path.join(self.runs_dir, out))
        if isinstance(source, str) and os.path.exists(os.path.join(self.runs_dir, source)):
            # evaluate.py and export.py with an empty out_dir / out: beside init_from
            full = os.path.realpath(os.path.join(self.runs_dir, source))
            folder = full if os.path.isdir(full) else os.path.dirname(full)
            self._check_path('out_dir' if 'out_dir' in config else 'out', '', '', folder, 'runs')
            return folder
        if 'dataset' in config and 'out_name' in config:  # data.py
            return os.path.join(data_dir, config['out_name'] if config['dataset'] == 'text'
                                else config['dataset'])
        return None

    def _check_path(self, name, value, item, path, kind):
        """Refuse item (of setting name = value) unless path, every link resolved, and (a folder)
        each entry in it lead inside the roots of kind."""
        roots = self.roots[kind]
        full = os.path.realpath(path)
        if '\0' in item or item.startswith('~') or '..' in item.replace('\\', '/').split('/') \
                or not inside(full, roots) or (os.path.isdir(full) and link_out(full, roots)):
            where = {'runs': "this server's runs directory (--runs_dir)",
                     'data': "this server's data directory (--data_dir)",
                     'read': 'the runs and data directories, --models_dir and the Hugging Face '
                             'cache'}[kind]
            what = f'{name}={value[:200]!r}' if value else \
                f'an empty {name}, which writes beside init_from,'
            raise ApiError(400, f"{what} leads outside {where}: a job reads and writes only there "
                           "(relative paths start in the runs directory; no '..', no '~')", name,
                           'path_not_allowed')

    # -------------------------------------------------------------------------
    # 2) the records

    def list(self):
        with self.lock:
            return [dict(j) for j in sorted(self.records.values(), key=lambda j: j['created'],
                                            reverse=True)]

    def get(self, job_id):
        with self.lock:
            return dict(self._job(job_id))

    def _job(self, job_id):
        if not isinstance(job_id, str) or job_id not in self.records:
            raise ApiError(404, f"no job {json.dumps(job_id)[:40]} (GET /v1/jobs lists them)",
                           None, 'job_not_found')
        return self.records[job_id]

    def _file(self, job_id, name):
        """A file of a job's own folder, runs_dir/_jobs/<id>/name: job.json, log.txt."""
        return os.path.join(self.dir, job_id, name)

    def _save(self, job):
        write_json(self._file(job['id'], 'job.json'), job)

    def _load(self):
        """The newest KEEP records under runs_dir/_jobs; one that was queued or running under a
        server that is gone is 'lost' (its process ended with that server)."""
        try:
            names = sorted(n for n in os.listdir(self.dir) if JOB_ID.fullmatch(n))[-KEEP:]
        except OSError:
            return {}
        records = {}
        for name in names:
            try:
                with open(self._file(name, 'job.json'), encoding='utf-8') as f:
                    job = json.load(f)
            except (OSError, ValueError):
                continue  # a damaged record is left out, not fatal
            if not (isinstance(job, dict) and job.get('id') == name and job.get('state') in STATES
                    and isinstance(job.get('created'), (int, float))):
                continue
            job['log'] = self._file(name, 'log.txt')  # where it is, whatever the file says
            if job.get('state') in ('queued', 'running') \
                    and not (isinstance(job.get('server_pid'), int) and running(job['server_pid'])):
                job['state'] = 'lost'
                try:
                    self._save(job)
                except OSError:
                    pass
            records[name] = job
        return records

    def _prune(self):
        """Keep at most KEEP records: the oldest ended ones go, with their folders."""
        ended = sorted((j for j in self.records.values() if j['state'] in ENDED),
                       key=lambda j: j['created'])
        for job in ended[:max(0, len(self.records) - KEEP)]:
            del self.records[job['id']]
            shutil.rmtree(os.path.join(self.dir, job['id']), ignore_errors=True)

    # -------------------------------------------------------------------------
    # 3) the processes: started, watched and stopped by the jobs thread

    def _loop(self):
        """The jobs thread: note the jobs that ended, escalate stops, start queued jobs while
        fewer than max_jobs run; until the server closes and its jobs have ended."""
        with self.lock:
            while not (self.closed and not self.procs):
                self._reap()
                while self.queue and len(self.procs) < self.max_jobs and not self.closed:
                    self._start(self.records[self.queue.popleft()])
                self.lock.wait(POLL if self.procs else None)  # submit, stop and close notify

    def _start(self, job):
        env = {**os.environ, 'OMP_NUM_THREADS': str(THREADS), 'MKL_NUM_THREADS': str(THREADS),
               'PYTHONUNBUFFERED': '1'}  # unbuffered: the log shows each line as it is printed
        env.pop('NANOLAB_API_KEY', None)  # the server's key is not the job's
        parent = os.getpid()
        try:
            with open(job['log'], 'ab') as log:
                # a session of its own: a process group that signals reach whole (data.py's
                # workers too), and away from the terminal's Ctrl-C
                proc = subprocess.Popen(job['argv'], cwd=self.runs_dir, env=env,
                                        stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=lambda: _in_child(parent))
        except (OSError, subprocess.SubprocessError) as e:
            job.update(state='failed', ended=time.time(), error=f'could not start: {e}')
        else:
            job.update(state='running', pid=proc.pid, started=time.time())
            self.procs[job['id']] = proc
            engine_thread.reserve(THREADS * len(self.procs))  # the jobs' cores, not the chat's
        self._store(job)

    def _reap(self):
        now = time.time()
        for job_id, proc in list(self.procs.items()):
            job, code = self.records[job_id], proc.poll()
            if code is not None:
                # subtle: at once: a pid is not handed out again while a group has it as its
                # id, but once the group is empty it may be, and killpg would find another's
                _sweep(proc.pid)
            self._cap(job)
            if code is None:
                asked = job['stop_requested']
                if asked and now - asked > STOP_GRACE + KILL_GRACE:
                    self._signal(job, proc, signal.SIGKILL)
                elif asked and now - asked > STOP_GRACE:
                    self._signal(job, proc, signal.SIGTERM)
                continue
            del self.procs[job_id]
            engine_thread.reserve(THREADS * len(self.procs))
            state = 'stopped' if job['stop_requested'] else 'done' if code == 0 else 'failed'
            job.update(state=state, exit_code=code, ended=now)
            self._store(job)

    def _cap(self, job):
        """Bound a job's log on disk: past LOG_CAP bytes, keep its first LOG_CAP // 2 (what the
        job was asked to do, its config) and its newest LOG_TAIL (where it is now), with a marker
        between. The child goes on writing to the same file: its O_APPEND writes land at the new
        end. A reader whose offset the cut left past the end reads on from the marker (log)."""
        path, head, cut = job['log'], LOG_CAP // 2, job.get('log_cut', 0)
        try:
            if os.stat(path).st_size <= LOG_CAP:
                return
            with open(path, 'r+b') as f:
                f.seek(-LOG_TAIL, os.SEEK_END)
                tail = f.read()
                size = f.tell()
                tail = tail[tail.find(b'\n') + 1:]  # from its first whole line (all, if none)
                # what the child writes between the read above and this truncate is lost (the
                # log is being cut anyway); between it and the append below, it lands before
                # the marker
                f.truncate(head)
            # the dropped bytes are the child's output between the head and the tail, less the
            # marker of the cut before
            dropped = size - head - len(tail) - (len(_marker(cut, head)) if cut else 0)
            marker = _marker(cut + dropped, head)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            try:
                written = os.write(fd, marker + tail)
                at = os.lseek(fd, 0, os.SEEK_CUR) - written  # where this append landed
            finally:
                os.close(fd)
        except FileNotFoundError:  # removed by hand: nothing to bound
            return
        except OSError as e:  # a full disk must not end the jobs thread
            print(f"jobs: could not cut {job['id']}'s log: {e}", file=sys.stderr)
            return
        job.update(log_cut=cut + dropped, log_cut_at=at)
        self._store(job)

    def _signal(self, job, proc, sig):
        """Send sig to the job's process group, once."""
        if sig.name in job['signals']:
            return
        job['signals'].append(sig.name)
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # it has just ended
            pass
        self._store(job)

    def _store(self, job):
        """_save from the jobs thread, where a full disk must not end the thread: the record in
        memory is right, and the next change writes it again."""
        try:
            self._save(job)
        except OSError as e:
            print(f"jobs: could not write {job['id']}'s record: {e}", file=sys.stderr)

    def stop(self, job_id):
        """Stop a job: a queued one at once, a running one the scripts' Ctrl-C way (SIGINT to its
        group; escalated by _reap) -> its record. 409 for a job that has ended."""
        with self.lock:
            job = self._job(job_id)
            if job['state'] in ENDED:
                raise ApiError(409, f"job {job_id} has ended ({job['state']})", None,
                               'job_ended')
            if job['stop_requested'] is None:
                job['stop_requested'] = time.time()
                if job['state'] == 'queued':
                    self.queue.remove(job_id)
                    job.update(state='stopped', ended=job['stop_requested'])
                    self._store(job)
                else:
                    self._signal(job, self.procs[job_id], signal.SIGINT)
            self.lock.notify_all()
            return dict(job)

    def close(self):
        """The server is ending: no new jobs, the queued ones stopped, the running ones stopped
        as on Ctrl-C (escalated as by stop); returns once they have ended."""
        with self.lock:
            self.closed = True
            for job_id in list(self.queue) + list(self.procs):
                self.stop(job_id)
            self.lock.notify_all()  # the jobs thread ends now if none runs
        if self.thread is not None:
            self.thread.join(STOP_GRACE + KILL_GRACE + 5 * POLL)
        with self.lock:  # a job that did not end even so: its group, with it
            for proc in self.procs.values():
                _sweep(proc.pid)

    # -------------------------------------------------------------------------
    # 4) the log

    def log(self, job_id, offset):
        """A job's log from byte offset, at most LOG_READ bytes -> {text (UTF-8 up to the last
        whole character), offset, next_offset (where to read on), done (the job has ended and
        nothing is left), state}. An offset past the end of a log that was cut (_cap) reads
        from the marker: the reader was ahead of the cut, and goes on with the newest lines."""
        with self.lock:
            job = dict(self._job(job_id))
        # the state first: a job that had ended then has its whole log on disk
        try:
            with open(self._file(job_id, 'log.txt'), 'rb') as f:
                size = os.fstat(f.fileno()).st_size
                if offset > size and 'log_cut_at' in job:
                    offset = job['log_cut_at']
                f.seek(offset)
                data = f.read(LOG_READ)
        except FileNotFoundError:  # not started yet
            size, data = 0, b''
        done = job['state'] in ENDED and offset + len(data) >= size
        decoder = codecs.getincrementaldecoder('utf-8')('replace')
        text = decoder.decode(data, final=done)
        end = offset + len(data) - len(decoder.getstate()[0])  # a character cut in two: next time
        return {'object': 'job.log', 'id': job_id, 'offset': offset, 'next_offset': end,
                'text': text, 'done': done, 'state': job['state']}
