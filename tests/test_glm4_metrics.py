"""tuning.text_metrics equals direct calls of jieba + rouge-chinese + nltk (finetune_demo's compute_metrics)."""
import jieba
import numpy as np
import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

from tuning.text_metrics import decode_rows, generation_metrics, score_corpus, score_pair

PAIRS = [
    ("这款连衣裙采用简约的纯色设计，十分百搭。", "简约的纯色连衣裙，百搭又显瘦。"),
    ("牛仔外套，白色衣身，做旧破洞。", "简约而不简单的牛仔外套，白色的衣身十分百搭。"),
    ("Hello world, this is a test.", "Hello world, this is the test."),
    ("完全不同的句子", "毫无关系"),
]


def by_hand(prediction, reference):
    hyp, ref = list(jieba.cut(prediction)), list(jieba.cut(reference))
    scores = Rouge().get_scores(" ".join(hyp), " ".join(ref))[0]
    out = {k: round(scores[k]["f"] * 100, 4) for k in ("rouge-1", "rouge-2", "rouge-l")}
    out["bleu-4"] = sentence_bleu([ref], hyp, smoothing_function=SmoothingFunction().method3)
    return out


@pytest.mark.parametrize("prediction, reference", PAIRS)
def test_pair_equals_the_packages(prediction, reference):
    assert score_pair(prediction, reference) == by_hand(prediction, reference)


def test_corpus_is_the_mean_of_samples():
    expected = {k: np.mean([by_hand(p, r)[k] for p, r in PAIRS]) for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4")}
    got = score_corpus([p for p, _ in PAIRS], [r for _, r in PAIRS])
    assert got == pytest.approx(expected, abs=0, rel=1e-12)
    assert 0 < got["bleu-4"] < 1 and 1 < got["rouge-1"] < 100  # BLEU stays 0-1, ROUGE is x100


def test_empty_prediction_scores_zero_instead_of_crashing():
    with pytest.raises(ValueError, match="Hypothesis is empty"):  # what the original hit (ChatGLM3#930)
        Rouge().get_scores("", "参考 答案")
    assert score_pair("", "参考答案") == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}
    assert score_pair("   ", "参考答案")["rouge-1"] == 0.0
    mixed = score_corpus(["", PAIRS[0][0]], ["参考答案", PAIRS[0][1]])
    assert mixed["rouge-1"] == pytest.approx(by_hand(*PAIRS[0])["rouge-1"] / 2)


def test_decoding_drops_padding_and_special_tokens(glm4_tokenizer):
    ids = glm4_tokenizer.encode("\n你好", add_special_tokens=False)
    row_pred = np.array(ids + [151336, 151329, 151329])  # answer, <|user|>, pad
    row_label = np.array(ids + [151336, -100, -100])
    assert decode_rows(glm4_tokenizer, [row_pred, row_label]) == ["你好", "你好"]
    assert generation_metrics(glm4_tokenizer, [row_pred], [row_label])["rouge-1"] == 100.0
