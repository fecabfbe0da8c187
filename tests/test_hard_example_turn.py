"""The demo's hard-example turn keeps its held-out rows out of training."""

from __future__ import annotations

import numpy as np

from fogline.hard_example_turn import without_rows


def test_hard_examples_of_held_out_rows_are_left_out_with_their_labels() -> None:
    rows = np.arange(12, dtype=np.float32).reshape(4, 3)
    hard = {"input": rows[[0, 2, 3, 2]], "labels": np.array([10, 12, 13, 22])}
    kept, dropped = without_rows(hard, "input", rows[2:3].astype(np.float64))
    assert dropped == 2  # the same row, escalated twice
    assert kept["input"].tolist() == [rows[0].tolist(), rows[3].tolist()]
    assert kept["labels"].tolist() == [10, 13]


def test_nothing_held_out_keeps_everything() -> None:
    hard = {"input": np.ones((3, 2), dtype=np.float32), "labels": np.arange(3)}
    kept, dropped = without_rows(hard, "input", np.zeros((0, 2), dtype=np.float32))
    assert dropped == 0 and kept["labels"].tolist() == [0, 1, 2]
