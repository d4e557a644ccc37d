"""metrics.py and sandbox.py against references: pass@k against the binomial formula and hand values (Chen et al. 2021),
the sandbox against programs that pass, fail, loop, allocate without end or write files, METEOR against NLTK's
implementation (its WordNet synonym stage off: ours has none) and a hand computation of Banerjee & Lavie's formula, and
a code benchmark end to end through benchmarks.run_code. CPU, ~10 s."""
import math
import os
import time
from fractions import Fraction

import pytest

from nanolab import benchmarks, metrics, sandbox
from nanolab.metrics import meteor
from nanolab.sandbox import check_program, pass_at_k

ADD = {'task_id': 't/0', 'prompt': 'def add(a, b):\n    """a + b"""\n', 'canonical_solution': '    return a + b\n',
       'test': 'def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n',
       'entry_point': 'add'}


def test_pass_at_k_is_the_unbiased_estimator():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                want = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
                assert pass_at_k(n, c, k) == pytest.approx(float(want), abs=1e-12), (n, c, k)
    assert pass_at_k(5, 1, 1) == pytest.approx(0.2) and pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)
    assert pass_at_k(200, 0, 100) == 0.0 and pass_at_k(200, 150, 100) == 1.0
    assert pass_at_k(200, 1, 1) == pytest.approx(1 / 200)  # large n: the product form stays exact
    with pytest.raises(ValueError, match='--n_samples'):
        pass_at_k(3, 1, 5)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_the_sandbox_passes_fails_and_kills_within_its_limits():
    prog = ADD['prompt'] + ADD['canonical_solution']
    assert check_program(prog, ADD['test'], 'add') == (True, 'passed')
    assert check_program(ADD['prompt'] + '    return a - b\n', ADD['test'], 'add') == (False, 'AssertionError')
    ok, why = check_program(ADD['prompt'] + '    return a +\n', ADD['test'], 'add')
    assert not ok and why.startswith('SyntaxError')
    t = time.time()  # a loop: the timeout kills it (its process group)
    assert check_program(ADD['prompt'] + '    while True:\n        pass\n', ADD['test'], 'add', timeout_s=1) in \
        [(False, 'timeout'), (False, 'cpu limit')]
    assert time.time() - t < 5
    t = time.time()  # allocating without end: the address-space limit stops it long before the machine's memory
    hog = ADD['prompt'] + '    x = []\n    while True:\n        x.append(bytearray(1 << 20))\n'
    assert check_program(hog, ADD['test'], 'add', timeout_s=20, memory_mb=256) == (False, 'out of memory')
    assert time.time() - t < 10
    # its working directory is a fresh temporary one, gone afterwards; the environment is empty
    probe = ('import os\ndef add(a, b):\n    open("left.txt", "w").write(os.getcwd())\n'
             '    assert "HOME" not in os.environ and sorted(os.listdir(".")) == ["left.txt", "program.py"]\n    return a + b\n')
    assert check_program(probe, ADD['test'], 'add') == (True, 'passed')
    assert not any(n.startswith('nanolab-code-') for n in os.listdir(os.environ.get('TMPDIR', '/tmp')))


