"""Command-line contracts (issue 11, items 1, 5, 7, 8, 9, 10): what a command may replace, run folders
accepted wherever a model folder is, every argument checked before Ray or a model load, one-line
errors, and a fingerprint that covers the tokenizer."""
import json
import shutil

import pytest

from stages.synthetic import synthetic_retrieval

DATA = synthetic_retrieval(n_docs=40, n_train=20, queries_per_doc=1)
COMMON = ["engine.kind=torch", "log_every=1", "batch_size=4", "model.num_bottleneck=2",
          "stage1.context_len=16", "stage1.target_len=8", "optim.schedule=constant"]


def _one_error_line(capsys) -> str:
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip() and not x.startswith("note:")]
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": k, "text": v["text"]}) + "\n" for k, v in DATA["corpus"].items()))
    beir = tmp / "beir"
    (beir / "qrels").mkdir(parents=True)
    shutil.copy(corpus, beir / "corpus.jsonl")
    (beir / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"q{i}", "text": q}) + "\n" for i, (q, _) in enumerate(DATA["train"])))
    (beir / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\t{d}\t1\n" for i, (_, d) in enumerate(DATA["train"])))
    return {"tmp": tmp, "corpus": corpus, "beir": beir}


@pytest.fixture(scope="module")
def stage1_run(files, tiny_backbone):
    from jobs import train

    run = files["tmp"] / "s1"
    assert train.main(["--stage", "generative", "--model", str(tiny_backbone), "--data", str(files["corpus"]),
                       "--out", str(run), "--steps", "2", *COMMON]) == 0
    return run


def test_train_overwrite_validates_first_and_removes_only_its_own_files(files, stage1_run, tiny_backbone, capsys):
    from jobs import train

    run = files["tmp"] / "s1-copy"
    shutil.copytree(stage1_run, run)
    (run / "my_notes.txt").write_text("not the run's")
    report = (run / "report.json").read_bytes()
    args = ["--stage", "generative", "--model", str(tiny_backbone), "--out", str(run), "--steps", "2", *COMMON]
    # refused without --overwrite; with it, bad inputs fail before anything is removed
    assert train.main([*args, "--data", str(files["corpus"])]) == 2
    assert "--overwrite" in _one_error_line(capsys)
    assert train.main([*args, "--data", str(files["tmp"] / "nope.jsonl"), "--overwrite"]) == 2
    assert "nope.jsonl" in _one_error_line(capsys)
    assert (run / "report.json").read_bytes() == report and (run / "model").is_dir()
    assert train.main([*args, "--data", str(files["corpus"]), "--overwrite"]) == 0
    assert (run / "my_notes.txt").read_text() == "not the run's"
    assert (run / "report.json").exists() and (run / "model" / "lbr_config.json").exists()


def test_rerun_replaces_quarantine_instead_of_appending(files, tiny_backbone, tmp_path):
    from jobs import train

    bad = tmp_path / "bad.jsonl"
    bad.write_text(files["corpus"].read_text() + "{broken\n" * 5)
    args = ["--stage", "generative", "--model", str(tiny_backbone), "--data", str(bad), "--out", str(tmp_path / "r"),
            "--steps", "1", *COMMON, "data.skip_bad_records=true"]
    (tmp_path / "not_a_model").mkdir()
    failing = [*args[:3], str(tmp_path / "not_a_model"), *args[4:]]
    assert train.main(failing) == 2                       # a failed run: the model is unusable
    assert train.main(args) == 0                          # re-run: the quarantine is this run's alone
    assert len((tmp_path / "r" / "quarantine.jsonl").read_text().splitlines()) == 5
    assert train.main([*args, "--overwrite"]) == 0
    assert len((tmp_path / "r" / "quarantine.jsonl").read_text().splitlines()) == 5
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["bad_records"]["bad_records"] == 5
    assert rep["bad_records"]["quarantine_file"] == str(tmp_path / "r" / "quarantine.jsonl")


def test_run_folder_is_accepted_wherever_a_model_folder_is(files, stage1_run, tmp_path, capsys, monkeypatch):
    import pipeline.evaluate as pe
    from jobs import build_index, evaluate, mine_negatives, search, train

    assert train.main(["--stage", "contrastive", "--model", str(stage1_run), "--data", str(files["beir"]),
                       "--out", str(tmp_path / "s2"), "--steps", "1", *COMMON]) == 0
    assert "is a run folder" in capsys.readouterr().err
    ix = tmp_path / "ix"
    assert build_index.main(["--model", str(stage1_run), "--corpus", str(files["corpus"]), "--out", str(ix),
                             "--shards", "2", "--no-ray"]) == 0
    assert search.main(["--index", str(ix), "--model", str(stage1_run), "--query", "x", "-k", "3"]) == 0
    assert len(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["hits"]) == 3
    got = {}

    def fake_eval(retriever, folders, cfg, loaded=None):     # (ranx's first-call JIT costs ~30 s on 2 cores)
        got["retriever"] = retriever
        return {"beir": {"ndcg@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0, "num_queries": 0}}

    monkeypatch.setattr(pe, "evaluate_folders", fake_eval)
    assert evaluate.main(["--model", str(stage1_run), "--data", str(files["beir"]),
                          "--out", str(tmp_path / "r.json")]) == 0
    assert isinstance(got["retriever"], pe.DenseRetriever)
    assert mine_negatives.main(["--model", str(stage1_run), "--data", str(files["beir"]), "--out",
                                str(tmp_path / "n.parquet"), "--no-ray", "--top-k", "10", "--num-negatives", "1",
                                "--range-min", "1", "--range-max", "10", "--margin", "0",
                                "--max-without-negatives", "1"]) in (0, 3)


def test_tune_defaults_stage1_text_to_the_training_corpus(ray_session, files, tiny_backbone, monkeypatch, capsys):
    import pipeline.tune as lt
    from jobs import tune

    seen = {}

    def stop(ctx, resume=False):
        seen.update(ctx)
        raise ValueError("stopped before Ray (test)")

    monkeypatch.setattr(lt, "run_search", stop)
    rc = tune.main(["--model", str(tiny_backbone), "--train", str(files["beir"]), "--dev", str(files["beir"]),
                    "--out", str(files["tmp"] / "tune"), "--trials", "1", "--steps", "2", "batch_size=4",
                    "stage2.num_negatives=0", "tune.stage1_steps=2", "log_every=1", "tune.eval_every=1"])
    err = capsys.readouterr().err
    assert rc == 2 and "stopped before Ray" in err, err
    assert "stage 1 trains on" in err and seen["stage1_data"] == str((files["beir"] / "corpus.jsonl").resolve())

    # every record is checked before the first trial (Ray Data's check pass, the driver holds no rows): a bad
    # line in the corpus fails the search with its file and line
    bad = files["tmp"] / "beir_bad"
    shutil.copytree(files["beir"], bad)
    lines = (bad / "corpus.jsonl").read_text().splitlines()
    (bad / "corpus.jsonl").write_text("\n".join(lines[:3] + ['{"_id": "x", "text": 7}'] + lines[3:]) + "\n")
    seen.clear()
    rc = tune.main(["--model", str(tiny_backbone), "--train", str(bad), "--dev", str(files["beir"]),
                    "--out", str(files["tmp"] / "tune_bad"), "--trials", "1", "--steps", "2", "batch_size=4",
                    "stage2.num_negatives=0", "tune.stage1_steps=2", "log_every=1", "tune.eval_every=1"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{bad / 'corpus.jsonl'}:4:" in err and not seen, err


def test_fingerprint_covers_the_tokenizer(files, stage1_run, tmp_path, capsys):
    from jobs import build_index, search
    from pipeline.model_paths import model_fingerprint

    model = stage1_run / "model"
    other = tmp_path / "other"
    shutil.copytree(model, other)
    tj = other / "tokenizer" / "tokenizer.json"
    tok = json.loads(tj.read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]             # swap two ids: same weights, other vectors
    vocab[a], vocab[b] = vocab[b], vocab[a]
    tj.write_text(json.dumps(tok))
    assert model_fingerprint(other) != model_fingerprint(model)
    ix = tmp_path / "ix"
    assert build_index.main(["--model", str(model), "--corpus", str(files["corpus"]), "--out", str(ix),
                             "--shards", "1", "--no-ray"]) == 0
    capsys.readouterr()
    assert search.main(["--index", str(ix), "--model", str(other), "--query", "x"]) == 2
    assert "fingerprint" in _one_error_line(capsys)


def test_arguments_are_checked_before_embedding_or_ray(files, stage1_run, tmp_path, monkeypatch, capsys):
    import jobs.build_index as bi
    import pipeline.index.build as pib
    import pipeline.index.stage as pis
    from jobs import mine_negatives, search

    def boom(*a, **k):
        raise AssertionError("embedding started before the arguments were checked")

    monkeypatch.setattr(pib, "stage_corpus", boom)
    monkeypatch.setattr(pis, "load_encoder", boom)
    base = ["--model", str(stage1_run), "--corpus", str(files["corpus"]), "--out", str(tmp_path / "ix")]
    assert bi.main([*base, "--factory", "IVFgarbage"]) == 2
    assert "IVFgarbage" in _one_error_line(capsys)
    assert bi.main([*base, "--factory", "IVF4096,Flat"]) == 2               # more lists than documents
    assert "nlist=4096" in _one_error_line(capsys)
    for bad in (["--nprobe", "0"], ["--shards", "0"], ["--batch-size", "-1"], ["--cpus-per-actor", "0"]):
        with pytest.raises(SystemExit) as e:
            bi.main([*base, *bad])
        assert e.value.code == 2 and "must be" in _one_error_line(capsys)
    assert not (tmp_path / "ix").exists()
    assert mine_negatives.main(["--model", "/nope", "--data", str(files["beir"]), "--out",
                                str(tmp_path / "n.parquet")]) == 2
    assert "/nope" in _one_error_line(capsys)
    for bad in (["-k", "0"], ["--nprobe", "0"], ["--ef-search", "0"]):
        with pytest.raises(SystemExit) as e:
            search.main(["--index", str(tmp_path / "ix"), "--query", "x", *bad])
        assert e.value.code == 2 and "must be >= 1" in _one_error_line(capsys)


def test_searcher_refuses_nonpositive_search_parameters(tmp_path):
    import numpy as np

    from pipeline.index.build import build_index
    from pipeline.index.search import Searcher
    from pipeline.index.shards import IndexConfig

    x = np.eye(4, dtype=np.float32)
    build_index(tmp_path / "ix", ["a", "b", "c", "d"], x, ["1", "2", "3", "4"], IndexConfig(shards=1, use_ray=False),
                {"path": "hashing:4", "fingerprint": "hashing:4"})
    for kw in ({"nprobe": 0}, {"ef_search": 0}):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            Searcher(tmp_path / "ix", **kw)
    with pytest.raises(ValueError, match="k must be"):
        Searcher(tmp_path / "ix").search_vectors(x, 0)


def test_non_utf8_input_is_named_by_file_and_line_in_every_data_cli(files, tiny_backbone, tmp_path, capsys):
    from jobs import build_index, evaluate, mine_negatives, reindex, search, train

    bad_line = b'{"_id": "zz", "text": "caf\xe9"}\n'
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(files["corpus"].read_bytes() + bad_line)
    beir = tmp_path / "beir"
    shutil.copytree(files["beir"], beir)
    (beir / "queries.jsonl").write_bytes((beir / "queries.jsonl").read_bytes() + b'{"_id": "qz", "text": "\xff"}\n')
    n_corpus = len(corpus.read_bytes().splitlines())
    n_queries = len((beir / "queries.jsonl").read_bytes().splitlines())
    ix = tmp_path / "ix"
    assert build_index.main(["--model", "hashing:8", "--corpus", str(files["corpus"]), "--out", str(ix),
                             "--no-ray", "--shards", "1"]) == 0
    qfile = tmp_path / "q.jsonl"
    qfile.write_bytes(b'{"_id": "1", "text": "fine"}\n{"_id": "2", "text": "\xc3\x28"}\n')
    cases = [
        (build_index.main, ["--model", "hashing:8", "--corpus", str(corpus), "--out", str(tmp_path / "ix2"),
                            "--no-ray"], f"corpus.jsonl:{n_corpus}: invalid UTF-8"),
        (reindex.main, ["--index", str(ix), "--corpus", str(corpus), "--no-ray"], f"corpus.jsonl:{n_corpus}: invalid UTF-8"),
        (search.main, ["--index", str(ix), "--queries", str(qfile), "--out", str(tmp_path / "run.jsonl")],
         "q.jsonl:2: invalid UTF-8"),
        (evaluate.main, ["--baseline", "bm25", "--data", str(beir), "--out", str(tmp_path / "r.json")],
         f"queries.jsonl:{n_queries}: invalid UTF-8"),
        (mine_negatives.main, ["--model", "hashing:8", "--data", str(beir), "--out", str(tmp_path / "n.parquet"),
                               "--no-ray"], f"queries.jsonl:{n_queries}: invalid UTF-8"),
        (train.main, ["--stage", "generative", "--model", str(tiny_backbone), "--data", str(corpus),
                      "--out", str(tmp_path / "run"), *COMMON], f"corpus.jsonl:{n_corpus}: invalid UTF-8"),
    ]
    capsys.readouterr()
    for main, argv, where in cases:
        assert main(argv) == 2, argv
        assert where in _one_error_line(capsys), (argv, where)
    assert not (tmp_path / "ix2").exists() and not (tmp_path / "run").exists()
