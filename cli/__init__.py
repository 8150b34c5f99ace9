"""The `rlhf` command: parse, call, print. Every command lives in the module of its concern."""
