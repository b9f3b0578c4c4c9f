"""CHORD with vision-language policies: expert examples with images, processed as GRPOTrainer processes its prompts.

The oracle for the expert term is the model's own forward on each example alone, fed by the processor's own chat
template tokenization of the conversation with its images, and autograd through its full logits. Every test name has
`vlm` or `vision` in it, so that `pytest -k "vlm or vision"` runs them all.
"""

import copy
import io
import logging

import pytest
import torch
from datasets import Dataset, Sequence
from datasets import Image as ImageFeature
from helpers import PLAIN_SGD, chord_config, oracle_weights, weights
from tiny_vlms import VLM_FAMILIES, build_vlm, solid_image

from trl_chord import ChordTrainer
from trl_chord.expert_data import (
    collate_expert_batch,
    collate_expert_images,
    prepare_expert_dataset,
    tokenize_expert_example,
)
from trl_chord.expert_head.forward import add_expert_loss_head


RED, GREEN, BLUE = (220, 30, 30), (30, 200, 40), (40, 50, 230)


def user(*parts):
    """A user message of content blocks: `None` is an image placeholder, a string is text."""
    return {
        "role": "user",
        "content": [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts],
    }


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def image_rows():
    """Expert rows in TRL's multimodal prompt/completion format: one image, two images, and no image."""
    return [
        {
            "prompt": [user(None, "color?")],
            "completion": [assistant("red")],
            "images": [solid_image(RED, noise_seed=1)],
        },
        {
            "prompt": [user(None, "left, then right?", None)],
            "completion": [assistant("blue, green")],
            "images": [solid_image(BLUE, noise_seed=2), solid_image(GREEN, (84, 56), noise_seed=3)],
        },
        {"prompt": [user("2+2=")], "completion": [assistant("4")], "images": []},
    ]


def text_rows():
    """Text-only expert rows, as a text policy's experts are written (plain string contents)."""
    return [
        {"prompt": [{"role": "user", "content": "2+2="}], "completion": [{"role": "assistant", "content": "4"}]},
        {
            "prompt": [{"role": "user", "content": "name a color"}],
            "completion": [{"role": "assistant", "content": "teal"}],
        },
    ]


def with_images(messages, images):
    """The messages in content blocks, each image placeholder holding its image, as a processor's own chat template
    takes them (transformers 4's reads every content as a list of blocks)."""
    images = iter(images)
    blocks = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        content = [{**part, "image": next(images)} if part["type"] == "image" else part for part in content]
        blocks.append({**message, "content": content})
    return blocks


def processor_inputs(processor, messages, **kwargs):
    """The processor's own tokenization of a conversation with its images (its chat template, `tokenize=True`)."""
    inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt", **kwargs)
    return {name: value for name, value in inputs.items()}


def oracle_expert_loss(model, processor, rows, weighting="phi"):
    """
    The phi-weighted token-mean NLL of the rows' completions, each row run alone through the model's own forward
    with the processor's own inputs, full logits and autograd; the image placeholder tokens are not predicted.
    """
    image_token_id = model.config.image_token_id
    nlls, all_weights = [], []
    for row in rows:
        images = row.get("images") or []
        conversation = with_images(row["prompt"] + row["completion"], images)
        prompt_ids = processor_inputs(processor, with_images(row["prompt"], images), add_generation_prompt=True)
        inputs = processor_inputs(processor, conversation)
        prompt_length = prompt_ids["input_ids"].shape[1]
        assert torch.equal(inputs["input_ids"][0, :prompt_length], prompt_ids["input_ids"][0])
        logits = model(**inputs).logits[0, :-1].float()[prompt_length - 1 :]
        targets = inputs["input_ids"][0, prompt_length:]
        keep = targets != image_token_id
        logits, targets = logits[keep], targets[keep]
        logps = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
        nlls.append(-logps)
        all_weights.append(oracle_weights(weighting, logits, logps))
    terms = torch.cat([nll * weights for nll, weights in zip(nlls, all_weights)])
    return terms.sum() / len(terms), sum(len(nll) for nll in nlls)


