"""Prints the differential fuzz's per-mode outcome table at the end of the session."""

from __future__ import annotations


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    from .test_differential_fuzz import SUMMARY

    for text in SUMMARY:
        terminalreporter.section("convbn soundness fuzz")
        terminalreporter.write_line(text)
