import torch

from fromfeedback.data import QueryResponseBatch


def test_from_ids_pads_queries_left_and_responses_right():
    batch = QueryResponseBatch.from_ids([[5, 6, 7], [8]], [[9], [10, 11]], pad_id=0)
    assert batch.query_ids.tolist() == [[5, 6, 7], [0, 0, 8]] and batch.query_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch.response_ids.tolist() == [[9, 0], [10, 11]] and batch.response_lengths.tolist() == [1, 2]


def test_trim_drops_all_padding_columns():
    batch = QueryResponseBatch.from_ids([[5, 6, 7], [8], [9, 10]], [[11], [12, 13, 14], [15]], pad_id=0)
    trimmed, query_start, width = batch.select([1, 2]).trim()
    assert (query_start, width) == (1, 3)
    assert trimmed.query_ids.tolist() == [[0, 8], [9, 10]] and trimmed.response_ids.tolist() == [[12, 13, 14], [15, 0, 0]]
    _, query_start, width = batch.select([0, 2]).trim()
    assert (query_start, width) == (0, 1)


def test_shared_queries_take_each_query_once():
    batch = QueryResponseBatch.from_ids([[5, 6]] * 3 + [[7]] * 3, [[1], [2], [3], [4], [5], [6]], pad_id=0)
    queries, query_mask, query_of_row = batch.shared_queries(3)
    assert queries.tolist() == [[5, 6], [0, 7]] and query_mask.tolist() == [[1, 1], [0, 1]]
    assert query_of_row.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(batch.shared_queries(1)[0], batch.query_ids)