def test_meteor_matches_nltk_and_the_formula():
    from nltk.translate.meteor_score import single_meteor_score

    class NoSynonyms:  # NLTK's WordNet stage, off: exact and stem matches only, as ours
        def synsets(self, word):
            return []
    pairs = [('the cat sat on the mat', 'the cat sat on the mat'),
             ('the president spoke to the audience', 'the president then spoke to the audience'),
             ('the cats were running quickly', 'a cat runs quickly'),
             ('completely different words here', 'nothing in common at all'),
             ('mat the on sat cat the', 'the cat sat on the mat')]
    for hyp, ref in pairs:
        want = single_meteor_score(ref.lower().split(), hyp.lower().split(), wordnet=NoSynonyms())
        assert meteor(hyp, ref) == pytest.approx(want, abs=1e-9), (hyp, ref)
    # by hand (Banerjee & Lavie 2005): 6 of 6 hypothesis words match 6 of 7 reference words in 2 chunks
    P, R = 1, 6 / 7
    assert meteor('the president spoke to the audience', 'the president then spoke to the audience') == \
        pytest.approx(10 * P * R / (R + 9 * P) * (1 - 0.5 * (2 / 6) ** 3))
    assert meteor('the cats sat', 'the cat sat') == pytest.approx(1 - 0.5 / 27)  # 'cats' ~ 'cat' by stem, 1 chunk
    # NLTK's documented example: the paper picks, of the largest alignments, the one with the fewest crossings. Ours:
    # 12 matches in 4 chunks, 1 crossing ('Party commands'); NLTK's greedy one takes 'the' of 'the party' for 'the
    # military' (3 crossings, 6 chunks) and reports 0.6944
    hyp = 'It is a guide to action which ensures that the military always obeys the commands of the party'
    ref = 'It is a guide to action that ensures that the military will forever heed Party commands'
    P, R = 12 / 18, 12 / 16
    assert meteor(hyp, ref) == pytest.approx(P * R / (0.9 * P + 0.1 * R) * (1 - 0.5 * (4 / 12) ** 3))
    assert single_meteor_score(ref.lower().split(), hyp.lower().split(), wordnet=NoSynonyms()) == pytest.approx(0.6944, abs=1e-4)
    m, items = metrics.score_generation(['the cats sat', 'no'], [{'references': ['x', 'the cat sat']},
                                                                  {'references': ['yes']}], ['meteor'])
    assert items['meteor'] == [pytest.approx(1 - 0.5 / 27), 0.0] and m['meteor'] == pytest.approx((1 - 0.5 / 27) / 2)


def test_code_benchmark_scores_pass_at_k(tmp_path, monkeypatch):
    """HumanEval rows read; nothing runs without the confirmation; pass@k over n samples per problem, each program
    the prompt plus a completion (stand-in completions: 2 of 3 right for add, 0 of 3 for the other)."""
    import json
    from nanolab.generation import Completion
    sub = {**ADD, 'task_id': 't/1', 'prompt': 'def sub(a, b):\n', 'entry_point': 'sub',
           'test': 'def check(f):\n    assert f(3, 1) == 2\n'}
    path = tmp_path / 'code.jsonl'
    path.write_text(''.join(json.dumps(r) + '\n' for r in (ADD, sub)))
    rows = benchmarks.read_benchmark(str(path))
    assert [r['id'] for r in rows] == ['t/0', 't/1'] and rows[0]['test'] == ADD['test']
    texts = {0: ['    return a + b\n', '    return a * b\n', '    return b + a\n'], 1: ['    return a + b\n'] * 3}

    def fake_generate(model, prompts, n, num_samples=1, **kw):
        assert kw['stop_strings'] == sandbox.CODE_STOPS and num_samples == 3 and kw['temperature'] == 0.8
        return [Completion(tokens=[], text=texts[i][k], finish_reason='stop', logprob=0.0, token_logprobs=[],
                           top_logprobs=None, prompt_index=i, sample_index=k) for i in range(2) for k in range(3)]
    monkeypatch.setattr(benchmarks, 'generate', fake_generate)

    class Tok:
        def encode(self, text):
            return [1]
    with pytest.raises(ValueError, match='--confirm_run_unsafe_code=True'):
        benchmarks.run_code(None, Tok(), rows, n_samples=3, ks=(1, 2))
    with pytest.raises(ValueError, match='--n_samples to 5'):
        benchmarks.run_code(None, Tok(), rows, n_samples=3, ks=(1, 5), confirm=True)
    out = benchmarks.run_code(None, Tok(), rows, n_samples=3, ks=(1, 2), confirm=True, temperature=0.8)
    assert out['items'] == {'pass@1': [pytest.approx(2 / 3), 0.0], 'pass@2': [1.0, 0.0]}
    assert out['metrics'] == {'pass@1': pytest.approx(1 / 3), 'pass@2': 0.5}
    assert [s['why'] for s in out['samples'][0]] == ['passed', 'AssertionError', 'passed']
