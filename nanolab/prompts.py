"""
Prompt templates: a curated library with variables, rendering that names every mistake, and a
seeded few-shot builder. A template is plain text (a prompt for a base model) or a list of chat
messages (rendered through the one chat template, tokenizer.render_chat), with {variables}: plain
{name} fields ({{ and }} are literal braces). Nothing else of str.format is read: no attributes,
indexes, positions or format specs, so a template from a client reads no object and its output
size is known before it is built.

    from nanolab.prompts import TEMPLATES, variables, render, few_shot
    variables('sentiment')                             # ['text']
    render('sentiment', text='What a lovely day.')     # the prompt text
    render('qa_chat', context='...', question='...')   # a list of chat messages
    render('math_steps', problem='2 + 2?', cot=True)   # with the template's chain-of-thought line
    few_shot(rows, k=3, seed=0, template='qa_pair')    # k rows picked by the seed, each formatted
    fill('sentiment', {'text': '...'})  # render's values as a dict: any names (a client's)

Each template: {kind, description, template (str | list of {role, content}), example: values that
render it}, and optionally `cot`: a line appended (to the text, or the last user message) when
render(..., cot=True).
"""
import json
import random
import re

KINDS = ('classification', 'summarization', 'question answering', 'extraction', 'rewriting',
         'translation', 'reasoning', 'story', 'chat persona', 'instruction')

_U = lambda s: [{'role': 'user', 'content': s}]  # a one-turn chat template
_SU = lambda system, s: [{'role': 'system', 'content': system}, {'role': 'user', 'content': s}]

TEMPLATES = {
    # classification
    'sentiment': dict(kind='classification', description='positive or negative, one word',
                      template='Review: {text}\nSentiment (positive or negative):',
                      example={'text': 'A joy to read.'}),
    'topic': dict(kind='classification', description='pick a topic from a given list',
                  template='Text: {text}\nTopics: {labels}\nThe topic of the text is:',
                  example={'text': 'The striker scored twice.',
                           'labels': 'sport, politics, science'}),
    'spam_chat': dict(kind='classification', description='spam or not, as a chat',
                      template=_U('Is this message spam? Answer yes or no.\n\n{message}'),
                      example={'message': 'You won a prize! Click here.'}),
    # summarization
    'tldr': dict(kind='summarization', description="Reddit's TL;DR cue (GPT-2 paper)",
                 template='{text}\n\nTL;DR:',
                 example={'text': 'The meeting moved to Friday because the room was booked.'}),
    'summary_chat': dict(kind='summarization', description='a summary of at most n sentences',
                         template=_U('Summarize in at most {n} sentences:\n\n{text}'),
                         example={'n': '2', 'text': 'Long text here.'}),
    'headline': dict(kind='summarization', description='a headline for an article',
                     template='Article: {text}\nHeadline:',
                     example={'text': 'Rain fell for a week in the valley.'}),
    # question answering
    'qa': dict(kind='question answering', description='closed-book question, short answer',
               template='Q: {question}\nA:',
               example={'question': 'What is the capital of France?'}),
    'qa_context': dict(kind='question answering', description='answer from a passage',
                       template='{context}\n\nQuestion: {question}\nAnswer:',
                       example={'context': 'The cup is blue.',
                                'question': 'What colour is the cup?'}),
    'qa_chat': dict(kind='question answering', description='answer from a passage, as a chat',
                    template=_U('Use the passage to answer.\n\nPassage: {context}\n\n'
                                'Question: {question}'),
                    example={'context': 'The cup is blue.',
                             'question': 'What colour is the cup?'}),
    'qa_pair': dict(kind='question answering',
                    description='a solved example, for few-shot prompts',
                    template='Q: {question}\nA: {answer}',
                    example={'question': 'What is 2 + 2?', 'answer': '4'}),
    # extraction
    'extract_json': dict(kind='extraction', description='named fields as JSON',
                         template=_U('Extract {fields} from the text as a JSON object.\n\n{text}'),
                         example={'fields': 'name and city', 'text': 'Ana lives in Porto.'}),
    'keywords': dict(kind='extraction', description='comma-separated keywords',
                     template='Text: {text}\nKeywords:',
                     example={'text': 'Solar panels cut the power bill.'}),
    # rewriting
    'formal': dict(kind='rewriting', description='the same text, formal',
                   template=_U('Rewrite formally:\n\n{text}'),
                   example={'text': 'gonna be late, sorry'}),
    'simplify': dict(kind='rewriting', description='the same text for a child',
                     template=_U('Explain this to a ten-year-old:\n\n{text}'),
                     example={'text': 'Photosynthesis.'}),
    'fix_grammar': dict(kind='rewriting', description='corrected text',
                        template='Original: {text}\nCorrected:',
                        example={'text': 'He go to school yesterday.'}),
    # translation
    'translate': dict(kind='translation', description='from one language to another',
                      template='Translate from {source} to {target}.\n{source}: {text}\n{target}:',
                      example={'source': 'English', 'target': 'French', 'text': 'Good morning.'}),
    'translate_chat': dict(kind='translation', description='translation as a chat',
                           template=_U('Translate into {target}:\n\n{text}'),
                           example={'target': 'German', 'text': 'Thank you.'}),
    # reasoning
    'math_steps': dict(kind='reasoning',
                       description='a word problem; cot adds the step-by-step cue',
                       template='Problem: {problem}\nAnswer:', cot="Let's think step by step.",
                       example={'problem': 'Ann has 3 apples and buys 2 more. How many now?'}),
    'reason_chat': dict(kind='reasoning', description='a question to reason about, as a chat',
                        template=_U('{question}'),
                        cot='Think it through step by step, then give the answer.',
                        example={'question': 'Is 91 a prime number?'}),
    # story continuation
    'story': dict(kind='story', description='continue a story from its opening',
                  template='{opening}',
                  example={'opening': 'Once upon a time, in a quiet village,'}),
    'play_scene': dict(kind='story', description='a scene of a play (the Shakespeare models)',
                       template='{speaker}:\n{line}\n',
                       example={'speaker': 'ROMEO', 'line': 'But soft, what light'}),
    # chat personas
    'persona': dict(kind='chat persona', description='a system persona, then the user',
                    template=_SU('You are {persona}. Stay in character.', '{message}'),
                    example={'persona': 'a patient librarian',
                             'message': 'Where do I start with poetry?'}),
    'tutor': dict(kind='chat persona', description='a tutor who gives hints, not answers',
                  template=_SU('You are a tutor. Give hints, never the final answer.',
                               '{question}'),
                  example={'question': 'How do I solve 2x + 3 = 7?'}),
    # instructions (the tasks suite's own phrasing)
    'instruction': dict(kind='instruction',
                        description='an instruction as one user turn (the SFT data)',
                        template=_U('{instruction}'), example={'instruction': 'Reverse kfeo'}),
    'instruction_concise': dict(kind='instruction', description='ask for the answer alone',
                                template=_U('{instruction}\nAnswer with the result only.'),
                                example={'instruction': 'Reverse kfeo'}),
}

