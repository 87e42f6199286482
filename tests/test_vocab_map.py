"""MinED vocabulary-map builder: notation handling, tie rule and files (the agreement with the
published maps: test_published_assets)."""
from __future__ import annotations

import json

import pytest

from mckd.data import vocab_map as vm


@pytest.fixture(scope="module")
def tokenizers(any_tokenizer):
    return any_tokenizer


# --------------------------------------------------------------------------- notation
def test_byte_alphabet_is_a_bijection_with_gpt2_conventions():
    table = vm.byte_to_unicode()
    assert len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"
    assert all(len(c) == 1 and c.isprintable() for c in table.values())


def test_vocabulary_style_is_read_from_the_vocabulary(tokenizers):
    check_vocabulary_styles(tokenizers, "tiny-")


def check_vocabulary_styles(tokenizers, kind):
    assert vm.vocabulary_style(vm.vocabulary_tokens(tokenizers(kind + "gpt2"))) == vm.BYTE_LEVEL
    assert vm.vocabulary_style(vm.vocabulary_tokens(tokenizers(kind + "qwen"))) == vm.BYTE_LEVEL
    assert vm.vocabulary_style(vm.vocabulary_tokens(tokenizers(kind + "mistral"))) == vm.SENTENCEPIECE
    assert vm.vocabulary_style(["a", "b", "ab"]) == vm.PLAIN
    # the class name plays no role: a made-up SentencePiece-like list is recognised
    assert vm.vocabulary_style(["▁the", "▁a", "x", "▁of"]) == vm.SENTENCEPIECE


@pytest.mark.parametrize("token,expected", [
    ("▁hello", "Ġhello"),
    ("<0x0A>", "Ċ"),
    ("▁▁", "ĠĠ"),
    ("é", "Ã©"),                  # UTF-8 bytes C3 A9 in byte-level characters
])
def test_sentencepiece_to_byte_level(token, expected):
    assert vm.to_student_notation(token, vm.SENTENCEPIECE, vm.BYTE_LEVEL) == expected


@pytest.mark.parametrize("token,expected", [
    ("Ġhello", "▁hello"),
    ("Ċ", "\n"),
    ("Ã©", "é"),
    ("ä¸", "<0xE4><0xB8>"),       # a piece of a multi-byte character: byte tokens
    ("<|im_start|>", "<|im_start|>"),  # added token with characters outside the byte alphabet
])
def test_byte_level_to_sentencepiece(token, expected):
    assert vm.to_student_notation(token, vm.BYTE_LEVEL, vm.SENTENCEPIECE) == expected


def test_same_notation_leaves_strings_alone():
    for style in (vm.BYTE_LEVEL, vm.SENTENCEPIECE, vm.PLAIN):
        assert vm.to_student_notation("Ġx▁y", style, style) == "Ġx▁y"


def test_cross_notation_exact_match_uses_the_student_marker():
    student = ["!", "Ġhello", "hello", "Ġworld"] + [c for c in vm.byte_to_unicode().values() if c != "!"]
    teacher = ["▁hello", "hello", "▁world", "▁the", "▁a", "▁of", "<0x0A>"]
    mapping = vm.build_vocab_map(teacher, student)
    assert mapping[:3] == [1, 2, 3]
    assert student[mapping[6]] == "Ċ"


# --------------------------------------------------------------------------- nearest + ties
def test_ties_go_to_the_smallest_student_id():
    student = ["zzz", "abd", "abe", "xbc"]           # all at distance 1 from "abc" except "zzz"
    assert vm.build_vocab_map(["abc"], student) == [1]
    assert vm.build_vocab_map(["abc"], ["zzz", "xbc", "abd", "abe"]) == [1]


def test_exact_match_wins_and_duplicates_take_the_first_id():
    student = ["ab", "abc", "abc", "abcd"]
    assert vm.build_vocab_map(["abc", "abcd", "abcde"], student) == [1, 3, 3]


def test_nearest_matches_a_brute_force_loop():
    from rapidfuzz.distance import Levenshtein

    student = ["the", "then", "there", "Ġthe", "a", "an", "and", "x", "hello", "help"]
    queries = ["tha", "thee", "Ġth", "anda", "hel", "q", "helo", ""]
    got = vm.nearest_by_edit_distance(queries, student, chunk_size=3).tolist()
    for q, g in zip(queries, got):
        dists = [Levenshtein.distance(q, s) for s in student]
        assert g == dists.index(min(dists)), q


def test_special_pairs_override_the_string_rules():
    assert vm.build_vocab_map(["<eos>", "b"], ["b", "<eos>", "</s>"], special_pairs=[(0, 2)]) == [2, 0]


# --------------------------------------------------------------------------- files
def test_save_and_load_round_trip(tmp_path):
    path = vm.save_vocab_map([3, 1, 4, 1], tmp_path / "sub" / "map.json")
    assert json.loads(path.read_text()) == {"0": 3, "1": 1, "2": 4, "3": 1}
    assert vm.load_vocab_map(path) == [3, 1, 4, 1]
    assert [p.name for p in path.parent.iterdir()] == ["map.json"]  # no temporary left behind


def test_load_rejects_gaps_and_non_integers(tmp_path):
    gap = tmp_path / "gap.json"
    gap.write_text(json.dumps({"0": 1, "2": 3}))
    with pytest.raises(ValueError, match="gap.json.*0..1"):
        vm.load_vocab_map(gap)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"0": "x"}))
    with pytest.raises(ValueError, match="bad.json"):
        vm.load_vocab_map(bad)


def test_load_or_build_caches_and_respects_an_explicit_path(tmp_path, tokenizers):
    gpt2 = tokenizers("tiny-gpt2")
    mapping, path = vm.load_or_build_vocab_map(None, gpt2, gpt2, cache_dir=tmp_path / "cache")
    assert mapping == list(range(len(gpt2)))          # same vocabulary: the identity
    assert path.parent == tmp_path / "cache" and path.is_file()
    path.write_text(json.dumps({str(i): 0 for i in range(len(gpt2))}))   # the cache is what is read
    assert vm.load_or_build_vocab_map(None, gpt2, gpt2, cache_dir=tmp_path / "cache")[0][5] == 0
    explicit = tmp_path / "given" / "map.json"
    mapping2, path2 = vm.load_or_build_vocab_map(explicit, gpt2, gpt2, cache_dir=tmp_path / "cache")
    assert path2 == explicit and explicit.is_file() and mapping2 == list(range(len(gpt2)))


def test_cli_writes_the_published_format(tmp_path, capsys, stand_in_hub, tokenizers):
    out = tmp_path / "map.json"
    gpt2 = str(stand_in_hub / "gpt2")
    assert vm.main(["--teacher", gpt2, "--student", gpt2, "--out", str(out), "--workers", "1"]) == 0
    data = json.loads(out.read_text())
    n, eos = len(tokenizers("tiny-gpt2")), tokenizers("tiny-gpt2").eos_token_id
    assert list(data) == [str(i) for i in range(n)] and data[str(eos)] == eos
    assert "wrote" in capsys.readouterr().out

