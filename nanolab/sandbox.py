"""
Running model-written programs, and scoring them: pass@k (code benchmarks, evaluate.py).

  pass_at_k          the unbiased pass@k estimator of Chen et al. 2021 (HumanEval)
  check_program      run a program and its tests in a separate, limited process -> (passed, why)

The sandbox of check_program, plainly: each program runs in a new Python process (-I: no user site,
no PYTHON* variables), in an empty temporary working directory that is deleted afterwards, with a
wall-clock timeout (the whole process group is killed), a CPU-time limit, an address-space limit
(memory), a limit on the size of files it writes, no core dumps, and stdin closed. It is NOT a
security boundary: the program runs as you, so it can read any file you can, write outside its
directory by absolute path, open network connections, and start other processes (each under the
same limits). Run code benchmarks only on models and tasks you trust, or inside a container or VM
that has nothing to lose.
"""
import math
import os
import signal
import subprocess
import sys
import tempfile

# where a HumanEval completion ends: the function body is done when a new top-level statement
# starts (Chen et al.)
CODE_STOPS = ['\nclass', '\ndef', '\n#', '\nif', '\nprint']

def pass_at_k(n, c, k):
    """The chance that at least one of k programs drawn from n samples, c of them correct, passes:
    1 - C(n-c, k) / C(n, k) (Chen et al. 2021, eq. 1), computed as 1 - prod_{i=n-c+1..n} (1 - k /
    i), which stays accurate for large n. Unbiased, unlike 1 - (1 - c/n)^k."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)) or not 0 <= c <= n \
            or k < 1:
        raise ValueError('pass_at_k needs integers 0 <= c <= n and k >= '
                         f'1, got n={n}, c={c}, k={k}')
    if k > n:
        raise ValueError(f'pass@{k} needs at least {k} samples per problem, got n={n}; '
                         'sample more (--n_samples)')
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))

def _limits(cpu_s, memory_mb):
    """In the child, before exec: its own process group's limits (resource(2))."""
    import resource

    def apply():
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))  # files it writes: 16 MB
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply

def check_program(program, test, entry_point, timeout_s=10.0, memory_mb=1024):
    """Run program, then HumanEval's test code and check(entry_point), in a separate limited
    process (the module docstring says what that does and does not protect against) -> (passed,
    why): (True, 'passed'), or (False, 'timeout' | 'cpu limit' | 'out of memory' | the error's last
    line, e.g. 'AssertionError' or 'SyntaxError: ...')."""
    source = f'{program}\n\n{test}\n\ncheck({entry_point})\n'
    with tempfile.TemporaryDirectory(prefix='nanolab-code-') as d:
        with open(os.path.join(d, 'program.py'), 'w', encoding='utf-8') as f:
            f.write(source)
        p = subprocess.Popen([sys.executable, '-I', '-B', 'program.py'], cwd=d,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env={'PATH': '/usr/bin:/bin'},
                             start_new_session=True,
                             preexec_fn=_limits(max(1, math.ceil(timeout_s)), memory_mb))
        try:
            _, err = p.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # the group: children it started go too
            p.communicate()
            return False, 'timeout'
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    if p.returncode == 0:
        return True, 'passed'
    if p.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return False, 'cpu limit'
    last = next((line for line in reversed(err.decode('utf-8', 'replace').strip().splitlines())
                 if line.strip()), '')
    if last.startswith('MemoryError'):
        return False, 'out of memory'
    return False, last[:200] or f'exit status {p.returncode}'
