"""A DPO-trained adapter through the vLLM hand-off (issue 34): preference/make_demo_pairs.py's MSRA pairs and
preference/train_dpo.py (a new LoRA on the tiny Chinese-Alpaca at vLLM's shapes, llama_ner's prompt) give an adapter
that `python -m serving.vllm` serves UNMERGED beside its base — one server start — answering as `python -m
serving.api --adapter` does: the same prompt tokens and the same greedy answer (16 new tokens, through the official
`openai` client); the base in the same vLLM server answers otherwise, so the adapter is applied."""
import os

import pytest

from preference import make_demo_pairs, train_dpo
from serving_support import Server
from test_vllm import LLAMA_CHATS, ask
from vllm_support import VllmServer, base_model

pytestmark = pytest.mark.slow
NER_CHATS = [[{"role": "user", "content": "找出句子中的地名、人名和机构名：\n文本：李明在上海复旦大学读书。"}], *LLAMA_CHATS[:2]]


@pytest.fixture(scope="module")
def dpo_adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dpo_vllm")
    make_demo_pairs.main(["--out_dir", str(folder), "--ner_pairs", "8", "--tool_pairs", "1"])
    out = folder / "llama-ner-dpo"
    train_dpo.main(["--model_dir", base_model("chinese-alpaca-7b"), "--prompt_format", "llama_ner",
                    "--train_path", str(folder / "msra_ner_pairs.jsonl"), "--save_dir", str(out), "--max_steps", "4",
                    "--save_steps", "4", "--train_batch_size", "2", "--max_length", "256", "--learning_rate", "5e-2"])
    return str(out)


def test_a_dpo_adapter_served_by_vllm_answers_as_our_server(dpo_adapter):
    from model_hub.prompt_format import read_prompt_format

    assert read_prompt_format(dpo_adapter) == "llama_ner"
    base, name = os.path.basename(base_model("chinese-alpaca-7b")), os.path.basename(dpo_adapter)
    server = VllmServer(dpo_adapter)
    try:
        listed = [m["id"] for m in server.request("GET", "/v1/models")[2]["data"]]
        assert listed == [base, name]
        theirs = [ask(server, name, chat) for chat in NER_CHATS]
        base_answers = [ask(server, base, chat) for chat in NER_CHATS]
    finally:
        server.stop()
    assert theirs != base_answers, "the DPO adapter answers as its base: LoRA not applied"
    ours = Server("--adapter", dpo_adapter)
    try:
        assert [ask(ours, name, chat) for chat in NER_CHATS] == theirs  # answers and prompt token counts
    finally:
        ours.stop()
