"""Small Flax NNX classifiers for the experiments: MLP, CNN, RNN, ResNet, Transformer.

Every model is built for one input shape (without the batch axis) and maps a batch
``x: float32 (B, *input_shape)`` to logits ``(B, num_classes)``:

* sequences ``(L,)`` or ``(L, C)`` (MNIST-1D: ``(40,)``) and images ``(H, W, C)`` (MNIST:
  ``(28, 28, 1)``); the CNN and the ResNet use 1-D convolutions for sequences and 2-D ones for
  images, the RNN reads images row by row, the Transformer cuts either into patches.
* Build any of them with :func:`create_model`.

Train and eval mode
-------------------
Calls take only the input: ``model(x)``. As in flax 0.12.8, the mode is an attribute of the
layers that have one (``BatchNorm.use_running_average``, ``Dropout.deterministic``), and every
model here is built in **train mode** (batch statistics used and updated). Get the other mode
with a *view* (flax's recommended way; shares every ``Variable`` with ``model``)::

    eval_model = models.eval_view(model)    # nnx.view(model, use_running_average=True, ...)
    train_model = models.train_view(model)

or flip the model in place with ``model.eval()`` / ``model.train()``. Train through the train
view and evaluate through the eval view; BatchNorm's running statistics (``nnx.BatchStat``) are
updated only by calls in train mode.

Parameter paths (``nnx.state(model, nnx.Param)``) look like ``layers/0/kernel``,
``convs/1/kernel``, ``head/kernel``: weight matrices and conv kernels have ``ndim >= 2`` (the
leaves jaxprune prunes by default); biases, norms' scales and the position embedding of the
Transformer are separate leaves (the last has ``ndim == 2`` and is named ``pos_embed``).

The defaults are small (8k-70k parameters). A jitted Adam step on an MNIST-1D batch of 128,
measured on a busy 2-core CPU: MLP ~1-3 ms, CNN ~2-7 ms, RNN/ResNet ~15-25 ms, Transformer
~27-39 ms. The default MLP and CNN are the MNIST-1D paper's; with Adam (lr 1e-2, batch 128)
they reach ~66-67% and ~96% test accuracy within 2000-4000 steps (paper: 68% and 94%).

References:
  Greydanus & Kobak, "Scaling Down Deep Learning with MNIST-1D", ICML 2024 (MLP and CNN
  sizes), https://arxiv.org/abs/2011.14439
  He et al., "Deep Residual Learning for Image Recognition", CVPR 2016.
  Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021 (patch embedding).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "CNN", "MLP", "MODELS", "RNN", "ResNet", "Transformer", "create_model", "eval_view",
    "train_view", "DecoderBlock", "DecoderLM",
]

_BN_MOMENTUM = 0.9  # short runs: running stats must track the weights within ~tens of steps


def train_view(model: nnx.Module) -> nnx.Module:
  """A view of ``model`` in train mode (batch statistics, dropout on); shares its Variables.

  Examples:
    >>> from flax import nnx
    >>> from train import models
    >>> m = models.create_model("cnn", input_shape=(40,), num_classes=10, rngs=nnx.Rngs(0))
    >>> models.train_view(models.eval_view(m)).bns[0].use_running_average
    False
  """
  return nnx.view(model, use_running_average=False, deterministic=False,
                  raise_if_not_found=False)


def eval_view(model: nnx.Module) -> nnx.Module:
  """A view of ``model`` in eval mode (running statistics, dropout off); shares its Variables.

  Examples:
    >>> from flax import nnx
    >>> from train import models
    >>> m = models.create_model("cnn", input_shape=(40,), num_classes=10, rngs=nnx.Rngs(0))
    >>> e = models.eval_view(m)
    >>> e.bns[0].use_running_average, m.bns[0].use_running_average, e.head.kernel is m.head.kernel
    (True, False, True)
  """
  return nnx.view(model, use_running_average=True, deterministic=True,
                  raise_if_not_found=False)


def _check_shape(model: str, input_shape: Sequence[int], ranks: Sequence[int]) -> tuple[int, ...]:
  shape = tuple(int(d) for d in input_shape)
  if len(shape) not in ranks or any(d < 1 for d in shape):
    raise ValueError(f"{model}/input_shape: expected {' or '.join(map(str, ranks))} positive "
                     f"dims, got {tuple(input_shape)}")
  return shape


def _channels_last(x: jax.Array, input_shape: tuple[int, ...]) -> jax.Array:
  """(B, L) -> (B, L, 1); (B, L, C) and (B, H, W, C) unchanged."""
  return x[..., None] if len(input_shape) == 1 else x


def _conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
  return (size + 2 * pad - kernel) // stride + 1


class MLP(nnx.Module):
  """Fully connected ReLU network on the flattened input.

  Default: two hidden layers of 100, as in the MNIST-1D paper (about 68% test accuracy there).

  Args:
    input_shape: example shape without the batch axis; any rank.
    num_classes: number of logits.
    hidden: widths of the hidden layers.
    rngs: initialization keys.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from train import models
    >>> m = models.MLP((40,), 10, rngs=nnx.Rngs(0))
    >>> m(jnp.zeros((3, 40))).shape
    (3, 10)
  """

  def __init__(self, input_shape: Sequence[int], num_classes: int, *,
               hidden: Sequence[int] = (100, 100), rngs: nnx.Rngs):
    shape = _check_shape("mlp", input_shape, ranks=(1, 2, 3))
    widths = [math.prod(shape), *hidden]
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(widths)])
    self.head = nnx.Linear(widths[-1], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    for layer in self.layers:
      x = nnx.relu(layer(x))
    return self.head(x)


class CNN(nnx.Module):
  """Strided conv -> BatchNorm -> ReLU stack, flattened, then one linear head.

  1-D convolutions for sequences ``(L,)``/``(L, C)``, 2-D for images ``(H, W, C)``. Default:
  the MNIST-1D paper's CNN (3 convs of 32 channels, kernels 5, 3, 3, stride 2, padding 1) with
  BatchNorm added.

  Args:
    input_shape: ``(L,)``, ``(L, C)`` or ``(H, W, C)``.
    num_classes: number of logits.
    features: channels of each conv.
    kernel_sizes: kernel size of each conv (same length as ``features``).
    stride: stride of every conv.
    rngs: initialization keys.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from train import models
    >>> models.CNN((40,), 10, rngs=nnx.Rngs(0))(jnp.zeros((3, 40))).shape
    (3, 10)
    >>> models.CNN((28, 28, 1), 10, rngs=nnx.Rngs(0))(jnp.zeros((3, 28, 28, 1))).shape
    (3, 10)
  """

  def __init__(self, input_shape: Sequence[int], num_classes: int, *,
               features: Sequence[int] = (32, 32, 32), kernel_sizes: Sequence[int] = (5, 3, 3),
               stride: int = 2, rngs: nnx.Rngs):
    shape = _check_shape("cnn", input_shape, ranks=(1, 2, 3))
    if len(features) != len(kernel_sizes) or not features:
      raise ValueError(f"cnn/kernel_sizes: need one per feature, got {kernel_sizes} for "
                       f"{features}")
    self.input_shape = shape
    spatial = list(shape[:-1]) if len(shape) > 1 else [shape[0]]
    ndim = len(spatial)
    channels = [1 if len(shape) == 1 else shape[-1], *features]
    convs, bns = [], []
    for (cin, cout), k in zip(itertools.pairwise(channels), kernel_sizes, strict=True):
      convs.append(nnx.Conv(cin, cout, (k,) * ndim, (stride,) * ndim, padding=((1, 1),) * ndim,
                            use_bias=False, rngs=rngs))
      bns.append(nnx.BatchNorm(cout, momentum=_BN_MOMENTUM, rngs=rngs))
      spatial = [_conv_out(s, k, stride, 1) for s in spatial]
      if min(spatial) < 1:
        raise ValueError(f"cnn/input_shape: {shape} is too small for {len(features)} convs")
    self.convs = nnx.List(convs)
    self.bns = nnx.List(bns)
    self.head = nnx.Linear(math.prod(spatial) * channels[-1], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = _channels_last(x, self.input_shape)
    for conv, bn in zip(self.convs, self.bns, strict=True):
      x = nnx.relu(bn(conv(x)))
    return self.head(x.reshape(x.shape[0], -1))


class RNN(nnx.Module):
  """A recurrent cell over the sequence; classifies from the last hidden state.

  Sequences ``(L,)`` are read one sample per step, ``(L, C)`` one C-vector per step, images
  ``(H, W, C)`` one row (``W * C`` values) per step.

  Args:
    input_shape: ``(L,)``, ``(L, C)`` or ``(H, W, C)``.
    num_classes: number of logits.
    hidden: hidden size of the cell.
    cell: ``"gru"`` (default) or ``"lstm"``.
    rngs: initialization keys.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from train import models
    >>> models.RNN((40,), 10, cell="lstm", rngs=nnx.Rngs(0))(jnp.zeros((3, 40))).shape
    (3, 10)
  """

  def __init__(self, input_shape: Sequence[int], num_classes: int, *, hidden: int = 64,
               cell: str = "gru", rngs: nnx.Rngs):
    shape = _check_shape("rnn", input_shape, ranks=(1, 2, 3))
    cells = {"gru": nnx.GRUCell, "lstm": nnx.LSTMCell}
    if cell not in cells:
      raise ValueError(f"rnn/cell: must be one of {sorted(cells)}, got {cell!r}")
    self.input_shape = shape
    in_features = 1 if len(shape) == 1 else math.prod(shape[1:])
    self.cell_type = cell
    # rngs=False: the carry starts at zeros (built in __call__), so no RNG state is kept.
    self.rnn = nnx.RNN(cells[cell](in_features, hidden, rngs=rngs), rngs=False)
    self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

  @property
  def hidden(self) -> int:
    """The cell's hidden size (``cell.hidden_features``; smaller after surgery)."""
    return self.rnn.cell.hidden_features

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], x.shape[1], -1)  # (B, steps, features)
    # The carry's size comes from the cell, which jaxprune.surgery.shrink_module (and the
    # functions of surgery.module_fn) keep in step with its kernels: hidden units can shrink.
    zeros = jnp.zeros((x.shape[0], self.rnn.cell.hidden_features), x.dtype)
    carry = (zeros, zeros) if self.cell_type == "lstm" else zeros  # LSTM: (c, h)
    h = self.rnn(x, initial_carry=carry)  # (B, steps, hidden)
    return self.head(h[:, -1])


