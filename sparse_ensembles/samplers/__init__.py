"""SG-MCMC samplers (drop-in ``torch.optim.Optimizer`` subclasses) and step-size schedules."""
from .schedules import Constant, Cyclical, Polynomial, StepDecay
from .sgmcmc import SGHMC, SGLD, SGMCMC

__all__ = ["SGLD", "SGHMC", "SGMCMC", "Constant", "Cyclical", "StepDecay", "Polynomial"]
