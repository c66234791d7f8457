"""Perturbations: L-inf gradient attacks on one shared base, a worst-case evaluator, and
natural camera corruptions."""

from .apgd import APGD
from .base import LinfAttack, attack_context, project
from .corruptions import CORRUPTIONS, corrupt, parse_corruptions
from .gradient import FGSM, PGD, RFGSM
from .registry import ATTACKS, make_attack, parse_attacks, parse_eps_list, worst_case_correct

__all__ = [
    "APGD", "ATTACKS", "CORRUPTIONS", "FGSM", "LinfAttack", "PGD", "RFGSM", "attack_context", "corrupt",
    "make_attack", "parse_attacks", "parse_corruptions", "parse_eps_list", "project", "worst_case_correct",
]
