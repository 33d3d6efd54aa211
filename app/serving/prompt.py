"""Renders a worker's FastChat conversation template plus chat messages into a prompt.

Byte-for-byte what FastChat's ``Conversation.get_prompt`` produces for the same template
and messages, except where FastChat crashes: text-only content parts work in every style,
and roles FastChat rejects (tool results, assistant tool calls) are rendered as turns.
Pure: no I/O.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence, Union

import orjson

from schemas.messages import ChatMessage

IMAGE_PLACEHOLDER = "$$<image>$$"
IMAGE_TOKEN = "<image>\n"

# A turn's message: None is the open slot, (text, images) a user turn with images.
Message = Union[str, None, tuple[str, list[str]]]
Turn = tuple[str, Message]

# sep_style numbers as FastChat's SeparatorStyle enum (auto() from 1).
(ADD_COLON_SINGLE, ADD_COLON_TWO, ADD_COLON_SPACE_SINGLE, NO_COLON_SINGLE, NO_COLON_TWO,
 ADD_NEW_LINE_SINGLE, LLAMA2, LLAMA3, CHATGLM, CHATML, CHATINTERN, DOLLY, RWKV, PHOENIX,
 ROBIN, FALCON_CHAT, CHATGLM3, DEEPSEEK_CHAT, METAMATH, YUAN2, GEMMA, CLLM,
 DEFAULT) = range(1, 24)

_STYLE_NAMES = {
    "ADD_COLON_SINGLE": ADD_COLON_SINGLE, "ADD_COLON_TWO": ADD_COLON_TWO,
    "ADD_COLON_SPACE_SINGLE": ADD_COLON_SPACE_SINGLE, "NO_COLON_SINGLE": NO_COLON_SINGLE,
    "NO_COLON_TWO": NO_COLON_TWO, "ADD_NEW_LINE_SINGLE": ADD_NEW_LINE_SINGLE,
    "LLAMA2": LLAMA2, "LLAMA3": LLAMA3, "CHATGLM": CHATGLM, "CHATML": CHATML,
    "CHATINTERN": CHATINTERN, "DOLLY": DOLLY, "RWKV": RWKV, "PHOENIX": PHOENIX,
    "ROBIN": ROBIN, "FALCON_CHAT": FALCON_CHAT, "CHATGLM3": CHATGLM3,
    "DEEPSEEK_CHAT": DEEPSEEK_CHAT, "METAMATH": METAMATH, "YUAN2": YUAN2, "GEMMA": GEMMA,
    "CLLM": CLLM, "DEFAULT": DEFAULT}

# Styles that show images as placeholders; the others take the text alone.
_PLACEHOLDER_STYLES = {ADD_COLON_SINGLE, ADD_COLON_TWO, CHATML, CLLM}


class TemplateError(ValueError):
    """The worker's template cannot be used (unknown style, missing keys)."""


def render(template: Mapping[str, Any], messages: Sequence[ChatMessage]) -> tuple[str, list[str]]:
    """The prompt for ``messages`` and the images to send along, in order."""
    try:
        style = style_of(template)
        roles = template["roles"]
        system_message = template["system_message"] or ""
        turns: list[Turn] = [(t[0], t[1]) for t in template.get("messages") or ()]
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise TemplateError(f"unusable conversation template: {exc!r}") from None
    renderer = _RENDERERS.get(style)
    if renderer is None:
        raise TemplateError(f"unknown sep_style {style!r}")
    images: list[str] = []
    for message in messages:
        role = message["role"]
        text = message.get("content", "")
        if role == "system":
            system_message = text
        elif role == "assistant":
            turns.append((roles[1], text or _tool_call_text(message)))
        elif message.get("images"):
            urls = message["images"]
            images.extend(urls)
            turns.append((roles[0], (IMAGE_TOKEN * len(urls) + text, list(urls))))
        else:  # user, and tool results, which the model reads as the next user turn
            turns.append((roles[0], text))
    turns.append((roles[1], None))
    system_template = template.get("system_template")
    system_prompt = _system_prompt(
        "{system_message}" if system_template is None else system_template, system_message)
    conv = _Conv(template, style, system_prompt, system_message, turns)
    return renderer(conv), images


