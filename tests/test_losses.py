import pytest
import torch

from trl_chord import expert_sft_loss, phi_token_weights, token_weights


def _example(seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, 11, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 5), generator=generator)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    return logits, labels, mask


def _logps(logits, labels):
    return logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def test_plain_loss_is_token_mean_cross_entropy():
    logits, labels, mask = _example()
    logps = _logps(logits, labels)
    out = expert_sft_loss(logps, mask, token_weights("uniform", logps, mask))
    expected = torch.nn.functional.cross_entropy(logits[mask.bool()], labels[mask.bool()])
    torch.testing.assert_close(out.loss, expected)
    assert out.num_tokens.item() == mask.sum().item()
    torch.testing.assert_close(out.weight_sum, mask.sum().to(out.weight_sum.dtype))


def test_phi_is_p_times_one_minus_p_and_detached():
    logps = torch.log(torch.tensor([0.5, 0.1, 0.99], requires_grad=True))
    weights = phi_token_weights(logps)
    torch.testing.assert_close(weights, torch.tensor([0.25, 0.09, 0.0099]))
    assert not weights.requires_grad


def test_phi_loss_gradient_treats_phi_as_a_constant():
    logits, labels, mask = _example(1)
    logits.requires_grad_(True)
    logps = _logps(logits, labels)
    expert_sft_loss(logps, mask, token_weights("phi", logps, mask)).loss.backward()
    grad = logits.grad.clone()

    # Independent oracle: the weights as plain numbers (no graph at all), then the weighted cross-entropy by hand
    probs = torch.softmax(logits.detach(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    constant_phi = torch.tensor((probs * (1 - probs)).tolist(), dtype=torch.float64)
    oracle_logits = logits.detach().clone().requires_grad_(True)
    nll = torch.nn.functional.cross_entropy(oracle_logits.transpose(1, 2), labels, reduction="none")
    ((nll * constant_phi * mask).sum() / mask.sum()).backward()
    torch.testing.assert_close(grad, oracle_logits.grad)

    # And it is not the gradient one gets by differentiating through phi (the bug ms-swift shipped)
    through_logits = logits.detach().clone().requires_grad_(True)
    through_probs = torch.softmax(through_logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    nll = -through_probs.log()
    ((nll * through_probs * (1 - through_probs) * mask).sum() / mask.sum()).backward()
    assert not torch.allclose(grad, through_logits.grad)


def test_empty_mask_gives_a_zero_loss_not_nan():
    logits, labels, _ = _example()
    logps, mask = _logps(logits, labels), torch.zeros(3, 5)
    out = expert_sft_loss(logps, mask, token_weights("phi", logps, mask))
    assert out.loss.item() == 0.0 and out.num_tokens.item() == 0


def test_other_token_weightings_match_their_formulas():
    logits, labels, mask = _example(2)
    logps = _logps(logits, labels)
    probs = logps.exp()
    torch.testing.assert_close(token_weights("is", logps, mask), probs)
    torch.testing.assert_close(token_weights("focal", logps, mask, focal_gamma=3.0), (1 - probs) ** 3)
    distribution = torch.softmax(logits, -1)
    entropy = -(distribution * distribution.log()).sum(-1)
    weights = token_weights("entropy", logps, mask, entropies=entropy)
    torch.testing.assert_close(weights, entropy / entropy[mask.bool()].mean())
    assert weights[mask.bool()].mean().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="Unknown token weighting 'top5'"):
        token_weights("top5", logps, mask)


def test_weights_never_carry_a_gradient():
    logits, labels, mask = _example(3)
    logits.requires_grad_(True)
    logps = _logps(logits, labels)
    live_weights = logps.exp()  # deliberately attached to the graph: the loss must detach it
    expert_sft_loss(logps, mask, live_weights).loss.backward()
    oracle = logits.detach().clone().requires_grad_(True)
    oracle_logps = _logps(oracle, labels)
    (-(oracle_logps * logps.exp().detach() * mask).sum() / mask.sum()).backward()
    torch.testing.assert_close(logits.grad, oracle.grad)


@pytest.mark.parametrize("weighting", ["uniform", "phi", "is", "focal"])
def test_masked_positions_contribute_nothing_even_at_minus_infinity(weighting):
    # A padded position's log-probability may be -inf (e.g. computed under a -inf attention bias): it must count 0,
    # as a masked sum does, not turn the loss into NaN
    logits, labels, mask = _example(2)
    logps = _logps(logits, labels)
    with_inf = logps.masked_fill(mask == 0, float("-inf")).requires_grad_(True)
    with_zero = logps.masked_fill(mask == 0, 0.0).requires_grad_(True)
    out = expert_sft_loss(with_inf, mask, token_weights(weighting, with_inf, mask))
    expected = expert_sft_loss(with_zero, mask, token_weights(weighting, with_zero, mask))
    for field in ("loss", "nll_sum", "prob_sum", "weight_sum", "num_tokens"):
        torch.testing.assert_close(out[field], expected[field], msg=field)
    out.loss.backward()
    expected.loss.backward()
    torch.testing.assert_close(with_inf.grad, with_zero.grad)
