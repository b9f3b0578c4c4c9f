import json
import logging

import pytest
import torch
from datasets import Dataset

from trl_chord.expert_data import (
    collate_expert_batch,
    is_empty_message,
    prepare_expert_dataset,
    tokenize_expert_example,
)
from trl_chord.expert_sampler import ExpertMixtureSampler, ExpertSampler, next_source


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


def test_an_empty_assistant_turn_is_not_trained_and_the_others_are(tiny_tokenizer):
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "2+2="},
        {"role": "assistant", "content": "4"},
    ]
    out = tokenize_expert_example({"messages": messages}, 0, tiny_tokenizer, max_length=200)
    assert trained_text(tiny_tokenizer, out) == "4<|im_end|>\n"


def test_a_message_is_empty_only_with_no_text_and_nothing_else_to_render():
    assert is_empty_message({"role": "assistant", "content": ""})
    assert is_empty_message({"role": "assistant", "content": None})
    assert is_empty_message({"role": "assistant", "content": [{"type": "text", "text": " "}]})
    assert not is_empty_message({"role": "assistant", "content": "4"})
    assert not is_empty_message({"role": "assistant", "content": [{"type": "text", "text": "4"}]})
    # A tool call's assistant turn often has no content: the call is what the template renders and the model learns
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}
    assert not is_empty_message({"role": "assistant", "content": "", "tool_calls": [call]})


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


# Several expert sources
@pytest.mark.parametrize("proportions", [[0.5, 0.3, 0.2], [0.9, 0.1], [1 / 3, 1 / 3, 1 / 3], [0.7, 0.2, 0.05, 0.05]])
def test_next_source_keeps_every_prefix_of_the_stream_within_one_example_of_the_proportions(proportions):
    drawn = [0] * len(proportions)
    for k in range(1, 2001):
        drawn[next_source(proportions, drawn)] += 1
        for share, count in zip(proportions, drawn):
            assert abs(count - share * k) < 1, (k, drawn)


def mixture_streams(sizes, proportions, world, batch_size, num_batches, seed=3):
    samplers = [
        ExpertMixtureSampler(sizes, proportions, batch_size, num_replicas=world, rank=rank, seed=seed)
        for rank in range(world)
    ]
    return samplers, [[s.next_batch() for _ in range(num_batches)] for s in samplers]


def test_mixture_covers_each_source_once_per_pass_with_disjoint_shards_and_stated_counts():
    sizes, proportions = {"math": 10, "tools": 6}, {"math": 3.0, "tools": 1.0}
    world, batch_size, num_batches = 2, 4, 40
    samplers, streams = mixture_streams(sizes, proportions, world, batch_size, num_batches)
    for source_index, name in enumerate(sizes):
        offset = samplers[0].offsets[source_index]
        per_rank = [
            [i - offset for i in sum(stream, []) if samplers[0].source_of(i) == source_index] for stream in streams
        ]
        # Every process drew this source the same number of times: 3/4 of the 160 slots, or 1/4
        assert len(per_rank[0]) == len(per_rank[1]) == 160 * proportions[name] / 4
        # Pass e of the source: its shard_size draws on each process are disjoint, and together the whole source
        shard_sizes = [s.samplers[name].shard_size for s in samplers]
        num_passes = min(len(draws) // size for draws, size in zip(per_rank, shard_sizes))
        assert num_passes >= 2
        for epoch in range(num_passes):
            parts = [draws[epoch * size : (epoch + 1) * size] for draws, size in zip(per_rank, shard_sizes)]
            assert set(parts[0]).isdisjoint(parts[1])
            assert sorted(parts[0] + parts[1]) == list(range(sizes[name]))


def test_mixture_resumes_exactly_and_refuses_another_runs_state():
    sizes, proportions = {"a": 5, "b": 7, "c": 3}, {"a": 0.5, "b": 0.25, "c": 0.25}
    sampler = ExpertMixtureSampler(sizes, proportions, batch_size=3, seed=1)
    for _ in range(7):
        sampler.next_batch()
    resumed = ExpertMixtureSampler(sizes, proportions, batch_size=3, seed=1)
    resumed.load_state_dict(json.loads(json.dumps(sampler.state_dict())))
    assert [resumed.next_batch() for _ in range(20)] == [sampler.next_batch() for _ in range(20)]
    with pytest.raises(ValueError, match="expert sources"):
        resumed.load_state_dict({"a": {"examples_drawn": 1}})


def test_mixture_names_the_source_that_is_too_small_for_the_processes():
    with pytest.raises(ValueError, match="Expert source 'tiny': The expert dataset has 1 usable examples, fewer"):
        ExpertMixtureSampler({"big": 8, "tiny": 1}, {"big": 1, "tiny": 1}, batch_size=2, num_replicas=2, rank=0)
