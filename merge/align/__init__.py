"""Permutation alignment: specs (inferred by torch.fx or hand-written), weight and activation
matching, equivalence checks, BatchNorm reset and REPAIR. See docs/align.md; the map of
the whole package is docs/architecture.md.

    from merge.align import align_state_dicts
    b_aligned, report = align_state_dicts(make_model, state_a, state_b, method="weight", seed=0)
"""

from merge.align.activation_matching import activation_matching
from merge.align.align import align_state_dicts
from merge.align.infer import infer_spec
from merge.align.permute import apply_permutation
from merge.align.repair import repair, reset_batchnorm
from merge.align.spec import (
    FixedAxis,
    Group,
    Member,
    PermutationSpec,
    SpecError,
    load_spec,
    spec_from_dict,
)
from merge.align.trace import TraceError
from merge.align.verify import VerificationError, verify_spec
from merge.align.weight_matching import MatchReport, weight_matching

__all__ = [
    "FixedAxis",
    "Group",
    "MatchReport",
    "Member",
    "PermutationSpec",
    "SpecError",
    "TraceError",
    "VerificationError",
    "activation_matching",
    "align_state_dicts",
    "apply_permutation",
    "infer_spec",
    "load_spec",
    "repair",
    "reset_batchnorm",
    "spec_from_dict",
    "verify_spec",
    "weight_matching",
]
