"""The `rlhf` command: parse, call, print. Every command lives in the module of its concern."""

from services.cpus import set_passive_openmp

set_passive_openmp()  # before any command imports torch: OpenMP reads its wait policy when it loads
