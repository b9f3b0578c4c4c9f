import json
import re
from dataclasses import dataclass, field, fields
from typing import ClassVar

from trl import GRPOConfig

from .expert_head import EXPERT_HEADS
from .losses import SFT_LOSS_AGGREGATIONS, TOKEN_WEIGHT_NORMALIZATIONS, TOKEN_WEIGHTINGS


# The part of every CHORD config's docstring that documents the chord_* options (appended by `documented`)
CHORD_OPTIONS_DOC = """
    The `chord_*` options are named as in ms-swift. Two defaults differ from ms-swift's: `chord_enable_phi_function` is
    `True` here and `False` there, and ms-swift requires the four `chord_mu_*` values (here they default to a constant
    0.1). The defaults are the paper's CHORD-phi: a constant `mu = 0.1` with phi token weights.

    `mu` at optimizer step `s` (0-based: the number of steps already completed), with `W = chord_mu_warmup_steps` and
    `D = chord_mu_decay_steps`, is `peak * s / W` for `s < W`, then
    `valley + (peak - valley) * 0.5 * (1 + cos(pi * (s - W) / D))` for `W <= s < W + D`, then `valley`. With
    `W = D = 0` it is the constant `chord_mu_valley` (CHORD-phi). The paper's CHORD-mu for math uses peak 0.9,
    valley 0.05, `W = 0`, `D = 200`.

    Parameters:
        > Parameters that control the mu schedule

        chord_mu_peak (`float`, *optional*, defaults to `0.1`):
            Weight of the SFT term at the end of the warm-up, where the cosine decay starts. In `[0, 1]`.
        chord_mu_valley (`float`, *optional*, defaults to `0.1`):
            Weight of the SFT term after the decay, and at every step when `chord_mu_warmup_steps` and
            `chord_mu_decay_steps` are both 0. In `[0, 1]`.
        chord_mu_warmup_steps (`int`, *optional*, defaults to `0`):
            Number of optimizer steps of linear warm-up of `mu` from 0 to `chord_mu_peak`.
        chord_mu_decay_steps (`int`, *optional*, defaults to `0`):
            Number of optimizer steps of cosine decay of `mu` from `chord_mu_peak` to `chord_mu_valley`.
        chord_mu_schedule (`str`, *optional*, defaults to `"cosine"`):
            `"cosine"`: the CHORD-mu schedule above. `"adaptive"`: the paper's adaptive variant,
            `mu = max(0, chord_adaptive_mu_tau - mean on-policy reward)` (capped at 1), recomputed each time a batch of
            rollouts is scored; the four options above are then unused.
        chord_adaptive_mu_tau (`float`, *optional*, defaults to `0.5`):
            Reward threshold `tau` of the adaptive schedule (0.5 in the paper).

        > Parameters that control the expert SFT term

        chord_enable_phi_function (`bool`, *optional*, defaults to `True`):
            Whether to weight each expert token's `-log p` by `phi = p * (1 - p)`, detached (CHORD-phi). `p` is the
            policy's probability of the expert token at temperature 1. Ignored when `chord_token_weighting` is set.
        chord_token_weighting (`str`, *optional*):
            Detached weight `w` of each expert token's `-log p`: `"uniform"` (1), `"phi"` (`p * (1 - p)`), `"is"`
            (`p`, importance sampling), `"entropy"` (the token's entropy over the micro-batch mean) or `"focal"`
            (`(1 - p) ** chord_focal_gamma`). Unset: `"phi"` if `chord_enable_phi_function` else `"uniform"`.
        chord_focal_gamma (`float`, *optional*, defaults to `2.0`):
            Exponent of the focal token weighting, `>= 0`.
        chord_token_weight_normalization (`str`, *optional*, defaults to `"none"`):
            `"mean"`: each expert micro-batch's token weights are rescaled to mean 1 over its expert tokens (as the
            entropy weighting's always are), so that the weightings differ in which tokens they favour, not in how much
            the expert term weighs: phi's weights average about 0.02 where the expert's style is far from the policy's,
            which makes `mu = 0.1` act like `mu = 0.002` (`chord/effective_mu` shows it). `"none"`: the weights as the
            weighting defines them (the paper's CHORD-phi).
        chord_sft_per_device_train_batch_size (`int`, *optional*, defaults to `1`):
            Number of expert examples in the SFT micro-batch drawn on each process at every training micro-step.
        chord_sft_dataset_proportions (`dict[str, float]` or `str`, *optional*):
            With several expert sources (`expert_dataset={name: dataset, ...}`), the share of expert examples each
            source gives, by name (normalised to sum to 1; a JSON string on the command line). Unset: in proportion
            to the sources' numbers of usable examples, as if they were one dataset.
        chord_sft_loss_agg_mode (`str`, *optional*, defaults to `"token-mean"`):
            How the expert micro-batch's per-token losses become the SFT loss (Trinity-RFT's `sft_loss_agg_mode`):
            `"token-mean"` (every token counts the same, so a long solution counts more), `"seq-mean-token-mean"`
            (every example counts the same), `"seq-mean-token-sum"` (the token sum, averaged over examples) or
            `"seq-mean-token-sum-norm"` (the token sum over the constant `chord_sft_max_length`, averaged over
            examples). Each process aggregates its own micro-batch; the gradients are then averaged over processes
            and accumulation steps, as the on-policy term's are.
        chord_sft_max_length (`int`, *optional*, defaults to `1024`):
            Maximum length in tokens of an expert example (prompt and completion together). Longer examples are cut
            at the end of the completion; an example whose completion is cut away entirely is skipped and counted.
        chord_expert_head (`str`, *optional*, defaults to `"auto"`):
            The LM head of the expert term. `"auto"`: the cheapest exact one, found once by probing the model (the
            chunked head where the logits are `lm_head(last_hidden_state)`, TRL's fused head where the model scales
            or caps them as TRL knows how, else the model's own full logits); logged once, the same on every process.
            `"chunked"`, `"trl_fused"`: that head, refused with an error where the probe finds it inexact.
            `"full_logits"`: the model's own logits (exact by construction, costlier in memory; no probe).
        chord_log_term_grad_norms (`bool`, *optional*, defaults to `False`):
            Log `chord/expert_grad_norm` and `chord/<on-policy term>_grad_norm`, the norms of `mu * grad(L_SFT)` and
            `(1 - mu) * grad(L_on_policy)` of the micro-steps of each logged step, where the two terms have their own
            backwards (one device, DDP; not DeepSpeed, FSDP or LOMO). They cost a hook and a norm per trainable
            parameter per backward of those micro-steps: 9% of a plain SFT step at `logging_steps=1` on the CPU
            benchmark's model (95% interval 1% to 16%, docs/performance.md), more on smaller models. Off, nothing is
            hooked.
"""


