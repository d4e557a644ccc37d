"""rl.py (GRPO) against hand computations: group-relative advantages, the loss's two terms (no KL while the policy
is the reference; one step raises the logprob of an answer with a positive advantage), the exact KL of the evals;
and a tiny run: its first eval has kl 0 and win rate 0.5 against itself, and a resumed run repeats an uninterrupted
one exactly. Tiny models, CPU, seconds."""
import copy
import json
import math
import os
import runpy
import sys
from dataclasses import asdict

import pytest
import torch

from nanolab import synthetic as tasks
from nanolab.runs import read_metrics
from nanolab.preferences import collate_responses, token_logps
from model import GPT, GPTConfig
from nanolab.checkpoint import save_checkpoint
from nanolab.grpo import exact_kl, group_advantages, grpo_loss
from nanolab.tokenizer import CharTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RL = os.path.join(ROOT, 'rl.py')
TOK = CharTokenizer(chars=''.join(sorted(set(tasks.ALPHABET))))

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


def tiny_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=96, vocab_size=TOK.vocab_size))


def test_group_advantages_by_hand():
    a = group_advantages([1.0, 0.0, 0.5, 0.5, 1.0, 0.0, 0.0, 0.0], 4)
    # group 1: mean 0.5, population std 0.3536; group 2: mean 0.25, std 0.4330
    want = [(v - 0.5) / (math.sqrt(0.125) + 1e-4) for v in (1, 0, 0.5, 0.5)] + \
           [(v - 0.25) / (math.sqrt(0.1875) + 1e-4) for v in (1, 0, 0, 0)]
    assert a.tolist() == pytest.approx(want, rel=1e-5)
    assert group_advantages([0.5] * 4, 4).tolist() == [0.0] * 4  # nothing to learn from a group of equals


def test_the_loss_terms_and_one_step():
    policy = tiny_model()
    ref = copy.deepcopy(policy).requires_grad_(False)
    seqs = [([1, 2, 3], [4, 5]), ([1, 2, 3], [6]), ([7, 8], [9, 10, 11])]
    x, y = collate_responses(seqs)
    adv = torch.tensor([1.0, -1.0, 0.5])
    loss, s = grpo_loss(policy(x)[0], ref(x)[0], y, adv, kl_coef=0.1)
    assert s['kl'].abs().max() < 1e-7 and s['length'].tolist() == [2, 1, 3]
    logp = token_logps(policy(x)[0], y)
    want = -(adv * logp.sum(1) / torch.tensor([2.0, 1.0, 3.0])).mean()  # by hand: no KL while pi == ref
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)
    assert all(0 < e < math.log(TOK.vocab_size) + 1e-5 for e in s['entropy'].tolist())
    before = token_logps(policy(x)[0], y).sum(1).detach()
    loss.backward()
    with torch.no_grad():
        for p in policy.parameters():
            p -= 0.05 * p.grad
    after = token_logps(policy(x)[0], y).sum(1).detach()
    assert after[0] > before[0] and after[1] < before[1]  # toward the positive advantage, away from the negative
    assert exact_kl(ref, ref, x, y) == 0.0 and exact_kl(policy, ref, x, y) > 0
    loss2, s2 = grpo_loss(policy(x)[0], ref(x)[0], y, adv, kl_coef=0.1)
    assert (s2['kl'] > 0).all()  # k3 is positive once they differ


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp('rl')
    m = tiny_model()
    save_checkpoint({'model_args': asdict(m.config), 'model': m.state_dict(), 'tokenizer': TOK.spec(), 'config': {}},
                    str(d / 'sft' / 'ckpt.pt'))
    os.makedirs(d / 'data' / 'tasks')
    for split, n in (('train', 60), ('val', 8)):
        rows = [tasks.sft_row(i, a, k % 2 == 0) for k, (i, a, _) in enumerate(tasks.generate(n, split == 'val', 0))]
        (d / 'data' / 'tasks' / f'{split}.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    (d / 'data' / 'tasks' / 'meta.json').write_text('{"format": "sft"}')
    return d


def run(d, *args):
    argv = sys.argv
    sys.argv = [RL, f"--init_from={d / 'sft'}", f"--data_dir={d / 'data'}", '--device=cpu', '--prompts_per_iter=2',
                '--group_size=3', '--max_new_tokens=6', '--eval_prompts=8', '--eval_interval=3', '--log_interval=1',
                '--learning_rate=1e-3', '--warmup_iters=0', *args]
    try:
        runpy.run_path(RL, run_name='__main__')
    finally:
        sys.argv = argv


def test_run_evals_and_resumes_exactly(setup):
    d = setup
    run(setup, f"--out_dir={d / 'whole'}", '--max_iters=6')
    rows = read_metrics(d / 'whole' / 'metrics.jsonl')
    evals = [r for r in rows if 'exact_match' in r]
    assert [r['iter'] for r in evals] == [0, 3, 6]
    assert evals[0]['kl'] == 0.0 and evals[0]['win_rate'] == 0.5  # the policy starts as the reference
    assert all(k in rows[1] for k in ('loss', 'reward', 'kl', 'entropy', 'length'))
    run(setup, f"--out_dir={d / 'part'}", '--max_iters=3')
    run(setup, f"--out_dir={d / 'part'}", '--init_from=resume', '--max_iters=6')
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ('time', 'ms_per_iter')} for r in rs]
    assert strip(read_metrics(d / 'part' / 'metrics.jsonl')) == strip(rows)
    with pytest.raises(SystemExit, match='group_size=1 must be at least 2'):
        run(setup, f"--out_dir={d / 'bad'}", '--group_size=1')


