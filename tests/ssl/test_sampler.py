"""EpochSampler: a seeded shuffle per epoch, dealt to ranks, resumable part-way."""

from objcrop.ssl.sampler import EpochSampler


def test_order_depends_on_seed_and_epoch_only():
    a, b = EpochSampler(20, seed=3), EpochSampler(20, seed=3)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) and sorted(a) == list(range(20))
    b.set_epoch(2)
    assert list(a) != list(b)
    assert list(EpochSampler(20, seed=4)) != list(EpochSampler(20, seed=3))
    assert list(EpochSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def test_ranks_get_disjoint_equal_shares_without_the_remainder():
    shares = [list(EpochSampler(11, rank=r, world_size=3, seed=0)) for r in range(3)]
    assert [len(s) for s in shares] == [3, 3, 3]
    everything = [i for s in shares for i in s]
    assert len(set(everything)) == 9 and set(everything) <= set(range(11))


def test_start_resumes_part_way_through_the_epoch():
    sampler = EpochSampler(10, rank=1, world_size=2, seed=7)
    sampler.set_epoch(4)
    whole = list(sampler)
    sampler.set_epoch(4, start=3)
    assert list(sampler) == whole[3:] and len(sampler) == 2
    sampler.set_epoch(4, start=9)
    assert list(sampler) == [] and len(sampler) == 0
