"""dpo.py and preferences.py against hand computations and references: the loss formulas written out in floats,
per-sequence log-probabilities computed one unpadded sequence at a time, log 2 and zero rewards at step 0, the run's
logged kl recomputed from its saved policy and the SFT model (full and LoRA), and an uninterrupted run vs a resumed one.
A tiny char-level model and pairs the tests write themselves; CPU, a few seconds."""
import copy
import json
import math
import os
import runpy
import sys
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from nanolab.runs import read_metrics  # tests/conftest.py puts the repo root on sys.path
from nanolab.metrics import win_rate
from nanolab.preferences import collate, encode_pair, load_pairs, preference_loss, response_logps
from model import GPT, GPTConfig
from nanolab.checkpoint import load_model, save_checkpoint
from nanolab.tokenizer import CharTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DPO = os.path.join(ROOT, 'dpo.py')
CHARS = 'abcdefghijklmnopqrstuvwxyz0123456789 +=?:.\nSUA'  # covers the "User: " / "Assistant: " markers
TINY = ['--device=cpu', '--batch_size=4', '--eval_interval=3', '--log_interval=1', '--warmup_iters=0', '--win_rate_prompts=0',
        '--learning_rate=1e-3', '--min_lr=1e-3', '--lr_schedule=constant', '--beta=0.5']
KEYS = ['rewards/chosen', 'rewards/rejected', 'rewards/accuracies', 'rewards/margins', 'logps/chosen', 'logps/rejected', 'kl']


pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


def tiny_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=len(CHARS)))


def pair(i, chosen='yes', rejected='no'):
    return {'prompt': [{'role': 'user', 'content': f'is {i} + {i} = {2 * i}?'}], 'chosen': chosen, 'rejected': rejected}


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """An 'SFT' checkpoint (a random tiny model with a char tokenizer) and a dataset folder of pairs."""
    d = tmp_path_factory.mktemp('dpo')
    tok = CharTokenizer(chars=CHARS)
    save_checkpoint({'model_args': asdict(tiny_model().config), 'model': tiny_model().state_dict(),
                     'tokenizer': tok.spec(), 'config': {}}, str(d / 'sft' / 'ckpt.pt'))
    os.makedirs(d / 'data' / 'tasks')  # named like the tasks suite, so the win rate (synthetic.rule_score) applies
    for split, n in (('train', range(40)), ('val', range(40, 48))):
        with open(d / 'data' / 'tasks' / f'pref_{split}.jsonl', 'w') as f:
            f.writelines(json.dumps(pair(i)) + '\n' for i in n)
    return d, tok


def dpo(d, *args):
    """Run dpo.py in this process, as `python dpo.py args`."""
    argv = sys.argv
    sys.argv = [DPO, f"--init_from={d / 'sft'}", f"--data_dir={d / 'data'}", '--dataset=tasks',
                '--eval_pairs=0', *TINY, *args]
    try:
        runpy.run_path(DPO, run_name='__main__')
    finally:
        sys.argv = argv


def batch(tok, n=3):
    pairs = [encode_pair(tok, pair(i, 'yes' * (i + 1), 'no'), 65)[:3] for i in range(n)]  # uneven lengths: padding
    return pairs, collate(pairs)

# -----------------------------------------------------------------------------


