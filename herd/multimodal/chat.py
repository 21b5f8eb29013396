"""Chat messages before templating: pull the images out of OpenAI-style messages (leaving
{"type": "image"} parts that the chat template renders as <|image|>), resolve --chat-template
(shipped templates by name, files, inline Jinja), and make tool-calling turns renderable."""
from __future__ import annotations

import os
from collections.abc import Callable

from PIL import Image

_URL_PARTS = ("image_url", "input_image")


def _part_image(part: dict, load: Callable[[str], Image.Image]):
    kind = part.get("type")
    if kind == "image_pil":
        image = part.get("image_pil")
        if image is not None and not isinstance(image, Image.Image):
            raise ValueError(f"an image_pil content part must carry a PIL image, got {type(image).__name__}")
    elif kind in _URL_PARTS:
        ref = part.get("image_url")
        url = ref.get("url") if isinstance(ref, dict) else ref
        if not isinstance(url, str) or not url:
            raise ValueError(f"{kind} content part has no url")
        image = load(url)
    else:  # "image": a PIL image or a URL under "image"
        image = part.get("image")
        if isinstance(image, str):
            if not image:
                raise ValueError("image content part has an empty url")
            image = load(image)
        elif image is not None and not isinstance(image, Image.Image):
            raise ValueError(f"an image content part must carry a URL string or a PIL image, "
                             f"got {type(image).__name__}")
    if image is None:
        raise ValueError(f"{kind} content part carries no image")
    return image


def _is_image_part(part) -> bool:
    return isinstance(part, dict) and part.get("type") in ("image", "image_pil", *_URL_PARTS)


def extract_chat_images(messages: list[dict], load: Callable[[str], Image.Image],
                        check: Callable[[int], None] | None = None) -> tuple[list[dict], list]:
    """Return (messages with every image part replaced by {"type": "image"}, the images in prompt
    order). `load(url)` fetches URL parts, e.g. MediaConnector.load_image. `check(n)` sees the
    number of image parts before any is fetched, so it can refuse them without network or file work."""
    contents = [m.get("content") if isinstance(m, dict) else None for m in messages]
    if check is not None:
        check(sum(_is_image_part(p) for c in contents if isinstance(c, list) for p in c))
    out, images = [], []
    for message, content in zip(messages, contents):
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for part in content:
            if _is_image_part(part):
                images.append(_part_image(part, load))
                parts.append({"type": "image"})
            else:
                parts.append(part)
        out.append({**message, "content": parts})
    return out, images


# ---- chat templates ----------------------------------------------------------------------------

# Templates shipped with herd, usable by name in --chat-template / chat_template: Llama 4 chat with
# tools in the format of the matching --tool-call-parser.
BUILTIN_CHAT_TEMPLATES = ("llama4_pythonic", "llama4_json")


def builtin_chat_template(name: str) -> str | None:
    """The text of a template shipped with herd, or None when `name` is not one."""
    if name not in BUILTIN_CHAT_TEMPLATES:
        return None
    from importlib.resources import files
    return (files("herd") / "assets" / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")


def resolve_chat_template(value: str | None) -> str | None:
    """--chat-template / chat_template: a shipped template's name, a file, or the Jinja text itself."""
    if not value:
        return value
    builtin = builtin_chat_template(value.strip())
    if builtin is not None:
        return builtin
    if "{" not in value and os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    return value


def prepare_tool_messages(messages: list) -> list:
    """OpenAI tool-calling turns -> what chat templates can render: an assistant message that only
    calls tools has `content: null`, which string templates cannot print; it becomes ""."""
    out = []
    for message in messages:
        if isinstance(message, dict) and message.get("content") is None and (
                message.get("tool_calls") or message.get("role") == "assistant"):
            message = {**message, "content": ""}
        out.append(message)
    return out
