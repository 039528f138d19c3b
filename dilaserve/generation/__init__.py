"""Decoding semantics shared by the reference generator and the engine."""
