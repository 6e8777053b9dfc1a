"""Mean Teacher parts: EMA, geometric views, multi-augmentation, pseudo-label bank."""
from qualiteacher.teacher.bank import BankRecord, Gathered, PseudoLabelBank, merge_indexes
from qualiteacher.teacher.bank_store import DiskStore, MemoryStore
from qualiteacher.teacher.ema import ema_update_, make_teacher
from qualiteacher.teacher.multiaug import AUGMENTATIONS, Variants, multi_augment
from qualiteacher.teacher.views import VIEWS, apply_view, check_views, invert_view

__all__ = ["AUGMENTATIONS", "BankRecord", "DiskStore", "Gathered", "MemoryStore", "PseudoLabelBank", "VIEWS",
           "Variants", "apply_view", "check_views", "ema_update_", "invert_view", "make_teacher",
           "merge_indexes", "multi_augment"]
