"""Curvature and flatness (protocol 4), as ``import lossglass.curvature``: Hessian eigenvalues by Lanczos, the
trace by Hutchinson / Hutch++, the spectral density by stochastic Lanczos quadrature, sharpness, local entropy, and
their rank correlation with generalisation. The implementation lives in :mod:`lossglass.protocols.curvature`."""

from .protocols.curvature import (
    MEASURES,
    EigenResult,
    SpectralDensity,
    flatness_table,
    lanczos,
    local_entropy,
    rank_correlations,
    sharpness,
    sharpness_radius,
    spectral_density,
    top_eigenvalues,
    trace,
)

__all__ = ["MEASURES", "EigenResult", "SpectralDensity", "flatness_table", "lanczos", "local_entropy",
           "rank_correlations", "sharpness", "sharpness_radius", "spectral_density", "top_eigenvalues", "trace"]
