"""Measuring: bytes saved for backward, peak live tensor bytes, interleaved timing."""
