"""megalong.log: the rank-aware log line and the rate-limited progress printer."""

import io

from megalong.log import ProgressPrinter, log


def test_log_prints_on_rank_zero_only(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    log("quiet")
    log("loud", every_rank=True)
    monkeypatch.setenv("RANK", "0")
    log("zero")
    assert capsys.readouterr().err == "[megalong] loud\n[megalong] zero\n"


def test_progress_printer_limits_the_rate_and_keeps_the_final_line():
    stream = io.StringIO()
    printer = ProgressPrinter(interval_s=3600, stream=stream)
    made = []
    for step in range(5):
        printer.update(lambda: made.append(step) or f"step {step}")
    printer.update("done", final=True)
    assert stream.getvalue() == "done\n" and not made  # lines are made only when printed
    every = io.StringIO()
    printer = ProgressPrinter(interval_s=0, stream=every)
    printer.update("a")
    printer.update("b")
    assert every.getvalue() == "a\nb\n"
    assert not ProgressPrinter(enabled=False).update("x", final=True)
