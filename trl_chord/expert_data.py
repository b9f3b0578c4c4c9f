"""Expert demonstrations for the CHORD SFT term: validation, tokenization and the collators."""

import io
import json
from collections import Counter
from typing import Any

import torch
from datasets import Dataset, Features, Sequence, Value
from datasets import Image as ImageFeature
from transformers import PreTrainedTokenizerBase, ProcessorMixin
from transformers.utils import logging
from trl.data_utils import common_prefix_length, prepare_multimodal_messages


logger = logging.get_logger(__name__)

SKIP_EMPTY_COMPLETION = "empty completion"
SKIP_NO_ASSISTANT_TURN = "no assistant turn"
SKIP_TRUNCATED_AWAY = "completion truncated away"
SKIP_IMAGE_CUT = "an image cut by the length limit"
# Roles that chat templates of common model families render; anything else is a data error, not a new role
KNOWN_ROLES = {"system", "developer", "user", "assistant", "tool", "ipython", "function"}
IMAGE_COLUMNS = ("images", "image")
# The processor outputs with one value per token (TRL's names); every other one is per image
PER_TOKEN_IMAGE_INPUTS = ("token_type_ids", "mm_token_type_ids")
# A processor's tokenized examples, declared so that a run of examples without images leaves no column untyped
PROCESSOR_TOKENIZED_FEATURES = Features(
    {
        "input_ids": Sequence(Value("int64")),
        "completion_mask": Sequence(Value("int64")),
        "skip_reason": Value("string"),
        "images": Sequence(ImageFeature(decode=False)),
        "text": Value("string"),
    }
)


def expert_dataset_format(column_names: list[str]) -> str:
    """`"prompt_completion"` or `"messages"`, from an expert dataset's columns; a clear error for anything else."""
    if "prompt" in column_names and "completion" in column_names:
        return "prompt_completion"
    if "messages" in column_names:
        return "messages"
    raise ValueError(
        f"`expert_dataset` has columns {column_names}, but CHORD needs either `prompt` and `completion` (plain text "
        "or conversational) or `messages` (conversational; the assistant turns are trained). An optional `tools` "
        "column is passed to the chat template."
    )


def _load_tools(tools: Any, index: int) -> list | None:
    if tools is None or isinstance(tools, list):
        return tools
    if isinstance(tools, str):
        try:
            return json.loads(tools)
        except json.JSONDecodeError as error:
            raise ValueError(f"Expert example {index}: the `tools` column is not valid JSON ({error}).") from error
    raise ValueError(f"Expert example {index}: `tools` must be a list or a JSON string, got {type(tools).__name__}.")


def _check_messages(messages: Any, column: str, index: int) -> None:
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError(
            f"Expert example {index}: `{column}` must be a list of messages (dicts with `role` and `content`), got "
            f"{type(messages).__name__}: {str(messages)[:80]!r}."
        )
    unknown_roles = {message["role"] for message in messages} - KNOWN_ROLES
    if unknown_roles:
        raise ValueError(
            f"Expert example {index}: `{column}` has messages with unknown roles {sorted(map(str, unknown_roles))}; "
            f"expected roles among {sorted(KNOWN_ROLES)}."
        )


def is_empty_message(message: dict[str, Any]) -> bool:
    """
    A message with nothing to train on: no text (an empty or whitespace-only content, or content blocks with none)
    and nothing else for the chat template to render (tool calls, reasoning). Trained, it would teach the end-of-turn
    tokens alone.
    """
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(str(part.get("text") or "") for part in content if isinstance(part, dict))
    has_other_fields = any(value for key, value in message.items() if key not in ("role", "content"))
    return not str(content or "").strip() and not has_other_fields


