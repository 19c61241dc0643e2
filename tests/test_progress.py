"""The one progress display: plain lines off a terminal (none for quick work, then one per interval and the last),
a rich bar on one, nothing when disabled."""

from __future__ import annotations

import io
import time

from vlmcompress.progress import Progress


def test_plain_lines_for_long_work_only():
    quick = io.StringIO()
    with Progress("quick", total=3, unit="steps", stream=quick, rich=False, plain_every=10) as bar:
        for _ in range(3):
            bar.update(advance=1, loss=0.5)
    assert quick.getvalue() == ""

    slow = io.StringIO()
    with Progress("training", total=4, unit="steps", stream=slow, rich=False, plain_every=0.05) as bar:
        for step in range(4):
            time.sleep(0.03)
            bar.update(advance=1, loss=1.0 / (step + 1), lr=1e-4)
    lines = slow.getvalue().splitlines()
    assert 2 <= len(lines) <= 3, lines
    assert lines[-1].startswith("training: 4/4 steps  loss 0.250  lr 0.0001")
    assert "ETA" in lines[0] and "ETA" not in lines[-1]


def test_rich_bar_and_disabled():
    out = io.StringIO()
    with Progress("bench", total=2, stream=out, rich=True) as bar:
        bar.update(advance=2, description="done")
    assert "done" in out.getvalue() and "2/2" in out.getvalue()
    silent = io.StringIO()
    with Progress("x", total=1, enabled=False, stream=silent, rich=True, plain_every=0) as bar:
        bar.update(advance=1)
    assert silent.getvalue() == ""


def test_a_display_inside_another_is_a_line_of_it():
    out = io.StringIO()
    with Progress("apply", total=2, unit="stages", stream=out, rich=True) as outer:
        with Progress("finetune", total=3, unit="steps", stream=out, rich=True) as inner:
            assert inner._bar is outer._bar  # no second live display (rich refuses one)
            inner.update(advance=3, loss=0.1)
            assert [t.description for t in outer._bar.tasks] == ["apply", "finetune"]
        assert [t.description for t in outer._bar.tasks] == ["apply"]  # the inner line is gone with its work
        outer.update(advance=2)
