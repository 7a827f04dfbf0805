"""One named test per invariant of DESIGN.md §1 ("What an implementation must get right")."""
import numpy as np
import pytest
import torch

from pipeline.config import load_train_config
from pipeline.train.start_model import prepare_model
from stages import LBRModel
from stages.losses import comp_loss
from stages.model import pad_right
from stages.objectives import (
    Stage1Config,
    Stage2Config,
    compute_loss_stage1,
    compute_loss_stage2,
    stage1_arrays,
    stage2_arrays,
    to_tensors,
)

TEXTS = ["protein kinase receptor binding in the cell membrane", "return value of the parse function",
         "acid base salt", "the patient received a vaccine against the virus and the immune system answered"]


@pytest.fixture()
def model(tiny_backbone):
    torch.manual_seed(0)
    return LBRModel.from_backbone(tiny_backbone, num_bottleneck=4)


def _ids(model, texts):
    return pad_right(model.tokenize(texts), model.tokenizer.pad_token_id)


def test_1_decode_cannot_see_context(model):
    """Changing c with z fixed leaves decode logits unchanged; L_comp reaches the encoder only via z."""
    model.eval()
    t_ids, t_mask = _ids(model, ["enzyme catalyst reaction solvent"])
    ids_a, mask_a = _ids(model, [TEXTS[0]])
    ids_b, mask_b = _ids(model, [TEXTS[1]])
    z = model.encode_batch(ids_a, mask_a).z.detach()
    la = model.decode_logits(z, t_ids, t_mask)
    model.encode_batch(ids_b, mask_b)                      # a different context passes through the LM
    lb = model.decode_logits(z, t_ids, t_mask)
    assert torch.equal(la, lb)
    # a different z does change the logits (the decode pass really reads z)
    assert not torch.allclose(la, model.decode_logits(z + 1.0, t_ids, t_mask))

    # gradient path: dL/d(context embeddings) equals the chain rule through z alone
    emb = model.token_embeddings(ids_a).detach().requires_grad_(True)
    orig = model.token_embeddings
    model.token_embeddings = lambda ids: emb if ids.shape == ids_a.shape and torch.equal(ids, ids_a) else orig(ids)
    try:
        enc = model.encode_batch(ids_a, mask_a)
        loss = comp_loss(model.decode_logits(enc.z, t_ids, t_mask), t_ids, t_mask)
        g_direct, = torch.autograd.grad(loss, emb, retain_graph=True)
        g_z, = torch.autograd.grad(loss, enc.z, retain_graph=True)
        g_chain, = torch.autograd.grad(enc.z, emb, grad_outputs=g_z)
        # with z detached, the context receives no gradient at all
        loss_det = comp_loss(model.decode_logits(enc.z.detach(), t_ids, t_mask), t_ids, t_mask)
        assert torch.autograd.grad(loss_det, emb, allow_unused=True)[0] is None
    finally:
        del model.token_embeddings
    assert g_direct.abs().sum() > 0
    torch.testing.assert_close(g_direct, g_chain, rtol=1e-5, atol=1e-7)


def test_2_causal_attention_prefix_states_unchanged(model):
    """Encoding x alone and x followed by more text gives the same states for x."""
    model.eval()
    x = model.tokenize([TEXTS[0]])[0]
    more = x + model.tokenize([" and more words follow here"])[0]
    ia, ma = pad_right([x], 3)
    ib, mb = pad_right([more], 3)
    ha = model.encode_batch(ia, ma).hidden[0, : len(x)]
    hb = model.encode_batch(ib, mb).hidden[0, : len(x)]
    torch.testing.assert_close(ha, hb, rtol=1e-5, atol=1e-6)
    # and a bidirectional leak would show: the suffix changes the bottleneck, not the prefix
    assert not torch.allclose(model.encode_batch(ia, ma).mu, model.encode_batch(ib, mb).mu)


