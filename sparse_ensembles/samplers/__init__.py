"""SG-MCMC samplers (drop-in ``torch.optim.Optimizer`` subclasses), their update rules as pure
functions (:mod:`.functional`) and step-size schedules."""
from .functional import sghmc_, sgld_
from .schedules import Constant, Cyclical, MultiStep, Polynomial, StepDecay
from .units import from_summed_loss
from .sgmcmc import SGHMC, SGLD, SGMCMC
from .adaptive import SGHMCSA, SGLDSA
from .schedules import resolve_temperature

__all__ = ["SGLD", "SGHMC", "SGMCMC", "SGLDSA", "SGHMCSA", "resolve_temperature", "sgld_", "sghmc_", "Constant", "Cyclical", "StepDecay", "MultiStep", "Polynomial",
           "from_summed_loss"]
