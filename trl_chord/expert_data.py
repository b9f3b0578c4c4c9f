"""Expert demonstrations for the CHORD SFT term: tokenization, the expert sampler and the collators."""

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


def tokenize_expert_example(
    example: dict[str, Any],
    index: int,
    processing_class: PreTrainedTokenizerBase | ProcessorMixin,
    max_length: int,
    image_token_id: int | None = None,
) -> dict[str, Any]:
    """
    Token ids of one expert example and a mask of the tokens the SFT term trains on.

    - prompt/completion: the completion tokens are trained. Conversational examples go through the chat template
      (the prompt with the generation prompt, then prompt + completion); plain-text ones are tokenized as
      `prompt + completion` with the EOS token appended, so the model learns to stop as its rollouts do.
    - messages: every assistant turn is trained, everything else is masked. Each turn's tokens are found by
      rendering the conversation up to it, so any chat template that renders earlier turns unchanged works.

    With a processor (`processing_class` of a vision-language policy), conversational examples are rendered as TRL
    renders such a policy's prompts ([`_multimodal_conversation`]), with the example's images (`images` or `image`
    column), each expanded by the processor into its placeholder tokens. Those (`image_token_id`) are never trained,
    and an example that the cut at `max_length` would leave with part of an image is skipped. The result then also
    holds the `images`, as stored, and, for an example with images, the rendered `text` that the collator hands the
    processor with them ([`collate_expert_images`]).

    The sequence is cut at `max_length` tokens (the end of the completion is dropped). `skip_reason` is empty, or says
    why the example carries nothing to train on.
    """
    tools = _load_tools(example.get("tools"), index)
    conversational = example_is_conversational(example, index)
    messages_format = "messages" in example and not ("prompt" in example and "completion" in example)
    is_processor = isinstance(processing_class, ProcessorMixin)
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
    loaded_images = [load_expert_image(image, index) for image in images]
    encode = _chat_encoder(processing_class, tools, loaded_images, index)

    text = ""
    if conversational:
        if messages_format:
            messages = example["messages"]
        else:
            messages, num_prompt_messages = example["prompt"] + example["completion"], len(example["prompt"])
        if is_processor:
            messages = _multimodal_conversation(messages, loaded_images, index)
            if images:
                text = processing_class.apply_chat_template(messages, tools=tools, tokenize=False)
        if messages_format:
            input_ids = encode(messages)
            completion_mask = [0] * len(input_ids)
            for turn, message in enumerate(messages):
                if message.get("role") != "assistant" or is_empty_message(message):
                    continue
                start = common_prefix_length(encode(messages[:turn], add_generation_prompt=True), input_ids)
                end = common_prefix_length(encode(messages[: turn + 1]), input_ids)
                completion_mask[start:end] = [1] * (end - start)
        else:
            prompt_ids = encode(messages[:num_prompt_messages], add_generation_prompt=True)
            input_ids = encode(messages)
            prompt_length = common_prefix_length(prompt_ids, input_ids)
            completion_mask = [0] * prompt_length + [1] * (len(input_ids) - prompt_length)
    else:
        tokenizer = processing_class.tokenizer if is_processor else processing_class
        prompt_ids = tokenizer(text=example["prompt"])["input_ids"]
        input_ids = tokenizer(text=example["prompt"] + example["completion"])["input_ids"]
        prompt_length = common_prefix_length(prompt_ids, input_ids)
        if len(input_ids) > prompt_length and tokenizer.eos_token_id is not None:
            input_ids = input_ids + [tokenizer.eos_token_id]
        completion_mask = [0] * prompt_length + [1] * (len(input_ids) - prompt_length)
    if image_token_id is not None:
        # An image's placeholder tokens stand for its features: there is nothing to predict at them
        completion_mask = [
            trained and int(token != image_token_id) for token, trained in zip(input_ids, completion_mask)
        ]

    # The first token has no prediction, so it never counts as a trained token
    if conversational and not messages_format:
        has_completion = not all(is_empty_message(message) for message in example["completion"])
    elif conversational:
        has_completion = any(completion_mask[1:])
    else:
        has_completion = bool(example["completion"].strip())
    image_cut = image_token_id is not None and image_token_id in input_ids[max_length:]
    input_ids, completion_mask = input_ids[:max_length], completion_mask[:max_length]
    if messages_format and not any(message["role"] == "assistant" for message in example["messages"]):
        skip_reason = SKIP_NO_ASSISTANT_TURN
    elif not has_completion:
        skip_reason = SKIP_EMPTY_COMPLETION
    elif not any(completion_mask[1:]):
        skip_reason = SKIP_TRUNCATED_AWAY
    elif image_cut:
        # The processor would give the image's features whole, for fewer placeholder tokens than it has
        skip_reason = SKIP_IMAGE_CUT
    else:
        skip_reason = ""
    tokenized = {"input_ids": input_ids, "completion_mask": completion_mask, "skip_reason": skip_reason}
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
    Validate and tokenize an expert dataset (`source`: its name, when it is one of several) with the policy's
    tokenizer, or its processor for a vision-language policy (`image_token_id`: the placeholder token of an image's
    features, `config.image_token_id`); returns the examples that carry tokens to train on.

    Raises a `ValueError` for an empty dataset, missing columns, conversational data with a tokenizer or processor that
    has no chat template, or a dataset none of whose examples is left after skipping. Skipped examples (empty
    completion, a completion that the `max_length` cut removes entirely, or an image it would cut) are counted in a
    warning.
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
    features = None
    if isinstance(processing_class, ProcessorMixin):
        # Declared, so that a run of examples without images does not leave the `images` column untyped
        features = Features(
            {
                "input_ids": Sequence(Value("int64")),
                "completion_mask": Sequence(Value("int64")),
                "skip_reason": Value("string"),
                "images": Sequence(ImageFeature(decode=False)),
                "text": Value("string"),
            }
        )
    tokenized = dataset.map(
        tokenize_expert_example,
        with_indices=True,
        fn_kwargs={"processing_class": processing_class, "max_length": max_length, "image_token_id": image_token_id},
        remove_columns=dataset.column_names,
        features=features,
        desc="Tokenizing expert dataset",
    )
    skipped = Counter(reason for reason in tokenized["skip_reason"] if reason)
    if skipped:
        logger.warning(
            f"Skipped {sum(skipped.values())} of {len(dataset)} expert examples{f' of {source!r}' if source else ''}: "
            + ", ".join(f"{count} with {reason}" for reason, count in sorted(skipped.items()))
            + f" (max length {max_length} tokens, `chord_sft_max_length`)."
        )
    kept = tokenized.filter(lambda reason: reason == "", input_columns="skip_reason").remove_columns("skip_reason")
    if len(kept) == 0:
        raise ValueError(
            f"Every one of the {len(dataset)} expert examples was skipped ("
            + ", ".join(f"{count} with {reason}" for reason, count in sorted(skipped.items()))
            + f"): nothing is left to train on. Check the completions, or raise `chord_sft_max_length` ({max_length})."
        )
    return kept