def style_of(template: Mapping[str, Any]) -> int:
    """The template's sep_style in the numbering above (FastChat's git main).

    The fschat 0.2.36 release on PyPI numbers the styles differently: LLAMA3 was inserted
    after LLAMA2 later, shifting CHATGLM (8) and everything after it by one. Templates from
    those newer versions also carry ``max_image_size_mb``/``system_message_vision``, which
    is how the two numberings are told apart.
    """
    value = template["sep_style"]
    if isinstance(value, str) and not value.isdigit():
        return _STYLE_NAMES[value.upper()]
    number = int(value)
    newer = "max_image_size_mb" in template or "system_message_vision" in template
    if not newer and number >= CHATGLM - 1:
        return number + 1
    return number


def _tool_call_text(message: ChatMessage) -> str:
    calls = message.get("tool_calls") or []
    return "\n".join(orjson.dumps({"name": c["function"]["name"],
                                   "arguments": c["function"]["arguments"]}).decode()
                     for c in calls)


def _system_prompt(system_template: str, system_message: str) -> str:
    try:
        return system_template.format(system_message=system_message)
    except (KeyError, IndexError, ValueError):
        return system_template.replace("{system_message}", system_message)


class _Conv:
    def __init__(self, template: Mapping[str, Any], style: int, system_prompt: str,
                 system_message: str, turns: list[Turn]) -> None:
        self.name = template.get("name") or ""
        self.roles = template["roles"]
        self.sep: str = template.get("sep") or ""
        self.sep2: str = template.get("sep2") or ""
        self.system = system_prompt
        self.system_message = system_message
        self.style = style
        self.turns = turns

    def text(self, message: Message) -> str:
        """A turn's text, with image placeholders where this style shows them."""
        if isinstance(message, tuple):
            text, images = message
            if self.style in _PLACEHOLDER_STYLES:
                return IMAGE_PLACEHOLDER * len(images) + text
            return text
        return message or ""

    def seps(self, index: int) -> str:
        return self.sep if index % 2 == 0 else self.sep2


Renderer = Callable[[_Conv], str]


def _colon_style(after_role: str, open_slot: str, two_seps: bool) -> Renderer:
    def render_turns(c: _Conv) -> str:
        out = c.system + c.sep
        for i, (role, msg) in enumerate(c.turns):
            if msg:
                out += role + after_role + c.text(msg) + (c.seps(i) if two_seps else c.sep)
            else:
                out += role + open_slot
        return out
    return render_turns


def _no_colon(two_seps: bool) -> Renderer:
    def render_turns(c: _Conv) -> str:
        out = c.system
        for i, (role, msg) in enumerate(c.turns):
            out += role + c.text(msg) + (c.seps(i) if two_seps else c.sep) if msg else role
        return out
    return render_turns


def _new_line_single(c: _Conv) -> str:
    out = c.system + c.sep if c.system else ""
    for role, msg in c.turns:
        out += role + "\n" + c.text(msg) + c.sep if msg else role + "\n"
    return out


def _rwkv(c: _Conv) -> str:
    out = c.system
    for role, msg in c.turns:
        if msg:
            out += role + ": " + c.text(msg).replace("\r\n", "\n").replace("\n\n", "\n")
            out += "\n\n"
        else:
            out += role + ":"
    return out


def _llama2(c: _Conv) -> str:
    out = c.system if c.system_message else "[INST] "
    for i, (_, msg) in enumerate(c.turns):
        tag = c.roles[i % 2]
        if msg:
            out += c.text(msg) + " " if i == 0 else tag + " " + c.text(msg) + c.seps(i)
        else:
            out += tag
    return out


def _llama3(c: _Conv) -> str:
    out = "<|begin_of_text|>" + (c.system if c.system_message else "")
    for role, msg in c.turns:
        out += f"<|start_header_id|>{role}<|end_header_id|>\n\n"
        if msg:
            out += c.text(msg).strip() + "<|eot_id|>"
    return out


def _chatglm(c: _Conv) -> str:
    first_round = 1 if c.name == "chatglm2" else 0
    out = c.system + c.sep if c.system else ""
    for i, (role, msg) in enumerate(c.turns):
        if i % 2 == 0:
            out += f"[Round {i // 2 + first_round}]{c.sep}"
        out += f"{role}：{c.text(msg)}{c.sep}" if msg else f"{role}："
    return out


def _chatml(c: _Conv) -> str:
    out = c.system + c.sep + "\n" if c.system else ""
    for role, msg in c.turns:
        out += role + "\n" + c.text(msg) + c.sep + "\n" if msg else role + "\n"
    return out


