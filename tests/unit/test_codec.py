"""The wire contract: the codec round-trips tensors exactly and rejects garbage naming the field."""

import pytest
import torch

from rlhf.v1 import tensor_pb2
from services import codec
from services.batch import ModelLimits, Sequences
from services.errors import InvalidArgument


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float32, torch.float16, torch.bfloat16])
def test_tensor_round_trip_is_exact(dtype):
    t = (torch.randn(3, 5) * 100).to(dtype)
    back = codec.tensor_from_pb(codec.tensor_to_pb(t), "t")
    assert back.dtype == dtype and back.shape == t.shape and torch.equal(back, t)


def test_raw_bytes_are_little_endian():
    pb = codec.tensor_to_pb(torch.tensor([1, 256], dtype=torch.int32))
    assert pb.raw == b"\x01\x00\x00\x00\x00\x01\x00\x00" and pb.dtype == tensor_pb2.DTYPE_INT32


def test_ragged_round_trip_keeps_rows_and_empty_rows():
    rows = [torch.tensor([1.0, 2.0]), torch.tensor([]), torch.tensor([3.0])]
    pb = codec.ragged_to_pb(rows, torch.float32)
    assert list(pb.lengths) == [2, 0, 1]
    assert [r.tolist() for r in codec.ragged_from_pb(pb, "x")] == [[1.0, 2.0], [], [3.0]]


def test_token_rows_travel_as_uint16_below_65536_and_int32_above():
    small = [torch.tensor([0, 65535, 7]), torch.tensor([], dtype=torch.long), torch.tensor([300])]
    pb = codec.token_rows_to_pb(small)
    assert pb.values.dtype == tensor_pb2.DTYPE_UINT16 and len(pb.values.raw) == 2 * 4
    back = codec.ragged_from_pb(pb, "tokens", allowed=codec.INT_DTYPES)
    assert [r.tolist() for r in back] == [[0, 65535, 7], [], [300]] and back[0].dtype == torch.int32
    large = codec.token_rows_to_pb([torch.tensor([1, 65536])])
    assert large.values.dtype == tensor_pb2.DTYPE_INT32
    assert codec.ragged_from_pb(large, "tokens")[0].tolist() == [1, 65536]


def test_decoder_names_the_field_of_each_problem():
    good = codec.ragged_to_pb([torch.tensor([1, 2], dtype=torch.int32)])
    cases = []
    bad = tensor_pb2.RaggedTensor()
    bad.CopyFrom(good)
    bad.lengths[:] = [3]
    cases.append((bad, "x.lengths", "add up"))
    bad = tensor_pb2.RaggedTensor()
    bad.CopyFrom(good)
    bad.values.dtype = 0
    cases.append((bad, "x.values.dtype", "unspecified"))
    bad = tensor_pb2.RaggedTensor()
    bad.CopyFrom(good)
    bad.values.raw = b"\x00" * 7
    cases.append((bad, "x.values.raw", "bytes"))
    cases.append((tensor_pb2.RaggedTensor(), "x.lengths", "empty batch"))
    for pb, field, words in cases:
        with pytest.raises(InvalidArgument, match=words) as caught:
            codec.ragged_from_pb(pb, "x", allowed=codec.INT_DTYPES)
        assert caught.value.field == field


def test_non_finite_floats_are_rejected_where_required():
    pb = codec.ragged_to_pb([torch.tensor([1.0, float("inf")])])
    with pytest.raises(InvalidArgument, match="NaN or infinity"):
        codec.float_rows_from_pb(pb, "advantages", [2])
    with pytest.raises(InvalidArgument, match="one value per response token"):
        codec.float_rows_from_pb(codec.ragged_to_pb([torch.tensor([1.0])]), "advantages", [2])


def test_sequences_padded_layout_points_at_response_predictions():
    seqs = Sequences([torch.tensor([5, 6, 7, 8]), torch.tensor([5, 9, 10])], [2, 1])
    ids, attention, index, mask = seqs.padded(pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8], [5, 9, 10, 0]] and attention.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    # response of row 0 is [7, 8], predicted from positions 1 and 2; row 1 is [9, 10] from 0 and 1
    assert index.tolist() == [[1, 2], [0, 1]] and mask.tolist() == [[1, 1], [1, 1]]
    limits = ModelLimits(vocab_size=11, max_length=4)
    with pytest.raises(InvalidArgument, match="prompt_lengths"):
        Sequences.from_pb(Sequences([torch.tensor([1, 2])], [2]).to_pb(), "s", limits)
    with pytest.raises(InvalidArgument, match="outside the vocabulary"):
        Sequences.from_pb(Sequences([torch.tensor([1, 11])], [1]).to_pb(), "s", limits)
    with pytest.raises(InvalidArgument, match="limit of 4"):
        Sequences.from_pb(Sequences([torch.tensor([1, 2, 3, 4, 5])], [1]).to_pb(), "s", limits)
