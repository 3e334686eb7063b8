"""The original's predict.py: three hard-coded sentences through the trained LoRA.

    python llama_ner/predict.py [--train_args=PATH] [--key=value ...]

Prints, per sentence, 文本 >>> (instruction + query as JSON), 预测 >>> (the original's teacher-forced
next-token argmax over the answer positions, which sees the gold answer) and 真实 >>> (the gold answer); added:
生成 >>> (free greedy generation, what the model really answers) and the entity scores of those three answers.
"""
import json


from llama_ner.common import collate_for, show_args
from llama_ner.evaluation import generate_answers, load_model, parse_eval_args, teacher_forced
from llama_ner.process import MSRA_TYPES  # the three samples are MSRA sentences
from llama_ner.process import INSTRUCT
from tuning.errors import run_main
from tuning.ner_metrics import format_table, ner_scores

TEXTS = [
    {"instruct": INSTRUCT, "query": "文本：我们是受到郑振铎先生、阿英先生著作的启示，从个人条件出发，瞄准现代出版史研究的空白，"
     "重点集藏解放区、国民党毁禁出版物。", "answer": "郑振铎_人名\n阿英_人名\n国民党_机构名"},
    {"instruct": INSTRUCT, "query": "文本：去年，我们又被评为“北京市首届家庭藏书状元明星户”。", "answer": "北京市_地名"},
    {"instruct": INSTRUCT, "query": "文本：藏书家、作家姜德明先生在1997年出版的书话专集《文林枝叶》中以“爱书的朋友”为题，"
     "详细介绍了我们夫妇的藏品及三口之家以书为友、好乐清贫的逸闻趣事。", "answer": "姜德明_人名"},
]


def main():
    args = parse_eval_args({"max_new_tokens": 128}, __doc__)
    show_args(args)
    model, tokenizer = load_model(args)
    collate = collate_for(args, tokenizer)

    preds, trues = teacher_forced(model, collate, TEXTS, args.train_batch_size, shuffle=False)
    generated = generate_answers(model, tokenizer, collate, TEXTS, len(TEXTS), args.max_new_tokens)
    for text, pred, true, gen in zip(TEXTS, preds, trues, generated):
        print("文本 >>> ", json.dumps(text["instruct"] + text["query"], ensure_ascii=False))
        print("预测 >>> ", pred)
        print("真实 >>> ", true)
        print("生成 >>> ", gen)
    print(format_table(ner_scores(generated, [t["answer"] for t in TEXTS], MSRA_TYPES),
                       "== the three samples (free generation) =="))


if __name__ == "__main__":
    run_main(main)
