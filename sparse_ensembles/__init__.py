"""sparse_ensembles: cheap Bayesian ensembles by SG-MCMC sampling, structured pruning and compaction.

Pipeline: sample (``samplers`` + ``priors``) -> prune (``pruning``, groups from ``structure``) ->
retrain masked -> shrink (``compact``) -> average (``ensembles``) -> measure (``metrics``).
"""
__version__ = "0.1.0"
