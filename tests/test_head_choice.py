"""Which LM head the expert term takes: chosen once per model, whatever the mode, dropout, adapters' values, RNG,
compilation or process; overridable; logged; and what a deep copy of a prepared model is."""

import copy

import pytest
import torch
import transformers
from helpers import COMMON_ARGS, make_expert_dataset, make_trainer, weights
from test_model_families import build_model, expected_head, expert_batch
from trl.trainer.utils import add_fused_lm_head

import trl_chord.expert_head.choice as head_choice
from trl_chord import ChordConfig
from trl_chord.demo.tiny import build_tiny_model, build_tiny_tokenizer
from trl_chord.expert_head.choice import LMHeadProbe, pick_lm_head
from trl_chord.expert_head.forward import add_expert_loss_head


TRANSFORM_FAMILIES = ["gemma2", "granite", "cohere"]


def prepared(model, head="auto", weighting="phi"):
    """`model` as ChordTrainer prepares it: TRL's fused head for GRPO (temperature 0.7), then the expert head."""
    add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    add_expert_loss_head(model, weighting=weighting, focal_gamma=2.0, cast_lm_head_to_fp32=False, head=head)
    return model


def expert_loss(model, batch, **kwargs):
    input_ids, attention_mask, labels = batch
    return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, chord_expert_loss=True, **kwargs)


@pytest.mark.parametrize("training", [True, False], ids=["train-mode", "eval-mode"])
@pytest.mark.parametrize("family", ["qwen2", *TRANSFORM_FAMILIES])
def test_dropout_does_not_change_the_head_choice(family, training):
    model = prepared(build_model(family, attention_dropout=0.3))
    model.train(training)
    with torch.no_grad():
        expert_loss(model, expert_batch())
    assert model.chord_expert_head.choice.path == expected_head(family), model.chord_expert_head.choice
    assert model.training == training


@pytest.mark.parametrize("adapter", ["new", "trained"])
def test_lora_dropout_and_the_adapters_values_do_not_change_the_head_choice(adapter):
    from peft import LoraConfig, get_peft_model

    # TRL's ModelConfig default lora_dropout is 0.05; a higher one makes any disagreement between forwards certain
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "v_proj", "o_proj"])
    model = get_peft_model(build_model("gemma2"), config)
    if adapter == "trained":  # as on resume: B is no longer 0, so the adapters' dropout reaches the output
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.5)
    prepared(model.get_base_model())
    model.train()
    with torch.no_grad():
        expert_loss(model, expert_batch())
    assert model.get_base_model().chord_expert_head.choice.path == "trl_fused"


def test_a_run_with_the_probe_draws_what_a_run_without_it_draws(tmp_path, monkeypatch):
    # Dropout in attention draws from the RNG at every training forward: a probe that drew too would shift every mask
    model_dir = str(tmp_path / "dropout-model")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    model.config.attention_dropout = 0.2
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    def run(output_dir):
        args = ChordConfig(output_dir=str(output_dir), **{**COMMON_ARGS, "chord_mu_valley": 0.5})
        trainer = make_trainer(model_dir, args, expert_dataset=make_expert_dataset())
        trainer.train()
        assert trainer.chord_expert_head.path == "chunked"
        return weights(trainer)

    probed = run(tmp_path / "probed")
    # Without the probe: the same head, chosen without running the model
    monkeypatch.setattr(head_choice, "probe_lm_head", lambda *args: {"chunked": None, "full_logits": None})
    unprobed = run(tmp_path / "unprobed")
    for name, tensor in probed.items():
        assert torch.equal(tensor, unprobed[name]), name


