"""The joint readout (stages.model.READOUTS): W_mu applied to the mean over text and bottleneck rows,
padding-invariant, chosen for stage 2 by `stage2.readout` and saved with the model it writes."""
import numpy as np
import pytest
import torch

from pipeline.config import load_train_config
from pipeline.train.start_model import prepare_model
from stages import LBRModel
from stages.model import pad_right

TEXTS = ["protein kinase receptor binding in the cell membrane", "acid base salt",
         "return value of the parse function", "the patient received a vaccine against the virus"]


@pytest.fixture()
def joint(tiny_backbone):
    torch.manual_seed(0)
    m = LBRModel.from_backbone(tiny_backbone, num_bottleneck=3, latent_dim=16, readout="joint")
    with torch.no_grad():                      # a head that is not the identity, so W_mu's place matters
        m.w_mu.weight.normal_(0, 0.2)
        m.w_mu.bias.normal_(0, 0.2)
    return m.eval()


def test_joint_readout_is_head_of_mean_over_text_and_bottleneck(joint):
    ids, mask = pad_right(joint.tokenize(TEXTS), joint.tokenizer.pad_token_id)
    with torch.no_grad():
        enc = joint.encode_batch(ids, mask)
        got = joint.embed_from_encoded(enc)
        k = joint.num_bottleneck
        want = []
        for i, n in enumerate(mask.sum(1).tolist()):
            h = enc.hidden[i, : n + k]                         # the row's text states, then its K bottleneck states
            want.append(torch.nn.functional.normalize(joint.w_mu(h.mean(0)), dim=-1))
        want = torch.stack(want)
        bottleneck_only = torch.nn.functional.normalize(enc.mu.mean(1), dim=-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - bottleneck_only).abs().max() > 1e-3          # it is not the bottleneck readout
    assert got.shape == (len(TEXTS), 16)


def test_joint_readout_is_padding_and_batch_invariant(joint):
    alone = np.stack([joint.encode([t])[0] for t in TEXTS])
    mixed = joint.encode(TEXTS[::-1] + ["x " * 50], batch_size=5)[:4][::-1]
    np.testing.assert_allclose(alone, mixed, atol=1e-5)


def test_stage2_readout_switch_travels_with_the_model(tiny_backbone, tmp_path):
    torch.manual_seed(0)
    LBRModel.from_backbone(tiny_backbone, num_bottleneck=2).save_pretrained(tmp_path / "s1")
    keep = prepare_model(load_train_config(None, ["stage=contrastive"]), tmp_path / "s1")
    assert keep.config.readout == "bottleneck"
    m = prepare_model(load_train_config(None, ["stage=contrastive", "stage2.readout=joint"]), tmp_path / "s1")
    assert m.config.readout == "joint"
    m.save_pretrained(tmp_path / "s2")
    assert LBRModel.from_pretrained(tmp_path / "s2").config.readout == "joint"
    with pytest.raises(ValueError, match="stage2.readout"):
        load_train_config(None, ["stage=contrastive", "stage2.readout=last"])
    with pytest.raises(ValueError, match="needs bottleneck pooling"):
        LBRModel.from_backbone(tiny_backbone, num_bottleneck=0, pooling="mean", readout="joint")
