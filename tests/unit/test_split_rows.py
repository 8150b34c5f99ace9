"""How a batch is cut into shards for replicas and data-parallel ranks."""

from controller.replicas import split_rows


def test_split_rows_is_contiguous_balanced_and_never_empty():
    assert split_rows(7, 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_rows(2, 4) == [[0], [1]]
    for n in range(1, 30):
        for parts in range(1, 6):
            shards = split_rows(n, parts)
            assert sum(shards, []) == list(range(n)) and all(shards)
            assert max(map(len, shards)) - min(map(len, shards)) <= 1
