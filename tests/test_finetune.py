"""finetune.py against references: a hand-computed loss over the assistant's tokens only (and a zero gradient everywhere
else), the merged model against the unmerged LoRA model, peft's own loading of our adapter onto the transformers export
of the base (gpt2 and llama), an uninterrupted run against a resumed one; and bad inputs (malformed rows, unanswered
conversations, empty answers). Tiny models and data the tests make themselves; CPU, a few seconds each."""
import json
import os
import runpy
import sys
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from nanolab import synthetic as tasks
from nanolab.runs import read_metrics
from model import GPT, GPTConfig
from nanolab.checkpoint import load_model, save_checkpoint
from nanolab.tokenizer import CharTokenizer

FINETUNE = os.path.join(ROOT, 'finetune.py')
TOK = CharTokenizer(chars=''.join(sorted(set(tasks.ALPHABET))))


def make_base(path, arch='gpt2'):
    """A random tiny model with the tasks suite's char tokenizer, saved as a nanolab run."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(arch=arch, n_layer=2, n_head=2, n_kv_head=1 if arch == 'llama' else 0, n_embd=32,
                      block_size=96, vocab_size=TOK.vocab_size, tie_embeddings=arch == 'gpt2'))
    save_checkpoint({'model_args': asdict(m.config), 'model': m.state_dict(), 'tokenizer': TOK.spec()},
                    os.path.join(path, 'ckpt.pt'))
    return str(path)


def write_rows(path, rows):
    with open(path, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in rows)
    return str(path)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp('ft')
    rows = [tasks.sft_row(i, a, k % 3 == 0) for k, (i, a, _) in enumerate(tasks.generate(120, False, 0))]
    return {'gpt2': make_base(d / 'gpt2'), 'llama': make_base(d / 'llama', 'llama'),
            'data': write_rows(d / 'sft.jsonl', rows)}


def finetune(*args):
    """Run finetune.py in this process, as `python finetune.py args`; return its globals."""
    argv = sys.argv
    sys.argv = [FINETUNE, *args]
    try:
        return runpy.run_path(FINETUNE, run_name='__main__')
    finally:
        sys.argv = argv


def tiny(setup, out, *extra, arch='gpt2'):
    return [f'--init_from={setup[arch]}', f'--dataset={setup["data"]}', f'--out_dir={out}', '--device=cpu',
            '--batch_size=8', '--eval_iters=2', '--eval_interval=4', '--log_interval=1', '--em_rows=8',
            '--em_max_new_tokens=8', '--max_iters=8', '--warmup_iters=2', '--lr_decay_iters=8', '--val_fraction=0.2', *extra]


def test_loss_and_gradient_come_from_the_assistant_tokens_only(setup, tmp_path):
    g = finetune(*tiny(setup, tmp_path), '--eval_only=True', '--em_rows=0')
    model, data = g['raw_model'], g['train_data']
    X, Y = g['get_batch'](data, [0, 1, 2, 3])  # right-padded to the longest of the four
    logits = model(X)[0].detach().requires_grad_(True)
    _, loss = model(X, Y)
    # 1) the loss: cross-entropy averaged over the positions whose next token is the assistant's, by hand
    picked = []
    for b in range(4):
        ids, mask = TOK.render_chat(g['train_rows'][b]['messages'])
        picked += [(b, t, ids[t + 1]) for t in range(len(ids) - 1) if mask[t + 1]]
    by_hand = torch.stack([-F.log_softmax(logits[b, t], -1)[y] for b, t, y in picked]).mean()
    assert torch.allclose(loss, by_hand, atol=1e-5)
    assert len(picked) == int((Y != -1).sum()) < Y.numel() / 2  # prompts and padding are most of the batch
    # 2) the gradient reaches no logit outside those positions
    F.cross_entropy(logits.view(-1, logits.size(-1)), Y.view(-1), ignore_index=-1).backward()
    grad_rows = logits.grad.abs().sum(-1) > 0
    assert torch.equal(grad_rows, Y != -1)
    # 3) the padding: other filler ids change neither the loss nor any weight's gradient
    def grads(x):
        model.zero_grad()
        l = model(x, Y)[1]
        l.backward()
        return l.detach(), [p.grad.clone() for p in model.parameters()]
    pad = torch.tensor([len(x) for x, _ in (data[i] for i in range(4))])[:, None] <= torch.arange(X.size(1))
    l1, g1 = grads(X)
    l2, g2 = grads(torch.where(pad, torch.randint_like(X, TOK.vocab_size), X))
    assert pad.any() and torch.equal(l1, l2) and all(torch.allclose(a, b, atol=1e-7) for a, b in zip(g1, g2))


def test_truncation_keeps_the_start_and_drops_conversations_without_an_answer(setup, tmp_path):
    long_prompt = 'What is box? ' * 8  # 104 chars: with the template, past block_size=64
    rows = [tasks.sft_row(f'Reverse ab{c}', f'{c}ba', False) for c in 'cdefghijklmn'] + \
           [tasks.sft_row(long_prompt + c, 'x', False) for c in 'abc'] + \
           [tasks.sft_row(f'Sort {c}cba', 'abcd' * 10, False) for c in 'defg']  # the answer starts inside the block
    path = write_rows(tmp_path / 'long.jsonl', rows)
    g = finetune(*tiny(setup, tmp_path / 'out'), f'--dataset={path}', '--block_size=64', '--eval_only=True', '--em_rows=0')
    total = g['counts']['train_truncated'] + g['counts']['val_truncated']
    dropped = g['counts']['train_dropped_no_answer_in_block'] + g['counts']['val_dropped_no_answer_in_block']
    assert total == 7 and dropped == 3
    kept = [x for x, _ in g['train_data'] + g['val_data']]
    assert max(map(len, kept)) == 64 and sum(len(x) == 64 for x in kept) == 4
    ids, _ = TOK.render_chat(rows[-1]['messages'])
    assert ids[:64] in kept  # the start of the conversation is what stays


@pytest.mark.parametrize('arch', ['gpt2', 'llama'])
def test_lora_merged_checkpoint_and_peft_adapter_match(setup, tmp_path, arch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    targets = 'c_attn,c_proj,c_fc' + (',lm_head' if arch == 'llama' else '')
    g = finetune(*tiny(setup, tmp_path, arch=arch), '--lora_r=4', '--lora_alpha=8', f'--lora_targets={targets}',
                 '--learning_rate=1e-2')
    # 1) the share of trainable parameters: r * (in + out) per adapted Linear
    c = g['raw_model'].config
    kv = c.n_kv_head * c.head_size
    per_layer = 4 * ((c.n_embd + c.n_embd + 2 * kv) + 2 * c.n_embd) + 4 * ((c.n_embd + c.ffn_hidden * (2 if arch == 'llama' else 1)) + (c.ffn_hidden + c.n_embd))
    expected = c.n_layer * per_layer + (4 * (c.n_embd + c.vocab_size) if arch == 'llama' else 0)
    assert g['n_train'] == expected and g['n_all'] == expected + sum(p.numel() for p in load_model(setup[arch])[0].parameters())
    # 2) the merged checkpoint that every script loads == the unmerged LoRA model, and differs from the base
    idx = torch.randint(0, TOK.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    merged, tok, _ = load_model(str(tmp_path))
    lora_logits = g['raw_model'].eval()(idx)[0]
    assert torch.allclose(merged(idx)[0], lora_logits, atol=1e-5)
    assert not torch.allclose(load_model(setup[arch])[0](idx)[0], lora_logits, atol=1e-3)
    # 3) peft loads our adapter onto the transformers export of the base, with the same logits
    cfg = json.load(open(tmp_path / 'adapter' / 'adapter_config.json'))
    assert cfg['base_model_name_or_path'] == str(tmp_path / 'base_hf') and cfg['fan_in_fan_out'] == (arch == 'gpt2')
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg['base_model_name_or_path']),
                                   str(tmp_path / 'adapter')).eval()
    assert torch.allclose(hf(idx).logits, lora_logits, atol=1e-4)
    assert read_metrics(tmp_path / 'metrics.jsonl')[-1].keys() >= {'val_loss', 'exact_match'}


@pytest.mark.parametrize('lora', [False, True])
def test_resume_is_exact(setup, tmp_path, lora):
    extra = ['--lora_r=4', '--lora_dropout=0.2'] if lora else []
    finetune(*tiny(setup, tmp_path / 'a'), *extra)
    finetune(*tiny(setup, tmp_path / 'b'), *extra, '--max_iters=5')
    finetune(*tiny(setup, tmp_path / 'b'), '--init_from=resume', '--max_iters=8')
    def curve(d):
        return [(r['iter'], r.get('loss'), r.get('grad_norm'), r.get('val_loss')) for r in read_metrics(d / 'metrics.jsonl')
                if r['iter'] != 5]  # b evaluated its stop at 5; a did not
    assert curve(tmp_path / 'a') == curve(tmp_path / 'b')
    a, b = (load_model(str(tmp_path / d))[0].state_dict() for d in 'ab')
    assert all(torch.equal(a[k], b[k]) for k in a)
    if lora:  # a trained adapter's shape can't change on resume
        with pytest.raises(SystemExit, match="lora_r=8 differs from the checkpoint's 4"):
            finetune(*tiny(setup, tmp_path / 'b'), '--init_from=resume', '--lora_r=8')
    with pytest.raises(SystemExit, match='already holds a trained run.*--init_from=resume.*--overwrite=True'):
        finetune(*tiny(setup, tmp_path / 'b'), *extra)  # a fresh run into b would replace it
    assert curve(tmp_path / 'b') == curve(tmp_path / 'a')  # untouched


def test_bad_input_is_an_error_naming_file_and_row_or_a_counted_skip(setup, tmp_path, capsys):
    good = [tasks.sft_row(f'Reverse ab{c}', f'{c}ba', False) for c in 'cdefghijklmn']
    cases = {'missing': ({'instruction': 'Reverse abc'}, 'row 3: an SFT row needs'),
             'last_turn': ({'messages': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'hey'},
                                         {'role': 'user', 'content': 'and?'}]}, "row 3: the last turn is the user's")}
    for name, (bad, message) in cases.items():
        path = write_rows(tmp_path / f'{name}.jsonl', good[:2] + [bad] + good)
        with pytest.raises(SystemExit, match=message) as e:
            finetune(*tiny(setup, tmp_path / name), f'--dataset={path}', '--eval_only=True')
        assert path in str(e.value)
    # an empty answer is skipped, counted and reported
    path = write_rows(tmp_path / 'empty.jsonl', good + [tasks.sft_row('Reverse abc', ' ', False)])
    g = finetune(*tiny(setup, tmp_path / 'empty'), f'--dataset={path}', '--eval_only=True', '--em_rows=0')
    assert len(g['train_rows']) + len(g['val_rows']) == len(good) and "skipped {'skipped_empty': 1}" in capsys.readouterr().err
    # LoRA target modules that the model does not have: the error lists the ones it has
    with pytest.raises(SystemExit, match=r"lora_targets \['q_proj'\] name no Linear module.*'c_attn', 'c_fc', 'c_proj', 'lm_head'"):
        finetune(*tiny(setup, tmp_path / 'lora'), '--lora_r=4', '--lora_targets=c_attn,q_proj', '--eval_only=True')
    with pytest.raises(SystemExit, match='tie_embeddings'):
        finetune(*tiny(setup, tmp_path / 'lora'), '--lora_r=4', '--lora_targets=lm_head', '--eval_only=True')


def test_recipes_are_valid_and_the_default_is_sft_tasks():
    from nanolab.configurator import configure, read_settings
    defaults = read_settings(FINETUNE)
    for name in ('sft_tasks', 'sft_tasks_lora', 'sft_alpaca', 'sft_lora'):  # unknown keys, wrong types: errors
        configure(dict(defaults, __file__=FINETUNE), argv=[os.path.join(ROOT, 'configs', f'{name}.py')], verbose=False)
    ns = {}  # `python finetune.py` with no arguments runs configs/sft_tasks.py
    exec(open(os.path.join(ROOT, 'configs', 'sft_tasks.py')).read(), ns)
    assert {k: v for k, v in ns.items() if k in defaults} == {k: defaults[k] for k in ns if k in defaults}


def test_a_diverged_run_stops_without_writing_a_checkpoint(setup, tmp_path, capsys):
    """A NaN val loss (from a base with a NaN weight; a huge learning rate only gave huge finite losses here)."""
    base = load_model(setup['gpt2'])[0]
    base.transformer.wte.weight.data[0] = float('nan')
    save_checkpoint({'model_args': asdict(base.config), 'model': base.state_dict(), 'tokenizer': TOK.spec()},
                    str(tmp_path / 'nan' / 'ckpt.pt'))
    out = tmp_path / 'diverged'
    finetune(*tiny(setup, out), f"--init_from={tmp_path / 'nan'}", '--em_rows=0', '--lora_r=4')
    assert 'diverged at iteration 0' in capsys.readouterr().out
    rows = read_metrics(out / 'metrics.jsonl')
    assert [r['iter'] for r in rows] == [0] and rows[0]['val_loss'] is None  # NaN is written as null
    assert not (out / 'ckpt.pt').exists() and not (out / 'adapter').exists()


def test_mlflow_gets_every_metrics_row(setup, tmp_path, monkeypatch):
    """finetune.py (and dpo.py, reward.py, rl.py: the same training.start_loop) log to MLflow as train.py does."""
    mlflow = pytest.importorskip('mlflow')
    monkeypatch.setenv('MLFLOW_TRACKING_URI', (tmp_path / 'mlruns').as_uri())
    monkeypatch.setenv('MLFLOW_ALLOW_FILE_STORE', 'true')
    finetune(*tiny(setup, tmp_path / 'sft'), '--mlflow_log=True')
    client = mlflow.tracking.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name('nanolab').experiment_id])
    rows = read_metrics(tmp_path / 'sft' / 'metrics.jsonl')
    for key in ('loss', 'val_loss', 'exact_match'):
        want = [(r['iter'], r[key]) for r in rows if key in r]
        assert sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)) == want and want, key
    assert 'README.md' in {a.path for a in client.list_artifacts(run.info.run_id)}
