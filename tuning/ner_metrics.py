"""Entity-level scores for generative NER: parse "实体_类型" answers into sets, then micro and per-type
precision / recall / F1 and sentence exact match.

Answer format (the MSRA instruction data): items separated by "\\n", each "entity_type"; "没有" (or an empty
answer) means no entity. Parsing: split on "\\n", strip each item, drop empty items and "没有", split each item on
its LAST "_" (entities may contain "_"); an item without "_" or with an empty side is malformed: it is counted,
never scored. Duplicates in one answer count once (the gold answers are de-duplicated too).

Scores are over (sentence, entity, type) triples: tp = predicted ∩ gold, fp = predicted − gold,
fn = gold − predicted. A ratio with a zero denominator is 0.0. Exact match compares what was said: the predicted
set equals the gold set AND the prediction has no malformed item. So only "没有" (or an empty answer, counted and
shown as such) matches a gold "没有"; garbage that parses to no entity does not. Malformed items count against
their sentence and never add a row to the per-type table.
"""
import unicodedata
from dataclasses import dataclass

NONE_ANSWERS = ("没有",)


@dataclass(frozen=True)
class Parsed:
    entities: frozenset  # of (entity, type)
    malformed: tuple     # items that are not "entity_type"


def parse_entities(answer: str, separator: str = "\n", none_answers=NONE_ANSWERS) -> Parsed:
    """'北京_地名\\n没有\\n坏\\n北京_地名' → entities {('北京', '地名')}, malformed ('坏',)"""
    entities, malformed = set(), []
    for item in (answer or "").split(separator):
        item = item.strip()
        if not item or item in none_answers:
            continue
        entity, sep, kind = item.rpartition("_")
        entity, kind = entity.strip(), kind.strip()
        if not sep or not entity or not kind:
            malformed.append(item)
        else:
            entities.add((entity, kind))
    return Parsed(frozenset(entities), tuple(malformed))


def _prf(tp: int, fp: int, fn: int) -> dict:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def ner_scores(predictions: list[str], references: list[str], types=None) -> dict:
    """Micro and per-type P/R/F1, exact match and malformed counts for paired answer texts.

    `types` fixes the rows of the per-type table (e.g. 人名/地名/机构名); any other type found in the
    predictions or references gets its own row too, so nothing is hidden.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    counts: dict[str, list[int]] = {t: [0, 0, 0] for t in (types or ())}
    exact = malformed_pred = malformed_gold = malformed_sentences = empty = 0
    for pred_text, gold_text in zip(predictions, references):
        empty += not (pred_text or "").strip()
        pred, gold = parse_entities(pred_text), parse_entities(gold_text)
        malformed_pred += len(pred.malformed)
        malformed_gold += len(gold.malformed)
        malformed_sentences += bool(pred.malformed)
        exact += not pred.malformed and pred.entities == gold.entities
        for kind, index, items in (("tp", 0, pred.entities & gold.entities), ("fp", 1, pred.entities - gold.entities),
                                   ("fn", 2, gold.entities - pred.entities)):
            for _, entity_type in items:
                counts.setdefault(entity_type, [0, 0, 0])[index] += 1
    total = [sum(c[i] for c in counts.values()) for i in range(3)]
    n = len(references)
    return {
        "n_sentences": n,
        "micro": _prf(*total),
        "per_type": {t: _prf(*c) for t, c in counts.items()},
        "exact_match": exact / n if n else 0.0,
        "exact_matches": exact,
        "malformed_prediction_items": malformed_pred,
        "malformed_reference_items": malformed_gold,
        "sentences_with_malformed_predictions": malformed_sentences,  # never an exact match
        "empty_predictions": empty,  # scored as "no entity" (right for a sentence without any), but worth seeing
    }


def _ljust(text: str, width: int) -> str:
    """Left-justify by display width (a CJK character takes two columns)."""
    shown = sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)
    return text + " " * max(width - shown, 1)


def format_table(scores: dict, title: str = "") -> str:
    """A plain-text table of one `ner_scores` result."""
    lines = [title] if title else []
    lines.append(f"{'type':<10}{'precision':>10}{'recall':>10}{'f1':>10}{'tp':>7}{'fp':>7}{'fn':>7}")
    rows = [*scores["per_type"].items(), ("micro", scores["micro"])]
    for name, s in rows:
        lines.append(f"{_ljust(name, 10)}{s['precision']:>10.4f}{s['recall']:>10.4f}{s['f1']:>10.4f}"
                     f"{s['tp']:>7}{s['fp']:>7}{s['fn']:>7}")
    lines.append(f"exact match {scores['exact_match']:.4f} ({scores['exact_matches']}/{scores['n_sentences']} "
                 f"sentences); malformed predicted items: {scores['malformed_prediction_items']} "
                 f"(in {scores.get('sentences_with_malformed_predictions', 0)} sentences); "
                 f"empty answers (scored as 没有): {scores.get('empty_predictions', 0)}")
    return "\n".join(lines)