def example_is_conversational(example: dict[str, Any], index: int) -> bool:
    """Whether an expert example is conversational; a clear error for columns of the wrong type."""
    if "prompt" in example and "completion" in example:
        prompt, completion = example["prompt"], example["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return False
        if isinstance(prompt, list) and isinstance(completion, list):
            _check_messages(prompt, "prompt", index)
            _check_messages(completion, "completion", index)
            return True
        raise ValueError(
            f"Expert example {index}: `prompt` and `completion` must both be strings or both be lists of messages, "
            f"got {type(prompt).__name__} and {type(completion).__name__}."
        )
    _check_messages(example["messages"], "messages", index)
    return True


def expert_images(example: dict[str, Any], index: int) -> list:
    """An expert example's images as stored: its `images` list, or its one `image`; `[]` when it has none."""
    images = example.get("images")
    if images is None:
        return [] if example.get("image") is None else [example["image"]]
    if not isinstance(images, list):
        raise ValueError(f"Expert example {index}: `images` must be a list of images, got {type(images).__name__}.")
    return images


def load_expert_image(image: Any, index: int | None = None):
    """
    A PIL image from a stored one: a PIL image, a file path (or URL), or `datasets`' undecoded `{"bytes", "path"}`
    dict. One that cannot be read raises a `ValueError` that names the expert example (its `index`, when given).
    """
    from PIL import Image  # only expert data with images needs it: `pip install 'trl-chord[vision]'`
    from transformers.image_utils import load_image

    where = "An expert example" if index is None else f"Expert example {index}"
    try:
        if isinstance(image, dict) and image.get("bytes") is not None:
            loaded = Image.open(io.BytesIO(image["bytes"]))
            loaded.load()  # decode now: a damaged image fails here, naming its example, not in the processor
            return loaded
        if isinstance(image, dict):
            image = image.get("path")
        if isinstance(image, (str, Image.Image)):
            return load_image(image)
    except (OSError, ValueError) as error:
        raise ValueError(f"{where}: an image cannot be read ({type(error).__name__}: {error}).") from error
    raise ValueError(
        f"{where}: an image must be a PIL image, a file path or `datasets`' {{'bytes', 'path'}} dict, got "
        f"{type(image).__name__}."
    )


def _multimodal_conversation(messages: list, images: list, index: int) -> list:
    """
    `messages` as TRL gives a vision-language model's prompts to its processor: content blocks, with `images` in the
    `{"type": "image"}` placeholders, or, in a conversation of plain strings, before the first user message's text.
    """
    for message in messages:
        content = message.get("content")
        parts = content if isinstance(content, list) else []
        if any(
            isinstance(part, dict) and part.get("type") == "image" and part.get("image") is not None for part in parts
        ):
            raise ValueError(
                f"Expert example {index}: a message holds an image itself; put the images in the `images` column and "
                "mark where each goes with a `{'type': 'image'}` block."
            )
    try:
        return prepare_multimodal_messages(messages, images=images)
    except (KeyError, TypeError, ValueError) as error:  # placeholders and images that do not pair up, bad roles
        raise ValueError(f"Expert example {index}: {error}") from error


def _count_images(messages: list) -> int:
    return sum(
        part.get("type") == "image"
        for message in messages
        if isinstance(message.get("content"), list)
        for part in message["content"]
    )


def _chat_encoder(processing_class, tools: list | None, images: list, index: int):
    """
    `encode(messages, **template_kwargs)`: the token ids of a conversation rendered by the chat template. A processor
    also expands each of the conversation's images (the first of `images`, in order) into its placeholder tokens.
    """
    if not isinstance(processing_class, ProcessorMixin):

        def encode(messages: list, **template_kwargs) -> list[int]:
            return processing_class.apply_chat_template(
                messages, tools=tools, tokenize=True, return_dict=True, **template_kwargs
            )["input_ids"]

        return encode

    def encode(messages: list, **template_kwargs) -> list[int]:
        text = processing_class.apply_chat_template(messages, tools=tools, tokenize=False, **template_kwargs)
        num_images = _count_images(messages)
        try:
            inputs = processing_class(
                text=[text], images=[images[:num_images]] if num_images else None, add_special_tokens=False
            )
        except (IndexError, KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"Expert example {index}: the processor fails on it ({type(error).__name__}: {error})."
            ) from error
        return [int(token) for token in inputs["input_ids"][0]]

    return encode


def _checked_images(example: dict[str, Any], index: int, is_processor: bool, conversational: bool) -> list:
    images = expert_images(example, index)
    if images and not is_processor:
        raise ValueError(
            f"Expert example {index} has {len(images)} image(s), but the policy's `processing_class` is a tokenizer: "
            "images need a vision-language model and its processor (`AutoProcessor.from_pretrained(...)`) as "
            "`processing_class`. For a text-only policy, leave the images out."
        )
    if images and not conversational:
        raise ValueError(
            f"Expert example {index} has images but plain-text `prompt` and `completion`: an example with images "
            "must be conversational (lists of messages), so that the chat template places them."
        )
    return images


def _conversation_tokens(example, processing_class, tools, images: list, index: int) -> tuple[list, list, str]:
    """
    A conversational example's tokens through the chat template, the mask of its completion (each assistant turn of
    `messages`, found by rendering the conversation up to it), and, for a processor and an example with images, the
    rendered text the collator hands the processor with them.
    """
    loaded_images = [load_expert_image(image, index) for image in images]
    encode = _chat_encoder(processing_class, tools, loaded_images, index)
    messages_format = "messages" in example and not ("prompt" in example and "completion" in example)
    if messages_format:
        messages = example["messages"]
    else:
        messages, num_prompt_messages = example["prompt"] + example["completion"], len(example["prompt"])
    text = ""
    if isinstance(processing_class, ProcessorMixin):
        messages = _multimodal_conversation(messages, loaded_images, index)
        if images:
            text = processing_class.apply_chat_template(messages, tools=tools, tokenize=False)
    input_ids = encode(messages)
    if not messages_format:
        prompt_length = common_prefix_length(
            encode(messages[:num_prompt_messages], add_generation_prompt=True), input_ids
        )
        return input_ids, [0] * prompt_length + [1] * (len(input_ids) - prompt_length), text
    completion_mask = [0] * len(input_ids)
    for turn, message in enumerate(messages):
        if message.get("role") != "assistant" or is_empty_message(message):
            continue
        start = common_prefix_length(encode(messages[:turn], add_generation_prompt=True), input_ids)
        end = common_prefix_length(encode(messages[: turn + 1]), input_ids)
        completion_mask[start:end] = [1] * (end - start)
    return input_ids, completion_mask, text


def _plain_text_tokens(example: dict[str, Any], processing_class) -> tuple[list, list]:
    """`prompt + completion` tokenized, with the EOS token appended so that the model learns to stop as its rollouts
    do, and the mask of the completion."""
    tokenizer = processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class
    prompt_ids = tokenizer(text=example["prompt"])["input_ids"]
    input_ids = tokenizer(text=example["prompt"] + example["completion"])["input_ids"]
    prompt_length = common_prefix_length(prompt_ids, input_ids)
    if len(input_ids) > prompt_length and tokenizer.eos_token_id is not None:
        input_ids = input_ids + [tokenizer.eos_token_id]
    return input_ids, [0] * prompt_length + [1] * (len(input_ids) - prompt_length)


def _skip_reason(example: dict[str, Any], conversational: bool, completion_mask: list, kept: int, image_cut: bool):
    """Why an example carries nothing to train on (`completion_mask` before the cut at `kept` tokens), or `""`."""
    # The first token has no prediction, so it never counts as a trained token
    if conversational and "messages" in example and not ("prompt" in example and "completion" in example):
        if not any(message["role"] == "assistant" for message in example["messages"]):
            return SKIP_NO_ASSISTANT_TURN
        has_completion = any(completion_mask[1:])
    elif conversational:
        has_completion = not all(is_empty_message(message) for message in example["completion"])
    else:
        has_completion = bool(example["completion"].strip())
    if not has_completion:
        return SKIP_EMPTY_COMPLETION
    if not any(completion_mask[1:kept]):
        return SKIP_TRUNCATED_AWAY
    # The processor would give a cut image's features whole, for fewer placeholder tokens than it has
    return SKIP_IMAGE_CUT if image_cut else ""


def tokenize_expert_example(
    example: dict[str, Any],
    index: int,
    processing_class: PreTrainedTokenizerBase | ProcessorMixin,
    max_length: int,
    image_token_id: int | None = None,
) -> dict[str, Any]:
    """
    Token ids of one expert example, cut at `max_length`, and a mask of the tokens the SFT term trains on: the
    completion of prompt/completion examples, every assistant turn of `messages`; never an image's placeholder tokens
    (`image_token_id`). `skip_reason` says why an example carries nothing to train on. With a processor, conversations
    are rendered as TRL renders a vision-language policy's prompts, and the result holds the `images` as stored and the
    rendered `text` ([`collate_expert_images`]).
    """
    tools = _load_tools(example.get("tools"), index)
    conversational = example_is_conversational(example, index)
    is_processor = isinstance(processing_class, ProcessorMixin)
    images = _checked_images(example, index, is_processor, conversational)
    text = ""
    if conversational:
        input_ids, completion_mask, text = _conversation_tokens(example, processing_class, tools, images, index)
    else:
        input_ids, completion_mask = _plain_text_tokens(example, processing_class)
    if image_token_id is not None:
        # An image's placeholder tokens stand for its features: there is nothing to predict at them
        completion_mask = [
            trained and int(token != image_token_id) for token, trained in zip(input_ids, completion_mask)
        ]
    image_cut = image_token_id is not None and image_token_id in input_ids[max_length:]
    skip_reason = _skip_reason(example, conversational, completion_mask, max_length, image_cut)
    tokenized = {"input_ids": input_ids[:max_length], "completion_mask": completion_mask[:max_length]}
    tokenized["skip_reason"] = skip_reason
    if is_processor:
        tokenized.update(images=images, text=text)
    return tokenized


def without_image_decoding(dataset: Dataset) -> Dataset:
    """
    `dataset` with its image columns left undecoded, so that an image that cannot be read fails in
    [`load_expert_image`], which names its example, rather than inside `datasets`, and is kept as stored.
    """
    for column in IMAGE_COLUMNS:
        feature = dataset.features.get(column)
        if isinstance(feature, ImageFeature):
            dataset = dataset.cast_column(column, ImageFeature(decode=False))
        elif isinstance(getattr(feature, "feature", None), ImageFeature):  # a list of images
            dataset = dataset.cast_column(column, Sequence(ImageFeature(decode=False)))
    return dataset


def prepare_expert_dataset(
    dataset: Dataset,
    processing_class: PreTrainedTokenizerBase | ProcessorMixin,
    max_length: int,
    source: str | None = None,
    image_token_id: int | None = None,
) -> Dataset:
    """
    The examples of an expert dataset (`source`: its name, among several) that carry tokens to train on, tokenized
    with the policy's tokenizer or processor; a `ValueError` for data it cannot use, a warning counting skipped rows.
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"`expert_dataset` must be a `datasets.Dataset` (map-style, so it can be sharded and reshuffled), got "
            f"{type(dataset).__name__}."
        )
    if len(dataset) == 0:
        raise ValueError("`expert_dataset` is empty: it needs at least one example per process.")
    dataset_format = expert_dataset_format(dataset.column_names)
    dataset = without_image_decoding(dataset)
    conversational = dataset_format == "messages" or example_is_conversational(dataset[0], 0)
    if conversational and processing_class.chat_template is None:
        raise ValueError(
            "`expert_dataset` is conversational, but the tokenizer or processor (`processing_class`) has no chat "
            "template. Set `processing_class.chat_template`, or give plain-text `prompt`/`completion` columns."
        )
    tokenized = dataset.map(
        tokenize_expert_example,
        with_indices=True,
        fn_kwargs={"processing_class": processing_class, "max_length": max_length, "image_token_id": image_token_id},
        remove_columns=dataset.column_names,
        features=PROCESSOR_TOKENIZED_FEATURES if isinstance(processing_class, ProcessorMixin) else None,
        desc="Tokenizing expert dataset",
    )
    skipped = Counter(reason for reason in tokenized["skip_reason"] if reason)
    skip_counts = ", ".join(f"{count} with {reason}" for reason, count in sorted(skipped.items()))
    if skipped:
        logger.warning(
            f"Skipped {sum(skipped.values())} of {len(dataset)} expert examples{f' of {source!r}' if source else ''}: "
            f"{skip_counts} (max length {max_length} tokens, `chord_sft_max_length`)."
        )
    kept = tokenized.filter(lambda reason: reason == "", input_columns="skip_reason").remove_columns("skip_reason")
    if len(kept) == 0:
        raise ValueError(
            f"Every one of the {len(dataset)} expert examples was skipped ({skip_counts}): nothing is left "
            f"to train on. Check the completions, or raise `chord_sft_max_length` ({max_length})."
        )
    return kept


def prepare_expert_sources(
    sources: dict[str, Dataset],
    processing_class: PreTrainedTokenizerBase | ProcessorMixin,
    max_length: int,
    image_token_id: int | None = None,
) -> dict[str, Dataset]:
    """[`prepare_expert_dataset`] of each named source, an error naming the source it comes from."""
    if not sources:
        raise ValueError("`expert_dataset` is an empty dict: give at least one named dataset.")
    prepared = {}
    for name, dataset in sources.items():
        try:
            prepared[name] = prepare_expert_dataset(
                dataset, processing_class, max_length=max_length, source=name, image_token_id=image_token_id
            )
        except (TypeError, ValueError) as error:
            raise type(error)(f"Expert source {name!r}: {error}") from error
    return prepared


def collate_expert_batch(examples: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad tokenized expert examples into `input_ids`, `attention_mask` and `completion_mask` tensors."""
    max_length = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), max_length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), max_length), dtype=torch.long)
    completion_mask = torch.zeros((len(examples), max_length), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[row, :length] = torch.tensor(example["input_ids"])
        attention_mask[row, :length] = 1
        completion_mask[row, :length] = torch.tensor(example["completion_mask"])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def collate_expert_images(
    examples: list[dict[str, Any]], processor: ProcessorMixin, num_tokens: int
) -> dict[str, torch.Tensor]:
    """
    The image inputs of an expert micro-batch (pixel values, grids, ...; `{}` without images), from the processor run
    on the examples with images only (older processors refuse one without) and their rendered text; per-token inputs
    ([`PER_TOKEN_IMAGE_INPUTS`]) are put back at their rows, 0 elsewhere, over the batch's `num_tokens`.
    """
    rows = [row for row, example in enumerate(examples) if example["images"]]
    if not rows:
        return {}
    inputs = processor(
        text=[examples[row]["text"] for row in rows],
        images=[[load_expert_image(image) for image in examples[row]["images"]] for row in rows],
        padding=True,
        padding_side="right",
        add_special_tokens=False,
        return_tensors="pt",
    )
    image_inputs = {}
    for name, value in inputs.items():
        if name in ("input_ids", "attention_mask"):
            continue
        if name in PER_TOKEN_IMAGE_INPUTS:
            per_token = value.new_zeros(len(examples), num_tokens)
            length = min(num_tokens, value.shape[1])
            per_token[rows, :length] = value[:, :length]
            value = per_token
        image_inputs[name] = value
    return image_inputs
