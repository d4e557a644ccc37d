"""
Sample from a trained model: stream text, compare decoding strategies side by side, chat, or show
each token's probability. nanoGPT's sample.py, on nanolab's one decoding engine.

    python sample.py --init_from=out-shakespeare-char --device=cpu --start="ROMEO:"  # CPU, streams
    # one GPU (bf16 auto); then a hub model (online), decoding strategies side by side
    python sample.py --init_from=out-shakespeare-char --device=cuda --start=FILE:prompt.txt
    python sample.py --init_from=gpt2 --start="The meaning of life" \
        --compare=greedy,beam,top_p,min_p
    python sample.py --init_from=out-shakespeare-char --show_probs=True --max_new_tokens=20
    python sample.py --init_from=out-sft --chat=True  # multi-turn chat REPL
    python sample.py --help                           # every setting

The same seeded request gives the same text from this CLI, `generate` and the server (sample k
draws with seed + k). As a library, this file exposes the engine's Python API, which lives in
nanolab/generation.py:

    from sample import generate
    out = generate(model, ids, max_new_tokens=50, temperature=0.8, seed=7, tokenizer=tok)
    out[0].text, out[0].finish_reason, out[0].token_logprobs   # a Completion per prompt and sample

Importing sample.py does nothing else: the command line's code sits in functions under main().
"""
import json
import math
import sys

from nanolab import prompts
from nanolab.checkpoint import load_model
from nanolab.configurator import cli_errors, configure
from nanolab.device import DTYPES, resolve_device
from nanolab.engine import compiled
from nanolab.generation import Completion, generate, generate_stream  # noqa: F401 (exported)
from nanolab.quantize import QUANTIZE, for_inference

# -----------------------------------------------------------------------------
# the command line (nanoGPT's sample.py names)
init_from = 'out-shakespeare-char'  # model source: out_dir, ckpt.pt, Hugging Face dir, or hub name like 'gpt2'
start = "\n"                  # prompt text, or FILE:path to read it from a file; '' = start from the eot token
template = ''                 # a prompt template instead of start (the library: python -c "from nanolab import prompts; print(list(prompts.TEMPLATES))")
variables = ''                # the template's values: a JSON object ('{"text": "..."}'), or FILE:path of one
cot = False                   # the template's chain-of-thought cue, where it has one
num_samples = 10              # samples to draw, one after another, with seeds seed, seed+1, ...
max_new_tokens = 500          # new tokens per sample
temperature = 0.8             # 0 = greedy; < 1 sharper, > 1 more random
top_k = 200                   # keep the k likeliest tokens; 0 = off
top_p = 1.0                   # nucleus: keep the smallest set with mass >= top_p; 1.0 = off
min_p = 0.0                   # drop tokens with p < min_p * p_max; 0 = off
repetition_penalty = 1.0      # CTRL penalty on tokens already seen (prompt too); 1.0 = off, 1.1-1.3 typical
presence_penalty = 0.0        # OpenAI: subtracted from every token already generated; [-2, 2]
frequency_penalty = 0.0       # OpenAI: subtracted once per occurrence in the output; [-2, 2]
num_beams = 1                 # > 1 = beam search (deterministic: temperature/top_k/top_p/min_p are ignored)
length_penalty = 1.0          # beam score = sum logprob / length**length_penalty; > 1 favours longer
stop = ''                     # one stop string ('' = none; eot always stops). A newline: --stop="'\n'"
json_schema = ''              # the text follows this JSON schema (constrained decoding, nanolab/grammar.py): its JSON, or FILE:path of one
grammar = ''                  # ... or this grammar, in llguidance's Lark (start: "yes" | "no"): its text, or FILE:path of one
seed = 1337                   # sample k draws with seed + k (engine.py's seeding rule), as the server's sample k
device = 'auto'               # auto | cpu | cuda | cuda:N | mps
dtype = 'auto'                # auto (bf16 on GPU; CPU: a bf16 model's bf16 if the CPU has bf16, else fp32) | float32 | bfloat16 | float16
quantize = ''                 # '' (off) | int8 | int4: weights quantized for CPU decoding, as serve.py's --quantize (quantize.py)
compile = False               # torch.compile the decode steps (prefill eager; 10-40 s to compile): int8 batch-1 steps 1.15-2x faster (bench.py --which=decode_profile)
use_cache = True              # KV cache; False recomputes the whole context every step (slow reference path)
chat = False                  # multi-turn chat REPL on stdin (a chat-tuned model); /exit or Ctrl-D quits
show_probs = False            # print each new token with its probability and the top-5 alternatives
compare = ''                  # comma list of PRESETS run side by side on the same prompt and seed, e.g. greedy,beam,top_p
# -----------------------------------------------------------------------------
CHOICES = {'dtype': DTYPES, 'quantize': QUANTIZE}

# --compare presets: each replaces the sampling flags; max_new_tokens, stop and seed still come
# from the flags
PRESETS = {
    'greedy': dict(temperature=0.0),
    'beam': dict(temperature=0.0, num_beams=4),
    'temperature': dict(temperature=0.8),
    # GPT-2's samples used k=40 (Radford et al. 2019)
    'top_k': dict(temperature=1.0, top_k=40),
    'top_p': dict(temperature=1.0, top_p=0.9),                      # Holtzman et al. 2019
    'min_p': dict(temperature=1.0, min_p=0.1),                      # Nguyen et al. 2024
    # greedy + CTRL penalty (Keskar et al. 2019)
    'repetition': dict(temperature=0.0, repetition_penalty=1.3),
}

