"""Soundness tests: one intra-op thread (tiny tensors; threads only add overhead), and the differential
fuzz's per-mode outcome table printed at the end of the session."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    from .test_differential_fuzz import SUMMARY

    for text in SUMMARY:
        terminalreporter.section("convbn soundness fuzz")
        terminalreporter.write_line(text)
