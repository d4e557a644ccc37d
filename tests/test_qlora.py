"""Gradient checkpointing (training.use_grad_checkpoint, --grad_checkpoint) and QLoRA (lora.quantize_base,
--quantize_base=nf4) against references: the checkpointed model's loss and gradients equal the plain one's with dropout
on, and it keeps far fewer bytes for the backward pass; the 4-bit base is 4 bits a weight, computes what its dequantized
weights compute, trains (finetune.py, dpo.py, reward.py) and exports full-precision merged weights that load as a
plain model; bad settings are one-line errors. Tiny models; CPU, a few seconds each. The QLoRA runs skip, saying why,
where bitsandbytes can't run 4-bit."""
import copy
import json
import math
import os
import sys
from dataclasses import asdict

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from model import GPT, GPTConfig
from nanolab import training
from nanolab.checkpoint import load_model, save_checkpoint
from nanolab.lora import add_lora, merged_state_dict, quantize_base, quantized_layers
from nanolab.runs import read_metrics
from nanolab.tokenizer import CharTokenizer
from nanolab.training import use_grad_checkpoint
from test_dpo import CHARS, dpo, pair, tiny_model  # tests/ is on sys.path while pytest collects it
from test_finetune import finetune, setup, tiny  # noqa: F401 (setup: the fixture of tiny SFT bases and rows)
from test_reward import run as reward
from test_train import TINY as TRAIN_TINY, data_dir, train  # noqa: F401 (data_dir: the fixture)

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py


def bnb_problem():
    """Why bitsandbytes can't run a 4-bit layer's forward and backward here, or None."""
    try:
        quantize_base(GPT(GPTConfig(n_layer=1, n_head=1, n_embd=64, vocab_size=8, block_size=8)), 'nf4')
        return None
    except Exception as e:  # the reason, whatever it is, goes into the skip
        return f'bitsandbytes cannot run 4-bit on this machine: {e}'


needs_bnb = pytest.mark.skipif(bnb_problem() is not None, reason=str(bnb_problem()))


def model(arch, dropout=0.0, n_layer=2):
    torch.manual_seed(0)
    return GPT(GPTConfig(arch=arch, n_layer=n_layer, n_head=2, n_kv_head=1 if arch == 'llama' else 0, n_embd=64,
                         block_size=64, vocab_size=50, dropout=dropout))


def batch(B=2, T=40):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 50, (B, T), generator=g), torch.randint(0, 50, (B, T), generator=g)

# -----------------------------------------------------------------------------
# gradient checkpointing


@pytest.mark.parametrize('arch,lora', [('gpt2', False), ('llama', False), ('llama', True)])
def test_grad_checkpoint_gives_the_same_loss_and_gradients(arch, lora, monkeypatch):
    plain = model(arch, dropout=0.2)
    if lora:
        plain = add_lora(plain, 4, 8.0, 0.1, 'c_attn,c_fc')  # LoRA dropout draws too
    ckpt = use_grad_checkpoint(copy.deepcopy(plain))
    assert list(ckpt.state_dict()) == list(plain.state_dict())  # nothing renamed
    calls = []
    real = training.checkpoint
    monkeypatch.setattr(training, 'checkpoint', lambda *a, **k: calls.append(1) or real(*a, **k))
    idx, y = batch()
    results = []
    for m in (plain, ckpt):
        torch.manual_seed(5)  # the same dropout masks, if the recompute replays the RNG
        loss = m(idx, y)[1]
        loss.backward()
        results.append((loss.detach(), [p.grad for p in m.parameters() if p.requires_grad]))
    assert len(calls) == 2  # one per block, training
    (l1, g1), (l2, g2) = results
    assert torch.allclose(l1, l2, atol=1e-6, rtol=0) and len(g1) == len(g2) > 0
    assert all(torch.allclose(a, b, atol=1e-6, rtol=0) for a, b in zip(g1, g2))
    # no backward can follow: no checkpoint (evals, generation, the page's traces)
    with torch.no_grad():
        assert torch.equal(ckpt.eval()(idx)[0], plain.eval()(idx)[0])
    ckpt.hidden_states(idx, trace={})
    assert len(calls) == 2
    # a copy of the wrapped model recomputes its own blocks
    again = copy.deepcopy(ckpt)
    assert all(b.forward.__self__ is b for b in again.transformer.h)


