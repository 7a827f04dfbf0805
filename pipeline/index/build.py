"""Corpus -> published index: check everything cheap first, embed (Ray Data actors or in process),
build the shards and publish one version (what `jobs.build_index` and the end-to-end job run)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipeline.index.embed import (
    EmbedConfig,
    doc_texts,
    embed_docs_local,
    embed_to_parquet,
    load_encoder,
    model_identity,
    read_embeddings,
)
from pipeline.index.layout import work_dir
from pipeline.index.manifest import check_out
from pipeline.index.publish import build_index
from pipeline.index.shards import IndexConfig, check_factory


def build_from_corpus(model_ref: str | os.PathLike, corpus: str | os.PathLike, out: str | os.PathLike,
                      cfg: IndexConfig, embed_cfg: EmbedConfig | None = None, overwrite: bool = False,
                      text_field: str | None = None) -> dict:
    """Embed `corpus` with `model_ref` and publish a sharded index at `out`; returns the manifest.

    Checked before Ray starts or a model loads, in order of cost: what `out` holds (new, empty, or an
    index with overwrite), the model folder, the factory string, the corpus. Embedding scratch space
    lives inside `out` and is removed afterwards (a killed run's is removed by the next build).
    """
    from stages.readers import read_corpus

    embed_cfg = embed_cfg or EmbedConfig()
    check_out(out, overwrite)
    model = model_identity(model_ref)  # the model folder is complete (config, weights, tokenizer)
    check_factory(cfg.factory, model["dimension"])
    docs = read_corpus(corpus, text_field=text_field)
    if not docs:
        raise ValueError(f"corpus {corpus} has no usable documents")
    check_factory(cfg.factory, model["dimension"], len(docs))
    model = {"path": model["path"], "fingerprint": model["fingerprint"]}
    if cfg.use_ray is False:
        emb = embed_docs_local(load_encoder(model["path"]), docs, embed_cfg.batch_size)
    else:
        ids, texts = doc_texts(docs)
        out = Path(out)
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        tmp = work_dir(out)
        try:
            emb = read_embeddings(embed_to_parquet(model["path"], ids, texts, tmp, embed_cfg))
        except BaseException:
            shutil.rmtree(out if created else tmp, ignore_errors=True)
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return build_index(out, emb.ids, emb.vectors, emb.hashes, cfg, model, overwrite=overwrite)
