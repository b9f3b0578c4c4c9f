"""
TRL's AsyncGRPOTrainer on a CPU, without vLLM: what the tests of ChordAsyncGRPOTrainer run it with.

AsyncGRPOTrainer takes its rollouts from a worker and sends its weights to the generator through two protocols it
defines, `RolloutWorkerProtocol` and `WeightTransferProtocol`. [`HFRolloutWorker`] implements the first by generating
with a Hugging Face model in this process, [`InProcessWeightTransfer`] the second by copying the trainer's weights
into that model. Two things of TRL's own still need a GPU, and [`cpu_seams`] replaces them, and nothing else:

- the packed ("tree") attention calls FlashAttention-3's `flash_attn_varlen_func`, a CUDA kernel that TRL downloads
  from the Hub (`trl.experimental.async_grpo.packing._flash_attn`): replaced by [`varlen_attention`], the same
  function written with `torch.nn.functional.scaled_dot_product_attention`;
- the MFU metrics look up the device's peak FLOPs by its CUDA name (`get_peak_flops_per_device` calls
  `torch.cuda.get_device_name`, which fails without CUDA): replaced by "unknown" (`None`), which TRL itself answers
  for devices it does not know (MFU is then not logged).
"""

import queue
import time
from types import SimpleNamespace

import numpy as np
import torch
from helpers import make_rl_prompts, odd_char_reward
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.experimental.async_grpo import async_grpo_trainer, packing
from trl.experimental.async_grpo.async_rollout_worker import RolloutSample


def varlen_attention(
    query,
    key,
    value,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    softmax_scale=None,
    causal=True,
    window_size=(-1, -1),
    softcap=None,
):
    """
    FlashAttention's `flash_attn_varlen_func`, in torch: segment `i`'s queries
    `query[cu_seqlens_q[i]:cu_seqlens_q[i + 1]]` attend to its keys and values `[cu_seqlens_k[i]:cu_seqlens_k[i + 1]]`
    (`(tokens, heads, head_dim)`, fewer key and value heads for grouped-query attention), causally with the mask
    aligned to the bottom right (the last query sees every key), as FlashAttention aligns it when a segment has fewer
    queries than keys.
    """
    if softcap or tuple(window_size) != (-1, -1) or not causal:
        raise NotImplementedError("varlen_attention covers causal attention without softcapping or a sliding window.")
    output = torch.empty_like(query)
    group = query.shape[1] // key.shape[1]
    for i in range(len(cu_seqlens_q) - 1):
        q_start, q_end = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        k_start, k_end = int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        q = query[q_start:q_end].transpose(0, 1)  # (heads, queries, head_dim)
        k = key[k_start:k_end].transpose(0, 1).repeat_interleave(group, dim=0)
        v = value[k_start:k_end].transpose(0, 1).repeat_interleave(group, dim=0)
        num_q, num_k = q.shape[1], k.shape[1]
        # Query j sees keys 0 .. num_k - num_q + j
        allowed = torch.ones(num_q, num_k, dtype=torch.bool, device=q.device).tril(num_k - num_q)
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=softmax_scale)
        output[q_start:q_end] = attended.transpose(0, 1)
    return output


def cpu_seams(monkeypatch) -> None:
    """Replace the two GPU-only pieces AsyncGRPOTrainer calls (see the module's docstring), for one test."""
    monkeypatch.setattr(packing, "_flash_attn", lambda: SimpleNamespace(flash_attn_varlen_func=varlen_attention))
    monkeypatch.setattr(async_grpo_trainer, "get_peak_flops_per_device", lambda accelerator, dtype: None)


