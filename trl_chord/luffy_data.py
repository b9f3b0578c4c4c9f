"""LUFFY's expert completions: read from a column of the RL dataset, and tokenized as the policy would write them."""

from typing import Any


def expert_completions(value: Any, column: str, row: str) -> list:
    """
    The expert completions an RL row (`row` names it in errors) carries in `column`, as a list (empty when it has
    none): one completion (a string, or a list of messages) or a list of them. An empty string, an empty list, `None`
    and a completion whose every message has no content count as none.
    """
    if value is None:
        return []
    if isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], dict)):
        value = [value]  # one completion
    if not isinstance(value, list):
        raise ValueError(
            f"{row}: `{column}` must be an expert completion (a string or a list of messages) or a list of "
            f"them, got {type(value).__name__}."
        )
    completions = []
    for completion in value:
        if isinstance(completion, str):
            if completion.strip():
                completions.append(completion)
        elif isinstance(completion, list) and all(isinstance(m, dict) and "role" in m for m in completion):
            if any(str(message.get("content") or "").strip() for message in completion):
                completions.append(completion)
        elif completion is not None:
            raise ValueError(
                f"{row}: each expert completion in `{column}` must be a string or a list of messages "
                f"(dicts with `role` and `content`), got {type(completion).__name__}: {str(completion)[:80]!r}."
            )
    return completions


def expert_completion_ids(
    prompt: str | list,
    completion: str | list,
    processing_class,
    eos_token_ids: list[int],
    chat_template: str | None = None,
    chat_template_kwargs: dict | None = None,
) -> list[int]:
    """
    The token ids of an expert `completion` as the policy would generate them after `prompt` tokenized as
    GRPOTrainer tokenizes its prompts, ending at its first end-of-sequence token (`eos_token_ids`, GRPOTrainer's).

    A conversational prompt is rendered with the chat template and its generation prompt; the completion's tokens are
    what the template renders after it for prompt + completion (a plain-string completion is the assistant's
    message). A plain-text completion is tokenized on its own, without special tokens, as the authors' code does. A
    completion that holds no end-of-sequence token gets the tokenizer's appended, as a finished rollout has one.
    """
    if isinstance(prompt, list):
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        template = dict(chat_template=chat_template, tokenize=True, return_dict=True, **(chat_template_kwargs or {}))
        prompt_ids = processing_class.apply_chat_template(prompt, add_generation_prompt=True, **template)["input_ids"]
        full_ids = processing_class.apply_chat_template(prompt + completion, **template)["input_ids"]
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError(
                "The chat template does not render a prompt with its generation prompt as the start of the prompt "
                "followed by its expert completion, so the expert's tokens cannot follow the prompt's as a rollout's "
                f"do. Prompt: {str(prompt)[:80]!r}."
            )
        ids = full_ids[len(prompt_ids) :]
    elif isinstance(completion, str):
        ids = processing_class(text=completion, add_special_tokens=False)["input_ids"]
    else:
        raise ValueError(
            "A plain-text prompt takes a plain-text expert completion, got a list of messages: "
            f"{str(completion)[:80]!r}."
        )
    ends = [position for position, token in enumerate(ids) if token in eos_token_ids]
    if ends:
        return ids[: ends[0] + 1]
    return ids + [processing_class.eos_token_id if processing_class.eos_token_id is not None else eos_token_ids[0]]
