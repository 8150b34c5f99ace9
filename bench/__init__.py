"""Benchmarks: side-by-side figures of the mesh against in-process peers (`rlhf bench ...`)."""
