"""Question templates for description generation (CuPL style) and the class-name template.

Templates are ``str.format`` strings with one ``{}`` for the class name, the same convention as
CuPL and open_clip's zero-shot templates.
"""

from __future__ import annotations

import re

#: The class-name variant's template (the paper's CLIP("a photo of a {c}") ablation).
CLASSNAME_TEMPLATE = "a photo of a {}"

#: CuPL's ImageNet questions plus the one shown in the paper ("Describe a photo of a {}").
DEFAULT_QUESTIONS: tuple[str, ...] = (
    "Describe what a {} looks like.",
    "How can you identify a {}?",
    "What does a {} look like?",
    "Describe an image from the internet of a {}.",
    "Describe a photo of a {}.",
)

# Class names alone are ambiguous for some datasets ("Stop", "Coat", "Bag"): these question sets say
# what kind of thing is meant, as CuPL does for its fine-grained datasets.
DATASET_QUESTIONS: dict[str, tuple[str, ...]] = {
    "fashion-mnist": (
        "Describe what a {} looks like.",
        "How can you identify a {} in a product photo?",
        "What does a {}, an item of clothing or a fashion accessory, look like?",
        "Describe a catalogue photo of a {}.",
        "Describe a photo of a {}.",
    ),
    "food101": (
        "Describe what {} looks like.",
        "Visually describe {}, a type of food.",
        "How can you tell that the food in a photo is {}?",
        "Describe a photo of {}, a dish.",
        "What does a plate of {} look like?",
    ),
    "gtsrb": (
        "Describe what the '{}' traffic sign looks like.",
        "How can you identify a '{}' road sign?",
        "What shape and colours does the German traffic sign '{}' have?",
        "Describe a photo of a '{}' traffic sign.",
        "Describe the symbol on a '{}' traffic sign.",
    ),
}

_ARTICLE = re.compile(r"\b([Aa]) \{\}")


def questions_for(dataset: str | None) -> tuple[str, ...]:
    """The question templates used for ``dataset`` (the defaults for datasets without their own)."""
    return DATASET_QUESTIONS.get((dataset or "").lower(), DEFAULT_QUESTIONS)


def format_question(template: str, class_name: str) -> str:
    """Fill ``template`` with ``class_name``, turning "a {}" into "an {}" before a vowel."""
    if class_name[:1].lower() in "aeiou":
        template = _ARTICLE.sub(lambda m: f"{m.group(1)}n {{}}", template)
    return template.format(class_name)


def format_template(template: str, class_name: str) -> str:
    """Fill an encoder template verbatim (no article fix, to match the published CLIP templates)."""
    return template.format(class_name)
