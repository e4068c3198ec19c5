"""The fidelity experiments: does each of the paper's effects appear, and
where it does not, is it the budget or a bug? Each compares the gradient
signals of a run with the true gradient at the same parameters.

  ff_diagnostics  feed-forward interfaces against full backprop
  ff              the feed-forward grid (scripts/fidelity_ff.py)
  recall          delayed recall across unroll boundaries, the boundary
                  diagnostics shared with ptb
  two_networks    the two-network system with probes of M
  ptb             character-level Penn Treebank
  rnn             the driver of scripts/fidelity_rnn.py (recall, multinet, ptb)
  m_check         M trained alone on a frozen core (scripts/recall_m_check.py)
  stats, plots    cosines and seed statistics; the PNGs

The measurements and what they show: docs/FIDELITY.md.
"""
