import math
from dataclasses import dataclass, field, fields

from trl import GRPOConfig

from .chord_config import ChordOptions, documented, use_activation_checkpointing_names
from .luffy import LUFFY_LOSS_TYPES


# The part of every LUFFY config's docstring that documents the luffy_* options and the GRPOConfig defaults it changes
LUFFY_OPTIONS_DOC = """
    LUFFY (arXiv 2504.14945) puts `k` expert completions of each prompt into the prompt's group of rollouts. They are
    scored with the on-policy ones and share their group's advantage baseline; their tokens take LUFFY's policy
    shaping `-A * p / (p + gamma)` of the policy's probability `p`, unclipped, and the on-policy tokens the clipped
    surrogate of `loss_type`. The expert completions come with the prompts: a column of the RL dataset.

    Defaults: the authors' training script (`exp_scripts/train.sh` of ElliottYan/LUFFY), which changes five GRPOConfig
    defaults; each stays the user's to set: `loss_type="luffy"` (`loss_remove_token_mean=True`: each micro-batch's
    token sum over the padded width `max_completion_length`), `scale_rewards="none"` (`grpo_use_std=False`: the group
    mean is subtracted, no division by the standard deviation), `epsilon=inf` (`loss_remove_clip=True`: no clipping),
    `entropy_coef=0.001` (`entropy_coeff=0.001`, over every completion token, expert ones included) and `beta=0.0`
    (`use_kl_loss=False`, as GRPOConfig's default).

    Parameters:
        > Parameters that control LUFFY's mixed groups

        luffy_num_expert_completions (`int`, *optional*, defaults to `1`):
            Expert completions `k` in each prompt's group of `num_generations` (the authors' `n_prefix=1` of `n=8`):
            the group holds `num_generations - k` rollouts. `0` turns LUFFY off; with a TRL `loss_type` the trainer
            is then GRPOTrainer. A prompt whose row carries fewer expert completions than `k` has them reused in turn
            (with one, as in the authors' code, every expert place holds it); a prompt with none is trained on
            rollouts alone and counted in `luffy/missing_expert_frac`.
        luffy_gamma (`float`, *optional*, defaults to `0.1`):
            `gamma` of the policy shaping `f(p) = p / (p + gamma)` of the expert tokens (the authors'
            `off_policy_reshape="p_div_p_0.1"`). Must be > 0.
        luffy_expert_column (`str`, *optional*, defaults to `"expert_completion"`):
            Column of the RL dataset with each prompt's expert completion: a string (plain-text prompts, or the
            assistant's message for conversational ones), a list of messages, or a list of several of either.
"""

# What the LUFFY loss does not compute, and why: {option: (value it must keep, reason)}
UNSUPPORTED_WITH_LUFFY = {
    "importance_sampling_level": (
        "token",
        "the shaping weighs each expert token on its own, and a sequence-level ratio would mix the expert's tokens "
        "with a sampling ratio they do not have",
    ),
    "top_entropy_quantile": (1.0, "LUFFY trains every completion token"),
    "off_policy_mask_threshold": (None, "it masks sequences by their sampling log-probabilities, which experts lack"),
    "use_adaptive_entropy": (False, "the entropy bonus is a fixed `entropy_coef` (the authors' 0.001)"),
}


def luffy_loss_is_used(args) -> bool:
    """Whether a LUFFY config's micro-batches go through LUFFY's loss: with expert completions, or its aggregation."""
    return args.luffy_num_expert_completions > 0 or args.loss_type == "luffy"


def documented_luffy(config_class: type) -> type:
    """Append [`LUFFY_OPTIONS_DOC`] to a LUFFY config's docstring (after the chord_* options' text, if any)."""
    config_class.__doc__ = config_class.__doc__.rstrip() + "\n" + LUFFY_OPTIONS_DOC
    return config_class


