"""Build two small demonstration preference sets from data this repository ships (nothing downloaded). They show the
format and let the make targets and tests train on real text; they are rule-made, not human preferences.

msra_ner_pairs.jsonl — llama_ner's MSRA instruction rows (data/llama_ner_msra/instruct_data/dev.txt: the train-mode
rows of msra_1000.txt, the sentences `make llama-ner` trains on; none of the MSRA test split). chosen = the gold
answer; rejected = one plausible wrong answer, in turn: an entity given the wrong type, an entity missed (or "没有"
for a single entity), an entity invented from a span of the same sentence that is no entity. Format
{"prompt": INSTRUCT + "\\n" + QUERY, "chosen", "rejected"}: the NER prompt is single-turn.

glm4_tool_pairs.jsonl — GLM-4 tool calls over AdvertiseGen's real product attributes (data/glm4_finetune_demo/
AdvertiseGen/xl.jsonl, "类型#裙*颜色#红色…"). Two tools are declared, search_products and write_ad_copy; the user asks
to find a product or to write its ad. chosen = the right call with the row's attributes; rejected = in turn the other
tool with the same arguments, a dropped attribute, or an attribute value taken from another row. Every third row is
multi-turn: an earlier request, its call, the tool's observation (that row's real AdvertiseGen ad) and the
assistant's answer come first, so only the final turn is the preference.

    python preference/make_demo_pairs.py --out_dir build/preference --ner_pairs 64 --tool_pairs 48
"""
import argparse
import json
import os
import random

from tuning.errors import UserError, run_main
from tuning.files import atomic_file
from tuning.readers import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NER_ROWS = os.path.join(REPO, "data", "llama_ner_msra", "instruct_data", "dev.txt")
AD_ROWS = os.path.join(REPO, "data", "glm4_finetune_demo", "AdvertiseGen", "xl.jsonl")
TYPES = ("人名", "地名", "机构名")
TOOLS = [{"type": "function", "function": {
    "name": name, "description": description,
    "parameters": {"type": "object", "properties": {
        "类型": {"type": "string", "description": "商品类型"},
        "属性": {"type": "object", "description": "其余属性，如 颜色、材质、风格"}}, "required": ["类型"]}}}
    for name, description in (("search_products", "按类型和属性搜索商品"), ("write_ad_copy", "为商品写一段广告文案"))]
ASK = {"search_products": "帮我找这样的商品：{}", "write_ad_copy": "帮我给这件商品写广告：{}"}


def parse_entities(answer: str) -> list[tuple[str, str]]:
    return [] if answer == "没有" else [tuple(line.rsplit("_", 1)) for line in answer.split("\n")]


def ner_answer(entities) -> str:
    return "\n".join(f"{entity}_{kind}" for entity, kind in entities) or "没有"


def wrong_ner_answer(entities, sentence: str, turn: int, rng: random.Random) -> str:
    """A plausible wrong answer: wrong type / missed entity / invented entity (turn picks; no entity: invented)."""
    if entities and turn % 3 == 0:
        i = rng.randrange(len(entities))
        wrong = rng.choice([t for t in TYPES if t != entities[i][1]])
        return ner_answer([*entities[:i], (entities[i][0], wrong), *entities[i + 1:]])
    if entities and turn % 3 == 1:
        i = rng.randrange(len(entities))
        return ner_answer(entities[:i] + entities[i + 1:])
    names = {entity for entity, _ in entities}
    for _ in range(100):
        start = rng.randrange(max(1, len(sentence) - 2))
        span = sentence[start:start + rng.choice((2, 3))]
        if len(span) >= 2 and span.isalnum() and not any(span in n or n in span for n in names):
            return ner_answer([*entities, (span, rng.choice(TYPES))])
    return ner_answer([*entities, (sentence[:2], TYPES[0])])


