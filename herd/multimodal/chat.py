"""Pull the images out of OpenAI-style chat messages, leaving {"type": "image"} parts that the chat
template renders as <|image|>."""
from __future__ import annotations

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


def extract_chat_images(messages: list[dict], load: Callable[[str], Image.Image]) -> tuple[list[dict], list]:
    """Return (messages with every image part replaced by {"type": "image"}, the images in prompt
    order). `load(url)` fetches URL parts, e.g. MediaConnector.load_image."""
    out, images = [], []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") in ("image", "image_pil", *_URL_PARTS):
                images.append(_part_image(part, load))
                parts.append({"type": "image"})
            else:
                parts.append(part)
        out.append({**message, "content": parts})
    return out, images