def chord_vlm_expert_loss(model, processor, rows, gradient_in_forward=True, max_length=512):
    """The expert term as ChordTrainer computes it: prepared, collated, through the patched forward."""
    prepared = prepare_expert_dataset(
        Dataset.from_list(rows), processor, max_length=max_length, image_token_id=model.config.image_token_id
    )
    examples = list(prepared)
    batch = collate_expert_batch(examples, pad_token_id=processor.tokenizer.pad_token_id)
    image_inputs = collate_expert_images(examples, processor, batch["input_ids"].shape[1])
    add_expert_loss_head(model, weighting="phi", focal_gamma=2.0, cast_lm_head_to_fp32=False)
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100),
        chord_expert_loss=True,
        chord_head_gradient_in_forward=gradient_in_forward,
        **image_inputs,
    )


def assert_same_gradients(model, oracle_model, only=None):
    grads = {name: param.grad for name, param in model.named_parameters()}
    checked = 0
    for name, param in oracle_model.named_parameters():
        if only is not None and not only(name):
            continue
        if param.grad is None:
            assert grads[name] is None or torch.count_nonzero(grads[name]) == 0, name
            continue
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
        checked += 1
    return checked


# --------------------------------------------------------------------------------------------------------------------
# The expert LM head stays exact


@pytest.mark.parametrize("gradient_in_forward", [True, False], ids=["gradient-in-forward", "recompute"])
@pytest.mark.parametrize("rows", ["images-and-text", "text-only"])
@pytest.mark.parametrize("family", list(VLM_FAMILIES))
def test_vlm_expert_loss_and_every_gradient_match_the_models_own_logits(family, rows, gradient_in_forward, tmp_path):
    model, processor = build_vlm(family, tmp_path)
    model.train()
    oracle_model = copy.deepcopy(model)
    expert_rows = image_rows() if rows == "images-and-text" else text_rows()

    out = chord_vlm_expert_loss(model, processor, expert_rows, gradient_in_forward)
    out.loss.backward()
    expected, num_tokens = oracle_expert_loss(oracle_model, processor, expert_rows)
    expected.backward()

    assert model.chord_expert_head.choice.path == VLM_FAMILIES[family][1], model.chord_expert_head.choice
    assert out.num_tokens.item() == num_tokens
    torch.testing.assert_close(out.loss, expected)
    checked = assert_same_gradients(model, oracle_model)
    vision = {name: param.grad for name, param in model.named_parameters() if "vision" in name or "visual" in name}
    if rows == "images-and-text":
        # The images reach the loss: the vision tower gets a gradient
        assert any(grad is not None and torch.count_nonzero(grad) > 0 for grad in vision.values())
    assert checked >= (len(list(model.parameters())) - len(vision)) // 2


def test_vlm_lora_on_the_language_model_gets_the_gradient_of_the_models_own_logits(tmp_path):
    from peft import LoraConfig, get_peft_model

    model, processor = build_vlm("qwen2_vl", tmp_path)
    # Adapters on the language model's attention only (the vision tower's blocks are left as they are)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    model = get_peft_model(model, config).train()
    for name, param in model.named_parameters():  # LoRA's B starts at 0, which would hide A's gradient
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    rows = image_rows()
    expected, _ = oracle_expert_loss(model, processor, rows)
    expected.backward()
    expected_grads = {name: param.grad.clone() for name, param in model.named_parameters() if "lora_" in name}
    model.zero_grad()

    prepared = prepare_expert_dataset(
        Dataset.from_list(rows), processor, max_length=512, image_token_id=model.config.image_token_id
    )
    examples = list(prepared)
    batch = collate_expert_batch(examples, pad_token_id=processor.tokenizer.pad_token_id)
    add_expert_loss_head(model.get_base_model(), weighting="phi", focal_gamma=2.0, cast_lm_head_to_fp32=False)
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100),
        chord_expert_loss=True,
        **collate_expert_images(examples, processor, batch["input_ids"].shape[1]),
    )
    out.loss.backward()

    assert model.get_base_model().chord_expert_head.choice.path == "chunked"
    torch.testing.assert_close(out.loss, expected)
    assert len(expected_grads) == 2 * 2 * 2  # A and B, 2 modules, 2 layers
    for name, grad in expected_grads.items():
        assert torch.count_nonzero(grad) > 0, name
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-4, atol=1e-6, msg=name)
    assert all(param.grad is None for name, param in model.named_parameters() if "lora_" not in name)


