"""The attacks' channels-last CPU layout (:func:`robustkit.attacks.iterative.channels_last`):
the same function up to rounding, the model's own weight tensors given back, and no layout
kept where the model cannot take it."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robustkit.attacks.apgd import apgd
from robustkit.attacks.ensemble import autoattack
from robustkit.attacks.iterative import channels_last


def pooled_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 10)).eval()


class Viewing(nn.Module):
    """A CNN that flattens with ``.view``, which an NHWC activation refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 10 * 10, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv(x))
        out: Tensor = self.fc(h.view(h.shape[0], -1))
        return out


class LayoutSensitive(nn.Module):
    """A CNN whose output changes with the activations' memory layout (a planted bug)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 10 * 10, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv(x))
        shift = 0.0 if h.is_contiguous() else 5.0
        out: Tensor = self.fc(h.flatten(1)) + shift
        return out


def images(n: int = 16, seed: int = 0) -> Tensor:
    return torch.rand(n, 1, 12, 12, generator=torch.Generator().manual_seed(seed))


def test_layout_is_kept_on_a_cnn_and_every_weight_tensor_comes_back() -> None:
    model = pooled_cnn()
    x = images()
    before = {name: (p.data_ptr(), p.stride()) for name, p in model.named_parameters()}
    copies = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        logits = model(x)
    with channels_last(model, x, logits) as kept:
        assert kept
        first, second = model[0], model[3]
        assert isinstance(first, nn.Conv2d) and isinstance(second, nn.Conv2d)
        assert first.weight.stride() == (9, 1, 3, 1)  # NHWC, one input channel
        assert not second.weight.is_contiguous()  # NHWC inside the block
        with torch.no_grad():
            assert torch.allclose(model(x), logits, atol=1e-5)
        with channels_last(model, x, logits) as again:
            assert not again  # nested: nothing left to move
    for name, p in model.named_parameters():
        assert (p.data_ptr(), p.stride()) == before[name]  # its own storage, not a copy
        assert torch.equal(p.data, copies[name])
        assert p.is_contiguous()


def test_layout_is_given_up_when_the_model_cannot_take_it() -> None:
    for model in (Viewing(), LayoutSensitive()):
        torch.manual_seed(1)
        model.eval()
        x = images(8)
        with torch.no_grad():
            logits = model(x)
        with channels_last(model, x, logits) as kept:
            assert not kept, type(model).__name__
            assert model.conv.weight.is_contiguous()
        # and the attacks still run on it, as it came
        result = apgd(model, x, logits.argmax(1), eps=0.1, steps=5,
                      generator=torch.Generator().manual_seed(0))
        assert result.success.shape == (8,)


def test_layout_is_a_no_op_off_the_cpu_path_and_on_a_model_without_4d_weights() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(144, 10)).eval()
    x = images(4)
    with torch.no_grad():
        logits = model(x)
    with channels_last(model, x, logits) as kept:
        assert not kept


def test_the_ensemble_leaves_the_model_as_it_found_it() -> None:
    model = pooled_cnn(2)
    x = images(12, seed=2)
    y = model(x).argmax(1)
    before = [(p.data_ptr(), p.stride()) for p in model.parameters()]
    result = autoattack(model, x, y, eps=0.1, steps=5, budget=20,
                        generator=torch.Generator().manual_seed(0))
    assert result.success.shape == (12,)
    assert [(p.data_ptr(), p.stride()) for p in model.parameters()] == before
    assert all(p.requires_grad for p in model.parameters())