MAX_CHARS = 1_000_000  # the longest text a template may make (checked before it is made)
_PART = re.compile(r'\{\{|\}\}|\{([^{}]*)\}|[{}]')  # a literal brace, a field, or a lone brace

def _parse(text):
    """A template text -> its parts: literal strings and ('field', name) pairs. A field that is not
    a plain name ({x.attr}, {x[0]}, {0}, {}, {x:>9}, {x!r}) or a lone brace is a ValueError naming
    it."""
    parts, at = [], 0
    for m in _PART.finditer(text):
        parts.append(text[at:m.start()])
        at = m.end()
        tok = m.group(0)
        if tok in ('{{', '}}'):
            parts.append(tok[0])
        elif m.group(1) is not None and m.group(1).isidentifier():
            parts.append(('field', m.group(1)))
        else:
            raise ValueError(f"{tok!r} is not a template variable: a template's fields are plain "
                             "{name}s (letters, digits and _), and a literal brace is {{ or }}")
    parts.append(text[at:])
    return [x for x in parts if x != '']

def _fields(text):
    return [x[1] for x in _parse(text) if isinstance(x, tuple)]

def _substitute(texts, values):
    """Each text with its {name} fields replaced by values' (str) -> the texts; the total size is
    checked against MAX_CHARS before any is built."""
    parsed = [_parse(t) for t in texts]
    size = sum(len(values[x[1]]) if isinstance(x, tuple) else len(x) for p in parsed for x in p)
    if size > MAX_CHARS:
        raise ValueError(f'the filled template would be {size:,} characters, over {MAX_CHARS:,}; '
                         'send shorter values')
    return [''.join(values[x[1]] if isinstance(x, tuple) else x for x in p) for p in parsed]

def variables(name):
    """The variables of a template, in order of first appearance."""
    t = get(name)['template']
    texts = [t] if isinstance(t, str) else [m['content'] for m in t]
    out = []
    for text in texts:
        for f in _fields(text):
            if f not in out:
                out.append(f)
    return out

