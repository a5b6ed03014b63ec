"""Zoology's "original MQAR" sweep (its mqar_example_configs/original_mqar_configs.py): one mixed-length
training set, tested out of distribution on longer sequences with more pairs.

Training: (64, 4) x 100,000 examples, (128, 8), (256, 16), (256, 32), (256, 64) x 20,000 each, padded to 256
tokens; test: (64, 4), (64, 8), (64, 16), (128, 32), (256, 64), (512, 128), (1024, 256), 1,000 examples each;
learning rates logspace(-3, -1.5, 4) as Zoology's; the base variant; every other field as `configs/mqar.py`
(3,000 steps of 256 sequences, about 4.3 epochs of the 180,000; Zoology trains 32; early stop at 0.99 on a
validation split of 1,000 sequences drawn from the training shapes in the training set's proportions; three
seeds). The table reports the mean accuracy over the test shapes and each one.

``--config.pack=True`` packs the training set: its examples laid end to end into rows of 256 tokens (best fit,
in an order drawn from ``data_seed``; the 180,000 examples fill 95,000 rows exactly), each step ``batch_size`` examples
on average in about half as many rows, every sequence layer reset at each example's start (attention: a
block-diagonal causal mask). Each example's logits equal its padded ones (tests/test_packed_training.py), but
the examples that share a step differ from the padded order, so the default stays padded (``pack = False``);
evaluation stays padded. What it saves and costs: docs/experiments.md section 4.

    python -m experiments.mqar --config=configs/mqar_original.py --workdir=runs/mqar_original
    python -m experiments.mqar --config=configs/mqar_original.py --config.smoke=True --workdir=/tmp/mqar_original
    python -m experiments.mqar --config=configs/mqar_original.py --config.pack=True --workdir=runs/mqar_original_packed

Writes runs/base/<model>/mixed/d<d_model>_lr<lr>_seed<seed>/ and the report of `configs/mqar.py`.
"""
from configs import mqar


def get_config():
    config = mqar.get_config()
    config.variants = ("base",)
    config.learning_rates = (1e-3, 3.2e-3, 1e-2, 3.2e-2)     # np.logspace(-3, -1.5, 4), as Zoology
    config.train_shapes = ()
    config.train_mixture = ((64, 4, 100_000), (128, 8, 20_000), (256, 16, 20_000), (256, 32, 20_000),
                            (256, 64, 20_000))
    config.test_shapes = ((64, 4), (64, 8), (64, 16), (128, 32), (256, 64), (512, 128), (1024, 256))
    config.smoke_settings.update({
        "variants": ("base",), "models": ("attention", "gated_deltanet"), "train_shapes": (),
        "train_mixture": ((16, 2, 32), (32, 4, 32)), "test_shapes": ((16, 2), (32, 8)),
    })
    return config
