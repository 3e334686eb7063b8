"""ROUGE-1/2/L and BLEU-4 for generated Chinese text, as THUDM's finetune demos compute them.

Texts are cut into words with jieba (accurate mode, HMM on); ROUGE is rouge-chinese's F score × 100 rounded to
4 decimals per sample; BLEU-4 is nltk's sentence_bleu with SmoothingFunction().method3 and the default equal
weights, left on its 0–1 scale (as the original). The corpus score is the plain mean over samples.

One change from the original: an empty prediction (or reference) scores 0 on every metric instead of crashing the
whole evaluation with rouge-chinese's `ValueError: Hypothesis is empty.`.
"""
import numpy as np

METRICS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")


def _cut(text: str) -> list[str]:
    import jieba

    return list(jieba.cut(text))


def score_pair(prediction: str, reference: str) -> dict[str, float]:
    """The four scores of one prediction against one reference."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    pred_words, ref_words = _cut(prediction), _cut(reference)
    scores = dict.fromkeys(METRICS, 0.0)
    hyp, ref = " ".join(pred_words), " ".join(ref_words)
    if hyp.strip() and ref.strip():
        rouge = Rouge().get_scores(hyp, ref)[0]
        for key in ("rouge-1", "rouge-2", "rouge-l"):
            scores[key] = round(rouge[key]["f"] * 100, 4)
    if pred_words and ref_words:
        scores["bleu-4"] = sentence_bleu([ref_words], pred_words, smoothing_function=SmoothingFunction().method3)
    return scores


def score_corpus(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean of each metric over the samples (0 for an empty list)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    per_sample = {key: [] for key in METRICS}
    for prediction, reference in zip(predictions, references):
        for key, value in score_pair(prediction, reference).items():
            per_sample[key].append(value)
    return {key: float(np.mean(values)) if values else 0.0 for key, values in per_sample.items()}


def decode_rows(tokenizer, rows) -> list[str]:
    """Token-id rows (numpy/tensor, -100 as padding) → stripped texts without special tokens."""
    texts = []
    for row in rows:
        ids = [int(t) for t in row if int(t) >= 0]
        texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return texts


def generation_metrics(tokenizer, predictions, label_ids) -> dict[str, float]:
    """compute_metrics for a Seq2SeqTrainer with predict_with_generate: generated ids vs reference ids."""
    return score_corpus(decode_rows(tokenizer, predictions), decode_rows(tokenizer, label_ids))
