"""
What the GPU checks share (`tests/test_gpu.py` and `benchmarks/gpu/bench.py`): Qwen2.5-shaped models with random
weights, a tokenizer that covers their whole vocabulary, and the one place that reaches trl_chord's expert head
through a model.

Nothing here downloads anything: the shapes are the numbers of the public Qwen2.5 configs, the weights are random.
"""

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from trl_chord.expert_head.forward import expert_loss
from trl_chord.losses import ExpertLossOutput


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the CPU benchmark's helpers
from chord_overhead import build_tokenizer, expert_dataset  # noqa: E402, F401 (expert_dataset: for the GPU checks)


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Qwen2-architecture causal LM."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = True


# The Qwen2.5 base and instruct configs (vocabulary 151,936, embeddings tied at these two sizes)
QWEN2_5_0_5B = ModelShape("Qwen2.5-0.5B", 896, 4864, 24, 14, 2, 151936)
QWEN2_5_1_5B = ModelShape("Qwen2.5-1.5B", 1536, 8960, 28, 12, 2, 151936)
# For a CPU run of the GPU benchmark end to end (`--tiny`)
TINY = ModelShape("tiny", 64, 128, 2, 4, 2, 4096)


def with_layers(shape: ModelShape, num_hidden_layers: int) -> ModelShape:
    """The same shape with fewer layers: what a CPU run of the GPU checks can afford (the head is unchanged)."""
    return ModelShape(**{**asdict(shape), "num_hidden_layers": num_hidden_layers})


def full_vocabulary_tokenizer(shape: ModelShape) -> PreTrainedTokenizerFast:
    """
    trl_chord's character-level tokenizer filled with `<f0>`, `<f1>`, ... up to the model's vocabulary, so that every
    id a random model generates decodes to text that rewards can tell apart.
    """
    return build_tokenizer(shape.vocab_size)


def random_model(
    shape: ModelShape,
    tokenizer: PreTrainedTokenizerFast,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> Qwen2ForCausalLM:
    """
    A model of `shape` with random weights (transformers' own initialisation), built on `device` directly (no
    1.5B-parameter initialisation on the CPU), the same for the same seed. The global random state is left as it was.
    """
    config = Qwen2Config(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        tie_word_embeddings=shape.tie_word_embeddings,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation=attn_implementation,
    )
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    model = model.to(dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# ---------------------------------------------------------------------------------------------------------------------
# trl_chord's expert head, reached through a model: the only code of the GPU checks that knows how the head hooks a
# model (`model.chord_expert_head`, an `ExpertHead`).


def expert_head_path(model: PreTrainedModel) -> str | None:
    """Which head a ChordTrainer model's expert term went through ("chunked" is trl_chord's own), once it ran."""
    head = getattr(model, "chord_expert_head", None)
    return None if head is None or head.choice is None else head.choice.path


def use_full_logits_expert_head(model: PreTrainedModel) -> None:
    """Make a ChordTrainer's model compute its expert term from the model's full logits (fp32 `log_softmax` of the
    `(tokens, vocab)` logits, as ms-swift does): the naive baseline of the benchmark (`chord_expert_head="full_logits"`
    set after the trainer is built, before its first expert step)."""
    model.chord_expert_head.requested = "full_logits"


def expert_term_backward(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> ExpertLossOutput:
    """The expert SFT term of a collated expert micro-batch through a ChordTrainer's model, forward and backward, as
    the trainer runs it (its token weighting, the head's gradient made in the forward)."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
    out = expert_loss(model, inputs)
    out.loss.backward()
    return out
