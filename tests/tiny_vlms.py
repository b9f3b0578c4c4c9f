"""Tiny random vision-language models and their processors, built offline for the VLM tests.

Each family's processor is made from its constructor: the tests' character-level tokenizer with the family's image
tokens added, the family's image processor (the PIL-backed one, which needs no torchvision) sized for small images,
and a ChatML template that renders image blocks as the family's placeholder text. The models come from configs with
random weights, a couple of layers of width 16 in both towers.
"""

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from trl_chord.demo.tiny import build_tiny_tokenizer


TEXT_TOWER = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
# SigLIP-style vision tower of the Gemma 3 and Idefics3 models: 28x28 images in 16 patches of 7
VISION_TOWER = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=7
)
QWEN_IMAGE_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL's processor sizes images by their area in pixels: 56x56 gives 4x4 patches of 14, merged 2x2 into 4 tokens
QWEN_IMAGE_SIZE = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}


def chat_template(image_text: str) -> str:
    """ChatML over content blocks (or plain strings), with each image block rendered as `image_text`."""
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + image_text + "{% else %}"
        "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def tiny_tokenizer(image_tokens: list[str], tmp_dir, tokenizer_class=None, **named_tokens):
    """The tests' tokenizer with `image_tokens` added, saved and reloaded as `tokenizer_class` (Qwen2-VL's processor
    checks its tokenizer's class); `named_tokens` become attributes like `boi_token` and `boi_token_id`."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": image_tokens})
    if tokenizer_class is not None:
        tokenizer.save_pretrained(str(tmp_dir))
        tokenizer = getattr(transformers, tokenizer_class).from_pretrained(str(tmp_dir))
    for name, token in named_tokens.items():
        setattr(tokenizer, name, token)
        setattr(tokenizer, f"{name}_id", tokenizer.convert_tokens_to_ids(token))
    return tokenizer


def without_video_processor(processor_class):
    """`processor_class` built with no video processor: transformers checks the class of every processor argument,
    even one that is not given, and the video processor's class needs torchvision, which these tests do without."""

    class ImageOnlyProcessor(processor_class):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyProcessor


def qwen_vl(family: str, tmp_dir):
    tokenizer = tiny_tokenizer(QWEN_IMAGE_TOKENS, tmp_dir, tokenizer_class="Qwen2TokenizerFast")
    template = chat_template("<|vision_start|><|image_pad|><|vision_end|>")
    tokenizer.chat_template = template
    processor_class = transformers.Qwen2VLProcessor if family == "qwen2_vl" else transformers.Qwen2_5_VLProcessor
    processor = without_video_processor(processor_class)(
        image_processor=transformers.Qwen2VLImageProcessor(size=QWEN_IMAGE_SIZE),
        tokenizer=tokenizer,
        chat_template=template,
    )
    rope = {"type": "default", "rope_type": "default", "mrope_section": [1, 1]}
    ids = {f"{name}_token_id": tokenizer.convert_tokens_to_ids(f"<|{name}_pad|>") for name in ("image", "video")}
    ids.update(
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id
    )  # Qwen's own ids are outside the tiny vocabulary
    text_config = dict(vocab_size=len(tokenizer), **TEXT_TOWER, rope_scaling=rope)
    if family == "qwen2_vl":
        vision_config = dict(depth=2, embed_dim=16, hidden_size=16, num_heads=2, mlp_ratio=2)
        config = transformers.Qwen2VLConfig(text_config=text_config, vision_config=vision_config, **ids)
        model_class = transformers.Qwen2VLForConditionalGeneration
    else:
        vision_config = dict(
            depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16, fullatt_block_indexes=[1]
        )
        config = transformers.Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, **ids)
        model_class = transformers.Qwen2_5_VLForConditionalGeneration
    config.vision_start_token_id = tokenizer.convert_tokens_to_ids("<|vision_start|>")
    return model_class, config, processor