def saved_bytes(m, idx, y):
    """Bytes the forward pass keeps for the backward (torch's saved tensors, each storage once, the weights not
    counted): the activation memory, measured exactly (no allocator noise)."""
    weights = {p.untyped_storage().data_ptr() for p in m.parameters()}
    kept = {}
    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = m(idx, y)[1]
    loss.backward()
    return sum(kept.values())


def test_grad_checkpoint_keeps_a_fraction_of_the_activations():
    plain = model('llama', dropout=0.1, n_layer=4)
    idx, y = batch(4, 64)
    full, ckpt = saved_bytes(plain, idx, y), saved_bytes(use_grad_checkpoint(copy.deepcopy(plain)), idx, y)
    block_input = idx.numel() * 64 * 4  # (B, T, C) fp32: what each block still keeps
    print(f'saved for backward: {full:,} bytes plain, {ckpt:,} checkpointed ({ckpt / full:.1%})')
    assert 4 * block_input <= ckpt < full / 8  # measured: 8.2 MB -> 0.58 MB (7%)

def test_train_py_with_grad_checkpoint_repeats_the_plain_run(data_dir, tmp_path):
    """train.py with dropout: the same losses, gradient norms and weights, step for step."""
    def run(out, *extra):
        train(*TRAIN_TINY, f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=6', '--lr_decay_iters=6',
              '--eval_interval=3', '--dropout=0.1', *extra)
        return [(r['iter'], r.get('loss'), r.get('grad_norm'), r.get('val_loss'))
                for r in read_metrics(os.path.join(out, 'metrics.jsonl'))]
    plain, ckpt = run(tmp_path / 'a'), run(tmp_path / 'b', '--grad_checkpoint=True')
    close = lambda a, b: a == b or None not in (a, b) and abs(a - b) <= 1e-6
    assert len(plain) == len(ckpt) == 9 and all(close(a, b) for r, q in zip(plain, ckpt) for a, b in zip(r, q))

# -----------------------------------------------------------------------------
# QLoRA


@needs_bnb
@pytest.mark.parametrize('arch', ['gpt2', 'llama'])
def test_the_4bit_base_is_4bit_and_computes_its_dequantized_weights(arch):
    base = model(arch)
    fp32_bytes = sum(m.weight.nbytes for m in base.transformer.h.modules() if isinstance(m, torch.nn.Linear))
    q = add_lora(copy.deepcopy(base), 4, 8.0, 0.0, 'c_attn,c_proj', quantize='nf4')  # c_fc: 4-bit, no LoRA
    layers = quantized_layers(q)
    assert len(layers) == 4 * base.config.n_layer
    assert all(m.weight.dtype == torch.uint8 and not m.weight.requires_grad for _, m in layers)
    assert sum(m.weight.nbytes for _, m in layers) * 8 == fp32_bytes  # two weights a byte (plus ~3% of scales)
    assert {p.dtype for n, p in q.named_parameters() if p.requires_grad} == {torch.float32}  # A and B
    # one step trains A and B, then the merged export is a plain full-precision model with the same logits
    idx, y = batch()
    opt = torch.optim.AdamW([p for p in q.parameters() if p.requires_grad], lr=1e-2)
    q.train()
    for _ in range(2):
        q(idx, y)[1].backward()
        opt.step()
        opt.zero_grad()
    sd = merged_state_dict(q)
    assert sd.keys() == base.state_dict().keys() and all(v.dtype == torch.float32 for v in sd.values())
    plain = GPT.from_state_dict(base.config, sd)
    with torch.no_grad():
        assert torch.allclose(plain(idx)[0], q.eval()(idx)[0], atol=1e-5)
        # the base as quantized: near the original weights, not equal (at most half nf4's widest step, 0.28 of a
        # block's absmax)
        w, w4 = base.transformer.h[0].mlp.c_fc.weight, sd['transformer.h.0.mlp.c_fc.weight']
        assert 0 < (w - w4).abs().max() < 0.14 * w.abs().max()


