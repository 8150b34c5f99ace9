"""Seeds of sampling streams, shared by the policy service and the controller without importing a model."""

import hashlib


def row_seed(seed: int, row: int) -> int:
    """The seed of row `row`'s sampling stream under request seed `seed` (63 bits)."""
    digest = hashlib.blake2b(f"{seed}:{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
