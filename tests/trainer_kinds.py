"""
The three TRL trainers CHORD extends, each with its CHORD trainer, built alike for the contract every CHORD trainer
keeps (tests/test_trainer_contract.py): TRL's own trainer as the oracle, the CHORD trainer on the same data and seed.
"""

from helpers import COMMON_ARGS, RLOO_ARGS, make_rl_prompts, make_trainer, odd_char_reward
from transformers import AutoTokenizer
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from trl_chord import ChordConfig, ChordRLOOConfig


class GRPOKind:
    """`ChordTrainer` and TRL's `GRPOTrainer`."""

    id = "grpo"
    term = "grpo"  # the on-policy term's name in the metrics
    generates_rollouts = True  # in `_prepare_inputs`, skipped with the term
    # Two micro-steps per optimizer step, together one group of 4 rollouts
    two_micro_steps = dict(gradient_accumulation_steps=2, per_device_train_batch_size=2)
    resume_is_exact = True
    default_args = COMMON_ARGS

    def prepare(self, monkeypatch) -> None:
        """What a test of this kind needs patched."""

    @property
    def trl_classes(self) -> tuple[type, type]:
        return GRPOConfig, GRPOTrainer

    @property
    def chord_config_class(self) -> type:
        return ChordConfig

    def config(self, config_class, output_dir, **options):
        return config_class(**{**self.default_args, **options, "output_dir": str(output_dir)})

    def baseline(self, model_dir, tmp_path, **overrides):
        """TRL's own trainer, writing to `tmp_path / "baseline"`."""
        config_class, trainer_class = self.trl_classes
        return trainer_class(
            model=model_dir,
            reward_funcs=odd_char_reward,
            args=self.config(config_class, tmp_path / "baseline", **overrides),
            train_dataset=make_rl_prompts(),
            processing_class=AutoTokenizer.from_pretrained(model_dir),
        )

    def chord(self, model_dir, tmp_path, expert_dataset=None, trainer_kwargs=None, **options):
        """The CHORD trainer (`options`: `chord_*` options and the trainer's own; `trainer_kwargs`: the trainer's
        other arguments), writing to `tmp_path / "out"`."""
        args = self.config(self.chord_config_class, tmp_path / "out", **options)
        return self.trainer_for(model_dir, args, expert_dataset, **(trainer_kwargs or {}))

    def trainer_for(self, model_dir, args, expert_dataset=None, **trainer_kwargs):
        """The CHORD trainer on `args` (a CHORD config, or one it refuses)."""
        return make_trainer(model_dir, args, expert_dataset, **trainer_kwargs)

    def record_rollouts(self, trainer) -> list:
        """The micro-steps at which the trainer generates rollouts."""
        generations = []
        generate = trainer._generate_and_score_completions
        trainer._generate_and_score_completions = lambda inputs: generations.append(trainer._step) or generate(inputs)
        return generations


class RLOOKind(GRPOKind):
    """`ChordRLOOTrainer` and TRL's `RLOOTrainer`."""

    id = term = "rloo"
    default_args = RLOO_ARGS

    @property
    def trl_classes(self) -> tuple[type, type]:
        return RLOOConfig, RLOOTrainer

    @property
    def chord_config_class(self) -> type:
        return ChordRLOOConfig


class AsyncGRPOKind(GRPOKind):
    """`ChordAsyncGRPOTrainer` and TRL's `AsyncGRPOTrainer`, each with an in-process rollout worker
    (tests/async_grpo_cpu.py), which keeps generating whatever mu is."""

    id = "async"
    generates_rollouts = False
    two_micro_steps = dict(gradient_accumulation_steps=2, per_device_train_batch_size=4)
    # The rollout queue is live: a resumed run continues from the saved prompt position, not from the same rollouts
    resume_is_exact = False

    def prepare(self, monkeypatch) -> None:
        from async_grpo_cpu import cpu_seams

        cpu_seams(monkeypatch)

    @property
    def default_args(self) -> dict:
        from async_grpo_cpu import ASYNC_ARGS

        return ASYNC_ARGS

    @property
    def trl_classes(self) -> tuple[type, type]:
        from trl.experimental.async_grpo import AsyncGRPOConfig, AsyncGRPOTrainer

        return AsyncGRPOConfig, AsyncGRPOTrainer

    @property
    def chord_config_class(self) -> type:
        from trl_chord.chord_async_grpo import ChordAsyncGRPOConfig

        return ChordAsyncGRPOConfig

    def baseline(self, model_dir, tmp_path, **overrides):
        from async_grpo_cpu import make_async_grpo_trainer

        return make_async_grpo_trainer(model_dir, self.config(self.trl_classes[0], tmp_path / "baseline", **overrides))

    def trainer_for(self, model_dir, args, expert_dataset=None, **trainer_kwargs):
        from async_grpo_cpu import make_async_grpo_trainer

        return make_async_grpo_trainer(model_dir, args, expert_dataset, chord=True, **trainer_kwargs)

    def record_rollouts(self, trainer) -> list:
        """The policy version of each step's worth of rollouts the worker generated."""
        return trainer.rollout_worker.versions_generated