def test_vlm_expert_loss_changes_with_the_image_alone(tmp_path):
    """Two expert sets that differ only in their images' colors give different expert losses."""
    model, processor = build_vlm("qwen2_vl", tmp_path)
    losses = []
    for color in (RED, BLUE):
        rows = [{"prompt": [user(None, "color?")], "completion": [assistant("red")], "images": [solid_image(color)]}]
        with torch.no_grad():
            losses.append(chord_vlm_expert_loss(copy.deepcopy(model), processor, rows).nll_sum.item())
    assert abs(losses[0] - losses[1]) > 1e-4


# --------------------------------------------------------------------------------------------------------------------
# Tokenization of expert rows with images


@pytest.fixture(scope="module")
def qwen_vlm(tmp_path_factory):
    return build_vlm("qwen2_vl", tmp_path_factory.mktemp("qwen2-vl"))


def trained_text(tokenizer, example):
    return tokenizer.decode([t for t, m in zip(example["input_ids"], example["completion_mask"]) if m])


def test_vlm_expert_row_is_rendered_as_trl_renders_vlm_prompts(qwen_vlm):
    model, processor = qwen_vlm
    image_token_id = model.config.image_token_id
    row = image_rows()[1]
    out = tokenize_expert_example(row, 0, processor, max_length=512, image_token_id=image_token_id)
    # 56x56 -> 4 placeholder tokens; 84x56 -> 6x4 patches of 14, merged 2x2 -> 6
    assert out["input_ids"].count(image_token_id) == 4 + 6
    assert trained_text(processor.tokenizer, out) == "blue, green<|im_end|>\n"
    assert len(out["images"]) == 2 and out["text"].count("<|image_pad|>") == 2
    # The same row with plain-string contents: the images go before the first user message's text, as TRL puts them
    plain = {
        "prompt": [{"role": "user", "content": "color?"}],
        "completion": [{"role": "assistant", "content": "red"}],
        "images": [solid_image(RED)],
    }
    out = tokenize_expert_example(plain, 0, processor, max_length=512, image_token_id=image_token_id)
    assert processor.tokenizer.decode(out["input_ids"]).startswith(
        "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>color?"
    )


def test_vlm_messages_format_trains_each_assistant_turn_never_an_image_token(qwen_vlm):
    model, processor = qwen_vlm
    image_token_id = model.config.image_token_id
    messages = [user(None, "what is it?"), assistant("a square"), user("and this?", None), assistant("a circle")]
    example = {"messages": messages, "images": [solid_image(RED), solid_image(GREEN)]}
    out = tokenize_expert_example(example, 0, processor, max_length=512, image_token_id=image_token_id)
    assert trained_text(processor.tokenizer, out) == "a square<|im_end|>\na circle<|im_end|>\n"
    assert out["input_ids"].count(image_token_id) == 8
    # An image in an assistant turn is a placeholder there too: its tokens are still not trained
    with_answer_image = {
        "messages": [
            user("draw it"),
            {"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": "done"}]},
        ],
        "images": [solid_image(BLUE)],
    }
    out = tokenize_expert_example(with_answer_image, 0, processor, max_length=512, image_token_id=image_token_id)
    trained = [t for t, m in zip(out["input_ids"], out["completion_mask"]) if m]
    assert image_token_id in out["input_ids"] and image_token_id not in trained
    assert processor.tokenizer.decode(trained) == "<|vision_start|><|vision_end|>done<|im_end|>\n"


def test_vlm_an_image_the_length_limit_would_cut_skips_the_row(qwen_vlm, caplog):
    model, processor = qwen_vlm
    messages = [user("first"), assistant("ok"), user(None, "now this"), assistant("red")]
    short = [user(None, "this?"), assistant("red")]
    rows = Dataset.from_list(
        [{"messages": conversation, "images": [solid_image(RED)]} for conversation in (messages, short)]
    )
    tokenized = tokenize_expert_example(
        rows[0], 0, processor, max_length=512, image_token_id=model.config.image_token_id
    )
    cut = tokenized["input_ids"].index(model.config.image_token_id) + 2  # inside the image's 4 placeholder tokens
    with caplog.at_level(logging.WARNING):
        kept = prepare_expert_dataset(rows, processor, max_length=cut, image_token_id=model.config.image_token_id)
    assert "Skipped 1 of 2 expert examples: 1 with an image cut by the length limit" in caplog.text
    assert len(kept) == 1 and kept[0]["input_ids"].count(model.config.image_token_id) == 4


