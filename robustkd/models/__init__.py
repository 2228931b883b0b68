"""CIFAR model zoo: a registry and models that normalise [0, 1] inputs inside (their checkpoints:
robustkd/checkpoints.py).

Architectures follow the reference repositories (kuangliu/pytorch-cifar, TRADES, RSLAD): ResNet-18 with a
3x3 stride-1 stem and no max-pool (11,173,962 parameters for 10 classes), MobileNetV2 for CIFAR
(2,296,922) and WRN-34-10 (46,160,474 parameters used in the forward pass; the reference code's
unused ``sub_block1`` is left out). Width/depth options give small variants for CPU runs. The ViT
teachers of AT-PRM (``vit_b_4``: 85,152,010 parameters for 10 classes; ``deit_s_4``: 21,342,346)
are timm models.

Layout (timm's pattern): ``registry.py`` holds the registry and the ``Classifier`` wrapper; each
architecture file (``cnn.py``, ``vit.py``) imports the registry and
registers its architectures; this package imports every architecture file, so importing
``robustkd.models`` registers them all. The registry never imports an architecture file: no
import circle (tests/test_layout.py).
"""

from . import cnn, vit  # noqa: F401 - importing an architecture file registers its architectures
from .registry import (CIFAR10_MEAN, CIFAR10_STD, Classifier, Normalize, available_models,  # noqa: F401
                       count_parameters, create_model, register_model)