def test_3_inference_embedding_equals_training_embedding(model):
    """The embedding used in the contrastive loss (train mode, z sampled) is exactly encode()'s."""
    cfg = Stage2Config(lam=0.5)
    batch = to_tensors(stage2_arrays(model.tokenizer, TEXTS, TEXTS[::-1], None, cfg, fixed=True))
    model.train()
    enc = model.encode_batch(batch["q_ids"], batch["q_mask"], sample=True, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(enc.z, enc.mu)               # sampling really happened
    train_emb = model.embed_from_encoded(enc).detach().numpy()
    np.testing.assert_allclose(train_emb, model.encode(TEXTS), atol=1e-6)


def test_4_padding_and_batch_invariance(model):
    alone = np.stack([model.encode([t])[0] for t in TEXTS])
    batched = model.encode(TEXTS, batch_size=4)
    shuffled = model.encode(TEXTS[::-1] + ["x " * 60], batch_size=2)[:4][::-1]
    model.tokenizer.padding_side = "left"
    left = model.encode(TEXTS, batch_size=3)
    for other in (batched, shuffled, left):
        np.testing.assert_allclose(alone, other, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    assert batched.dtype == np.float32


def test_5_stage2_starts_from_stage1_checkpoint(tiny_backbone, tmp_path):
    """Stage 2 loads the stage-1 folder whole (weights, adapters, bottleneck rows, head); a plain
    backbone is refused unless it is the LLM+CL baseline."""
    torch.manual_seed(0)
    m1 = LBRModel.from_backbone(tiny_backbone, num_bottleneck=3, lora_r=4)
    with torch.no_grad():
        for p in m1.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)          # as if stage 1 trained them
    m1.save_pretrained(tmp_path / "stage1")
    cfg = load_train_config(None, ["stage=contrastive"])
    m2 = prepare_model(cfg, tmp_path / "stage1")
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert set(s1) == set(s2)
    assert any("lora_" in k for k in s1) and "bottleneck" in s1 and "w_mu.weight" in s1
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    np.testing.assert_allclose(m1.encode(TEXTS), m2.encode(TEXTS), atol=1e-6)
    with pytest.raises(ValueError, match="stage-1 output folder"):
        prepare_model(cfg, tiny_backbone)
    base = prepare_model(load_train_config(None, ["stage=contrastive", "baseline=llm_cl"]), tiny_backbone)
    assert base.num_bottleneck == 0 and base.config.pooling == "last"


def test_6_beta_and_lambda_zero_turn_terms_off_exactly(model):
    model.train()
    b1 = to_tensors(stage1_arrays(model.tokenizer, TEXTS, ["a", "b", "c", "d"], Stage1Config(), fixed=True))
    g = lambda: torch.Generator().manual_seed(3)
    l0, p0 = compute_loss_stage1(model, b1, Stage1Config(beta=0.0), generator=g())
    assert l0.item() == pytest.approx(p0["lm"] + p0["comp"], rel=1e-6)
    lb, pb = compute_loss_stage1(model, b1, Stage1Config(beta=0.5), generator=g())
    assert (lb - l0).item() == pytest.approx(0.5 * pb["rate"], rel=1e-4)
    # beta = 0: the rate term adds no gradient — only sampling noise reaches logvar, identical either way
    model.zero_grad()
    compute_loss_stage1(model, b1, Stage1Config(beta=0.0), generator=g())[0].backward()
    g0 = model.w_logvar.weight.grad.clone()
    model.zero_grad()
    (compute_loss_stage1(model, b1, Stage1Config(beta=1e-9), generator=g())[0]).backward()
    assert not torch.equal(g0, model.w_logvar.weight.grad)

    b2 = to_tensors(stage2_arrays(model.tokenizer, TEXTS, TEXTS[::-1], None, Stage2Config(), fixed=True))
    model.zero_grad()
    l2, p2 = compute_loss_stage2(model, b2, Stage2Config(lam=0.0, beta=0.0))
    assert "comp" not in p2 and l2.item() == pytest.approx(p2["cl"], rel=1e-6)
    l2.backward()
    assert model.prompt.weight.grad is None                # the decode pass never ran
    l3, p3 = compute_loss_stage2(model, b2, Stage2Config(lam=0.3, beta=0.0), generator=g())
    assert l3.item() == pytest.approx(p3["cl"] + 0.3 * p3["comp"], rel=1e-5)
