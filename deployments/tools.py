"""Tool calling: tools into the prompt, the model's tool-call text out as OpenAI ``tool_calls``.

Models write tool calls in their family's format; one ``ToolFormat`` per format knows how a call
looks, how to find calls in a finished text, and the grammar that makes a forced call
(``tool_choice: "required"`` or a named function) parse with arguments valid against the
tool's JSON Schema (cluster/guided.py enforces it):

- ``hermes``: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` blocks (Qwen2, Hermes);
- ``llama3_json``: ``{"name": ..., "parameters": {...}}``, calls joined by ``; `` (Llama 3.1+);
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``.

The format is ``tool_call_parser`` in the config, or picked from the chat template. A model whose
chat template takes no tools gets them, and its earlier calls and their results, as text in the
chosen format (a system message describes the tools), so any chat model can be offered tools.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

PROBE_TOOL = {"type": "function", "function": {"name": "shardserve_probe_tool", "description": "probe", "parameters": {}}}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of the arguments object
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def openai(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def _call_schema(tool: dict, args_key: str) -> dict:
    fn = tool["function"]
    params = fn.get("parameters") or {"type": "object"}
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, args_key: params},
            "required": ["name", args_key], "additionalProperties": False}  # fmt: skip


def _json_rule(schema: dict) -> str:
    # llguidance's %json takes a schema inline; no free whitespace, so a call is written compactly.
    return "%json " + json.dumps({"x-guidance": {"whitespace_flexible": False}, **schema})


def _one_of(tools: list[dict], args_key: str) -> dict:
    schemas = [_call_schema(t, args_key) for t in tools]
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def _load_call(obj, args_key: str) -> ToolCall | None:
    """A parsed JSON value as a call, if it has a string name and an object of arguments."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class ToolFormat:
    name: str
    start: str  # text that begins the calls: what streaming holds back until it can tell
    args_key = "arguments"

    def render(self, calls: list[dict]) -> str:
        """Earlier calls (OpenAI tool_calls) as the model writes them, for templates without tools."""
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a finished text; no calls: the text is all content."""
        raise NotImplementedError

    def grammar(self, tools: list[dict], parallel: bool) -> str:
        """A Lark grammar (llguidance) for text that is only calls of these tools."""
        raise NotImplementedError

    def calls_begin(self, text: str) -> int | None:
        """Where in the text so far the calls begin, if they have."""
        begin = text.find(self.start)
        return begin if begin >= 0 else None

    def undecided_tail(self, text: str) -> int:
        """How many trailing characters may yet turn out to begin the calls (held back while streaming)."""
        return next((n for n in range(min(len(self.start), len(text)), 0, -1) if self.start.startswith(text[-n:])), 0)

    def _call_dicts(self, calls: list[dict]) -> list[dict]:
        out = []
        for c in calls:
            args = c["function"]["arguments"]
            try:
                args = json.loads(args) if isinstance(args, str) else args
            except json.JSONDecodeError:
                pass  # kept as the client sent it
            out.append({"name": c["function"]["name"], self.args_key: args})
        return out


class Hermes(ToolFormat):
    name, start = "hermes", "<tool_call>"
    BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def render(self, calls: list[dict]) -> str:
        return "\n".join(f"<tool_call>\n{json.dumps(c, ensure_ascii=False)}\n</tool_call>" for c in self._call_dicts(calls))

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        begin = text.find(self.start)
        if begin < 0:
            return text, []
        calls = []
        for block in self.BLOCK.findall(text[begin:]):
            try:
                call = _load_call(json.loads(block), self.args_key)
            except json.JSONDecodeError:
                call = None
            if call is None:
                return text, []  # not calls after all: leave the text as the model wrote it
            calls.append(call)
        return text[:begin].strip() or None, calls

    def grammar(self, tools: list[dict], parallel: bool) -> str:
        rest = ' ("\\n" call)*' if parallel else ""
        return f'start: call{rest}\ncall: "<tool_call>\\n" {_json_rule(_one_of(tools, self.args_key))} "\\n</tool_call>"\n'


class Llama3Json(ToolFormat):
    name, start, args_key = "llama3_json", "{", "parameters"  # start: see calls_begin
    TAG = "<|python_tag|>"

    def render(self, calls: list[dict]) -> str:
        return "; ".join(json.dumps(c, ensure_ascii=False) for c in self._call_dicts(calls))

    def calls_begin(self, text: str) -> int | None:
        # Only an answer that opens with a JSON object (or the tag) is calls; a brace later is content.
        rest = text.lstrip()
        return len(text) - len(rest) if rest.startswith(("{", self.TAG)) else None

    def undecided_tail(self, text: str) -> int:
        rest = text.lstrip()
        return len(text) if not rest or self.TAG.startswith(rest) else 0

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = text.strip().removeprefix(self.TAG).strip()
        if not body.startswith("{"):
            return text, []
        decoder, calls, pos = json.JSONDecoder(), [], 0
        while pos < len(body):
            try:
                obj, pos = decoder.raw_decode(body, pos)
            except json.JSONDecodeError:
                return text, []
            call = _load_call(obj, self.args_key)
            if call is None:
                return text, []
            calls.append(call)
            pos = len(body) - len(body[pos:].lstrip().removeprefix(";").lstrip())
        return None, calls

    def grammar(self, tools: list[dict], parallel: bool) -> str:
        rest = ' ("; " call)*' if parallel else ""
        return f"start: call{rest}\ncall: {_json_rule(_one_of(tools, self.args_key))}\n"


class Mistral(ToolFormat):
    name, start = "mistral", "[TOOL_CALLS]"

    def render(self, calls: list[dict]) -> str:
        return self.start + json.dumps(self._call_dicts(calls), ensure_ascii=False)

    def calls_begin(self, text: str) -> int | None:
        # The marker, or (its special token dropped from the text) an answer that opens with a list.
        marker = super().calls_begin(text)
        rest = text.lstrip()
        return marker if marker is not None or not rest.startswith("[{") else len(text) - len(rest)

    def undecided_tail(self, text: str) -> int:
        rest = text.lstrip()
        return len(text) if not rest or "[{".startswith(rest) else super().undecided_tail(text)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        # The marker is a special token that detokenized text may lack: a bare list of calls counts too.
        begin = text.find(self.start)
        content, body = (text[:begin], text[begin + len(self.start) :]) if begin >= 0 else ("", text)
        body = body.strip()
        if not body.startswith("["):
            return text, []
        try:
            items = json.loads(body)
        except json.JSONDecodeError:
            return text, []
        calls = [_load_call(item, self.args_key) for item in items] if isinstance(items, list) and items else [None]
        if None in calls:
            return text, []
        return content.strip() or None, calls

    def grammar(self, tools: list[dict], parallel: bool) -> str:
        bounds = {"minItems": 1} if parallel else {"minItems": 1, "maxItems": 1}
        calls = {"type": "array", "items": _one_of(tools, self.args_key), **bounds}
        return f'start: "{self.start}" {_json_rule(calls)}\n'


FORMATS = {f.name: f for f in (Hermes(), Llama3Json(), Mistral())}


def pick_format(setting: str, chat_template: str | None) -> ToolFormat:
    """The configured format, or on "auto" the one the chat template writes (hermes if it shows none)."""
    if setting != "auto":
        return FORMATS[setting]
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return FORMATS["mistral"]
    if "<tool_call>" in template:
        return FORMATS["hermes"]
    if "<|python_tag|>" in template or "ipython" in template:
        return FORMATS["llama3_json"]
    return FORMATS["hermes"]


def template_takes_tools(tokenizer) -> bool:
    """Whether the chat template writes the tools it is given into the prompt."""
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=[PROBE_TOOL], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
    except Exception:
        return False
    return PROBE_TOOL["function"]["name"] in text


def tools_system_text(fmt: ToolFormat, tools: list[dict]) -> str:
    """The tools, described for a model whose template takes none."""
    listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    example = fmt.render([{"function": {"name": "<name>", "arguments": {"<argument>": "<value>"}}}])
    return (f"These functions are available; each is a JSON Schema of its arguments:\n{listing}\n"
            f"To call one, answer with nothing but the call, written as:\n{example}\n"
            "The results come back in messages from the role 'tool'.")  # fmt: skip


# A call object's head as models write it: its name first, then its arguments' key.
CALL_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


class _CallObjects:
    """Finds the call objects (top-level JSON objects) in the text of the calls as it grows, and
    within the open one its name and the extent of its arguments, without parsing it whole."""

    def __init__(self):
        self.pos = 0  # characters scanned
        self.depth = 0  # of braces, outside strings
        self.in_string = self.escaped = False
        self.start: int | None = None  # where the open object begins
        self.args_end: int | None = None  # where the open object's arguments object ends, once it has

    def scan(self, text: str, args_start: int | None) -> list[tuple[int, int]]:
        """Scan the new text; returns the (start, end) of the objects that closed."""
        closed = []
        for i in range(self.pos, len(text)):
            ch = text[i]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch == "{":
                if self.depth == 0:
                    self.start, self.args_end = i, None
                self.depth += 1
            elif ch == "}" and self.depth > 0:
                self.depth -= 1
                if self.depth == 1 and args_start is not None and i >= args_start and self.args_end is None:
                    self.args_end = i + 1  # the arguments object closed; the call object goes on
                if self.depth == 0:
                    closed.append((self.start, i + 1))
                    self.start = None
        self.pos = len(text)
        return closed


class ToolCallStream:
    """Streaming, as OpenAI streams calls: content deltas go out at once unless they may begin tool
    calls; then each call goes out as delta.tool_calls fragments: its id and name once the name is
    whole, its arguments' text as it is generated. A call whose name does not come first goes out
    whole once complete; held text that turns out to be no calls goes out as content at the end."""

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self.text = ""  # everything generated so far
        self.sent = 0  # characters of text already sent as content
        self.holding = False  # the calls have begun: nothing more goes out as content
        self.objects = _CallObjects()
        self.calls: list[ToolCall] = []  # calls announced so far (ids, names; arguments as sent)
        self.args_start: int | None = None  # in text: where the open call's arguments begin
        self.args_sent = 0  # in text: how far the open call's arguments went out

    def feed(self, delta: str) -> tuple[str, list[dict]]:
        """(content, tool-call delta fragments) to send now."""
        self.text += delta
        if not self.holding:
            begin = self.fmt.calls_begin(self.text)
            if begin is None:
                end = len(self.text) - self.fmt.undecided_tail(self.text)
                out, self.sent = self.text[self.sent : end], max(self.sent, end)
                return out, []
            self.holding = True
            out, self.sent = self.text[self.sent : begin], begin
            self.objects.pos = begin
            return out, self._fragments()
        return "", self._fragments()

    def _fragments(self) -> list[dict]:
        fragments = []
        for start, end in self.objects.scan(self.text, self.args_start):
            fragments += self._close(start, end)
        if self.objects.start is not None:
            if self.args_start is None:  # a new call: announce it once its name is whole
                head = CALL_HEAD.match(self.text, self.objects.start)
                if head is not None:
                    name = json.loads(f'"{head.group(1)}"')
                    self.calls.append(ToolCall(name, ""))
                    self.args_start = self.args_sent = head.end()
                    fragments.append(self.calls[-1].openai(index=len(self.calls) - 1))
            if self.args_start is not None:
                fragments += self._arguments(self.objects.args_end or len(self.text))
        return fragments

    def _arguments(self, upto: int) -> list[dict]:
        """The open call's arguments text from where it was up to `upto` (blanks before them held)."""
        if self.args_sent == self.args_start:
            while self.args_sent < upto and self.text[self.args_sent].isspace():
                self.args_sent += 1
            self.args_start = self.args_sent
        piece = self.text[self.args_sent : upto]
        if not piece:
            return []
        self.args_sent = upto
        return [{"index": len(self.calls) - 1, "function": {"arguments": piece}}]

    def _close(self, start: int, end: int) -> list[dict]:
        """A call object closed: the rest of its arguments, or, unannounced, the whole call."""
        if self.args_start is not None and start < self.args_start:
            fragments = self._arguments(self.objects.args_end or end - 1)
            self.args_start = None
            return fragments
        try:
            call = _load_call(json.loads(self.text[start:end]), self.fmt.args_key)
        except json.JSONDecodeError:
            call = None
        if call is None:
            return []
        self.calls.append(call)
        return [call.openai(index=len(self.calls) - 1)]

    def finish(self) -> tuple[str, list[dict]]:
        """At the end: content still held back (all of it, if it was no calls) and the last fragments."""
        held = self.text[self.sent :]
        if not held:
            return "", []
        fragments = self._fragments()
        content, calls = self.fmt.parse(held)
        if not calls and not self.calls:
            return held, []
        return (content or "") if calls else "", fragments