def test_the_recipe_is_rl_pys_defaults():
    from nanolab.configurator import read_settings
    defaults, ns = read_settings(RL), {}
    exec(open(os.path.join(ROOT, 'configs', 'rl_tasks.py')).read(), ns)
    assert {k: v for k, v in ns.items() if k in defaults} == {k: defaults[k] for k in ns if k in defaults}


def rl_with_a_reward_model(d, name, gpt):
    """A reward model around gpt (a random head) saved as d/name, rl.py run with it as --reward for 2 steps -> (the
    reward model, the held-out rows, the SFT model's greedy answers to them, rl.py's first eval)."""
    from nanolab import metrics
    from nanolab.checkpoint import load_model
    from nanolab.reward_model import RewardModel
    torch.manual_seed(1)
    rm = RewardModel(gpt)
    torch.nn.init.normal_(rm.head.weight)
    save_checkpoint({'model_args': asdict(rm.gpt.config), 'model': rm.gpt.state_dict(), 'tokenizer': TOK.spec(),
                     'config': {}, 'reward_head': rm.head.state_dict()}, str(d / name / 'ckpt.pt'))
    run(d, f"--out_dir={d / ('with_' + name)}", '--max_iters=2', f"--reward={d / name}")
    evals = [r for r in read_metrics(d / ('with_' + name) / 'metrics.jsonl') if 'exact_match' in r]
    rows = [json.loads(line) for line in (d / 'data' / 'tasks' / 'val.jsonl').read_text().splitlines()]
    sft, tok, _ = load_model(str(d / 'sft'))
    return rm.eval(), rows, metrics.answer(sft, tok, [r['messages'][:-1] for r in rows], 6), evals[0]


def test_a_reward_model_can_be_the_reward(setup):
    """--reward=<reward.py out_dir>: the samples are scored by its head (here a random one) instead of the rule."""
    rm, rows, answers, first = rl_with_a_reward_model(setup, 'rm', tiny_model())
    want = sum(rm.score(TOK, r['messages'][:-1], [a])[0] for r, a in zip(rows, answers)) / len(rows)
    assert first['reward'] == pytest.approx(want, abs=1e-5)  # step 0: the SFT model's answers, by the head


def test_a_reward_model_with_a_shorter_context_scores_what_fits_as_its_training_did(setup):
    """A reward model whose context (16 tokens) is shorter than a prompt and its sampled answer: rl.py runs (it was a
    'sequence of 67 tokens exceeds block_size' traceback), and each answer is scored cut as reward.py's pairs are."""
    from nanolab.preferences import encode_responses
    from nanolab.reward_model import pad
    short = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=TOK.vocab_size))
    rm, rows, answers, first = rl_with_a_reward_model(setup, 'rm16', short)
    want = []
    for r, a in zip(rows, answers):  # by hand: the pair rule's cut, then the head on the last token
        p, (resp,), cut = encode_responses(TOK, r['messages'][:-1], [a], 16)
        assert cut and len(p) + len(resp) <= 16
        with torch.no_grad():
            want.append(rm(*pad([p + resp])).item())
    assert first['reward'] == pytest.approx(sum(want) / len(want), abs=1e-5)
