"""Export: a trained folder loads in sentence-transformers and gives LBRModel.encode's vectors."""
import numpy as np
import torch

from stages import LBRModel

TEXTS = ["protein kinase receptor", "def parse(path): return open(path).read()", "acid", "a " * 40]


def test_sentence_transformers_loads_folder_with_same_vectors(tiny_backbone, tmp_path):
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    for name, kwargs in {"lbr": {"num_bottleneck": 4, "lora_r": 4}, "last": {"pooling": "last"}}.items():
        m = LBRModel.from_backbone(tiny_backbone, **kwargs)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.01)           # "trained": differs from the backbone
        m.save_pretrained(tmp_path / name)
        # custom module outside the sentence_transformers namespace: ST asks for trust_remote_code
        st = SentenceTransformer(str(tmp_path / name), device="cpu", local_files_only=True, trust_remote_code=True)
        got = st.encode(TEXTS, batch_size=3, convert_to_numpy=True)
        want = LBRModel.from_pretrained(tmp_path / name).encode(TEXTS)
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert st.get_sentence_embedding_dimension() == m.embedding_dim


def test_mteb_style_encode_signature(tiny_backbone):
    m = LBRModel.from_backbone(tiny_backbone, num_bottleneck=2)
    a = m.encode(sentences=TEXTS, batch_size=2, task_name="Retrieval", prompt_type="query", show_progress_bar=False)
    assert a.shape == (4, m.embedding_dim) and a.dtype == np.float32
    np.testing.assert_allclose(m.encode(TEXTS[0]), a[0], atol=1e-6)
