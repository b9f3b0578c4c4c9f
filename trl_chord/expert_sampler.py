"""Which expert examples each process draws, micro-batch by micro-batch: sharded, seeded, resumable."""

import torch


class ExpertSampler:
    """
    Infinite, sharded and seeded stream of expert example indices, one micro-batch at a time.

    Pass `e` over the data is the permutation `randperm(num_examples)` drawn from a generator seeded with
    `seed + e`; process `rank` takes every `num_replicas`-th index of it, starting at `rank`. Within a pass the
    processes see disjoint examples, and over its passes each process trains on each of its examples once per pass.
    Micro-batches run across pass boundaries, so no process's stream ever runs dry. The state is the number of indices
    already drawn, which is all a resumed run needs. The global RNG is never touched.
    """

    def __init__(self, num_examples: int, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        if num_examples < num_replicas:
            raise ValueError(
                f"The expert dataset has {num_examples} usable examples, fewer than the {num_replicas} processes: "
                "each process needs at least one example of its own. Add expert examples or use fewer processes."
            )
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shard_size = len(range(rank, num_examples, num_replicas))
        self.examples_drawn = 0
        self._shard_cache: tuple[int, list[int]] | None = None

    def shard(self, epoch: int) -> list[int]:
        """This process's indices for pass `epoch`, in the order they are drawn."""
        if self._shard_cache is None or self._shard_cache[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            permutation = torch.randperm(self.num_examples, generator=generator)
            self._shard_cache = (epoch, permutation[self.rank :: self.num_replicas].tolist())
        return self._shard_cache[1]

    def take(self, count: int) -> list[int]:
        """The next `count` indices of this process's stream."""
        indices: list[int] = []
        while len(indices) < count:
            epoch, offset = divmod(self.examples_drawn, self.shard_size)
            taken = self.shard(epoch)[offset : offset + count - len(indices)]
            indices.extend(taken)
            self.examples_drawn += len(taken)
        return indices

    def next_batch(self) -> list[int]:
        return self.take(self.batch_size)

    def state_dict(self) -> dict[str, int]:
        return {"examples_drawn": self.examples_drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.examples_drawn = int(state["examples_drawn"])


def next_source(proportions: list[float], drawn_per_source: list[int]) -> int:
    """
    The source of the next expert example: the one furthest behind its share, `argmax_i p_i * (k + 1) - drawn_i`
    after `k` draws (the first on ties). After any `k` draws, source `i` has given `floor` or `ceil` of `p_i * k`,
    give or take one, whatever `k`: the proportions hold in every window that starts at 0, with no randomness.
    """
    total = sum(drawn_per_source) + 1
    deficits = [share * total - drawn for share, drawn in zip(proportions, drawn_per_source)]
    return max(range(len(deficits)), key=lambda index: (deficits[index], -index))


class ExpertMixtureSampler:
    """
    Several expert sources, each with its own [`ExpertSampler`] stream, mixed in fixed proportions.

    The sources' examples are numbered one after another (source `i` from `offsets[i]`). Each example slot goes to the
    source [`next_source`] picks, which depends only on the counts so far: every process picks the same sources in the
    same order, and each takes the example from its own shard of that source. So, per source, processes see disjoint
    examples within a pass and every example once per pass, as with one source. The state is each source's count.
    """

    def __init__(
        self,
        source_sizes: dict[str, int],
        proportions: dict[str, float],
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ):
        if set(proportions) != set(source_sizes):
            raise ValueError(
                f"`chord_sft_dataset_proportions` names the sources {sorted(proportions)}, but `expert_dataset` has "
                f"{sorted(source_sizes)}: give a proportion for each source, and only for those."
            )
        self.names = list(source_sizes)
        total = sum(proportions[name] for name in self.names)
        self.proportions = [proportions[name] / total for name in self.names]
        self.batch_size = batch_size
        self.offsets = [0]
        for name in self.names[:-1]:
            self.offsets.append(self.offsets[-1] + source_sizes[name])
        self.samplers = {}
        for index, name in enumerate(self.names):
            try:
                # A seed per source, so that sources of equal size are not shuffled alike
                self.samplers[name] = ExpertSampler(
                    source_sizes[name], 1, num_replicas, rank, seed=seed + 1_000_003 * index
                )
            except ValueError as error:
                raise ValueError(f"Expert source {name!r}: {error}") from error

    def next_batch(self) -> list[int]:
        indices = []
        for _ in range(self.batch_size):
            source = next_source(self.proportions, [self.samplers[name].examples_drawn for name in self.names])
            indices.append(self.offsets[source] + self.samplers[self.names[source]].take(1)[0])
        return indices

    def source_of(self, index: int) -> int:
        """The position in `names` of the source a (numbered) example comes from."""
        return max(source for source, offset in enumerate(self.offsets) if offset <= index)

    def state_dict(self) -> dict[str, dict[str, int]]:
        return {name: sampler.state_dict() for name, sampler in self.samplers.items()}

    def load_state_dict(self, state: dict[str, dict[str, int]]) -> None:
        if set(state) != set(self.names):
            raise ValueError(
                f"The checkpoint's expert sources {sorted(state)} are not this run's {sorted(self.names)}."
            )
        for name, sampler_state in state.items():
            self.samplers[name].load_state_dict(sampler_state)