class ExpertSampler:
    """
    Infinite, sharded and seeded stream of expert example indices, one micro-batch at a time.

    Pass `e` over the data is the permutation `randperm(num_examples)` drawn from a generator seeded with
    `seed + e`; process `rank` takes every `num_replicas`-th index of it, starting at `rank`. Within a pass the
    processes see disjoint examples, and over its passes each process trains on each of its examples once per pass.
    Micro-batches run across pass boundaries, so no process's stream ever runs dry. The state is the number of indices
    already drawn, which is all a resumed run needs. The global RNG is never touched.
    """

    def __init__(self, num_examples: int, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        if num_examples < num_replicas:
            raise ValueError(
                f"The expert dataset has {num_examples} usable examples, fewer than the {num_replicas} processes: "
                "each process needs at least one example of its own. Add expert examples or use fewer processes."
            )
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shard_size = len(range(rank, num_examples, num_replicas))
        self.examples_drawn = 0
        self._shard_cache: tuple[int, list[int]] | None = None

    def shard(self, epoch: int) -> list[int]:
        """This process's indices for pass `epoch`, in the order they are drawn."""
        if self._shard_cache is None or self._shard_cache[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            permutation = torch.randperm(self.num_examples, generator=generator)
            self._shard_cache = (epoch, permutation[self.rank :: self.num_replicas].tolist())
        return self._shard_cache[1]

    def take(self, count: int) -> list[int]:
        """The next `count` indices of this process's stream."""
        indices: list[int] = []
        while len(indices) < count:
            epoch, offset = divmod(self.examples_drawn, self.shard_size)
            taken = self.shard(epoch)[offset : offset + count - len(indices)]
            indices.extend(taken)
            self.examples_drawn += len(taken)
        return indices

    def next_batch(self) -> list[int]:
        return self.take(self.batch_size)

    def state_dict(self) -> dict[str, int]:
        return {"examples_drawn": self.examples_drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.examples_drawn = int(state["examples_drawn"])


def next_source(proportions: list[float], drawn_per_source: list[int]) -> int:
    """
    The source of the next expert example: the one furthest behind its share, `argmax_i p_i * (k + 1) - drawn_i`
    after `k` draws (the first on ties). After any `k` draws, source `i` has given `floor` or `ceil` of `p_i * k`,
    give or take one, whatever `k`: the proportions hold in every window that starts at 0, with no randomness.
    """
    total = sum(drawn_per_source) + 1
    deficits = [share * total - drawn for share, drawn in zip(proportions, drawn_per_source)]
    return max(range(len(deficits)), key=lambda index: (deficits[index], -index))


class ExpertMixtureSampler:
    """
    Several expert sources, each with its own [`ExpertSampler`] stream, mixed in fixed proportions.

    The sources' examples are numbered one after another (source `i` from `offsets[i]`). Each example slot goes to the
    source [`next_source`] picks, which depends only on the counts so far: every process picks the same sources in the
    same order, and each takes the example from its own shard of that source. So, per source, processes see disjoint
    examples within a pass and every example once per pass, as with one source. The state is each source's count.
    """

    def __init__(
        self,
        source_sizes: dict[str, int],
        proportions: dict[str, float],
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ):
        self.names = list(source_sizes)
        total = sum(proportions[name] for name in self.names)
        self.proportions = [proportions[name] / total for name in self.names]
        self.batch_size = batch_size
        self.offsets = [0]
        for name in self.names[:-1]:
            self.offsets.append(self.offsets[-1] + source_sizes[name])
        self.samplers = {}
        for index, name in enumerate(self.names):
            try:
                # A seed per source, so that sources of equal size are not shuffled alike
                self.samplers[name] = ExpertSampler(
                    source_sizes[name], 1, num_replicas, rank, seed=seed + 1_000_003 * index
                )
            except ValueError as error:
                raise ValueError(f"Expert source {name!r}: {error}") from error

    def next_batch(self) -> list[int]:
        indices = []
        for _ in range(self.batch_size):
            source = next_source(self.proportions, [self.samplers[name].examples_drawn for name in self.names])
            indices.append(self.offsets[source] + self.samplers[self.names[source]].take(1)[0])
        return indices

    def source_of(self, index: int) -> int:
        """The position in `names` of the source a (numbered) example comes from."""
        return max(source for source, offset in enumerate(self.offsets) if offset <= index)

    def state_dict(self) -> dict[str, dict[str, int]]:
        return {name: sampler.state_dict() for name, sampler in self.samplers.items()}

    def load_state_dict(self, state: dict[str, dict[str, int]]) -> None:
        if set(state) != set(self.names):
            raise ValueError(
                f"The checkpoint's expert sources {sorted(state)} are not this run's {sorted(self.names)}."
            )
        for name, sampler_state in state.items():
            self.samplers[name].load_state_dict(sampler_state)


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
    The image inputs of an expert micro-batch for the model's forward: everything the processor returns for its
    examples' images besides the token ids (pixel values, grid or size tensors, ...), as TRL passes them for its
    prompts; `{}` when no example has an image.

    The processor gets the examples with images only (older processors refuse an example without any), with the
    text [`tokenize_expert_example`] rendered for them, so it expands every image into the tokens that are already in
    `input_ids`. Per-token inputs ([`PER_TOKEN_IMAGE_INPUTS`]) are put back at their examples' rows, zero elsewhere,
    over the batch's `num_tokens` (its padded length).
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
