"""Group-aware batches (``--batch_groups``): the training items of one group share a global batch.

A contrastive loss only learns to tell apart what meets in one batch. Minimal pairs (a clip and its
order-swapped twin) drawn at random meet about once in (items / batch) epochs; grouping them makes them
negatives of each other in every epoch.

The global batch is what one contrastive loss sees: the micro-batch of every process (``--batch_size /
--gradient_accumulation_steps`` x processes). Each epoch the groups are put in a seeded random order and
packed first-fit into global batches of exactly that size, then the groups of the batches left incomplete
are packed again, largest first; a group never spans two batches, and the items of batches that still
could not be filled wait for another epoch. Every process computes the same
packing (same seed and epoch) and takes its own slice of each global batch, so that the batch gathered
in the loss is the packed one. The order depends on the seed and the epoch only.
"""
from __future__ import annotations

import torch
from torch.utils.data import Sampler


class GroupBatchSampler(Sampler[int]):
    """Item indices for one process: its ``micro_batch`` items of every packed global batch, in turn.

    groups: the group of every item (any hashable); world, rank: the processes; seed: the run's seed.
    Use with ``DataLoader(batch_size=micro_batch, drop_last=True)`` and call :meth:`set_epoch`.
    """

    def __init__(self, groups, micro_batch: int, world: int = 1, rank: int = 0, seed: int = 0,
                 describe_batch: str = ""):
        self.micro_batch, self.world, self.rank, self.seed = int(micro_batch), int(world), int(rank), int(seed)
        self.global_batch = self.micro_batch * self.world
        members: dict = {}
        for i, g in enumerate(groups):
            members.setdefault(g, []).append(i)
        self.members = list(members.values())
        self.names = list(members)
        largest = max(range(len(self.members)), key=lambda k: len(self.members[k]), default=None)
        if largest is not None and len(self.members[largest]) > self.global_batch:
            raise ValueError(f"group {self.names[largest]!r} has {len(self.members[largest])} rows, more than the "
                             f"global batch of {self.global_batch}{describe_batch}: it cannot be kept in one batch "
                             "(split the group or raise --batch_size)")
        self.epoch = 0
        self._batches = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._batches = None

    def global_batches(self) -> list[list[int]]:
        """This epoch's packed global batches (the same on every process)."""
        if self._batches is None:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = [self.members[k] for k in torch.randperm(len(self.members), generator=g).tolist()]
            full, open_batches = self._first_fit(order)
            # the groups of the batches left incomplete, largest first, fill more of them
            left = sorted((grp for batch in open_batches for grp in batch), key=len, reverse=True)
            full += self._first_fit(left)[0]
            full = [[i for grp in batch for i in grp] for batch in full]
            # each batch's items in a random order, so that a group's items go to different processes too
            self._batches = [[b[i] for i in torch.randperm(len(b), generator=g).tolist()] for b in full]
        return self._batches

    def _first_fit(self, groups) -> tuple[list, list]:
        """Each group into the first open batch it fits; (full batches, open batches), as lists of groups."""
        full, open_batches, sizes = [], [], []
        for group in groups:
            for k, size in enumerate(sizes):
                if size + len(group) <= self.global_batch:
                    break
            else:
                k = len(sizes)
                open_batches.append([])
                sizes.append(0)
            open_batches[k].append(group)
            sizes[k] += len(group)
            if sizes[k] == self.global_batch:
                full.append(open_batches.pop(k))
                sizes.pop(k)
        return full, open_batches

    def __iter__(self):
        start = self.rank * self.micro_batch
        for batch in self.global_batches():
            yield from batch[start:start + self.micro_batch]

    def __len__(self) -> int:
        return len(self.global_batches()) * self.micro_batch
