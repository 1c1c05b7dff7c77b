from ..ops import cluster_length, sec_attention
from .checkpoint_utils import convert_official_state_dict, load_backbone_checkpoint
from .classifier import SecViTClassifier
from .secvit import ARCH_SETTINGS, SecViT

__all__ = ['SecViT', 'SecViTClassifier', 'ARCH_SETTINGS', 'sec_attention', 'cluster_length',
           'convert_official_state_dict', 'load_backbone_checkpoint']
