import json
import logging

import pytest
import torch
from datasets import Dataset

from trl_chord.expert_data import (
    ExpertSampler,
    collate_expert_batch,
    prepare_expert_dataset,
    tokenize_expert_example,
)


def trained_text(tokenizer, example):
    return tokenizer.decode([t for t, m in zip(example["input_ids"], example["completion_mask"]) if m])


def test_conversational_prompt_completion_trains_the_answer_only(tiny_tokenizer):
    example = {"prompt": [{"role": "user", "content": "2+2="}], "completion": [{"role": "assistant", "content": "4"}]}
    out = tokenize_expert_example(example, 0, tiny_tokenizer, max_length=100)
    assert (
        tiny_tokenizer.decode(out["input_ids"])
        == "<|im_start|>user\n2+2=<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    )
    assert trained_text(tiny_tokenizer, out) == "4<|im_end|>\n"
    assert out["skip_reason"] == ""


def test_plain_text_appends_eos(tiny_tokenizer):
    out = tokenize_expert_example({"prompt": "Q: 1+1?", "completion": " A: 2"}, 0, tiny_tokenizer, max_length=100)
    assert trained_text(tiny_tokenizer, out) == " A: 2<|im_end|>"
    assert tiny_tokenizer.decode(out["input_ids"]) == "Q: 1+1? A: 2<|im_end|>"


def test_messages_train_every_assistant_turn_and_nothing_else(tiny_tokenizer):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "XY"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "ZW"},
    ]
    out = tokenize_expert_example({"messages": messages}, 0, tiny_tokenizer, max_length=200)
    assert trained_text(tiny_tokenizer, out) == "XY<|im_end|>\nZW<|im_end|>\n"


def test_tools_column_as_json_reaches_the_chat_template(tiny_tokenizer):
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    example = {
        "prompt": [{"role": "user", "content": "1+1"}],
        "completion": [{"role": "assistant", "content": "2"}],
        "tools": json.dumps(tools),
    }
    out = tokenize_expert_example(example, 0, tiny_tokenizer, max_length=500)
    assert '"name": "add"' in tiny_tokenizer.decode(out["input_ids"])
    assert trained_text(tiny_tokenizer, out) == "2<|im_end|>\n"


def test_bad_tools_json_names_the_example(tiny_tokenizer):
    example = {"prompt": "a", "completion": "b", "tools": "{not json"}
    with pytest.raises(ValueError, match="Expert example 7: the `tools` column is not valid JSON"):
        tokenize_expert_example(example, 7, tiny_tokenizer, max_length=10)


def test_truncation_and_skip_reasons(tiny_tokenizer):
    example = {"prompt": "abcdef", "completion": "ghij"}
    assert len(tokenize_expert_example(example, 0, tiny_tokenizer, max_length=8)["input_ids"]) == 8
    assert (
        tokenize_expert_example(example, 0, tiny_tokenizer, max_length=6)["skip_reason"] == "completion truncated away"
    )
    empty = {"prompt": [{"role": "user", "content": "a"}], "completion": []}
    assert tokenize_expert_example(empty, 0, tiny_tokenizer, max_length=50)["skip_reason"] == "empty completion"
    no_assistant = {"messages": [{"role": "user", "content": "a"}]}
    assert (
        tokenize_expert_example(no_assistant, 0, tiny_tokenizer, max_length=50)["skip_reason"] == "no assistant turn"
    )


def test_prepare_skips_and_counts(tiny_tokenizer, caplog):
    dataset = Dataset.from_dict({"prompt": ["ab", "cd", "abcdefghij"], "completion": ["x", "", "y"]})
    with caplog.at_level(logging.WARNING):
        kept = prepare_expert_dataset(dataset, tiny_tokenizer, max_length=6)
    assert len(kept) == 1
    assert "Skipped 2 of 3 expert examples: 1 with completion truncated away, 1 with empty completion" in caplog.text


def test_sampler_shards_are_disjoint_and_cover_every_example_once_per_pass():
    num_examples, world, batch_size = 11, 3, 2
    samplers = [ExpertSampler(num_examples, batch_size, world, rank, seed=5) for rank in range(world)]
    for epoch in range(3):
        shards = [set(sampler.shard(epoch)) for sampler in samplers]
        assert set().union(*shards) == set(range(num_examples))
        assert sum(len(shard) for shard in shards) == num_examples
    # Drawing batches walks each shard in order, across pass boundaries
    drawn = [samplers[1].next_batch() for _ in range(5)]
    stream = samplers[1].shard(0) + samplers[1].shard(1) + samplers[1].shard(2)
    assert sum(drawn, []) == stream[:10]


def test_sampler_reshuffles_each_pass_and_resumes_exactly():
    sampler = ExpertSampler(20, batch_size=3, seed=0)
    assert sampler.shard(0) != sampler.shard(1)
    first = [sampler.next_batch() for _ in range(4)]
    state = sampler.state_dict()
    rest = [sampler.next_batch() for _ in range(9)]
    resumed = ExpertSampler(20, batch_size=3, seed=0)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(9)] == rest
    assert first != rest[:4]


def test_sampler_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    sampler = ExpertSampler(50, batch_size=7, seed=1)
    for _ in range(20):
        sampler.next_batch()
    torch.testing.assert_close(torch.rand(3), expected)


def test_sampler_refuses_fewer_examples_than_processes():
    with pytest.raises(ValueError, match="fewer than the 4 processes"):
        ExpertSampler(3, batch_size=1, num_replicas=4, rank=0)


def test_collate_right_pads():
    batch = collate_expert_batch(
        [{"input_ids": [5, 6, 7], "completion_mask": [0, 1, 1]}, {"input_ids": [8], "completion_mask": [1]}],
        pad_token_id=0,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["completion_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]