def gemma3(tmp_dir):
    image_tokens = {
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
        "image_token": "<image_soft_token>",
    }
    tokenizer = tiny_tokenizer(list(image_tokens.values()), tmp_dir, **image_tokens)
    template = chat_template("<start_of_image>")
    tokenizer.chat_template = template
    image_processor = transformers.Gemma3ImageProcessor(size={"height": 28, "width": 28})
    processor = transformers.Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=template, image_seq_length=4
    )
    config = transformers.Gemma3Config(
        text_config=dict(vocab_size=len(tokenizer), **TEXT_TOWER, head_dim=8),
        vision_config=VISION_TOWER,
        mm_tokens_per_image=4,
        image_token_index=tokenizer.image_token_id,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
    )
    return transformers.Gemma3ForConditionalGeneration, config, processor


def llava(tmp_dir):
    tokenizer = tiny_tokenizer(["<image>"], tmp_dir)
    template = chat_template("<image>")
    tokenizer.chat_template = template
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
    )
    processor = transformers.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=template,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, which the "default" strategy drops
    )
    config = transformers.LlavaConfig(
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), **TEXT_TOWER),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
            projection_dim=16,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    return transformers.LlavaForConditionalGeneration, config, processor


def idefics3(tmp_dir):
    tokenizer = tiny_tokenizer(["<image>", "<fake_token_around_image>", "<global-img>"], tmp_dir)
    template = chat_template("<image>")
    tokenizer.chat_template = template
    # The PIL image processor (`Idefics3ImageProcessorPil` in transformers 5, where `Idefics3ImageProcessor` is the
    # torchvision one). Some transformers 5 releases (5.17) want torchvision for either, and CPU torch has none on PyPI
    image_processor_class = getattr(transformers, "Idefics3ImageProcessorPil", transformers.Idefics3ImageProcessor)
    try:
        image_processor = image_processor_class(
            size={"longest_edge": 28}, max_image_size={"longest_edge": 28}, do_image_splitting=False
        )
    except ImportError as error:
        if "torchvision" not in str(error).lower():
            raise
        pytest.skip(f"transformers {transformers.__version__}'s Idefics3 image processor needs torchvision")
    processor = transformers.Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=template, image_seq_len=4
    )
    config = transformers.Idefics3Config(
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), **TEXT_TOWER),
        vision_config=VISION_TOWER,
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    return transformers.Idefics3ForConditionalGeneration, config, processor


# family: (builder, the LM head the probe must pick)
VLM_FAMILIES = {
    "qwen2_vl": (lambda tmp_dir: qwen_vl("qwen2_vl", tmp_dir), "chunked"),
    "qwen2_5_vl": (lambda tmp_dir: qwen_vl("qwen2_5_vl", tmp_dir), "chunked"),
    "gemma3": (gemma3, "chunked"),
    "llava": (llava, "chunked"),
    "idefics3": (idefics3, "chunked"),
}


def build_vlm(family: str, tmp_dir, seed: int = 0):
    """A tiny random `family` model and its processor (`tmp_dir`: where a tokenizer is saved to be reloaded)."""
    model_class, config, processor = VLM_FAMILIES[family][0](tmp_dir)
    tokenizer = processor.tokenizer
    config.get_text_config().pad_token_id = tokenizer.pad_token_id
    config.get_text_config().eos_token_id = tokenizer.eos_token_id
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = model_class(config)
        for name, param in model.named_parameters():
            if name.endswith("mm_input_projection_weight"):
                # Gemma 3's image projection starts at zero, which would keep the images out of the logits
                torch.nn.init.normal_(param, std=0.5)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


def solid_image(color: tuple[int, int, int], size: tuple[int, int] = (56, 56), noise_seed: int | None = None):
    """A PIL image of one color, with a little seeded noise when `noise_seed` is given."""
    pixels = np.broadcast_to(np.array(color, dtype=np.int16), (size[1], size[0], 3)).copy()
    if noise_seed is not None:
        pixels += np.random.default_rng(noise_seed).integers(-20, 21, pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