class HFRolloutWorker:
    """
    A `RolloutWorkerProtocol` worker that generates with a Hugging Face model in this process (no vLLM), and scores and
    normalises as TRL's `AsyncRolloutWorker` does: the sum of the reward functions, the group's
    `(r - mean) / (std + 1e-8)` as every sample's advantage, the sampling log-probabilities as `old_log_probs`.

    Deterministic: it samples with its own seeded generator, and generates a step's worth of rollouts (`step_samples`,
    whole groups of `num_generations`) when it starts and each time the trainer publishes a new policy
    ([`update_model_version`], after [`InProcessWeightTransfer`] copied the weights in), never in the background. It
    starts two steps ahead, as the trainer's data loader fetches the first micro-batch of the next step before the
    current one ends: step `k` trains on rollouts of the policy after step `k - 2` (staleness 1).
    """

    def __init__(
        self,
        model_dir,
        prompts,
        reward_funcs,
        tokenizer,
        step_samples: int,
        num_generations: int,
        max_completion_length: int,
        temperature: float = 1.0,
        seed: int = 0,
    ):
        if step_samples % num_generations:
            raise ValueError("A step's worth of rollouts must be whole groups of `num_generations`.")
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.prompts = list(prompts)
        self.reward_funcs = reward_funcs
        self.tokenizer = tokenizer
        self.step_groups = step_samples // num_generations
        self.num_generations = num_generations
        self.max_completion_length = max_completion_length
        self.temperature = temperature
        self.generator = torch.Generator().manual_seed(seed)
        self.rollout_buffer = queue.Queue()
        self.metrics_queue = queue.Queue()
        self.model_version = 0
        self.started = False
        self.next_group = 0
        self.versions_generated = []

    def start(self) -> None:
        self.started = True
        self._generate_step()
        self._generate_step()

    def stop(self) -> None:
        self.started = False

    def update_model_version(self, model_version: int) -> None:
        self.model_version = model_version
        if self.started:
            self._generate_step()

    def check_health(self, stale_after_s: float) -> None:
        # Rollouts are generated on the trainer's calls only: an empty queue means it wants more than were made
        raise RuntimeError("HFRolloutWorker: the trainer wants more rollouts than were generated for its steps.")

    @torch.no_grad()
    def _sample_group(self, prompt_ids: list[int]) -> list[tuple[list[int], list[float]]]:
        """A group's completions of one prompt, sampled side by side (one forward per token for the whole group),
        each cut after its first end-of-turn token, with the log-probability of each sampled token."""
        ids = torch.tensor([prompt_ids] * self.num_generations)
        log_probs = []
        for _ in range(self.max_completion_length):
            step_log_probs = (self.model(ids).logits[:, -1].float() / self.temperature).log_softmax(-1)
            tokens = torch.multinomial(step_log_probs.exp(), 1, generator=self.generator)
            log_probs.append(step_log_probs.gather(-1, tokens).squeeze(-1))
            ids = torch.cat([ids, tokens], dim=1)
        completions = []
        for row, completion in enumerate(ids[:, len(prompt_ids) :].tolist()):
            length = (
                completion.index(self.tokenizer.eos_token_id) + 1
                if self.tokenizer.eos_token_id in completion
                else len(completion)
            )
            completions.append((completion[:length], [float(step[row]) for step in log_probs[:length]]))
        return completions

    def _generate_step(self) -> None:
        self.versions_generated.append(self.model_version)
        for _ in range(self.step_groups):
            group_id = self.next_group
            self.next_group += 1
            prompt = self.prompts[group_id % len(self.prompts)]["prompt"]
            prompt_ids = self.tokenizer.apply_chat_template(
                prompt, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
            samples = self._sample_group(prompt_ids)
            completions = [
                [{"role": "assistant", "content": self.tokenizer.decode(ids, skip_special_tokens=True)}]
                for ids, _ in samples
            ]
            rewards = np.zeros(len(samples))
            for reward_func in self.reward_funcs:
                rewards += np.array(reward_func(prompts=[prompt] * len(samples), completions=completions))
            advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-8)
            for (completion_ids, log_probs), completion, reward, advantage in zip(
                samples, completions, rewards, advantages
            ):
                self.rollout_buffer.put(
                    RolloutSample(
                        prompt=prompt,
                        completion=completion,
                        input_ids=np.asarray(prompt_ids + completion_ids, dtype=np.int64),
                        completion_mask=np.asarray([0] * len(prompt_ids) + [1] * len(completion_ids), dtype=np.int64),
                        old_log_probs=np.asarray([0.0] * len(prompt_ids) + log_probs, dtype=np.float32),
                        advantage=float(advantage),
                        model_version=self.model_version,
                        group_id=group_id,
                        metrics={"reward": float(reward)},
                        enqueued_at=time.time(),
                    )
                )


class InProcessWeightTransfer:
    """A `WeightTransferProtocol` backend that copies the trainer's weights, as AsyncGRPOTrainer streams them to vLLM
    (by their checkpoint names, any adapter merged in), into an [`HFRolloutWorker`]'s model."""

    def __init__(self, worker: HFRolloutWorker):
        self.worker = worker
        self.weights_received = 0

    def init_weight_transfer(self) -> None:
        pass

    def pause(self) -> None:
        pass

    def send_weights(self, iterator) -> None:
        with torch.no_grad():
            for name, tensor in iterator:
                self.worker.model.get_parameter(name).copy_(tensor)
                self.weights_received += 1

    def resume(self) -> None:
        pass

    def destroy(self) -> None:
        pass


# 4 rollouts per micro-step (one group), 2 micro-steps per optimizer step; fixed-count batching (no vLLM to ask for a
# token budget); fp32 weights and no gradient checkpointing, so that runs compare weight by weight
ASYNC_ARGS = dict(
    per_device_train_batch_size=4,
    gradient_accumulation_steps=2,
    num_generations=4,
    max_completion_length=6,
    max_steps=2,
    logging_steps=1,
    report_to="none",
    bf16=False,
    use_cpu=True,
    learning_rate=1e-2,
    seed=0,
    save_strategy="no",
    token_budget=0,
    gradient_checkpointing=False,
)


def make_async_grpo_trainer(model_dir, args, expert_dataset=None, peft_config=None, chord=None, **chord_kwargs):
    """
    ChordAsyncGRPOTrainer (`chord`; by default for a CHORD config; `chord_kwargs`: its other arguments) or
    AsyncGRPOTrainer on `args`, with its own in-process worker (`trainer.rollout_worker`, the same seed every time)
    and weight sync.
    """
    from trl.experimental.async_grpo import AsyncGRPOTrainer

    from trl_chord.chord_async_grpo import ChordAsyncGRPOConfig, ChordAsyncGRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    worker = HFRolloutWorker(
        model_dir,
        make_rl_prompts(),
        [odd_char_reward],
        tokenizer,
        step_samples=args.per_device_train_batch_size * args.gradient_accumulation_steps,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
    )
    trainer_kwargs = dict(
        model=model_dir,
        reward_funcs=odd_char_reward,
        args=args,
        train_dataset=make_rl_prompts(),
        processing_class=tokenizer,
        rollout_worker=worker,
        weight_transfer=InProcessWeightTransfer(worker),
        peft_config=peft_config,
    )
    if chord if chord is not None else isinstance(args, ChordAsyncGRPOConfig):
        return ChordAsyncGRPOTrainer(expert_dataset=expert_dataset, **chord_kwargs, **trainer_kwargs)
    return AsyncGRPOTrainer(**trainer_kwargs)