def _file_or_text(value, what, flag):
    """A flag's text, or with FILE:path the file's (what names it in the error)."""
    if not value.startswith('FILE:'):
        return value
    try:
        return open(value[5:], encoding='utf-8').read()
    except OSError as e:
        raise ValueError(f"cannot read the {what} file {value[5:]} "
                         f"({e.strerror}); check --{flag}=FILE:path") from None

def _chat_stops(opts, tok):
    """opts for a reply in the chat template: it ends at the end of its turn."""
    return dict(opts, stop_tokens=set(tok.chat_stop_tokens),
                stop_strings=tok.stop_strings + opts['stop_strings'])

def _prompt_ids(tok):
    # prompts.py: a text template is encoded, a chat one rendered with the chat template
    if template:
        raw = _file_or_text(variables, 'variables', 'variables')
        try:
            values = json.loads(raw) if raw.strip() else {}
        except ValueError as e:
            raise ValueError(f"--variables must be a JSON object or FILE:path of one ({e}); e.g. "
                             f"--variables='{{\"text\": \"...\"}}'") from None
        if not isinstance(values, dict):
            raise ValueError("--variables must be a JSON object of the template's values")
        try:
            return prompts.prompt_ids(tok, template, values, cot)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
    text = _file_or_text(start, 'prompt', 'start')
    # '': unconditional, as GPT-2
    ids = [tok.eot] if text == '' and tok.eot is not None else tok.encode(text)
    if not ids:
        raise ValueError("the prompt encodes to no tokens; give --start=TEXT")
    return ids

def _chat(model, tok, opts):
    """A REPL: the whole history is rendered with the chat template each turn; the reply stops at
    end-of-turn."""
    messages = []
    opts = _chat_stops(opts, tok)
    print('chat: type a message; /exit or Ctrl-D quits', file=sys.stderr)
    while True:
        try:
            line = input('> ')
        except EOFError:
            break
        if line.strip() == '/exit':
            break
        messages.append({'role': 'user', 'content': line})
        ids, _ = tok.render_chat(messages, add_generation_prompt=True)
        reply = ''
        for ev in generate_stream(model, ids, max_new_tokens, seed=seed + len(messages), **opts):
            print(ev.text_delta, end='', flush=True)
            reply += ev.text_delta
        print()
        messages.append({'role': 'assistant', 'content': reply})

def main():
    configure(globals(), choices=CHOICES)
    presets = [n.strip() for n in compare.split(',') if n.strip()]
    if any(n not in PRESETS for n in presets):
        raise ValueError("unknown --compare preset(s) "
                         f"{[n for n in presets if n not in PRESETS]}; "
                         f"choose from {','.join(PRESETS)}")
    dev = resolve_device(device)
    model, tok, _ = load_model(init_from, dev, dtype)  # 'auto': as device.resolve_dtype
    # quantized weights or the CPU linears' kernel, an explicit inference-time swap (quantize.py)
    model = for_inference(model, quantize, report=True)
    if tok is None:
        raise ValueError(f"{init_from} comes without a tokenizer, so the prompt cannot be "
                         "encoded; use a source with tokenizer files (a nanolab out_dir, or a "
                         "Hugging Face dir with tokenizer.json)")
    if compile:
        model = compiled(model)
    opts = {k: globals()[k] for k in ('temperature', 'top_k', 'top_p', 'min_p',
                                      'repetition_penalty', 'presence_penalty',
                                      'frequency_penalty', 'num_beams', 'length_penalty',
                                      'use_cache')}
    opts.update(stop_strings=[stop] if stop else [], tokenizer=tok,
                json_schema=_file_or_text(json_schema, 'JSON schema', 'json_schema') or None,
                grammar=_file_or_text(grammar, 'grammar', 'grammar') or None)
    if chat:
        return _chat(model, tok, opts)
    ids = _prompt_ids(tok)
    if template:
        # a chat template's reply ends at the end of its turn, as in --chat
        if prompts.is_chat(template):
            opts = _chat_stops(opts, tok)
    for name in presets:  # --compare: one labelled block per strategy, same prompt, same seed
        neutral = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, num_beams=1,
                       repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)
        c = generate(model, ids, max_new_tokens, seed=seed,
                     **{**opts, **neutral, **PRESETS[name]})[0]
        print(f"==== {name} ({', '.join(f'{k}={v}' for k, v in PRESETS[name].items())}) | mean "
              f"logprob {c.logprob / max(1, len(c.tokens)):.3f}, finish: {c.finish_reason} "
              f"====\n{tok.decode(ids)}{c.text}\n")
    # beam search is deterministic: once
    for k in range(0 if presets else 1 if num_beams > 1 else num_samples):
        print('' if show_probs else tok.decode(ids), end='', flush=True)
        for ev in generate_stream(model, ids, max_new_tokens, seed=seed + k,
                                  logprobs=5 if show_probs else 0, **opts):
            # the token, its probability, and the 5 likeliest
            if show_probs and ev.token is not None:
                alts = '  '.join(f'{tok.decode([t])!r} '
                                 f'{math.exp(lp):.3f}' for t, lp in ev.top_logprobs)
                print(f'{tok.decode([ev.token])!r:>14} '
                      f'p={math.exp(ev.logprob):.3f}   top-5: {alts}', flush=True)
            elif not show_probs:
                print(ev.text_delta, end='', flush=True)
        print('\n---------------')

if __name__ == '__main__':
    with cli_errors():  # bad input: one line naming the problem and the fix, exit 1, no traceback
        main()
