"""Sparse storage (lowbit.formats.sparse): bitmask and kept values round-trip exactly, are used only
where smaller, and any stored part that does not fit its record is a FormatError."""

import zlib

import pytest
import torch

from lowbit.errors import FormatError
from lowbit.formats.sparse import decode_sparse, encode_sparse, stored_names


def _pruned(dtype, shape=(64, 128), share=0.5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=generator) * 40
    values[torch.rand(shape, generator=generator) < share] = 0
    return values.to(dtype)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.float32, torch.float16, torch.bfloat16])
def test_a_mostly_zero_tensor_round_trips_exactly_and_smaller(dtype):
    tensor = _pruned(dtype)
    stored, record = encode_sparse({"w": tensor})
    mask, values = stored_names("w")
    assert set(stored) == {mask, values} and record["w"]["kept"] == int((tensor != 0).sum())
    assert stored[mask].numel() + stored[values].numel() < tensor.numel() * tensor.element_size()
    assert torch.equal(decode_sparse("w", stored[mask], stored[values], record["w"]), tensor)


@pytest.mark.parametrize("tensor", [_pruned(torch.int8, share=0.05), _pruned(torch.int8, (8, 8), 0.9),
                                    torch.arange(10000).reshape(100, 100)])
def test_a_tensor_is_stored_whole_where_sparse_would_not_be_smaller(tensor):
    stored, record = encode_sparse({"w": tensor})
    assert record == {} and stored["w"] is tensor


def _deflated(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(zlib.compress(data)), dtype=torch.uint8)


@pytest.mark.parametrize(("change", "message"), [
    (lambda mask, values, entry: (mask, values, {**entry, "kept": entry["kept"] + 1}), "keeps|kept"),
    (lambda mask, values, entry: (mask, values[:-3], entry), "inflate|bytes"),
    (lambda mask, values, entry: (mask, _deflated(b"\0" * 10), entry), "bytes its record promises"),
    (lambda mask, values, entry: (values, mask, entry), "keeps|kept|bytes|inflate"),
    (lambda mask, values, entry: (mask, values, {**entry, "shape": [64, 129]}), "bytes its record"),
    (lambda mask, values, entry: (mask, values, {**entry, "kept": 10**12}), "keeps|kept"),
    (lambda mask, values, entry: (mask, values, {**entry, "shape": [2**50] * 8}), "kept values of"),
    (lambda mask, values, entry: (mask.view(torch.int8), values, entry), "deflated byte string"),
    (lambda mask, values, entry: (torch.cat([mask, mask]), values, entry), "bytes its record promises"),
    (lambda mask, values, entry: (_deflated(b"\xff" * 10**6), values, {**entry, "shape": [8, 8], "kept": 10}),
     "bytes its record promises"),  # inflates far past what the record allows: never more is read
])
def test_stored_parts_that_do_not_fit_their_record_are_refused(change, message):
    stored, record = encode_sparse({"w": _pruned(torch.int8)})
    mask, values, entry = change(*(stored[name] for name in stored_names("w")), record["w"])
    with pytest.raises(FormatError, match=message):
        decode_sparse("w", mask, values, entry)
