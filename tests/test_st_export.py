"""sentence-transformers export (issue 11, item 4): stock modules only, loads without remote code,
same vectors as LBRModel.encode for K = 1, K > 1 (LoRA, latent head) and the baseline poolings."""
import json

import numpy as np
import pytest

from stages import LBRModel

TEXTS = ["aspirin and stroke risk", "def f(x):\n    return x * 2", "the <|lbr_bottleneck_0|> literal", "z " * 70,
         "ok"]


@pytest.mark.parametrize("kw", [{"num_bottleneck": 1}, {"num_bottleneck": 3, "lora_r": 4, "latent_dim": 16},
                                {"num_bottleneck": 2, "latent_dim": 16, "readout": "joint"},
                                {"num_bottleneck": 2, "latent_dim": 16, "readout": "joint", "idf": True},
                                {"num_bottleneck": 0, "pooling": "last"}, {"num_bottleneck": 0, "pooling": "mean"},
                                {"num_bottleneck": 0, "pooling": "mean", "idf": True}],
                         ids=["K1", "K3-lora-latent", "K2-joint", "K2-joint-idf", "last", "mean", "mean-idf"])
def test_export_loads_without_remote_code_and_matches(tiny_backbone, tmp_path, kw):
    from sentence_transformers import SentenceTransformer

    from jobs import export_st

    kw = dict(kw)
    idf = kw.pop("idf", False)
    m = LBRModel.from_backbone(tiny_backbone, max_length=48, **kw)
    if idf:     # idf token weights travel as a WordWeights module (bottleneck rows weigh 1)
        m.fit_token_weights(TEXTS[:2] + ["aspirin reduces the risk of stroke in patients"] * 3)
    m.save_pretrained(tmp_path / "model")
    assert export_st.main(["--model", str(tmp_path / "model"), "--out", str(tmp_path / "st")]) == 0
    types = [x["type"] for x in json.loads((tmp_path / "st" / "modules.json").read_text())]
    assert all(t.startswith("sentence_transformers.") for t in types), types
    assert not list((tmp_path / "st").rglob("*.py"))
    st = SentenceTransformer(str(tmp_path / "st"), device="cpu")           # trust_remote_code defaults to False
    want = LBRModel.from_pretrained(tmp_path / "model").encode(TEXTS, batch_size=2)
    for bs in (1, 5):
        np.testing.assert_allclose(st.encode(TEXTS, batch_size=bs), want, atol=1e-5)


def test_export_out_rules(tiny_backbone, tmp_path, capsys):
    from jobs import export_st

    LBRModel.from_backbone(tiny_backbone, num_bottleneck=2).save_pretrained(tmp_path / "run" / "model")
    (tmp_path / "run" / "report.json").write_text("{}")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    args = ["--model", str(tmp_path / "run")]
    assert export_st.main([*args, "--out", str(other), "--overwrite"]) == 2
    assert (other / "keep.txt").read_text() == "x" and len(list(other.iterdir())) == 1
    assert export_st.main([*args, "--out", str(tmp_path / "st")]) == 0                # run folder accepted
    assert export_st.main([*args, "--out", str(tmp_path / "st")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert export_st.main([*args, "--out", str(tmp_path / "st"), "--overwrite"]) == 0