def _chatglm3(c: _Conv) -> str:
    out = c.system if c.system_message else ""
    for role, msg in c.turns:
        out += role + "\n" + c.text(msg) if msg else role
    return out


def _chatintern(c: _Conv) -> str:
    out = c.system
    for i, (role, msg) in enumerate(c.turns):
        if i % 2 == 0:
            out += "<s>"
        out += role + ":" + c.text(msg) + c.seps(i) + "\n" if msg else role + ":"
    return out


def _dolly(c: _Conv) -> str:
    out = c.system
    for i, (role, msg) in enumerate(c.turns):
        if msg:
            out += role + ":\n" + c.text(msg) + c.seps(i) + ("\n\n" if i % 2 == 1 else "")
        else:
            out += role + ":\n"
    return out


def _phoenix(c: _Conv) -> str:
    out = c.system
    for role, msg in c.turns:
        out += role + ": <s>" + c.text(msg) + "</s>" if msg else role + ": <s>"
    return out


def _robin(c: _Conv) -> str:
    out = c.system + c.sep
    for role, msg in c.turns:
        out += role + ":\n" + c.text(msg) + c.sep if msg else role + ":\n"
    return out


def _falcon_chat(c: _Conv) -> str:
    out = c.system + c.sep if c.system_message else ""
    for role, msg in c.turns:
        out += role + ": " + c.text(msg) + c.sep if msg else role + ":"
    return out


def _metamath(c: _Conv) -> str:
    out = c.system + c.sep if c.system else ""
    for i, (role, msg) in enumerate(c.turns):
        # sep2 prefixes the answer turns; only question turns end with sep.
        start = ":\n" if i % 2 == 0 else ": " + c.sep2
        out += role + start + (c.text(msg) + (c.sep if i % 2 == 0 else "") if msg else "")
    return out


def _deepseek_chat(c: _Conv) -> str:
    out = c.system
    for i, (role, msg) in enumerate(c.turns):
        out += role + ": " + c.text(msg) + c.seps(i) if msg else role + ":"
    return out


def _yuan2(c: _Conv) -> str:
    out = c.system + c.sep2 if c.system_message else ""
    for _, msg in c.turns:
        out += c.text(msg) + "<n>" if msg else ""
    # rstrip of a string strips any of its characters, as FastChat does.
    return out.rstrip("<n>") + c.sep


def _gemma(c: _Conv) -> str:
    out = "<bos>"
    for role, msg in c.turns:
        out += "<start_of_turn>" + role + "\n" + (c.text(msg) + c.sep if msg else "")
    return out


def _cllm(c: _Conv) -> str:
    out = c.system + c.sep
    for i, (role, msg) in enumerate(c.turns[-2:]):
        out += role + ": " + c.text(msg) + c.seps(i) if msg else role + ":"
    return out


def _default(c: _Conv) -> str:
    out = c.system + "\n"
    for role, msg in c.turns:
        out += role + ": " + c.text(msg) + "\n" if msg else role + ":"
    return out


_RENDERERS: dict[int, Renderer] = {
    ADD_COLON_SINGLE: _colon_style(": ", ":", two_seps=False),
    ADD_COLON_TWO: _colon_style(": ", ":", two_seps=True),
    ADD_COLON_SPACE_SINGLE: _colon_style(": ", ": ", two_seps=False),
    NO_COLON_SINGLE: _no_colon(two_seps=False),
    NO_COLON_TWO: _no_colon(two_seps=True),
    ADD_NEW_LINE_SINGLE: _new_line_single,
    LLAMA2: _llama2,
    LLAMA3: _llama3,
    CHATGLM: _chatglm,
    CHATML: _chatml,
    CHATINTERN: _chatintern,
    DOLLY: _dolly,
    RWKV: _rwkv,
    PHOENIX: _phoenix,
    ROBIN: _robin,
    FALCON_CHAT: _falcon_chat,
    CHATGLM3: _chatglm3,
    DEEPSEEK_CHAT: _deepseek_chat,
    METAMATH: _metamath,
    YUAN2: _yuan2,
    GEMMA: _gemma,
    CLLM: _cllm,
    DEFAULT: _default,
}


def stop_strings(template: Mapping[str, Any]) -> list[str]:
    """The template's stop_str as a list (FastChat allows a string, a list or null)."""
    stop = template.get("stop_str")
    if not stop:
        return []
    if isinstance(stop, str):
        return [stop]
    return [s for s in stop if isinstance(s, str) and s]
