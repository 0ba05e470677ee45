"""The recipes of ``train/``: what ``config.pruning.method`` selects, one module each.

A recipe (:class:`Recipe`) says how it builds its optimizer, which phases it trains in, what
it does between steps and what it records; :class:`train.experiment.Experiment` builds the
one the config names (:func:`get`) and ``train.train.train_and_evaluate`` runs their phases
in one generic loop. Parts that any method may add (the ``mitigate`` phase, with
``config.mitigation.enabled``) are recipes too, made by :func:`addons`.

=============  ===========================================================================
``dense``      ``optax.adam`` only (:mod:`train.recipes.dense`)
``oneshot``    ``chain(adam, magnitude_pruning(one_shot_schedule(s, at_step), ...))``; with
               ``structure="2:4"`` the ``nm24`` config (:mod:`train.recipes.oneshot`)
``gmp``        ``chain(adam, magnitude_pruning(polynomial_schedule(s, ...), ...))``
``imp``        ``chain(adam, magnitude_pruning(0.0))``, and between rounds ``ticket_masks``,
               ``rewind`` and ``replace_masks`` (lottery tickets, all rounds in one run)
``set``        ``set_training(adam, sparsity=s, ...)``
``rigl``       ``rigl(adam, sparsity=s, ...)``
``channels``   ``chain(adam, group_pruning(channel_groups(model), ...))``, then
               ``surgery.shrink_module`` and fine-tuning the smaller model (phase ``finetune``)
=============  ===========================================================================

A new method is a module with a registered subclass (imported below)::

  @register("my_method")
  class MyMethod(Recipe):
    def optimizer(self, model, base):
      return optax.chain(base, jp.magnitude_pruning(...))
"""

from train.recipes.base import Phase, Recipe, get, names, register, unregister

# isort: off
# The import order is the registration order of the methods.
from train.recipes import dense, oneshot, gmp, imp, rigl, set_training, channels  # noqa: F401
from train.recipes import mitigation
# isort: on

__all__ = ["Phase", "Recipe", "addons", "get", "names", "register", "unregister"]


def addons(exp) -> list[Recipe]:
  """The parts the config adds to any method, after its phases: the ``mitigate`` phase."""
  return [part for part in (mitigation.Mitigate.from_config(exp),) if part is not None]
