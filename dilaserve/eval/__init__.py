"""Measuring decoding quality on checkable tasks, through the real engine."""
