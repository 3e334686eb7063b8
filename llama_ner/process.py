"""MSRA NER sentences → instruction rows, as the original process.py.

Input: one JSON object per line, {"text": str, "entity_list": [{"entity_index": {"begin", "end"},
"entity_type": "PER"|"LOC"|"ORG", "entity": str}, ...]}. Output: one JSON object per line,
{"instruct", "query": "文本：" + text, "answer": "实体_类型\\n…" or "没有"}, no trailing newline.
Mode `train` writes every sentence with entities, then every sentence without; mode `dev` writes only the
sentences with entities. Entity types become 人名/地名/机构名; a repeated (entity, type) is kept once.
The instruction names the entity types of the data: MSRA's (PER/LOC/ORG) give exactly the original prompt;
another dataset's types are listed in a stable order (ordered_types), or as given with --entity_types.

With no arguments it does what the original's __main__ did, on the data we have (the original's
msra_train.txt is not vendored; msra_1000.txt is the first 1,000 sentences of that train split):
    train: data/llama_ner_msra/ori_data/msra_1000.txt → build/llama-ner/instruct_data/train.txt (train mode)
    dev:   data/llama_ner_msra/ori_data/msra_1000.txt → build/llama-ner/instruct_data/dev.txt   (dev mode)
    test:  data/msra_extra/msra_test.txt              → build/llama-ner/instruct_data/test.txt  (train mode:
           all 4,365 test sentences, positives first, so negatives are scored too)
The vendored data/llama_ner_msra/instruct_data/dev.txt is what the original shipped as dev: it equals the
train-mode output on msra_1000.txt (1,000 rows), not the dev-mode one (344 rows); see llama_ner/README.md.
"""
import argparse
import json
import os


from tuning.errors import UserError, run_main
from tuning.files import atomic_file, read_jsonl
from tuning.outputs import check_output_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TYPE_NAMES = {"PER": "人名", "ORG": "机构名", "LOC": "地名"}
MSRA_TYPES = ["人名", "地名", "机构名"]  # the original prompt's order
INSTRUCTION = ("你现在是一个实体识别模型，你需要提取文本里面的{}，如果存在结果，返回'实体_实体类型'，不同实体间用\n分隔。"
               "如果没有结果，回答'没有'。")
INSTRUCT = INSTRUCTION.format("、".join(MSRA_TYPES))  # the original's prompt (MSRA)


def ordered_types(types) -> list[str]:
    """The entity types a prompt or a report lists: MSRA's three when the data has no other type (so MSRA gives
    exactly the original prompt), else the types found, MSRA's first in their order, then the rest sorted."""
    types = set(types)
    if types <= set(MSRA_TYPES):
        return list(MSRA_TYPES)
    return [t for t in MSRA_TYPES if t in types] + sorted(types - set(MSRA_TYPES))


def instruction_for(types) -> str:
    return INSTRUCTION.format("、".join(ordered_types(types)))


NO_ENTITY = "没有"


def _check_place(text, entity: str, index, path: str, line: int, field: str) -> None:
    """An entity must be in its sentence (and where entity_index says, when it says): the original wrote any string
    as an answer, so a typo in the data became a training target the model can never find (issue 33.4)."""
    if not isinstance(text, str) or not text:
        return  # empty sentences are skipped (as the original); a non-string text is reported by the caller
    if entity not in text:
        raise UserError(f"{entity!r} does not occur in the text", path=path, line=line, field=field + ".entity")
    if isinstance(index, dict) and isinstance(index.get("begin"), int) and isinstance(index.get("end"), int):
        begin, end = index["begin"], index["end"]
        if text[begin:end] != entity or not 0 <= begin < end <= len(text):
            raise UserError(f"text[{begin}:{end}] is {text[begin:end]!r}, not the entity {entity!r} (the text has "
                            f"{len(text)} characters)", path=path, line=line, field=field + ".entity_index")


def _entities(record: dict, path: str, line: int) -> list[tuple[str, str]]:
    entity_list = record.get("entity_list")
    if not isinstance(entity_list, list):
        raise UserError("missing or not a list; expected a list of entities (may be empty)",
                        path=path, line=line, field="entity_list")
    found = []
    for i, item in enumerate(entity_list):
        field = f"entity_list[{i}]"
        if not isinstance(item, dict):
            raise UserError("expected an object with entity and entity_type", path=path, line=line, field=field)
        entity, kind = item.get("entity"), item.get("entity_type")
        if not isinstance(entity, str) or not entity:
            raise UserError("expected a non-empty string", path=path, line=line, field=field + ".entity")
        if not isinstance(kind, str) or not kind:
            raise UserError("expected a string such as PER, LOC or ORG", path=path, line=line,
                            field=field + ".entity_type")
        _check_place(record.get("text"), entity, item.get("entity_index"), path, line, field)
        found.append((entity, TYPE_NAMES.get(kind, kind)))  # other types pass through unchanged, as the original
    return found