def test_losses_match_hand_computation():
    pi_c, pi_r = torch.tensor([-3.0, -7.5, -2.0]), torch.tensor([-4.0, -6.0, -2.0])
    ref_c, ref_r = torch.tensor([-3.5, -7.0, -1.0]), torch.tensor([-3.5, -6.5, -1.0])
    beta, eps = 0.3, 0.1
    h = [(a - b) - (c - d) for a, b, c, d in zip(pi_c.tolist(), ref_c.tolist(), pi_r.tolist(), ref_r.tolist())]  # 1, -1, 0
    logsig = lambda z: -math.log1p(math.exp(-z))
    ipo, _ = preference_loss(pi_c, pi_r, ref_c, ref_r, beta, 'ipo')
    assert torch.allclose(ipo, torch.tensor([(v - 1 / (2 * beta)) ** 2 for v in h]), atol=1e-6)
    # trl's IPO: each response's log-ratio averaged over its tokens first
    n_c, n_r = torch.tensor([2, 5, 1]), torch.tensor([4, 1, 3])
    ipo_mean, _ = preference_loss(pi_c, pi_r, ref_c, ref_r, beta, 'ipo_mean', n_c=n_c, n_r=n_r)
    hm = [(a - c) / nc - (b - d) / nr for a, b, c, d, nc, nr in
          zip(pi_c.tolist(), pi_r.tolist(), ref_c.tolist(), ref_r.tolist(), n_c.tolist(), n_r.tolist())]
    assert torch.allclose(ipo_mean, torch.tensor([(v - 1 / (2 * beta)) ** 2 for v in hm]), atol=1e-6)
    with pytest.raises(ValueError, match='token counts'):
        preference_loss(pi_c, pi_r, ref_c, ref_r, beta, 'ipo_mean')
    dpo_, stats = preference_loss(pi_c, pi_r, ref_c, ref_r, beta, 'sigmoid', label_smoothing=eps)
    want = [-(1 - eps) * logsig(beta * v) - eps * logsig(-beta * v) for v in h]
    assert torch.allclose(dpo_, torch.tensor(want), atol=1e-6)
    assert torch.allclose(stats['rewards/chosen'], beta * torch.tensor([0.5, -0.5, -1.0]))
    assert torch.allclose(stats['rewards/margins'], beta * torch.tensor(h))
    assert stats['rewards/accuracies'].tolist() == [1.0, 0.0, 0.5]  # a tie counts half
    assert torch.allclose(stats['kl'], torch.tensor([0.5, -0.5, -1.0]))
    with pytest.raises(ValueError, match='loss_type'):
        preference_loss(pi_c, pi_r, ref_c, ref_r, beta, 'hinge')


def test_logps_are_response_only_and_match_unpadded_sequences(setup):
    _, tok = setup
    model = tiny_model()
    pairs, (x, y) = batch(tok)
    logits = model(x)[0].detach().requires_grad_()
    logps = response_logps(lambda idx: (logits, None), x, y)
    logps.sum().backward()
    # prompt tokens carry no gradient: the logits that predict prompt tokens (and padding) get exactly 0
    B = len(pairs)
    for i, (p, *responses) in enumerate(pairs + pairs):
        s = responses[i >= B]
        g = logits.grad[i].abs().sum(-1)  # (T,)
        assert (g[:len(p) - 1] == 0).all() and (g[len(p) + len(s) - 1:] == 0).all()
        assert (g[len(p) - 1:len(p) + len(s) - 1] > 0).all()
        # reference: the sequence alone, no padding, log_softmax summed over its response tokens
        ids = torch.tensor([p + s])
        lp = F.log_softmax(model(ids[:, :-1])[0][0], -1)
        want = sum(lp[t - 1, ids[0, t]] for t in range(len(p), ids.size(1)))
        assert abs(logps[i].item() - want.item()) < 1e-4


def test_step0_loss_is_log2_and_one_step_raises_margin(setup):
    _, tok = setup
    pairs, (x, y) = batch(tok)
    B = len(pairs)
    for loss_type in ('sigmoid', 'ipo', 'ipo_mean'):
        policy = tiny_model()
        ref = copy.deepcopy(policy).requires_grad_(False)
        pi, rf = response_logps(policy, x, y), response_logps(ref, x, y)
        n = (y != -1).sum(1)  # each response's tokens (ipo_mean)
        losses, stats = preference_loss(pi[:B], pi[B:], rf[:B], rf[B:], 0.1, loss_type, n_c=n[:B], n_r=n[B:])
        if loss_type == 'sigmoid':  # policy = reference: h = 0, loss = -log sigmoid(0) = log 2, every reward 0
            assert torch.allclose(losses, torch.full((B,), math.log(2)), atol=1e-6)
            assert (stats['rewards/chosen'] == 0).all() and (stats['rewards/rejected'] == 0).all()
            assert (stats['rewards/accuracies'] == 0.5).all() and (stats['kl'] == 0).all()
        opt = torch.optim.SGD(policy.parameters(), lr=0.01)
        losses[:1].mean().backward()  # one small step on the first pair
        opt.step()
        pi2 = response_logps(policy, x, y).detach()
        before, after = stats['rewards/margins'][0], 0.1 * ((pi2[0] - rf[0]) - (pi2[B] - rf[B]))
        assert after > before + 1e-4, (loss_type, before, after)