@dataclass(frozen=True)
class ToolSetup:
    """How this model is offered tools: its call format, and whether its chat template takes them."""

    format: ToolFormat
    template_takes_tools: bool

    @classmethod
    def for_tokenizer(cls, setting: str, tokenizer) -> ToolSetup:
        return cls(pick_format(setting, getattr(tokenizer, "chat_template", None)), template_takes_tools(tokenizer))

    def messages(self, messages: list[dict], tools: list[dict] | None) -> tuple[list[dict], list[dict] | None]:
        """The chat as the template gets it, and the tools for the template (None when written into
        the messages instead). Earlier calls' arguments become objects, as templates expect them."""
        if self.template_takes_tools:
            out = []
            for m in messages:
                if m.get("tool_calls"):
                    calls = [{"id": c.get("id"), "type": "function", "function": {"name": c["function"]["name"],
                              "arguments": _as_object(c["function"]["arguments"])}} for c in m["tool_calls"]]  # fmt: skip
                    m = {**m, "tool_calls": calls}
                out.append(m)
            return out, tools
        out = []
        for m in messages:
            if m.get("tool_calls"):
                text = "\n".join(t for t in (m["content"], self.format.render(m["tool_calls"])) if t)
                m = {k: v for k, v in m.items() if k != "tool_calls"} | {"content": text}
            out.append(m)
        if tools:
            system = tools_system_text(self.format, tools)
            if out and out[0]["role"] == "system":
                out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + system}
            else:
                out.insert(0, {"role": "system", "content": system})
        return out, None


def _as_object(arguments: str):
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return arguments
    return value if isinstance(value, dict) else arguments
