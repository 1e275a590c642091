"""patch_shift of ATS, Zoom-In and RA-CNN: patches (sub-tiles, zooms) moved in training only."""

import pytest
import torch

from models.registry import create_model
from tests.models import test_ats, test_zoom_in


def tiny_racnn(**kw):
    torch.manual_seed(0)
    return create_model("racnn", num_classes=3, in_channels=1, view_size=(24, 24), scales=2,
                        backbone_kwargs={"widths": (4,)}, zoom_sizes=(32,), **kw)


# (tiny model builder, its test scenes) of each model with the setting
MODELS = {
    "ats": (test_ats.tiny_model, test_ats.small_source),
    "zoom_in": (test_zoom_in.tiny, test_zoom_in.small_source),
    "racnn": (tiny_racnn, test_ats.small_source),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_patch_shift_changes_training_features_only(name):
    """Eval outputs and the boxes read are unchanged; training features change."""
    build, scenes = MODELS[name]
    source, keys = scenes()
    plain, shifted = build(), build(patch_shift=2)
    with torch.no_grad():
        a, b = test_ats.run(plain.eval(), source, keys), test_ats.run(shifted.eval(), source, keys)
        assert torch.equal(a.logits, b.logits) and torch.equal(a.boxes, b.boxes)
        torch.manual_seed(5)
        a = test_ats.run(plain.train(), source, keys)
        torch.manual_seed(5)
        b = test_ats.run(shifted.train(), source, keys)
    assert torch.equal(a.boxes, b.boxes) and not torch.allclose(a.logits, b.logits)
    with pytest.raises(ValueError, match="patch_shift"):
        build(patch_shift=-1)
