"""
Checks that need CUDA (`pytest -m gpu`; skipped without it, so that CI stays on CPUs): the expert head's loss and
every gradient against fp64 full logits in bf16 and fp16, its memory on the GPU, `mu = 0` against TRL's
GRPOTrainer, and a CHORD step in bf16 on a Qwen2.5-0.5B-shaped model with TRL's fused head for the GRPO term and
trl_chord's for the expert term. `benchmarks/gpu/run.sh` runs them on a GPU machine.

`TRL_CHORD_GPU_TESTS_ON_CPU=1` runs the same checks on the CPU, at smaller sizes where noted, to check the checks
themselves on a machine without a GPU (minutes on 2 cores); each bar compares with a reference computed on the same
device, so it holds on either.
"""

import copy
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from helpers import (
    COMMON_ARGS,
    PLAIN_SGD,
    chord_config,
    make_expert_dataset,
    make_rl_prompts,
    make_trainer,
    odd_char_reward,
    weights,
)
from transformers import AutoTokenizer
from transformers.utils import is_triton_available
from trl import GRPOConfig, GRPOTrainer

from trl_chord import ChordConfig, ChordTrainer
from trl_chord.expert_data import collate_expert_batch, prepare_expert_dataset
from trl_chord.expert_head.chunked_nll import weighted_expert_nll


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "gpu"))
from gpu_setup import (  # noqa: E402
    QWEN2_5_0_5B,
    expert_dataset,
    expert_head_path,
    full_vocabulary_tokenizer,
    random_model,
    with_layers,
)


# Deterministic cuBLAS, which the deterministic mode of the trainer tests asks for (else it warns on every product); it
# must be set before the first product on the GPU, hence at import
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _device() -> torch.device | None:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("TRL_CHORD_GPU_TESTS_ON_CPU") == "1":
        return torch.device("cpu")
    return None


DEVICE = _device()
ON_CUDA = DEVICE is not None and DEVICE.type == "cuda"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE is None, reason="needs CUDA (TRL_CHORD_GPU_TESTS_ON_CPU=1 runs these on the CPU)"),
]

# ---------------------------------------------------------------------------------------------------------------------
# The expert head alone (`weighted_expert_nll`) against fp64 full logits differentiated by autograd

# A 1k-token expert micro-batch over Qwen2.5-0.5B's hidden size; on the CPU, fewer tokens and a narrower hidden state
HEAD_TOKENS = 1000 if ON_CUDA else 200
HEAD_HIDDEN = 896 if ON_CUDA else 64
HEAD_CHUNKS = 6  # the tile holds a sixth of the tokens: five full chunks and a shorter last one
VOCAB_SIZES = (32768, 151936)
LOGIT_STD = 4.0  # peaked distributions, like a trained model's: sampled targets have p from about 0 to about 1
UPSTREAM = 0.25  # the gradient reaching the loss (mu over the accumulation steps): the head must scale by it
AMP_BAR = 3.0  # our error may be at most this many times standard AMP's, on the same inputs and device


@dataclass(frozen=True)
class Precision:
    """How the head runs: its parameters' dtype, its products' dtype, and the loss scale of its backward."""

    name: str
    param_dtype: torch.dtype
    compute_dtype: torch.dtype
    loss_scale: float = 1.0

    @property
    def autocast(self) -> bool:
        return self.param_dtype != self.compute_dtype


PRECISIONS = [
    Precision("bf16", torch.bfloat16, torch.bfloat16),  # bf16 weights, as TRL loads Qwen2.5
    Precision("bf16-autocast", torch.float32, torch.bfloat16),  # fp32 weights under bf16 autocast (`bf16=True`)
    Precision("fp16-autocast", torch.float32, torch.float16, loss_scale=2.0**16),  # fp16 AMP, GradScaler's scale
]


@dataclass
class HeadResult:
    loss: torch.Tensor
    token_log_probs: torch.Tensor
    grads: dict[str, torch.Tensor]


