"""Per-class text features for text-guided classifier heads.

Pipeline: question templates (:mod:`.templates`) -> LLM descriptions cached as JSON (:mod:`.llm`,
CLI ``python -m text_features.describe``) -> a text encoder (:mod:`.encoders`) -> per-class average,
L2-normalised, saved as ``.pth`` (:mod:`.features`, CLI ``python -m text_features.build``).
"""

from .descriptions import (
    DescriptionSet,
    load_descriptions,
    match_classes,
    parse_descriptions,
    save_descriptions,
)
from .encoders import DEFAULT_ENCODER, TextEncoder, build_encoder
from .errors import DescriptionsError, EncoderError, LLMError, TextFeaturesError
from .features import (
    VARIANTS,
    build_text_features,
    class_features,
    default_descriptions_file,
    load_text_features,
    random_features,
    save_text_features,
)
from .llm import ChatClient, describe_classes
from .templates import CLASSNAME_TEMPLATE, DEFAULT_QUESTIONS, questions_for

__all__ = [
    "CLASSNAME_TEMPLATE",
    "DEFAULT_ENCODER",
    "DEFAULT_QUESTIONS",
    "VARIANTS",
    "ChatClient",
    "DescriptionSet",
    "DescriptionsError",
    "EncoderError",
    "LLMError",
    "TextEncoder",
    "TextFeaturesError",
    "build_encoder",
    "build_text_features",
    "class_features",
    "default_descriptions_file",
    "describe_classes",
    "load_descriptions",
    "load_text_features",
    "match_classes",
    "parse_descriptions",
    "questions_for",
    "random_features",
    "save_descriptions",
    "save_text_features",
]