@needs_bnb
def test_qlora_finetune_with_grad_checkpoint_learns_and_exports(setup, tmp_path):
    g = finetune(*tiny(setup, tmp_path, arch='llama'), '--lora_r=4', '--quantize_base=nf4', '--grad_checkpoint=True',
                 '--learning_rate=1e-2')
    rows = [r for r in read_metrics(tmp_path / 'metrics.jsonl') if 'val_loss' in r]
    losses = [r['loss'] for r in read_metrics(tmp_path / 'metrics.jsonl') if 'loss' in r]
    assert rows[-1]['val_loss'] < rows[0]['val_loss'] - 0.1 and losses[-1] < losses[0]
    q = g['raw_model']
    assert quantized_layers(q) and g['n_all'] == g['n_train'] + sum(p.numel() for p in load_model(setup['llama'])[0].parameters())
    merged = load_model(str(tmp_path))[0]  # what every script loads: a plain fp32 GPT
    assert all(v.dtype == torch.float32 for v in merged.state_dict().values())
    idx = batch(3, 40)[0] % merged.config.vocab_size
    with torch.no_grad():
        assert torch.allclose(merged(idx)[0], q.eval()(idx)[0], atol=1e-5)
    assert json.load(open(tmp_path / 'config.json'))['quantize_base'] == 'nf4'


@needs_bnb
def test_qlora_resume_is_exact(setup, tmp_path):
    qlora = ['--lora_r=4', '--lora_dropout=0.2', '--quantize_base=nf4', '--em_rows=0']
    finetune(*tiny(setup, tmp_path / 'a'), *qlora)
    finetune(*tiny(setup, tmp_path / 'b'), *qlora, '--max_iters=5')
    finetune(*tiny(setup, tmp_path / 'b'), '--init_from=resume', '--max_iters=8')
    curve = lambda d: [(r['iter'], r.get('loss'), r.get('val_loss')) for r in read_metrics(d / 'metrics.jsonl')
                       if r['iter'] != 5]  # b evaluated its stop at 5; a did not
    assert curve(tmp_path / 'a') == curve(tmp_path / 'b')


@pytest.fixture(scope='module')
def prefs(tmp_path_factory):
    """test_dpo.py's tiny 'SFT' run and pairs, for dpo.py and reward.py."""
    d = tmp_path_factory.mktemp('qlora-prefs')
    save_checkpoint({'model_args': asdict(tiny_model().config), 'model': tiny_model().state_dict(),
                     'tokenizer': CharTokenizer(chars=CHARS).spec(), 'config': {}}, str(d / 'sft' / 'ckpt.pt'))
    os.makedirs(d / 'data' / 'tasks')
    for split, n in (('train', range(40)), ('val', range(40, 48))):
        with open(d / 'data' / 'tasks' / f'pref_{split}.jsonl', 'w') as f:
            f.writelines(json.dumps(pair(i)) + '\n' for i in n)
    return d


@needs_bnb
@pytest.mark.parametrize('script', ['dpo', 'reward'])
def test_qlora_dpo_and_reward_learn_the_pair(prefs, script):
    out = prefs / script
    (dpo if script == 'dpo' else reward)(prefs, f'--out_dir={out}', '--max_iters=6', '--lora_r=4',
                                         '--quantize_base=nf4', '--grad_checkpoint=True')
    evals = [r for r in read_metrics(out / 'metrics.jsonl') if 'val_loss' in r]
    assert evals[0]['val_loss'] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference, reward 0
    assert evals[-1]['val_loss'] < evals[0]['val_loss']
    assert not any('absmax' in k or 'lora' in k for k in load_model(str(out))[0].state_dict())


def test_bad_quantize_settings_are_one_line_errors(setup, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match=r"quantize_base='nf5' \(from --quantize_base\) is not one of '', 'nf4'") as e:
        finetune(*tiny(setup, tmp_path), '--lora_r=4', '--quantize_base=nf5')
    assert '\n' not in str(e.value)
    with pytest.raises(SystemExit, match=r'trains LoRA adapters on a frozen 4-bit base; give --lora_r'):
        finetune(*tiny(setup, tmp_path), '--quantize_base=nf4')
    with pytest.raises(ValueError, match='run on CPU and CUDA, not mps'):
        quantize_base(model('llama'), 'nf4', 'mps')
    monkeypatch.setitem(sys.modules, 'bitsandbytes', None)  # as if not installed
    with pytest.raises(ValueError, match=r'needs bitsandbytes.*pip install bitsandbytes'):
        quantize_base(model('llama'), 'nf4')