_cases = {}


def _head_case(vocab_size: int, weighting: str):
    """fp64 hidden states, head and targets (half drawn from the head's own distribution, half uniformly), and the
    exact loss, log-probabilities and gradients (fp64 autograd through the full logits). Cached: the fp64 oracle of a
    152k vocabulary is the costly part."""
    key = (vocab_size, weighting)
    if key not in _cases:
        generator = torch.Generator(device=DEVICE).manual_seed(vocab_size)
        options = {"device": DEVICE, "dtype": torch.float64, "generator": generator}
        hidden = torch.randn(HEAD_TOKENS, HEAD_HIDDEN, **options)
        weight = torch.randn(vocab_size, HEAD_HIDDEN, **options) * (LOGIT_STD / HEAD_HIDDEN**0.5)
        bias = torch.randn(vocab_size, **options) * 0.5
        with torch.no_grad():
            probs = torch.softmax(hidden @ weight.t() + bias, -1)
            sampled = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        uniform = torch.randint(0, vocab_size, (HEAD_TOKENS,), device=DEVICE, generator=generator)
        targets = torch.where(torch.arange(HEAD_TOKENS, device=DEVICE) % 2 == 0, sampled, uniform)
        inputs = {"hidden": hidden, "weight": weight, "bias": bias}
        _cases[key] = (inputs, targets, _full_logits_head(inputs, targets, weighting, None))
    return _cases[key]


def _weighted_nll(logits: torch.Tensor, targets: torch.Tensor, weighting: str):
    """The token mean of `-log p * stopgrad(w)` from full logits, its weights written out here (phi = p (1 - p))."""
    token_log_probs = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    probs = token_log_probs.detach().exp()
    token_weights = torch.ones_like(probs) if weighting == "uniform" else probs * (1 - probs)
    return -(token_log_probs * token_weights).mean(), token_log_probs.detach()


def _leaves(inputs: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to(dtype).requires_grad_(True) for name, tensor in inputs.items()}


def _full_logits_head(inputs, targets, weighting, precision: Precision | None) -> HeadResult:
    """Autograd through the full logits: in fp64 without `precision` (the oracle), else standard AMP, i.e. the
    logits as the precision's product gives them, an fp32 `log_softmax`, and a loss-scaled backward."""
    dtype = torch.float64 if precision is None else precision.param_dtype
    leaves = _leaves(inputs, dtype)
    autocast = precision is not None and precision.autocast
    with torch.autocast(DEVICE.type, dtype=precision.compute_dtype if autocast else None, enabled=autocast):
        logits = torch.nn.functional.linear(leaves["hidden"], leaves["weight"], leaves["bias"])
    if precision is not None:
        assert logits.dtype == precision.compute_dtype
        logits = logits.float()
    loss, token_log_probs = _weighted_nll(logits, targets, weighting)
    loss_scale = 1.0 if precision is None else precision.loss_scale
    (loss * UPSTREAM * loss_scale).backward()
    return HeadResult(loss.detach(), token_log_probs, {name: leaf.grad / loss_scale for name, leaf in leaves.items()})


