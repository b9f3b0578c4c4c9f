"""
The expert term's LM head: the weighted NLL of the expert tokens without the `(tokens, vocab)` logits at once.

- `chunked_nll.py`: the kernel, [`weighted_expert_nll`], from the head's input and weight, in token chunks.
- `choice.py`: which head is exact for a model, probed once ([`choose_lm_head`]), the same on every process.
- `forward.py`: [`add_expert_loss_head`] puts the expert forward on a model; [`expert_loss`] calls it and
  [`expert_head_forward`] answers, with one function per head.

The heads, cheapest first: `"chunked"` (the logits are exactly `lm_head(last_hidden_state)` with a plain linear head),
`"trl_fused"` (TRL's fused LM head, for logits the model scales or caps as TRL knows how), `"full_logits"` (the
model's own forward, always exact).
"""

HEAD_PATHS = ("chunked", "trl_fused", "full_logits")
# The values of `chord_expert_head`: the probe's choice, or one of the heads, checked to be exact
EXPERT_HEADS = ("auto", *HEAD_PATHS)
