"""Low-rank factorization: pure numeric decompositions and rank selection.

* :mod:`.svd_methods` - SVD back ends (exact, Gram-side, randomized);
* :mod:`.decompose` - the channel / spatial /
  Tucker-2 / FC schemes on Caffe weight blobs, per group;
* :mod:`.rank` - rank choice: fixed, energy, VBMF, the whole-net MAC budget allocation;
* :mod:`.budget` - each layer's candidates for that budget, and the allocation.
* :mod:`.datafit` - data-aware fits on calibration moments: im2col, position
  sampling, ridge re-fit of a last factor, reduced-rank regression, Zhang et
  al. 2015's response reconstruction;
* :mod:`.prunefit` - data-aware pruning: masked least squares per row, OBS,
  SparseGPT.

Nothing here knows about the IR; :mod:`lrprune_caffe.transforms.factorize` turns the
factors into Caffe layers.
"""

from .decompose import (SCHEMES, SVD, channel_decompose, fc_decompose, low_rank_factors,  # noqa: F401
                        scheme_spectra, singular_values, spatial_decompose, svd,  # noqa: F401
                        tucker2_decompose)  # noqa: F401

__all__ = ["SCHEMES", "SVD", "channel_decompose", "fc_decompose", "low_rank_factors", "scheme_spectra",
           "singular_values", "spatial_decompose", "svd", "tucker2_decompose"]