def test_vlm_images_from_files_paths_and_bytes_columns_load_alike(qwen_vlm, tmp_path):
    model, processor = qwen_vlm
    path = tmp_path / "red.png"
    solid_image(RED, noise_seed=4).save(path)
    prompt, completion = [user(None, "color?")], [assistant("red")]
    as_paths = Dataset.from_dict({"prompt": [prompt], "completion": [completion], "images": [[str(path)]]})
    as_image = Dataset.from_dict({"prompt": [prompt], "completion": [completion], "image": [str(path)]}).cast_column(
        "image", ImageFeature()
    )
    as_bytes = Dataset.from_list(
        [{"prompt": prompt, "completion": completion, "images": [{"bytes": path.read_bytes(), "path": None}]}]
    ).cast_column("images", Sequence(ImageFeature()))
    collated = []
    for dataset in (as_paths, as_image, as_bytes):
        examples = list(
            prepare_expert_dataset(dataset, processor, max_length=512, image_token_id=model.config.image_token_id)
        )
        collated.append(collate_expert_images(examples, processor, len(examples[0]["input_ids"])))
    for other in collated[1:]:
        assert other.keys() == collated[0].keys()
        for name in other:
            torch.testing.assert_close(other[name], collated[0][name], msg=name)


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


BAD_VISION_ROWS = [
    (
        "more placeholders than images",
        {"prompt": [user(None, "a", None)], "completion": [assistant("b")], "images": [solid_image(RED)]},
        r"Expert example 1: Number of images provided \(1\) does not match number of image placeholders \(2\)",
    ),
    (
        "more images than placeholders",
        {
            "prompt": [user(None, "a")],
            "completion": [assistant("b")],
            "images": [solid_image(RED), solid_image(BLUE)],
        },
        r"Expert example 1: Number of images provided \(2\) does not match number of image placeholders \(1\)",
    ),
    (
        "a placeholder and no images",
        {"prompt": [user(None, "a")], "completion": [assistant("b")], "images": []},
        r"Expert example 1: Number of images provided \(0\) does not match number of image placeholders \(1\)",
    ),
    (
        "unreadable image bytes",
        {
            "prompt": [user(None, "a")],
            "completion": [assistant("b")],
            "images": [{"bytes": b"not a png", "path": None}],
        },
        r"Expert example 1: an image cannot be read \(UnidentifiedImageError",
    ),
    (
        "truncated image file",
        {
            "prompt": [user(None, "a")],
            "completion": [assistant("b")],
            "images": [{"bytes": png_bytes(solid_image(RED, noise_seed=5))[:200], "path": None}],
        },
        r"Expert example 1: an image cannot be read",
    ),
    (
        "missing image file",
        {"prompt": [user(None, "a")], "completion": [assistant("b")], "images": ["/no/such/image.png"]},
        r"Expert example 1: an image cannot be read",
    ),
    (
        "plain-text row with an image",
        {"prompt": "a", "completion": "b", "images": [solid_image(RED)]},
        r"Expert example 1 has images but plain-text `prompt` and `completion`",
    ),
    (
        "image inside a message",
        {"prompt": [with_images([user(None, "a")], [solid_image(RED)])[0]], "completion": [assistant("b")]},
        r"Expert example 1: a message holds an image itself",
    ),
]


@pytest.mark.parametrize("name, row, message", BAD_VISION_ROWS, ids=[case[0] for case in BAD_VISION_ROWS])
def test_vlm_bad_expert_row_is_named(qwen_vlm, name, row, message):
    model, processor = qwen_vlm
    good = image_rows()[0]
    tokenize_expert_example(good, 0, processor, max_length=512, image_token_id=model.config.image_token_id)
    with pytest.raises(ValueError, match=message):
        tokenize_expert_example(row, 1, processor, max_length=512, image_token_id=model.config.image_token_id)


def test_vision_rows_for_a_text_only_policy_are_refused_by_row(tiny_tokenizer):
    rows = [image_rows()[2], image_rows()[0]]
    with pytest.raises(
        ValueError, match=r"Expert example 1 has 1 image\(s\), but the policy's `processing_class` is a"
    ):
        prepare_expert_dataset(Dataset.from_list(rows), tiny_tokenizer, max_length=256)


