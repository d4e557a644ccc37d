"""Perplexity (likelihood.py) and custom benchmarks (benchmarks.py, metrics.py), as evaluate.py runs them, against
references: the sliding window against a token-by-token computation with the longest context the block allows, bits per
byte against the loss of a one-byte-per-token model, continuation scores against single forwards, the benchmark metrics
against hand values, and bad benchmark files. Tiny random models; CPU, a few seconds."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanolab import benchmarks, likelihood, metrics
from model import GPT, GPTConfig
from nanolab.tokenizer import CharTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = 'the cat sat on the mat. a dog ran to the cat; the cat ran away!\n'


@pytest.fixture(scope='module')
def tiny():
    tok = CharTokenizer(chars=''.join(sorted(set(TEXT))))
    torch.manual_seed(0)
    model = GPT(GPTConfig(arch='llama', block_size=16, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32)).eval()
    return model, tok


def reference_nll(model, ids, contexts):
    """Token by token: -log p(ids[p] | ids[contexts[p]:p]) summed over p >= 1, one forward per token."""
    total = 0.0
    with torch.no_grad():
        for p in range(1, len(ids)):
            logits = model(torch.tensor([ids[contexts[p]:p]]))[0][0, -1]
            total -= F.log_softmax(logits.float(), -1)[ids[p]].item()
    return total


def test_sliding_window_matches_token_by_token(tiny):
    model, tok = tiny
    ids = tok.encode(TEXT)  # 65 tokens, block size 16
    T = model.config.block_size
    # stride 1: every token sees the longest context the block allows
    r = likelihood.perplexity_of(model, ids, stride=1)
    assert r['tokens'] == len(ids) - 1 and r['windows'] == len(ids) - T
    assert r['nll'] == pytest.approx(reference_nll(model, ids, [max(0, p - T) for p in range(len(ids))]), rel=1e-5)
    # stride = block size: windows of T+1 tokens every T tokens, the last one moved back to end at the end
    starts = list(range(0, len(ids) - T - 1, T)) + [len(ids) - T - 1]
    ctx = [0] * len(ids)
    done = 1
    for b in starts:
        for p in range(done, b + T + 1):
            ctx[p] = b
        done = b + T + 1
    r = likelihood.perplexity_of(model, ids, stride=0, batch_size=2)
    assert r['windows'] == len(starts)
    assert r['nll'] == pytest.approx(reference_nll(model, ids, ctx), rel=1e-5)
    # a smaller stride never gives a token less context, and here it gives a lower loss
    assert likelihood.perplexity_of(model, ids, stride=4)['nll'] < r['nll'] + 1e-3
    with pytest.raises(ValueError, match='stride'):
        likelihood.perplexity_of(model, ids, stride=T + 1)


def test_perplexity_and_bits_per_byte_of_a_text_file(tiny, tmp_path):
    model, tok = tiny
    path = tmp_path / 'notes.txt'
    path.write_text(TEXT * 3)
    r = likelihood.run_perplexity(model, tok, str(path), stride=8)
    # one ASCII char = one token = one byte, so bits per byte = loss / ln 2
    assert r['metrics']['bits_per_byte'] == pytest.approx(r['metrics']['loss'] / math.log(2), rel=1e-6)
    assert r['metrics']['perplexity'] == pytest.approx(math.exp(r['metrics']['loss']))
    assert r['n'] == len(TEXT) * 3 - 1 and r['settings']['stride'] == 8
    (tmp_path / 'odd.txt').write_text('Zebra')  # 'Z' and 'b' are not in the vocabulary
    with pytest.raises(ValueError, match='cannot encode'):
        likelihood.run_perplexity(model, tok, str(tmp_path / 'odd.txt'))


def test_score_continuations_truncates_from_the_left(tiny):
    model, tok = tiny
    T = model.config.block_size
    long_ctx, short_ctx, cont = tok.encode(TEXT[:30]), tok.encode('the '), tok.encode('cat')
    out = likelihood.score_continuations(model, [(short_ctx, cont), (long_ctx, cont)], batch_size=1)
    assert likelihood.score_continuations.truncated == 1
    for (lp, greedy), ctx in zip(out, (short_ctx, long_ctx)):
        seq = (ctx + cont)[-(T + 1):]
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([seq[:-1]]))[0][0].float(), -1)
        rows = logp[len(seq) - 1 - len(cont):]
        assert lp == pytest.approx(sum(rows[i, t].item() for i, t in enumerate(cont)), abs=1e-4)
        assert greedy == all(rows[i].argmax().item() == t for i, t in enumerate(cont))
    with pytest.raises(ValueError, match='empty'):
        likelihood.score_continuations(model, [(short_ctx, [])])


def test_generation_metrics_against_hand_values():
    rows = [{'references': ['The cat sat on the mat.']}, {'references': ['a dog', 'the dog']}, {'references': ['yes']}]
    answers = ['The cat sat on the mat.', 'I saw the dog', 'no']
    m, items = metrics.score_generation(answers, rows, ['exact_match', 'contains', 'rouge_l', 'bleu'])
    assert items['exact_match'] == [1.0, 0.0, 0.0] and items['contains'] == [1.0, 1.0, 0.0]
    # ROUGE-L F1 of 'I saw the dog' against 'the dog' (the better reference): LCS 2, P 2/4, R 2/2 -> 2/3
    assert items['rouge_l'] == pytest.approx([1.0, 2 / 3, 0.0], abs=1e-6)
    assert items['bleu_sentence'][0] == pytest.approx(100.0) and m['exact_match'] == pytest.approx(1 / 3)
    assert 0 < m['bleu'] < 100


def test_multiple_choice_benchmark_picks_the_likeliest_choice(tiny, tmp_path):
    model, tok = tiny
    rows = [{'prompt': 'the cat sat on the', 'choices': [' mat', ' dog', ' cat'], 'answer': i % 3} for i in range(6)]
    path = tmp_path / 'mc.jsonl'
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    r = benchmarks.run_benchmark(model, tok, str(path), chat=False)
    lps = [likelihood.score_continuations(model, [(tok.encode(rows[0]['prompt']), tok.encode(c))])[0][0]
           for c in rows[0]['choices']]
    best = int(np.argmax(lps))
    assert r['items']['acc'] == [float(i % 3 == best) for i in range(6)]
    assert r['metrics']['acc'] == pytest.approx(2 / 6) and r['task'] == 'benchmark:mc' and r['n'] == 6


@pytest.mark.parametrize('lines, match', [
    (['{"prompt": "a", "reference": "b"}', '{"prompt": "a", '], 'line 2: not valid JSON'),
    (['{"prompt": "a"}'], "line 1: has keys \\['prompt'\\]"),
    (['{"prompt": "a", "choices": ["x", "y"], "answer": 5}'], "line 1: 'answer' must be"),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], 'line 1: .messages. must end'),
    (['{"prompt": "a", "reference": "b"}', '{"prompt": "a", "choices": ["x", "y"], "answer": 0}'], 'mixes'),
    ([''], 'holds no rows'),
])
def test_bad_benchmark_files_name_the_line(tmp_path, lines, match):
    path = tmp_path / 'bad.jsonl'
    path.write_text('\n'.join(lines) + '\n')
    with pytest.raises(ValueError, match=match):
        benchmarks.read_benchmark(str(path))


def test_cli_errors_exit_cleanly(tmp_path):
    bad = tmp_path / 'bad.jsonl'
    bad.write_text('{"prompt": "a", "reference": "b"}\nnot json\n')
    env = {**os.environ, 'PYTHONPATH': ROOT}
    for args, match in ((['--init_from=' + str(tmp_path / 'nope')], 'does not exist'),
                        (['--init_from=gpt2', '--bench_metrics=exact_match,f1'], "unknown bench_metrics \\['f1'\\]"),
                        (['--init_from=gpt2', f'--benchmark={tmp_path}/missing.jsonl'], 'no benchmark file')):
        p = subprocess.run([sys.executable, os.path.join(ROOT, 'evaluate.py'), *args], capture_output=True, text=True,
                           cwd=tmp_path, env=env)
        assert p.returncode == 1 and 'Traceback' not in p.stderr, p.stderr
        assert __import__('re').search(match, p.stderr), p.stderr


def test_templated_prompts_and_few_shot_prefixes():
    """evaluate.templated: a template's one variable takes the row's prompt (its last turn for chat rows), k seeded
    examples go first; a template with two variables is refused."""
    from nanolab import prompts
    from nanolab.benchmarks import templated
    ex = [{'question': f'q{i}', 'answer': f'a{i}'} for i in range(10)]
    chat = [{'role': 'user', 'content': 'Reverse kfeo'}]
    assert templated()(chat) == chat and templated()('plain') == 'plain'
    got = templated('instruction_concise', 2, ex, seed=3)(chat)
    shots = prompts.few_shot(ex, 2, 3)
    assert got == [{'role': 'user', 'content': shots + '\n\nReverse kfeo\nAnswer with the result only.'}]
    assert templated('qa', 0)('Why?') == 'Q: Why?\nA:'
    assert templated('qa', 1, ex, seed=0)(chat) == [{'role': 'user', 'content': prompts.few_shot(ex, 1, 0) + '\n\nQ: Reverse kfeo\nA:'}]
    with pytest.raises(ValueError, match='takes one variable'):
        templated('translate')