def ner_pairs(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    pairs = []
    rows = [row for _, row in read_jsonl(NER_ROWS)]
    with_entities, without = [r for r in rows if r["answer"] != "没有"], [r for r in rows if r["answer"] == "没有"]
    # one row in four without entities (the file lists those last), as the model must also learn to answer 没有
    chosen_rows = [without.pop(0) if i % 4 == 3 and without else with_entities.pop(0) for i in range(count)]
    for turn, row in enumerate(chosen_rows):
        entities = parse_entities(row["answer"])
        sentence = row["query"].removeprefix("文本：")
        pairs.append({"prompt": row["instruct"] + "\n" + row["query"], "chosen": row["answer"],
                      "rejected": wrong_ner_answer(entities, sentence, turn, rng)})
    return pairs


def attributes(content: str) -> dict:
    return dict(part.split("#", 1) for part in content.split("*") if "#" in part)


def call(name: str, arguments: dict) -> dict:
    return {"role": "assistant", "metadata": name, "content": json.dumps(arguments, ensure_ascii=False)}


def tool_arguments(attrs: dict) -> dict:
    rest = {k: v for k, v in attrs.items() if k != "类型"}
    return {"类型": attrs.get("类型", "商品"), "属性": rest}


def wrong_call(name: str, arguments: dict, other: dict, turn: int) -> dict:
    """The other tool / an attribute dropped / a value from another row (turn picks; falls back to the other tool)."""
    rest = arguments["属性"]
    if turn % 3 == 1 and rest:
        dropped = dict(list(rest.items())[:-1])
        return call(name, {**arguments, "属性": dropped})
    swap = [k for k in rest if k in other["属性"] and other["属性"][k] != rest[k]]
    if turn % 3 == 2 and (swap or other["类型"] != arguments["类型"]):
        if swap:
            return call(name, {**arguments, "属性": {**rest, swap[0]: other["属性"][swap[0]]}})
        return call(name, {**arguments, "类型": other["类型"]})
    return call(next(t["function"]["name"] for t in TOOLS if t["function"]["name"] != name), arguments)


def tool_pairs(count: int) -> list[dict]:
    rows = [row["messages"] for _, row in read_jsonl(AD_ROWS)[:count + 1]]
    pairs = []
    for turn in range(count):
        user = rows[turn][0]["content"]
        name = ("search_products", "write_ad_copy")[turn % 2]
        arguments = tool_arguments(attributes(user))
        other = tool_arguments(attributes(rows[turn + 1][0]["content"]))
        messages = [{"role": "system", "content": "", "tools": TOOLS}]
        if turn % 3 == 0 and turn > 0:  # an earlier exchange first: its ad is the tool's real output
            before, before_ad = rows[turn - 1][0]["content"], rows[turn - 1][1]["content"]
            messages += [{"role": "user", "content": ASK["write_ad_copy"].format(before)},
                         call("write_ad_copy", tool_arguments(attributes(before))),
                         {"role": "observation", "content": json.dumps({"文案": before_ad}, ensure_ascii=False)},
                         {"role": "assistant", "content": before_ad}]
        messages.append({"role": "user", "content": ASK[name].format(user)})
        pairs.append({"messages": messages, "chosen": call(name, arguments),
                      "rejected": wrong_call(name, arguments, other, turn)})
    return pairs


def write_jsonl(path: str, records: list[dict]) -> None:
    with atomic_file(path) as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"{len(records)} pairs -> {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=os.path.join(REPO, "build", "preference"))
    parser.add_argument("--ner_pairs", type=int, default=64, help="MSRA NER pairs (at most 1,000)")
    parser.add_argument("--tool_pairs", type=int, default=48, help="GLM-4 tool-call pairs (at most 2,999)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not (0 < args.ner_pairs <= 1000 and 0 < args.tool_pairs < 3000):
        raise UserError("expected 1..1000 NER pairs and 1..2999 tool pairs", field="ner_pairs")
    os.makedirs(args.out_dir, exist_ok=True)
    write_jsonl(os.path.join(args.out_dir, "msra_ner_pairs.jsonl"), ner_pairs(args.ner_pairs, args.seed))
    write_jsonl(os.path.join(args.out_dir, "glm4_tool_pairs.jsonl"), tool_pairs(args.tool_pairs))


if __name__ == "__main__":
    run_main(main)