class _ResBlock(nnx.Module):
  """conv-BN-ReLU-conv-BN plus a (projected) shortcut, then ReLU."""

  def __init__(self, cin: int, cout: int, stride: int, ndim: int, *, rngs: nnx.Rngs):
    k = (3,) * ndim
    self.conv1 = nnx.Conv(cin, cout, k, (stride,) * ndim, use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(cout, momentum=_BN_MOMENTUM, rngs=rngs)
    self.conv2 = nnx.Conv(cout, cout, k, use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(cout, momentum=_BN_MOMENTUM, rngs=rngs)
    if stride != 1 or cin != cout:
      self.proj = nnx.Conv(cin, cout, (1,) * ndim, (stride,) * ndim, use_bias=False, rngs=rngs)
      self.proj_bn = nnx.BatchNorm(cout, momentum=_BN_MOMENTUM, rngs=rngs)
    else:
      self.proj = self.proj_bn = None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    shortcut = x if self.proj is None else self.proj_bn(self.proj(x))
    return nnx.relu(y + shortcut)


class ResNet(nnx.Module):
  """A small ResNet: conv stem, one residual block per stage, global average pool, head.

  1-D for sequences, 2-D for images. Each stage after the first halves the resolution.

  Args:
    input_shape: ``(L,)``, ``(L, C)`` or ``(H, W, C)``.
    num_classes: number of logits.
    widths: channels of each stage (the stem has ``widths[0]``).
    blocks_per_stage: residual blocks in each stage.
    rngs: initialization keys.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from train import models
    >>> models.ResNet((40,), 10, rngs=nnx.Rngs(0))(jnp.zeros((3, 40))).shape
    (3, 10)
  """

  def __init__(self, input_shape: Sequence[int], num_classes: int, *,
               widths: Sequence[int] = (16, 32, 64), blocks_per_stage: int = 1,
               rngs: nnx.Rngs):
    shape = _check_shape("resnet", input_shape, ranks=(1, 2, 3))
    if not widths or blocks_per_stage < 1:
      raise ValueError(f"resnet/widths: need >= 1 stage and block, got {widths}, "
                       f"{blocks_per_stage}")
    self.input_shape = shape
    ndim = 2 if len(shape) == 3 else 1
    cin = 1 if len(shape) == 1 else shape[-1]
    self.stem = nnx.Conv(cin, widths[0], (3,) * ndim, use_bias=False, rngs=rngs)
    self.stem_bn = nnx.BatchNorm(widths[0], momentum=_BN_MOMENTUM, rngs=rngs)
    blocks, c = [], widths[0]
    for i, w in enumerate(widths):
      for j in range(blocks_per_stage):
        blocks.append(_ResBlock(c, w, 2 if (i > 0 and j == 0) else 1, ndim, rngs=rngs))
        c = w
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(c, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = _channels_last(x, self.input_shape)
    x = nnx.relu(self.stem_bn(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    return self.head(x.mean(axis=tuple(range(1, x.ndim - 1))))


class _PreLNBlock(nnx.Module):
  """Pre-LayerNorm block: ``x + attn(LN(x))``, then ``x + W₂ gelu(W₁ LN(x))``; subclasses say
  which attention (``_attention``, built between ``ln1`` and ``ln2`` so the init order of the
  parameters, and so their values, is the same for every block kind)."""

  def __init__(self, dim: int, num_heads: int, mlp_ratio: int, *, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = self._attention(dim, num_heads, rngs)
    self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
    self.fc1 = nnx.Linear(dim, mlp_ratio * dim, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_ratio * dim, dim, rngs=rngs)

  def _attention(self, dim: int, num_heads: int, rngs: nnx.Rngs) -> nnx.Module:
    raise NotImplementedError

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln1(x))
    return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))


class _EncoderBlock(_PreLNBlock):
  """Pre-LayerNorm encoder block (bidirectional ``nnx.MultiHeadAttention``)."""

  def _attention(self, dim, num_heads, rngs):
    return nnx.MultiHeadAttention(num_heads, dim, decode=False, keep_rngs=False, rngs=rngs)


class Transformer(nnx.Module):
  """A small encoder: patch embedding, learned positions, pre-LN blocks, mean-pool, head.

  Sequences ``(L,)``/``(L, C)`` are cut into ``L // patch`` patches of ``patch`` samples,
  images into ``(H // patch) * (W // patch)`` squares; ``L`` (``H``, ``W``) must be a
  multiple of ``patch``.

  Args:
    input_shape: ``(L,)``, ``(L, C)`` or ``(H, W, C)``.
    num_classes: number of logits.
    patch: patch length (side for images).
    dim: token width.
    depth: number of blocks.
    num_heads: attention heads (must divide ``dim``).
    mlp_ratio: hidden width of the block MLP over ``dim``.
    rngs: initialization keys.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from train import models
    >>> models.Transformer((40,), 10, rngs=nnx.Rngs(0))(jnp.zeros((3, 40))).shape
    (3, 10)
  """

  def __init__(self, input_shape: Sequence[int], num_classes: int, *, patch: int = 4,
               dim: int = 64, depth: int = 2, num_heads: int = 4, mlp_ratio: int = 2,
               rngs: nnx.Rngs):
    shape = _check_shape("transformer", input_shape, ranks=(1, 2, 3))
    spatial = shape[:2] if len(shape) == 3 else shape[:1]
    if any(s % patch for s in spatial):
      raise ValueError(f"transformer/patch: {patch} does not divide the input's {spatial}")
    if dim % num_heads:
      raise ValueError(f"transformer/num_heads: {num_heads} does not divide dim={dim}")
    self.input_shape = shape
    self.patch = patch
    channels = 1 if len(shape) == 1 else shape[-1]
    num_tokens = math.prod(s // patch for s in spatial)
    self.embed = nnx.Linear(patch ** len(spatial) * channels, dim, rngs=rngs)
    self.pos_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (num_tokens, dim)))
    self.blocks = nnx.List([_EncoderBlock(dim, num_heads, mlp_ratio, rngs=rngs)
                            for _ in range(depth)])
    self.ln = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, num_classes, rngs=rngs)

  def _patches(self, x: jax.Array) -> jax.Array:
    b, p = x.shape[0], self.patch
    x = _channels_last(x, self.input_shape)
    if x.ndim == 3:  # (B, L, C) -> (B, L/p, p*C)
      return x.reshape(b, x.shape[1] // p, p * x.shape[2])
    _, h, w, c = x.shape  # (B, H, W, C) -> (B, H/p * W/p, p*p*C)
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.embed(self._patches(x)) + self.pos_embed[...][None]
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln(x).mean(axis=1))


MODELS: dict[str, type[nnx.Module]] = {
    "mlp": MLP, "cnn": CNN, "rnn": RNN, "resnet": ResNet, "transformer": Transformer,
}
"""Model classes by the name :func:`create_model` takes."""


def create_model(name: str, *, input_shape: Sequence[int], num_classes: int, rngs: nnx.Rngs,
                 **kwargs: Any) -> nnx.Module:
  """Builds one of :data:`MODELS` (``mlp``, ``cnn``, ``rnn``, ``resnet``, ``transformer``).

  Args:
    name: model name.
    input_shape: one example's shape without the batch axis (``Metadata.input_shape`` of
      :func:`train.input_pipeline.get_datasets`).
    num_classes: number of logits.
    rngs: initialization keys, e.g. ``nnx.Rngs(0)``.
    **kwargs: the model's own options (e.g. ``hidden=(256,)`` for ``mlp``, ``cell="lstm"``
      for ``rnn``).

  Returns:
    The model, in train mode (see :func:`eval_view`).

  Raises:
    ValueError: unknown name or an input shape the model cannot take.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from train import models
    >>> m = models.create_model("mlp", input_shape=(40,), num_classes=10, rngs=nnx.Rngs(0),
    ...                         hidden=(32,))
    >>> m(jnp.zeros((2, 40))).shape
    (2, 10)
  """
  if name not in MODELS:
    raise ValueError(f"name: unknown model {name!r}; expected one of {sorted(MODELS)}")
  return MODELS[name](tuple(input_shape), num_classes, rngs=rngs, **kwargs)



# ----------------------------------------------------------------------------- language model


class _CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention with four ``(dim, dim)`` projections (``nnx.Linear``
  kernels ``(in, out)``, so N:M pruning runs along each projection's inputs)."""

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.query = nnx.Linear(dim, dim, rngs=rngs)
    self.key = nnx.Linear(dim, dim, rngs=rngs)
    self.value = nnx.Linear(dim, dim, rngs=rngs)
    self.out = nnx.Linear(dim, dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    heads = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
    y = jax.nn.dot_product_attention(heads(self.query(x)), heads(self.key(x)),
                                     heads(self.value(x)), is_causal=True)
    return self.out(y.reshape(b, t, d))


class DecoderBlock(_PreLNBlock):
  """Pre-LayerNorm decoder block: ``x + attn(LN(x))`` with causal self-attention, then
  ``x + W₂ gelu(W₁ LN(x))``."""

  def _attention(self, dim, num_heads, rngs):
    return _CausalSelfAttention(dim, num_heads, rngs=rngs)


class DecoderLM(nnx.Module):
  """A byte-level decoder-only transformer language model (GPT-2 style, pre-LayerNorm, GELU).

  ``tokens: int32 (B, T)`` with ``T <= context`` → next-token logits ``(B, T, vocab)``.
  Learned token and position embeddings, ``depth`` :class:`DecoderBlock` s, a final LayerNorm
  and an untied ``head``. The three stages are also methods, so the blocks can be pruned one at
  a time (:func:`jaxprune.sequential`): ``embed_tokens(tokens)`` → each ``blocks[i](x)`` →
  ``logits(x)``.

  Parameter paths: ``embed/embedding``, ``pos_embed``, ``blocks/{i}/attn/{query,key,value,out}/
  kernel``, ``blocks/{i}/fc1/kernel``, ``blocks/{i}/fc2/kernel``, ``head/kernel`` (+ biases and
  LayerNorm scales).

  Args:
    vocab: vocabulary size (256 for bytes).
    context: the longest sequence (size of the position embedding).
    dim: width.
    depth: number of blocks.
    num_heads: attention heads (must divide ``dim``).
    mlp_ratio: MLP hidden width over ``dim``.
    rngs: initialization keys.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from train import models
    >>> lm = models.DecoderLM(context=16, dim=32, depth=2, num_heads=2, rngs=nnx.Rngs(0))
    >>> lm(jnp.zeros((3, 16), jnp.int32)).shape
    (3, 16, 256)
  """

  def __init__(self, *, vocab: int = 256, context: int = 256, dim: int = 256, depth: int = 4,
               num_heads: int = 4, mlp_ratio: int = 4, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"lm/num_heads: {num_heads} does not divide dim={dim}")
    self.context = context
    self.embed = nnx.Embed(vocab, dim, embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.pos_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (context, dim)))
    self.blocks = nnx.List([DecoderBlock(dim, num_heads, mlp_ratio, rngs=rngs)
                            for _ in range(depth)])
    self.ln_f = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, vocab, rngs=rngs)

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    t = tokens.shape[-1]
    if t > self.context:
      raise ValueError(f"tokens: length {t} exceeds the model's context {self.context}")
    return self.embed(tokens) + self.pos_embed[...][None, :t]

  def logits(self, x: jax.Array) -> jax.Array:
    return self.head(self.ln_f(x))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed_tokens(tokens)
    for block in self.blocks:
      x = block(x)
    return self.logits(x)