def test_truncation_rule(setup):
    _, tok = setup
    row = {'prompt': [{'role': 'user', 'content': 'a' * 40}], 'chosen': 'b' * 30, 'rejected': 'c' * 5}
    full = encode_pair(tok, row, 1000)
    assert not full[3]
    p, c, r, cut = encode_pair(tok, row, 50)
    assert cut and len(p) == 25 and p == full[0][-25:]  # the prompt keeps its end and half the budget
    assert c == full[1][:25] and r == full[2]  # the long response loses its tail, the short one fits
    p, c, r, cut = encode_pair(tok, {**row, 'chosen': 'b'}, 50)
    assert len(p) == 50 - len(r) and len(c) < len(r)  # only as much prompt goes as the longer response needs


def test_skips_are_counted_and_bad_rows_named(setup, tmp_path, capsys):
    _, tok = setup
    path = tmp_path / 'p.jsonl'
    rows = [pair(1), pair(2, 'same', 'same'), pair(3, 'x' * 80 + 'a', 'x' * 80 + 'b'),  # the 3rd: same after cutting
            pair(4, 'yes #4')]  # '#' is not in the char vocabulary
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    pairs, counts = load_pairs(str(path), tok, 40)
    assert len(pairs) == 1 and counts == {'skipped_identical': 1, 'skipped_identical_after_truncation': 1,
                                          'skipped_unencodable': 1}
    assert "skipped_unencodable': 1} (first: character '#'" in capsys.readouterr().out
    path.write_text(json.dumps(pair(1)) + '\n{"chosen": "a"}\n')
    with pytest.raises(ValueError, match=r'p.jsonl row 2'):
        load_pairs(str(path), tok, 40)

def test_win_rate_counts_ties_half():
    rows = [{'chosen': 'ab'}] * 4
    score = lambda row, a: float(a == row['chosen'])
    rate, details = win_rate(rows, ['ab', 'ab', 'x', 'x'], ['ab', 'x', 'ab', 'y'], score)
    assert rate == (0.5 + 1 + 0 + 0.5) / 4 and details[1] == {'answer': 'ab', 'ref_answer': 'x', 'score': 1.0, 'ref_score': 0.0}
    with pytest.raises(ValueError, match='one answer'):
        win_rate(rows, ['ab'], ['ab'], score)

# -----------------------------------------------------------------------------
# the script


@pytest.mark.parametrize('use_lora', [False, True])
def test_run_metrics_and_reference(setup, use_lora):
    """Train, then recompute the last eval's kl from the saved (merged) policy and the SFT model: the run's
    reference was the SFT model (with LoRA: the adapter disabled), and ckpt.pt holds the policy."""
    d, tok = setup
    out = d / f'out-lora{use_lora}'
    dpo(d, f'--out_dir={out}', '--max_iters=6', f'--lora_r={4 if use_lora else 0}', '--win_rate_prompts=4')
    rows = read_metrics(out / 'metrics.jsonl')
    logs, evals = [r for r in rows if 'loss' in r], [r for r in rows if 'val_loss' in r]
    assert [r['iter'] for r in logs] == list(range(6)) and [r['iter'] for r in evals] == [0, 3, 6]
    for r in logs + evals:
        assert set(KEYS) <= set(r) and 'lr' in r
    assert abs(logs[0]['loss'] - math.log(2)) < 1e-6 and abs(evals[0]['val_loss'] - math.log(2)) < 1e-6
    assert evals[0]['rewards/chosen'] == 0 and evals[0]['rewards/accuracies'] == 0.5 and evals[0]['kl'] == 0
    assert evals[-1]['rewards/accuracies'] == 1.0 and evals[-1]['rewards/margins'] > 0  # 'yes' beats 'no'
    assert evals[0]['win_rate'] == 0.5 and 0 <= evals[-1]['win_rate'] <= 1  # at step 0 the two models are one
    for f in ('ckpt.pt', 'config.json', 'loss.svg', 'README.md'):
        assert (out / f).exists()
    policy, sft = load_model(str(out))[0], load_model(str(d / 'sft'))[0]
    val = load_pairs(str(d / 'data' / 'tasks' / 'pref_val.jsonl'), tok, 65)[0]
    x, y = collate(val)
    with torch.no_grad():
        kl = (response_logps(policy, x, y) - response_logps(sft, x, y))[:len(val)].mean().item()
    assert abs(kl - evals[-1]['kl']) < 1e-4 and abs(kl) > 1e-3


