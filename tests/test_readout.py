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


# ---------------------------------------------------------------------- idf token weights of the mean
CORPUS = ["the kinase binds the receptor", "the acid and the base", "the function returns the value",
          "the patient and the vaccine", "the cell and the membrane"] * 4


def test_idf_weights_follow_document_frequency_and_weight_the_mean(joint):
    info = joint.fit_token_weights(CORPUS, power=2.0)
    assert joint.config.token_weighting == "idf" and info["documents"] == len(CORPUS)
    w = joint.token_weight
    the, = joint.tokenize(["the"])
    kinase = joint.tokenize(["kinase"])[0]
    assert w[the[0]] < min(w[i] for i in kinase)               # in every document: weighs least
    assert w[joint.tokenizer.vocab_size - 1] == w.max()         # never seen: rare = the largest weight
    ids, mask = pad_right(joint.tokenize(TEXTS), joint.tokenizer.pad_token_id)
    with torch.no_grad():
        enc = joint.encode_batch(ids, mask)
        k = joint.num_bottleneck
        want = []
        for i, n in enumerate(mask.sum(1).tolist()):
            h = enc.hidden[i, : n + k]
            wi = torch.cat([w[ids[i, :n]], torch.ones(k)])      # text rows their weight, bottleneck rows 1
            want.append(torch.nn.functional.normalize(joint.w_mu((h * wi[:, None]).sum(0) / wi.sum()), dim=-1))
        got = joint.embed_from_encoded(enc)
    torch.testing.assert_close(got, torch.stack(want), atol=1e-5, rtol=0)
    alone = np.stack([joint.encode([t])[0] for t in TEXTS])
    mixed = joint.encode(TEXTS[::-1] + ["x " * 50], batch_size=5)[:4][::-1]
    np.testing.assert_allclose(alone, mixed, atol=1e-5)          # still padding- and batch-invariant


