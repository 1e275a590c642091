"""patch_shift of ATS and Zoom-In: patches (sub-tiles) moved in training only."""

import pytest
import torch

from tests.models import test_ats, test_zoom_in

# (tiny model builder, its test scenes) of each model with the setting
MODELS = {
    "ats": (test_ats.tiny_model, test_ats.small_source),
    "zoom_in": (test_zoom_in.tiny, test_zoom_in.small_source),
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
