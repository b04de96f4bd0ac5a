"""How a device's reports fold into its install status (pure, table-driven)."""

from __future__ import annotations

from typing import Any

import pytest

from server.rollout.core.states import InstallStatus
from server.rollout.service.signals import Progress, ReleaseMatch, fold_checkin, fold_event

S = InstallStatus


@pytest.mark.parametrize(
    ("events", "checkin", "expected"),
    [
        ([], None, Progress()),
        ([("update", "download", {"target": "models/digits/2/int8-cpu.tflite"})], None,
         Progress(S.DOWNLOADING, None, None, 1)),
        ([("update", "commit", {"target": "models/digits/2/edgetpu.tflite"})], None,
         Progress(S.INSTALLED, None, None, 1)),
        # Another release's report changes nothing but the cursor.
        ([("update", "commit", {"target": "models/digits/3/int8-cpu.tflite"})], None,
         Progress(S.PENDING, None, None, 1)),
        ([("update", "download", {"target": "models/digits/2/int8-cpu.tflite"}),
          ("update", "idle", {"target": "models/digits/2/int8-cpu.tflite", "reason": "no space"})],
         None, Progress(S.FAILED, "no space", None, 2)),
        ([("update", "rollback", {"target": "models/digits/2/int8-cpu.tflite"}),
          ("update", "idle", {"target": "models/digits/2/int8-cpu.tflite", "reason": "slow"})],
         ("digits", 2), Progress(S.ROLLED_BACK, "rolled back on the device", None, 2)),
        # A retry after a failure that commits counts as installed.
        ([("update", "idle", {"target": "models/digits/2/int8-cpu.tflite", "reason": "x"}),
          ("update", "download", {"target": "models/digits/2/int8-cpu.tflite"}),
          ("update", "commit", {"target": "models/digits/2/int8-cpu.tflite"})], None,
         Progress(S.INSTALLED, None, None, 3)),
        ([("download", "done", {"name": "digits", "release": 2})], ("digits", 2),
         Progress(S.INSTALLED, None, None, 1)),
        ([("golden_set", None, {"accuracy": 0.875, "release": 2})], None,
         Progress(S.PENDING, None, 0.875, 1)),
        # Garbage from a device is ignored, never an error.
        ([("golden_set", None, {"accuracy": True, "release": 2}),
          ("golden_set", None, {"accuracy": float("nan"), "release": 2}),
          ("golden_set", None, {"accuracy": 1.5, "release": 2}),
          ("golden_set", None, {"accuracy": 0.9, "release": "2"}),
          ("update", "commit", {"target": ["models/digits/2/x"]}),
          ("update", "commit", {}), ("update", None, {"target": 7})], None,
         Progress(S.PENDING, None, None, 7)),
    ],
)
def test_device_reports_fold_into_an_install_status(
    events: list[tuple[str, str | None, dict[str, Any]]],
    checkin: tuple[str, int] | None,
    expected: Progress,
) -> None:
    match = ReleaseMatch("digits", 2)
    progress = Progress()
    for event_id, (type_, state, detail) in enumerate(events, start=1):
        progress = fold_event(progress, event_id, type_, state, detail, match=match)
        # Reading the same event again changes nothing.
        assert fold_event(progress, event_id, type_, state, detail, match=match) == progress
    if checkin is not None:
        progress = fold_checkin(progress, *checkin, match)
    assert progress == expected
