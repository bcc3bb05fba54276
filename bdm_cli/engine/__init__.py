"""The diffusion engine: DCT, blur schedule, forward process, loss and samplers.

Everything here is a pure function of tensors (randomness is passed in), independent
of the network, the CLI and the config system::

    from bdm_cli.engine import BlurSchedule, diffuse, eps_loss, sample
"""

from .checks import NonFiniteOutput
from .dct import dct2, dct_matrix, idct2
from .diffusion import Model, denoise_mean_var, diffuse, eps_loss, gaussian_eps, posterior_coefficients, precondition
from .sampling import GRIDS, SAMPLERS, Step, default_grid, nfe, randn, sample, time_grid
from .schedule import BLURS, BlurSchedule

__all__ = [
    "BLURS",
    "BlurSchedule",
    "GRIDS",
    "Model",
    "NonFiniteOutput",
    "SAMPLERS",
    "Step",
    "dct2",
    "dct_matrix",
    "default_grid",
    "denoise_mean_var",
    "diffuse",
    "eps_loss",
    "gaussian_eps",
    "precondition",
    "idct2",
    "nfe",
    "posterior_coefficients",
    "randn",
    "sample",
    "time_grid",
]
