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


def _used_then_resumed(sampler_of, saved_world: int, new_world: int, accumulation: int, steps: int):
    """Records used by ``saved_world`` processes in ``steps`` steps of the epoch, then by ``new_world``
    processes resumed from rank 0's saved position, to the end of the epoch."""
    per_step = accumulation * saved_world
    before = [sampler_of(r, saved_world) for r in range(saved_world)]
    used: list[int] = []
    for s in before:
        # A ResumableSampler's order is of records, in batches of `batch_size`; a token budget's of batches.
        order = s.order(0)
        taken = (
            order[: steps * accumulation * s.batch_size]
            if isinstance(s, ResumableSampler)
            else order[: steps * accumulation]
        )
        records = [i for b in taken for i in (b if isinstance(b, list) else [b])]
        s.advance(len(records))
        used += records
    state = {**before[0].state_dict(), "world_size": saved_world, "global_batches": steps * per_step}
    after = [sampler_of(r, new_world) for r in range(new_world)]
    for s in after:
        s.load_state_dict(state)
    rest = [i for s in after for b in s for i in (b if isinstance(b, list) else [b])]
    return used, rest, after


@pytest.mark.parametrize(("saved_world", "new_world", "accumulation"), [(2, 1, 1), (1, 2, 2), (4, 2, 1), (2, 4, 2)])
def test_a_resume_on_another_number_of_processes_sees_each_record_of_the_epoch_once(
    saved_world: int, new_world: int, accumulation: int
) -> None:
    # 40 records in batches of 2 (20 batches); the saved run made 3 steps of `accumulation x saved_world`.
    steps = 3
    used, rest, after = _used_then_resumed(
        lambda r, w: ResumableSampler(list(range(1, 41)), 2, 0, rank=r, world_size=w), saved_world, new_world,
        accumulation, steps,
    )  # fmt: skip
    whole = ResumableSampler(list(range(1, 41)), 2, 0).order(0)
    # The first micro-batches of the epoch's order were used before, every later one after...
    assert sorted(used) == sorted(whole[: steps * accumulation * saved_world * 2])
    assert not set(used) & set(rest) and len(rest) == len(set(rest))
    # ... except the few the new number leaves out at the epoch's end so that all get as many.
    assert len(used) + len(rest) == 40 - after[0].dropped_per_epoch
    assert set(rest) == set(whole[len(used) : len(used) + len(rest)])


def test_a_token_budget_resume_on_another_number_of_processes_sees_each_record_once() -> None:
    from llavactl.data.dataset import TokenBudgetBatches

    lengths = [30 + (7 * i) % 50 for i in range(60)]
    used, rest, _ = _used_then_resumed(
        lambda r, w: TokenBudgetBatches(lengths, 160, 0, rank=r, world_size=w), 2, 1, 1, 4
    )
    whole = TokenBudgetBatches(lengths, 160, 0).batches(0)
    assert sorted(used) == sorted(i for b in whole[:8] for i in b)
    assert not set(used) & set(rest) and len(rest) == len(set(rest))
    assert sorted(used + rest) == sorted(i for b in whole for i in b)


def test_a_resume_whose_processes_had_used_the_whole_epoch_starts_the_next() -> None:
    # 2 processes x 5 batches each = the whole epoch of 20 records in batches of 2.
    used, rest, after = _used_then_resumed(
        lambda r, w: ResumableSampler(list(range(1, 21)), 2, 0, rank=r, world_size=w), 2, 1, 1, 5
    )
    assert sorted(used) == list(range(20))
    assert after[0].epoch == 1 and after[0].position == 0
    assert sorted(rest) == list(range(20))  # the next epoch, whole
