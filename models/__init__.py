"""Model registry (paper backbones + CIFAR ResNets), the text-guided head, and checkpoints.

``build_model(name, num_classes, head="linear"|"text"|"cosine"|"projection", ...)`` builds a baseline,
a text-guided classifier or one of the head variants that take the text head apart;
``load_checkpoint``/``save_checkpoint`` read and write them (ours, the paper repository's and
dnn-benchmarks' layouts).
"""

from . import backbones, cifar_resnet  # noqa: F401  (importing registers the models)
from .checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, save_checkpoint
from .registry import (
    HEADS,
    TEXT_HEADS,
    ModelSpec,
    build_backbone,
    build_model,
    get_model_spec,
    list_models,
    register_model,
)
from .text_head import (
    LOGIT_SCALE_INIT,
    LOGIT_SCALE_MAX,
    CosineClassifier,
    HeadClassifier,
    ProjectionClassifier,
    TextGuidedClassifier,
    classifier_name,
    fuse_text_head,
    last_layer_names,
)
from .weight_decay import param_groups

__all__ = [
    "CHECKPOINT_FORMAT",
    "HEADS",
    "LOGIT_SCALE_INIT",
    "LOGIT_SCALE_MAX",
    "CheckpointError",
    "CosineClassifier",
    "HeadClassifier",
    "ModelSpec",
    "ProjectionClassifier",
    "TEXT_HEADS",
    "TextGuidedClassifier",
    "build_backbone",
    "build_model",
    "classifier_name",
    "fuse_text_head",
    "get_model_spec",
    "last_layer_names",
    "list_models",
    "load_checkpoint",
    "param_groups",
    "register_model",
    "save_checkpoint",
]