def _chord_head(
    inputs, targets, weighting, precision: Precision, gradient_in_forward: bool, num_chunks: int = HEAD_CHUNKS
) -> HeadResult:
    """trl_chord's head on the same inputs, as the model hook runs it under that precision, in `num_chunks` chunks."""
    leaves = _leaves(inputs, precision.param_dtype)
    vocab_size = inputs["weight"].shape[0]
    out = weighted_expert_nll(
        leaves["hidden"],
        leaves["weight"],
        leaves["bias"],
        targets,
        weighting,
        compute_dtype=precision.compute_dtype,
        tile_bytes=-(-HEAD_TOKENS // num_chunks) * 4 * vocab_size,
        gradient_in_forward=gradient_in_forward,
    )
    assert out.loss.dtype == torch.float32  # the softmax and the loss stay fp32
    (out.loss * UPSTREAM * precision.loss_scale).backward()
    for name, leaf in leaves.items():
        assert leaf.grad.dtype == precision.param_dtype, name
    return HeadResult(
        out.loss.detach(),
        out.token_log_probs,
        {name: leaf.grad / precision.loss_scale for name, leaf in leaves.items()},
    )


def _relative_error(value: torch.Tensor, exact: torch.Tensor) -> float:
    return ((value.double() - exact).norm() / exact.norm()).item()


def _max_error(value: torch.Tensor, exact: torch.Tensor) -> float:
    return (value.double() - exact).abs().max().item()


@pytest.mark.parametrize("gradient_in_forward", [True, False], ids=["gradient-in-forward", "recompute"])
@pytest.mark.parametrize("precision", PRECISIONS, ids=lambda precision: precision.name)
@pytest.mark.parametrize("weighting", ["uniform", "phi"])
@pytest.mark.parametrize("vocab_size", VOCAB_SIZES, ids=["vocab32k", "vocab152k"])
def test_expert_head_matches_fp64_full_logits_as_closely_as_standard_amp(
    vocab_size, weighting, precision, gradient_in_forward
):
    inputs, targets, exact = _head_case(vocab_size, weighting)
    amp = _full_logits_head(inputs, targets, weighting, precision)
    ours = _chord_head(inputs, targets, weighting, precision, gradient_in_forward)

    errors = {
        name: (
            _relative_error(ours.grads[name], exact.grads[name]),
            _relative_error(amp.grads[name], exact.grads[name]),
        )
        for name in inputs
    }
    errors["token_log_probs"] = (
        _max_error(ours.token_log_probs, exact.token_log_probs),
        _max_error(amp.token_log_probs, exact.token_log_probs),
    )
    errors["loss"] = (_relative_error(ours.loss, exact.loss), _relative_error(amp.loss, exact.loss))
    # The loss is one number whose AMP error can vanish by chance: half a unit in the last place of the products
    loss_floor = torch.finfo(precision.compute_dtype).eps / 2
    for name, (our_error, amp_error) in errors.items():
        bar = AMP_BAR * amp_error if name != "loss" else max(AMP_BAR * amp_error, loss_floor)
        assert our_error <= bar, f"{name}: error {our_error:.3g}, standard AMP's {amp_error:.3g} ({errors})"
    # The products really ran in the low precision (an fp32 head would be 100 times closer than AMP)
    our_error, amp_error = errors["token_log_probs"]
    assert our_error >= amp_error / 10, errors


@pytest.fixture
def full_precision_reductions():
    """bf16 and fp16 products reduced in fp32 alone: cuBLAS may otherwise split a product's sum and add the parts in
    bf16 or fp16, which would make the logits below depend on how many tokens a product has."""
    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_bf16_reduced_precision_reduction, matmul.allow_fp16_reduced_precision_reduction
    matmul.allow_bf16_reduced_precision_reduction = matmul.allow_fp16_reduced_precision_reduction = False
    yield
    matmul.allow_bf16_reduced_precision_reduction, matmul.allow_fp16_reduced_precision_reduction = previous


@pytest.mark.parametrize("gradient_in_forward", [True, False], ids=["gradient-in-forward", "recompute"])
@pytest.mark.parametrize("precision", PRECISIONS, ids=lambda precision: precision.name)
@pytest.mark.parametrize("vocab_size", VOCAB_SIZES, ids=["vocab32k", "vocab152k"])
def test_expert_head_sums_its_chunks_in_fp32(vocab_size, precision, gradient_in_forward, full_precision_reductions):
    """
    The head's weight gradient is a sum over token chunks of low-precision products. Rounding each chunk's product to
    bf16 before the sum (instead of `addmm(..., out_dtype=float32)` on CUDA) biases training while each step's error
    stays the size of standard AMP's, so the test above cannot see it; here six chunks must give what one does. The
    inputs are multiples of powers of two whose logits any fp32 reduction sums exactly, so that only the chunk sums can
    differ.
    """
    generator = torch.Generator(device=DEVICE).manual_seed(1)
    options = {"device": DEVICE, "generator": generator}
    inputs = {
        "hidden": torch.randint(-4, 5, (HEAD_TOKENS, HEAD_HIDDEN), **options) / 4,
        "weight": torch.randint(-8, 9, (vocab_size, HEAD_HIDDEN), **options) / 64,
        "bias": torch.randint(-8, 9, (vocab_size,), **options) / 16,
    }
    targets = torch.randint(0, vocab_size, (HEAD_TOKENS,), **options)
    one_chunk, six_chunks = (
        _chord_head(inputs, targets, "phi", precision, gradient_in_forward, num_chunks=num_chunks)
        for num_chunks in (1, HEAD_CHUNKS)
    )
    for name in ("weight", "bias"):
        # Correct sums differ by their order only (about 1e-7; a final bf16 rounding flipped by it here and there);
        # sums of bf16-rounded chunk products differ by 1e-4 to 2e-3
        error = _relative_error(six_chunks.grads[name], one_chunk.grads[name].double())
        assert error <= 3e-5, (name, error)


def test_expert_head_never_holds_the_full_logits_on_the_device():
    """Peak device memory of the head's forward and backward, on the caching allocator's own count on CUDA (the
    profiler's allocation events on the CPU), against the full logits' fp32 size."""
    from trl_chord.demo.memory import PeakMemory, Variant

    num_tokens, hidden_size, vocab_size = (4096, 896, 151936) if ON_CUDA else (512, 32, 4096)
    tile_bytes = 256 << 20 if ON_CUDA else num_tokens * vocab_size * 4 // 8  # trl_chord's default tile on CUDA
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    options = {"device": DEVICE, "generator": generator}
    hidden = torch.randn(num_tokens, hidden_size, **options).bfloat16().requires_grad_(True)
    weight = (torch.randn(vocab_size, hidden_size, **options) * 0.1).bfloat16().requires_grad_(True)
    targets = torch.randint(0, vocab_size, (num_tokens,), **options)
    full_logits_bytes = num_tokens * vocab_size * 4

    def chunked_step():
        hidden.grad = weight.grad = None
        weighted_expert_nll(hidden, weight, None, targets, "phi", tile_bytes=tile_bytes).loss.backward()

    def full_logits_step():
        hidden.grad = weight.grad = None
        log_softmax = (hidden @ weight.t()).float().log_softmax(-1)
        (-log_softmax.gather(-1, targets[:, None]).mean()).backward()

    meter = PeakMemory(DEVICE)
    chunked, full_logits = (
        meter.measure(Variant(name, None, step))
        for name, step in [("chunked", chunked_step), ("full_logits", full_logits_step)]
    )
    assert full_logits >= 2 * full_logits_bytes  # the meter sees the fp32 logits and their log_softmax
    # One tile and its dtype copies, and the fp32 gradients of the head and the hidden states and their bf16 casts
    gradients_bytes = 4 * (vocab_size * hidden_size + num_tokens * hidden_size)
    assert chunked <= 3 * tile_bytes + 2 * gradients_bytes < full_logits_bytes, (chunked, full_logits_bytes)


# ---------------------------------------------------------------------------------------------------------------------
# The trainer on the GPU


def _logged(trainer, key) -> list:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def _relative_norm(difference: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    numerator = sum(value.double().pow(2).sum() for value in difference.values()).sqrt()
    return (numerator / sum(value.double().pow(2).sum() for value in reference.values()).sqrt()).item()


@pytest.fixture
def deterministic_kernels():
    """Deterministic kernels where torch has them (embedding backward, scatter), warnings elsewhere: the updates
    compared below then differ by the order of a few fp32 sums at most, not by whole atomics races."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_mu_zero_gives_grpo_trainers_update(tiny_model_dir, tmp_path, bf16, deterministic_kernels):
    settings = {**COMMON_ARGS, **PLAIN_SGD, "bf16": bf16, "max_steps": 1, "gradient_accumulation_steps": 2}
    settings["use_cpu"] = not ON_CUDA  # transformers refuses bf16 on the CPU otherwise
    # Eager attention: its backward has no atomics (SDPA's memory-efficient kernel's has)
    settings["model_init_kwargs"] = {"attn_implementation": "eager"}
    builders = {
        "grpo": lambda: GRPOTrainer(
            model=tiny_model_dir,
            reward_funcs=odd_char_reward,
            args=GRPOConfig(output_dir=str(tmp_path / "grpo"), **settings),
            train_dataset=make_rl_prompts(),
            processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
        ),
        "chord": lambda: make_trainer(
            tiny_model_dir,
            chord_config(tmp_path, **settings, chord_mu_peak=0.0, chord_mu_valley=0.0),
            make_expert_dataset(),
        ),
    }
    trainers, updates = {}, {}
    for name, build in builders.items():  # each built and trained in turn, from the same seed
        trainer = trainers[name] = build()
        assert trainer.accelerator.device.type == DEVICE.type
        before = weights(trainer)
        trainer.train()
        updates[name] = {key: value - before[key] for key, value in weights(trainer).items()}
    grpo, chord = trainers["grpo"], trainers["chord"]

    assert _logged(chord, "reward") == _logged(grpo, "reward")  # the same rollouts
    assert _logged(chord, "chord/mu") == [0.0] and "chord/sft_loss" not in chord.state.log_history[0]
    assert _logged(chord, "loss") == pytest.approx(_logged(grpo, "loss"), rel=1e-5, abs=1e-7)
    assert max(update.abs().max().item() for update in updates["grpo"].values()) > 1e-4, "GRPO did not train"
    difference = {key: updates["chord"][key] - updates["grpo"][key] for key in updates["grpo"]}
    # fp32: the order of a few sums; bf16: a bf16 rounding flipped by such an order, here and there
    assert _relative_norm(difference, updates["grpo"]) <= (1e-2 if bf16 else 1e-4)


def _token_id_reward(completion_ids, **kwargs) -> list[float]:
    """A reward that differs between completions, whatever text they decode to."""
    return [sum(ids) % 97 / 97 for ids in completion_ids]


def _expert_nll_gradient(model, batch, autocast: bool) -> dict[str, torch.Tensor]:
    """The mean NLL of an expert micro-batch's completion tokens from the model's own full logits (an fp32
    `log_softmax`), and its gradient by autograd: in fp32, or under bf16 autocast (standard AMP)."""
    model = copy.deepcopy(model)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["completion_mask"][:, 1:].bool()
    log_probs = logits.float().log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    (-log_probs[mask].mean()).backward()
    return {name: param.grad for name, param in model.named_parameters()}


def test_chord_step_in_bf16_on_a_qwen2_5_0_5b_shaped_model(tmp_path, deterministic_kernels):
    """
    One CHORD step in bf16 mixed precision (`bf16=True`) on a Qwen2.5-0.5B-shaped model with random weights, its
    151,936-token vocabulary included, with mu = 0.5, uniform token weights and plain SGD. Its update must be
    (1 - mu) times TRL's GRPOTrainer update on the same rollouts plus mu times the expert NLL's, whose gradient is
    checked against an fp32 full-logits oracle as closely as standard bf16 AMP gets to it. The GRPO term goes through
    TRL's fused LM head (its Triton kernels on CUDA), the expert term through trl_chord's.
    """
    mu = 0.5
    expert_length = 512 if ON_CUDA else 128
    shape = QWEN2_5_0_5B if ON_CUDA else with_layers(QWEN2_5_0_5B, 2)
    tokenizer = full_vocabulary_tokenizer(shape)
    # Eager attention: its backward has no atomics, so that the two runs' GRPO gradients agree to the last bits
    model = random_model(shape, tokenizer, DEVICE, torch.float32, attn_implementation="eager")
    experts = expert_dataset(tokenizer, [expert_length], seed=0)
    prompts = Dataset.from_dict({"prompt": [f"Task {index}: " for index in range(8)]})
    settings = dict(
        per_device_train_batch_size=8,
        num_generations=8,
        max_completion_length=16,
        max_steps=1,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        bf16=True,
        use_cpu=not ON_CUDA,
        seed=0,
        **PLAIN_SGD,
    )
    builders = {
        "grpo": lambda: GRPOTrainer(
            model=copy.deepcopy(model),
            reward_funcs=_token_id_reward,
            args=GRPOConfig(output_dir=str(tmp_path / "grpo"), **settings),
            train_dataset=prompts,
            processing_class=tokenizer,
        ),
        "chord": lambda: ChordTrainer(
            model=copy.deepcopy(model),
            reward_funcs=_token_id_reward,
            args=ChordConfig(
                output_dir=str(tmp_path / "chord"),
                chord_mu_peak=mu,
                chord_mu_valley=mu,
                chord_token_weighting="uniform",
                chord_sft_max_length=expert_length,
                **settings,
            ),
            train_dataset=prompts,
            processing_class=tokenizer,
            expert_dataset=experts,
        ),
    }
    logs, updates = {}, {}
    for name, build in builders.items():  # one after the other: two 0.5B models and their gradients at a time
        trainer = build()
        before = weights(trainer)
        trainer.train()
        updates[name] = {key: value - before[key] for key, value in weights(trainer).items()}
        logs[name] = trainer.state.log_history
        if name == "chord":
            assert expert_head_path(trainer.model) == "chunked"  # trl_chord's head, not TRL's or full logits
        del trainer, before
        torch.cuda.empty_cache() if ON_CUDA else None
    if ON_CUDA:
        assert is_triton_available()  # so TRL's fused head runs its Triton kernels for the GRPO term

    def logged(name, key):
        return [entry[key] for entry in logs[name] if key in entry]

    assert logged("chord", "reward") == logged("grpo", "reward")  # the same rollouts
    assert logged("chord", "chord/mu") == [mu]
    assert logged("chord", "chord/nonzero_advantage_frac")[0] > 0  # the GRPO term is not zero
    batch = collate_expert_batch(
        list(prepare_expert_dataset(experts, tokenizer, max_length=expert_length)), tokenizer.pad_token_id
    )
    batch = {key: tensor.to(DEVICE) for key, tensor in batch.items()}
    assert logged("chord", "chord/expert_tokens") == [batch["completion_mask"][:, 1:].sum().item()]

    exact = _expert_nll_gradient(model, batch, autocast=False)
    amp = _expert_nll_gradient(model, batch, autocast=True)
    learning_rate = PLAIN_SGD["learning_rate"]
    sft_update = {key: -learning_rate * mu * grad for key, grad in exact.items()}
    expected = {key: (1 - mu) * updates["grpo"][key] + sft_update[key] for key in exact}
    error = _relative_norm({key: updates["chord"][key] - expected[key] for key in exact}, sft_update)
    amp_error = _relative_norm({key: amp[key] - exact[key] for key in exact}, exact)
    grpo_share = _relative_norm({key: (1 - mu) * updates["grpo"][key] for key in exact}, sft_update)
    # A GRPO term scaled by 1 instead of 1 - mu, or an expert term off by a few percent, exceeds the bar
    assert error <= max(AMP_BAR * amp_error, 1e-2), (error, amp_error, grpo_share)
    assert grpo_share > 0.1, (error, amp_error, grpo_share)
