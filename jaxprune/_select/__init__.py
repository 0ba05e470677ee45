"""The selection engine behind every mask: exact ``k``-lowest selection over leaves, by radix
select on the float bits, with index-order ties and counts sharded like the leaves.

Private: the public entry points are :func:`jaxprune.topk_mask` and :func:`jaxprune.lowest_k`.
What every selection guarantees, and why each XLA workaround is there, is in ``README.md`` next
to this file.
"""
from jaxprune._select.engine import lowest, lowest_each
from jaxprune._select.keys import to_keys
from jaxprune._select.sharded import shaped_like

__all__ = ["lowest", "lowest_each", "to_keys", "shaped_like"]
