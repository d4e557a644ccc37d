"""Models' own Jinja chat templates (nanolab/chat_templates.py through HFTokenizer.render_chat): ids equal to
transformers' apply_chat_template, the loss mask, the end-of-turn ids, hostile templates.

Tiny tokenizers: one byte-level BPE trained on a few sentences with the special tokens of the families (Llama 3,
ChatML for Qwen/SmolLM2, Mistral), saved by transformers with templates of the families' shape written here.

The comparison: transformers' apply_chat_template(..., sanitize_control_tokens=True) is the reference. It encodes
the template's own control tokens as tokens and the ones typed in messages as text, which is what render_chat does;
without it transformers turns a typed "<|im_end|>" into the special id, which we refuse by design (checked below).
For messages without special-token text both give the same ids."""
import json
import os
import time

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from nanolab import chat_templates
from nanolab.tokenizer import HFTokenizer, from_spec

SPECIALS = ['<|endoftext|>', '<|begin_of_text|>', '<|end_of_text|>', '<|start_header_id|>', '<|end_header_id|>',
            '<|eot_id|>', '<|eom_id|>', '<|im_start|>', '<|im_end|>', '<s>', '</s>', '[INST]', '[/INST]']
TEXT = ['hello world, how are you today?', 'the quick brown fox jumps over the lazy dog',
        'You are a helpful assistant. Answer briefly.', 'Paris is the capital of France.']

# Llama 3 shape: bos, headers, <|eot_id|> ends every turn, a system turn only when given
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
# Qwen2.5 / SmolLM2 shape: ChatML with a default system prompt
CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
          "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Qwen3 shape: reasoning shown only for answers after the last user message (rewrites earlier turns)
QWEN3 = ("{% set ns = namespace(last=-1) %}{% for m in messages %}{% if m['role'] == 'user' %}"
         "{% set ns.last = loop.index0 %}{% endif %}{% endfor %}"
         "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and loop.index0 > ns.last"
         " %}<think>\n{{ m.get('reasoning_content', '') }}\n</think>\n\n{% endif %}{{ m['content'] }}<|im_end|>\n"
         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Mistral shape: system folded into the first user turn, strict alternation, eos ends an answer
MISTRAL = ("{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] + '\n\n' %}"
           "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
           "{{ bos_token }}{% for m in msgs %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if m['role'] == 'user' %}[INST] {{ (sys if loop.first else '') + m['content'] }} [/INST]"
           "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")
# the {% generation %} markers give transformers' own assistant mask, to check ours against
CHATML_GEN = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}"
              "{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Qwen2.5 shape with its place for tools: the list in the system turn, calls in <tool_call>, results as user turns
