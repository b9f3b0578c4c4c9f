"""SFT-best -> RL (trl_chord/recipes/sft_best.py and heldout_reward.py, `trl-chord sft-best-rl`): the held-out reward
evaluation, the kept checkpoint, the hand-over to the RL stage, and the command's refusals."""

import copy
import json
import os
import sys

import pytest
import torch
from accelerate import Accelerator
from bounded_run import run_bounded
from datasets import Dataset
from helpers import chord_config, chord_rloo_config, make_expert_dataset, make_rl_prompts, odd_char_reward, weights
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM, TrainerCallback

from trl_chord import ChordRLOOTrainer, ChordTrainer
from trl_chord.cli import main as cli_main
from trl_chord.demo.addition import addition_reward
from trl_chord.demo.heldout import answer_token_mask, tokenized_prompts
from trl_chord.recipes.chord import ChordScriptArguments
from trl_chord.recipes.heldout_reward import process_share, score_heldout
from trl_chord.recipes.sft_best import HeldOutRewardCallback, best_evaluation, rl_start_model
from trl_chord.recipes.sft_best_rl import SftBestArguments, heldout_prompts


PEAK_STEP = 2
SFT_OPTIONS = dict(chord_mu_peak=1.0, chord_mu_valley=1.0, chord_token_weighting="uniform", save_only_model=True)
RL_OPTIONS = dict(chord_mu_peak=0.0, chord_mu_valley=0.0)
TRAINERS = {"grpo": (chord_config, ChordTrainer), "rloo": (chord_rloo_config, ChordRLOOTrainer)}


def peak_reward(completions, trainer_state, **kwargs) -> list[float]:
    """A held-out score that peaks at optimizer step 2 of the run, whatever the answers: the best step is known."""
    return [-abs(trainer_state.global_step - PEAK_STEP) for _ in completions]


def constant_reward(completions, **kwargs) -> list[float]:
    return [1.0 for _ in completions]