def test_vlm_unreadable_image_in_an_image_column_is_named_not_failed_inside_datasets(qwen_vlm, tmp_path):
    model, processor = qwen_vlm
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    solid_image(GREEN).save(good)
    bad.write_bytes(b"\x89PNG but not really")
    dataset = Dataset.from_dict(
        {"prompt": [[user(None, "a")]] * 2, "completion": [[assistant("b")]] * 2, "image": [str(good), str(bad)]}
    ).cast_column("image", ImageFeature())
    with pytest.raises(ValueError, match=r"Expert example 1: an image cannot be read"):
        prepare_expert_dataset(dataset, processor, max_length=512, image_token_id=model.config.image_token_id)


# --------------------------------------------------------------------------------------------------------------------
# Training


def vision_rl_prompts(num_prompts=8) -> Dataset:
    colors = [RED, GREEN, BLUE]
    return Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": "color?"}], "image": solid_image(colors[i % 3], noise_seed=i)}
            for i in range(num_prompts)
        ]
    )


def color_reward(completions, **kwargs) -> list[float]:
    """Rewards that vary even for a random model: the share of the completion's characters in 'red'."""
    return [sum(char in "red" for char in c[0]["content"]) / max(len(c[0]["content"]), 1) for c in completions]


def test_vlm_chord_sgd_step_follows_the_gradient_of_the_models_own_expert_loss(tmp_path):
    """mu = 1 and plain SGD: the trainer's update is -lr times the oracle's gradient, images included."""
    model, processor = build_vlm("qwen2_vl", tmp_path)
    rows = image_rows()
    oracle_model = copy.deepcopy(model).train()
    args = chord_config(
        tmp_path,
        chord_mu_peak=1.0,
        chord_mu_valley=1.0,
        chord_sft_per_device_train_batch_size=len(rows),
        **PLAIN_SGD,
        max_steps=1,
    )
    trainer = ChordTrainer(
        model=model,
        reward_funcs=color_reward,
        args=args,
        train_dataset=vision_rl_prompts(),
        expert_dataset=Dataset.from_list(rows),
        processing_class=processor,
    )
    before = weights(trainer)
    trainer.train()
    after = weights(trainer)

    expected, _ = oracle_expert_loss(oracle_model, processor, rows)
    expected.backward()
    moved_vision_weights = 0
    for name, param in oracle_model.named_parameters():
        expected_update = -PLAIN_SGD["learning_rate"] * (param.grad if param.grad is not None else 0 * param)
        torch.testing.assert_close(after[name] - before[name], expected_update, rtol=1e-4, atol=1e-7, msg=name)
        moved_vision_weights += "visual" in name and bool(torch.count_nonzero(expected_update))
    assert moved_vision_weights > 0


def test_vlm_chord_training_run_lowers_the_expert_nll(tmp_path):
    model, processor = build_vlm("qwen2_vl", tmp_path)
    expert = {
        "vision": Dataset.from_list(
            [
                {"prompt": [user(None, "color?")], "completion": [assistant(name)], "images": [solid_image(color)]}
                for name, color in (("red", RED), ("green", GREEN), ("blue", BLUE))
            ]
        ),
        "text": Dataset.from_list(text_rows()),
    }
    args = chord_config(
        tmp_path,
        chord_mu_valley=0.5,
        chord_enable_phi_function=False,
        chord_sft_per_device_train_batch_size=5,  # every expert example in each micro-batch
        max_steps=8,
        learning_rate=3e-2,
        max_completion_length=4,
    )
    trainer = ChordTrainer(
        model=model,
        reward_funcs=color_reward,
        args=args,
        train_dataset=vision_rl_prompts(),
        expert_dataset=expert,
        processing_class=processor,
    )
    trainer.train()
    history = [entry for entry in trainer.state.log_history if "chord/expert_nll" in entry]
    assert len(history) == 8 and all("chord/grpo_loss" in entry for entry in history)
    assert all(entry["chord/expert_tokens/vision"] > 0 and entry["chord/expert_tokens/text"] > 0 for entry in history)
    nll = [entry["chord/expert_nll"] for entry in history]
    assert nll[-1] < nll[0] - 1.0, nll