def test_the_head_is_chosen_once_and_logged_once(caplog):
    model = prepared(build_model("qwen2"))
    calls = []
    probe = head_choice.probe_lm_head

    def counted(*args, **kwargs):
        calls.append(args)
        return probe(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch, caplog.at_level("WARNING"):
        patch.setattr(head_choice, "probe_lm_head", counted)
        for _ in range(3):
            expert_loss(model, expert_batch())
    assert len(calls) == 1
    logged = [record.message for record in caplog.records if "CHORD expert term" in record.message]
    assert logged == [f"CHORD expert term: chunked LM head; {model.chord_expert_head.choice.reason}."]


@pytest.mark.parametrize("family", TRANSFORM_FAMILIES)
def test_in_bf16_families_whose_transform_trl_knows_take_its_fused_head(family):
    model = prepared(build_model(family).to(torch.bfloat16))
    with torch.no_grad():
        expert_loss(model, expert_batch())
    assert model.chord_expert_head.choice.path == expected_head(family), model.chord_expert_head.choice


class _SlightlyScaledCohere(transformers.CohereForCausalLM):
    """Logits 2% larger than `logit_scale` says: TRL's fused head, which reads the config, is 2% off."""

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits = output.logits * 1.02
        return output


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_transform_trl_gets_2_percent_wrong_is_refused_in_every_dtype(dtype):
    model = _SlightlyScaledCohere(build_model("cohere").config)
    model.load_state_dict(build_model("cohere").state_dict())
    prepared(model.to(dtype))
    with torch.no_grad():
        expert_loss(model, expert_batch())
    choice = model.chord_expert_head.choice
    assert choice.path == "full_logits", choice
    assert "TRL's fused head does not reproduce its log-probabilities" in choice.reason


@pytest.mark.parametrize("requested", ["chunked", "trl_fused", "full_logits"])
def test_a_requested_head_is_used_when_exact(requested):
    batch = expert_batch()
    model = prepared(build_model("qwen2"), head=requested)
    expected = expert_loss(prepared(build_model("qwen2"), head="full_logits"), batch)
    out = expert_loss(model, batch)
    assert model.chord_expert_head.choice.path == requested
    torch.testing.assert_close(out.loss, expected.loss)


def test_full_logits_needs_no_probe(monkeypatch):
    monkeypatch.setattr(head_choice, "probe_lm_head", lambda *args: pytest.fail("probed"))
    model = prepared(build_model("gemma2"), head="full_logits")
    expert_loss(model, expert_batch())
    assert model.chord_expert_head.choice == LMHeadProbe("full_logits", "set by chord_expert_head")


def test_a_requested_head_that_would_be_inexact_is_refused():
    model = prepared(build_model("gemma2"), head="chunked")
    with pytest.raises(ValueError, match="chord_expert_head='chunked' would not compute .* transforms the LM head"):
        expert_loss(model, expert_batch())
    model = prepared(_SlightlyScaledCohere(build_model("cohere").config), head="trl_fused")
    with pytest.raises(ValueError, match="chord_expert_head='trl_fused' would not compute .* does not reproduce"):
        expert_loss(model, expert_batch())


def test_pick_lm_head_takes_the_cheapest_exact_head():
    assert pick_lm_head({"chunked": None, "trl_fused": "x", "full_logits": None}).path == "chunked"
    assert pick_lm_head({"chunked": "capped", "trl_fused": None, "full_logits": None}).path == "trl_fused"
    choice = pick_lm_head({"chunked": "capped", "trl_fused": "off by 2%", "full_logits": None})
    assert choice == LMHeadProbe("full_logits", "capped; off by 2%")


def test_bad_expert_head_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="chord_expert_head"):
        ChordConfig(output_dir=str(tmp_path), chord_expert_head="fused", use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="must be one of"):
        add_expert_loss_head(build_model("qwen2"), "phi", 2.0, False, head="fused")


def test_a_deep_copy_of_a_prepared_model_is_the_model_as_loaded():
    model = prepared(build_model("qwen2"))
    batch = expert_batch()
    expert_loss(model, batch)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for param in clone.parameters():
            param.mul_(0.5)
    reference = build_model("qwen2")
    reference.load_state_dict(clone.state_dict())
    input_ids, attention_mask, _ = batch
    with torch.no_grad():
        # The copy runs its own weights, as a model loaded with them does
        torch.testing.assert_close(clone(input_ids=input_ids).logits, reference(input_ids=input_ids).logits)
        # and the original still runs its own
        assert not torch.allclose(model(input_ids=input_ids).logits, clone(input_ids=input_ids).logits)
    assert not hasattr(clone, "chord_expert_head") and "forward" not in vars(clone)
    # The original keeps its heads; the copy can be prepared again, for its own weights
    assert model.chord_expert_head.choice.path == "chunked"
    torch.testing.assert_close(expert_loss(prepared(clone), batch).loss, expert_loss(prepared(reference), batch).loss)


@pytest.mark.parametrize("requested", ["chunked", "full_logits"])
def test_a_float64_model_gets_its_own_nll_to_1e_10(requested):
    # (TRL's fused head computes in fp32: a float64 model that needs it gets fp32's precision there)
    batch = expert_batch()
    model = prepared(build_model("qwen2").double(), head=requested, weighting="uniform")
    out = expert_loss(model, batch)
    input_ids, attention_mask, labels = batch
    logits = build_model("qwen2").double()(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    targets = labels[:, 1:]
    mask = targets != -100
    nll = -logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)[mask]
    assert out.loss.dtype == torch.float64
    torch.testing.assert_close(out.loss, nll.mean(), rtol=0, atol=1e-10)
    torch.testing.assert_close(out.nll_sum, nll.sum(), rtol=0, atol=1e-10)


@pytest.mark.slow
def test_two_compiled_models_in_one_process_each_get_their_own_expert_loss():
    batch = expert_batch()
    for seed in (0, 1):
        eager = prepared(build_model("qwen2", seed=seed))
        expected = expert_loss(eager, batch)
        expected.loss.backward()
        model = prepared(build_model("qwen2", seed=seed))
        out = expert_loss(torch.compile(model), batch)
        out.loss.backward()
        assert model.chord_expert_head.choice.path == "chunked"
        torch.testing.assert_close(out.loss, expected.loss)
        for (name, param), (_, eager_param) in zip(model.named_parameters(), eager.named_parameters()):
            torch.testing.assert_close(param.grad, eager_param.grad, rtol=1e-4, atol=1e-6, msg=name)
