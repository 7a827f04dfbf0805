"""Inverse-cloze pairs from unlabelled text (pipeline.pseudo_pairs): one sentence out, the rest in."""
import pytest

from pipeline.pseudo_pairs import ict_pairs, is_prose, sentences

PASSAGES = [
    ("Furfural is made from bagasse. The acid hydrolysis of the hemicellulose gives the highest yield here. "
     "Costs were computed for a rural plant. Yields reached twelve percent by weight."),
    ("Title line\n\nThe catalyst was dried at room temperature overnight before use. It was then calcined. "
     "Its surface area was measured by nitrogen adsorption at low temperature."),
    "Too short. Two sentences.",
    ("Smith, J.; Doe, A.; Roe, B. Chem. Rev. 2020, 12, 345-367. Lee, K.; Kim, H. J. Am. Chem. Soc. 2019, 8, 1-9. "
     "Wu, X.; Li, Y.; Z. Angew. Chem. 2018, 7, 10-20."),
]


def test_query_is_one_sentence_of_the_passage_and_is_removed_from_the_positive():
    pairs = ict_pairs(PASSAGES, 10, seed=3, keep_prob=0.0, domain="chemistry")
    assert len(pairs) == 2                       # the two-sentence text and the reference list do not qualify
    for p in pairs:
        src = next(t for t in PASSAGES if p["query"] in " ".join(t.split()))
        assert p["query"] in sentences(src)
        assert p["query"] not in p["positive"]
        assert set(sentences(p["positive"])) < set(sentences(src))
        assert p["domain"] == "chemistry" and len(p["query"].split()) >= 6


def test_keep_prob_one_keeps_the_sentence_and_pairs_are_seeded():
    kept = ict_pairs(PASSAGES, 10, seed=3, keep_prob=1.0)
    assert all(p["query"] in p["positive"] and "domain" not in p for p in kept)
    assert ict_pairs(PASSAGES, 10, seed=5) == ict_pairs(PASSAGES, 10, seed=5)
    assert len(ict_pairs(PASSAGES, 1, seed=5)) == 1
    with pytest.raises(ValueError, match="keep_prob"):
        ict_pairs(PASSAGES, 1, seed=0, keep_prob=2.0)


def test_reference_lines_are_not_prose():
    assert not is_prose("Smith, J.; Doe, A.; Roe, B. Chem. Rev. 2020, 12, 345-367.")
    assert is_prose("The catalyst was dried at room temperature overnight before use.")
