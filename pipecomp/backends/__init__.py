"""Backends: where and when the stages of a compiled network run, never what they compute (semantics §7)."""