def _check(want, values, what):
    """ValueError naming every missing and every unknown variable at once."""
    missing, unknown = [v for v in want if v not in values], [v for v in values if v not in want]
    if missing or unknown:
        raise ValueError(f"{what} takes {', '.join(want) or 'no variables'}" +
                         (f"; missing {', '.join(missing)}" if missing else '') +
                         (f"; unknown {', '.join(unknown)}" if unknown else ''))

def get(name):
    """The template named `name` (KeyError naming the close ones and the count otherwise)."""
    if name not in TEMPLATES:
        import difflib
        close = difflib.get_close_matches(name, TEMPLATES, n=3)
        raise KeyError(f"unknown template '{name}'" +
                       (f"; did you mean {', '.join(close)}?" if close else '') +
                       f" ({len(TEMPLATES)} templates: python -c \"from nanolab import prompts; "
                       "print(list(prompts.TEMPLATES))\")")
    return TEMPLATES[name]

def render(name, cot=False, **values):
    """Fill a template: a str for a text template, a list of {role, content} for a chat one. Every
    missing and every unknown variable is named in one ValueError; cot=True appends the template's
    chain-of-thought cue. (fill takes the values as a dict, for names like 'cot' and 'name'.)"""
    return fill(name, values, cot)

def fill(name, values, cot=False):
    """render() with its values as a dict: a client's variables, whatever their names."""
    t = get(name)
    if not isinstance(values, dict):
        raise ValueError(f"a template's values are an object of its variables, got "
                         f"{type(values).__name__}")
    _check(variables(name), values, f"template '{name}'")
    if cot and 'cot' not in t:
        raise ValueError(f"template '{name}' has no chain-of-thought cue; those that do: "
                         f"{', '.join(n for n, x in TEMPLATES.items() if 'cot' in x)}")
    values = {k: str(v) for k, v in values.items()}
    if isinstance(t['template'], str):
        return _substitute([t['template']], values)[0] + (f" {t['cot']}" if cot else '')
    contents = _substitute([m['content'] for m in t['template']], values)
    msgs = [{'role': m['role'], 'content': c} for m, c in zip(t['template'], contents)]
    if cot:
        msgs[-1]['content'] += '\n\n' + t['cot']
    return msgs

def few_shot(examples, k, seed=0, template='qa_pair', separator='\n\n'):
    """k examples (dicts of a template's variables; or a .jsonl path of them) picked without
    replacement by a seeded RNG (the same seed, the same picks), each rendered with `template` (a
    text one) and joined."""
    if isinstance(examples, str):
        with open(examples, encoding='utf-8') as f:
            examples = [json.loads(line) for line in f if line.strip()]
    if not 0 <= k <= len(examples):
        raise ValueError(f'few_shot: k={k} must be between 0 and the '
                         f'{len(examples)} examples given')
    if not isinstance(get(template)['template'], str):
        raise ValueError("few_shot formats examples with a text template; "
                         f"'{template}' is a chat template")
    picked = random.Random(seed).sample(range(len(examples)), k)
    keep = variables(template)
    for i in picked:
        missing = [v for v in keep if not isinstance(examples[i], dict) or v not in examples[i]]
        if missing:
            raise ValueError(f"few_shot: example {i} has no {', '.join(missing)} (template "
                             f"'{template}' takes {', '.join(keep)}): {str(examples[i])[:80]}")
    return separator.join(fill(template, {v: examples[i][v] for v in keep}) for i in picked)

def text_variables(text):
    """The {variables} of a template text (a user's own, from the page), in order."""
    return list(dict.fromkeys(_fields(text)))

def render_text(text, values):
    """A template text of one's own (a client's) filled in from values (a dict), with render's
    errors for missing and unknown variables and _parse's for fields that are not plain names."""
    if not isinstance(values, dict):
        raise ValueError(f"a template's values are an object of its variables, got "
                         f"{type(values).__name__}")
    _check(text_variables(text), values, 'the template')
    return _substitute([text], {k: str(v) for k, v in values.items()})[0]

def is_chat(name):
    return not isinstance(get(name)['template'], str)

def prompt_ids(tok, name, values, cot=False):
    """The token ids a model sees for a template: a text one encoded, a chat one through the chat
    template with the assistant's generation prompt. sample.py and the server's /tokenize (and so
    the page) go through here."""
    out = fill(name, values, cot)
    return tok.render_chat(out, add_generation_prompt=True)[0] if is_chat(name) else \
        tok.encode(out)

def catalog():
    """Every template as JSON-ready rows: name, kind, description, variables, chat, cot, example,
    template."""
    return [{'name': n, 'kind': t['kind'], 'description': t['description'],
             'variables': variables(n), 'chat': is_chat(n), 'cot': 'cot' in t,
             'example': t['example'], 'template': t['template']}
            for n, t in TEMPLATES.items()]
