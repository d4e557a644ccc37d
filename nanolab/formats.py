"""
SFT and preference data: read every common raw format, return one normalized schema each
(docs/data.md).

    SFT         {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
    preference  {"prompt": [messages], "chosen": str, "rejected": str}

    from nanolab.formats import read_sft, read_preferences
    rows = read_sft('data/alpaca/train.jsonl')  # Alpaca, OpenAI messages, ShareGPT conversations
    pairs = read_preferences('hh.jsonl.gz')     # {prompt, chosen, rejected}, hh-rlhf, ShareGPT

data.py writes these sets (`python data.py alpaca|chat|hh_rlhf|dpo_pairs`); finetune.py,
evaluate.py and rl.py read SFT rows, preferences.py (for dpo.py and reward.py) the pairs.
Malformed rows are errors naming the file and the 1-based row; rows a user would want dropped (an
empty answer, chosen == rejected) are skipped and counted.
"""
import gzip
import hashlib
import json
import re
import sys
from collections import Counter

def in_val(key: bytes, val_fraction: float, seed: int) -> bool:
    """The split of a document, row or word, from a key of its content: the same wherever and
    whenever it is seen."""
    h = hashlib.blake2b(key, digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(h, 'big') < val_fraction * 2 ** 64

def open_text(path, encoding='utf-8'):
    return gzip.open(path, 'rt', encoding=encoding) if path.endswith('.gz') else \
        open(path, encoding=encoding)

def read_rows(path, encoding='utf-8'):
    """(where, row) for each row of a JSON list or a JSONL file; where = 'path row N' (1-based)."""
    with open_text(path, encoding) as f:
        is_list = f.read(1024).lstrip()[:1] == '['
    with open_text(path, encoding) as f:
        if is_list:
            try:
                yield from ((f'{path} row {n}', row) for n, row in enumerate(json.load(f), 1))
            except json.JSONDecodeError as e:
                raise ValueError(f'{path} line {e.lineno}: invalid JSON ({e.msg}); fix the '
                                 'file') from None
            return
        for n, line in enumerate(f, 1):
            try:
                if line.strip():
                    yield f'{path} row {n}', json.loads(line)
            except json.JSONDecodeError as e:
                hint = '; a .json file must hold one JSON list of rows' \
                    if path.removesuffix('.gz').endswith('.json') else ''
                raise ValueError(f'{path} row {n}: invalid JSON ({e.msg}, column {e.colno}); fix '
                                 f'or delete that line{hint}') from None

# roles by name, ShareGPT's "from" values too
ROLES = {'system': 'system', 'human': 'user', 'user': 'user', 'gpt': 'assistant',
         'assistant': 'assistant', 'chatgpt': 'assistant', 'bard': 'assistant',
         'bing': 'assistant'}

def _messages(turns, where, role='role', content='content'):
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise ValueError(f'{where}: expected a list of {{"{role}", "{content}"}} objects')
    bad = [t for t in turns if t.get(role) not in ROLES or not isinstance(t.get(content), str)]
    if bad:
        raise ValueError(f'{where}: turn {bad[0]!r:.80} needs "{role}" in '
                         f'{sorted(ROLES)} and a string "{content}"')
    return [{'role': ROLES[t[role]], 'content': t[content]} for t in turns]

def _reply(x, where):
    """A response given as a string, a {from, value} / {role, content} turn, or a list ending in
    one."""
    x = x[-1] if isinstance(x, list) and x else x
    x = x.get('content', x.get('value')) if isinstance(x, dict) else x
    if not isinstance(x, str):
        raise ValueError(f'{where}: chosen/rejected must be a string, a turn '
                         'object or a list of turns')
    return x

def _hh_turns(transcript, where):
    """hh-rlhf's '\\n\\nHuman: ...\\n\\nAssistant: ...' -> messages."""
    parts = re.split(r'\n\n(Human|Assistant): ?', '\n\n' + transcript.lstrip('\n'))
    if parts[0] or len(parts) < 3:
        raise ValueError(f'{where}: expected an hh-rlhf transcript of "\\n\\nHuman: ..." and '
                         '"\\n\\nAssistant: ..." turns')
    return [{'role': 'user' if r == 'Human' else 'assistant', 'content': c.strip()}
            for r, c in zip(parts[1::2], parts[2::2])]

def read_sft(path: str, counts: Counter = None) -> list:
    """The rows of an Alpaca, OpenAI-messages, ShareGPT-conversations or normalized file (JSON list
    or JSONL) as {"messages": [...]}. Rows without a non-empty assistant turn are skipped and
    counted into counts."""
    counts, rows = Counter() if counts is None else counts, []
    for where, row in read_rows(path):
        if isinstance(row, dict) and 'messages' in row:
            msgs = _messages(row['messages'], where)
        elif isinstance(row, dict) and 'conversations' in row:
            msgs = _messages(row['conversations'], where, 'from', 'value')
        elif isinstance(row, dict) and isinstance(row.get('instruction'), str) \
                and isinstance(row.get('output'), str):
            # Alpaca's input is optional
            user = row['instruction'] + (f"\n\n{row['input']}" if row.get('input') else '')
            msgs = [{'role': 'user', 'content': user},
                    {'role': 'assistant', 'content': row['output']}]
        else:
            raise ValueError(f'{where}: an SFT row needs "messages", "conversations" or '
                             '"instruction" + "output"; it has '
                             f'{sorted(row) if isinstance(row, dict) else type(row).__name__}')
        replies = [m['content'] for m in msgs if m['role'] == 'assistant']
        if replies and all(r.strip() for r in replies):
            rows.append({'messages': msgs})
        else:
            counts['skipped_empty'] += 1
    if counts:
        print(f'{path}: skipped {dict(counts)}', file=sys.stderr)
    return rows

def read_preferences(path: str, counts: Counter = None) -> list:
    """The rows of a {prompt, chosen, rejected}, hh-rlhf, ShareGPT-pair or normalized file as
    {"prompt": [messages], "chosen": str, "rejected": str}. Rows with an empty response, chosen ==
    rejected or (hh-rlhf) two different prompts are skipped and counted into counts."""
    counts, rows = Counter() if counts is None else counts, []
    for where, row in read_rows(path):
        if not isinstance(row, dict) or 'chosen' not in row or 'rejected' not in row:
            raise ValueError(f'{where}: a preference row needs "chosen" and "rejected" fields')
        if 'prompt' in row or 'conversations' in row:
            p = row.get('prompt', row.get('conversations'))
            prompt = [{'role': 'user', 'content': p}] if isinstance(p, str) else \
                _messages(p, where, *(('role', 'content') if 'prompt' in row
                                      else ('from', 'value')))
            chosen, rejected = _reply(row['chosen'], where), _reply(row['rejected'], where)
        else:  # hh-rlhf: two whole dialogues that share everything up to the last assistant turn
            c, r = _hh_turns(_reply(row['chosen'], where), where), \
                _hh_turns(_reply(row['rejected'], where), where)
            if c[-1]['role'] != 'assistant' or r[-1]['role'] != 'assistant' or c[:-1] != r[:-1]:
                counts['skipped_prompt_mismatch'] += 1
                continue
            prompt, chosen, rejected = c[:-1], c[-1]['content'], r[-1]['content']
        if not chosen.strip() or not rejected.strip():
            counts['skipped_empty'] += 1
        elif chosen.strip() == rejected.strip():
            counts['skipped_identical'] += 1
        else:
            rows.append({'prompt': prompt, 'chosen': chosen, 'rejected': rejected})
    if counts:
        print(f'{path}: skipped {dict(counts)}', file=sys.stderr)
    return rows

