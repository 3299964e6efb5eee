"""The sampler sharded by rank: whole batches per process, grouping kept, equal counts, exact resume."""

from __future__ import annotations

import pytest

from llavactl.data.dataset import ResumableSampler
from llavactl.errors import DataError

# Positive lengths are image records, negative text-only (LLaVA's convention).
LENGTHS = [10 + i for i in range(23)] + [-(5 + i) for i in range(13)]


def shards(lengths: list[int], batch: int, world: int, **kwargs: object) -> list[ResumableSampler]:
    return [ResumableSampler(lengths, batch, 0, rank=r, world_size=world, **kwargs) for r in range(world)]


def test_processes_take_turns_at_the_batches_of_the_one_process_order() -> None:
    whole = list(ResumableSampler(LENGTHS, 4, 0, group_by_modality_length=True))
    batches = [whole[k : k + 4] for k in range(0, 36, 4)]
    rank0, rank1 = (list(s) for s in shards(LENGTHS, 4, 2, group_by_modality_length=True))
    # 9 batches: each process gets 4, the ninth (the mixed leftovers) is left out this epoch.
    assert rank0 == [i for b in batches[0:8:2] for i in b]
    assert rank1 == [i for b in batches[1:8:2] for i in b]
    for k in range(0, 16, 4):
        assert len({LENGTHS[i] > 0 for i in rank0[k : k + 4]}) == 1
        assert len({LENGTHS[i] > 0 for i in rank1[k : k + 4]}) == 1


@pytest.mark.parametrize(("records", "batch", "world"), [(36, 4, 2), (37, 4, 3), (10, 4, 3), (24, 2, 4), (5, 1, 2)])
def test_every_process_gets_as_many_batches_and_no_record_twice(records: int, batch: int, world: int) -> None:
    samplers = shards(list(range(1, records + 1)), batch, world)
    orders = [list(s) for s in samplers]
    assert [len(s) for s in samplers] == [len(o) for o in orders]
    assert {-(-len(o) // batch) for o in orders} == {samplers[0].batches_per_process}
    seen = [i for o in orders for i in o]
    assert len(seen) == len(set(seen)) == records - samplers[0].dropped_per_epoch
    assert samplers[0].dropped_per_epoch < batch * world


def test_sharded_sampler_resumes_each_process_exactly() -> None:
    for sampler in shards(LENGTHS, 4, 2):
        sampler.set_epoch(1)
        full = list(sampler)
        sampler.advance(8)
        resumed = ResumableSampler(LENGTHS, 4, 0, rank=sampler.rank, world_size=2)
        resumed.load_state_dict(sampler.state_dict())
        assert list(resumed) == full[8:] and len(resumed) == len(full) - 8


def test_fewer_batches_than_processes_is_an_error_with_the_fix() -> None:
    with pytest.raises(DataError, match="3 records make 2 batches of 2, fewer than the 4 training processes") as info:
        ResumableSampler([1, 2, 3], 2, 0, rank=0, world_size=4)
    assert "fewer processes" in (info.value.fix or "")
