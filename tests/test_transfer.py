"""Head swap and fine-tuning for transfer learning (dwf_ray.analysis.transfer), on more than one architecture."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from dwf_ray.archs import REGISTRY, ArchSpec, build_model
from dwf_ray.config import ZooConfig
from dwf_ray.data import dataset_for
from dwf_ray.accuracy import accuracy
from dwf_ray.analysis.transfer import find_head, fine_tune, replace_head, source_model, transfer_accuracies
from dwf_ray.zoo import train_classifier

SOURCE = [0, 1, 2, 3, 4]
TARGET = [5, 6, 7, 8, 9]
MLP = ArchSpec("mlp", {"in_dim": 64, "hidden": [32, 32], "out_dim": 5})
OTHER_FAMILIES = [   # tiny registered image models on the 1x8x8 digits
    ArchSpec("cnn", {"in_channels": 1, "image_size": 8, "channels": [8, 16], "n_classes": 5}),
    ArchSpec("resnet20", {"num_classes": 5, "in_channels": 1, "width": 4, "blocks_per_stage": 1}),
    ArchSpec("vit", {"image_size": 8, "patch_size": 4, "num_layers": 1, "num_heads": 2, "hidden_dim": 16,
                     "mlp_dim": 32, "num_classes": 5, "in_channels": 1}),
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train fastest on one thread (and leave the other core to the rest of the suite)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ConvBN(nn.Module):
    """A small convolutional net with BatchNorm, its head not in a Sequential (unlike the MLP)."""

    def __init__(self, n_classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 32), nn.ReLU())
        self.classifier = nn.Linear(32, n_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def _cases():
    """(label, model factory, ZooConfig of its source data): the MLP, a local conv net, other registered families."""
    cases = [("mlp", lambda: build_model(MLP), ZooConfig(arch=MLP.__dict__, classes=SOURCE)),
             ("conv-bn", ConvBN, ZooConfig(image=True, classes=SOURCE))]
    for spec in OTHER_FAMILIES:
        if spec.family in REGISTRY:
            cases.append((spec.family, lambda spec=spec: build_model(spec), ZooConfig(image=True, classes=SOURCE)))
    return cases


@pytest.mark.parametrize("label,make,zoo_cfg", _cases(), ids=[c[0] for c in _cases()])
def test_replace_head_keeps_body_and_sets_class_count(label, make, zoo_cfg):
    torch.manual_seed(0)
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head = replace_head(model, 3, seed=11)
    assert head == find_head(model)
    after = model.state_dict()
    body = [k for k in before if not k.startswith(head + ".")]
    assert body and all(torch.equal(before[k], after[k]) for k in body)
    assert after[f"{head}.weight"].shape[0] == 3
    x = dataset_for(zoo_cfg).train.x[:4]
    assert model.eval()(x).shape == (4, 3)
    # the new head depends only on the seed
    again = make()
    replace_head(again, 3, seed=11)
    assert torch.equal(again.get_submodule(head).weight, model.get_submodule(head).weight)
    replace_head(again, 3, seed=12)
    assert not torch.equal(again.get_submodule(head).weight, model.get_submodule(head).weight)


def test_head_errors_name_the_problem():
    with pytest.raises(ValueError, match="no nn.Linear"):
        find_head(nn.Sequential(nn.Conv2d(1, 2, 3)))
    with pytest.raises(ValueError, match="not nn.Linear"):
        replace_head(ConvBN(), 3, seed=0, head="features.1")
    with pytest.raises(ValueError, match="no module 'fc'"):
        replace_head(ConvBN(), 3, seed=0, head="fc")
    with pytest.raises(ValueError, match="at least one epoch"):
        fine_tune(ConvBN(), ZooConfig(image=True, classes=TARGET), 0, seed=0)


def test_fine_tuning_a_pretrained_mlp_beats_its_untrained_head():
    torch.manual_seed(0)
    source_cfg = ZooConfig(arch=MLP.__dict__, classes=SOURCE, epochs=5)
    trained = train_classifier(build_model(MLP), source_cfg, seed=0)
    assert accuracy(trained, dataset_for(source_cfg).test) > 0.9
    state = {k: v.detach().numpy().copy() for k, v in trained.state_dict().items()}
    target = ZooConfig(arch=MLP.__dict__, classes=TARGET)
    untrained = source_model(MLP, state)
    replace_head(untrained, 5, seed=3)
    chance_level = accuracy(untrained, dataset_for(target).test)
    tuned = transfer_accuracies(MLP, state, target, budgets=[1, 3], seed=3)
    assert min(tuned) > chance_level + 0.25 and max(tuned) > 0.75
    # every budget starts from the same source weights, which fine-tuning leaves untouched
    assert all(np.array_equal(v, trained.state_dict()[k].numpy()) for k, v in state.items())


def test_fine_tuning_a_batchnorm_conv_net_beats_its_untrained_head():
    torch.manual_seed(0)
    target = ZooConfig(image=True, classes=TARGET)
    untrained = ConvBN()
    replace_head(untrained, 5, seed=1)
    chance_level = accuracy(untrained, dataset_for(target).test)
    model = ConvBN()
    tuned = fine_tune(model, target, epochs=2, seed=1)
    assert tuned > chance_level + 0.2
    assert model.features[1].momentum == 0.1   # recalibration before fine-tuning leaves BatchNorm as it was