class WeightsAtEachStep(TrainerCallback):
    """The model's weights before training and at the end of every optimizer step: the oracle of a checkpoint's."""

    def __init__(self, trainer):
        self.trainer, self.at_step = trainer, {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.at_step[state.global_step] = weights(self.trainer)

    def on_step_end(self, args, state, control, **kwargs):
        self.at_step[state.global_step] = weights(self.trainer)


def sft_stage(tiny_model_dir, tmp_path, trainer="grpo", reward=peak_reward, eval_on_start=True, eval_steps=1, **args):
    """A 4-step SFT stage (mu = 1) with the held-out evaluation, trained; its callback and the weights at each step."""
    make_config, trainer_class = TRAINERS[trainer]
    config = make_config(tmp_path / "sft", max_steps=4, **{**SFT_OPTIONS, **args})
    sft_trainer = trainer_class(
        model=tiny_model_dir,
        reward_funcs=reward,
        args=config,
        train_dataset=make_rl_prompts(),
        expert_dataset=make_expert_dataset(),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    selection = HeldOutRewardCallback(
        sft_trainer, make_rl_prompts(5), eval_steps, max_new_tokens=4, eval_on_start=eval_on_start
    )
    recorder = WeightsAtEachStep(sft_trainer)
    sft_trainer.add_callback(selection)
    sft_trainer.add_callback(recorder)
    sft_trainer.train()
    return sft_trainer, selection, recorder.at_step


def rl_stage(model, tmp_path, trainer="grpo"):
    make_config, trainer_class = TRAINERS[trainer]
    return trainer_class(
        model=model,
        reward_funcs=odd_char_reward,
        args=make_config(tmp_path / "rl", **RL_OPTIONS),
        train_dataset=make_rl_prompts(),
        processing_class=AutoTokenizer.from_pretrained(model),
    )


def same_weights(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


@pytest.mark.parametrize("trainer", ["grpo", "rloo"])
def test_the_kept_checkpoint_is_the_best_one_mid_run_and_the_rl_stage_starts_from_its_weights(
    tiny_model_dir, tmp_path, trainer
):
    sft_trainer, selection, at_step = sft_stage(tiny_model_dir, tmp_path, trainer)
    # Evaluated at every step and before the first, each as its own log entry, the score peaking at step 2 of 4
    logged = [
        (entry["step"], entry["eval_reward"]) for entry in sft_trainer.state.log_history if "eval_reward" in entry
    ]
    assert logged == [(0, -2.0), (1, -1.0), (2, 0.0), (3, -1.0), (4, -2.0)]
    # The training logs of the same steps are all there too
    assert [entry["step"] for entry in sft_trainer.state.log_history if "chord/mu" in entry] == [1, 2, 3, 4]
    best = selection.best
    assert best["step"] == PEAK_STEP and best["eval_reward"] == 0.0 and selection.seconds > 0
    assert best["checkpoint"] == str(tmp_path / "sft" / "out" / f"checkpoint-{PEAK_STEP}")
    state = sft_trainer.state
    assert (state.best_global_step, state.best_metric, state.best_model_checkpoint) == (2, 0.0, best["checkpoint"])
    # Only new bests are saved: steps 1 and 2
    assert sorted(os.listdir(tmp_path / "sft" / "out")) == [
        "README.md",
        "checkpoint-1",
        "checkpoint-2",
        "sft_best.json",
    ]
    kept = json.loads((tmp_path / "sft" / "out" / "sft_best.json").read_text())
    assert kept["best"] == best and [entry["step"] for entry in kept["history"]] == [0, 1, 2, 3, 4]

    # The RL stage loads the kept checkpoint: its weights are step 2's, not the last step's nor the starting model's
    start = rl_start_model(best, tiny_model_dir, str(tmp_path / "merged"))
    assert start == best["checkpoint"]
    rl_weights = weights(rl_stage(start, tmp_path, trainer))
    assert same_weights(rl_weights, at_step[PEAK_STEP])
    assert not same_weights(rl_weights, at_step[4]) and not same_weights(rl_weights, at_step[0])
    assert (
        AutoTokenizer.from_pretrained(start).get_vocab() == AutoTokenizer.from_pretrained(tiny_model_dir).get_vocab()
    )


def test_the_earliest_of_equal_scores_is_kept(tiny_model_dir, tmp_path):
    # The starting model is scored first: with equal scores it stays the best, and nothing is saved
    _, selection, _ = sft_stage(tiny_model_dir, tmp_path / "with-start", reward=constant_reward)
    assert selection.best == {"step": 0, "eval_reward": 1.0, "checkpoint": None}
    assert rl_start_model(selection.best, tiny_model_dir, str(tmp_path / "merged")) == tiny_model_dir
    assert not [name for name in os.listdir(tmp_path / "with-start" / "sft" / "out") if name.startswith("checkpoint")]
    # Without it, the first evaluated step (2, then 4)
    _, selection, _ = sft_stage(
        tiny_model_dir, tmp_path / "without", reward=constant_reward, eval_on_start=False, eval_steps=2
    )
    assert [entry["step"] for entry in selection.history] == [2, 4] and selection.best["step"] == 2
    assert best_evaluation([{"step": 0, "eval_reward": 0.5}, {"step": 5, "eval_reward": 0.5}])["step"] == 0
    assert (
        best_evaluation([{"step": 0, "eval_reward": 0.1}, {"step": 5, "eval_reward": 0.5}], last_step=4)["step"] == 0
    )


def two_rewards():
    def length_reward(completions, **kwargs):
        return [float(len(completion[0]["content"])) for completion in completions]

    def answer_reward(completions, answer, **kwargs):  # a dataset column, as GRPOTrainer passes them
        return [
            None if expected == "skip" else float(c[0]["content"] == expected)
            for c, expected in zip(completions, answer)
        ]

    return [length_reward, answer_reward]


def greedy_answers(model, tokenizer, prompts, max_new_tokens) -> tuple[list[str], list[int]]:
    """The oracle's answers: each prompt alone (no padding), through the demo's tokenization and end-token mask."""
    texts, lengths = [], []
    for index in range(len(prompts)):
        inputs = tokenized_prompts(tokenizer, prompts.select([index]), "cpu")
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        generated = generated[:, inputs["input_ids"].shape[1] :]
        lengths.append(int(answer_token_mask(generated, tokenizer.eos_token_id, tokenizer.pad_token_id).sum()))
        texts.append(tokenizer.decode(generated[0], skip_special_tokens=True))
    return texts, lengths


def test_the_score_is_the_weighted_reward_of_the_greedy_answers(tiny_model_dir, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompts = make_rl_prompts(7)
    texts, lengths = greedy_answers(model, tiny_tokenizer, prompts, 5)
    # A column the reward reads: some answers match it, some do not, two rows are not graded (None)
    answers = ["skip", texts[1], "x", texts[3], "skip", texts[5], "x"]
    heldout = prompts.add_column("answer", answers)
    rewards, reward_weights = two_rewards(), [0.5, 2.0]
    options = dict(reward_funcs=rewards, accelerator=Accelerator(cpu=True), reward_weights=reward_weights)
    metrics = score_heldout(model, tiny_tokenizer, heldout, max_new_tokens=5, batch_size=3, **options)
    totals = [0.5 * len(text) + 2.0 * (text == answer) for text, answer in zip(texts, answers)]
    assert metrics["eval_reward"] == pytest.approx(sum(totals) / len(totals))
    assert metrics["eval_rewards/length_reward/mean"] == pytest.approx(sum(map(len, texts)) / len(texts))
    assert metrics["eval_rewards/answer_reward/mean"] == pytest.approx(3 / 5)  # 3 of the 5 graded answers match
    assert metrics["eval_completions/mean_length"] == pytest.approx(sum(lengths) / len(lengths))

    # Named sets with their own budgets: each scored on its own, `eval_reward` over all their prompts
    sets = {"short": heldout.select(range(3)), "long": heldout.select(range(3, 7))}
    by_set = score_heldout(model, tiny_tokenizer, sets, max_new_tokens={"short": 2, "long": 5}, **options)
    short_texts, _ = greedy_answers(model, tiny_tokenizer, prompts.select(range(3)), 2)
    short_totals = [0.5 * len(text) + 2.0 * (text == answer) for text, answer in zip(short_texts, answers)]
    assert by_set["eval_short_reward"] == pytest.approx(sum(short_totals) / 3)
    assert by_set["eval_long_reward"] == pytest.approx(sum(totals[3:]) / 4)
    assert by_set["eval_reward"] == pytest.approx((sum(short_totals) + sum(totals[3:])) / 7)


def test_math_answers_cut_off_at_the_evaluation_budget_score_as_in_rl(tiny_model_dir, tiny_tokenizer):
    from trl_chord.rewards import OVERLONG_NO_ANSWER_REWARD, math_accuracy_reward

    # The tiny model never ends an answer: each one is cut at the budget, with no boxed answer (-1, not -0.1)
    heldout = make_rl_prompts(3).add_column("solution", ["1", "2", "3"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    metrics = score_heldout(
        model, tiny_tokenizer, heldout, [math_accuracy_reward], Accelerator(cpu=True), 4, show_progress=False
    )
    assert metrics["eval_reward"] == OVERLONG_NO_ANSWER_REWARD == -1.0
    assert metrics["eval_completions/mean_length"] == 4
    # Scores are kept in double precision: no answer at all is -0.1 for the addition reward (float32 is 1.5e-9 off)
    heldout = heldout.add_column("answer", ["1", "2", "3"])
    options = dict(accelerator=Accelerator(cpu=True), max_new_tokens=4, show_progress=False)
    score = score_heldout(model, tiny_tokenizer, heldout, [addition_reward], **options)["eval_reward"]
    assert score == pytest.approx(-0.1, rel=0, abs=1e-12)


def test_the_evaluation_leaves_the_random_state_and_the_train_mode_and_ignores_dropout(tiny_model_dir, tiny_tokenizer):
    # Weights drawn wide (the tiny model's own give one token whatever the input), so that every answer token depends
    # on the attention's outputs
    config = AutoModelForCausalLM.from_pretrained(tiny_model_dir).config
    config.initializer_range = 0.5
    torch.manual_seed(0)
    plain = Qwen2ForCausalLM(config)
    config = copy.deepcopy(config)
    config.attention_dropout = 0.9
    with_dropout = Qwen2ForCausalLM(config)
    with_dropout.load_state_dict(plain.state_dict())
    for model in (plain, with_dropout):
        model.generation_config.pad_token_id = model.generation_config.eos_token_id = tiny_tokenizer.eos_token_id
    with_dropout.train()
    heldout = make_rl_prompts(6)
    inputs = tokenized_prompts(tiny_tokenizer, heldout, "cpu")
    assert not torch.equal(plain(**inputs).logits, with_dropout(**inputs).logits)  # dropout acts in train mode
    options = dict(
        max_new_tokens=6, reward_funcs=[odd_char_reward], accelerator=Accelerator(cpu=True), show_progress=False
    )
    expected = score_heldout(plain.eval(), tiny_tokenizer, heldout, **options)
    for generation_kwargs in (None, {"do_sample": True, "temperature": 1.0}):
        torch.manual_seed(123)
        state = torch.get_rng_state()
        scores = [
            score_heldout(with_dropout, tiny_tokenizer, heldout, generation_kwargs=generation_kwargs, **options)
            for _ in range(2)
        ]
        assert torch.equal(torch.get_rng_state(), state), generation_kwargs
        assert with_dropout.training
        assert scores[0] == scores[1], generation_kwargs  # sampling is seeded: the same at every evaluation
        if generation_kwargs is None:
            assert scores[0] == expected  # as the same weights without dropout score


def test_each_process_answers_its_share_of_the_prompts():
    shares = [process_share(11, 3, rank) for rank in range(3)]
    assert shares == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert [process_share(2, 3, rank) for rank in range(3)] == [[0], [1], []]


def test_a_lora_sft_stage_is_merged_before_the_rl_stage(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    config = chord_config(tmp_path / "sft", max_steps=4, **SFT_OPTIONS)
    sft_trainer = ChordTrainer(
        model=tiny_model_dir,
        reward_funcs=peak_reward,
        args=config,
        train_dataset=make_rl_prompts(),
        expert_dataset=make_expert_dataset(),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    selection = HeldOutRewardCallback(sft_trainer, make_rl_prompts(5), 1, max_new_tokens=4)
    merged_at_step = {}

    class MergedWeights(TrainerCallback):  # the oracle: W + B A alpha / r of each adapted layer, at each step
        def on_step_end(self, args, state, control, **kwargs):
            params = dict(sft_trainer.model.get_base_model().named_parameters())
            merged = {}
            for name, param in params.items():
                if ".lora_" in name:
                    continue
                if ".base_layer." in name:
                    layer = name.split(".base_layer.")[0]
                    if name.endswith("weight"):
                        lora_a, lora_b = (
                            params[f"{layer}.lora_A.default.weight"],
                            params[f"{layer}.lora_B.default.weight"],
                        )
                        param = param + lora_b @ lora_a * (8 / 4)
                    name = name.replace(".base_layer.", ".")
                merged[name] = param.detach().clone()
            merged_at_step[state.global_step] = merged

    sft_trainer.add_callback(selection)
    sft_trainer.add_callback(MergedWeights())
    sft_trainer.train()
    assert selection.best["step"] == PEAK_STEP
    assert os.path.exists(os.path.join(selection.best["checkpoint"], "adapter_config.json"))
    start = rl_start_model(selection.best, tiny_model_dir, str(tmp_path / "merged"))
    assert start == str(tmp_path / "merged") and not os.path.exists(os.path.join(start, "adapter_config.json"))
    rl_weights = weights(rl_stage(start, tmp_path))
    assert rl_weights.keys() == merged_at_step[PEAK_STEP].keys()
    for name, value in rl_weights.items():
        torch.testing.assert_close(value, merged_at_step[PEAK_STEP][name], rtol=0, atol=1e-6)
    assert any(not torch.equal(value, merged_at_step[4][name]) for name, value in rl_weights.items())


def test_the_callback_refuses_what_it_cannot_evaluate(tiny_model_dir, tmp_path):
    trainer = ChordTrainer(
        model=tiny_model_dir,
        reward_funcs=odd_char_reward,
        args=chord_config(tmp_path, max_steps=2, **SFT_OPTIONS),
        train_dataset=make_rl_prompts(),
        expert_dataset=make_expert_dataset(),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    with pytest.raises(ValueError, match="has no rows"):
        HeldOutRewardCallback(trainer, make_rl_prompts(0), 1, max_new_tokens=4)
    with pytest.raises(ValueError, match="no `prompt` column"):
        HeldOutRewardCallback(trainer, Dataset.from_dict({"question": ["1+1="]}), 1, max_new_tokens=4)
    with pytest.raises(ValueError, match="optimizer steps >= 1"):
        HeldOutRewardCallback(trainer, make_rl_prompts(2), 0, max_new_tokens=4)
    with pytest.raises(ValueError, match="`max_new_tokens` names the sets"):
        HeldOutRewardCallback(trainer, {"a": make_rl_prompts(2)}, 1, max_new_tokens={"b": 4})
    trainer.reward_funcs = [AutoModelForCausalLM.from_pretrained(tiny_model_dir)]
    with pytest.raises(ValueError, match="is a reward model"):
        HeldOutRewardCallback(trainer, make_rl_prompts(2), 1, max_new_tokens=4)
    trainer.reward_funcs = [odd_char_reward]
    trainer.add_callback(HeldOutRewardCallback(trainer, make_rl_prompts(2), 3, max_new_tokens=4))
    with pytest.raises(ValueError, match="every 3 optimizer steps, but this run has 2"):
        trainer.train()


def write_jsonl(path, rows) -> str:
    with open(path, "w") as file:
        file.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


@pytest.fixture
def local_data(tmp_path):
    prompts = [{"prompt": [{"role": "user", "content": f"{i}+1="}], "answer": str(i + 1)} for i in range(16)]
    experts = [
        {"prompt": row["prompt"], "completion": [{"role": "assistant", "content": row["answer"]}]} for row in prompts
    ]
    return {
        "rl": write_jsonl(tmp_path / "rl.jsonl", prompts[:12]),
        "expert": write_jsonl(tmp_path / "expert.jsonl", experts),
        "heldout": write_jsonl(tmp_path / "heldout.jsonl", prompts[12:]),
    }


def command(tiny_model_dir, local_data, tmp_path, *extra) -> list[str]:
    return [
        "sft-best-rl",
        "--model_name_or_path", tiny_model_dir,
        "--dataset_name", local_data["rl"],
        "--chord_sft_dataset", local_data["expert"],
        "--heldout_dataset", local_data["heldout"],
        "--reward_funcs", "test_sft_best.peak_reward",
        "--output_dir", str(tmp_path / "run"),
        "--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--logging_steps", "1",
        "--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "4",
        "--sft_max_steps", "4", "--sft_eval_steps", "1", "--sft_learning_rate", "0.01",
        "--max_steps", "2",
        *extra,
    ]  # fmt: skip


def test_the_command_keeps_the_best_sft_step_and_trains_rloo_from_it(tiny_model_dir, local_data, tmp_path, capsys):
    # The RL stage at learning rate 0 ends with the weights it started from: the kept checkpoint's
    cli_main(command(tiny_model_dir, local_data, tmp_path, "--trainer", "rloo", "--beta", "0", "--learning_rate", "0"))
    run, sft = tmp_path / "run", tmp_path / "run" / "sft"
    summary = json.loads((run / "sft_best_rl.json").read_text())
    assert summary["sft"]["kept"] == {"step": 2, "eval_reward": 0.0, "checkpoint": str(sft / "checkpoint-2")}
    assert summary["rl"]["trainer"] == "rloo" and summary["rl"]["start"] == str(sft / "checkpoint-2")
    # Only the best checkpoint is kept, as model weights
    assert [name for name in os.listdir(sft) if name.startswith("checkpoint")] == ["checkpoint-2"]
    assert not os.path.exists(sft / "checkpoint-2" / "optimizer.pt")
    final = AutoModelForCausalLM.from_pretrained(run).state_dict()
    kept = AutoModelForCausalLM.from_pretrained(sft / "checkpoint-2").state_dict()
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert all(torch.equal(final[name], kept[name]) for name in kept)
    assert not all(torch.equal(start[name], kept[name]) for name in kept)
    # Each stage's log: the SFT stage at mu = 1 with its evaluations, the RL stage at mu = 0 (RLOO's metrics)
    sft_log = [json.loads(line) for line in (sft / "metrics.jsonl").read_text().splitlines()]
    rl_log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in sft_log if "eval_reward" in entry] == [0, 1, 2, 3, 4]
    assert [(entry["step"], entry["chord/mu"]) for entry in sft_log if "chord/mu" in entry] == [
        (1, 1.0),
        (2, 1.0),
        (3, 1.0),
        (4, 1.0),
    ]
    assert [entry["chord/mu"] for entry in rl_log if "chord/mu" in entry] == [0.0, 0.0]
    assert all("chord/rloo_loss" in entry for entry in rl_log if "chord/mu" in entry)
    assert [entry["step"] for entry in rl_log if "eval_reward" in entry] == [0, 2]
    stdout = capsys.readouterr().out
    assert (
        f"SFT stage: best held-out eval_reward 0.0000 at step 2 of 4; the RL stage starts from {sft / 'checkpoint-2'}"
        in stdout
    )


def test_held_out_rl_prompts_are_left_out_of_training():
    script_args, options = ChordScriptArguments(dataset_name="rl.jsonl"), SftBestArguments(heldout_size=4)
    prompts = make_rl_prompts(12)
    train, heldout = heldout_prompts(script_args, options, prompts, None, seed=0)
    assert (len(train), len(heldout)) == (8, 4)
    as_text = [json.dumps(prompt) for prompt in prompts["prompt"]]
    assert sorted(map(json.dumps, list(train["prompt"]) + list(heldout["prompt"]))) == sorted(as_text)
    again = heldout_prompts(script_args, options, prompts, None, seed=0)[1]
    assert list(again["prompt"]) == list(heldout["prompt"])  # the same prompts for the same seed


def test_held_out_files_take_the_rl_prompts_column_name(tmp_path):
    rows = [{"question": [{"role": "user", "content": f"{i}+1="}], "answer": str(i + 1)} for i in range(3)]
    path = write_jsonl(tmp_path / "heldout.jsonl", rows)
    script_args = ChordScriptArguments(dataset_name="rl.jsonl", dataset_prompt_column="question")
    for entries, names in (([path], [None]), ([f"a={path}", f"b={path}"], ["a", "b"])):
        _, heldout = heldout_prompts(script_args, SftBestArguments(heldout_dataset=entries), None, None, seed=0)
        sets = heldout if isinstance(heldout, dict) else {None: heldout}
        assert list(sets) == names
        assert all(data.column_names == ["prompt", "answer"] and len(data) == 3 for data in sets.values())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--sft_max_steps": None}, "give --sft_max_steps"),
        ({"--sft_learning_rate": None}, "give --sft_learning_rate"),
        ({"--sft_eval_steps": None}, "give --sft_eval_steps"),
        ({"--sft_eval_steps": "5"}, "--sft_eval_steps 5 is more than the SFT stage's --sft_max_steps 4"),
        ({"--reward_funcs": None}, "give the reward functions with --reward_funcs"),
        ({"--chord_sft_dataset": None}, "give the expert data for the SFT stage"),
        ({"--heldout_dataset": None}, "give held-out prompts for choosing the best SFT checkpoint"),
        ({"--heldout_size": "3"}, "give either --heldout_dataset or --heldout_size"),
        ({"--trainer": "async_grpo"}, "sft-best-rl runs --trainer grpo or rloo, not async_grpo: its held-out"),
        ({"--trainer": "luffy"}, "sft-best-rl runs --trainer grpo or rloo, not luffy: the paper's"),
        ({"--resume_from_checkpoint": "true"}, "sft-best-rl does not resume"),
        ({"--sft_eval_generation_kwargs": "{do_sample}"}, "--sft_eval_generation_kwargs is not JSON"),
        ({"--heldout_dataset": None, "--heldout_size": "12"}, "--heldout_size 12 leaves no RL prompt"),
    ],
)
def test_the_command_refuses_bad_input_in_one_line(tiny_model_dir, local_data, tmp_path, capsys, change, message):
    args = command(tiny_model_dir, local_data, tmp_path)
    for flag, value in change.items():
        if flag in args:
            index = args.index(flag)
            del args[index : index + 2]
        if value is not None:
            args += [flag, value]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run" / "sft")  # refused before any training


def value_reward(completions, value=None, **kwargs) -> list[float]:
    """The held-out row's own `value`, whatever the answer: the mean over the set is known (0 for the RL prompts)."""
    return [0.0] * len(completions) if value is None else [float(v) for v in value]


@pytest.mark.slow  # two processes
def test_on_two_processes_every_held_out_prompt_counts_once(tiny_model_dir, local_data, tmp_path):
    # 5 prompts: one process answers 3, the other 2. The mean of all is 6.2; the mean of the two processes' means
    # would be 7.17, and a prompt answered twice or not at all would move it too
    values = [1, 2, 4, 8, 16]
    rows = [{"prompt": [{"role": "user", "content": f"{v}+1="}], "value": v} for v in values]
    heldout = write_jsonl(tmp_path / "heldout-values.jsonl", rows)
    args = command(
        tiny_model_dir,
        local_data,
        tmp_path,
        "--heldout_dataset",
        heldout,
        "--reward_funcs",
        "test_sft_best.value_reward",
    )
    args += ["--sft_max_steps", "2", "--sft_eval_steps", "1", "--max_steps", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(__file__)}
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    completed = run_bounded([torchrun, "--nproc_per_node", "2", "-m", "trl_chord.cli", *args], env=env, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    summary = json.loads((tmp_path / "run" / "sft_best_rl.json").read_text())
    scores = [entry["eval_reward"] for stage in ("sft", "rl") for entry in summary[stage]["history"]]
    assert len(scores) == 3 + 2 and scores == [pytest.approx(sum(values) / len(values), rel=0, abs=1e-12)] * 5
    assert completed.stdout.count("SFT stage: best held-out eval_reward") == 1  # printed by the main process only


@pytest.mark.slow  # two processes, DeepSpeed
def test_under_zero3_the_rl_stage_starts_from_the_kept_checkpoint(tiny_model_dir, local_data, tmp_path):
    # Two Trainers in one process under DeepSpeed (accelerate refuses a second Accelerator with a DeepSpeed plugin
    # unless the first's state is wiped); the RL stage at learning rate 0 ends with the weights it started from
    args = command(tiny_model_dir, local_data, tmp_path, "--learning_rate", "0", "--save_strategy", "no")
    args += ["--gradient_checkpointing", "false"]
    zero3 = os.path.join(
        os.path.dirname(os.path.dirname(__file__)), "trl_chord", "recipes", "accelerate", "zero3.yaml"
    )
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    launch = [accelerate, "launch", "--config_file", zero3, "--num_processes", "2", "--mixed_precision", "no"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(__file__)}
    completed = run_bounded([*launch, "-m", "trl_chord.cli", *args], env=env, timeout=900)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    sft = tmp_path / "run" / "sft"
    summary = json.loads((tmp_path / "run" / "sft_best_rl.json").read_text())
    assert summary["sft"]["kept"] == {"step": 2, "eval_reward": 0.0, "checkpoint": str(sft / "checkpoint-2")}
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run").state_dict()
    kept = AutoModelForCausalLM.from_pretrained(sft / "checkpoint-2").state_dict()
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert all(torch.equal(final[name], kept[name]) for name in kept)
    assert not all(torch.equal(start[name], kept[name]) for name in kept)