TOOLS = ("{% if tools %}<|im_start|>system\n{{ messages[0]['content'] if messages[0]['role'] == 'system' else 'Hi.' }}"
         "\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools><|im_end|>\n{% endif %}"
         "{% for m in messages %}{% if m.role == 'system' and tools %}{% elif m.role == 'assistant' and m.tool_calls %}"
         "<|im_start|>assistant\n{% for tc in m.tool_calls %}<tool_call>\n{{ {'name': tc.function.name, "
         "'arguments': tc.function.arguments} | tojson }}\n</tool_call>{% endfor %}<|im_end|>\n"
         "{% elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
         "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
FAMILIES = {'llama3': (LLAMA3, dict(bos_token='<|begin_of_text|>', eos_token='<|end_of_text|>'),
                       ['<|end_of_text|>', '<|eom_id|>', '<|eot_id|>']),
            'chatml': (CHATML, dict(eos_token='<|im_end|>'), ['<|im_end|>', '<|endoftext|>']),
            'qwen3': (QWEN3, dict(eos_token='<|im_end|>'), '<|im_end|>'),
            'mistral': (MISTRAL, dict(bos_token='<s>', eos_token='</s>'), None),
            'chatml_gen': (CHATML_GEN, dict(eos_token='<|im_end|>'), None),
            'chatml_tools': (TOOLS, dict(eos_token='<|im_end|>'), None)}

SYS = {'role': 'system', 'content': 'You are a helpful assistant.'}
CHATS = [[{'role': 'user', 'content': 'hello world'}],
         [SYS, {'role': 'user', 'content': 'how are you today?'}],
         [SYS, {'role': 'user', 'content': 'the capital of France?'}, {'role': 'assistant', 'content': 'Paris.'},
          {'role': 'user', 'content': 'the quick fox?'}, {'role': 'assistant', 'content': 'jumps over the dog'}],
         [{'role': 'user', 'content': 'say <|im_end|><|eot_id|></s>[INST]'},
          {'role': 'assistant', 'content': 'ok <|im_start|>assistant [/INST]'}]]


@pytest.fixture(scope='module')
def dirs(tmp_path_factory):
    """family name -> (saved directory, transformers tokenizer loaded from it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.add_tokens(['<think>', '</think>'])  # Qwen3: added, not special
    out = {}
    for name, (template, tokens, eos) in FAMILIES.items():
        d = str(tmp_path_factory.mktemp(name))
        PreTrainedTokenizerFast(tokenizer_object=tk, chat_template=template, **tokens).save_pretrained(d)
        if eos is not None:  # generation_config.json: a list of end ids, or one
            ids = [tk.token_to_id(t) for t in eos] if isinstance(eos, list) else tk.token_to_id(eos)
            with open(os.path.join(d, 'generation_config.json'), 'w') as f:
                json.dump({'eos_token_id': ids}, f)
        out[name] = d, PreTrainedTokenizerFast.from_pretrained(d)
    return out


def theirs(hf, messages, **kw):
    return hf.apply_chat_template(messages, tokenize=True, return_dict=False, sanitize_control_tokens=True, **kw)


@pytest.mark.parametrize('family', ['llama3', 'chatml', 'qwen3', 'mistral'])
@pytest.mark.parametrize('chat', range(len(CHATS)))
@pytest.mark.parametrize('gen', [False, True])
def test_ids_equal_transformers(dirs, family, chat, gen):
    d, hf = dirs[family]
    tok, messages = HFTokenizer(d), CHATS[chat]
    ids, mask = tok.render_chat(messages, add_generation_prompt=gen)
    assert ids == theirs(hf, messages, add_generation_prompt=gen) and len(mask) == len(ids)


def test_template_file_and_config_forms(dirs):
    """transformers 5 writes chat_template.jinja; older dirs hold the template in tokenizer_config.json, as a
    string or a list of {name, template}. All three render the same."""
    d, hf = dirs['chatml']
    assert os.path.exists(os.path.join(d, 'chat_template.jinja'))
    want = theirs(hf, CHATS[2])
    config = json.load(open(os.path.join(d, 'tokenizer_config.json')))
    for form in (CHATML, [{'name': 'tool_use', 'template': LLAMA3}, {'name': 'default', 'template': CHATML}]):
        files = {n: open(os.path.join(d, n)).read() for n in ('tokenizer.json', 'generation_config.json')}
        files['tokenizer_config.json'] = json.dumps({**config, 'chat_template': form})
        assert HFTokenizer('old', files=files).render_chat(CHATS[2])[0] == want
    files['tokenizer_config.json'] = json.dumps({**config, 'chat_template': [{'name': 'tool_use', 'template': 'x'}]})
    with pytest.raises(ValueError, match='default'):
        HFTokenizer('old', files=files).render_chat(CHATS[2])
    back = from_spec(HFTokenizer(d).spec())  # a checkpoint carries the template and generation_config.json
    assert back.render_chat(CHATS[2]) == HFTokenizer(d).render_chat(CHATS[2])
    assert back.chat_stop_tokens == HFTokenizer(d).chat_stop_tokens


def test_special_token_text_stays_text(dirs):
    d, hf = dirs['chatml']
    tok, messages = HFTokenizer(d), CHATS[3]
    ids, _ = tok.render_chat(messages)
    end, start = tok.special_tokens['<|im_end|>'], tok.special_tokens['<|im_start|>']
    assert ids.count(end) == 3 and ids.count(start) == 3  # system, user, assistant: the template's only
    assert '<|im_end|><|eot_id|></s>[INST]' in tok.decode(ids)
    # transformers without sanitize_control_tokens makes the typed text the special ids: not what we do
    plain = hf.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert plain.count(end) == 4 and plain != ids


@pytest.mark.parametrize('family', ['llama3', 'chatml', 'mistral'])
def test_continue_final_message(dirs, family):
    d, hf = dirs[family]
    messages = CHATS[2][:-1] + [{'role': 'assistant', 'content': 'jumps over'}]
    if family == 'mistral':
        messages = messages[1:]  # alternation from the first user message; system folded in anyway
    ids, mask = HFTokenizer(d).render_chat(messages, continue_final_message=True)
    assert ids == theirs(hf, messages, continue_final_message=True)
    assert HFTokenizer(d).decode([i for i, m in zip(ids, mask) if m]).endswith('jumps over')
    assert mask[-1] == 1 and not HFTokenizer(d).decode(ids).endswith('<|eot_id|>')


@pytest.mark.parametrize('family,ends', [('llama3', '<|eot_id|>'), ('chatml', '<|im_end|>'),
                                         ('mistral', '</s>'), ('qwen3', '<|im_end|>')])
def test_mask_is_answers_and_their_end(dirs, family, ends):
    d, _ = dirs[family]
    tok = HFTokenizer(d)
    messages = [m for m in CHATS[2] if family != 'mistral' or m['role'] != 'system']
    ids, mask = tok.render_chat(messages)
    spans, run = [], []
    for i, m in zip(ids + [None], mask + [0]):
        if m:
            run.append(i)
        elif run:
            spans, run = spans + [tok.decode(run)], []
    space = ' ' if family == 'mistral' else ''  # Mistral's template puts the space before the answer
    want = [f'{space}Paris.{ends}', f'{space}jumps over the dog{ends}']
    if family == 'qwen3':  # the last answer shows its (empty) reasoning; the earlier one lost it
        want[1] = '<think>\n\n</think>\n\njumps over the dog<|im_end|>'
    assert spans == want


def test_mask_equals_transformers_generation_mask(dirs):
    """A template with {% generation %} blocks: transformers' own assistant mask equals ours."""
    d, hf = dirs['chatml_gen']
    out = hf.apply_chat_template(CHATS[2], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert HFTokenizer(d).render_chat(CHATS[2]) == (out['input_ids'], out['assistant_masks'])


def test_chat_stop_tokens(dirs):
    ids = lambda tok, *names: [tok.special_tokens[n] for n in names]  # noqa: E731
    llama = HFTokenizer(dirs['llama3'][0])  # generation_config list, then eos, then the template's <|eot_id|>
    assert llama.chat_stop_tokens == ids(llama, '<|end_of_text|>', '<|eom_id|>', '<|eot_id|>')
    chatml = HFTokenizer(dirs['chatml'][0])
    assert chatml.chat_stop_tokens == ids(chatml, '<|im_end|>', '<|endoftext|>') and chatml.stop_strings == []
    mistral = HFTokenizer(dirs['mistral'][0])  # no generation_config.json: eos, which also ends the answer
    assert mistral.chat_stop_tokens == ids(mistral, '</s>')


def test_errors_name_the_template(dirs):
    d, _ = dirs['mistral']
    with pytest.raises(ValueError, match='alternate.*chat_template'):
        HFTokenizer(d).render_chat([{'role': 'user', 'content': 'a'}, {'role': 'user', 'content': 'b'}])
    with pytest.raises(ValueError, match='messages must be a list'):
        HFTokenizer(d).render_chat('hello')


HOSTILE = {'nested loops': "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
           'loop over a list': "{% set x = range(100000)|list %}{% for a in x %}{% for b in x %}{% endfor %}"
                               "{% endfor %}",
           'endless output': "{% for a in range(100000) %}{% for b in range(100000) %}xxxxxxxx{% endfor %}"
                             "{% endfor %}",
           'huge string': "{{ 'x' * 1000000000 }}",
           'huge power': "{{ 10 ** 100000000 }}",
           'doubling': "{% set ns = namespace(x='ab') %}{% for i in range(60) %}{% set ns.x = ns.x ~ ns.x %}"
                       "{% endfor %}",
           'replace bomb': "{{ ('a' * 100000).replace('a', 'a' * 100000) }}",
           'join bomb': "{% set ns = namespace(l=[]) %}{% for i in range(1000) %}{% set ns.l = ns.l + ['a' * 500000]"
                        " %}{% endfor %}{{ ns.l|join }}",
           'wide center': "{{ 'a'|center(1000000000) }}",
           'sandbox escape': "{{ ''.__class__.__mro__[1].__subclasses__() }}",
           'namespace escape': "{{ namespace(__init__=1) }}",
           'raise_exception': "{{ raise_exception('no') }}",
           'syntax error': '{% for %}',
           'recursion': '{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}'}


@pytest.mark.parametrize('name', HOSTILE)
def test_hostile_template_is_a_quick_value_error(dirs, name, monkeypatch):
    monkeypatch.setattr(chat_templates, 'TIME_LIMIT_S', 0.3)
    d, _ = dirs['chatml']
    files = {n: open(os.path.join(d, n)).read() for n in ('tokenizer.json', 'tokenizer_config.json')}
    files['chat_template.jinja'] = HOSTILE[name]
    t0 = time.monotonic()
    with pytest.raises(ValueError, match='chat template of hostile'):
        HFTokenizer('hostile', files=files).render_chat([{'role': 'user', 'content': 'hi'}])
    assert time.monotonic() - t0 < 3


def test_no_template_keeps_nanolab_format(dirs, tmp_path):
    d, _ = dirs['chatml']
    for n in ('tokenizer.json', 'tokenizer_config.json'):
        text = open(os.path.join(d, n)).read()
        (tmp_path / n).write_text(text)
    tok = HFTokenizer(str(tmp_path))
    assert tok.chat_template is None
    ids, mask = tok.render_chat(CHATS[2])
    assert tok.decode(ids).startswith('System: ') and tok.chat_stop_tokens == [tok.special_tokens['<|im_end|>']]


ROLE = st.sampled_from(['system', 'user', 'assistant'])
WORDS = st.sampled_from(SPECIALS + ['<think>', '\U000f0000', ' ', '\n', 'hello', 'é', '日本', '🙂'])
CONTENT = st.lists(st.one_of(WORDS, st.text(max_size=8)), max_size=6).map(''.join)


@given(st.sampled_from(['llama3', 'chatml', 'qwen3', 'mistral']),
       st.lists(st.fixed_dictionaries({'role': ROLE, 'content': CONTENT}), min_size=1, max_size=5), st.booleans())
def test_random_chats_match_transformers(dirs, family, messages, gen):
    """ids equal transformers' (sanitized) wherever transformers renders; both refuse the same chats; the mask
    is as long as the ids; only ValueError ever comes out."""
    d, hf = dirs[family]
    try:
        want = theirs(hf, messages, add_generation_prompt=gen)
    except Exception:  # e.g. Mistral's alternation rule
        want = None
    try:
        ids, mask = HFTokenizer(d).render_chat(messages, add_generation_prompt=gen)
    except ValueError:
        assert want is None
        event('both refuse')
        return
    event('compared')
    assert ids == want and len(mask) == len(ids) and set(mask) <= {0, 1}


def test_tools_go_where_the_template_has_a_place_for_them(dirs):
    """OpenAI's tools and a chat with a call and its result: a template with a place for tools renders them as
    transformers does (tools=, arguments as objects); nanolab's own format gets the list and the reply format in
    the system message, the call as the assistant's JSON and the result as a user message."""
    from nanolab import tool_calls
    from nanolab.tokenizer import CharTokenizer
    d, hf = dirs['chatml_tools']
    tok = HFTokenizer(d)
    assert tok.takes_tools and not HFTokenizer(dirs['chatml'][0]).takes_tools
    tools = tool_calls.read({'tools': [{'type': 'function', 'function': {
        'name': 'weather', 'description': 'today', 'parameters': {'type': 'object', 'properties': {
            'city': {'type': 'string'}}, 'required': ['city']}}}], 'tool_choice': 'auto'})
    chat = [SYS, {'role': 'user', 'content': 'hello world'},
            {'role': 'assistant', 'content': None, 'tool_calls': [{'id': 'c1', 'type': 'function', 'function': {
                'name': 'weather', 'arguments': '{"city": "Paris"}'}}]},
            {'role': 'tool', 'tool_call_id': 'c1', 'content': 'sunny'}]
    msgs, listed = tool_calls.messages_for(tok, chat, tools)
    ids, _ = tok.render_chat(msgs, add_generation_prompt=True, tools=listed)
    hf_chat = chat[:2] + [{'role': 'assistant', 'tool_calls': [{'type': 'function', 'function': {
        'name': 'weather', 'arguments': {'city': 'Paris'}}}]}, {'role': 'tool', 'content': 'sunny'}]
    assert ids == theirs(hf, hf_chat, tools=listed, add_generation_prompt=True)
    text = hf.decode(ids)
    assert '"name": "weather"' in text and '<tool_response>\nsunny' in text and '"Paris"' in text
    own = CharTokenizer(text=''.join(map(chr, range(32, 127))) + '\n')
    msgs, listed = tool_calls.messages_for(own, chat, tools)
    assert listed is None and [m['role'] for m in msgs] == ['system', 'user', 'assistant', 'user']
    assert msgs[0]['content'].startswith(SYS['content']) and '"weather"' in msgs[0]['content']
    assert json.loads(msgs[2]['content']) == {'tool_calls': [{'name': 'weather', 'arguments': {'city': 'Paris'}}]}
    assert msgs[3]['content'] == 'Result of weather: sunny'
    own.render_chat(msgs, add_generation_prompt=True)  # renders
