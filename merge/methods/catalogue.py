"""Importing this module registers every method of the catalogue (beyond linear and TA)."""

from merge.methods import (  # noqa: F401  (each import registers its methods)
    arcee_fusion,
    breadcrumbs,
    consensus,
    dare,
    della,
    fisher,
    karcher,
    model_stock,
    nearswap,
    passthrough,
    ram,
    ramplus,
    regmean,
    sce,
    slerp,
    svd_merge,
    ties,
)
