"""
The scores evaluate.py gives generated text and programs, each a plain function:

  score_generation   exact match, contains, ROUGE-L (rouge-score), BLEU (sacrebleu) and METEOR of answers
  meteor             METEOR (Banerjee & Lavie 2005): unigrams matched exactly, then by Porter stem, F-mean with
                     recall weighted 9 to 1, and a fragmentation penalty for matches scattered in chunks
  pass_at_k          the unbiased pass@k estimator of Chen et al. 2021 (HumanEval)
  check_program      run a program and its tests in a separate, limited process -> (passed, why not)

The sandbox of check_program, plainly: each program runs in a new Python process (-I: no user site, no
PYTHON* variables), in an empty temporary working directory that is deleted afterwards, with a wall-clock timeout
(the whole process group is killed), a CPU-time limit, an address-space limit (memory), a limit on the size of
files it writes, no core dumps, and stdin closed. It is NOT a security boundary: the program runs as you, so it can
read any file you can, write outside its directory by absolute path, open network connections, and start other
processes (each under the same limits). Run code benchmarks only on models and tasks you trust, or inside a
container or VM that has nothing to lose.
"""
import math
import os
import re
import signal
import subprocess
import sys
import tempfile

# -----------------------------------------------------------------------------
# 1) text: exact match, contains, ROUGE-L, BLEU, METEOR

def _words(text):
    """METEOR's unigrams: lowercase words and punctuation marks."""
    return re.findall(r"\w+|[^\w\s]", text.lower())

def meteor(hypothesis, reference, alpha=0.9, beta=3.0, gamma=0.5):
    """METEOR of one hypothesis against one reference (texts, or lists of unigrams). Banerjee & Lavie 2005:
      1) align unigrams in stages, each over the words the last left unmatched: exact forms, then Porter stems
         (each word matches at most once; a hypothesis word takes the free reference position after the last one
         matched, if it can, which keeps the chunks few)
      2) P = m / len(hypothesis), R = m / len(reference), Fmean = P R / (alpha P + (1 - alpha) R) (alpha 0.9:
         the paper's 10 P R / (R + 9 P))
      3) chunks = runs of matches adjacent and in the same order in both; penalty = gamma (chunks / m)^beta
      4) score = Fmean (1 - penalty). No synonym stage (it needs WordNet's data, which is not here offline)."""
    from nltk.stem.porter import PorterStemmer
    hyp = _words(hypothesis) if isinstance(hypothesis, str) else list(hypothesis)
    ref = _words(reference) if isinstance(reference, str) else list(reference)
    stem = PorterStemmer().stem
    matches = {}  # hypothesis position -> reference position
    for key in (lambda w: w, stem):
        free = [j for j in range(len(ref)) if j not in matches.values()]
        for i in (i for i in range(len(hyp)) if i not in matches):
            options = [j for j in free if key(ref[j]) == key(hyp[i])]
            if options:
                last = max((matches[k] for k in matches if k < i), default=-1)
                j = next((j for j in options if j > last), options[0])
                matches[i] = j
                free.remove(j)
    m = len(matches)
    if m == 0:
        return 0.0
    P, R = m / len(hyp), m / len(ref)
    fmean = P * R / (alpha * P + (1 - alpha) * R)
    pairs = sorted(matches.items())
    chunks = 1 + sum(1 for (i0, j0), (i1, j1) in zip(pairs, pairs[1:]) if not (i1 == i0 + 1 and j1 == j0 + 1))
    return fmean * (1 - gamma * (chunks / m) ** beta)

def score_generation(answers, rows, metrics, normalize=str.strip):
    """Per-item scores of answers against each row's references (the best reference counts) and headline
    metrics: exact_match and contains (0/1, after normalize), rouge_l (ROUGE-L F1, rouge-score, stemmed), meteor
    (above), all averaged over items; bleu is sacrebleu's corpus BLEU (0-100), with sentence BLEU per item."""
    items = {}
    refs = [[normalize(x) for x in r['references']] for r in rows]
    outs = [normalize(a) for a in answers]
    if 'exact_match' in metrics:
        items['exact_match'] = [float(any(o == x for x in rs)) for o, rs in zip(outs, refs)]
    if 'contains' in metrics:
        items['contains'] = [float(any(x in o for x in rs)) for o, rs in zip(outs, refs)]
    if 'rouge_l' in metrics:
        from rouge_score import rouge_scorer
        scorer = rouge_scorer.RougeScorer(['rougeL'], use_stemmer=True)
        items['rouge_l'] = [max(scorer.score(x, o)['rougeL'].fmeasure for x in rs) for o, rs in zip(outs, refs)]
    if 'meteor' in metrics:
        items['meteor'] = [max(meteor(o, x) for x in rs) for o, rs in zip(outs, refs)]
    headline = {k: sum(v) / len(v) for k, v in items.items()}
    if 'bleu' in metrics:
        import sacrebleu
        k = max(map(len, refs))  # sacrebleu wants k reference streams of equal length; pad with the first reference
        streams = [[rs[i] if i < len(rs) else rs[0] for rs in refs] for i in range(k)]
        headline['bleu'] = sacrebleu.corpus_bleu(outs, streams).score
        items['bleu_sentence'] = [sacrebleu.sentence_bleu(o, rs).score for o, rs in zip(outs, refs)]
    return headline, items

GENERATION_METRICS = ('exact_match', 'contains', 'bleu', 'rouge_l', 'meteor')

# -----------------------------------------------------------------------------
# 2) programs: pass@k and the sandbox

# where a HumanEval completion ends: the function body is done when a new top-level statement starts (Chen et al.)
CODE_STOPS = ['\nclass', '\ndef', '\n#', '\nif', '\nprint']

def pass_at_k(n, c, k):
    """The chance that at least one of k programs drawn from n samples, c of them correct, passes: 1 - C(n-c, k) /
    C(n, k) (Chen et al. 2021, eq. 1), computed as 1 - prod_{i=n-c+1..n} (1 - k / i), which stays accurate for
    large n. Unbiased, unlike 1 - (1 - c/n)^k."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)) or not 0 <= c <= n or k < 1:
        raise ValueError(f'pass_at_k needs integers 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}')
    if k > n:
        raise ValueError(f'pass@{k} needs at least {k} samples per problem, got n={n}; sample more (--n_samples)')
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
    """Run program, then HumanEval's test code and check(entry_point), in a separate limited process (the module
    docstring says what that does and does not protect against) -> (passed, why): (True, 'passed'), or (False,
    'timeout' | 'cpu limit' | 'out of memory' | the error's last line, e.g. 'AssertionError' or 'SyntaxError: ...')."""
    source = f'{program}\n\n{test}\n\ncheck({entry_point})\n'
    with tempfile.TemporaryDirectory(prefix='nanolab-code-') as d:
        with open(os.path.join(d, 'program.py'), 'w', encoding='utf-8') as f:
            f.write(source)
        p = subprocess.Popen([sys.executable, '-I', '-B', 'program.py'], cwd=d, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={'PATH': '/usr/bin:/bin'},
                             start_new_session=True, preexec_fn=_limits(max(1, math.ceil(timeout_s)), memory_mb))
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
    last = next((line for line in reversed(err.decode('utf-8', 'replace').strip().splitlines()) if line.strip()), '')
    if last.startswith('MemoryError'):
        return False, 'out of memory'
    return False, last[:200] or f'exit status {p.returncode}'
