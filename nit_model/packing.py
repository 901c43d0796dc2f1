"""Pack images of native resolution into token-budgeted sequences.

NiT (arXiv 2506.03131) flattens each image to ``h*w`` tokens and concatenates several images into
one sequence of at most ``budget`` tokens; `cu_seqlens` keeps them apart in attention. Choosing
which images share a sequence is 1-D bin packing on the token counts. This module provides:

- `pack_lpfhp`: longest-pack-first histogram packing (Krell et al. 2021, "Efficient Sequence
  Packing without Cross-contamination", arXiv 2107.02027), the algorithm the NiT paper uses.
  Items are visited longest first; each goes to the *fullest* open pack that still fits (best
  fit). Equal lengths are handled as one histogram bin and equal packs ("strategies") as one
  group with a count, so the cost grows with the number of distinct lengths and strategies, not
  with the number of items.
- `pack_ffd`: first-fit decreasing, the textbook baseline, vectorised per distinct length.
- `padding_stats`, `bucket_stats`: what the alternatives cost (padding each batch to its longest
  image; padding each image to a fixed bucket length), for benchmarks.
- `PackedBatchSampler`: a `torch.utils.data` batch sampler that yields one pack (a list of dataset
  indices) per step, reshuffled per epoch and sharded evenly across distributed ranks.

Efficiency everywhere is ``useful tokens / processed tokens``. A pack processes `budget` tokens
(a fixed-size buffer; the unused tail is the waste), a padded batch ``n * longest``, a bucketed
batch ``(budget // L) * L``.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
import time
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

__all__ = [
    "Packing", "PackingStats", "pack", "pack_lpfhp", "pack_ffd", "padding_stats", "bucket_stats",
    "compare_strategies", "token_lengths", "PackedBatchSampler",
]


@dataclasses.dataclass(frozen=True)
class PackingStats:
    """Summary of one way of batching a dataset under a token budget.

    efficiency = useful_tokens / processed_tokens; num_batches is the number of steps per epoch.
    """

    method: str
    budget: int
    num_items: int
    num_batches: int
    useful_tokens: int
    processed_tokens: int
    num_dropped: int = 0
    seconds: float = 0.0

    @property
    def efficiency(self) -> float:
        return self.useful_tokens / self.processed_tokens if self.processed_tokens else 0.0

    @property
    def budget_use(self) -> float:
        """useful_tokens / (num_batches * budget): how full the steps are against the budget
        (equal to `efficiency` for packs; lower than it for padded batches that stop short)."""
        return self.useful_tokens / (self.num_batches * self.budget) if self.num_batches else 0.0

    @property
    def items_per_batch(self) -> float:
        return self.num_items / self.num_batches if self.num_batches else 0.0

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(efficiency=self.efficiency, budget_use=self.budget_use, items_per_batch=self.items_per_batch)
        return d

    def __str__(self) -> str:
        return (f"{self.method}: {self.num_items} items -> {self.num_batches} batches of budget {self.budget}, "
                f"efficiency {self.efficiency:.2%}, budget use {self.budget_use:.2%}, {self.items_per_batch:.1f} items/batch, "
                f"{self.seconds * 1e3:.1f} ms" + (f", {self.num_dropped} dropped" if self.num_dropped else ""))


@dataclasses.dataclass(frozen=True, eq=False)
class Packing:
    """The result of packing: which dataset indices share each pack.

    Attributes:
        packs: list of int64 arrays of dataset indices, one per pack; sum of their lengths <= budget.
        budget: token budget per pack.
        lengths: int64 [M], token count of every dataset item (the input).
        dropped: int64 array of indices left out because they exceed the budget (empty unless
            ``drop_oversized=True`` was asked for).
        method: "lpfhp" or "ffd".
        seconds: wall time of the packing.
    """

    packs: list
    budget: int
    lengths: np.ndarray
    dropped: np.ndarray
    method: str
    seconds: float

    @property
    def num_packs(self) -> int:
        return len(self.packs)

    @property
    def fills(self) -> np.ndarray:
        """int64 [P], tokens used in each pack."""
        return np.array([int(self.lengths[p].sum()) for p in self.packs], dtype=np.int64)

    @property
    def fill_fractions(self) -> np.ndarray:
        """float64 [P], fraction of the budget used by each pack."""
        return self.fills / self.budget

    @property
    def efficiency(self) -> float:
        """Fraction of the budget used overall: packed tokens / (num_packs * budget)."""
        return self.stats().efficiency

    def stats(self) -> PackingStats:
        packed = sum(len(p) for p in self.packs)
        useful = int(self.lengths.sum()) - int(self.lengths[self.dropped].sum())
        return PackingStats(self.method, self.budget, packed, self.num_packs, useful,
                            self.num_packs * self.budget, len(self.dropped), self.seconds)

    def __len__(self) -> int:
        return self.num_packs

    def __iter__(self):
        return iter(self.packs)

    def __repr__(self) -> str:
        return f"Packing({self.stats()})"


# ----------------------------------------------------------------------------------------------
# input checks


def token_lengths(sizes, patch_size: int = 1) -> np.ndarray:
    """Tokens per item, int64 [M], from spatial sizes [M, 2] (H, W) and a patch size.

    tokens = (H // p) * (W // p); H and W must be multiples of p (the datasets guarantee it).
    """
    s = np.asarray(sizes, dtype=np.int64)
    if s.ndim != 2 or s.shape[1] != 2:
        raise ValueError(f"sizes must have shape [M, 2] (H, W per item), got shape {s.shape}")
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    bad = np.flatnonzero((s % patch_size).any(axis=1) | (s < patch_size).any(axis=1))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"item {i} has size {tuple(s[i].tolist())}, not a positive multiple of patch_size={patch_size} "
                         f"({bad.size} such items)")
    return (s[:, 0] // patch_size) * (s[:, 1] // patch_size)


def _check_lengths(lengths, budget: int, drop_oversized: bool) -> tuple[np.ndarray, np.ndarray]:
    """Validate; return (lengths int64 [M], dropped indices)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ValueError(f"budget must be a positive int (tokens per pack), got {budget!r}")
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.detach().cpu().numpy()
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"lengths must be 1-D (tokens per item), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("nothing to pack: lengths is empty")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"lengths must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if (arr < 1).any():
        i = int(np.flatnonzero(arr < 1)[0])
        raise ValueError(f"every item needs at least one token, item {i} has {int(arr[i])}")
    big = np.flatnonzero(arr > budget)
    if big.size and not drop_oversized:
        shown = ", ".join(f"#{int(i)} ({int(arr[i])} tokens)" for i in big[:5])
        raise ValueError(f"{big.size} item(s) exceed the budget of {budget} tokens: {shown}"
                         f"{', ...' if big.size > 5 else ''}; raise the budget or pass drop_oversized=True")
    return arr, big


def _check_max_items(max_items: Optional[int]) -> Optional[int]:
    if max_items is not None and (isinstance(max_items, bool) or int(max_items) < 1):
        raise ValueError(f"max_items must be None or a positive int, got {max_items!r}")
    return None if max_items is None else int(max_items)


# ----------------------------------------------------------------------------------------------
# plans: the packs as lengths (slots); items are assigned to slots afterwards


def _histogram(lengths: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct lengths (descending) and their counts among the kept items."""
    values, counts = np.unique(lengths[keep], return_counts=True)
    return values[::-1], counts[::-1]


def _lpfhp_groups(values, counts, budget: int, max_items: Optional[int]) -> list[tuple[int, tuple]]:
    """Longest-pack-first histogram packing as (count, strategy) groups.

    A strategy is the tuple of lengths in one pack; `count` packs share it. Open groups are
    keyed by their residual space. Lengths are visited longest first; the `n` items of length
    `l` go to the groups with the smallest residual r >= l first (best fit). Best fit puts
    q = r // l items into a pack before the next pack is touched (the pack stays the fullest
    that fits), so a whole group is served at once: `full` packs get q items, at most one pack
    gets the remainder. This reproduces item-by-item best-fit decreasing exactly, at the cost
    of one step per group instead of one per item.
    """
    open_groups: dict[int, list[list]] = {}  # residual -> [[count, strategy], ...]
    keys: list[int] = []  # sorted residuals that have open groups
    done: list[tuple[int, tuple]] = []

    def add(count: int, strategy: tuple, residual: int, pending: list):
        if residual == 0 or (max_items is not None and len(strategy) >= max_items):
            done.append((count, strategy))
        else:
            pending.append((residual, count, strategy))

    for length, n in zip(values.tolist(), counts.tolist()):
        pending: list = []
        pos = bisect.bisect_left(keys, length)
        while n > 0 and pos < len(keys):
            r = keys[pos]
            bucket = open_groups[r]
            while n > 0 and bucket:
                c, strategy = bucket[-1]
                q = r // length
                if max_items is not None:
                    q = min(q, max_items - len(strategy))
                full = min(c, n // q)
                if full:
                    add(full, strategy + (length,) * q, r - q * length, pending)
                    n -= full * q
                    c -= full
                if c and 0 < n < q:
                    add(1, strategy + (length,) * n, r - n * length, pending)
                    c -= 1
                    n = 0
                if c:
                    bucket[-1][0] = c
                else:
                    bucket.pop()
            if bucket:
                pos += 1
            else:
                del open_groups[r]
                keys.pop(pos)
        if n > 0:  # no open pack fits: new packs, each filled with as many copies as fit
            per = budget // length if max_items is None else min(budget // length, max_items)
            if n // per:
                add(n // per, (length,) * per, budget - per * length, pending)
            if n % per:
                add(1, (length,) * (n % per), budget - (n % per) * length, pending)
        for residual, count, strategy in pending:  # inserted after the pass so `pos` stays valid
            if residual not in open_groups:
                open_groups[residual] = []
                bisect.insort(keys, residual)
            open_groups[residual].append([count, strategy])

    for r in keys:
        done.extend((c, s) for c, s in open_groups[r])
    return done


def _groups_to_slots(groups) -> tuple[np.ndarray, np.ndarray]:
    """(slot lengths int64 [n], pack offsets int64 [P+1]): pack j holds slots off[j]:off[j+1]."""
    lens, sizes = [], []
    for count, strategy in groups:
        s = np.asarray(strategy, dtype=np.int64)
        lens.append(np.tile(s, count))
        sizes.append(np.full(count, len(s), dtype=np.int64))
    sizes_all = np.concatenate(sizes)
    off = np.zeros(len(sizes_all) + 1, dtype=np.int64)
    np.cumsum(sizes_all, out=off[1:])
    return np.concatenate(lens), off


def _ffd_slots(values, counts, budget: int, max_items: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
    """First-fit decreasing, vectorised over the packs for each distinct length.

    For `n` items of length `l`, first fit fills the lowest-numbered pack that fits until it no
    longer fits, then the next: pack j takes min(cap_j, what is left) items with
    cap_j = residual_j // l, which a cumulative sum over the packs gives in one step.
    """
    residual = np.empty(0, dtype=np.int64)
    nitems = np.empty(0, dtype=np.int64)
    pack_ids, slot_lens = [], []
    for length, n in zip(values.tolist(), counts.tolist()):
        cap = residual // length
        if max_items is not None:
            cap = np.minimum(cap, max_items - nitems)
        idx = np.flatnonzero(cap > 0)
        if idx.size:
            take = np.minimum(cap[idx], np.maximum(n - (np.cumsum(cap[idx]) - cap[idx]), 0))
            used = take > 0
            idx, take = idx[used], take[used]
            residual[idx] -= take * length
            nitems[idx] += take
            pack_ids.append(np.repeat(idx, take))
            slot_lens.append(np.full(int(take.sum()), length, dtype=np.int64))
            n -= int(take.sum())
        if n > 0:
            per = budget // length if max_items is None else min(budget // length, max_items)
            new = np.full(-(-n // per), per, dtype=np.int64)
            new[-1] = n - per * (len(new) - 1)
            first = len(residual)
            residual = np.concatenate([residual, budget - new * length])
            nitems = np.concatenate([nitems, new])
            pack_ids.append(np.repeat(np.arange(first, first + len(new)), new))
            slot_lens.append(np.full(n, length, dtype=np.int64))
    pid = np.concatenate(pack_ids)
    order = np.argsort(pid, kind="stable")
    off = np.zeros(len(residual) + 1, dtype=np.int64)
    np.cumsum(nitems, out=off[1:])
    return np.concatenate(slot_lens)[order], off


def _assign(slot_lengths: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, keep: np.ndarray,
            rng: Optional[np.random.Generator]) -> list:
    """Give every slot a dataset index of the same length; items of equal length are taken in
    index order, or in a random order when `rng` is given (which changes who packs with whom)."""
    items = np.flatnonzero(keep)
    if rng is not None:
        items = items[rng.permutation(len(items))]
    items = items[np.argsort(lengths[items], kind="stable")]
    slots = np.argsort(slot_lengths, kind="stable")
    assigned = np.empty(len(slot_lengths), dtype=np.int64)
    assigned[slots] = items
    return np.split(assigned, offsets[1:-1])


def _plan(lengths: np.ndarray, keep: np.ndarray, budget: int, method: str,
          max_items: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
    values, counts = _histogram(lengths, keep)
    if method == "lpfhp":
        return _groups_to_slots(_lpfhp_groups(values, counts, budget, max_items))
    if method == "ffd":
        return _ffd_slots(values, counts, budget, max_items)
    raise ValueError(f"unknown packing method {method!r}; expected 'lpfhp' or 'ffd'")


def pack(lengths, budget: int, method: str = "lpfhp", *, max_items: Optional[int] = None,
         drop_oversized: bool = False, seed: Optional[int] = None) -> Packing:
    """Pack items of the given token counts into packs of at most `budget` tokens.

    Args:
        lengths: int [M], tokens per item (e.g. ``token_lengths(dataset.sizes(), patch)``).
        budget: tokens per pack.
        method: "lpfhp" (best fit, the NiT choice) or "ffd" (first fit decreasing).
        max_items: optional cap on items per pack.
        drop_oversized: leave out items longer than `budget` (listed in ``Packing.dropped``)
            instead of raising ValueError.
        seed: when given, items of equal length are assigned to the packs' slots in a random
            order from this seed; otherwise in index order. The pack lengths do not change.
    Returns:
        a `Packing`; every kept index appears in exactly one pack.
    """
    t0 = time.perf_counter()
    arr, big = _check_lengths(lengths, budget, drop_oversized)
    max_items = _check_max_items(max_items)
    keep = np.ones(len(arr), dtype=bool)
    keep[big] = False
    if not keep.any():
        packs = []
    else:
        slot_lengths, offsets = _plan(arr, keep, int(budget), method, max_items)
        rng = None if seed is None else np.random.default_rng(seed)
        packs = _assign(slot_lengths, offsets, arr, keep, rng)
    return Packing(packs, int(budget), arr, big, method, time.perf_counter() - t0)


def pack_lpfhp(lengths, budget: int, **kwargs) -> Packing:
    """`pack(lengths, budget, "lpfhp", ...)`: longest-pack-first histogram packing."""
    return pack(lengths, budget, "lpfhp", **kwargs)


def pack_ffd(lengths, budget: int, **kwargs) -> Packing:
    """`pack(lengths, budget, "ffd", ...)`: first-fit decreasing."""
    return pack(lengths, budget, "ffd", **kwargs)


# ----------------------------------------------------------------------------------------------
# the alternatives, for comparison


def padding_stats(lengths, budget: int, *, seed: Optional[int] = 0, sort_by_length: bool = False) -> PackingStats:
    """Cost of padding every batch to its longest item, under the same token budget.

    Items are visited in a random order (from `seed`; index order if None), or sorted by length
    when `sort_by_length` (length-grouped batching). An item joins the current batch while
    ``(n + 1) * max(longest, length) <= budget``; a batch processes ``n * longest`` tokens.
    """
    t0 = time.perf_counter()
    arr, _ = _check_lengths(lengths, budget, drop_oversized=False)
    order = np.arange(len(arr)) if seed is None else np.random.default_rng(seed).permutation(len(arr))
    if sort_by_length:
        order = order[np.argsort(-arr[order], kind="stable")]
    processed = batches = 0
    n = longest = 0
    for length in arr[order].tolist():
        m = max(longest, length)
        if (n + 1) * m > budget:
            processed += n * longest
            batches += 1
            n, m = 0, length
        n += 1
        longest = m
    processed += n * longest
    batches += 1
    name = "pad-to-longest" + (" (sorted)" if sort_by_length else "")
    return PackingStats(name, int(budget), len(arr), batches, int(arr.sum()), processed, 0, time.perf_counter() - t0)


def bucket_stats(lengths, budget: int, *, buckets: Optional[Sequence[int]] = None) -> PackingStats:
    """Cost of fixed-size length buckets (static shapes): each item is padded to the smallest
    bucket length L >= its length; a batch holds ``budget // L`` items of bucket L and processes
    ``(budget // L) * L`` tokens (a partial last batch is padded to the same shape).

    buckets: bucket lengths; default powers of two up to the budget (and the budget itself).
    """
    t0 = time.perf_counter()
    arr, _ = _check_lengths(lengths, budget, drop_oversized=False)
    if buckets is None:
        b = [2 ** k for k in range(int(math.log2(budget)) + 1)]
        buckets = b if b[-1] == budget else b + [budget]
    bk = np.unique(np.asarray(buckets, dtype=np.int64))
    if bk[0] < 1 or bk[-1] < arr.max() or bk[-1] > budget:
        raise ValueError(f"buckets must be in [1, budget={budget}] and reach the longest item ({int(arr.max())}), "
                         f"got {bk.tolist()}")
    which = np.searchsorted(bk, arr)
    per_bucket = np.bincount(which, minlength=len(bk))
    per_batch = budget // bk
    nbatch = -(-per_bucket // per_batch)
    processed = int((nbatch * per_batch * bk).sum())
    return PackingStats(f"buckets ({len(bk)})", int(budget), len(arr), int(nbatch.sum()), int(arr.sum()), processed, 0,
                        time.perf_counter() - t0)


def compare_strategies(lengths, budget: int, *, seed: int = 0) -> list[PackingStats]:
    """LPFHP, FFD, padding to the longest (random and length-sorted batches) and fixed buckets."""
    return [pack_lpfhp(lengths, budget).stats(), pack_ffd(lengths, budget).stats(),
            padding_stats(lengths, budget, seed=seed), padding_stats(lengths, budget, seed=seed, sort_by_length=True),
            bucket_stats(lengths, budget)]


# ----------------------------------------------------------------------------------------------
# sampler


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class PackedBatchSampler(torch.utils.data.Sampler):
    """Yields packs of dataset indices (``list[int]``) whose token counts sum to <= `token_budget`.

    Use as ``DataLoader(ds, batch_sampler=PackedBatchSampler(...), collate_fn=PackCollate(p))``.

    The packs' lengths are planned once (they depend only on the length histogram). Each epoch,
    with `shuffle`, items of equal length are dealt to the planned slots in a new random order
    (so different images pack together) and the packs are shuffled, both from ``(seed, epoch)``.
    With several ranks, the epoch's packs are padded by repeating the first ones (or, with
    `drop_last`, cut) to a multiple of `world_size`, and rank r takes packs r, r+W, r+2W, ...:
    every rank gets the same number of packs, so DDP collectives stay in step. The output is a
    deterministic function of (seed, epoch, rank, world_size).

    Args:
        lengths: int [M] tokens per dataset item (see `token_lengths`).
        token_budget: tokens per pack.
        method: "lpfhp" or "ffd".
        shuffle: reshuffle per epoch (else packs and their members are fixed, in plan order).
        seed: base seed, identical on every rank.
        rank, world_size: default to torch.distributed's when it is initialised, else 0 and 1.
        drop_last: cut the tail instead of padding to a multiple of world_size.
        drop_oversized: leave out items longer than the budget instead of raising.
        max_items: optional cap on items per pack.
    """

    def __init__(self, lengths, token_budget: int, *, method: str = "lpfhp", shuffle: bool = True, seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None, drop_last: bool = False,
                 drop_oversized: bool = False, max_items: Optional[int] = None):
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither (to use torch.distributed's)")
        if rank is None:
            rank, world_size = _dist_rank_world()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.packing = pack(lengths, token_budget, method, max_items=max_items, drop_oversized=drop_oversized)
        if self.packing.num_packs == 0:
            raise ValueError(f"no item fits the budget of {token_budget} tokens: nothing to sample")
        self._slot_lengths = np.concatenate([self.packing.lengths[p] for p in self.packing.packs])
        self._offsets = np.zeros(self.packing.num_packs + 1, dtype=np.int64)
        np.cumsum([len(p) for p in self.packing.packs], out=self._offsets[1:])
        self._keep = np.ones(len(self.packing.lengths), dtype=bool)
        self._keep[self.packing.dropped] = False
        self.token_budget, self.shuffle, self.seed = int(token_budget), bool(shuffle), int(seed)
        self.rank, self.world_size, self.drop_last = int(rank), int(world_size), bool(drop_last)
        self.epoch = 0
        p = self.packing.num_packs
        if drop_last and p < world_size:
            raise ValueError(f"drop_last with {p} pack(s) and world_size={world_size} leaves the ranks nothing")
        self.num_packs_per_rank = p // world_size if drop_last else -(-p // world_size)

    @classmethod
    def from_dataset(cls, dataset, token_budget: int, patch_size: int = 1, **kwargs) -> "PackedBatchSampler":
        """Sampler over a dataset with ``sizes() -> [M, 2]`` (H, W per item, multiples of
        `patch_size`), e.g. the datasets of `nit_model.data`; kwargs as for the constructor."""
        return cls(token_lengths(dataset.sizes(), patch_size), token_budget, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose packs `__iter__` yields (call before each epoch, on every rank)."""
        self.epoch = int(epoch)

    def epoch_packs(self, epoch: Optional[int] = None) -> list:
        """All packs of an epoch, before sharding: list of int64 arrays of dataset indices."""
        epoch = self.epoch if epoch is None else int(epoch)
        if not self.shuffle:
            return list(self.packing.packs)
        rng = np.random.default_rng([self.seed, epoch])
        packs = _assign(self._slot_lengths, self._offsets, self.packing.lengths, self._keep, rng)
        return [packs[i] for i in rng.permutation(len(packs))]

    def rank_packs(self, epoch: Optional[int] = None) -> list:
        """This rank's packs of an epoch: `num_packs_per_rank` int64 arrays."""
        packs = self.epoch_packs(epoch)
        total = self.num_packs_per_rank * self.world_size
        packs = [packs[i % len(packs)] for i in range(total)]
        return packs[self.rank::self.world_size]

    def __iter__(self) -> Iterator[list]:
        for p in self.rank_packs():
            yield p.tolist()

    def __len__(self) -> int:
        return self.num_packs_per_rank

    def stats(self) -> PackingStats:
        return self.packing.stats()
