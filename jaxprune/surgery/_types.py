"""What tracing found: :class:`ChannelGroup` and :class:`Member`, and the refusal reasons."""
from __future__ import annotations

import dataclasses

import numpy as np

INPUT = "is an axis of an input of fn (input features never change)"
OUTPUT = "is an axis of fn's output (outputs never change)"
SINGLE = "has a single channel"
UNMASKED = "none of its leaves is chosen by `where`, so no mask can remove its channels"
WINDOW = "is an axis that `conv_general_dilated` slides its window along"
FIXED_REASONS = (INPUT, OUTPUT, SINGLE, UNMASKED, WINDOW)
# axes that are positions (space, time), not channels: never shrunk, whatever the masks say
POSITION_PREFIXES = ("is pooled over by", "is scanned over by")


def is_fixed(reasons) -> bool:
  return bool(reasons) and (INPUT in reasons or OUTPUT in reasons or all(
      w in FIXED_REASONS or w.startswith(POSITION_PREFIXES) for w in reasons))


# ----------------------------------------------------------------------------- public types

@dataclasses.dataclass(frozen=True, eq=False)
class Member:
  """One parameter axis (or a part of it) inside a :class:`ChannelGroup`.

  Attributes:
    path: the leaf's path, e.g. ``"layers/0/kernel"``.
    axis: the leaf's axis.
    index: int array of the axis' length: the group channel at each position, ``-1`` where the
      position belongs to another group (e.g. one gate's slice of a GRU kernel).
    masked: whether ``where`` chose this leaf, i.e. whether masks remove its entries.
  """
  path: str
  axis: int
  index: np.ndarray
  masked: bool

  def __str__(self):
    return f"{self.path} axis {self.axis}{describe_index(self.index)}"


@dataclasses.dataclass(frozen=True, eq=False)
class ChannelGroup:
  """Parameter axes whose channels must be removed together, as tracing found them.

  Attributes:
    name: ``"path:axis"`` of its most telling member (a kernel's output axis if it has one).
    size: the number of channels.
    members: the :class:`Member` axes, in the params' flatten order.
    prunable: whether :func:`shrink` may remove its channels.
    reasons: why it is not prunable (empty when it is).
    fixed: not prunable by design (an input/output axis, a spatial or time axis, one channel,
      no masked leaf) rather than refused by tracing; :func:`shrink` keeps such a group whatever
      the masks say, while masks that remove channels of a refused group are an error.
  """
  name: str
  size: int
  members: tuple[Member, ...]
  prunable: bool
  reasons: tuple[str, ...] = ()
  fixed: bool = False

  def __str__(self):
    head = f"{self.name} ({self.size} channels, " + (
        "prunable)" if self.prunable else "not prunable: " + "; ".join(self.reasons) + ")")
    return "\n  ".join([head] + [("* " if m.masked else "  ") + str(m) for m in self.members])


def describe_index(index: np.ndarray) -> str:
  n = len(index)
  pos = np.nonzero(index >= 0)[0]
  if len(pos) == n and np.array_equal(index, np.arange(n)):
    return ""
  if (len(pos) and np.array_equal(pos, np.arange(pos[0], pos[0] + len(pos)))
      and np.array_equal(index[pos], np.arange(len(pos)))):
    return f" [{pos[0]}:{pos[-1] + 1}]"
  shown = ", ".join(str(int(c)) if c >= 0 else "-" for c in index[:8])
  return f" channel per position [{shown}{', ...' if n > 8 else ''}]"

