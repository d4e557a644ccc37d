"""
nanolab/harness.py (evaluate.py --tasks), checked against lm-eval's own `hf` backend on identical weights
(written with save_pretrained): the same metrics, per-item scores and per-request log-likelihoods on local YAML
tasks the test writes (multiple choice, rolling perplexity), tokenization edge cases included; generate_until
against sample.generate; and the errors (unknown task, malformed YAML, unreadable data). Tiny models, CPU only.
"""
import json
import os
import random

import pytest
import torch

from nanolab import harness
from model import GPT, GPTConfig  # tests/conftest.py puts the repo root on sys.path
from sample import generate
from nanolab.tokenizer import TiktokenTokenizer

BLOCK = 64  # small, so long documents roll over several windows and long contexts get truncated
WORDS = 'the cat dog sat on a mat red blue green sun moon star tree river hill , .'.split()


pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


def text(rng, lo, hi):
    return ' '.join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def write_task(folder, name, rows, spec):
    """A local lm-eval task: rows as JSONL read by HF datasets' json loader (cached under the folder, so tests
    never share a cache), plus its YAML."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f'{name}.jsonl'), 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in rows)
    with open(os.path.join(folder, f'{name}.yaml'), 'w') as f:
        f.write(f'task: {name}\ndataset_path: json\ntest_split: train\ndataset_kwargs:\n'
                f'  data_files: {os.path.join(folder, name + ".jsonl")}\n  cache_dir: {os.path.join(folder, "cache")}\n'
                + spec)


@pytest.fixture(scope='module')
def task_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp('tasks'))
    rng = random.Random(0)
    # multiple choice: questions end in ':' or ': ' (trailing space moves to the choice), one is too long for
    # the window (left-truncated), choices of 1-4 words
    mc = [{'question': text(rng, 3, 12) + (': ' if i % 3 == 0 else ':'), 'choices': [text(rng, 1, 4) for _ in range(4)],
           'answer': i % 4} for i in range(20)]
    mc[5]['question'] = text(rng, 80, 90) + ':'
    write_task(d, 't_mc', mc, 'output_type: multiple_choice\ndoc_to_text: question\ndoc_to_choice: choices\n'
               'doc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n')
    # rolling log-likelihood: documents from a few tokens to several windows long
    docs = [{'text': text(rng, 3, 150)} for _ in range(10)]
    write_task(d, 't_ppl', docs, "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
               'metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n')
    return d


def tiny(arch):
    torch.manual_seed(0)
    kw = dict(n_kv_head=1) if arch == 'llama' else {}
    m = GPT(GPTConfig(arch=arch, n_layer=2, n_head=2, n_embd=32, block_size=BLOCK, vocab_size=50304, **kw))
    with torch.no_grad():  # sharper than the 0.02 init: margins between choices far above float noise
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return m.eval()


@pytest.fixture(scope='module')
def tok():
    return TiktokenTokenizer('gpt2')


def instances(kind, args):
    from lm_eval.api.instance import Instance
    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


@pytest.mark.parametrize('arch', ['gpt2', 'llama'])
def test_matches_hf_backend(arch, task_dir, tok, tmp_path, capfd):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    model = tiny(arch)
    model.save_pretrained(str(tmp_path / 'hf'), tok)
    ours = {r['task']: r for r in harness.run_harness(model, tok, 't_mc,t_ppl', include_path=task_dir, batch_size=8)}
    # the one long question, once per choice
    assert 'warning: 4 lm-eval requests were longer than the block size' in capfd.readouterr().err
    hf = HFLM(pretrained=str(tmp_path / 'hf'), batch_size=8, device='cpu', dtype='float32')
    theirs = lm_eval.simple_evaluate(hf, tasks=['t_mc', 't_ppl'], log_samples=True,
                                     task_manager=TaskManager(include_path=task_dir, include_defaults=False))
    # 1) multiple choice: the same answers, item by item
    mc, ref = ours['lm_eval:t_mc'], theirs['results']['t_mc']
    assert mc['n'] == 20 and mc['item_ids'] == list(range(20))
    for m in ('acc', 'acc_norm'):
        assert mc['metrics'][m] == ref[f'{m},none'] and mc['stderr'][m] == pytest.approx(ref[f'{m}_stderr,none'])
        assert mc['items'][m] == [float(s[m]) for s in theirs['samples']['t_mc']]
    # 2) perplexities, every document rolled over windows of the block size
    ppl, ref = ours['lm_eval:t_ppl'], theirs['results']['t_ppl']
    for m in ('word_perplexity', 'byte_perplexity', 'bits_per_byte'):
        assert ppl['metrics'][m] == pytest.approx(ref[f'{m},none'], rel=1e-4)
    # 3) request by request, tokenization edge cases: trailing whitespace, an empty context, a context longer than
    # the window, a continuation that starts mid-word
    lm = harness.harness_lm_class()(model, tok, batch_size=4)
    reqs = [('The cat sat on the', ' mat'), ('The cat sat on the ', 'mat'), ('', 'Hello world'), ('abc', 'def'),
            (' '.join(['river'] * 100), ' hill'), ('Question: 2+2=\n', 'Answer: 4')]
    a, b = lm.loglikelihood(instances('loglikelihood', reqs)), hf.loglikelihood(instances('loglikelihood', reqs))
    assert [g for _, g in a] == [g for _, g in b]
    assert [x for x, _ in a] == pytest.approx([x for x, _ in b], rel=1e-4, abs=1e-4)
    # subtle: not a periodic text such as 'sun moon ' * 120: two of its windows then share context + continuation[:-1],
    # and the hf backend's logits cache scores the shorter one on the wrong positions (lm-eval 0.4.13)
    docs = [(text(random.Random(2), 150, 160),), ('x',)]
    assert lm.loglikelihood_rolling(instances('loglikelihood_rolling', docs)) == pytest.approx(
        hf.loglikelihood_rolling(instances('loglikelihood_rolling', docs)), rel=1e-4)


def test_generate_until_is_sample_generate(tok, tmp_path):
    """generate_until = greedy sample.generate with the task's stop strings (and eot), batched by settings, both
    called directly and through a generation task whose targets are those answers for every other document."""
    model = tiny('gpt2')
    lm = harness.harness_lm_class()(model, tok, batch_size=2)
    rng = random.Random(1)
    prompts = [text(rng, 2, 8) for _ in range(5)] + [text(rng, 70, 80)]  # the last one is left-truncated
    until = ['.', ',']
    reqs = [(p, {'until': until, 'max_gen_toks': 6, 'do_sample': False}) for p in prompts]
    reqs += [(p, {'until': '\n', 'max_gen_toks': 3}) for p in prompts[:2]]  # another group of settings
    got = lm.generate_until(instances('generate_until', reqs))
    want = [c.text for c in generate(model, [tok.encode(p)[-(BLOCK - 6):] for p in prompts], 6, temperature=0.0,
                                     stop_strings=until + ['<|endoftext|>'], tokenizer=tok)]
    want += [c.text for c in generate(model, [tok.encode(p) for p in prompts[:2]], 3, temperature=0.0,
                                      stop_strings=['\n', '<|endoftext|>'], tokenizer=tok)]
    assert got == want and any(got[:6])
    # through lm-eval: exact_match items 1, 0, 1, 0 ... when every other target is the model's own answer
    rows = [{'q': p, 'a': w if i % 2 == 0 else 'nope'} for i, (p, w) in enumerate(zip(prompts[:4], want))]
    write_task(str(tmp_path), 't_gen', rows, "output_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: a\n"
               "generation_kwargs:\n  until: ['.', ',']\n  max_gen_toks: 6\n  do_sample: false\n"
               'metric_list:\n  - metric: exact_match\n')
    [r] = harness.run_harness(model, tok, 't_gen', include_path=str(tmp_path), limit=3)
    assert r['items']['exact_match'] == [1.0, 0.0, 1.0] and r['metrics']['exact_match'] == pytest.approx(2 / 3)
    assert r['n'] == 3 and r['settings']['limit'] == 3


def test_registered_and_output_path(task_dir, tok, tmp_path):
    """'nanolab' in lm-eval's registry builds our LM from init_from; output_path gets lm-eval's results JSON."""
    import lm_eval.api.registry
    model = tiny('gpt2')
    model.save_pretrained(str(tmp_path / 'hf'), tok)
    cls = harness.harness_lm_class()
    assert lm_eval.api.registry.get_model('nanolab') is cls and lm_eval.api.registry.get_model('hf')
    lm = cls.create_from_arg_string(f'init_from={tmp_path / "hf"}', {'batch_size': 4, 'device': 'cpu'})
    req = instances('loglikelihood', [('The cat sat', ' on the mat')])
    assert lm.loglikelihood(req)[0][0] == pytest.approx(cls(model, tok).loglikelihood(req)[0][0], rel=1e-5)
    [r] = harness.run_harness(model, tok, 't_mc', include_path=task_dir, limit=4, output_path=str(tmp_path / 'lm'),
                               model_name='out-x')
    [path] = (tmp_path / 'lm' / 'out-x').glob('results_*.json')  # lm-eval's layout: DIR/<model>/results_<time>.json
    saved = json.load(open(path))
    assert saved['results']['t_mc']['acc,none'] == r['metrics']['acc'] and saved['n-samples']['t_mc']['effective'] == 4


def test_errors(task_dir, tok, tmp_path):
    model = tiny('gpt2')
    # 1) a name neither include_path nor lm-eval knows (this indexes lm-eval's own tasks once: ~10 s)
    with pytest.raises(ValueError, match="unknown lm-eval task 'no_such_task'.*include_path"):
        harness.run_harness(model, tok, 'no_such_task', include_path=task_dir)
    # 2) malformed YAML: the file is named (lm-eval itself would skip it without a word)
    bad = tmp_path / 'bad'
    bad.mkdir()
    (bad / 'broken.yaml').write_text('task: t_bad\nmetric_list: [acc\n')
    with pytest.raises(ValueError, match='broken.yaml'):
        harness.run_harness(model, tok, 't_bad', include_path=str(bad))
    # 3) a task whose data cannot be read: named, with the ways out
    write_task(str(tmp_path / 'gone'), 't_gone', [{'q': 'x', 'a': 'y'}], "output_type: generate_until\n"
               "doc_to_text: q\ndoc_to_target: a\nmetric_list:\n  - metric: exact_match\n")
    os.remove(tmp_path / 'gone' / 't_gone.jsonl')
    with pytest.raises(ValueError, match="lm-eval task 't_gone' could not load its data.*HF_DATASETS_OFFLINE"):
        harness.run_harness(model, tok, 't_gone', include_path=str(tmp_path / 'gone'))


def test_groups_keep_their_tree_and_unsafe_tasks_need_confirmation(task_dir, tok, tmp_path, monkeypatch):
    """A group (as MMLU's categories are) gives its aggregate with its 'subtasks', each subtask names its 'group';
    a task marked unsafe_code (as humaneval is) runs only with confirm_run_unsafe_code, which reaches lm-eval."""
    import shutil
    monkeypatch.setenv('HF_ALLOW_CODE_EVAL', '0')  # restored afterwards: run_harness switches it on for its process
    d = tmp_path / 'g'
    shutil.copytree(task_dir, d, ignore=shutil.ignore_patterns('cache'))
    spec = open(d / 't_mc.yaml').read().replace('task: t_mc', 'task: t_mc2')
    (d / 't_mc2.yaml').write_text(spec)
    (d / 't_grp.yaml').write_text('group: t_grp\ntask:\n  - t_mc\n  - t_mc2\naggregate_metric_list:\n'
                                  '  - metric: acc\n    weight_by_size: true\n')
    model = tiny('gpt2')
    out = {r['task']: r for r in harness.run_harness(model, tok, 't_grp', include_path=str(d), limit=4)}
    assert out['lm_eval:t_grp']['subtasks'] == ['lm_eval:t_mc', 'lm_eval:t_mc2']
    assert out['lm_eval:t_mc']['group'] == out['lm_eval:t_mc2']['group'] == 'lm_eval:t_grp'
    assert out['lm_eval:t_grp']['metrics']['acc'] == pytest.approx(
        (out['lm_eval:t_mc']['metrics']['acc'] + out['lm_eval:t_mc2']['metrics']['acc']) / 2)
    (d / 't_unsafe.yaml').write_text(spec.replace('task: t_mc2', 'task: t_unsafe') + 'unsafe_code: true\n')
    with pytest.raises(ValueError, match='--confirm_run_unsafe_code=True'):
        harness.run_harness(model, tok, 't_unsafe', include_path=str(d), limit=2)
    [r] = harness.run_harness(model, tok, 't_unsafe', include_path=str(d), limit=2, confirm_run_unsafe_code=True)
    assert r['n'] == 2 and os.environ['HF_ALLOW_CODE_EVAL'] == '1'
