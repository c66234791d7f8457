"""Perturbations: L-inf attacks on one shared base (FGSM, R+FGSM, PGD, APGD-CE/DLR, APGD-T, FAB-T,
gradient-free Square, and AutoAttack's standard sequence of the last four), a worst-case
evaluator, and natural camera corruptions."""

from .apgd import APGD, APGDT
from .autoattack import AutoAttack
from .base import LinfAttack, attack_context, project
from .fab import FABT
from .corruptions import CORRUPTIONS, corrupt, parse_corruptions
from .gradient import FGSM, PGD, RFGSM
from .registry import ATTACKS, make_attack, parse_attacks, parse_eps_list, worst_case_correct
from .square import Square

__all__ = [
    "APGD", "APGDT", "ATTACKS", "AutoAttack", "CORRUPTIONS", "FABT", "FGSM", "LinfAttack", "PGD", "RFGSM", "Square",
    "attack_context", "corrupt",
    "make_attack", "parse_attacks", "parse_corruptions", "parse_eps_list", "project", "worst_case_correct",
]