def convert(path: str, types=None) -> tuple[list[dict], list[dict], list[int]]:
    """(rows with entities, rows without, lines skipped); empty texts are skipped as the original did.

    The instruction names `types` (names such as 人名, or codes such as PER), else the types found in the file
    (see ordered_types: MSRA data gets the original prompt)."""
    records, skipped = [], []
    for line, record in read_jsonl(path):
        text = record.get("text")
        if not isinstance(text, str):
            raise UserError("missing or not a string; expected the sentence", path=path, line=line, field="text")
        entities = _entities(record, path, line)
        if not text:
            skipped.append(line)
        else:
            records.append((text, entities))
    found = {kind for _, entities in records for _, kind in entities}
    if types is not None:
        types = [TYPE_NAMES.get(t, t) for t in types]
        missing = sorted(found - set(types))
        if missing:
            raise UserError(f"the data has entity types the instruction would not name: {', '.join(missing)}; "
                            "add them", path=path, field="entity_types")
    instruct = instruction_for(found if types is None else types)
    has_entity, no_entity = [], []
    for text, entities in records:
        row = {"instruct": instruct, "query": "文本：" + text, "answer": NO_ENTITY}
        items = list(dict.fromkeys(f"{entity}_{kind}" for entity, kind in entities))  # dedupe, keep order
        if items:
            row["answer"] = "\n".join(items)
            has_entity.append(row)
        else:
            no_entity.append(row)
    return has_entity, no_entity, skipped


def process_msra(in_file: str, out_file: str, mode: str = "train", types=None) -> int:
    """The original's function: convert `in_file` and write `out_file`; returns the number of rows written."""
    if mode not in ("train", "dev"):
        raise UserError(f"expected train or dev, got {mode!r}", field="mode")
    check_output_file(out_file, [in_file])
    has_entity, no_entity, skipped = convert(in_file, types)
    print(f"{in_file}: 有实体的句子 {len(has_entity)}，没有实体的句子 {len(no_entity)}")
    if has_entity or no_entity:
        instruct = (has_entity or no_entity)[0]["instruct"]
        print(f"entity types in the instruction: {instruct.split('提取文本里面的')[1].split('，')[0]}")
    rows = has_entity + no_entity if mode == "train" else has_entity
    os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)  # as the other scripts do (issue 33.3)
    with atomic_file(out_file) as f:
        # One row a line, each ending in a newline: the original left the last one open, so a row appended later
        # (`cat more.txt >> train.txt`) was glued to it (issue 33.4).
        f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    print(f"wrote {len(rows)} rows ({mode} mode) -> {out_file}")
    if mode == "dev" and no_entity:
        print(f"left out {len(no_entity)} sentences without entities (dev mode keeps positives only)")
    if skipped:
        print(f"skipped {len(skipped)} lines with an empty text (lines {', '.join(map(str, skipped[:10]))}"
              f"{', …' if len(skipped) > 10 else ''})")
    return len(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in_file", help="one MSRA file to convert (with --out_file); default: the three runs above")
    parser.add_argument("--out_file", help="where to write the instruction rows")
    parser.add_argument("--mode", choices=["train", "dev"], default="train",
                        help="train: positives then negatives; dev: positives only (default: train)")
    parser.add_argument("--entity_types", default=None,
                        help="comma-separated types the instruction names (e.g. 人名,地名 or PER,LOC); default: the "
                             "types found in --in_file (MSRA: the original prompt). Give dev/test files the list "
                             "printed for the training file, so all splits share one prompt")
    parser.add_argument("--out_dir", default=os.path.join(REPO, "build", "llama-ner", "instruct_data"),
                        help="output folder of the default runs (default: build/llama-ner/instruct_data)")
    args = parser.parse_args()
    if bool(args.in_file) != bool(args.out_file):
        raise UserError("give both --in_file and --out_file, or neither", field="in_file")
    if args.in_file:
        types = None
        if args.entity_types is not None:
            types = [t.strip() for t in args.entity_types.split(",") if t.strip()]
            if not types:
                raise UserError("expected comma-separated entity types, e.g. 人名,地名", field="entity_types")
        process_msra(args.in_file, args.out_file, args.mode, types)
        return
    ori = os.path.join(REPO, "data", "llama_ner_msra", "ori_data")
    train_in = os.path.join(ori, "msra_train.txt")  # the original's full train split, if the user added it
    if not os.path.exists(train_in):
        train_in = os.path.join(ori, "msra_1000.txt")
    os.makedirs(args.out_dir, exist_ok=True)
    process_msra(train_in, os.path.join(args.out_dir, "train.txt"), "train")
    process_msra(os.path.join(ori, "msra_1000.txt"), os.path.join(args.out_dir, "dev.txt"), "dev")
    process_msra(os.path.join(REPO, "data", "msra_extra", "msra_test.txt"),
                 os.path.join(args.out_dir, "test.txt"), "train")


if __name__ == "__main__":
    run_main(main)
