"""reward.py against references: the Bradley-Terry loss and accuracy by hand; the head reads each row's last token
(padding changes no reward); a run starts at exactly log 2 and learns an easy preference; an uninterrupted run
against a resumed one; load_reward_model scores as the run's own evaluation did. Tiny models, CPU, seconds."""
import json
import math
import os
import runpy
import sys
from dataclasses import asdict

import pytest
import torch

from nanolab.runs import read_metrics
from model import GPT, GPTConfig
from nanolab.checkpoint import save_checkpoint
from nanolab.reward_model import RewardModel, bt_loss, collate, load_reward_model, pad
from nanolab.tokenizer import CharTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REWARD = os.path.join(ROOT, 'reward.py')
CHARS = 'abcdefghijklmnopqrstuvwxyz0123456789 +=?:.\nSUA'
TINY = ['--device=cpu', '--batch_size=4', '--eval_interval=3', '--log_interval=1', '--warmup_iters=0',
        '--learning_rate=3e-3', '--min_lr=3e-3', '--lr_schedule=constant']

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


def tiny_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=len(CHARS)))


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp('reward')
    tok = CharTokenizer(chars=CHARS)
    save_checkpoint({'model_args': asdict(tiny_model().config), 'model': tiny_model().state_dict(),
                     'tokenizer': tok.spec(), 'config': {}}, str(d / 'sft' / 'ckpt.pt'))
    os.makedirs(d / 'data' / 'tasks')
    for split, n in (('train', range(40)), ('val', range(40, 48))):
        with open(d / 'data' / 'tasks' / f'pref_{split}.jsonl', 'w') as f:
            f.writelines(json.dumps({'prompt': [{'role': 'user', 'content': f'is {i} + {i} = {2 * i}?'}],
                                     'chosen': 'yes', 'rejected': 'no'}) + '\n' for i in n)
    return d, tok


def run(d, *args):
    argv = sys.argv
    sys.argv = [REWARD, f"--init_from={d / 'sft'}", f"--data_dir={d / 'data'}", '--dataset=tasks', '--eval_pairs=0',
                *TINY, *args]
    try:
        runpy.run_path(REWARD, run_name='__main__')
    finally:
        sys.argv = argv


def test_bradley_terry_loss_by_hand():
    rc, rr = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.5, 0.0, 1.0])
    losses, s = bt_loss(rc, rr)
    want = [-math.log(1 / (1 + math.exp(-d))) for d in (1.5, 0.0, -2.0)]
    assert losses.tolist() == pytest.approx(want)
    assert s['accuracy'].tolist() == [1.0, 0.5, 0.0] and s['margin'].tolist() == [1.5, 0.0, -2.0]


def test_the_head_reads_each_rows_last_token():
    rm = RewardModel(tiny_model()).eval()
    torch.nn.init.normal_(rm.head.weight)
    seqs = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    x, last = pad(seqs)
    assert last.tolist() == [2, 5, 0]
    with torch.no_grad():
        batched = rm(x, last)
        alone = [rm(torch.tensor([s]), torch.tensor([len(s) - 1])).item() for s in seqs]
        h = rm.gpt.hidden_states(torch.tensor([seqs[1]]))[0, -1]  # by hand: the last hidden state through the head
    assert batched.tolist() == pytest.approx(alone, abs=1e-5)
    assert batched[1].item() == pytest.approx((rm.head.weight[0] @ h + rm.head.bias[0]).item(), abs=1e-5)
    x, last = collate([([1, 2], [3], [4, 5]), ([6], [7, 8], [9])])
    assert x.shape == (4, 4) and last.tolist() == [2, 2, 3, 1]  # chosen rows (p+c), then rejected (p+r)


def test_run_learns_resumes_exactly_and_loads(setup):
    d, tok = setup
    run(d, f"--out_dir={d / 'whole'}", '--max_iters=12')
    rows = read_metrics(d / 'whole' / 'metrics.jsonl')
    evals = [r for r in rows if 'val_loss' in r]
    assert evals[0]['val_loss'] == pytest.approx(math.log(2), abs=1e-7) and evals[0]['accuracy'] == 0.5  # zero head
    assert evals[-1]['accuracy'] == 1.0 and evals[-1]['margin'] > 0  # 'yes' over 'no' is easy
    run(d, f"--out_dir={d / 'part'}", '--max_iters=5')
    run(d, f"--out_dir={d / 'part'}", '--init_from=resume', '--max_iters=12')
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ('time', 'ms_per_iter')} for r in rs if r['iter'] != 5 or 'loss' in r]
    assert strip(read_metrics(d / 'part' / 'metrics.jsonl')) == strip(rows)
    rm, tok2 = load_reward_model(str(d / 'whole'))
    prompt = [{'role': 'user', 'content': 'is 40 + 40 = 80?'}]
    r_yes, r_no = rm.score(tok2, prompt, ['yes', 'no'])
    assert r_yes > r_no
    with pytest.raises(SystemExit, match='already holds a trained run'):
        run(d, f"--out_dir={d / 'whole'}", '--max_iters=3')
    with pytest.raises(ValueError, match='not a reward model'):
        load_reward_model(str(d / 'sft'))


def test_the_recipe_is_reward_pys_defaults():
    from nanolab.configurator import read_settings
    defaults, ns = read_settings(REWARD), {}
    exec(open(os.path.join(ROOT, 'configs', 'reward_tasks.py')).read(), ns)
    assert {k: v for k, v in ns.items() if k in defaults} == {k: defaults[k] for k in ns if k in defaults}


def test_lora_reward_model(setup):
    """LoRA on the transformer, the head whole: it learns the pair too, and its checkpoint holds merged weights."""
    d, tok = setup
    run(d, f"--out_dir={d / 'lora'}", '--max_iters=9', '--lora_r=4')
    evals = [r for r in read_metrics(d / 'lora' / 'metrics.jsonl') if 'val_loss' in r]
    assert evals[0]['val_loss'] == pytest.approx(math.log(2), abs=1e-7) and evals[-1]['accuracy'] == 1.0
    rm, tok2 = load_reward_model(str(d / 'lora'))  # a plain GPT: no LoRA layers left
    assert not any('lora' in k for k in rm.state_dict())
    r_yes, r_no = rm.score(tok2, [{'role': 'user', 'content': 'is 41 + 41 = 82?'}], ['yes', 'no'])
    assert r_yes > r_no
