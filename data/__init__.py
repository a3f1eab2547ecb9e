"""Datasets, class names and input presets.

Contract (see DATA.md): ``DATASETS``, ``get_class_names``, ``num_classes``, ``dataset_channels``,
``default_data_root``, ``eval_preset``, ``preset_for``, ``build_dataset``, ``DatasetUnavailable``; plus the training
preset builder and the transform classes that turn preset dicts into transforms.
"""

from data.catalog import DATASETS, dataset_channels
from data.classnames import get_class_names, imagenet_wnids, label_names, num_classes
from data.presets import check_eval_preset, eval_preset, preset_for, train_preset
from data.sources import DatasetUnavailable, build_dataset, default_data_root
from data.transforms import ClassificationPresetEval, ClassificationPresetTrain

__all__ = [
    "DATASETS",
    "ClassificationPresetEval",
    "ClassificationPresetTrain",
    "DatasetUnavailable",
    "build_dataset",
    "check_eval_preset",
    "dataset_channels",
    "default_data_root",
    "eval_preset",
    "get_class_names",
    "imagenet_wnids",
    "label_names",
    "num_classes",
    "preset_for",
    "train_preset",
]