@documented_luffy
@dataclass
class LuffyOptions:
    r"""
    The `luffy_*` options of LUFFY (arXiv 2504.14945), and the GRPOConfig defaults the authors' training script sets
    otherwise, defined and validated once for every LUFFY config: `LuffyConfig(LuffyOptions, GRPOConfig)` and, with
    CHORD's expert term as well, `ChordLuffyConfig(LuffyOptions, ChordOptions, GRPOConfig)`.
    """

    luffy_num_expert_completions: int = field(
        default=1,
        metadata={
            "help": "Expert completions k in each prompt's group of num_generations (the rest are rollouts). 0 turns "
            "LUFFY off."
        },
    )
    luffy_gamma: float = field(
        default=0.1,
        metadata={"help": "gamma of LUFFY's policy shaping p / (p + gamma) of the expert tokens. Must be > 0."},
    )
    luffy_expert_column: str = field(
        default="expert_completion",
        metadata={
            "help": "Column of the RL dataset with each prompt's expert completion (a string, a list of messages, or "
            "a list of either)."
        },
    )
    # GRPOConfig's options, with the defaults of the authors' training script (LUFFY_OPTIONS_DOC says which of its
    # settings each follows)
    loss_type: str = field(
        default="luffy",
        metadata={
            "help": "How token losses become a micro-batch's loss. luffy (the authors'): the token sum over "
            "max_completion_length. grpo, bnpo, dr_grpo, dapo: TRL's. Other TRL loss types are refused with LUFFY.",
        },
    )
    scale_rewards: str = field(
        default="none",
        metadata={
            "help": "GRPOConfig's option: group (divide advantages by the group's reward std), batch, or none (the "
            "authors': the group mean is subtracted only)."
        },
    )
    epsilon: float = field(
        default=math.inf,
        metadata={"help": "GRPOConfig's clipping epsilon of the on-policy tokens; inf (the authors'): no clipping."},
    )
    entropy_coef: float = field(
        default=0.001,
        metadata={"help": "GRPOConfig's entropy bonus coefficient, over every completion token (the authors' 0.001)."},
    )

    def __post_init__(self):
        k = self.luffy_num_expert_completions
        if not 0 <= k < self.num_generations:
            raise ValueError(
                f"`luffy_num_expert_completions` must be in [0, num_generations): a group of {self.num_generations} "
                f"needs at least one rollout, got {k}."
            )
        if not self.luffy_gamma > 0:
            raise ValueError(
                f"`luffy_gamma` must be > 0 (0 gives the expert tokens no gradient), got {self.luffy_gamma}."
            )
        if not self.luffy_expert_column:
            raise ValueError("`luffy_expert_column` must name a column of the RL dataset.")
        if luffy_loss_is_used(self):
            if self.loss_type not in LUFFY_LOSS_TYPES:
                raise ValueError(
                    f"LUFFY's loss aggregates with `loss_type` in {LUFFY_LOSS_TYPES} ('luffy' is the authors'), got "
                    f"{self.loss_type!r}."
                )
            for name, (value, reason) in UNSUPPORTED_WITH_LUFFY.items():
                if getattr(self, name) != value:
                    raise ValueError(f"LUFFY needs `{name}={value!r}`: {reason}. Got {getattr(self, name)!r}.")
            if self.loss_type in ("luffy", "dr_grpo") and self.max_completion_length is None:
                raise ValueError(
                    f"`loss_type={self.loss_type!r}` divides by `max_completion_length`, which is unset: set it."
                )
        use_activation_checkpointing_names(self)
        super().__post_init__()


def grpo_options(grpo_config: GRPOConfig) -> dict:
    """Every option of `grpo_config` but `generation_batch_size` (derived from `steps_per_generation`, which is kept:
    GRPOConfig refuses both)."""
    return {
        spec.name: getattr(grpo_config, spec.name)
        for spec in fields(GRPOConfig)
        if spec.init and spec.name != "generation_batch_size"
    }


@documented_luffy
@dataclass
class LuffyConfig(LuffyOptions, GRPOConfig):
    r"""
    Configuration class for [`LuffyTrainer`]: every parameter of [`~trl.GRPOConfig`], and the `luffy_*` parameters of
    [`LuffyOptions`], below.
    """

    @classmethod
    def from_grpo_config(cls, grpo_config: GRPOConfig, **luffy_options) -> "LuffyConfig":
        """
        A `LuffyConfig` with every option of `grpo_config`, its TRL defaults included (`loss_type="dapo"`,
        `scale_rewards="group"`, `epsilon=0.2`, `entropy_coef=0.0`: pass `loss_type="luffy"`, ... for the authors'),
        and the given `luffy_*` ones.
        """
        return cls(**{**grpo_options(grpo_config), **luffy_options})


@documented_luffy
@documented
@dataclass
class ChordLuffyConfig(LuffyOptions, ChordOptions, GRPOConfig):
    r"""
    Configuration class for [`ChordLuffyTrainer`]: LUFFY's mixed groups and CHORD's expert SFT term together, `(1 - mu)
    * L_LUFFY + mu * L_SFT`. Every parameter of [`~trl.GRPOConfig`], the `chord_*` parameters of [`ChordOptions`] and
    the `luffy_*` parameters of [`LuffyOptions`], below. CHORD's adaptive mu schedule is refused: it reads the
    batch's mean reward, which here includes the expert completions'.
    """

    _base_config = GRPOConfig
    _conversion = "from_grpo_config"

    def __post_init__(self):
        if self.chord_mu_schedule == "adaptive":
            raise ValueError(
                "`chord_mu_schedule='adaptive'` sets mu from the mean reward of the rollouts, but a LUFFY group's "
                "rewards include its expert completions': use the cosine schedule with LUFFY."
            )
        super().__post_init__()

    @classmethod
    def from_grpo_config(cls, grpo_config: GRPOConfig, **options) -> "ChordLuffyConfig":
        """A `ChordLuffyConfig` with every option of `grpo_config` (see [`LuffyConfig.from_grpo_config`]) and the
        given `chord_*` and `luffy_*` ones."""
        return cls(**{**grpo_options(grpo_config), **options})
