"""Engine pieces of ``train.py`` and ``test.py``: distributed setup, configs, optimisation, EMA,
mixup/cutmix, metrics and logging, and the train/evaluate loops."""
