"""Iterative magnitude pruning with rewinding (lottery tickets), all rounds in one command.

``num_steps`` is the whole budget: ``rounds + 1`` trainings of ``num_steps // (rounds + 1)``
steps each. After each training but the last, the weights of smallest magnitude are pruned
(``jp.ticket_masks``; round ``r`` reaches ``1 - (1 - sparsity) ** (r / rounds)``), the
survivors are rewound to their values at ``rewind_step`` (``jp.rewind``; 0 = initialization)
and the optimizer restarts with the masks fixed (``jp.replace_masks``).
"""

from train.configs import default


def get_config():
  """3 rounds to 90% sparsity (4 trainings of 2000 steps), rewinding to step 100."""
  config = default.get_config()
  config.num_steps = 8000
  p = config.pruning
  p.method = "imp"
  p.sparsity = 0.9
  p.rounds = 3
  p.rewind_step = 100
  p.scope = "global"  # one threshold over all prunable leaves, as for conv nets in the papers;
                      # or "layerwise"
  return config
