"""The real server-side encoders on a tiny content folder (skipped without the encoders extra)."""

import numpy as np
import pytest

pytest.importorskip("sentence_transformers")
pytest.importorskip("efficientnet_lite_pytorch")
pytestmark = pytest.mark.slow


def test_encode_masks_missing_and_caches(tmp_path, monkeypatch):
    from PIL import Image

    from gfmfr.config import DataConfig
    from gfmfr.data import encoders

    monkeypatch.setenv("GFMFR_CACHE", str(tmp_path / "cache"))
    (tmp_path / "interactions.csv").write_text(
        "user_id,item_id\n" + "".join(f"u{u},{i}\n" for u in range(2) for i in range(4))
    )
    Image.fromarray((np.random.default_rng(0).random((40, 30, 3)) * 255).astype("uint8")).save(tmp_path / "a.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "items.csv").write_text(
        "item_id,text,image\n0,a war film,a.jpg\n1,a comedy,broken.jpg\n2,,\n3,a comedy,gone.jpg\n"
    )
    cfg = DataConfig(dataset=str(tmp_path), content=str(tmp_path))
    first = encoders.encode_content(cfg)
    assert first.features["text"].shape == (4, 384) and first.features["image"].shape == (4, 1280)
    assert first.mask["text"].tolist() == [True, True, False, True]
    assert first.mask["image"].tolist() == [True, False, False, False]
    assert first.report["image"]["unreadable"] == 2 and first.report["image"]["no_image"] == 1
    assert np.all(first.features["image"][1:] == 0) and np.abs(first.features["image"][0]).sum() > 0
    np.testing.assert_allclose(first.features["text"][1], first.features["text"][3])  # same text
    second = encoders.encode_content(cfg)
    assert second.report["text"]["encoded"] == 0 and second.report["image"]["encoded"] == 0
    np.testing.assert_array_equal(first.features["image"], second.features["image"])


@pytest.mark.parametrize("dim", [8, None])
def test_a_content_reduction_maps_catalogue_rows_to_what_training_used(dim):
    """Applied to the catalogue's own rows, the fitted reduction (PCA as plain tensors, then
    standardisation) gives the features the server's content models were trained on; kept as tensors
    and read back, it gives the same."""
    import torch

    from gfmfr.data.encoders import ContentReduction, reduce_features, standardise

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(60, 20)) @ rng.normal(size=(20, 20))).astype(np.float32)
    mask = rng.random(60) > 0.2
    trained = standardise(reduce_features(x, mask, dim, 0), torch.from_numpy(mask))
    reduction = ContentReduction.fit(x, mask, dim, 0)
    torch.testing.assert_close(reduction.apply(x, mask), trained, atol=1e-4, rtol=1e-4)
    again = ContentReduction.from_tensors(reduction.tensors())
    torch.testing.assert_close(again.apply(x, mask), reduction.apply(x, mask))
    assert reduction.raw_dim == 20
