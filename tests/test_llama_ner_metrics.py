"""Entity-level NER scores on hand-made cases, against numbers computed by hand."""
import pytest

from tuning.ner_metrics import format_table, ner_scores, parse_entities

TYPES = ["人名", "地名", "机构名"]


def test_parse_entities():
    parsed = parse_entities(" 北京_地名 \n\n北京_地名\n没有\n坏行\n_地名\n张_三_人名\n联合国_")
    assert parsed.entities == {("北京", "地名"), ("张_三", "人名")}  # split on the last "_"; duplicates once
    assert parsed.malformed == ("坏行", "_地名", "联合国_")
    assert parse_entities("没有").entities == frozenset() and parse_entities("").malformed == ()
    assert parse_entities(None).entities == frozenset()


def test_scores_by_hand():
    gold = ["北京_地名\n张三_人名", "没有", "联合国_机构名\n北京_地名", "李四_人名"]
    pred = ["北京_地名\n张三_人名\n张三_人名",  # exact (duplicate counts once)
            "上海_地名",                    # fp 地名
            "联合国_地名\n北京_地名\n胡话",    # 联合国 wrong type: fp 地名 + fn 机构名; 北京 tp; 1 malformed
            "没有"]                         # fn 人名
    s = ner_scores(pred, gold, TYPES)
    # tp: 北京, 张三, 北京 = 3 ; fp: 上海, 联合国_地名 = 2 ; fn: 联合国_机构名, 李四 = 2
    assert (s["micro"]["tp"], s["micro"]["fp"], s["micro"]["fn"]) == (3, 2, 2)
    assert s["micro"]["precision"] == pytest.approx(3 / 5)
    assert s["micro"]["recall"] == pytest.approx(3 / 5)
    assert s["micro"]["f1"] == pytest.approx(0.6)
    per = s["per_type"]
    assert (per["人名"]["tp"], per["人名"]["fp"], per["人名"]["fn"]) == (1, 0, 1)
    assert per["人名"]["precision"] == 1.0 and per["人名"]["recall"] == 0.5
    assert per["人名"]["f1"] == pytest.approx(2 / 3)
    assert (per["地名"]["tp"], per["地名"]["fp"], per["地名"]["fn"]) == (2, 2, 0)
    assert per["地名"]["precision"] == 0.5 and per["地名"]["f1"] == pytest.approx(2 / 3)
    assert (per["机构名"]["tp"], per["机构名"]["fp"], per["机构名"]["fn"]) == (0, 0, 1)
    assert per["机构名"]["f1"] == 0.0
    assert s["exact_matches"] == 1 and s["exact_match"] == 0.25
    assert s["malformed_prediction_items"] == 1 and s["malformed_reference_items"] == 0
    assert "micro" in format_table(s, "dev")


def test_empty_and_none_cases():
    s = ner_scores(["没有", ""], ["没有", "没有"], TYPES)
    assert s["exact_match"] == 1.0 and s["micro"]["f1"] == 0.0 and s["micro"]["tp"] == 0  # 0/0 → 0.0
    assert s["empty_predictions"] == 1
    s = ner_scores([], [], TYPES)
    assert s["n_sentences"] == 0 and s["exact_match"] == 0.0
    s = ner_scores(["北京_城市"], ["北京_地名"], TYPES)  # an unknown type gets its own row, never hidden
    assert s["per_type"]["城市"]["fp"] == 1 and s["per_type"]["地名"]["fn"] == 1
    with pytest.raises(ValueError):
        ner_scores(["a"], [], TYPES)


def test_garbage_is_never_an_exact_match():
    """Issue 23.1: items that are all malformed parse to "no entity" but are not the answer "没有"."""
    s = ner_scores(["qwe rty", "asdf", "没有", "", "没有\n胡话", "北京_地名\n胡话"],
                   ["没有", "没有", "没有", "没有", "没有", "北京_地名"], TYPES)
    assert s["exact_matches"] == 2  # only "没有" and the (counted, shown) empty answer
    assert s["empty_predictions"] == 1
    assert s["malformed_prediction_items"] == 4 and s["sentences_with_malformed_predictions"] == 4
    assert set(s["per_type"]) == set(TYPES)  # malformed items add no row
    assert s["micro"]["tp"] == 1 and s["micro"]["fp"] == 0
    table = format_table(s)
    assert "exact match 0.3333 (2/6 sentences)" in table and "(in 4 sentences)" in table
    assert "empty answers (scored as 没有): 1" in table
