"""A real model's life in nanolab, end to end, on a tiny random Qwen2 that transformers builds and saves with a ChatML
tokenizer of its own (tokenizer.json, a Jinja chat template, generation_config.json with two end ids): the chat
prompt equals apply_chat_template's, the server answers /v1/chat/completions with that prompt and stops at the
template's end token, sample.py --chat talks to it, finetune.py trains LoRA on chat rows with its template, and the
result exports back to a directory that transformers loads with the same logits and the same chat template."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nanolab.checkpoint import load_model
from nanolab.generation import generate
from nanolab.tokenizer import HFTokenizer

transformers = pytest.importorskip('transformers')
transformers.logging.set_verbosity_error()

CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
          "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = ['hello world, how are you today?', 'the quick brown fox jumps over the lazy dog',
        'You are a helpful assistant. Answer briefly.', 'Paris is the capital of France.']
CHAT = [{'role': 'user', 'content': 'the capital of France?'}]


@pytest.fixture(scope='module')
def real(tmp_path_factory):
    """A Hugging Face directory as the hub serves one: Qwen2 weights, tokenizer.json, chat template, end ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    d = tmp_path_factory.mktemp('qwen2-tiny')
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator(TEXT * 4, trainers.BpeTrainer(
        vocab_size=360, special_tokens=['<|endoftext|>', '<|im_start|>', '<|im_end|>'], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, chat_template=CHATML, eos_token='<|im_end|>',
                                                  pad_token='<|endoftext|>')
    hf_tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=tk.get_vocab_size(),
                                   max_position_embeddings=256, tie_word_embeddings=True,
                                   eos_token_id=[tk.token_to_id('<|im_end|>'), tk.token_to_id('<|endoftext|>')])
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    model.save_pretrained(d)  # config.json, model.safetensors, generation_config.json (the two end ids)
    return d, model, hf_tok


def test_chat_prompt_and_end_tokens_are_the_models_own(real):
    d, _, hf_tok = real
    tok = HFTokenizer(str(d))
    ids, mask = tok.render_chat(CHAT, add_generation_prompt=True)
    assert ids == hf_tok.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert not any(mask)  # no assistant content yet
    assert set(tok.chat_stop_tokens) == {hf_tok.convert_tokens_to_ids('<|im_end|>'),
                                         hf_tok.convert_tokens_to_ids('<|endoftext|>')}


def test_server_chat_uses_the_template_and_its_end_tokens(real):
    from test_serve import call, serving
    d, _, hf_tok = real
    model, tok, _ = load_model(str(d))
    prompt = hf_tok.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=False)
    want = generate(model, prompt, 12, temperature=0.0, stop_tokens=tok.chat_stop_tokens, tokenizer=tok)[0]
    with serving(d, source=d) as srv:
        status, body = call(srv, 'POST', '/v1/chat/completions',
                            {'messages': CHAT, 'max_tokens': 12, 'temperature': 0})
    assert status == 200, body
    assert body['usage']['prompt_tokens'] == len(prompt)
    assert body['choices'][0]['message']['content'] == want.text


def test_sample_chat_repl_talks_to_it(real):
    d, _, _ = real
    r = subprocess.run([sys.executable, 'sample.py', f'--init_from={d}', '--chat=True', '--max_new_tokens=8',
                        '--device=cpu'], cwd=ROOT, input='hello\n/exit\n', capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_lora_finetune_on_chat_rows_then_export_to_transformers(real, tmp_path):
    d, _, hf_tok = real
    rows = [{'messages': [{'role': 'user', 'content': t}, {'role': 'assistant', 'content': TEXT[(i + 1) % 4]}]}
            for i, t in enumerate(TEXT * 6)]
    data = tmp_path / 'chat.jsonl'
    data.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    out = tmp_path / 'ft'
    r = subprocess.run([sys.executable, 'finetune.py', f'--init_from={d}', f'--dataset={data}', f'--out_dir={out}',
                        '--device=cpu', '--lora_r=4', '--batch_size=4', '--max_iters=6', '--eval_interval=3',
                        '--eval_iters=1', '--em_rows=0', '--warmup_iters=1', '--lr_decay_iters=6',
                        '--val_fraction=0.2', '--log_interval=1'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    tuned, tok, _ = load_model(str(out))
    assert tuned.config.qkv_bias and tok.chat_template is not None  # the template travels with the checkpoint
    r = subprocess.run([sys.executable, 'export.py', f'--init_from={out}', '--format=hf', f'--out={tmp_path / "hf"}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'hf').eval()
    back_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / 'hf')
    ids = hf_tok.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert back_tok.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=False) == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (back(x).logits - tuned(x)[0]).abs().max().item() <= 1e-4


def test_a_lora_base_stored_in_bf16_stays_bf16_where_the_cpu_has_it(real, tmp_path, monkeypatch):
    """Half the memory for the frozen weights; the adapters train in fp32 and the loss falls."""
    import runpy

    from nanolab import device
    monkeypatch.setattr(device, 'cpu_has_bf16', lambda: True)
    d, model, hf_tok = real
    model.to(torch.bfloat16).save_pretrained(tmp_path / 'bf16')
    hf_tok.save_pretrained(tmp_path / 'bf16')
    model.float()
    rows = [{'messages': [{'role': 'user', 'content': t}, {'role': 'assistant', 'content': 'Paris.'}]}
            for t in TEXT * 6]
    (tmp_path / 'chat.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    argv = sys.argv
    sys.argv = ['finetune.py', f'--init_from={tmp_path / "bf16"}', f'--dataset={tmp_path / "chat.jsonl"}',
                f'--out_dir={tmp_path / "ft"}', '--device=cpu', '--lora_r=4', '--batch_size=4', '--max_iters=8',
                '--eval_interval=8', '--eval_iters=1', '--em_rows=0', '--warmup_iters=1', '--lr_decay_iters=8',
                '--val_fraction=0.2', '--learning_rate=3e-2', '--log_interval=1']
    try:
        g = runpy.run_path(os.path.join(ROOT, 'finetune.py'), run_name='__main__')
    finally:
        sys.argv = argv
    params = dict(g['raw_model'].named_parameters())
    frozen = [p for n, p in params.items() if 'lora' not in n]
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in frozen), [(n, p.dtype, p.requires_grad) for n, p in params.items() if "lora" not in n][:6]
    assert all(p.dtype == torch.float32 and p.requires_grad for n, p in params.items() if "lora" in n), [(n, p.dtype, p.requires_grad) for n, p in params.items() if "lora" in n][:4]
    losses = [json.loads(line)['loss'] for line in open(tmp_path / 'ft' / 'metrics.jsonl') if '"loss"' in line]
    assert losses[-1] < losses[0]
