"""The model-written text of a completion, whatever its shape: what every reward here reads."""

from typing import Any


MAX_COMPLETION_CHARS = 100_000
"""Only this many characters from the end of a completion are read."""


def _message_text(message: Any) -> str:
    if isinstance(message, str):
        return message
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal content: [{"type": "text", "text": ...}, {"type": "image"}, ...]
        return "".join(
            part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def assistant_messages(completion: Any) -> list:
    """The model's own messages of a conversational completion (tool results are not the model's)."""
    if isinstance(completion, dict):
        completion = [completion]
    if not isinstance(completion, list):
        return []
    return [m for m in completion if not (isinstance(m, dict) and m.get("role") not in (None, "assistant"))]


def completion_text(completion: Any) -> str:
    """The model-written text of one completion, plain or conversational, cut to its last `MAX_COMPLETION_CHARS`.

    Example:
        >>> completion_text("The answer is 4.")
        'The answer is 4.'
        >>> completion_text([{"role": "assistant", "content": "The answer is 4."}])
        'The answer is 4.'
    """
    if isinstance(completion, str):
        text = completion
    else:
        text = "\n".join(_message_text(message) for message in assistant_messages(completion))
    return text[-MAX_COMPLETION_CHARS:]


def per_completion(value: Any, count: int) -> list:
    """A keyword argument as one value per completion: a list stays as it is, a single value is repeated."""
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value] * count