def test_stage2_idf_corpus_fits_weights_that_travel_with_the_model(tiny_backbone, tmp_path):
    import json

    torch.manual_seed(0)
    LBRModel.from_backbone(tiny_backbone, num_bottleneck=2).save_pretrained(tmp_path / "s1")
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"_id": str(i), "text": t}) + "\n"
                                                   for i, t in enumerate(CORPUS)))
    ov = ["stage=contrastive", "stage2.readout=joint", f"stage2.idf_corpus={tmp_path / 'corpus.jsonl'}"]
    m = prepare_model(load_train_config(None, ov), tmp_path / "s1")
    assert m.config.token_weighting == "idf" and m.token_weight.std() > 0
    m.save_pretrained(tmp_path / "s2")
    back = LBRModel.from_pretrained(tmp_path / "s2")
    torch.testing.assert_close(back.token_weight, m.token_weight)
    np.testing.assert_allclose(back.encode(TEXTS), m.encode(TEXTS), atol=1e-6)
    # the LLM+CL baseline's mean pooling takes the same weights
    base = prepare_model(load_train_config(None, ["stage=contrastive", "baseline=llm_cl", "model.pooling=mean",
                                                  f"stage2.idf_corpus={tmp_path / 'corpus.jsonl'}"]), tiny_backbone)
    assert base.config.token_weighting == "idf"
    with pytest.raises(ValueError, match="needs mean pooling or the joint readout"):   # nothing to weight
        prepare_model(load_train_config(None, ["stage=contrastive", f"stage2.idf_corpus={tmp_path / 'corpus.jsonl'}"]),
                      tmp_path / "s1")
    (tmp_path / "bad.jsonl").write_text('{"_id": "a", "text": "ok"}\n{"_id": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing field: .text."):                        # a bad record names itself
        prepare_model(load_train_config(None, ov[:2] + [f"stage2.idf_corpus={tmp_path / 'bad.jsonl'}"]),
                      tmp_path / "s1")
    joint_m = LBRModel.from_backbone(tiny_backbone, num_bottleneck=2, readout="joint")
    with pytest.raises(ValueError, match="no texts"):
        joint_m.fit_token_weights([])


def test_weights_fitted_once_load_without_the_corpus(tiny_backbone, tmp_path):
    """The Ray driver fits once and saves the weights; workers and the export load that file and never
    read the corpus again (here it is gone), getting the same weights and the fit summary."""
    import json

    from pipeline.train.start_model import save_token_weights

    torch.manual_seed(0)
    LBRModel.from_backbone(tiny_backbone, num_bottleneck=2).save_pretrained(tmp_path / "s1")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": str(i), "text": t}) + "\n" for i, t in enumerate(CORPUS)))
    cfg = load_train_config(None, ["stage=contrastive", "stage2.readout=joint", f"stage2.idf_corpus={corpus}"])
    fitted = prepare_model(cfg, tmp_path / "s1")
    assert fitted.token_weight_info["documents"] == len(CORPUS)
    f = save_token_weights(fitted, tmp_path / "w.safetensors")
    corpus.unlink()
    with pytest.raises(FileNotFoundError):
        prepare_model(cfg, tmp_path / "s1")                      # fitting would need the corpus ...
    loaded = prepare_model(cfg, tmp_path / "s1", token_weights=f)   # ... loading does not
    torch.testing.assert_close(loaded.token_weight, fitted.token_weight)
    assert loaded.token_weight_info["documents"] == len(CORPUS) and loaded.token_weight_info["loaded_from"] == str(f)
    with pytest.raises(ValueError, match="shape"):
        loaded.set_token_weights(torch.ones(3))
    with pytest.raises(ValueError, match="finite and > 0"):
        loaded.set_token_weights(torch.zeros_like(loaded.token_weight))


def test_idf_corpus_is_read_from_a_uri_in_any_stage1_layout(tiny_backbone, tmp_path):
    """stage2.idf_corpus takes what a stage-1 corpus takes: a file:// URI (any pyarrow filesystem) and a
    Parquet folder give the same weights as the local JSONL file."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    torch.manual_seed(0)
    LBRModel.from_backbone(tiny_backbone, num_bottleneck=2).save_pretrained(tmp_path / "s1")
    rows = [{"_id": str(i), "text": t} for i, t in enumerate(CORPUS)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:3]), tmp_path / "pq" / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[3:]), tmp_path / "pq" / "b.parquet")

    def weights(corpus):
        cfg = load_train_config(None, ["stage=contrastive", "stage2.readout=joint", f"stage2.idf_corpus={corpus}"])
        return prepare_model(cfg, tmp_path / "s1").token_weight

    local = weights(tmp_path / "corpus.jsonl")
    torch.testing.assert_close(weights(f"file://{tmp_path / 'corpus.jsonl'}"), local)
    torch.testing.assert_close(weights(f"file://{tmp_path / 'pq'}"), local)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        weights(f"file://{tmp_path / 'missing.jsonl'}")


# ---------------------------------------------------------------------- dual readout
def test_dual_readout_adds_the_unprojected_mean_to_the_heads_unit_vector(tiny_backbone, tmp_path):
    """normalize(normalize(W_mu m + b) + normalize(m)): a head that squeezes a direction of m to zero
    still leaves that direction in the embedding (the joint readout loses it)."""
    torch.manual_seed(0)
    m = LBRModel.from_backbone(tiny_backbone, num_bottleneck=3, readout="dual")
    d = m.hidden_size
    with torch.no_grad():                      # a rank-1 head: joint embeddings of all texts are parallel
        m.w_mu.weight.copy_(torch.outer(torch.ones(d), torch.randn(d)))
        m.w_mu.bias.zero_()
    m.eval()
    ids, mask = pad_right(m.tokenize(TEXTS), m.tokenizer.pad_token_id)
    with torch.no_grad():
        enc = m.encode_batch(ids, mask)
        got = m.embed_from_encoded(enc)
        k, nz = m.num_bottleneck, torch.nn.functional.normalize
        want = []
        for i, n in enumerate(mask.sum(1).tolist()):
            mean = enc.hidden[i, : n + k].mean(0)
            want.append(nz(nz(m.w_mu(mean), dim=-1) + nz(mean, dim=-1), dim=-1))
    torch.testing.assert_close(got, torch.stack(want), atol=1e-5, rtol=0)
    sims = got @ got.T
    assert sims[~torch.eye(len(TEXTS), dtype=torch.bool)].abs().max() < 0.999    # texts still told apart
    m.set_readout("joint")
    joint = m.embed_from_encoded(m.encode_batch(ids, mask)).detach()
    assert (joint @ joint.T).abs().min() > 0.999                                   # the rank-1 head alone cannot
    m.set_readout("dual")
    alone = np.stack([m.encode([t])[0] for t in TEXTS])
    mixed = m.encode(TEXTS[::-1] + ["x " * 50], batch_size=5)[:4][::-1]
    np.testing.assert_allclose(alone, mixed, atol=1e-5)                           # padding- and batch-invariant
    m.save_pretrained(tmp_path / "dual")
    np.testing.assert_allclose(LBRModel.from_pretrained(tmp_path / "dual").encode(TEXTS), m.encode(TEXTS), atol=1e-6)


def test_dual_readout_refuses_a_latent_size_it_cannot_add(tiny_backbone, tmp_path):
    with pytest.raises(ValueError, match="readout='dual'.*latent_dim"):
        LBRModel.from_backbone(tiny_backbone, num_bottleneck=2, latent_dim=16, readout="dual")
    torch.manual_seed(0)
    LBRModel.from_backbone(tiny_backbone, num_bottleneck=2, latent_dim=16).save_pretrained(tmp_path / "s1")
    with pytest.raises(ValueError, match="readout='dual'.*latent_dim"):             # stage 2's switch checks too
        prepare_model(load_train_config(None, ["stage=contrastive", "stage2.readout=dual"]), tmp_path / "s1")
    from stages.st_export import export_sentence_transformers

    dual = LBRModel.from_backbone(tiny_backbone, num_bottleneck=2, readout="dual")
    with pytest.raises(ValueError, match="no stock sentence-transformers"):
        export_sentence_transformers(dual, tmp_path / "st")
    assert not (tmp_path / "st").exists()