def checked_chord_args(config_class: type, args, model, trainer_name: str):
    """`args` checked to be a `config_class`, or its default for `model` when `None`; a TRL config is refused with the
    conversion that makes it one (`from_grpo_config` for `ChordConfig`)."""
    if args is None:
        model_name = model if isinstance(model, str) else model.config._name_or_path
        return config_class(f"{model_name.split('/')[-1]}-{trainer_name}")
    if not isinstance(args, config_class):
        base = config_class._base_config.__name__
        # The conversion's name is the base config's in snake case: GRPOConfig, from_grpo_config
        argument = re.sub(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", base).lower()
        raise TypeError(
            f"`args` must be a `{config_class.__name__}` (a `{base}` with the chord_* options), got "
            f"{type(args).__name__}. "
            f"Build it with `{config_class.__name__}.from_{argument}({argument}, chord_...=...)`."
        )
    return args


def use_activation_checkpointing_names(config) -> None:
    """
    transformers 5.x renamed `gradient_checkpointing(_kwargs)` to `activation_checkpointing(_kwargs)` and warns
    whenever the old name is set, which GRPOConfig does by default (True) and the shipped configs do (the old name is
    the only one transformers 4 knows). Passed on under the new name, where there is one, the setting is the same and
    nothing warns; a value given under the new name wins, as in transformers. Called before `TrainingArguments`'s
    `__post_init__`.
    """
    for old, new in (
        ("gradient_checkpointing", "activation_checkpointing"),
        ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
    ):
        if hasattr(config, new) and getattr(config, new) is None and getattr(config, old) is not None:
            setattr(config, new, getattr(config, old))


def documented(config_class: type) -> type:
    """Append [`CHORD_OPTIONS_DOC`] to a CHORD config's docstring: one text for the chord_* options of every config."""
    config_class.__doc__ = config_class.__doc__.rstrip() + "\n" + CHORD_OPTIONS_DOC
    return config_class


@documented
@dataclass
class ChordOptions:
    r"""
    The `chord_*` options of CHORD (arXiv 2508.11408), defined, validated and documented once for every trainer CHORD
    extends. A CHORD config is this class followed by the trainer's own config, `ChordConfig(ChordOptions,
    GRPOConfig)`: the trainer's options come first (`output_dir` stays the first positional argument), and
    `__post_init__` checks the chord_* options before handing on to the trainer config's own checks.
    """

    chord_mu_peak: float = field(
        default=0.1,
        metadata={
            "help": "Weight of the SFT term at the end of the warm-up, where the cosine decay starts. In [0, 1]."
        },
    )
    chord_mu_valley: float = field(
        default=0.1,
        metadata={
            "help": "Weight of the SFT term after the decay, and at every step when chord_mu_warmup_steps and "
            "chord_mu_decay_steps are both 0. In [0, 1]."
        },
    )
    chord_mu_warmup_steps: int = field(
        default=0,
        metadata={"help": "Number of optimizer steps of linear warm-up of mu from 0 to chord_mu_peak."},
    )
    chord_mu_decay_steps: int = field(
        default=0,
        metadata={"help": "Number of optimizer steps of cosine decay of mu from chord_mu_peak to chord_mu_valley."},
    )
    chord_mu_schedule: str = field(
        default="cosine",
        metadata={
            "help": "cosine: the CHORD-mu schedule. adaptive: mu = max(0, chord_adaptive_mu_tau - mean on-policy "
            "reward), recomputed for each batch of rollouts.",
            "choices": ["cosine", "adaptive"],
        },
    )
    chord_adaptive_mu_tau: float = field(
        default=0.5, metadata={"help": "Reward threshold tau of the adaptive mu schedule (0.5 in the paper)."}
    )
    chord_enable_phi_function: bool = field(
        default=True,
        metadata={
            "help": "Whether to weight each expert token's -log p by phi = p * (1 - p), detached (CHORD-phi), with p "
            "the policy's probability of the expert token at temperature 1."
        },
    )
    chord_token_weighting: str | None = field(
        default=None,
        metadata={
            "help": "Detached weight of each expert token's -log p: uniform, phi (p(1-p)), is (p), entropy (entropy / "
            "mean entropy) or focal ((1-p)^gamma). Unset: phi if chord_enable_phi_function else uniform.",
            "choices": list(TOKEN_WEIGHTINGS),
        },
    )
    chord_focal_gamma: float = field(default=2.0, metadata={"help": "Exponent of the focal token weighting, >= 0."})
    chord_token_weight_normalization: str = field(
        default="none",
        metadata={
            "help": "mean: rescale each expert micro-batch's token weights to mean 1 (matched strength across "
            "weightings). none: the weights as the weighting defines them (the paper's CHORD-phi).",
            "choices": list(TOKEN_WEIGHT_NORMALIZATIONS),
        },
    )
    chord_sft_per_device_train_batch_size: int = field(
        default=1,
        metadata={
            "help": "Number of expert examples in the SFT micro-batch drawn on each process at every training "
            "micro-step."
        },
    )
    chord_sft_dataset_proportions: dict[str, float] | str | None = field(
        default=None,
        metadata={
            "help": "With several expert sources, the share of expert examples each gives, by name, e.g. "
            '\'{"math": 0.7, "tools": 0.3}\'. Unset: in proportion to their sizes.'
        },
    )
    chord_sft_loss_agg_mode: str = field(
        default="token-mean",
        metadata={
            "help": "How the expert micro-batch's per-token losses are aggregated: token-mean, seq-mean-token-mean, "
            "seq-mean-token-sum, or seq-mean-token-sum-norm (token sum over chord_sft_max_length).",
            "choices": list(SFT_LOSS_AGGREGATIONS),
        },
    )
    chord_sft_max_length: int = field(
        default=1024,
        metadata={
            "help": "Maximum length in tokens of an expert example (prompt and completion). Longer examples are cut "
            "at the end of the completion; an example whose completion is cut away entirely is skipped and counted."
        },
    )

    chord_expert_head: str = field(
        default="auto",
        metadata={
            "help": "LM head of the expert term: auto (the cheapest exact one, found by probing the model), chunked, "
            "trl_fused (refused where inexact) or full_logits (the model's own logits, always exact).",
            "choices": list(EXPERT_HEADS),
        },
    )

    chord_log_term_grad_norms: bool = field(
        default=False,
        metadata={
            "help": "Log chord/expert_grad_norm and chord/<on-policy term>_grad_norm (each term's gradient norm) on "
            "logged steps, one device and DDP only. Costs a hook and a norm per trainable parameter per backward of "
            "a logged step's micro-steps: 0.09 of a plain SFT step at logging_steps=1 on the CPU benchmark's "
            "model (95 percent interval 0.01 to 0.16, docs/performance.md), more on smaller models."
        },
    )

    # The trainer's own config (set by each CHORD config, whose `from_<its snake-case name>` converts one)
    _base_config: ClassVar[type | None] = None

    @classmethod
    def _from_base_config(cls, base_config, derived: tuple[str, ...] = (), **chord_options):
        """A config of `cls` with every option of `base_config` but the `derived` ones, and the given chord_* ones."""
        options = {
            spec.name: getattr(base_config, spec.name)
            for spec in fields(cls._base_config)
            if spec.init and spec.name not in derived
        }
        return cls(**options, **chord_options)

    def __post_init__(self):
        self._check_schedule_and_sizes()
        self._check_expert_term_options()
        use_activation_checkpointing_names(self)
        super().__post_init__()

    def _check_schedule_and_sizes(self) -> None:
        for name in ("chord_mu_peak", "chord_mu_valley"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` must be in [0, 1], got {value}.")
        for name in ("chord_mu_warmup_steps", "chord_mu_decay_steps"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"`{name}` must be a number of optimizer steps >= 0, got {value}.")
        if self.chord_sft_per_device_train_batch_size < 1:
            raise ValueError(
                "`chord_sft_per_device_train_batch_size` must be >= 1 expert example per process, got "
                f"{self.chord_sft_per_device_train_batch_size}."
            )
        if self.chord_sft_max_length < 2:
            raise ValueError(
                "`chord_sft_max_length` must be >= 2 tokens (a prompt token and a completion token), got "
                f"{self.chord_sft_max_length}."
            )
        if self.chord_mu_schedule not in ("cosine", "adaptive"):
            raise ValueError(f"`chord_mu_schedule` must be 'cosine' or 'adaptive', got {self.chord_mu_schedule!r}.")
        if self.chord_adaptive_mu_tau < 0:
            raise ValueError(f"`chord_adaptive_mu_tau` must be >= 0, got {self.chord_adaptive_mu_tau}.")

    def _check_expert_term_options(self) -> None:
        """Checks the expert term's options; parses `chord_sft_dataset_proportions` given as JSON and resolves
        `chord_token_weighting` from `chord_enable_phi_function` (and back)."""
        if isinstance(self.chord_sft_dataset_proportions, str):
            self.chord_sft_dataset_proportions = json.loads(self.chord_sft_dataset_proportions)
        if self.chord_sft_dataset_proportions is not None:
            proportions = self.chord_sft_dataset_proportions
            if not isinstance(proportions, dict) or not proportions:
                raise ValueError(
                    f"`chord_sft_dataset_proportions` must map source names to proportions, got {proportions!r}."
                )
            for name, share in proportions.items():
                if not isinstance(share, (int, float)) or not share > 0:
                    raise ValueError(
                        f"`chord_sft_dataset_proportions`: the proportion of {name!r} must be a number > 0, got "
                        f"{share!r}."
                    )
        if self.chord_sft_loss_agg_mode not in SFT_LOSS_AGGREGATIONS:
            raise ValueError(
                f"`chord_sft_loss_agg_mode` must be one of {SFT_LOSS_AGGREGATIONS}, got "
                f"{self.chord_sft_loss_agg_mode!r}."
            )
        if self.chord_expert_head not in EXPERT_HEADS:
            raise ValueError(f"`chord_expert_head` must be one of {EXPERT_HEADS}, got {self.chord_expert_head!r}.")
        if self.chord_token_weight_normalization not in TOKEN_WEIGHT_NORMALIZATIONS:
            raise ValueError(
                f"`chord_token_weight_normalization` must be one of {TOKEN_WEIGHT_NORMALIZATIONS}, got "
                f"{self.chord_token_weight_normalization!r}."
            )
        if self.chord_focal_gamma < 0:
            raise ValueError(f"`chord_focal_gamma` must be >= 0, got {self.chord_focal_gamma}.")
        if self.chord_token_weighting is None:
            self.chord_token_weighting = "phi" if self.chord_enable_phi_function else "uniform"
        elif self.chord_token_weighting not in TOKEN_WEIGHTINGS:
            raise ValueError(
                f"`chord_token_weighting` must be one of {TOKEN_WEIGHTINGS}, got {self.chord_token_weighting!r}."
            )
        self.chord_enable_phi_function = self.chord_token_weighting == "phi"


@documented
@dataclass
class ChordConfig(ChordOptions, GRPOConfig):
    r"""
    Configuration class for [`ChordTrainer`].

    CHORD (arXiv 2508.11408) trains on `(1 - mu) * L_GRPO + mu * L_SFT`: TRL's GRPO loss on the model's own rollouts
    plus a supervised loss on expert answers from a separate dataset. [`ChordConfig`] inherits every parameter of
    [`~trl.GRPOConfig`] and adds the `chord_*` parameters of [`ChordOptions`], below.
    """

    _base_config = GRPOConfig

    @classmethod
    def from_grpo_config(cls, grpo_config: GRPOConfig, **chord_options) -> "ChordConfig":
        """
        A `ChordConfig` with every option of `grpo_config` and the given `chord_*` ones: for a script that builds a
        `GRPOConfig`. (`generation_batch_size` is left out: `GRPOConfig` derives it from `steps_per_generation`, which
        is kept, and refuses both.)
        """
        return cls._from_base_config(grpo_config, ("generation_batch_size",), **chord_options)
