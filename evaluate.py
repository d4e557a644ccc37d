"""
Evaluation. For now: a model's answers to chat prompts, and exact match on held-out instructions, which
finetune.py logs at every eval and dpo.py uses. Perplexity, lm-eval, BLEU/ROUGE and the leaderboard come next.

    from evaluate import answer, exact_match
    texts = answer(model, tok, [[{'role': 'user', 'content': 'Reverse abc'}]])      # greedy replies
    score, details = exact_match(model, tok, rows)     # rows: SFT rows {"messages": [..., assistant reference]}

Both decode with sample.generate, the one decoding loop, at temperature 0: greedy answers are deterministic,
so a score changes only when the model does.
"""
from sample import generate


def answer(model, tok, conversations, max_new_tokens=32, batch_size=64, **sampling):
    """The model's reply to each conversation (a list of messages ending before the assistant's turn): rendered
    with the chat template and its generation prompt, decoded in batches until the template's end of turn, and
    stripped of surrounding whitespace. sampling: other generate() settings (default greedy)."""
    was_training = model.training
    model.eval()
    sampling = {'temperature': 0.0, **sampling}
    stop_tokens = tok.chat_stop_tokens or ()  # char-level templates end turns with a string instead
    out = []
    try:
        for i in range(0, len(conversations), batch_size):
            prompts = [tok.render_chat(c, add_generation_prompt=True)[0] for c in conversations[i:i + batch_size]]
            done = generate(model, prompts, max_new_tokens, stop_tokens=stop_tokens, stop_strings=tok.stop_strings,
                            tokenizer=tok, **sampling)
            out += [c.text.strip() for c in done]
    finally:
        model.train(was_training)
    return out


def exact_match(model, tok, rows, max_new_tokens=32, batch_size=64, normalize=str.strip):
    """Share of SFT rows whose greedy answer equals the reference, the row's last (assistant) message, once both
    go through `normalize` (default: strip whitespace; tasks.normalize also drops the tasks suite's filler).
    Returns (score in [0, 1], details: one {'prompt', 'reference', 'answer', 'match'} per row)."""
    if not rows:
        raise ValueError('exact_match needs at least one row')
    bad = [i for i, r in enumerate(rows) if r['messages'][-1]['role'] != 'assistant']
    if bad:
        raise ValueError(f"row {bad[0]}: the last message is the {rows[bad[0]]['messages'][-1]['role']}'s, not "
                         "the assistant's reference answer that exact match compares against")
    replies = answer(model, tok, [r['messages'][:-1] for r in rows], max_new_tokens, batch_size)
    details = [{'prompt': r['messages'][-2]['content'] if len(r['messages']) > 1 else '',
                'reference': r['messages'][-1]['content'], 'answer': a,
                'match': normalize(a) == normalize(r['messages'][-1]['content'])} for r, a in zip(rows, replies)]
    return sum(d['match'] for d in details) / len(details), details


def win_rate(rows, answers, ref_answers, score):
    """How often a judge that applies `score(row, answer)` (higher is better; e.g. tasks.rule_score) prefers
    `answers` to `ref_answers`, one pair per row: a win counts 1, a tie 0.5 (so identical models score 0.5).
    dpo.py gets both lists from answer(), for the policy and for the reference. Returns (rate, details)."""
    if not rows or not len(rows) == len(answers) == len(ref_answers):
        raise ValueError(f'win_rate needs one answer and one reference answer per row, got {len(rows)} rows, '
                         f'{len(answers)} answers and {len(ref_answers)} reference answers')
    details = [{'answer': a, 'ref_answer': b, 'score': score(r, a), 'ref_score': score(r, b)}
               for r, a, b in zip(rows, answers, ref_answers)]
    wins = sum(1.0 if d['score'] > d['ref_score'] else 0.5 if d['score'] == d['ref_score'] else 0.0 for d in details)
    return wins / len(details), details
