"""The offline photos: the training set is real, readable and disjoint from the evaluation set."""

import pytest
import torch

from lowbit.data import assets


def test_training_photos_are_real_images_none_of_them_an_evaluation_photo():
    pytest.importorskip("sklearn")
    training = assets.training_photos()
    assert len(training) == len(assets.TRAINING_PHOTOS)
    assert not {name.rsplit(".", 1)[0] for name in training} & set(assets.PHOTOS)
    evaluation = assets.sample_photos() * assets.EFFICIENTNET_SPREAD + assets.EFFICIENTNET_CENTER  # [0, 1]
    for name, image in training.items():
        assert image.dtype == torch.float32 and image.shape[0] == 3 and min(image.shape[1:]) >= 100, name
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0 and float(image.std()) > 0.02, name
        small = torch.nn.functional.interpolate(image[None], size=(224, 224), mode="bilinear", antialias=True)
        closest = (evaluation - small).abs().mean(dim=(1, 2, 3)).min()
        assert closest > 0.05, f"{name} looks like an evaluation photo"
