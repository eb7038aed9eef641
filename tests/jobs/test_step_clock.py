"""The first denoise's step times: one item, once, the others ignored."""

from __future__ import annotations

from fastvideo.jobs.step_clock import FirstDenoiseClock


def test_first_denoise_is_timed_once_and_logged() -> None:
    now = iter([0.0, 5.0, 6.5, 7.0, 7.5, 8.0, 100.0, 200.0])
    lines: list[str] = []
    clock = FirstDenoiseClock(log=lambda fmt, *args: lines.append(fmt % args),
                              clock=lambda: next(now))
    clock.start("a")
    clock.start("b")  # a later item: not timed
    clock.step("b", 1, 5)
    for step in range(1, 6):
        clock.step("a", step, 5)
    assert clock.steps_s == [5.0, 1.5, 0.5, 0.5, 0.5]
    assert lines == ["first denoise of this process: 5 steps in 8.00 s; steps 1-3 5.00, 1.50, "
                     "0.50 s; steps 4-5 median 0.500 s"]
    clock.start("c")
    clock.step("a", 5, 5)  # after the end: nothing more
    assert len(lines) == 1 and clock.steps_s == [5.0, 1.5, 0.5, 0.5, 0.5]


def test_a_short_denoise_logs_what_it_has() -> None:
    now = iter([0.0, 2.0, 3.0])
    lines: list[str] = []
    clock = FirstDenoiseClock(log=lambda fmt, *args: lines.append(fmt % args),
                              clock=lambda: next(now))
    clock.start("a")
    clock.step("a", 1, 2)
    clock.step("a", 2, 2)
    assert lines == ["first denoise of this process: 2 steps in 3.00 s; steps 1-3 2.00, 1.00 s"]


def test_a_denoise_without_its_last_step_leaves_the_clock_to_the_next_item() -> None:
    now = iter([0.0, 10.0, 12.0, 13.0])
    lines: list[str] = []
    clock = FirstDenoiseClock(log=lambda fmt, *args: lines.append(fmt % args),
                              clock=lambda: next(now))
    clock.start("made")  # found made: no steps
    clock.done("made")
    clock.start("next")
    clock.step("next", 1, 2)
    clock.step("next", 2, 2)
    clock.done("next")
    assert clock.steps_s == [2.0, 1.0] and len(lines) == 1
