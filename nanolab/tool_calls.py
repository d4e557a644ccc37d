"""
Tool calls as OpenAI's chat API has them, for every model: a request's `tools`, `tool_choice` and
`parallel_tool_calls` checked; the tool list and the chat's earlier calls put into the prompt; the
reply held to one JSON format by a grammar (grammar.tools_grammar) and read back into `tool_calls`,
whole or as it streams.

    {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}, ...]}

is the format, compact (the grammar allows nothing else), each call's arguments following its
tool's `parameters` schema. tool_choice 'required', or {"type": "function", "function": {"name":
...}}: the reply is such a call; 'auto' (the default when there are tools): a call, or a text that
does not start with '{' (the message's content); 'none': a text. parallel_tool_calls false: one
call at most.

The prompt: a model's own Jinja template that has a place for tools (Llama 3.1, Qwen 2.5 ...)
gets the list, and the chat's earlier calls and results in OpenAI's message shapes (arguments as
objects, as transformers passes them). Any other template (nanolab's own formats) gets the list
and the format in the system message, each earlier call as the assistant's JSON above, and each
result as a user message "Result of <name>: <content>". Templates never parse the output: the
grammar makes it the one format.
"""
import json
import re
import uuid

from nanolab import grammar
from nanolab.httpd import ApiError

MAX_TOOLS = 128  # as OpenAI
NAME = re.compile(r'[A-Za-z0-9_-]{1,64}')
# a call's head in the reply, up to its arguments' first character
CALL = re.compile(r'\{"name": "([A-Za-z0-9_-]{1,64})", "arguments": ')
NO_PARAMETERS = {'type': 'object', 'properties': {}, 'additionalProperties': False}


class Tools:
    """A request's tools: specs [{name, description, parameters}], choice ('auto', 'none',
    'required' or a tool's name), parallel; grammar: the Lark text the reply follows, or None."""
    def __init__(self, specs, choice, parallel):
        self.specs, self.choice, self.parallel = specs, choice, parallel
        try:
            self.grammar = None if choice == 'none' else grammar.tools_grammar(
                [(t['name'], t['parameters']) for t in specs], choice, parallel)
        except grammar.GrammarError as e:
            raise ApiError(400, f"'tools': {e}", 'tools') from None

    def is_call(self, text):
        """Whether a reply that begins with text is a call (else a message's content)."""
        return self.grammar is not None and (self.choice != 'auto' or text.startswith('{'))


def read(body):
    """The body's tools, tool_choice and parallel_tool_calls, checked -> Tools, or None without
    tools. Every problem is an ApiError(400) naming the field."""
    tools, choice = body.get('tools'), body.get('tool_choice')
    parallel = body.get('parallel_tool_calls', True)
    if not isinstance(parallel, bool):
        raise ApiError(400, "'parallel_tool_calls' must be true or false", 'parallel_tool_calls',
                       'invalid_type')
    if tools is None:
        if choice not in (None, 'none'):
            raise ApiError(400, "'tool_choice' needs 'tools'", 'tool_choice')
        return None
    if not isinstance(tools, list) or not 0 < len(tools) <= MAX_TOOLS:
        raise ApiError(400, f"'tools' must be a list of 1 to {MAX_TOOLS} {{\"type\": \"function\", "
                            "\"function\": {\"name\", \"parameters\"}}", 'tools')
    specs = []
    for i, t in enumerate(tools):
        f = t.get('function') if isinstance(t, dict) and t.get('type') == 'function' else None
        name = f.get('name') if isinstance(f, dict) else None
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ApiError(400, f"'tools'[{i}] must be {{\"type\": \"function\", \"function\": "
                                "{\"name\": ...}}, the name 1-64 letters, digits, _ or -", 'tools')
        if name in [s['name'] for s in specs]:
            raise ApiError(400, f"'tools': two tools are named {name!r}", 'tools')
        if not isinstance(f.get('description', ''), str):
            raise ApiError(400, f"'tools'[{i}]: the description must be a string", 'tools')
        try:
            params = grammar.checked_schema(f.get('parameters') or NO_PARAMETERS,
                                            f"tool {name!r}'s parameters")
        except grammar.GrammarError as e:
            raise ApiError(400, f"'tools'[{i}]: {e}", 'tools') from None
        specs.append({'name': name, 'description': f.get('description', ''), 'parameters': params})
    choice = 'auto' if choice is None else choice
    if isinstance(choice, dict) and choice.get('type') == 'function' \
            and isinstance(choice.get('function'), dict):
        choice = choice['function'].get('name')
        if choice not in [s['name'] for s in specs]:
            raise ApiError(400, f"'tool_choice' names {str(choice)[:64]!r}, which is not in "
                                "'tools'", 'tool_choice')
    elif choice not in ('auto', 'none', 'required'):
        raise ApiError(400, "'tool_choice' must be \"auto\", \"none\", \"required\" or {\"type\": "
                            "\"function\", \"function\": {\"name\": ...}}", 'tool_choice')
    return Tools(specs, choice, parallel)


# -----------------------------------------------------------------------------
# the prompt