@pytest.mark.parametrize('use_lora', [False, True])
def test_resume_is_exact(setup, use_lora):
    """An uninterrupted run logs exactly what a run stopped at iteration 3 and resumed does (batch_size 4 of 40
    pairs x 12 iterations: past an epoch boundary, where the data order is drawn again)."""
    d, _ = setup
    lora = [f'--lora_r={4 if use_lora else 0}']
    dpo(d, f"--out_dir={d / f'whole{use_lora}'}", '--max_iters=12', *lora)
    dpo(d, f"--out_dir={d / f'part{use_lora}'}", '--max_iters=3', *lora)
    dpo(d, f"--out_dir={d / f'part{use_lora}'}", '--init_from=resume', '--max_iters=12')
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ('time', 'ms_per_iter')} for r in rows]
    whole, part = (strip(read_metrics(d / f'{name}{use_lora}' / 'metrics.jsonl')) for name in ('whole', 'part'))
    assert len(whole) == 12 + 5 and part == whole
    with pytest.raises(SystemExit, match='already holds a trained run.*--init_from=resume.*--overwrite=True'):
        dpo(d, f"--out_dir={d / f'part{use_lora}'}", '--max_iters=3', *lora)  # a fresh run would replace it
    assert strip(read_metrics(d / f'part{use_lora}' / 'metrics.jsonl')) == whole  # untouched


def test_bad_input_is_a_clear_error(setup):
    d, _ = setup
    with pytest.raises(SystemExit, match='no preference file'):
        dpo(d, f"--out_dir={d / 'bad'}", '--train_file=nowhere/train.jsonl')
    with pytest.raises(SystemExit, match='label_smoothing'):
        dpo(d, f"--out_dir={d / 'bad'}", '--label_smoothing=0.7')
    with pytest.raises(SystemExit, match=r"lora_targets \['q_proj'\] name no Linear module"):  # lora.add_lora's checks
        dpo(d, f"--out_dir={d / 'bad'}", '--lora_r=4', '--lora_targets=c_attn,q_proj')


def test_a_diverged_run_stops_without_writing_a_checkpoint(setup, capsys):
    """A NaN val loss (here from a policy with a NaN weight: DPO's loss stays finite under a huge learning rate)."""
    d, tok = setup
    m = tiny_model()
    m.transformer.wte.weight.data[0] = float('nan')
    save_checkpoint({'model_args': asdict(m.config), 'model': m.state_dict(), 'tokenizer': tok.spec(), 'config': {}},
                    str(d / 'sft_nan' / 'ckpt.pt'))
    out = d / 'diverged'
    dpo(d, f'--out_dir={out}', '--max_iters=12', f"--init_from={d / 'sft_nan'}")
    assert 'diverged at iteration 0' in capsys.readouterr().out
    rows = read_metrics(out / 'metrics.jsonl')
    assert [r['iter'] for r in rows] == [0] and rows[0]['val_loss'] is None  # NaN is written as null
    assert not (out / 'ckpt.pt').exists()
