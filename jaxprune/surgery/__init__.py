"""Layer 7 — surgery: turn a structured mask into a physically smaller model.

The couplings between parameter axes are read from the model's own computation: the function
``fn(params, *inputs)`` is traced to a jaxpr (``jax.make_jaxpr``) and every axis of every value
is followed through its equations. Axes that must keep the same channels are merged (union-find):
a Dense kernel's output units with its bias and with the next kernel's input rows (a contraction
in ``dot_general``), a Conv's output channels with BatchNorm's scale/bias/mean/var (elementwise
ops and ``broadcast_in_dim``) and with the next Conv's input channels (``conv_general_dilated``),
both sides of a residual ``add``, a GRU's hidden units across the gate slices of its kernels
(``split``/``slice``/``concatenate`` make an axis a sequence of parts) and its recurrent kernel
(``scan`` carries), and attention heads across the q/k/v/out projections (batch dimensions of
``dot_general``; a ``reshape`` that splits ``heads*head_dim`` makes the axis a product of parts).
Each resulting atom is a :class:`ChannelGroup`: a set of ``(param path, axis)`` members whose
channels are removed together.

The contract. ``masks`` (a mask tree like ``params``, see :func:`jaxprune.apply_masks`) removes
channel ``j`` of a group when every member leaf chosen by ``where`` (the leaves masks apply to;
default: floating leaves with ``ndim >= 2``, i.e. kernels) has all of its entries at ``j``
masked. Members not chosen by ``where`` (biases, BatchNorm statistics) follow the group. Then
``fn(shrink(fn, params, masks, x), x) == fn(apply_masks(params, masks), x)`` for every ``x``.
This holds because a group is only called prunable when tracing proves that, in the masked model,
each removed channel contributes exactly zero: every place that sums over the channel
(a contraction, ``reduce_sum``, ``cumsum``) multiplies it by a masked weight or by a value that
masking made exactly zero (tracked through the ops that keep zeros: ``mul``, ``relu``, ``tanh``,
``x - mean`` with both masked, ...). E.g. Dense→ReLU→Dense with only kernels masked: the hidden
unit still carries ``relu(b_j)``, but the next kernel's row ``j`` is masked, so it adds nothing.
A GRU unit whose kernel columns and recurrent rows are masked still updates its own state, but
nothing reads it. A head whose q/k/v kernels are masked attends uniformly to zero values.

Refused (reported with a reason, never guessed): groups that reach ``fn``'s inputs or outputs
(input features, logits), that touch an array ``fn`` closes over instead of taking in
``params``, that are reduced with ``max``/``argmax``/``sort`` or summed without a masked factor
(LayerNorm over hidden channels), reshaped across (``(6, 4) -> (4, 6)``), gathered, padded,
reversed or sliced with a stride along, or that pass through a primitive this module does not
know. Finally every prunable group is *probed*: ``fn`` is traced again with the group one channel
smaller; if that fails, or the program differs in a constant (``1/sqrt(head_dim)``, a mean's
``1/n``), the group is refused too: ``fn`` depends on the axis' size, not only on its values.
``shrink`` also checks the equality above on the example inputs (``verify=True``).

Dropout and other randomness must be off (``fn`` deterministic); Conv with
``feature_group_count > 1`` is supported only where ``fn`` derives the group count from shapes.

The package, one concept per module (see README.md next to this file):

* ``_types``: :class:`ChannelGroup`, :class:`Member` and the refusal reasons;
* ``_classes``: the coupling graph, a union-find over axis classes;
* ``_interp``: the surgery interpreter (on :mod:`jaxprune._jaxpr`) and its rule registry;
* ``_rules``, ``_rules_shape``, ``_rules_control``: one small rule per primitive;
* ``_analysis``: :func:`channel_groups` (trace, walk, probe);
* ``_groups``: :func:`group_scores`, :func:`group_masks`;
* ``_shrink``: :func:`shrink`;
* ``_nnx``: :func:`module_fn`, :func:`shrink_module`, :func:`register_layer` (Flax NNX).
"""
from jaxprune.surgery._analysis import channel_groups
from jaxprune.surgery._groups import group_masks, group_scores
from jaxprune.surgery._nnx import module_fn, register_layer, shrink_module
from jaxprune.surgery._shrink import shrink
from jaxprune.surgery._types import ChannelGroup, Member

__all__ = ["ChannelGroup", "Member", "channel_groups", "group_scores", "group_masks", "shrink",
           "module_fn", "shrink_module", "register_layer"]

# documented as jaxprune.surgery.<name> (and their doctests collected once, here), as jax does
for _fn in (channel_groups, group_scores, group_masks, shrink, module_fn, shrink_module,
            register_layer):
  _fn.__module__ = __name__
del _fn
