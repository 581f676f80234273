"""SSCQ losses (SPEC section 4): one module per loss, and the combined objective."""

from sscq_dist.losses.codeword_diversity import CodewordDiversityLoss, usage_probabilities
from sscq_dist.losses.consistency import ConsistentContrastiveLoss
from sscq_dist.losses.ntxent import NTXentLoss
from sscq_dist.losses.objective import LOSS_TERMS, SSCQObjective, codeword_entropy
from sscq_dist.losses.part_neighbor import PartNeighborLoss

__all__ = [
    "LOSS_TERMS",
    "CodewordDiversityLoss",
    "ConsistentContrastiveLoss",
    "NTXentLoss",
    "PartNeighborLoss",
    "SSCQObjective",
    "codeword_entropy",
    "usage_probabilities",
]
