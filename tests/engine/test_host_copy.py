"""Host -> device uploads (moeserve/host_copy.py)."""

import torch

from moeserve.host_copy import upload_int64


def test_upload_int64_views_start_16_bytes_aligned():
    # positions after an odd number of ids: Triton would compile another variant for a pointer that
    # is only 8-byte aligned, one no warm-up (whose tensors are fresh allocations) ever ran
    ids, positions, empty, tail = upload_int64([5, 6, 7], [0, 1, 2], [], [9], device="cpu")
    assert ids.tolist() == [5, 6, 7] and positions.tolist() == [0, 1, 2] and empty.numel() == 0
    assert tail.tolist() == [9]
    assert all(t.dtype == torch.int64 and t.storage_offset() % 2 == 0 for t in (ids, positions, empty, tail))
    assert ids.untyped_storage().data_ptr() == positions.untyped_storage().data_ptr()  # one upload