def _call_text(calls):
    """An assistant's tool_calls [{id, type, function: {name, arguments}}] -> the reply's JSON."""
    return json.dumps({'tool_calls': [{'name': c['function']['name'],
                                       'arguments': c['function']['arguments']} for c in calls]},
                      ensure_ascii=False)


def messages_for(tok, messages, tools):
    """The chat's messages (OpenAI's shapes: assistant tool_calls, tool results) -> (messages, tools)
    for tok.render_chat, in the template's place for them or in nanolab's words (module
    docstring). An assistant's calls are checked here: ApiError naming 'messages'."""
    out, names = [], {}
    for m in messages:
        if not isinstance(m, dict) or not (m.get('tool_calls') or m.get('role') == 'tool'):
            out.append(m)
            continue
        if m.get('role') == 'tool':
            name = names.get(m.get('tool_call_id'), 'a tool')
            out.append({**m, 'content': m.get('content')} if tok.takes_tools else
                       {'role': 'user', 'content': f"Result of {name}: {m.get('content')}"})
            continue
        calls = m['tool_calls']
        try:
            calls = [{**c, 'function': {'name': c['function']['name'],
                                        'arguments': json.loads(c['function']['arguments'])}}
                     for c in calls]
            names.update({c.get('id'): c['function']['name'] for c in calls})
        except (TypeError, KeyError, ValueError):
            raise ApiError(400, "'messages': an assistant's tool_calls must be [{\"id\", \"type\": "
                                "\"function\", \"function\": {\"name\", \"arguments\": a JSON "
                                "text}}]", 'messages') from None
        out.append({**m, 'tool_calls': calls} if tok.takes_tools else
                   {'role': 'assistant', 'content': _call_text(calls)})
    if tools is None:
        return out, None
    listed = [{'type': 'function', 'function': s} for s in tools.specs]
    if tok.takes_tools:
        return out, listed
    text = ('You can call these tools. To call them, reply with only this JSON: {"tool_calls": '
            '[{"name": <tool name>, "arguments": <object>}]}\nTools: ' +
            json.dumps([{'name': s['name'], 'description': s['description'],
                         'parameters': s['parameters']} for s in tools.specs], ensure_ascii=False))
    try:
        tok.encode(text)
    except ValueError as e:  # a char vocabulary without '{'
        raise ApiError(400, f"'tools': the tool list cannot be written in this model's vocabulary "
                            f"({e})", 'tools') from None
    if out and isinstance(out[0], dict) and out[0].get('role') == 'system' \
            and isinstance(out[0].get('content'), str):
        return [{**out[0], 'content': out[0]['content'] + '\n\n' + text}] + out[1:], None
    return [{'role': 'system', 'content': text}] + out, None


# -----------------------------------------------------------------------------
# the reply

class CallStream:
    """A reply as it comes -> its calls, and OpenAI's tool_calls deltas for what each piece adds: a
    call's id, type and name once its name is written, then its arguments as they grow. Each
    character is read once (a resumable scan), so a long call streams in linear time."""
    def __init__(self):
        self.text, self.pos, self.calls = '', 0, []  # calls: [name, arguments so far]
        self.open, self.start, self.depth, self.in_string, self.escaped = False, 0, 0, False, False

    def push(self, piece):
        """-> the deltas piece adds: [{"index", "id", "type", "function": {"name", "arguments"}}]"""
        self.text += piece
        out = []
        while True:
            if not self.open:
                m = CALL.search(self.text, self.pos)
                if m is None:
                    return out
                self.calls.append([m[1], ''])
                out.append({'index': len(self.calls) - 1, 'id': new_id(), 'type': 'function',
                            'function': {'name': m[1], 'arguments': ''}})
                self.open, self.pos, self.start = True, m.end(), m.end()
                self.depth, self.in_string, self.escaped = 0, False, False
            end = self._scan()
            args, sent = self.text[self.start:end], self.calls[-1][1]
            if len(args) > len(sent):
                out.append({'index': len(self.calls) - 1,
                            'function': {'arguments': args[len(sent):]}})
                self.calls[-1][1] = args
            if end is None:
                return out
            self.open, self.pos = False, end

    def _scan(self):
        """On through the open call's arguments (a JSON value) -> the index just past it, or None
        while it is cut."""
        for i in range(self.pos, len(self.text)):
            c = self.text[i]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == '\\':
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
                    if self.depth == 0:
                        return i + 1
            elif c == '"':
                self.in_string = True
            elif c in '{[':
                self.depth += 1
            elif c in '}]' or c == ',' and self.depth == 0:
                if self.depth == 0:
                    return i  # a bare number, true, false or null ends at the call's brace
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        self.pos = len(self.text)
        return None


def tool_calls(text):
    """A whole reply -> OpenAI's tool_calls (new ids), each call's arguments as the reply wrote
    them (the last one cut if the reply was)."""
    stream = CallStream()
    stream.push(text)
    return [{'id': new_id(), 'type': 'function', 'function': {'name': n, 'arguments': a}}
            for n, a in stream.calls]


def new_id():
    return 'call_' + uuid.uuid4().hex[:24]
